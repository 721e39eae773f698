"""Held-out test evaluation of ``hyspark_benchmark folds --test-images/--test-labels`` (no training, no prediction).

``nnUNetv2_predict`` is replaced by an injected runner that writes prediction files the way it would;
the scoring is nnU-Net's real ``compute_metrics_on_folder`` on real (tiny) NIfTI files, and the
expected Dice values are computed here independently with NumPy.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_hyspark.benchmark import test_set as T
from nnunet_hyspark.benchmark import test_set_tables as TT
from nnunet_hyspark.benchmark.arms import Arm
from nnunet_hyspark.benchmark.fractions import FoldEntry
from nnunet_hyspark.benchmark.spec import BenchmarkSpec
from nnunet_hyspark.cli.benchmark import main
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.planning import completeness

DS, PLANS, CONF = "Dataset001_Toy", "nnUNetPlans", "3d_fullres"
LABELS = {"background": 0, "liver": 1, "tumor": 2}
DATASET_JSON = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 4}
TEST_CASES = ("t_001", "t_002")


@pytest.fixture
def nn(tmp_path, monkeypatch):
    """An nnU-Net tree (dataset.json, plans, complete preprocessing) and a test set of two labelled cases."""
    raw, pre, res = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    for base in (raw / DS, pre / DS):
        base.mkdir(parents=True)
        (base / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (raw / DS / "imagesTr").mkdir()
    for i in range(4):
        (raw / DS / "imagesTr" / f"case_{i:03d}_0000.nii.gz").write_bytes(b"")
    plans = {"plans_name": PLANS, "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
             "configurations": {CONF: {"data_identifier": f"{PLANS}_{CONF}"}}}
    (pre / DS / f"{PLANS}.json").write_text(json.dumps(plans))
    (pre / DS / f"{PLANS}_{CONF}").mkdir()
    completeness.write_marker(pre / DS / f"{PLANS}_{CONF}", 4)
    res.mkdir()
    for k, v in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        monkeypatch.setenv(k, str(v))
    images, labels = tmp_path / "test_images", tmp_path / "test_labels"
    images.mkdir()
    labels.mkdir()
    for k, case in enumerate(TEST_CASES):
        seg = np.zeros((8, 10, 12), np.uint8)
        seg[1:6, 2:8, 2:10] = 1
        seg[2:4, 3:5 + k, 3:6] = 2
        write_nifti(labels / f"{case}.nii.gz", seg)
        write_nifti(images / f"{case}_0000.nii.gz", seg.astype(np.float32) * 100)
    return {"res": res, "pre": pre, "images": images, "labels": labels, "tmp": tmp_path}


def write_nifti(path: Path, array: np.ndarray) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def read_nifti(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def finish_fold(res: Path, trainer: str, fold: int) -> Path:
    """A finished nnU-Net fold: validation/summary.json and checkpoint_final.pth."""
    d = res / DS / f"{trainer}__{PLANS}__{CONF}" / f"fold_{fold}"
    (d / "validation").mkdir(parents=True, exist_ok=True)
    (d / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.5}, "mean": {}}))
    (d / "checkpoint_final.pth").write_bytes(b"")
    return d


def make_spec(nn, arms=None, folds=(0, 1, 2), **kw) -> BenchmarkSpec:
    arms = arms or [Arm("base", "nnUNetTrainer"), Arm("other", "nnUNetTrainerHySparK")]
    return BenchmarkSpec("1", DS, CONF, PLANS, arms, list(folds), nn["res"], nn["tmp"] / "bench", device="cpu", **kw)


def degrade(seg: np.ndarray) -> np.ndarray:
    """The fake ensemble's error on the second case: its tumor predicted as liver."""
    out = seg.copy()
    out[out == 2] = 1
    return out


class FakePredictor:
    """Injected runner for ``nnUNetv2_predict``: writes CASE.nii.gz into -o (the second case degraded)."""

    def __init__(self, labels: Path, rc: int = 0, crop: bool = False):
        self.labels, self.rc, self.crop, self.calls = labels, rc, crop, []

    def __call__(self, cmd: list[str], env: dict, log: Path) -> int:
        assert cmd[0] == T.PREDICT_EXECUTABLE and env["nnUNet_extTrainer"]
        self.calls.append(cmd)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(" ".join(cmd))
        if self.rc:
            return self.rc
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        for k, case in enumerate(TEST_CASES):
            seg = read_nifti(self.labels / f"{case}.nii.gz")
            seg = seg[:, :5] if self.crop else seg  # crop: a prediction of the wrong shape
            write_nifti(out / f"{case}.nii.gz", degrade(seg) if k == 1 else seg)
        return 0


