"""Tests of the synthetic CT generator (nnunet_hyspark.synthetic, hyspark_synthesize)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from nnunet_hyspark import synthetic
from nnunet_hyspark.cli.synthesize import main
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.synthetic import LABELS, case_rng, make_case, make_phantom, write_dataset

SMALL = (32, 32, 24)
SMALL_SPACING = (3.0, 3.0, 3.0)  # 96 x 96 x 72 mm like the default, 8x fewer voxels


@pytest.fixture(scope="module")
def case0():
    return make_case(0, 0)


def test_labels_constant():
    assert LABELS == {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}


def test_determinism_and_case_independence():
    a_img, a_lab = make_case(3, 1, SMALL, SMALL_SPACING)
    b_img, b_lab = make_phantom(SMALL, SMALL_SPACING, case_rng(3, 1))
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8
    assert a_img.shape == SMALL and a_lab.shape == SMALL
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    # case k equals the k-th spawned child of the seed, whatever the number of cases
    spawned = np.random.default_rng(np.random.SeedSequence(3).spawn(5)[1])
    c_img, _ = make_phantom(SMALL, SMALL_SPACING, spawned)
    assert c_img.tobytes() == a_img.tobytes()
    d_img, d_lab = make_case(4, 1, SMALL, SMALL_SPACING)
    assert not np.array_equal(a_img, d_img) and not np.array_equal(a_lab, d_lab)
    e_img, _ = make_case(3, 2, SMALL, SMALL_SPACING)
    assert not np.array_equal(a_img, e_img)


def test_hu_statistics(case0):
    img, lab = case0
    assert img.shape == (64, 64, 48)
    assert img.min() >= -1024 and img.max() <= 3071
    # air in the corners (outside the body)
    corner = img[:5, :5, :]
    assert abs(float(corner.mean()) + 1000) < 10
    assert 5 < float(corner.std()) < 25  # noise, a little reduced by the clip at -1024
    # body: per-slice filled (> -500) so the lungs count as inside
    body = np.stack([ndi.binary_fill_holes(img[:, :, z] > -500) for z in range(img.shape[2])], -1)
    assert 0.15 < body.mean() < 0.7
    # subcutaneous fat: 1.5-3 mm under the skin, lower part of the volume (no lungs, no ribs)
    ring = ndi.binary_erosion(body, iterations=1) & ~ndi.binary_erosion(body, iterations=2)
    ring[:, :, 24:] = False
    assert -150 < float(np.median(img[ring])) < -50
    # organs: each a non-trivial volume, plausible HU, all inside the body
    for name, value in LABELS.items():
        if value == 0:
            continue
        m = lab == value
        assert m.mean() > 0.002, name
        assert body[m].all(), name
    hu = {name: float(img[lab == value].mean()) for name, value in LABELS.items() if value != 0}
    assert 40 < hu["liver"] < 80
    # each organ in an HU band of its own (closer bands: the demo's network missed or merged organs)
    assert hu["spleen"] > hu["liver"] + 30 and hu["kidneys"] > hu["spleen"] + 60
    assert (img > 450).sum() > 200  # bone (spine, ribs; the aorta is ~350)
    assert (img[body] < -700).sum() > 100  # lungs at the top
    assert set(np.unique(lab)) == {0, 1, 2, 3}


def test_anisotropic_spacing_keeps_physical_size():
    """Same seed, same field of view: organ volumes in mm^3 agree between 3 mm iso and 2 x 2 x 4.5 mm."""
    iso_img, iso = make_case(5, 0, (32, 32, 24), (3.0, 3.0, 3.0))
    an_img, an = make_case(5, 0, (48, 48, 16), (2.0, 2.0, 4.5))
    for value in (1, 2, 3):
        v_iso = (iso == value).sum() * 27.0
        v_an = (an == value).sum() * 18.0
        assert v_iso > 0 and abs(v_an - v_iso) / v_iso < 0.15, (value, v_iso, v_an)
    # body volume too
    assert abs((an_img > -500).sum() * 18.0 / ((iso_img > -500).sum() * 27.0) - 1) < 0.1


def test_write_dataset_readable_by_nnunet(tmp_path):
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    out = write_dataset(tmp_path, 901, None, num_cases=2, shape=(32, 32, 16), spacing=(3.0, 3.0, 4.5), seed=7,
                        progress=False)
    assert out == tmp_path / "Dataset901_SyntheticCT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset901_SyntheticCT"]  # no temp leftovers
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == LABELS
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    files = get_filenames_of_train_images_and_targets(str(out), meta)
    assert len(files) == 2
    for case, entry in files.items():
        (image_file,) = entry["images"]
        img = sitk.ReadImage(image_file)
        seg = sitk.ReadImage(entry["label"])
        assert img.GetSize() == (32, 32, 16) and seg.GetSize() == (32, 32, 16)
        assert img.GetSpacing() == pytest.approx((3.0, 3.0, 4.5))
        assert seg.GetSpacing() == pytest.approx((3.0, 3.0, 4.5))
        assert img.GetPixelID() == sitk.sitkInt16 and seg.GetPixelID() == sitk.sitkUInt8
        # array content equals the generator's case (x, y, z) <-> SimpleITK (z, y, x)
        k = int(case.rsplit("_", 1)[1])
        ref_img, ref_lab = make_case(7, k, (32, 32, 16), (3.0, 3.0, 4.5))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg).transpose(2, 1, 0), ref_lab)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0),
                                      np.rint(ref_img).astype(np.int16))


def test_unlabeled_mode(tmp_path):
    out = write_dataset(tmp_path, 902, None, num_cases=1, shape=(16, 16, 16), spacing=(6.0, 6.0, 4.5),
                        unlabeled=True, progress=False)
    assert out.name == "Dataset902_SyntheticCTUnlabeled"
    assert not (out / "labelsTr").exists()
    assert [p.name for p in (out / "imagesTr").iterdir()] == ["SyntheticCTUnlabeled_000_0000.nii.gz"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0} and meta["numTraining"] == 1


def test_cli_uses_nnunet_raw_and_refuses_existing_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["-d", "903", "--num-cases", "1", "--shape", "16", "16", "16", "--spacing", "6", "6", "4.5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "Dataset903_SyntheticCT" in out[0] and "1 " in out[0]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # same id, other name, no --force -> one-line error, exit 2, nothing new written
    with pytest.raises(SystemExit) as exc:
        main(["-d", "903", "--name", "Other", "--num-cases", "1", "--shape", "16", "16", "16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # --force replaces it (also under another name)
    assert main(["-d", "903", "--name", "Other", "--num-cases", "1", "--shape", "16", "16", "16",
                 "--spacing", "6", "6", "4.5", "--force", "--unlabeled"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset903_Other"]


def test_output_root_option_and_missing_env(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["-d", "904"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nnUNet_raw" in err and len(err.strip().splitlines()) == 1
    root = tmp_path / "raw"
    assert main(["-d", "904", "--output-root", str(root), "--num-cases", "1", "--shape", "16", "16", "16",
                 "--spacing", "6", "6", "4.5"]) == 0
    assert (root / "Dataset904_SyntheticCT" / "labelsTr").is_dir()


@pytest.mark.parametrize("argv, fragment", [
    (["-d", "0"], "between 1 and 999"),
    (["-d", "1000"], "between 1 and 999"),
    (["-d", "905", "--num-cases", "0"], "at least 1"),
    (["-d", "905", "--shape", "64", "0", "48"], "positive"),
    (["-d", "905", "--shape", "64", "15", "48"], "too small"),
    (["-d", "905", "--spacing", "1.5", "-1", "1.5"], "positive"),
    (["-d", "905", "--spacing", "1.5", "0", "1.5"], "positive"),
    (["-d", "905", "--name", "bad/name"], "invalid dataset name"),
])
def test_bad_input_one_line_error(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--output-root", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0] and "->" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_error_during_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return np.zeros((16, 16, 16), np.float32), np.zeros((16, 16, 16), np.uint8)

    monkeypatch.setattr(synthetic.dataset, "make_case", boom)  # write_dataset calls the make_case of its module
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path, 906, None, num_cases=3, shape=(16, 16, 16), progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(HySparKError):
        write_dataset(tmp_path, 906, "x y", num_cases=1, shape=(16, 16, 16), progress=False)


def test_speed_default_case():
    import time

    make_case(1, 0)  # warm-up
    t = time.perf_counter()
    make_case(1, 1)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("seed", [0, 100, 200])  # the demo's labelled, unlabeled and test seeds
def test_demo_geometry_keeps_every_organ_learnable(seed):
    """At the demo's (and the study's) geometry every organ is many voxels across and not cut by the
    cropped field of view: at 48 x 48 x 32 x (2, 2, 2.25) mm spleen and kidneys were 300-500 voxels (this
    test fails there) and the demo's network never learnt them (Dice 0)."""
    from nnunet_hyspark.benchmark.study import StudyOptions, commands
    from nnunet_hyspark.cli import demo

    geometry = ["--shape", *map(str, synthetic.DEMO_SHAPE), "--spacing", *map(str, synthetic.DEMO_SPACING)]
    assert " ".join(geometry) in " ".join(demo.SYNTH)  # the demo and the study synthesise at this geometry
    assert all(" ".join(geometry) in " ".join(cmd) for _, cmd in commands(StudyOptions(), Path("/s"))[:2])
    voxel_mm3 = float(np.prod(synthetic.DEMO_SPACING))
    for k in range(3):
        _, lab = make_case(seed, k, synthetic.DEMO_SHAPE, synthetic.DEMO_SPACING)
        _, full = make_case(seed, k, (64, 64, 48), (1.5, 1.5, 1.5))  # the whole body, same voxel size
        for name in ("liver", "spleen", "kidneys"):
            mask = lab == LABELS[name]
            idx = np.argwhere(mask)
            assert len(idx) >= 600, (name, seed, k, len(idx))
            extent = idx.max(0) - idx.min(0) + 1
            assert extent.min() >= 7, (name, seed, k, extent)
            # the crop keeps (nearly) the whole organ: at most a sliver of the liver at the border
            whole = int((full == LABELS[name]).sum())
            assert mask.sum() >= (0.97 if name == "liver" else 1.0) * whole, (name, seed, k, mask.sum(), whole)
            assert mask.sum() * voxel_mm3 > 1000  # mm^3: organ-sized, not a speck
