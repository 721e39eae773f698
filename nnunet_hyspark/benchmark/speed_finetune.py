"""The fine-tuning row of ``hyspark_benchmark speed``: one nnU-Net training step of HySparKUNet against
nnU-Net's default network planned for the same patch.

Both networks are built the way nnU-Net's trainer builds them, with ``get_network_from_plans`` from a
plans ``architecture`` entry: HySparKUNet's as our planner writes it (preset widths, the patch, the fixed
deep-supervision strides), nnU-Net's ``PlainConvUNet`` as nnU-Net's own ``ExperimentPlanner`` plans it for
a dataset whose median image is the patch (so it plans exactly that patch; the planner runs in a child
process that points nnU-Net's folders at a temporary fingerprint-only dataset). The step is nnU-Net's
``train_step`` on the CPU: forward, nnU-Net's deep-supervision loss (Dice + CE on every output, weights
1/2^i normalised, the lowest output weighted 0), backward, gradient clipping at 12, and nnU-Net's
optimiser (SGD, momentum 0.99, Nesterov) for both networks. Steps of the two networks alternate, so
a shared, noisy CPU slows both alike; the ratio is the figure to read.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.hyspark.encoder import DEFAULT_DEPTHS, DEFAULT_EXPANSIONS, DEFAULT_WIDTHS
from nnunet_hyspark.methods.hyspark.network import FIXED_STRIDES

HYSPARK_CLASS = "nnunet_hyspark.methods.hyspark.network.HySparKUNet"
#: HySparKUNet's size presets, as the planner writes them into the plans (tests check they agree)
HYSPARK_PRESETS: dict[str, dict] = {
    "base": {"widths": list(DEFAULT_WIDTHS), "depths": list(DEFAULT_DEPTHS), "expansions": list(DEFAULT_EXPANSIONS),
             "vit_depth": 3, "vit_heads": 12},
    "tiny": {"widths": [8, 16, 16, 24, 24], "depths": [1, 1, 1, 1, 1], "expansions": [2, 2, 2, 2, 2],
             "vit_depth": 1, "vit_heads": 2},
}
NNUNET_LABEL = "PlainConvUNet (nnU-Net 3d_fullres plan)"
STEP_DESCRIPTION = ("nnU-Net train_step: forward, deep-supervision Dice+CE, backward, clip 12, "
                    "SGD momentum 0.99 Nesterov lr 1e-2 wd 3e-5")


@dataclass(frozen=True)
class FinetuneSpeedOptions:
    """What the fine-tuning row times."""

    patch: tuple[int, int, int] = (64, 64, 64)
    batch: int = 2
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # for nnU-Net's planner (kernel sizes, strides)
    widths: str = "base"  # HySparKUNet preset: base or tiny
    in_channels: int = 1
    num_classes: int = 3
    steps: int = 3  # timed steps per network, after `warmup` untimed ones
    warmup: int = 1
    threads: int | None = None  # torch threads (None: torch's)
    seed: int = 0


def hyspark_architecture(patch: Sequence[int], widths: str = "base") -> dict:
    """The plans ``architecture`` entry of HySparKUNet for ``patch``, as HySparKPlanner writes it."""
    if widths not in HYSPARK_PRESETS:
        raise HySparKError(f"unknown HySparKUNet widths preset {widths!r}", f"use one of {sorted(HYSPARK_PRESETS)}")
    arch = {"patch_size": [int(p) for p in patch], **{k: (list(v) if isinstance(v, list) else v)
                                                       for k, v in HYSPARK_PRESETS[widths].items()}}
    arch["strides"] = [list(s) for s in FIXED_STRIDES]
    return {"network_class_name": HYSPARK_CLASS, "arch_kwargs": arch, "_kw_requires_import": []}


def _fingerprint_dataset(root: Path, patch: Sequence[int], spacing: Sequence[float], in_channels: int,
                         num_classes: int) -> str:
    """A raw + preprocessed folder pair holding only dataset.json and a fingerprint: median image = patch."""
    name = "Dataset999_SpeedPatch"
    raw, pre = root / "raw" / name, root / "preprocessed" / name
    raw.mkdir(parents=True)
    pre.mkdir(parents=True)
    labels = {"background": 0, **{f"class{i}": i for i in range(1, num_classes)}}
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): "CT" for i in range(in_channels)}, "labels": labels, "numTraining": 0,
        "file_ending": ".nii.gz", "dataset": {}}))
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [list(spacing)], "shapes_after_crop": [list(patch)],
        "median_relative_size_after_cropping": 1.0}))
    return name


def plan_nnunet_architecture(dataset_name: str, patch: Sequence[int], spacing: Sequence[float]) -> dict:
    """Run nnU-Net's ExperimentPlanner for 3d_fullres (called in the child process; nnU-Net's folders
    come from the environment). Returns the plan's ``patch_size`` and ``architecture``."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planner = ExperimentPlanner(dataset_name)
    plan = planner.get_plans_for_configuration(
        [float(s) for s in spacing], [float(p) for p in patch], planner.generate_data_identifier("3d_fullres"),
        approximate_n_voxels_dataset=1e12, _cache={})
    return {"patch_size": [int(p) for p in plan["patch_size"]], "architecture": plan["architecture"]}


