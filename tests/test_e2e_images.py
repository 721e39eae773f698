"""Issue 13, item 1: any folder of CT (NIfTI files and a DICOM series) through hyspark_plan_and_preprocess --images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cmd
from test_image_collection import write_dicom_series

pytestmark = pytest.mark.e2e
PLANS = "nnUNetHySparKPlans"


def ct_like(seed: int, shape=(32, 40, 40)) -> sitk.Image:
    """A body (soft tissue around -50 HU) in air, at the synthetic dataset's spacing (x, y 2 mm, z 2.25 mm)."""
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, np.int16)
    arr[4:-4, 6:-6, 6:-6] = rng.integers(-120, 60, size=(shape[0] - 8, shape[1] - 12, shape[2] - 12))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.25))
    return img


def _datasets(root) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("Dataset")}


def test_a_folder_of_nifti_and_a_dicom_series_is_planned_and_preprocessed(synthetic_ct, tmp_path):
    env, raw, pre = synthetic_ct["env"], synthetic_ct["raw"], synthetic_ct["preprocessed"]
    archive = tmp_path / "archive"
    (archive / "scanner1").mkdir(parents=True)
    sitk.WriteImage(ct_like(1), str(archive / "scanner1" / "ct_a.nii.gz"))
    sitk.WriteImage(ct_like(2), str(archive / "scanner1" / "ct_b.nii.gz"))
    write_dicom_series(ct_like(3), archive / "scanner2" / "patient9")
    (archive / "scanner1" / "broken.nii.gz").write_bytes(b"\x1f\x8b not an image")
    before_raw, before_pre = _datasets(raw), _datasets(pre)
    base = ["hyspark_plan_and_preprocess", "--images", str(archive), "--plans-from", str(synthetic_ct["labelled"]),
            "-np", "1", "--name", "Archive"]

    refused = run_cmd(base, env, check=False)  # the broken file is listed and refused: nothing written
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: 1 input(s) cannot be used: ") and "broken.nii.gz" in refused.stderr
    assert "--skip-unreadable" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert _datasets(raw) == before_raw and _datasets(pre) == before_pre

    proc = run_cmd([*base, "--skip-unreadable"], env)
    (new,) = _datasets(raw) - before_raw
    assert new.startswith("Dataset9") and new.endswith("_Archive") and int(new[7:10]) >= 900, new
    images = raw / new / "imagesTr"
    assert sorted(p.name for p in images.iterdir()) == ["ct_a_0000.nii.gz", "ct_b_0000.nii.gz", "patient9_0000.nii.gz"]
    assert (images / "ct_a_0000.nii.gz").is_symlink() and not (images / "patient9_0000.nii.gz").is_symlink()
    meta = json.loads((raw / new / "dataset.json").read_text())
    assert meta["unlabeled"] is True and len(meta["hyspark_skipped"]) == 1
    assert f"{new}: 3 images, 1 inputs skipped" in proc.stdout
    # preprocessed exactly like --plans-from: the source's plans, one preprocessed file per case
    source_plans = json.loads(next(pre.glob(f"Dataset{synthetic_ct['labelled']}_*/{PLANS}.json")).read_text())
    plans = json.loads((pre / new / f"{PLANS}.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == source_plans["configurations"]["3d_fullres"]["spacing"]
    data = pre / new / plans["configurations"]["3d_fullres"]["data_identifier"]
    assert sorted(p.name for p in data.glob("*.pkl")) == ["ct_a.pkl", "ct_b.pkl", "patient9.pkl"]


def test_bad_image_inputs_end_in_one_line_and_write_nothing(synthetic_ct, tmp_path):
    env, raw, pre = synthetic_ct["env"], synthetic_ct["raw"], synthetic_ct["preprocessed"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "empty" / "sub" / "README").write_text("no ending, like DICOM files: scanned for a series")
    before = (_datasets(raw), _datasets(pre))
    labelled = str(synthetic_ct["labelled"])
    cases = {
        "no images found": ["--images", str(tmp_path / "empty"), "--plans-from", labelled],
        "no such folder": ["--images", str(tmp_path / "missing"), "--plans-from", labelled],
        "--images needs --plans-from": ["--images", str(tmp_path / "empty")],
        "is already used": ["--images", str(tmp_path / "empty"), "-d", labelled, "--plans-from", labelled],
        "only apply to --images": ["-d", labelled, "--copy"],
    }
    for expected, args in cases.items():
        proc = run_cmd(["hyspark_plan_and_preprocess", *args], env, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and " -> " in proc.stderr, (args, proc.stderr)
        assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (_datasets(raw), _datasets(pre)) == before
    assert not list(raw.glob(".tmp-*"))