def dice(ref: np.ndarray, pred: np.ndarray, c: int) -> float:
    r, p = ref == c, pred == c
    return 2 * (r & p).sum() / (r.sum() + p.sum())


def expected_means(labels: Path) -> dict[str, float]:
    refs = [read_nifti(labels / f"{c}.nii.gz") for c in TEST_CASES]
    preds = [refs[0], degrade(refs[1])]
    per = {name: float(np.mean([dice(r, p, v) for r, p in zip(refs, preds)])) for name, v in LABELS.items() if v}
    return {**per, "foreground_mean": (per["liver"] + per["tumor"]) / 2}


# --------------------------------------------------------------------------- prediction, scoring, resume

def test_complete_arm_is_ensembled_and_scored_by_nnunet_incomplete_arm_reported(nn):
    for f in (0, 1, 2):
        finish_fold(nn["res"], "nnUNetTrainer", f)
    finish_fold(nn["res"], "nnUNetTrainerHySparK", 0)  # folds 1 and 2 of "other" never finished
    spec = make_spec(nn)
    ts = T.check_test_set(str(nn["images"]), str(nn["labels"]), DATASET_JSON)
    fake, out = FakePredictor(nn["labels"]), io.StringIO()
    assert T.run_test_set(spec, ts, fake, out) == 0
    assert len(fake.calls) == 1
    cmd = fake.calls[0]
    assert cmd[cmd.index("-f") + 1:cmd.index("-chk")] == ["0", "1", "2"]
    assert cmd[cmd.index("-tr") + 1] == "nnUNetTrainer" and cmd[cmd.index("-p") + 1] == PLANS
    assert cmd[cmd.index("-i") + 1] == str(nn["images"].resolve()) and cmd[cmd.index("-device") + 1] == "cpu"
    assert "test set: other not ensembled: folds 1, 2 missing" in out.getvalue()

    summary = json.loads((spec.output_dir / "test_set" / "base" / "summary.json").read_text())
    want = expected_means(nn["labels"])
    assert 0 < want["tumor"] < want["liver"] < 1  # the degraded case makes every number distinct
    assert summary["mean"]["1"]["Dice"] == pytest.approx(want["liver"])
    assert summary["mean"]["2"]["Dice"] == pytest.approx(want["tumor"])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(want["foreground_mean"])
    assert len(summary["metric_per_case"]) == 2

    md = TT.test_set_markdown(spec)
    assert "| arm | folds | cases | liver | tumor | mean |" in md
    assert f"| base | 0, 1, 2 | 2 | {want['liver']:.4f} | {want['tumor']:.4f} | {want['foreground_mean']:.4f} |" in md
    assert "| other | 0, 1, 2 | - | not ensembled: folds 1, 2 missing |" in md
    rows = TT.test_set_csv(spec).splitlines()
    assert rows[0] == "arm,fraction,folds,n_cases,class,metric,value"
    liver = [r for r in rows if r.startswith("base,,0 1 2,2,liver,Dice,")]
    assert len(liver) == 1 and float(liver[0].rsplit(",", 1)[1]) == pytest.approx(want["liver"])

    # resume: nothing to do; a retrained fold (new checkpoint) is predicted again
    again = FakePredictor(nn["labels"])
    out = io.StringIO()
    assert T.run_test_set(spec, ts, again, out) == 0 and again.calls == []
    assert "base already predicted and scored, skipped" in out.getvalue()
    ckpt = spec.fold_dir(spec.arms[0], 1) / "checkpoint_final.pth"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    assert T.run_test_set(spec, ts, again, io.StringIO()) == 0 and len(again.calls) == 1


def test_failed_prediction_is_reported_and_retried(nn):
    for f in (0, 1):
        finish_fold(nn["res"], "nnUNetTrainer", f)
    spec = make_spec(nn, [Arm("base", "nnUNetTrainer")], folds=(0, 1))
    ts = T.check_test_set(str(nn["images"]), str(nn["labels"]), DATASET_JSON)
    out = io.StringIO()
    assert T.run_test_set(spec, ts, FakePredictor(nn["labels"], rc=3), out) == 1
    log = spec.output_dir / "logs" / "test_set_base.log"
    assert f"FAILED: test set base (exit code 3); log: {log}" in out.getvalue()
    assert not (spec.output_dir / "test_set" / "base" / "summary.json").exists()
    assert "not predicted yet" in TT.test_set_markdown(spec)
    out = io.StringIO()
    assert T.run_test_set(spec, ts, FakePredictor(nn["labels"], crop=True), out) == 1
    assert "FAILED: test set base: nnU-Net's evaluation of" in out.getvalue()
    assert not (spec.output_dir / "test_set" / "base" / "summary.json").exists()
    fake = FakePredictor(nn["labels"])
    assert T.run_test_set(spec, ts, fake, io.StringIO()) == 0 and len(fake.calls) == 1
    assert (spec.output_dir / "test_set" / "base" / "summary.json").is_file()