def nnunet_default_architecture(patch: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                                in_channels: int = 1, num_classes: int = 3) -> dict:
    """The plans ``architecture`` entry nnU-Net's default planner gives 3d_fullres at ``patch`` and ``spacing``."""
    with tempfile.TemporaryDirectory(prefix="hyspark_speed_plan_") as tmp:
        root = Path(tmp)
        name = _fingerprint_dataset(root, patch, spacing, in_channels, num_classes)
        # nnU-Net reads its folders from the environment: give them to a child process, not to this one
        env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
               "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1"}
        code = ("import json, sys; from nnunet_hyspark.benchmark.speed_finetune import plan_nnunet_architecture; "
                "a = json.loads(sys.argv[1]); print('PLAN ' + json.dumps(plan_nnunet_architecture(*a)))")
        args = json.dumps([name, list(patch), list(spacing)])
        proc = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PLAN ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"nnU-Net's planner failed:\n{proc.stderr[-3000:]}")
    plan = json.loads(lines[-1][5:])
    if plan["patch_size"] != [int(p) for p in patch]:
        raise HySparKError(f"nnU-Net plans patch {plan['patch_size']} for {list(patch)} at spacing {list(spacing)}",
                           "choose a patch nnU-Net can pool evenly (a multiple of 16 per axis at isotropic spacing)")
    return plan["architecture"]


def build_network(architecture: dict, in_channels: int, num_classes: int) -> nn.Module:
    """The network as nnU-Net's trainer builds it from plans (deep supervision on)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], in_channels, num_classes,
                                  allow_init=True, deep_supervision=True)


def nnunet_loss(num_outputs: int) -> nn.Module:
    """nnU-Net's training loss (nnUNetTrainer._build_loss, labels without regions or ignore label)."""
    import numpy as np
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


class TrainingStep:
    """One network with nnU-Net's optimiser and loss; ``__call__`` runs one timed training step."""

    def __init__(self, network: nn.Module, x: torch.Tensor, labels: torch.Tensor):
        self.network = network.train()
        self.optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
        with torch.no_grad():
            shapes = [o.shape[2:] for o in network(x)]
        # nnU-Net's loader hands over one target per output scale (nearest downsampling of the labels)
        self.targets = [labels[:, :, ::labels.shape[2] // s[0], ::labels.shape[3] // s[1], ::labels.shape[4] // s[2]]
                        for s in shapes]
        self.loss = nnunet_loss(len(shapes))
        self.x = x
        self.params = sum(p.numel() for p in network.parameters())

    def counted(self) -> float:
        """One step under torch's FLOP counter (convolutions and matrix products, forward and backward);
        returns its GFLOP. Element-wise work (norms, activations, copies) is not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops() / 1e9

    def __call__(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.network(self.x), self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        return time.perf_counter() - start


def _interleaved_times(steps: dict[str, TrainingStep], warmup: int,
                       timed: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Step times per network, alternating the networks step by step so that load on a shared CPU hits
    both alike, and GFLOP per step: each network's first warm-up step runs under the FLOP counter (an
    extra untimed step when ``warmup`` is 0)."""
    gflop = {name: step.counted() for name, step in steps.items()}
    untimed = max(warmup - 1, 0)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(untimed + timed):
        for name, step in steps.items():
            t = step()
            if i >= untimed:
                times[name].append(t)
    return times, gflop


def finetune_rows(options: FinetuneSpeedOptions = FinetuneSpeedOptions()) -> list[dict]:
    """Time HySparKUNet and nnU-Net's default network at one patch: one row each, nnU-Net's first.

    Each row: network, class, params, median_s, samples_per_s, times_s, ratio_vs_nnunet (step time over
    nnU-Net's), gflop (convolutions and matrix products of one step, forward and backward) and
    flop_ratio_vs_nnunet (what the time ratio would be if both ran them equally fast), patch, batch,
    threads, step (what one step is)."""
    patch = tuple(int(p) for p in options.patch)
    archs = {NNUNET_LABEL: nnunet_default_architecture(patch, options.spacing, options.in_channels,
                                                       options.num_classes),
             "HySparKUNet": hyspark_architecture(patch, options.widths)}
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        torch.manual_seed(options.seed)
        x = torch.randn(options.batch, options.in_channels, *patch)
        labels = torch.randint(0, options.num_classes, (options.batch, 1, *patch)).float()
        steps = {name: TrainingStep(build_network(a, options.in_channels, options.num_classes), x, labels)
                 for name, a in archs.items()}
        times, gflop = _interleaved_times(steps, options.warmup, options.steps)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    base = statistics.median(times[NNUNET_LABEL])
    rows = []
    for name, step in steps.items():
        median = statistics.median(times[name])
        rows.append({"what": "finetune", "network": name, "class": archs[name]["network_class_name"],
                     "params": step.params, "median_s": median, "samples_per_s": options.batch / median,
                     "times_s": times[name], "ratio_vs_nnunet": median / base, "gflop": gflop[name],
                     "flop_ratio_vs_nnunet": gflop[name] / gflop[NNUNET_LABEL], "patch": list(patch),
                     "batch": options.batch, "widths": options.widths, "threads": used_threads,
                     "step": STEP_DESCRIPTION, "options": asdict(options)})
    return rows


def finetune_markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (one line per network)."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"fine-tuning step (patch {'x'.join(map(str, r0['patch']))}, batch {r0['batch']}, fp32, "
             f"{r0['threads']} threads; {r0['step']}):", "",
             "| network | parameters | median step s | samples/s | time vs nnU-Net | GFLOP/step | FLOPs vs nnU-Net |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['params'] / 1e6:.1f} M | {r['median_s']:.3f} | "
                     f"{r['samples_per_s']:.3f} | {r['ratio_vs_nnunet']:.2f}x | {r['gflop']:.0f} | "
                     f"{r['flop_ratio_vs_nnunet']:.2f}x |")
    lines += ["", "GFLOP/step: convolutions and matrix products, forward and backward (torch's FLOP counter); "
                  "the FLOP ratio is what the time ratio would be if both networks ran them equally fast"]
    return "\n".join(lines) + "\n"
