"""Issue 10: nnU-Net's own baseline beside HySparK in one benchmark, at two training fractions, through the real
commands on tiny synthetic CT.

nnU-Net's own planner writes ``nnUNetPlans``; the arms are nnU-Net's trainer and network on ``nnUNetPlans`` and
HySparK from scratch on ``nnUNetHySparKPlans``; 2 folds x 2 fractions run with smoke schedules (the plumbing
is under test, not learning). Every number in the summary is checked against nnU-Net's own
``validation/summary.json``, and nnU-Net's training log shows that each fraction trained on its subset.
"""
import csv
import io
import json
import math

import pytest
from PIL import Image

from conftest import run_cmd
from nnunet_hyspark.benchmark.fractions import MARKER, base_count, format_fraction, subset_size

pytestmark = pytest.mark.e2e
PLANS = "nnUNetHySparKPlans"
ARMS = {"nnunet": ("nnUNetTrainer_smoke", "nnUNetPlans"), "scratch": ("nnUNetTrainerHySparK_smoke", PLANS)}
ARM_SPECS = ["nnunet=nnUNetTrainer_smoke@nnUNetPlans", "scratch=nnUNetTrainerHySparK_smoke"]


def plan_with_nnunet(env: dict, d: str) -> None:
    """nnU-Net's own planner and preprocessing. Its memory estimate calls torch.set_num_threads(nnUNet_n_proc_DA),
    which refuses the 0 the tests use for training, so planning runs with 1."""
    run_cmd(["nnUNetv2_plan_experiment", "-d", d], {**env, "nnUNet_n_proc_DA": "1"})
    run_cmd(["nnUNetv2_preprocess", "-d", d, "-c", "3d_fullres", "-np", "1", "-plans_name", "nnUNetPlans"], env)


def same(a: float, b: float) -> bool:
    """Equal to float precision; nnU-Net writes NaN for a class absent from reference and prediction."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_nnunet_baseline_and_hyspark_at_two_fractions(synthetic_ct, tmp_path):
    env, d = synthetic_ct["env"], str(synthetic_ct["labelled"])
    name = next(synthetic_ct["raw"].glob(f"Dataset{d}_*")).name
    pre, results = synthetic_ct["preprocessed"] / name, synthetic_ct["results"] / name
    plan_with_nnunet(env, d)
    out = tmp_path / "bench"
    cmd = ["hyspark_benchmark", "folds", "-d", d, "-p", PLANS, "-f", "0", "1", "--arms", *ARM_SPECS,
           "--train-fractions", "0.5", "1", "--output", str(out), "--device", "cpu"]

    dry = run_cmd(cmd + ["--dry-run"], env)
    assert dry.stdout.count("nnUNetv2_train") == 8 and "-p nnUNetPlans" in dry.stdout and not out.exists()

    run_cmd(cmd, env, timeout=3600)  # ~4 min on 2 quiet cores; a loaded machine can take many times that
    manifest = json.loads((out / "benchmark.json").read_text())
    entries = {(e["fold"], e["fraction"]): e["nnunet_fold"] for e in manifest["fraction_entries"]}
    assert sorted(entries) == [(0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]
    splits = json.loads((pre / "splits_final.json").read_text())
    labels = {str(v): k for k, v in json.loads((pre / "dataset.json").read_text())["labels"].items() if v}
    table = {(r["fraction"], r["arm"], r["fold"], r["class"]): float(r["value"])
             for r in csv.DictReader(io.StringIO((out / "summary.csv").read_text())) if r["metric"] == "Dice"}
    checked = 0
    for (fold, fraction), k in entries.items():
        entry = splits[k]  # the nested subset, validated on the fold's own cases
        assert entry["val"] == splits[fold]["val"] and set(entry["train"]) <= set(splits[fold]["train"])
        assert len(entry["train"]) == subset_size(fraction, len(splits[fold]["train"]))
        for arm, (trainer, plans) in ARMS.items():
            fold_dir = results / f"{trainer}__{plans}__3d_fullres" / f"fold_{k}"
            log = next(fold_dir.glob("training_log_*.txt")).read_text()
            assert f"This split has {len(entry['train'])} training and {len(entry['val'])} validation" in log
            nnunet = json.loads((fold_dir / "validation" / "summary.json").read_text())
            for key, cls in labels.items():
                assert same(table[(format_fraction(fraction), arm, str(fold), cls)], nnunet["mean"][key]["Dice"])
                checked += 1
            assert same(table[(format_fraction(fraction), arm, str(fold), "foreground_mean")],
                        nnunet["foreground_mean"]["Dice"])
    assert checked == 4 * 2 * len(labels)
    assert base_count(splits) == 5 and all(MARKER in e for e in splits[5:])  # appended after nnU-Net's 5 folds
    md = (out / "summary.md").read_text()
    assert "## Training fraction 0.5" in md and "## Training fraction 1" in md and "Dice vs. training fraction" in md
    for png in ("summary.png", "summary_fractions.png"):
        Image.open(out / png).verify()

    # the same command again: everything finished, the subsets found where they are
    again = run_cmd(cmd, env)
    assert "8 finished, 0 to resume, 0 to start" in again.stdout and "all already in" in again.stdout
    assert json.loads((pre / "splits_final.json").read_text()) == splits
