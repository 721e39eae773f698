"""AdamW parameter groups: no weight decay on biases and norm weights (1-D parameters)."""
from __future__ import annotations

from typing import Callable

from torch import nn


def decay_groups(model: nn.Module, weight_decay: float,
                 group_of: Callable[[str], tuple[str, dict]] | None = None) -> list[dict]:
    """Split parameters into decayed (>= 2-D weights) and non-decayed (biases, norms, tokens) groups.

    ``group_of(name) -> (group_name, extra_options)`` optionally splits further, e.g. to give
    the encoder its own ``lr_scale``. Groups are returned in a stable order.
    """
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "token" in name
        key_name, extra = group_of(name) if group_of else ("all", {})
        key = (key_name, no_decay)
        if key not in groups:
            # "decayed" marks the group for weight-decay schedules: its value may start at 0 and still grow
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "decayed": not no_decay,
                           "group": f"{key_name}/{'no_decay' if no_decay else 'decay'}", **extra}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]