def test_fractions_ensemble_each_fractions_own_nnunet_folds(nn):
    entries = [FoldEntry(0, 1.0, 0), FoldEntry(1, 1.0, 1), FoldEntry(0, 0.5, 2), FoldEntry(1, 0.5, 3)]
    for f in (0, 1, 2):
        finish_fold(nn["res"], "nnUNetTrainer", f)  # fraction 0.5 of fold 1 (nnU-Net fold 3) is missing
    spec = make_spec(nn, [Arm("base", "nnUNetTrainer")], folds=(0, 1), fractions=(0.5, 1.0), fold_entries=entries)
    groups = T.ensemble_groups(spec)
    assert [(g.name, g.cv_folds, g.nnunet_folds) for g in groups] == [
        ("base/fraction_0.5", (0, 1), (2, 3)), ("base/fraction_1", (0, 1), (0, 1))]
    ts = T.check_test_set(str(nn["images"]), str(nn["labels"]), DATASET_JSON)
    fake, out = FakePredictor(nn["labels"]), io.StringIO()
    assert T.run_test_set(spec, ts, fake, out) == 0
    assert "test set: base/fraction_0.5 not ensembled: fold 1 missing" in out.getvalue()
    assert len(fake.calls) == 1 and fake.calls[0][fake.calls[0].index("-f") + 1:][:2] == ["0", "1"]
    assert (spec.output_dir / "test_set" / "base" / "fraction_1" / "summary.json").is_file()
    md = TT.test_set_markdown(spec)
    assert "| arm | fraction | folds | cases |" in md and "| base | 0.5 | 0, 1 | - | not ensembled" in md
    dry = T.describe_test_set(spec, ts)
    assert dry[0] == "# test set base/fraction_0.5: not ensembled: fold 1 missing (not finished yet)"
    assert dry[1] == "# test set base/fraction_1: predicted and scored, skipped"


def test_no_test_set_means_no_table(nn):
    assert TT.test_set_markdown(make_spec(nn)) == "" and TT.test_set_csv(make_spec(nn)) == ""


# --------------------------------------------------------------------------- bad input

def _touch(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).write_bytes(b"")


@pytest.mark.parametrize("case, message", [
    ("only_images", "--test-images and --test-labels go together"),
    ("no_folder", "--test-labels .* is not a folder"),
    ("empty", r"holds no \.nii\.gz images \(it is empty\)"),
    ("wrong_ending", r"holds no \.nii\.gz images \(found e\.g\. a_0000\.nii\)"),
    ("bad_name", r"1 file\(s\) not named CASE_XXXX\.nii\.gz \(scan\.nii\.gz\)"),
    ("missing_channel", r"1 case\(s\) without exactly the dataset's 2 channel\(s\) \(e\.g\. b has channels \[0\]\)"),
    ("missing_label", r"1 of 2 test case\(s\) have no label \(b\.nii\.gz\)"),
    ("extra_label", r"1 label\(s\) without a test image \(c\.nii\.gz\)"),
])
def test_bad_test_inputs_are_one_line_errors(tmp_path, case, message):
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    ds = dict(DATASET_JSON, channel_names={"0": "CT", "1": "PET"})
    _touch(images, "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz")
    _touch(labels, "a.nii.gz", "b.nii.gz")
    args = (str(images), str(labels))
    if case == "only_images":
        args = (str(images), None)
    elif case == "no_folder":
        args = (str(images), str(tmp_path / "nope"))
    elif case in ("empty", "wrong_ending"):
        for p in images.iterdir():
            p.unlink()
        if case == "wrong_ending":
            _touch(images, "a_0000.nii")
    elif case == "bad_name":
        _touch(images, "scan.nii.gz")
    elif case == "missing_channel":
        (images / "b_0001.nii.gz").unlink()
    elif case == "missing_label":
        (labels / "b.nii.gz").unlink()
    elif case == "extra_label":
        _touch(labels, "c.nii.gz")
    with pytest.raises(HySparKError, match=message) as e:
        T.check_test_set(*args, ds)
    assert "\n" not in str(e.value) and e.value.hint


