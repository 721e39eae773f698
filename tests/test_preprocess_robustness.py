"""hyspark_plan_and_preprocess under bad data and killed runs (issue 12, items 7 and 10).

NaN/inf voxels are refused on the labelled and the ``--plans-from`` path, naming the case, or replaced with
``--replace-non-finite``; a completeness marker is written last; a killed run's backup (the last good copy)
survives a rerun that fails too; temporary files and folders of killed runs are cleaned.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_hyspark.cli.plan_and_preprocess import main
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.planning import completeness
from nnunet_hyspark.planning.rollback import BACKUP_SUFFIX, Rollback
from nnunet_hyspark.planners.hyspark_planner import PLANS_NAME
from nnunet_hyspark.synthetic import write_dataset

LABELLED, UNLABELED = 921, 923
CONFIG_DIR = f"{PLANS_NAME}_3d_fullres"


def _set_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        mp.setenv(k, str(root / sub))
    mp.setenv("nnUNet_def_n_proc", "1")
    mp.setenv("nnUNet_n_proc_DA", "0")


def put_non_finite(image: Path) -> None:
    """Rewrite an int16 image as float32 with a NaN and an inf in the body (what a broken export gives)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(image))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    c = tuple(s // 2 for s in arr.shape)
    arr[c], arr[c[0], c[1], c[2] + 1] = np.nan, np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(image), True)


