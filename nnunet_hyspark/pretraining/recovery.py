"""Checkpoints a run can recover from, and what to tell the user when it cannot go on.

``checkpoint_latest.pth`` is written atomically, and before each write the one it replaces is kept as
``checkpoint_previous.pth``: a file damaged later (a disk error, a copy cut short) never costs the whole
run. ``--c`` reads only ``checkpoint_latest.pth``; falling back to the older file is the user's decision,
so a damaged file ends the command with the ``mv`` that makes the older one the latest.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.safe_load import load_user_file

LATEST = "checkpoint_latest.pth"
PREVIOUS = "checkpoint_previous.pth"
FINAL = "checkpoint_final.pth"
#: what a resumable pre-training checkpoint holds
CHECKPOINT_KEYS = ("model", "optimizer", "step", "history", "loop_config", "meta")


def keep_previous(latest: Path) -> None:
    """Make the current ``latest`` the ``checkpoint_previous.pth`` beside it, keeping ``latest`` in place
    (a hard link, or a copy where links are not supported) so a kill at any moment leaves both readable."""
    if not latest.is_file():
        return
    previous = latest.with_name(PREVIOUS)
    tmp = latest.with_name(f".{PREVIOUS}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(latest, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(latest, tmp)
    os.replace(tmp, previous)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint loaded with ``weights_only=True`` plus its ``path``; HySparKError if unreadable or foreign."""
    state = load_user_file(path, "checkpoint")
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise HySparKError(f"{path} is not a pre-training checkpoint (expected the entries {', '.join(CHECKPOINT_KEYS)})")
    return {"path": path, **state}


def read_resume_checkpoint(output: Path) -> dict[str, Any]:
    """``--c``: the state of ``output/checkpoint_latest.pth``, or one line saying what exists and what to run."""
    latest = output / LATEST
    if not latest.is_file():
        raise HySparKError(f"--c given but {latest} does not exist", _recovery_hint(output, missing=True))
    try:
        return read_checkpoint(latest)
    except HySparKError as e:
        # torch's own wording for a damaged file talks about weights_only; say what matters instead
        what = e.args[0] if e.args[0].startswith(("refused", f"{latest} is not")) else \
            f"checkpoint {latest} is unreadable (truncated or corrupt)"
        raise HySparKError(f"cannot continue: {what}", _recovery_hint(output)) from None


def _recovery_hint(output: Path, missing: bool = False) -> str:
    previous = output / PREVIOUS
    restart = "or start over: the same command with --force instead of --c (the old run is moved aside)"
    if previous.is_file():
        try:
            step = read_checkpoint(previous)["step"]
        except HySparKError as e:
            return f"the older checkpoint {previous} is unreadable too ({e.args[0]}); start over: the same " \
                   "command with --force instead of --c (the old run is moved aside)"
        return (f"an older good checkpoint exists: {previous} (step {step}); continue from it with "
                f"`mv {previous} {output / LATEST}` and the same command with --c, {restart}")
    if missing:
        return ("this run saved no checkpoint yet: start over with the same command and --force instead of --c"
                if any(output.glob("*")) else "start without --c")
    return f"no older checkpoint exists ({previous} is missing); start over: the same command with --force " \
           "instead of --c (the old run is moved aside)"


def non_finite_hint(last_checkpoint: tuple[Path, int] | None, cfg: Any, batch_is_finite: bool) -> str:
    """What to do after a NaN/inf loss: the real last checkpoint (or that there is none) and the likely
    causes, most likely first (the data only first when this very batch holds NaN/inf voxels)."""
    lower = f"{cfg.lr / 10:.3g}"
    causes = []
    if not batch_is_finite:
        causes.append("this batch holds NaN/inf voxels: check the preprocessed data of your datasets")
    causes.append(f"the learning rate is too high (peak --lr {cfg.lr:g}; try --lr {lower})")
    if cfg.precision != "fp32":
        causes.append(f"{cfg.precision} overflow (try --precision fp32)")
    if batch_is_finite:
        causes.append("NaN/inf voxels in other cases of the data (check the preprocessed data)")
    likely = "likely causes, most likely first: " + "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1))
    if last_checkpoint is None:
        return (f"no checkpoint was saved yet (the first comes after epoch {cfg.save_every}): fix the cause and "
                f"start over with --force; {likely}")
    path, step = last_checkpoint
    return (f"the last checkpoint is {path} (step {step}): fix the cause, then continue from it with --c "
            f"(with a new --lr add --allow-schedule-change) or start over with --force; {likely}")
