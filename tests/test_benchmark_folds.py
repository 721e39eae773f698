"""Unit tests of ``hyspark_benchmark folds`` / ``summarize`` on a hand-made nnU-Net tree (no training).

Fold training is replaced by an injected runner (or a fake ``nnUNetv2_train`` on PATH) that
writes nnU-Net's ``validation/summary.json`` the way a finished fold would.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from nnunet_hyspark.benchmark import folds as F
from nnunet_hyspark.benchmark import splits as S
from nnunet_hyspark.benchmark import summary as SM
from nnunet_hyspark.errors import HySparKError
from fakes import run_benchmark_cli as cli
from fakes import write_fake_nnunet_tree

DS = "Dataset001_Toy"
PLANS = "nnUNetHySparKPlans"
CONF = "3d_fullres"
SCRATCH, FINETUNE = F.DEFAULT_SCRATCH_TRAINER, F.DEFAULT_FINETUNE_TRAINER
CASES = [f"case_{i:03d}" for i in range(6)]

# arm -> fold -> (liver Dice, tumor Dice); IoU is derived so every number is distinct
DICE = {"scratch": {0: (0.90, 0.50), 1: (0.80, 0.40)},
        "pretrained": {0: (0.92, 0.60), 1: (0.86, 0.45)}}


def iou(d: float) -> float:
    return d / (2 - d)


@pytest.fixture
def nn(tmp_path, monkeypatch):
    """A minimal nnU-Net tree: raw images, dataset.json, plans (preprocessed and complete: the marker of
    hyspark_plan_and_preprocess); env vars pointing at it."""
    tree = write_fake_nnunet_tree(tmp_path, DS, CASES, {PLANS: {"configurations": {CONF: {}, "2d": {}}}}, CONF,
                                  monkeypatch)
    raw, pre, res = tree["raw"], tree["pre"], tree["res"]
    weights = tmp_path / "weights.pth"  # checked up front: it must load (weights_only=True)
    torch.save({"network_weights": {"encoder.w": torch.zeros(1)}}, weights)
    return {"raw": raw, "pre": pre, "res": res, "weights": weights, "tmp": tmp_path}


def fold_dir(res: Path, trainer: str, fold: int) -> Path:
    return res / DS / f"{trainer}__{PLANS}__{CONF}" / f"fold_{fold}"


def write_summary(res: Path, trainer: str, fold: int, liver: float, tumor: float) -> None:
    """A validation/summary.json in nnU-Net's format (plus the final checkpoint)."""
    d = fold_dir(res, trainer, fold)
    (d / "validation").mkdir(parents=True, exist_ok=True)
    per_class = {"1": {"Dice": liver, "IoU": iou(liver), "FN": 3, "FP": 4, "TP": 100, "TN": 1000, "n_pred": 104,
                       "n_ref": 103},
                 "2": {"Dice": tumor, "IoU": iou(tumor), "FN": 5, "FP": 6, "TP": 20, "TN": 1100, "n_pred": 26,
                       "n_ref": 25}}
    fg = {"Dice": (liver + tumor) / 2, "IoU": (iou(liver) + iou(tumor)) / 2}
    (d / "validation" / "summary.json").write_text(
        json.dumps({"foreground_mean": fg, "mean": per_class, "metric_per_case": []}))
    (d / "checkpoint_final.pth").write_bytes(b"")


def write_all_summaries(res: Path, skip: tuple = ()) -> None:
    for arm, trainer in (("scratch", SCRATCH), ("pretrained", FINETUNE)):
        for fold, (liver, tumor) in DICE[arm].items():
            if (arm, fold) not in skip:
                write_summary(res, trainer, fold, liver, tumor)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def base_args(nn, *extra: str) -> list[str]:
    return ["-d", "1", "-c", CONF, "-p", PLANS, *extra]


# --------------------------------------------------------------------------- summary

