"""What each arm costs: network size, training wall time per fold, and pre-training time.

Everything is read from files nnU-Net and ``hyspark_pretrain`` write anyway, so the numbers need no
bookkeeping of ours and are the same whether a fold ran inside a benchmark or by hand:

* **parameters**: the tensors of ``network_weights`` in the fold's ``checkpoint_final.pth``, minus
  normalisation buffers (``running_mean``, ``running_var``, ``num_batches_tracked``), i.e. the trained
  network's learnable parameters. The checkpoint is read with ``torch.load(weights_only=True)``; nnU-Net
  stores a few NumPy scalars in its logging state, so NumPy's scalar and numeric dtype classes are allowed
  (they rebuild numbers from raw bytes and run no code).
* **training wall time** of a fold: nnU-Net writes every log line of ``training_log_*.txt`` as
  ``YYYY-MM-DD HH:MM:SS.ffffff: message``. One log file is one ``nnUNetv2_train`` run; its wall time is
  its last time stamp minus its first (set-up after the network is built, every epoch, the final
  validation), and a fold's wall time is the sum over its log files, so a resumed fold counts each run
  once and not the pause between them. The sum of the ``Epoch time: X s`` lines (training epochs only,
  without the final validation) is reported beside it.
* **pre-training time**: ``pretraining_seconds`` in the JSON sidecar of the arm's weights file
  (``encoder_weights.json`` beside ``encoder_weights.pth``; written by ``hyspark_pretrain`` and
  ``hyspark_export_weights``: the summed epoch times of the run, across resumes). Arms without weights,
  or weights from an older version or from elsewhere, show "n/a".
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nnunet_hyspark.benchmark.summary import sample_std
from nnunet_hyspark.errors import HySparKError

if TYPE_CHECKING:
    from nnunet_hyspark.benchmark.spec import BenchmarkSpec

#: state-dict entries that are buffers, not learnable parameters
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: the key of the weights' sidecar that records the pre-training wall time
PRETRAINING_SECONDS = "pretraining_seconds"
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?): ?(.*)$")
_EPOCH_TIME = re.compile(r"^Epoch time: ([0-9.eE+-]+) s\s*$")


@dataclass
class LogTimes:
    """What one fold's nnU-Net logs say about its run time."""

    wall_seconds: float | None  # sum over log files of (last - first time stamp)
    epoch_seconds: float | None  # sum of the "Epoch time" lines
    epochs: int  # number of "Epoch time" lines (epochs run, re-runs after a resume included)
    runs: int  # number of log files with at least one time stamp


@dataclass
class FoldCost:
    """One fold's size and time; None where its files do not tell."""

    fold: int
    parameters: int | None
    times: LogTimes


@dataclass
class ArmCost:
    """One arm's folds and the pre-training time of its weights."""

    label: str
    folds: list[FoldCost] = field(default_factory=list)
    pretraining_seconds: float | None = None
    fraction: float | None = None  # label-efficiency runs: one row per arm x fraction

    @property
    def parameters(self) -> int | None:
        """The folds' parameter count (equal in every fold of an arm; the first one known)."""
        return next((f.parameters for f in self.folds if f.parameters is not None), None)

    def wall_times(self) -> list[float]:
        return [f.times.wall_seconds for f in self.folds if f.times.wall_seconds is not None]

    def epoch_times(self) -> list[float]:
        return [f.times.epoch_seconds for f in self.folds if f.times.epoch_seconds is not None]


# --------------------------------------------------------------------------- reading

def parse_training_log(text: str) -> tuple[list[datetime], list[float]]:
    """Time stamps of every stamped line, and the values of the ``Epoch time: X s`` lines.

    Lines without a stamp (the citation banner, the printed plans) are skipped; a line whose stamp
    does not parse is skipped too, so a log cut off mid-line by a crash still counts.
    """
    stamps, epochs = [], []
    for line in text.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        try:
            stamps.append(datetime.fromisoformat(m.group(1)))
        except ValueError:
            continue
        e = _EPOCH_TIME.match(m.group(2))
        if e:
            try:
                epochs.append(float(e.group(1)))
            except ValueError:
                pass
    return stamps, epochs


def log_times(fold_dir: Path) -> LogTimes:
    """Wall and epoch time of a fold from all its ``training_log_*.txt`` files (see the module docstring)."""
    wall, epoch_total, n_epochs, runs = 0.0, 0.0, 0, 0
    for log in sorted(Path(fold_dir).glob("training_log_*.txt")):
        try:
            stamps, epochs = parse_training_log(log.read_text(errors="replace"))
        except OSError:
            continue
        if stamps:
            runs += 1
            wall += (max(stamps) - min(stamps)).total_seconds()
        epoch_total += sum(epochs)
        n_epochs += len(epochs)
    return LogTimes(wall if runs else None, epoch_total if n_epochs else None, n_epochs, runs)


def _numpy_safe_globals() -> list:
    """NumPy scalar and numeric dtype classes, as pickled in nnU-Net's logging state."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")
              and any(n.startswith(k) for k in ("Float", "Int", "UInt", "Bool"))]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def count_parameters(checkpoint: Path) -> int:
    """Learnable parameters in an nnU-Net checkpoint's ``network_weights`` (buffers excluded)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise HySparKError(f"cannot read {checkpoint}: {str(e).strip().splitlines()[0][:160]}",
                           "the checkpoint is corrupt or not nnU-Net's; retrain the fold") from None
    weights = state.get("network_weights") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise HySparKError(f"{checkpoint} has no network_weights", "is it an nnU-Net checkpoint?")
    return int(sum(v.numel() for k, v in weights.items()
                   if isinstance(v, torch.Tensor) and not k.endswith(BUFFER_SUFFIXES)))


