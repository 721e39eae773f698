"""The study "does pre-training pay?" on synthetic CT, end to end with the real commands (``scripts/study.sh``).

1. synthesise a labelled dataset and an unlabeled collection several times larger (same geometry),
2. plan and preprocess: HySparK's plans (tiny widths, for CPUs) for both, nnU-Net's own ``nnUNetPlans``
   for the labelled one,
3. pre-train HySparK on labelled + unlabeled images (``hyspark_pretrain``; its encoder weights are
   the ``hyspark`` arm's),
4. ``hyspark_benchmark folds``: nnU-Net's own network, HySparK from scratch and HySparK fine-tuned, at
   every label fraction, over the folds of a k-fold split of the labelled cases, all arms on the same
   schedule (``trainers/nnUNetTrainerStudy.py``),
5. ``hyspark_benchmark summarize``: tables, Dice-vs-fraction figure, paired comparisons.

Everything lives under the output folder (its own nnU-Net raw/preprocessed/results folders), the step
logs in ``logs/``; ``study.json`` records the options, every command and its wall time.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

from nnunet_hyspark.benchmark.steps import Steps, nnunet_environment
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.synthetic import DEFAULT_NAME, DEMO_SHAPE, DEMO_SPACING

HYSPARK_PLANS, NNUNET_PLANS, CONFIG = "nnUNetHySparKPlans", "nnUNetPlans", "3d_fullres"
STUDY_FILE = "study.json"


@dataclass(frozen=True)
class StudyOptions:
    """What the study runs; the defaults are the documented study (46 minutes measured on 2 CPU cores)."""

    output: str = "study_output"
    labelled_id: int = 981
    unlabeled_id: int = 982
    labelled_cases: int = 12
    unlabeled_cases: int = 48  # 4x the labelled set
    folds: int = 3  # a k-fold split of the labelled cases
    train_folds: tuple[int, ...] | None = None  # the folds trained (None: every fold)
    fractions: tuple[float, ...] = (0.25, 1.0)
    pretrain_epochs: int = 20
    pretrain_iterations: int = 40
    pretrain_lr: float = 1e-3
    trainers: dict[str, str] = field(default_factory=lambda: {
        "nnunet": "nnUNetTrainer_study", "scratch": "nnUNetTrainerHySparK_study",
        "hyspark": "nnUNetTrainerHySparKFinetune_study"})
    device: str = "cpu"
    workers: int = 2


def smoke_options(**overrides) -> StudyOptions:
    """A minutes-long run of the same pipeline: few cases, one fold of two, 3 iterations per training."""
    smoke = StudyOptions(labelled_cases=6, unlabeled_cases=6, folds=2, train_folds=(0,), fractions=(0.5, 1.0),
                         pretrain_epochs=1, pretrain_iterations=2,
                         trainers={"nnunet": "nnUNetTrainer_smoke", "scratch": "nnUNetTrainerHySparK_smoke",
                                   "hyspark": "nnUNetTrainerHySparKFinetune_smoke"})
    return replace(smoke, **overrides)


def check_options(opts: StudyOptions) -> None:
    """Refuse options that cannot give a study, before anything is written."""
    if opts.folds < 2 or opts.labelled_cases < opts.folds:
        raise HySparKError(f"{opts.labelled_cases} labelled cases cannot be split into {opts.folds} folds",
                           "use --folds >= 2 and at least as many --labelled-cases")
    if opts.train_folds is not None and not set(opts.train_folds) <= set(range(opts.folds)):
        raise HySparKError(f"folds {list(opts.train_folds)} are not all folds of a {opts.folds}-fold split",
                           f"train folds among 0..{opts.folds - 1}")
    if opts.unlabeled_cases < 1 or opts.pretrain_epochs < 1 or opts.pretrain_iterations < 1:
        raise HySparKError("the pre-training needs unlabeled cases, epochs and iterations",
                           "use --unlabeled-cases, --pretrain-epochs and --pretrain-iterations >= 1")
    if not opts.fractions or any(not 0 < f <= 1 for f in opts.fractions):
        raise HySparKError(f"label fractions must be in (0, 1], got {list(opts.fractions)}", "e.g. --fractions 0.25 1")
    if opts.labelled_id == opts.unlabeled_id:
        raise HySparKError("the labelled and unlabeled datasets need two different ids", "change one of them")


def case_ids(opts: StudyOptions) -> list[str]:
    """The labelled case ids ``hyspark_synthesize`` writes (``SyntheticCT_000`` ...)."""
    width = max(3, len(str(opts.labelled_cases - 1)))
    return [f"{DEFAULT_NAME}_{k:0{width}d}" for k in range(opts.labelled_cases)]


def kfold_splits(cases: list[str], k: int) -> list[dict]:
    """nnU-Net's splits_final.json form of a k-fold split: fold i validates on every k-th case from i."""
    return [{"train": [c for j, c in enumerate(cases) if j % k != i], "val": cases[i::k]} for i in range(k)]


