"""Issue: hyspark_benchmark runs scratch vs pre-trained folds through nnUNetv2_train and summarises them."""
import csv
import io
import json

import pytest
import torch
from PIL import Image

from conftest import run_cmd
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.methods.hyspark.weights import export_encoder

pytestmark = pytest.mark.e2e
PLANS = "nnUNetHySparKPlans"
ARMS = ["scratch=nnUNetTrainerHySparK_test", "pretrained=nnUNetTrainerHySparKFinetune_test"]


def encoder_weights(plans_file, path):
    """Weights in the exported format for the plan's (tiny) architecture, as hyspark_pretrain writes them."""
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    plan = plans["configurations"]["3d_fullres"]
    enc = HybridEncoder(1, arch["widths"], arch["depths"], arch["expansions"], arch["vit_depth"], arch["vit_heads"])
    meta = {"method": "hyspark", "spacing": plan["spacing"], "normalization_schemes": plan["normalization_schemes"],
            "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"]}
    return export_encoder(enc, meta, path)


def test_two_arms_two_folds_then_summary(synthetic_ct, tmp_path):
    env, d = synthetic_ct["env"], str(synthetic_ct["labelled"])
    name = next(synthetic_ct["raw"].glob(f"Dataset{d}_*")).name
    weights = encoder_weights(synthetic_ct["preprocessed"] / name / f"{PLANS}.json", tmp_path / "w.pth")
    out = tmp_path / "bench"
    common = ["-d", d, "-p", PLANS, "--output", str(out)]

    dry = run_cmd(["hyspark_benchmark", "folds", *common, "-f", "2", "3", "--arms", *ARMS,
                   "--pretrained_weights", str(weights), "--dry-run"], env)
    assert dry.stdout.count("nnUNetv2_train") == 4 and "-pretrained_weights" in dry.stdout

    run_cmd(["hyspark_benchmark", "folds", *common, "-f", "2", "3", "--arms", *ARMS,
             "--pretrained_weights", str(weights)], env)

    # the table's numbers are nnU-Net's own
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    trainers = {"scratch": "nnUNetTrainerHySparK_test", "pretrained": "nnUNetTrainerHySparKFinetune_test"}
    checked = 0
    for arm, trainer in trainers.items():
        for fold in (2, 3):
            s = json.loads((synthetic_ct["results"] / name / f"{trainer}__{PLANS}__3d_fullres" / f"fold_{fold}" /
                            "validation" / "summary.json").read_text())
            row = next(r for r in rows if r["arm"] == arm and r["fold"] == str(fold) and r["class"] == "liver"
                       and r["metric"] == "Dice")
            assert float(row["value"]) == pytest.approx(s["mean"]["1"]["Dice"], abs=1e-6)
            checked += 1
    assert checked == 4
    md = (out / "summary.md").read_text()
    assert "liver" in md and "pretrained" in md and "scratch" in md
    Image.open(out / "summary.png").verify()
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a fold that was never run is reported as missing, not averaged
    run_cmd(["hyspark_benchmark", "summarize", *common, "-f", "2", "3", "4", "--arms", *ARMS, "--force"], env)
    md = (out / "summary.md").read_text()
    assert "4" in md and "missing" in md.lower()

    # a splits file naming a case that does not exist is refused with one clear line
    bad = tmp_path / "splits.txt"
    bad.write_text("SyntheticCT_000 0\nNoSuchCase_123 1\n")
    proc = run_cmd(["hyspark_benchmark", "folds", *common, "--arms", *ARMS, "--pretrained_weights", str(weights),
                    "--splits", str(bad), "--dry-run"], env, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "NoSuchCase_123" in proc.stderr
    assert "Traceback" not in proc.stderr