def user_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A labelled dataset whose case 1 has NaN/inf, preprocessed with --replace-non-finite -1000."""
    root = tmp_path_factory.mktemp("nnunet_nan")
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, root)
        folder = write_dataset(root / "raw", LABELLED, "NanLab", num_cases=3, shape=(32, 32, 32),
                               spacing=(1.5, 1.5, 1.5), seed=0, progress=False)
        put_non_finite(sorted((folder / "imagesTr").iterdir())[1])
        assert main(["-d", str(LABELLED), "-np", "1", "--arch", "tiny", "--replace-non-finite", "-1000"]) == 0
        yield root


@pytest.fixture
def env(workdir, monkeypatch):
    _set_env(monkeypatch, workdir)
    return workdir


def _name(root: Path, dataset_id: int) -> str:
    return next((root / "raw").glob(f"Dataset{dataset_id}_*")).name


def _all_finite(folder: Path) -> bool:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(str(folder))
    return all(np.isfinite(ds.load_case(k)[0][:]).all() for k in ds.identifiers)


# ----------------------------------------------------------------------------------------------- non-finite


def test_labelled_nan_is_refused_naming_the_case(env, capsys):
    line = user_error(capsys, ["-d", str(LABELLED), "-np", "1", "--arch", "tiny"])
    assert "case NanLab_001" in line or "_001" in line, line
    assert "2 non-finite voxel(s)" in line and "--replace-non-finite" in line


def test_labelled_nan_replaced_everywhere_with_the_flag(env):
    pre = env / "pre" / _name(env, LABELLED)
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert all(np.isfinite(v) for v in stats.values())  # the CT statistics never saw NaN
    assert _all_finite(pre / CONFIG_DIR)
    assert completeness.is_marked(pre / CONFIG_DIR) and completeness.problem(pre / CONFIG_DIR) is None


def test_unlabeled_nan_refused_then_replaced_on_the_plans_from_path(env, capsys):
    folder = write_dataset(env / "raw", UNLABELED, "NanUnl", num_cases=2, shape=(32, 32, 32),
                           spacing=(1.5, 1.5, 1.5), seed=3, unlabeled=True, progress=False)
    put_non_finite(sorted((folder / "imagesTr").iterdir())[0])
    argv = ["-d", str(UNLABELED), "--plans-from", str(LABELLED), "-np", "1"]
    line = user_error(capsys, argv)
    assert "NanUnl_000" in line and "non-finite" in line
    assert not (env / "pre" / folder.name).exists()  # refused before anything was written
    assert main(argv + ["--replace-non-finite", "-1000"]) == 0
    out = env / "pre" / folder.name / CONFIG_DIR
    assert _all_finite(out) and completeness.is_marked(out)


def test_replacement_value_must_be_finite(env, capsys):
    line = user_error(capsys, ["-d", str(LABELLED), "-np", "1", "--replace-non-finite", "nan"])
    assert "--replace-non-finite must be a finite number" in line


# ----------------------------------------------------------------------------------------------- killed runs


def test_rerun_after_a_kill_keeps_the_last_good_copy_when_it_fails_too(env, monkeypatch):
    """A kill left DATA.hyspark-previous (the good copy) and a half-written DATA; the rerun crashes too."""
    import nnunet_hyspark.planning.nnunet_steps as steps

    pre = env / "pre" / _name(env, LABELLED)
    data = pre / CONFIG_DIR
    good = {p.name: p.read_bytes() for p in data.iterdir()}
    backup = Path(str(data) + BACKUP_SUFFIX)
    data.rename(backup)  # the killed run had moved the good copy aside ...
    completeness.remove_marker(data)  # ... removed its marker ...
    data.mkdir()
    (data / "NanLab_000.b2nd").write_bytes(b"half")  # ... and written part of one case
    (pre / ".nnUNetHySparKPlans.json.0123abcd.tmp").write_bytes(b"{")  # an atomic write cut short
    stale_import = env / "raw" / ".tmp-Dataset950_Killed-1234abcd"
    (stale_import / "imagesTr").mkdir(parents=True)

    def crash(*args, **kwargs):
        raise RuntimeError("worker crashed")

    monkeypatch.setattr(steps, "preprocess_labelled", crash)
    with pytest.raises(RuntimeError, match="worker crashed"):
        main(["-d", str(LABELLED), "-np", "1", "--arch", "tiny", "--replace-non-finite", "-1000"])
    assert {p.name: p.read_bytes() for p in data.iterdir()} == good  # the good copy is back
    assert not backup.exists()
    assert not list(pre.glob(".*.tmp")) and not stale_import.exists()


def test_rollback_keeps_an_existing_backup_of_an_unfinished_folder(tmp_path):
    data = tmp_path / "ds" / "cfg"
    backup = Path(str(data) + BACKUP_SUFFIX)
    backup.mkdir(parents=True)
    (backup / "a.b2nd").write_text("good")
    data.mkdir()
    (data / "a.b2nd").write_text("half")  # no marker: the killed run's output
    tx = Rollback(str(tmp_path / "ds"))
    tx.move_aside(str(data))
    assert (backup / "a.b2nd").read_text() == "good" and not data.exists()
    tx.rollback()
    assert (data / "a.b2nd").read_text() == "good" and not backup.exists()


def test_rollback_drops_a_stale_backup_beside_a_complete_folder(tmp_path):
    data = tmp_path / "ds" / "cfg"
    backup = Path(str(data) + BACKUP_SUFFIX)
    backup.mkdir(parents=True)
    (backup / "a.b2nd").write_text("old")
    data.mkdir()
    (data / "a.b2nd").write_text("new, complete")
    completeness.write_marker(data, 1)
    tx = Rollback(str(tmp_path / "ds"))
    tx.move_aside(str(data))
    tx.commit()
    assert not backup.exists() and not data.exists()  # the run would have written data again


# ----------------------------------------------------------------------------------------------- marker


def _fake_cases(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"c{i}.b2nd").write_bytes(b"x")
        (folder / f"c{i}.pkl").write_bytes(b"x")


def test_incomplete_folder_is_refused_with_the_repair_command(tmp_path):
    ds = tmp_path / "Dataset005_X"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"numTraining": 12}))
    _fake_cases(ds / CONFIG_DIR, 6)
    repair = completeness.repair_command(5, PLANS_NAME, "3d_fullres")
    with pytest.raises(HySparKError, match="6 of 12 cases") as info:
        completeness.check_complete(ds / CONFIG_DIR, repair)
    assert "hyspark_plan_and_preprocess -d 5 -c 3d_fullres" in str(info.value)
    _fake_cases(ds / CONFIG_DIR, 12)  # an older version's folder with every case: accepted without marker
    completeness.check_complete(ds / CONFIG_DIR, repair)
    with pytest.raises(HySparKError, match="does not exist"):
        completeness.check_complete(ds / "other", repair)


def test_marker_does_not_confuse_nnunets_dataset_class(env):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data = env / "pre" / _name(env, LABELLED) / CONFIG_DIR
    assert completeness.marker_path(data).parent == data.parent  # beside the folder, not in it
    infer_dataset_class(str(data))  # asserts on foreign file endings inside the folder


def test_replacing_reader_puts_the_value_where_simpleitk_reads_zero(tmp_path):
    """SimpleITK's NIfTI reader turns NaN into 0: the replacement must still land on exactly those voxels."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_hyspark.planning.finite import count_non_finite, replacing_reader

    folder = write_dataset(tmp_path, 960, "One", num_cases=1, shape=(16, 16, 16), spacing=(1.5, 1.5, 1.5),
                           seed=0, unlabeled=True, progress=False)
    image = next((folder / "imagesTr").iterdir())
    put_non_finite(image)
    assert count_non_finite(str(image)) == 2
    plain, _ = SimpleITKIO().read_images([str(image)])
    data, _ = replacing_reader(SimpleITKIO, -1000.0)().read_images([str(image)])
    changed = data != plain
    assert changed.sum() == 2 and np.all(data[changed] == -1000.0) and np.isfinite(data).all()


def test_unwritable_preprocessed_folder_is_one_line_before_any_work(env, monkeypatch, capsys):
    blocker = env / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("nnUNet_preprocessed", str(blocker / "pre"))
    line = user_error(capsys, ["-d", str(LABELLED), "-np", "1"])
    assert "cannot write into the nnUNet_preprocessed folder" in line