def arm_specs(opts: StudyOptions, weights: Path) -> list[str]:
    """``--arms`` of the study: nnU-Net's own planner and network, HySparK scratch and fine-tuned."""
    t = opts.trainers
    return [f"nnunet={t['nnunet']}@{NNUNET_PLANS}", f"scratch={t['scratch']}@{HYSPARK_PLANS}",
            f"hyspark={t['hyspark']}@{HYSPARK_PLANS}:{weights}"]


def commands(opts: StudyOptions, root: Path) -> list[tuple[str, list[str]]]:
    """Every step of the study as (title, command), in order; nothing is run."""
    d, u = str(opts.labelled_id), str(opts.unlabeled_id)
    geometry = ["--shape", *map(str, DEMO_SHAPE), "--spacing", *map(str, DEMO_SPACING)]
    np_ = ["-np", str(opts.workers)]
    pre = root / "pretrain"
    bench = ["-d", d, "-c", CONFIG, "-p", HYSPARK_PLANS, "--arms", *arm_specs(opts, pre / "encoder_weights.pth"),
             "--train-fractions", *map(str, opts.fractions), "-f", *map(str, opts.train_folds or range(opts.folds)),
             "--compare", "scratch", "hyspark", "--output", str(root / "benchmark")]
    return [
        ("synthesize the labelled CT dataset",
         ["hyspark_synthesize", "-d", d, "--num-cases", str(opts.labelled_cases), *geometry]),
        ("synthesize the unlabeled pre-training collection",
         ["hyspark_synthesize", "-d", u, "--num-cases", str(opts.unlabeled_cases), "--unlabeled", "--seed", "100",
          *geometry]),
        ("plan and preprocess with HySparK's plans (tiny widths, for CPUs)",
         ["hyspark_plan_and_preprocess", "-d", d, *np_, "--arch", "tiny"]),
        ("preprocess the unlabeled collection with the same plans",
         ["hyspark_plan_and_preprocess", "-d", u, "--plans-from", d, *np_]),
        ("plan and preprocess with nnU-Net's own planner (the baseline's nnUNetPlans)",
         ["nnUNetv2_plan_and_preprocess", "-d", d, "-c", CONFIG, *np_]),
        ("pre-train HySparK on labelled + unlabeled images",
         ["hyspark_pretrain", "-d", d, u, "--epochs", str(opts.pretrain_epochs), "--iterations",
          str(opts.pretrain_iterations), "--val-iterations", "2", "--lr", str(opts.pretrain_lr),
          "--preview-every", str(opts.pretrain_epochs), "--device", opts.device, "-o", str(pre), "--no-progress"]),
        ("train every arm x fold x fraction with nnU-Net",
         ["hyspark_benchmark", "folds", *bench, "--splits", str(root / "splits.json"), "--device", opts.device]),
        ("summarize: tables, figures, paired comparisons", ["hyspark_benchmark", "summarize", *bench]),
    ]


def prepare_output(opts: StudyOptions, force: bool) -> Path:
    """The empty (or, with ``force``, emptied) output folder; refuses to mix with an earlier study."""
    import shutil

    root = Path(opts.output).resolve()
    if root.exists() and any(root.iterdir()):
        if not force:
            raise HySparKError(f"{root} already exists", "pass --force to start the study over, or choose --output")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_study(opts: StudyOptions, force: bool = False, out: TextIO = sys.stdout) -> Path:
    """Run every step (see :func:`commands`) and write ``study.json``; returns the benchmark folder."""
    check_options(opts)
    root = prepare_output(opts, force)
    (root / "splits.json").write_text(json.dumps(kfold_splits(case_ids(opts), opts.folds), indent=2) + "\n")
    steps_ = commands(opts, root)
    env = nnunet_environment(root, opts.workers)
    if "nnUNet_n_proc_DA" not in os.environ:
        # augmentation in the training process: with the study trainers' fixed seed every run draws the
        # same patches (worker processes draw their own)
        env["nnUNet_n_proc_DA"] = "0"
    steps = Steps(root, env, total=len(steps_), out=out)
    record = {"options": asdict(opts), "command": shlex.join(sys.argv), "machine": machine(), "steps": []}
    try:
        for title, args in steps_:
            # a failed fold is reported by `folds` (exit status 1) and listed by `summarize`
            steps.run(title, args, ok=(0, 1) if args[:2] == ["hyspark_benchmark", "folds"] else (0,))
    finally:
        record["steps"] = [asdict(s) for s in steps.times]
        record["total_seconds"] = time.time() - steps.t0
        (root / STUDY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return root / "benchmark"


def machine() -> dict:
    """Where the study ran (for the record next to its wall times)."""
    import torch

    from nnunet_hyspark.hardware import cpu_info

    return {"cpu": cpu_info().describe(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