def test_summary_tables_match_summary_files(nn, capsys):
    write_all_summaries(nn["res"])
    status, out, _ = cli(["summarize", *base_args(nn, "-f", "0", "1")], capsys)
    assert status == 0
    outdir = F.default_output_dir(nn["res"], DS, PLANS, CONF)
    assert str(outdir) in out

    rows = read_csv(outdir / "summary.csv")
    values = {(r["arm"], int(r["fold"]), r["class"], r["metric"]): float(r["value"]) for r in rows}
    for arm in DICE:
        for fold, (liver, tumor) in DICE[arm].items():
            assert values[(arm, fold, "liver", "Dice")] == liver
            assert values[(arm, fold, "tumor", "Dice")] == tumor
            assert values[(arm, fold, "tumor", "IoU")] == pytest.approx(iou(tumor))
            assert values[(arm, fold, "foreground_mean", "Dice")] == pytest.approx((liver + tumor) / 2)
            assert values[(arm, fold, "liver", "FN")] == 3

    agg = {(r["arm"], r["class"], r["metric"]): r for r in read_csv(outdir / "summary_aggregate.csv")}
    a = agg[("scratch", "liver", "Dice")]
    assert int(a["n_folds"]) == 2
    assert float(a["mean"]) == pytest.approx(0.85)
    assert float(a["std"]) == pytest.approx(math.sqrt(((0.90 - 0.85) ** 2 + (0.80 - 0.85) ** 2) / 1))

    comp = {(r["class"], r["metric"]): r for r in read_csv(outdir / "summary_comparison.csv")}
    c = comp[("liver", "Dice")]
    assert (c["baseline"], c["other"]) == ("scratch", "pretrained")
    assert float(c["mean_diff"]) == pytest.approx(((0.92 - 0.90) + (0.86 - 0.80)) / 2)
    assert int(c["n_pairs"]) == 2
    assert c["p_wilcoxon"] and c["p_ttest"]  # reported even though 2 folds cannot be significant

    md = (outdir / "summary.md").read_text()
    assert "0.8500 ± 0.0707" in md
    assert "2/2 folds" in md
    assert "Difference pretrained − scratch" in md

    png = outdir / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).ndim == 3


def test_compare_option_reverses_difference(nn, capsys):
    write_all_summaries(nn["res"])
    status, _, _ = cli(["summarize", *base_args(nn, "-f", "0", "1", "--compare", "pretrained", "scratch")], capsys)
    assert status == 0
    outdir = F.default_output_dir(nn["res"], DS, PLANS, CONF)
    comp = {(r["class"], r["metric"]): r for r in read_csv(outdir / "summary_comparison.csv")}
    assert float(comp[("tumor", "Dice")]["mean_diff"]) == pytest.approx(((0.50 - 0.60) + (0.40 - 0.45)) / 2)


def test_missing_and_unfinished_folds_are_reported_not_averaged(nn, capsys):
    write_all_summaries(nn["res"])
    write_summary(nn["res"], FINETUNE, 2, 0.99, 0.99)
    (fold_dir(nn["res"], SCRATCH, 3)).mkdir(parents=True)  # started, never finished
    (fold_dir(nn["res"], SCRATCH, 3) / "checkpoint_latest.pth").write_bytes(b"")
    status, out, _ = cli(["summarize", *base_args(nn, "-f", "0", "1", "2", "3")], capsys)
    assert status == 0
    outdir = F.default_output_dir(nn["res"], DS, PLANS, CONF)
    md = (outdir / "summary.md").read_text()
    assert "fold 2: missing" in md and "fold 3: unfinished" in md
    assert "2/4 folds (0, 1)" in md
    assert "excludes fold 2: missing, fold 3: unfinished" in out
    agg = {(r["arm"], r["class"], r["metric"]): r for r in read_csv(outdir / "summary_aggregate.csv")}
    assert float(agg[("scratch", "liver", "Dice")]["mean"]) == pytest.approx(0.85)  # folds 0, 1 only
    assert agg[("scratch", "liver", "Dice")]["folds_excluded"] == "2:missing 3:unfinished"
    assert float(agg[("pretrained", "liver", "Dice")]["mean"]) == pytest.approx((0.92 + 0.86 + 0.99) / 3)
    comp = {(r["class"], r["metric"]): r for r in read_csv(outdir / "summary_comparison.csv")}
    assert comp[("liver", "Dice")]["folds"] == "0 1"  # paired only where both arms finished


