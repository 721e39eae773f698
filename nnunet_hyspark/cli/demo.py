"""``hyspark_demo``: the whole product on a built-in synthetic CT dataset, as a user would run it.

synthesize (labelled + unlabeled + held-out test cases) -> hyspark_plan_and_preprocess ->
hyspark_pretrain -> nnUNetv2_train -pretrained_weights -> nnUNetv2_predict ->
nnUNetv2_evaluate_folder; prints Dice per organ and where everything is. Every step
runs the real console script in a subprocess; its output goes to ``<output>/logs``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from nnunet_hyspark.benchmark.steps import Steps, nnunet_environment
from nnunet_hyspark.errors import HySparKError, cli_entry
from nnunet_hyspark.synthetic import DEMO_SHAPE, DEMO_SPACING

LABELLED, UNLABELED, TEST = 991, 992, 993
# organs many voxels across for the cost of a 48 x 48 x 32 image (see DEMO_SHAPE); the study uses the same
SYNTH = ["--shape", *map(str, DEMO_SHAPE), "--spacing", *map(str, DEMO_SPACING)]
PLANS, CONFIG = "nnUNetHySparKPlans", "3d_fullres"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hyspark_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="demo_output", help="folder for all demo data and results")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--force", action="store_true", help="delete an existing demo folder first")
    args = p.parse_args(argv)

    root = Path(args.output).resolve()
    if root.exists() and any(root.iterdir()):
        if not args.force:
            raise HySparKError(f"{root} already exists", "pass --force to start the demo over, or choose --output")
        shutil.rmtree(root)
    env = nnunet_environment(root)
    steps = Steps(root, env, total=9)
    d, u, t = str(LABELLED), str(UNLABELED), str(TEST)
    steps.run("synthesize a labelled abdomen CT dataset", ["hyspark_synthesize", "-d", d, "--num-cases", "10", *SYNTH])
    steps.run("synthesize an unlabeled pre-training collection",
              ["hyspark_synthesize", "-d", u, "--num-cases", "10", "--unlabeled", "--seed", "100", *SYNTH])
    steps.run("synthesize held-out test cases",
              ["hyspark_synthesize", "-d", t, "--num-cases", "3", "--seed", "200", "--name", "SyntheticCTTest", *SYNTH])
    steps.run("plan and preprocess (hybrid network, tiny widths for a CPU)",
              ["hyspark_plan_and_preprocess", "-d", d, "-np", "2", "--arch", "tiny"])
    steps.run("preprocess the unlabeled collection with the same plans",
              ["hyspark_plan_and_preprocess", "-d", u, "--plans-from", d, "-np", "2"])
    pre = root / "pretrain"
    steps.run("HySparK pre-training on labelled + unlabeled images",
              ["hyspark_pretrain", "-d", d, u, "--epochs", str(args.pretrain_epochs), "--iterations", "10",
               "--val-iterations", "2", "--lr", "1e-3", "--preview-every", "2", "--device", args.device,
               "-o", str(pre), "--no-progress"])
    trainer = "nnUNetTrainerHySparKFinetune_demo"
    steps.run("fine-tune with nnU-Net (fold 0, short schedule)",
              ["nnUNetv2_train", d, CONFIG, "0", "-tr", trainer, "-p", PLANS, "-device", args.device,
               "-pretrained_weights", str(pre / "encoder_weights.pth")])
    test_raw = next((root / "nnUNet_raw").glob(f"Dataset{t}_*"))
    pred = root / "predictions"
    steps.run("predict the held-out test cases",
              ["nnUNetv2_predict", "-i", str(test_raw / "imagesTr"), "-o", str(pred), "-d", d, "-c", CONFIG,
               "-f", "0", "-tr", trainer, "-p", PLANS, "-device", args.device, "--disable_tta"])
    labelled_raw = next((root / "nnUNet_raw").glob(f"Dataset{d}_*"))
    results = root / "nnUNet_results" / labelled_raw.name / f"{trainer}__{PLANS}__{CONFIG}"
    steps.run("evaluate with nnU-Net",
              ["nnUNetv2_evaluate_folder", str(test_raw / "labelsTr"), str(pred), "-djfile",
               str(labelled_raw / "dataset.json"), "-pfile", str(results / "plans.json")])
    report(root, pred, labelled_raw, results, pre, time.time() - steps.t0)


def report(root: Path, pred: Path, raw: Path, results: Path, pre: Path, seconds: float) -> None:
    summary = json.loads((pred / "summary.json").read_text())
    names = {str(v): k for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()}
    print("\nDice on the held-out synthetic test cases:")
    for label, m in summary["mean"].items():
        print(f"  {names.get(label, label):10s} {m['Dice']:.3f}")
    print(f"  {'mean':10s} {summary['foreground_mean']['Dice']:.3f}")
    print(f"\ndemo finished in {seconds / 60:.1f} min. Outputs:")
    print(f"  pre-training (log, progress.png, previews/, encoder_weights.pth): {pre}")
    print(f"  fine-tuning (nnU-Net fold_0, progress.png, validation/):         {results / 'fold_0'}")
    print(f"  predictions and summary.json:                                   {pred}")
    print(f"  step logs:                                                       {root / 'logs'}")


if __name__ == "__main__":
    main()
