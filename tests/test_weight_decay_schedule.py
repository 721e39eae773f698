"""The weight-decay schedule reaches every decayed group, also when it starts at 0 (``--weight-decay 0 X``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunet_hyspark.methods import get_method
from nnunet_hyspark.pretraining.loop import LoopConfig, Pretrainer


def _batches():
    while True:
        yield torch.zeros(1, 1, 8, 8, 8)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)
        self.norm = nn.LayerNorm(2)


def test_schedule_from_zero_reaches_decayed_groups_only(tmp_path):
    cfg = LoopConfig(epochs=1, iterations_per_epoch=10, weight_decay_start=0.0, weight_decay_end=0.3)
    trainer = Pretrainer(_Tiny(), get_method("hyspark"), cfg, _batches(), None, tmp_path, {}, torch.device("cpu"),
                         progress=False)
    trainer.step = 10  # the end of the run: the cosine schedule is at its end value
    trainer._apply_schedules()
    by_kind = {g["group"].split("/")[1]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert by_kind["decay"] == pytest.approx(0.3)  # was stuck at 0: only groups already > 0 were updated
    assert by_kind["no_decay"] == 0.0  # biases and norms are never decayed
