"""Issue: pre-train once with hyspark_pretrain, fine-tune with nnU-Net's own -pretrained_weights."""
import json

import pytest
import torch

from conftest import run_cmd

pytestmark = pytest.mark.e2e
PLANS = "nnUNetHySparKPlans"


def test_pretrain_then_finetune_through_the_real_commands(synthetic_ct, tmp_path):
    env, d, u = synthetic_ct["env"], str(synthetic_ct["labelled"]), str(synthetic_ct["unlabeled"])
    out = tmp_path / "pretrain"
    # labelled + unlabeled collection together, as a user pools pre-training data
    run_cmd(["hyspark_pretrain", "-d", d, u, "--epochs", "2", "--iterations", "2", "--val-iterations", "1",
             "-b", "2", "--num-workers", "0", "--preview-every", "1", "-o", str(out), "--no-progress"], env)
    weights = out / "encoder_weights.pth"
    for f in ("training_log.txt", "progress.png", "checkpoint_latest.pth", "checkpoint_final.pth",
              "encoder_weights.json", "previews/epoch_0001.png", "previews/epoch_0002.png"):
        assert (out / f).is_file(), f
    sidecar = json.loads((out / "encoder_weights.json").read_text())
    assert sidecar["method"] == "hyspark" and sidecar["plans_name"] == PLANS
    assert sidecar["normalization_schemes"] == ["CTNormalization"] and len(sidecar["patch_size"]) == 3
    assert len(json.loads((out / "progress.json").read_text())["train_loss"]) == 2
    log = (out / "training_log.txt").read_text()
    assert "sparse backend blocks" in log  # auto: the measured-faster CPU path
    assert "memory allocator: freed memory kept for reuse" in log  # --malloc reuse, the default

    # a second run into the same folder is refused: continue with --c or start over with --force
    again = run_cmd(["hyspark_pretrain", "-d", d, u, "--epochs", "2", "--iterations", "2", "-o", str(out),
                     "--num-workers", "0", "--no-progress"], env, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--c" in again.stderr

    trainer = "nnUNetTrainerHySparKFinetune_test"
    proc = run_cmd(["nnUNetv2_train", d, "3d_fullres", "1", "-tr", trainer, "-p", PLANS, "-device", "cpu",
                    "-pretrained_weights", str(weights)], env)
    log = proc.stdout
    enc_tensors = sum(k.startswith("encoder.") for k in torch.load(weights, weights_only=False)["network_weights"])
    assert f"({enc_tensors} pre-trained encoder tensors" in log
    assert "missing 0, ignored 0, shape mismatch 0" in log
    assert f"pre-trained encoder verified in the network ({enc_tensors} tensors)" in log
    fold = synthetic_ct["results"] / next(synthetic_ct["raw"].glob(f"Dataset{d}_*")).name / \
        f"{trainer}__{PLANS}__3d_fullres" / "fold_1"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
