"""Learning-rate and weight-decay schedules shared by pre-training and the nnU-Net trainers.

Each schedule is a pure function of the step, so resuming needs only the step count.
Parameter groups may carry an ``lr_scale`` (e.g. a pre-trained encoder trained slower).
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler


def cosine_between(step: float, total: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total`` (clamped beyond)."""
    t = min(max(step / max(total, 1e-12), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: float, total: float, peak: float, warmup: float,
                  start_factor: float = 0.005, final_factor: float = 0.001) -> float:
    """Linear warm-up from ``start_factor * peak`` over ``warmup`` steps, then cosine to ``final_factor * peak``.

    The defaults are the HySparK reference recipe (0.5% of peak -> peak -> 0.1% of peak).
    """
    if warmup > 0 and step < warmup:
        return peak * (start_factor + (1.0 - start_factor) * step / warmup)
    return cosine_between(step - warmup, total - warmup, peak, final_factor * peak)


class WarmupCosineLR(_LRScheduler):
    """nnU-Net-style scheduler (``step(epoch)`` sets the lr) with warm-up and cosine decay.

    Honours a per-group ``lr_scale``; a group whose ``frozen_until`` is larger than the
    current step gets lr 0 (a frozen encoder that still takes part in DDP's all-reduce).
    """

    def __init__(self, optimizer: Optimizer, peak_lr: float, total_steps: int, warmup_steps: int,
                 start_factor: float = 0.01, final_factor: float = 0.001):
        self.peak_lr = peak_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor
        self.final_factor = final_factor
        self.ctr = 0
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.peak_lr, self.warmup_steps, self.start_factor,
                             self.final_factor)

    def step(self, current_step: int | None = None) -> None:  # noqa: D102 (nnU-Net calls step(epoch))
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            frozen = current_step < group.get("frozen_until", 0)
            group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr
