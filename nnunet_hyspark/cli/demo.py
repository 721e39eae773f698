"""``hyspark_demo``: the whole product on a built-in synthetic CT dataset, as a user would run it.

synthesize (labelled + unlabeled + held-out test cases) -> hyspark_plan_and_preprocess ->
hyspark_pretrain -> nnUNetv2_train -pretrained_weights -> nnUNetv2_predict ->
nnUNetv2_evaluate_folder; prints Dice per organ and where everything is. Every step
runs the real console script in a subprocess; its output goes to ``<output>/logs``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_hyspark.errors import HySparKError, cli_entry

LABELLED, UNLABELED, TEST = 991, 992, 993
SYNTH = ["--shape", "48", "48", "32", "--spacing", "2", "2", "2.25"]
PLANS, CONFIG = "nnUNetHySparKPlans", "3d_fullres"


class Steps:
    """Runs numbered steps, logging each one's output, and stops with the log's tail on failure."""

    def __init__(self, root: Path, env: dict, total: int):
        self.root, self.env, self.total, self.n = root, env, total, 0
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def run(self, title: str, args: list[str]) -> None:
        self.n += 1
        log = self.logs / f"{self.n:02d}_{args[0]}.log"
        print(f"[{self.n}/{self.total}] {title}\n      $ {shlex.join(args)}", flush=True)
        t = time.time()
        exe = shutil.which(args[0], path=self.env["PATH"]) or args[0]
        with open(log, "w") as f:
            rc = subprocess.run([exe, *args[1:]], env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(tail, file=sys.stderr)
            raise HySparKError(f"step {self.n} ({args[0]}) failed with exit code {rc}", f"see {log}")
        print(f"      done in {time.time() - t:.0f} s (log: {log})", flush=True)


def demo_environment(root: Path) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    bindir = str(Path(sys.executable).parent)
    from nnunet_hyspark.nnunet_compat import ext_trainer_value

    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               nnUNet_extTrainer=ext_trainer_value(env.get("nnUNet_extTrainer")))
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_def_n_proc", "2")
    return env


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
    env = demo_environment(root)
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