def pretraining_seconds(weights: str | None) -> float | None:
    """``pretraining_seconds`` from the weights file's JSON sidecar; None if absent or unreadable."""
    if not weights:
        return None
    sidecar = Path(weights).with_suffix(".json")
    try:
        value = json.loads(sidecar.read_text()).get(PRETRAINING_SECONDS)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def fold_cost(fold_dir: Path, fold: int) -> FoldCost:
    """A fold's parameters (from checkpoint_final.pth, if any) and log times."""
    ckpt = Path(fold_dir) / "checkpoint_final.pth"
    params = None
    if ckpt.is_file():
        try:
            params = count_parameters(ckpt)
        except HySparKError:
            params = None  # an unreadable checkpoint costs one cell, not the summary
    return FoldCost(fold, params, log_times(fold_dir))


def collect_costs(spec: "BenchmarkSpec") -> list[ArmCost]:
    """Costs of every arm over the benchmark's nnU-Net folds (``spec``: a BenchmarkSpec)."""
    costs = []
    for arm in spec.arms:
        pre = pretraining_seconds(arm.weights)
        for fraction, folds in _nnunet_folds(spec).items():
            ac = ArmCost(arm.label, pretraining_seconds=pre, fraction=fraction)
            for fold in folds:
                fdir = spec.fold_dir(arm, fold)
                if fdir.is_dir():
                    ac.folds.append(fold_cost(fdir, fold))
            costs.append(ac)
    return costs


def _nnunet_folds(spec: "BenchmarkSpec") -> dict[float | None, list[int]]:
    """fraction -> the nnU-Net folds trained on it; {None: folds} without --train-fractions."""
    from nnunet_hyspark.benchmark.fractions import DEFAULT_FRACTIONS

    if not spec.fold_entries or tuple(spec.fractions) == DEFAULT_FRACTIONS:
        return {None: list(spec.folds)}
    out: dict[float | None, list[int]] = {}
    for e in sorted(spec.fold_entries, key=lambda e: (e.fraction, e.cv_fold)):
        out.setdefault(e.fraction, []).append(e.nnunet_fold)
    return out


# --------------------------------------------------------------------------- rendering

def format_seconds(seconds: float | None) -> str:
    """1h02m, 12m05s, 42.0s; 'n/a' for None."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    std = sample_std(values)
    return format_seconds(mean) + (f" ± {format_seconds(std)}" if std is not None else "") + f" (n={len(values)})"


def cost_markdown(spec: "BenchmarkSpec") -> str:
    """The cost table of the summary: one row per arm."""
    return render_cost_markdown(collect_costs(spec))


def render_cost_markdown(costs: Sequence[ArmCost]) -> str:
    """Markdown table from collected costs (mean ± sample std over the folds whose logs exist)."""
    out = ["## Cost per arm", "",
           "Parameters of the trained network (checkpoint_final.pth); training wall time per fold from "
           "nnU-Net's training_log_*.txt (first to last time stamp of each run, incl. the final validation; "
           "epochs only: sum of its 'Epoch time' lines), mean ± std over folds; pre-training time from the "
           "weights' sidecar (pretraining_seconds).", "",
           "| arm | parameters | train wall time / fold | epochs only / fold | pre-training |",
           "|---|---|---|---|---|"]
    for c in costs:
        params = f"{c.parameters:,}" if c.parameters is not None else "n/a"
        label = c.label if c.fraction is None else f"{c.label} (fraction {c.fraction:g})"
        out.append(f"| {label} | {params} | {_mean_std(c.wall_times())} | {_mean_std(c.epoch_times())} | "
                   f"{format_seconds(c.pretraining_seconds) if c.pretraining_seconds is not None else 'n/a'} |")
    return "\n".join(out + [""])


def cost_csv(spec: "BenchmarkSpec") -> str:
    """One row per arm x fold (machine-readable), plus the arm's pre-training time on every row."""
    return render_cost_csv(collect_costs(spec))


def render_cost_csv(costs: Sequence[ArmCost]) -> str:
    """CSV text, one row per arm x nnU-Net fold (times in seconds; empty = unknown)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "fraction", "nnunet_fold", "parameters", "train_wall_seconds", "train_epoch_seconds",
                "epochs", "runs", "pretraining_seconds"])
    for c in costs:
        pre = "" if c.pretraining_seconds is None else repr(c.pretraining_seconds)
        fraction = "" if c.fraction is None else c.fraction
        if not c.folds:
            w.writerow([c.label, fraction, "", "", "", "", "", "", pre])
        for f in c.folds:
            t = f.times
            w.writerow([c.label, fraction, f.fold, "" if f.parameters is None else f.parameters,
                        "" if t.wall_seconds is None else repr(round(t.wall_seconds, 3)),
                        "" if t.epoch_seconds is None else repr(round(t.epoch_seconds, 3)), t.epochs, t.runs, pre])
    return buf.getvalue()