def test_paired_tests_degenerate_inputs():
    assert SM.paired_tests([0.1]) == (None, None, "n/a: fewer than 2 paired folds")
    p_w, p_t, note = SM.paired_tests([0.0, 0.0, 0.0])
    assert (p_w, p_t) == (None, None) and "0" in note
    p_w, p_t, note = SM.paired_tests([0.1, 0.1, 0.1])
    assert p_t is None and p_w is not None and "t-test undefined" in note
    p_w, p_t, note = SM.paired_tests([0.01, -0.02, 0.03, 0.05, 0.04, 0.02, 0.03])
    assert 0 < p_w <= 1 and 0 < p_t <= 1 and "cannot reach" not in note


def test_summarize_refuses_to_overwrite_unknown_outputs(nn, capsys):
    write_all_summaries(nn["res"])
    outdir = nn["tmp"] / "bench"
    outdir.mkdir()
    (outdir / "summary.md").write_text("someone else's table")
    status, _, err = cli(["summarize", *base_args(nn, "-f", "0", "1", "--output", str(outdir))], capsys)
    assert status == 2 and err.startswith("error:") and err.count("\n") == 1 and "--force" in err
    assert (outdir / "summary.md").read_text() == "someone else's table"
    status, _, _ = cli(["summarize", *base_args(nn, "-f", "0", "1", "--output", str(outdir), "--force")], capsys)
    assert status == 0 and "HySparK benchmark" in (outdir / "summary.md").read_text()
    # same benchmark again: a refresh, no --force needed; different arms: refused
    assert cli(["summarize", *base_args(nn, "-f", "0", "1", "--output", str(outdir))], capsys)[0] == 0
    status, _, err = cli(["summarize", *base_args(nn, "-f", "0", "1", "--output", str(outdir), "--arms",
                                                  f"a={SCRATCH}")], capsys)
    assert status == 2 and "different benchmark" in err


# --------------------------------------------------------------------------- splits

def test_case_list_text_format_converts():
    text = "# case fold\ncase_000 0\ncase_001\t0\ncase_002 1  # comment\n\ncase_003 1\ncase_004 2\n"
    splits = S.parse_case_list(text)
    assert splits == [
        {"train": ["case_002", "case_003", "case_004"], "val": ["case_000", "case_001"]},
        {"train": ["case_000", "case_001", "case_004"], "val": ["case_002", "case_003"]},
        {"train": ["case_000", "case_001", "case_002", "case_003"], "val": ["case_004"]},
    ]
    S.validate_splits(splits, CASES)
    with pytest.raises(HySparKError, match="more than once"):
        S.parse_case_list("case_000 0\ncase_000 1\n")
    with pytest.raises(HySparKError, match=r"fold\(s\) \[1\] have no cases"):
        S.parse_case_list("case_000 0\ncase_001 2\n")


def test_splits_with_unknown_case_rejected_by_cli(nn, capsys):
    splits_file = nn["tmp"] / "splits.txt"
    splits_file.write_text("case_000 0\ncase_001 0\ncase_002 1\ncase_999 1\n")
    status, out, err = cli(["folds", *base_args(nn, "--arms", f"scratch={SCRATCH}", "--splits", str(splits_file),
                                                "--dry-run")], capsys)
    assert status == 2
    assert err.startswith("error:") and err.count("\n") == 1 and "case_999" in err
    assert not (nn["pre"] / DS / "splits_final.json").exists()