def test_cli_refuses_bad_test_set_before_anything_is_written(nn, capsys):
    (nn["labels"] / "t_002.nii.gz").unlink()
    out_dir = nn["tmp"] / "bench"
    argv = ["folds", "-d", "1", "-c", CONF, "-p", PLANS, "--arms", "base=nnUNetTrainer", "-f", "0", "--output",
            str(out_dir), "--test-images", str(nn["images"]), "--test-labels", str(nn["labels"])]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --test-labels") and "t_002.nii.gz" in err
    assert not out_dir.exists() and not (nn["pre"] / DS / "splits_final.json").exists()


# --------------------------------------------------------------------------- through the command line

FAKE_TRAIN = """#!{python}
import json, os, sys, torch
ds, conf, fold = sys.argv[1:4]
trainer, plans = sys.argv[sys.argv.index("-tr") + 1], sys.argv[sys.argv.index("-p") + 1]
d = os.path.join(os.environ["nnUNet_results"], "{ds}", f"{{trainer}}__{{plans}}__{{conf}}", f"fold_{{fold}}")
os.makedirs(os.path.join(d, "validation"))
torch.save({{"network_weights": {{"w": torch.zeros(3, 4), "norm.running_mean": torch.zeros(4)}}}},
           os.path.join(d, "checkpoint_final.pth"))
open(os.path.join(d, "training_log_2026_1_1_10_00_00.txt"), "w").write(
    "2026-01-01 10:00:00.000000: Epoch 0 \\n2026-01-01 10:00:04.000000: Epoch time: 4.0 s \\n"
    "2026-01-01 10:00:05.500000: Validation complete \\n")
json.dump({{"foreground_mean": {{"Dice": 0.7}}, "mean": {{"1": {{"Dice": 0.8}}, "2": {{"Dice": 0.6}}}}}},
          open(os.path.join(d, "validation", "summary.json"), "w"))
"""
FAKE_PREDICT = """#!{python}
import os, shutil, sys
out = sys.argv[sys.argv.index("-o") + 1]
os.makedirs(out, exist_ok=True)
print("predict", " ".join(sys.argv[1:]), "ext", os.environ["nnUNet_extTrainer"])
for name in os.listdir(os.environ["FAKE_LABELS"]):
    shutil.copy(os.path.join(os.environ["FAKE_LABELS"], name), os.path.join(out, name))
"""


def test_cli_folds_then_test_set_then_summary_tables(nn, capsys, monkeypatch):
    """The real subprocess path with fake nnUNetv2_train / nnUNetv2_predict on PATH; nnU-Net's real evaluation."""
    import stat
    import sys

    bindir = nn["tmp"] / "bin"
    bindir.mkdir()
    for name, text in (("nnUNetv2_train", FAKE_TRAIN), ("nnUNetv2_predict", FAKE_PREDICT)):
        (bindir / name).write_text(text.format(python=sys.executable, ds=DS))
        (bindir / name).chmod((bindir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LABELS", str(nn["labels"]))
    out_dir = nn["tmp"] / "bench"
    argv = ["folds", "-d", "1", "-c", CONF, "-p", PLANS, "--arms", "base=nnUNetTrainer", "-f", "0", "1",
            "--output", str(out_dir), "--device", "cpu", "--test-images", str(nn["images"]),
            "--test-labels", str(nn["labels"])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test set: base scored" in out
    log = (out_dir / "logs" / "test_set_base.log").read_text()
    assert "-f 0 1 -chk checkpoint_final.pth --disable_progress_bar -device cpu" in log
    summary = json.loads((out_dir / "test_set" / "base" / "summary.json").read_text())
    assert summary["mean"]["1"]["Dice"] == 1.0 and summary["foreground_mean"]["Dice"] == 1.0
    md = (out_dir / "summary.md").read_text()
    assert "| base | 0, 1 | 2 | 1.0000 | 1.0000 | 1.0000 |" in md
    assert "| base | 12 | 5.5s ± 0.0s (n=2) | 4.0s ± 0.0s (n=2) | n/a |" in md  # 12 parameters, buffer left out
    assert (out_dir / "summary_test_set.csv").is_file() and (out_dir / "summary_cost.csv").is_file()
    # re-run: folds finished, test set skipped
    assert main(argv) == 0
    assert "test set: base already predicted and scored, skipped" in capsys.readouterr().out
    assert main(argv + ["--dry-run"]) == 0
    assert "# test set base: predicted and scored, skipped" in capsys.readouterr().out
    # summarize needs no test folders: the table comes from what the folds run wrote
    (out_dir / "summary.md").unlink()
    assert main(["summarize", "-d", "1", "-c", CONF, "-p", PLANS, "--output", str(out_dir)]) == 0
    assert "| base | 0, 1 | 2 | 1.0000 | 1.0000 | 1.0000 |" in (out_dir / "summary.md").read_text()
