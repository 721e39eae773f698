"""The output folder of one pre-training run: one run per folder, starting over, continuing the same run.

- A folder holding an earlier run is refused unless ``--c`` (continue it) or ``--force`` (start over)
  is given; ``--force`` first moves everything of the earlier run into ``<output>.previous-<time>``, so
  no old checkpoint, weights file or preview can sit beside the new run (a later fine-tune would
  otherwise pick up old weights after an interrupted new run).
- ``--c`` continues only the same run: method, data, batch and model must match what the checkpoint
  stored, and the schedule too unless ``--allow-schedule-change`` is given (then the schedule is
  recomputed over the new length and the change is written to the log).
The run lock itself is :class:`nnunet_hyspark.runlock.RunLock`, held by rank 0 around all of this.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.runlock import LOCK_NAME
from nnunet_hyspark.schedules import warmup_cosine

CONFIG_NAME = "pretrain_config.json"

#: --c refuses these differences always: (key in the checkpoint's meta, option named in the message)
RUN_KEYS = {"method": "--method", "datasets": "-d", "plans_name": "-p", "configuration": "-c",
            "patch_size": "patch size", "batch_size": "batch size per process", "world_size": "number of processes",
            "mask_ratio": "--mask-ratio"}
#: ... and these options of pretrain_config.json (the model's shape and the data split)
OPTION_KEYS = {"decoder_width": "--decoder-width", "fuse_full_resolution": "--fuse-full-resolution",
               "seed": "--seed", "val_fraction": "--val-fraction"}
#: schedule keys of the checkpoint's loop_config; only these may change with --allow-schedule-change
SCHEDULE_KEYS = {"epochs": "--epochs", "lr": "--lr", "warmup_fraction": "--warmup-fraction",
                 "weight_decay_start": "--weight-decay START", "weight_decay_end": "--weight-decay END",
                 "betas": "--betas", "clip_grad": "--clip-grad"}
FIXED_LOOP_KEYS = {"iterations_per_epoch": "--iterations"}  # epoch numbering and history depend on it


# ------------------------------------------------------------------ starting a run
def previous_run_entries(output: Path) -> list[Path]:
    """What an earlier run left in ``output`` (everything but the lock and stray temporary files)."""
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir() if p.name != LOCK_NAME and not p.name.endswith(".tmp"))


def move_previous_run(output: Path) -> Path | None:
    """``--force``: move the earlier run into ``<output>.previous-<time>`` (nothing is deleted)."""
    entries = previous_run_entries(output)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output.with_name(f"{output.name}.previous-{stamp}")
    n = 1
    while target.exists():  # two --force runs within one second
        n += 1
        target = output.with_name(f"{output.name}.previous-{stamp}-{n}")
    target.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


def start_fresh(output: Path, force: bool) -> Path | None:
    """Refuse a folder with an earlier run unless ``force``; then move that run aside. Returns where it went."""
    entries = previous_run_entries(output)
    if not entries:
        return None
    if not force:
        has_checkpoint = (output / "checkpoint_latest.pth").is_file()
        raise HySparKError(f"{output} already holds a pre-training run ({', '.join(p.name for p in entries[:4])}"
                           f"{', ...' if len(entries) > 4 else ''})",
                           ("continue it with --c, " if has_checkpoint else "") +
                           "choose another --output, or start over with --force (moves the old run to "
                           f"{output.name}.previous-<time>)")
    return move_previous_run(output)


# ------------------------------------------------------------------ continuing a run
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def _show(v: Any) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _differences(stored: Mapping[str, Any], requested: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    return [f"{label} {_show(requested.get(k))} (stored: {_show(stored.get(k))})" for k, label in names.items()
            if k in stored and not _same(stored.get(k), requested.get(k))]


def _recipe_difference(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """The data recipe (crops, sampler, augmentation) as pretrain_config.json records it, shown by its summary."""
    old, new = stored.get("data_recipe"), requested.get("data_recipe")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    fields = (set(old) | set(new)) - {"summary"}
    if all(_same(old.get(k), new.get(k)) for k in fields):
        return []
    return [f"data recipe '{new.get('summary')}' (stored: '{old.get('summary')}')"]


def read_stored_options(output: Path) -> dict[str, Any]:
    """The options the run was started with (``pretrain_config.json``; empty if absent or unreadable)."""
    try:
        return json.loads((output / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}


def check_same_run(state: Mapping[str, Any], stored_options: Mapping[str, Any], meta: Mapping[str, Any],
                   loop: Mapping[str, Any], options: Mapping[str, Any], allow_schedule_change: bool) -> list[str]:
    """``--c``: refuse a run that differs from the checkpoint's, listing every difference.

    ``meta`` / ``loop`` are the new run's (as :class:`~nnunet_hyspark.pretraining.loop.Pretrainer` stores
    them), ``options`` its resolved options. Returns the lines to log about an allowed schedule change."""
    stored_loop = state.get("loop_config", {})
    fixed = (_differences(state.get("meta", {}), meta, RUN_KEYS) + _differences(stored_loop, loop, FIXED_LOOP_KEYS)
             + _differences(stored_options, options, OPTION_KEYS) + _recipe_difference(stored_options, options))
    schedule = _differences(stored_loop, loop, SCHEDULE_KEYS)
    path = state.get("path", "the checkpoint")
    if fixed or (schedule and not allow_schedule_change):
        hint = "continue with the options the run was started with, start over with --force, or choose another --output"
        if schedule and not fixed:
            hint = f"pass --allow-schedule-change to continue with the new schedule (recomputed over the new length), {hint}"
        raise HySparKError(f"--c: the requested run differs from the one in {path}: " + "; ".join(fixed + schedule),
                           hint)
    if not schedule:
        return []
    return _schedule_change_note(state, stored_loop, loop, schedule)


def _schedule_change_note(state: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any],
                          changes: list[str]) -> list[str]:
    step, iterations = int(state["step"]), int(new["iterations_per_epoch"])
    done = step // iterations
    if int(new["epochs"]) * iterations < step:
        raise HySparKError(f"--c --epochs {new['epochs']}: the run already trained {done} epochs ({step} steps)",
                           f"give --epochs {done} or more")

    def lr(cfg: Mapping[str, Any]) -> float:
        total = int(cfg["epochs"]) * iterations
        return warmup_cosine(step, total, float(cfg["lr"]), float(cfg["warmup_fraction"]) * total)

    return [f"schedule changed on --c --allow-schedule-change: {'; '.join(changes)}",
            f"learning-rate and weight-decay schedules recomputed over {int(new['epochs'])} epochs "
            f"({int(new['epochs']) * iterations} steps); at step {step} the learning rate is now {lr(new):.3g} "
            f"(was {lr(old):.3g})"]
