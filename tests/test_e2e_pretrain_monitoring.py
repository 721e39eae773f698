"""Issue 13, items 2-5 through the real commands: loggers, the linear probe and checkpoint_best.pth,
hyspark_export_weights, --estimate, citations, and the one-line refusals of bad input."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch

from conftest import run_cmd
from nnunet_hyspark.synthetic import LABELS

pytestmark = pytest.mark.e2e
PLANS = "nnUNetHySparKPlans"
SHORT = ["--val-iterations", "1", "-b", "2", "--num-workers", "0", "--no-progress"]


def _encoder(weights_file) -> dict:
    sd = torch.load(weights_file, weights_only=False)["network_weights"]
    return {k: v for k, v in sd.items() if k.startswith("encoder.")}


def test_probe_tensorboard_best_checkpoint_and_export(synthetic_ct, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env, d, u = synthetic_ct["env"], str(synthetic_ct["labelled"]), str(synthetic_ct["unlabeled"])
    out = tmp_path / "run"
    run_cmd(["hyspark_pretrain", "-d", d, u, "--epochs", "3", "--iterations", "4", "--lr", "1e-3", *SHORT,
             "--probe-dataset", d, "--probe-every", "1", "--logger", "tensorboard", "-o", str(out)], env)
    history = json.loads((out / "progress.json").read_text())
    probe = history["probe"]
    assert [p["epoch"] for p in probe] == [0, 1, 2, 3]
    print("probe curve (mean Dice):", [round(p["mean_dice"], 4) for p in probe])
    assert probe[0]["mean_dice"] != probe[-1]["mean_dice"], probe  # the initial and the trained encoder differ
    assert set(probe[0]["dice"]) == set(LABELS) - {"background"}  # Dice per foreground class
    best = history["best"]
    assert best["metric"] == "probe_mean_dice"
    assert best["value"] == max(p["mean_dice"] for p in probe) and (out / "checkpoint_best.pth").is_file()
    assert len(history["weight_decay"]) == 3 and all(s > 0 for s in history["samples_per_s"])
    log = (out / "training_log.txt").read_text()
    assert "ETA from this run's first steps:" in log and "s/step" in log and "probe after 0 epoch(s)" in log

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss/train", "loss/val", "lr", "weight_decay", "throughput/samples_per_s", "probe/mean_dice"):
        assert tag in scalars, (tag, scalars)
    assert [e.step for e in events.Scalars("probe/mean_dice")] == [0, 1, 2, 3]
    assert [round(e.value, 5) for e in events.Scalars("probe/mean_dice")] == [round(p["mean_dice"], 5) for p in probe]
    assert any(t.startswith("preview/") for t in events.Tags()["images"])

    # the run's weights name the paper; hyspark_export_weights reproduces them from checkpoint_final.pth
    sidecar = json.loads((out / "encoder_weights.json").read_text())
    assert "HySparK" in sidecar["citation"] and "MICCAI 2024" in sidecar["citation"]
    final = tmp_path / "from_final.pth"
    proc = run_cmd(["hyspark_export_weights", str(out / "checkpoint_final.pth"), str(final)], env)
    assert "fine-tune with: nnUNetv2_train" in proc.stdout and "cite: " in proc.stdout
    reference, exported = _encoder(out / "encoder_weights.pth"), _encoder(final)
    assert reference.keys() == exported.keys() and all(torch.equal(reference[k], exported[k]) for k in reference)
    best_file = tmp_path / "from_best.pth"
    run_cmd(["hyspark_export_weights", str(out / "checkpoint_best.pth"), str(best_file)], env)
    meta = json.loads(best_file.with_suffix(".json").read_text())
    assert meta["steps"] == best["epoch"] * 4 and meta["exported_from"].endswith("checkpoint_best.pth")
    again = run_cmd(["hyspark_export_weights", str(out / "checkpoint_best.pth"), str(best_file)], env, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_follows_nnunets_variables(synthetic_ct, tmp_path):
    env = {**synthetic_ct["env"], "nnUNet_wandb_enabled": "1", "nnUNet_wandb_mode": "offline",
           "nnUNet_wandb_project": "hyspark-test", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = tmp_path / "run"
    # no --logger: nnU-Net's switch nnUNet_wandb_enabled=1 turns W&B on, as for nnUNetv2_train
    run_cmd(["hyspark_pretrain", "-d", str(synthetic_ct["labelled"]), "--epochs", "1", "--iterations", "2", *SHORT,
             "-o", str(out)], env)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "wandb").iterdir())
    assert (out / "wandb_run_id.txt").read_text().strip() in runs[0].name


def test_estimate_prints_the_cost_and_writes_nothing(synthetic_ct, tmp_path):
    env, d, u = synthetic_ct["env"], str(synthetic_ct["labelled"]), str(synthetic_ct["unlabeled"])
    out = tmp_path / "never"
    before = sorted(p.name for p in synthetic_ct["results"].rglob("*"))
    proc = run_cmd(["hyspark_pretrain", "-d", d, u, "--epochs", "4", "--iterations", "10", "--val-iterations", "2",
                    "--num-workers", "0", "--probe-dataset", d, "--estimate", "-o", str(out)], env)
    print(proc.stdout)
    text = proc.stdout
    for expected in ("s/step", "samples/s", "wall time of 4 epochs x 10 iterations", "probe", "peak memory",
                     "nothing was written"):
        assert expected in text, (expected, text)
    assert not out.exists() and sorted(p.name for p in synthetic_ct["results"].rglob("*")) == before


def _other_plans_dataset(synthetic_ct) -> str:
    """A copy of the labelled preprocessed dataset whose plans say another spacing (a different preprocessing)."""
    pre = synthetic_ct["preprocessed"]
    source = next(pre.glob(f"Dataset{synthetic_ct['labelled']}_*"))
    target = pre / "Dataset509_OtherSpacing"
    if not target.exists():
        shutil.copytree(source, target)
        plans = json.loads((target / f"{PLANS}.json").read_text())
        plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 3.0, 3.0]
        (target / f"{PLANS}.json").write_text(json.dumps(plans))
    return "509"


def test_bad_monitoring_input_ends_in_one_line_and_writes_nothing(synthetic_ct, tmp_path):
    env, d, u = synthetic_ct["env"], str(synthetic_ct["labelled"]), str(synthetic_ct["unlabeled"])
    out = tmp_path / "never"
    base = ["-d", d, "--epochs", "1", "--iterations", "1", *SHORT, "-o", str(out)]
    cases = {
        "has no labels": ["hyspark_pretrain", *base, "--probe-dataset", u],
        "preprocessed differently": ["hyspark_pretrain", *base, "--probe-dataset", _other_plans_dataset(synthetic_ct)],
        "cannot be combined with --c": ["hyspark_pretrain", *base, "--estimate", "--c"],
        # the package missing: blocked in this interpreter the way Python blocks an import
        "needs the 'tensorboard' package": [sys.executable, "-c", "import sys; sys.modules['tensorboard'] = None; "
                                            "from nnunet_hyspark.cli.pretrain import main; main()", *base,
                                            "--logger", "tensorboard"],
    }
    for expected, args in cases.items():
        proc = run_cmd(args, env, check=False)
        assert proc.returncode == 2, (expected, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and " -> " in lines[0], proc.stderr[-2000:]
        assert expected in lines[0], (expected, lines[0])
        assert not out.exists(), expected


def test_precision_auto_runs_the_precision_it_logs(synthetic_ct, tmp_path):
    """``--precision auto`` through the command: the log says what it chose and why (on this CPU: by its
    flags, or by a timing where it has AVX-512 bf16 without AMX), and the run uses that precision."""
    out = tmp_path / "run"
    proc = run_cmd(["hyspark_pretrain", "-d", str(synthetic_ct["labelled"]), "--epochs", "1", "--iterations", "1",
                    *SHORT, "--precision", "auto", "-o", str(out)], synthetic_ct["env"])
    log = (out / "training_log.txt").read_text()
    line = next(line for line in proc.stdout.splitlines() if line.startswith("--precision auto: "))
    print(line)  # what auto chose on the machine that ran the suite
    chosen = line.split()[2]
    assert chosen in ("fp32", "bf16") and line in log
    assert "(CPU " in line  # the reason names the CPU
    assert json.loads((out / "pretrain_config.json").read_text())["precision"] == chosen