@pytest.mark.parametrize("splits, message", [
    ([{"train": ["case_002", "case_003"], "val": ["case_000", "case_001"]},
      {"train": ["case_002", "case_003"], "val": ["case_001", "case_004"]}], "overlap"),
    ([{"train": ["case_000", "case_001"], "val": ["case_001", "case_002"]}], "both train and val"),
])
def test_overlapping_splits_rejected(nn, capsys, splits, message):
    splits_file = nn["tmp"] / "splits_final.json"
    splits_file.write_text(json.dumps(splits))
    status, _, err = cli(["folds", *base_args(nn, "--arms", f"scratch={SCRATCH}", "--splits", str(splits_file),
                                              "--dry-run")], capsys)
    assert status == 2 and message in err and err.count("\n") == 1


def test_splits_installed_and_not_replaced_without_force(nn):
    pre = nn["pre"] / DS
    first = S.parse_case_list("case_000 0\ncase_001 0\ncase_002 1\ncase_003 1\n")
    second = S.parse_case_list("case_000 0\ncase_001 1\ncase_002 0\ncase_003 1\n")
    assert S.install_splits(first, pre)[1] == "written"
    assert json.loads((pre / "splits_final.json").read_text()) == first
    assert S.install_splits(first, pre)[1] == "unchanged"
    with pytest.raises(HySparKError, match="already exists with different splits"):
        S.install_splits(second, pre)
    assert S.install_splits(second, pre, force=True)[1] == "replaced"
    assert json.loads((pre / "splits_final.json").read_text()) == second
    assert json.loads((pre / "splits_final.json.bak").read_text()) == first


def test_case_ids_fall_back_to_preprocessed_gt(nn):
    import shutil

    shutil.rmtree(nn["raw"] / DS / "imagesTr")
    (nn["pre"] / DS / "gt_segmentations").mkdir()
    for c in CASES[:2]:
        (nn["pre"] / DS / "gt_segmentations" / f"{c}.nii.gz").write_bytes(b"")
    assert S.dataset_case_ids(DS) == CASES[:2]


# --------------------------------------------------------------------------- arms and validation

def test_parse_arm_specs(tmp_path):
    assert F.parse_arm("nnUNetTrainer") == F.Arm("nnUNetTrainer", "nnUNetTrainer")
    assert F.parse_arm("s=nnUNetTrainerHySparK_test") == F.Arm("s", "nnUNetTrainerHySparK_test")
    assert F.parse_arm("p=X:/a/b=c.pth") == F.Arm("p", "X", "/a/b=c.pth")
    assert F.parse_arm("X:/a/b=c.pth") == F.Arm("X", "X", "/a/b=c.pth")
    for bad in ("a=", "a=b-c", "a b=X", "a=X:"):
        with pytest.raises(HySparKError):
            F.parse_arm(bad)
    with pytest.raises(HySparKError, match="needs pre-trained weights"):
        F.resolve_arms(None, None)
    with pytest.raises(HySparKError, match="both train nnUNetTrainer"):
        F.resolve_arms(["a=nnUNetTrainer", "b=nnUNetTrainer"], None)
    with pytest.raises(HySparKError, match="no arm uses it"):
        F.resolve_arms([f"a={SCRATCH}"], str(tmp_path))
    w = tmp_path / "w.pth"
    w.write_bytes(b"")
    arms = F.resolve_arms([f"a={SCRATCH}", f"b={FINETUNE}_test"], str(w))
    assert arms[1].weights == str(w) and arms[0].weights is None


@pytest.mark.parametrize("args, message", [
    (["-d", "7"], "dataset '7' not found"),
    (["-d", "1", "-p", "NoSuchPlans", "--arms", SCRATCH], "plans file not found"),
    (["-d", "1", "-c", "3d_lowres", "--arms", SCRATCH], "configuration '3d_lowres' not in"),
    (["-d", "1", "--pretrained_weights", "/no/such/file.pth"], "weights file of arm 'pretrained' not found"),
    (["-d", "1", "-f", "5", "--arms", SCRATCH], "fold(s) [5] do not exist"),
])
def test_invalid_inputs_are_one_line_errors(nn, capsys, args, message):
    status, _, err = cli(["folds", "-p", PLANS, *args, "--dry-run"], capsys)
    assert status == 2 and message in err and err.count("\n") == 1


