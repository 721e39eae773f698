"""Issue: the supervised path through nnU-Net's own commands, from raw CT to evaluated predictions."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cmd

pytestmark = pytest.mark.e2e
PLANS, TRAINER = "nnUNetHySparKPlans", "nnUNetTrainerHySparK_test"


def test_synthesize_plan_train_predict_evaluate(synthetic_ct, tmp_path):
    env, d = synthetic_ct["env"], str(synthetic_ct["labelled"])
    raw = next(synthetic_ct["raw"].glob(f"Dataset{d}_*"))
    name = raw.name

    run_cmd(["nnUNetv2_train", d, "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
    fold = synthetic_ct["results"] / name / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    for f in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        assert (fold / f).is_file(), f
    assert list(fold.glob("training_log_*.txt"))

    # --c on a finished run resumes from its final checkpoint instead of starting over
    out = run_cmd(["nnUNetv2_train", d, "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--c"],
                  env)
    assert "Starting a new training" not in out.stdout

    # predict the fold's validation cases with nnU-Net's predictor, then evaluate with nnU-Net's evaluation
    splits = json.loads((synthetic_ct["preprocessed"] / name / "splits_final.json").read_text())
    val_cases = splits[0]["val"]
    images, gt, pred = tmp_path / "imagesTs", tmp_path / "gt", tmp_path / "pred"
    images.mkdir(), gt.mkdir()
    for case in val_cases:
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", images)
        shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", gt)
    run_cmd(["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", d, "-c", "3d_fullres", "-f", "0",
             "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in val_cases)
    run_cmd(["nnUNetv2_evaluate_folder", str(gt), str(pred), "-djfile", str(raw / "dataset.json"),
             "-pfile", str(fold.parent / "plans.json")], env)
    summary = json.loads((pred / "summary.json").read_text())

    # above chance: a labelling that guesses each voxel with the organs' frequencies has Dice ~= frequency
    labels = np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(p))).ravel() for p in gt.iterdir()])
    for label, metrics in summary["mean"].items():
        chance = float(np.mean(labels == int(label)))
        print(f"label {label}: Dice {metrics['Dice']:.3f} (chance {chance:.3f})")
    liver = summary["mean"]["1"]["Dice"]
    assert liver > max(0.3, 3 * float(np.mean(labels == 1))), summary["mean"]
    assert summary["foreground_mean"]["Dice"] > 2 * float(np.mean(labels > 0)) / 3, summary["foreground_mean"]
