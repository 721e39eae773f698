"""Range checks of every numeric ``hyspark_pretrain`` option, run before any data or model is built.

Without them ``--save-every 0`` crashed with ZeroDivisionError after a whole epoch of training, and a
negative learning rate trained silently. All problems are reported at once, in one line.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from nnunet_hyspark.errors import HySparKError

# option -> (attribute of PretrainOptions, test, the allowed range as the message shows it)
_Rule = tuple[str, Callable[[Any], bool], str]
RULES: dict[str, _Rule] = {
    "--epochs": ("epochs", lambda v: v >= 1, "an integer >= 1"),
    "--iterations": ("iterations", lambda v: v >= 1, "an integer >= 1"),
    "--val-iterations": ("val_iterations", lambda v: v >= 0, "an integer >= 0 (0: no validation)"),
    "--save-every": ("save_every", lambda v: v >= 1, "an integer >= 1 (epochs)"),
    "--preview-every": ("preview_every", lambda v: v >= 1, "an integer >= 1 (epochs)"),
    "-b/--batch-size": ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    "--num-workers": ("num_workers", lambda v: v >= 0, "an integer >= 0"),
    "--decoder-width": ("decoder_width", lambda v: v >= 1, "an integer >= 1"),
    "--patch-size": ("patch_size", lambda v: all(p >= 1 for p in v), "three integers >= 1"),
    "--lr": ("lr", lambda v: v > 0, "a number > 0"),
    "--mask-ratio": ("mask_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    "--warmup-fraction": ("warmup_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "--weight-decay": ("weight_decay", lambda v: all(w >= 0 for w in v), "two numbers >= 0 (START END)"),
    "--betas": ("betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "--clip-grad": ("clip_grad", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "--val-fraction": ("val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    "--probe-every": ("probe_every", lambda v: v >= 1, "an integer >= 1 (epochs)"),
}


def _finite(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else (value,)
    return all(not isinstance(v, float) or math.isfinite(v) for v in values)


def option_problems(opts: Any) -> list[str]:
    """``--save-every 0 (must be an integer >= 1)`` for each option out of range; options left out (None) pass."""
    problems = []
    for flag, (attr, ok, allowed) in RULES.items():
        value = getattr(opts, attr, None)
        if value is None:
            continue
        if not _finite(value) or not ok(value):
            shown = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            problems.append(f"{flag} {shown} (must be {allowed})")
    return problems


def validate_options(opts: Any) -> None:
    """Raise one HySparKError listing every option out of range."""
    problems = option_problems(opts)
    if problems:
        raise HySparKError("invalid option" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems),
                           "fix the value" + ("s" if len(problems) > 1 else "") + " (hyspark_pretrain --help)")