def test_missing_env_is_one_line_error(nn, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_results")
    status, _, err = cli(["folds", *base_args(nn, "--dry-run")], capsys)
    assert status == 2 and "nnUNet_results" in err


# --------------------------------------------------------------------------- dry run and running

def test_dry_run_prints_commands_and_runs_nothing(nn, capsys):
    write_summary(nn["res"], SCRATCH, 0, 0.9, 0.5)  # finished: skipped
    (fold_dir(nn["res"], FINETUNE, 1)).mkdir(parents=True)  # half-finished: resumed
    (fold_dir(nn["res"], FINETUNE, 1) / "checkpoint_latest.pth").write_bytes(b"")
    status, out, _ = cli(["folds", *base_args(nn, "-f", "0", "1", "--pretrained_weights", str(nn["weights"]),
                                              "--dry-run", "--device", "cpu")], capsys)
    assert status == 0
    w = str(nn["weights"])
    lines = [line.split("   #")[0] for line in out.splitlines() if line.startswith("nnUNetv2_train")]
    assert lines == [
        f"nnUNetv2_train 1 {CONF} 0 -tr {FINETUNE} -p {PLANS} -device cpu -pretrained_weights {w}",
        f"nnUNetv2_train 1 {CONF} 1 -tr {SCRATCH} -p {PLANS} -device cpu",
        f"nnUNetv2_train 1 {CONF} 1 -tr {FINETUNE} -p {PLANS} -device cpu --c",
    ]
    assert "scratch fold 0: finished, skipped" in out
    outdir = F.default_output_dir(nn["res"], DS, PLANS, CONF)
    assert not outdir.exists()  # no manifest, no logs, no summary


class FakeTrainer:
    """Injected runner: writes the fold's summary.json like nnUNetv2_train, or fails for chosen folds."""

    def __init__(self, res: Path, fail: set = frozenset()):
        self.res, self.fail, self.calls = res, set(fail), []

    def __call__(self, cmd: list[str], env: dict, log: Path) -> int:
        fold, trainer = int(cmd[3]), cmd[cmd.index("-tr") + 1]
        self.calls.append((trainer, fold, "--c" in cmd, env.get("CUDA_VISIBLE_DEVICES")))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(" ".join(cmd))
        assert env["nnUNet_extTrainer"]
        if (trainer, fold) in self.fail:
            (fold_dir(self.res, trainer, fold)).mkdir(parents=True, exist_ok=True)
            (fold_dir(self.res, trainer, fold) / "checkpoint_latest.pth").write_bytes(b"")
            return 1
        write_summary(self.res, trainer, fold, 0.8 + 0.01 * fold, 0.5)
        return 0


def make_spec(nn, *extra_arms, output=None, folds=(0, 1, 2)):
    arms = list(extra_arms) or [f"scratch={SCRATCH}", f"pretrained={FINETUNE}:{nn['weights']}"]
    return F.build_spec("1", CONF, PLANS, arms, folds=list(folds), output=output)


def test_failing_fold_reported_others_run_then_resume(nn):
    spec = make_spec(nn)
    fake = FakeTrainer(nn["res"], fail={(FINETUNE, 1)})
    out = io.StringIO()
    assert F.run_benchmark(spec, runner=fake, out=out) == 1
    assert len(fake.calls) == 6  # the failure did not stop folds 2
    text = out.getvalue()
    log = spec.output_dir / "logs" / "pretrained_fold1.log"
    assert f"FAILED: arm pretrained fold 1 (exit code 1); log: {log}" in text
    assert "[6/6]" in text and "elapsed" in text
    manifest = json.loads((spec.output_dir / F.MANIFEST_NAME).read_text())
    assert manifest["folds"]["pretrained"]["1"]["status"] == "failed"
    assert manifest["folds"]["pretrained"]["1"]["returncode"] == 1
    assert manifest["folds"]["scratch"]["2"]["status"] == "finished"
    assert manifest["config"]["arms"][1]["weights"] == str(nn["weights"])
    assert "fold 1: unfinished" in (spec.output_dir / "summary.md").read_text()

    # same benchmark again: only the failed fold runs, resumed with --c and without -pretrained_weights
    fake2 = FakeTrainer(nn["res"])
    assert F.run_benchmark(make_spec(nn), runner=fake2, out=io.StringIO()) == 0
    assert fake2.calls == [(FINETUNE, 1, True, None)]
    manifest = json.loads((spec.output_dir / F.MANIFEST_NAME).read_text())
    assert manifest["folds"]["pretrained"]["1"]["status"] == "finished"
    assert "3/3 folds" in (spec.output_dir / "summary.md").read_text()


def test_parallel_gpus_set_cuda_visible_devices(nn):
    fake = FakeTrainer(nn["res"])
    assert F.run_benchmark(make_spec(nn), runner=fake, gpus=["0", "1"], out=io.StringIO()) == 0
    assert len(fake.calls) == 6 and {c[3] for c in fake.calls} <= {"0", "1"}


def test_different_configuration_refused_without_force(nn):
    F.run_benchmark(make_spec(nn), runner=FakeTrainer(nn["res"]), out=io.StringIO())
    md_before = (make_spec(nn).output_dir / "summary.md").read_text()
    other_w = nn["tmp"] / "other.pth"
    torch.save({"network_weights": {}}, other_w)
    changed = make_spec(nn, f"scratch={SCRATCH}", f"pretrained={FINETUNE}:{other_w}")
    with pytest.raises(HySparKError, match=r"different benchmark \(differs in: arms\)"):
        F.run_benchmark(changed, runner=FakeTrainer(nn["res"]), out=io.StringIO())
    with pytest.raises(HySparKError, match="differs in: folds"):
        F.run_benchmark(make_spec(nn, folds=(0, 1)), runner=FakeTrainer(nn["res"]), out=io.StringIO())
    assert (changed.output_dir / "summary.md").read_text() == md_before
    fake = FakeTrainer(nn["res"])
    assert F.run_benchmark(changed, runner=fake, force=True, out=io.StringIO()) == 0
    assert fake.calls == []  # --force never retrains finished folds
    manifest = json.loads((changed.output_dir / F.MANIFEST_NAME).read_text())
    assert manifest["config"]["arms"][1]["weights"] == str(other_w)


def test_cli_with_fake_nnunetv2_train_on_path(nn, capsys, monkeypatch):
    """The real subprocess path: a fake nnUNetv2_train that finishes fold 0 and crashes on fold 1."""
    bindir = nn["tmp"] / "bin"
    bindir.mkdir()
    script = bindir / "nnUNetv2_train"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
ds, conf, fold = sys.argv[1:4]
trainer, plans = sys.argv[sys.argv.index("-tr") + 1], sys.argv[sys.argv.index("-p") + 1]
print("training", fold, "on GPU", os.environ.get("CUDA_VISIBLE_DEVICES"), "ext", os.environ["nnUNet_extTrainer"])
if fold == "1":
    print("boom", file=sys.stderr)
    sys.exit(3)
d = os.path.join(os.environ["nnUNet_results"], "{DS}", f"{{trainer}}__{{plans}}__{{conf}}", f"fold_{{fold}}")
os.makedirs(os.path.join(d, "validation"))
open(os.path.join(d, "checkpoint_final.pth"), "w").close()
json.dump({{"foreground_mean": {{"Dice": 0.7}}, "mean": {{"1": {{"Dice": 0.7}}}}}},
          open(os.path.join(d, "validation", "summary.json"), "w"))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    status, out, _ = cli(["folds", *base_args(nn, "-f", "0", "1", "--arms", f"scratch={SCRATCH}",
                                              "--gpus", "3")], capsys)
    assert status == 1
    outdir = F.default_output_dir(nn["res"], DS, PLANS, CONF)
    log0 = (outdir / "logs" / "scratch_fold0.log").read_text()
    assert "training 0 on GPU 3" in log0 and F.hyspark_trainers_dir() in log0
    assert "boom" in (outdir / "logs" / "scratch_fold1.log").read_text()
    assert "FAILED: arm scratch fold 1 (exit code 3)" in out
    assert f"benchmark outputs in {outdir}" in out and "summary.md" in out


def test_training_env_puts_trainer_folder_on_ext_trainer():
    ours = F.hyspark_trainers_dir()
    env = F.training_env({"nnUNet_extTrainer": f"/mine{os.pathsep}{ours}", "PATH": "/bin"}, gpu="2")
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [ours, "/mine"]
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["PATH"] == "/bin"
    assert F.training_env({})["nnUNet_extTrainer"] == ours


def test_training_env_keeps_freed_memory_unless_the_user_set_malloc():
    from nnunet_hyspark.allocator import REUSE_ENVIRONMENT

    env = F.training_env({"PATH": "/bin"})
    assert {k: env[k] for k in REUSE_ENVIRONMENT} == REUSE_ENVIRONMENT
    assert F.training_env({"MALLOC_MMAP_MAX_": "65536"})["MALLOC_MMAP_MAX_"] == "65536"


def test_custom_splits_installed_then_resumed_and_summarize_uses_manifest(nn, capsys):
    splits_file = nn["tmp"] / "folds.txt"
    splits_file.write_text("case_000 0\ncase_001 0\ncase_002 0\ncase_003 1\ncase_004 1\ncase_005 1\n")
    out_dir = nn["tmp"] / "bench"
    spec = F.build_spec("1", CONF, PLANS, [f"base={SCRATCH}", "nnu=nnUNetTrainer"], splits_file=str(splits_file),
                        output=str(out_dir))
    assert spec.folds == [0, 1]  # default folds come from the splits
    fake = FakeTrainer(nn["res"])
    assert F.run_benchmark(spec, runner=fake, out=io.StringIO()) == 0 and len(fake.calls) == 4
    installed = json.loads((nn["pre"] / DS / "splits_final.json").read_text())
    assert installed[1]["val"] == ["case_003", "case_004", "case_005"]
    # re-run without --splits: same benchmark, nothing left to do
    again = F.build_spec("1", CONF, PLANS, [f"base={SCRATCH}", "nnu=nnUNetTrainer"], output=str(out_dir))
    assert again.folds == [0, 1]
    fake = FakeTrainer(nn["res"])
    assert F.run_benchmark(again, runner=fake, out=io.StringIO()) == 0 and fake.calls == []
    # summarize without --arms/-f reads them from the manifest
    status, out, _ = cli(["summarize", *base_args(nn, "--output", str(out_dir))], capsys)
    assert status == 0
    md = (out_dir / "summary.md").read_text()
    assert "**base** (`nnUNetTrainerHySparK`): 2/2 folds" in md and "**nnu** (`nnUNetTrainer`)" in md


def test_default_splits_are_nnunets_own_and_written_before_parallel_folds(nn, capsys):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    data = nn["pre"] / DS / f"{PLANS}_{CONF}"
    data.mkdir(exist_ok=True)
    for c in CASES:  # the files nnU-Net's blosc2 dataset lists (contents are not read for the split)
        (data / f"{c}.b2nd").write_bytes(b"")
        (data / f"{c}_seg.b2nd").write_bytes(b"")
        (data / f"{c}.pkl").write_bytes(b"")
    status, out, _ = cli(["folds", *base_args(nn, "--arms", f"scratch={SCRATCH}", "-f", "0", "1", "--dry-run")],
                         capsys)
    assert status == 0 and not (nn["pre"] / DS / "splits_final.json").exists()  # a dry run writes nothing
    runner, out = FakeTrainer(nn["res"]), io.StringIO()
    assert F.run_benchmark(make_spec(nn, f"scratch={SCRATCH}", folds=(0, 1)), runner=runner, gpus=["0", "1"],
                           out=out) == 0
    assert "default 5-fold split written" in out.getvalue()
    written = json.loads((nn["pre"] / DS / "splits_final.json").read_text())
    assert written == generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)  # what nnU-Net would write
    assert len(runner.calls) == 2
