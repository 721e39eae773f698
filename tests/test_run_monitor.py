"""The loop's monitor on a toy model (fast, in-process): probe at epoch 0 and every N, checkpoint_best.pth,
TensorBoard curves, the ETA line; and --estimate's measurement, which writes nothing."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nnunet_hyspark.pretraining.estimate import CostEstimate, cost_lines, measure_cost
from nnunet_hyspark.pretraining.loop import LoopConfig, Pretrainer
from nnunet_hyspark.pretraining.monitor import BEST, RunMonitor
from nnunet_hyspark.pretraining.probe import ProbeConfig, ProbeRunner
from test_probe import _data


class Toy(nn.Module):
    """An 'encoder' (a 1x1x1 conv) trained to reproduce a smoothed copy of its input."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv3d(1, 4, 1)
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return {"loss": ((self.head(torch.relu(self.encoder(x))) - x) ** 2).mean()}


METHOD = SimpleNamespace(validation_loss=lambda m, b, g: m(b)["loss"],
                         preview=lambda m, b, g: {"": {"input": b, "again": b}},
                         export=lambda m, meta, path: (torch.save({"meta": meta}, path), path)[1])


def _batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(2, 1, 16, 16, 16, generator=gen)


def _trainer(out, monitor=None, epochs=3, writes=True) -> Pretrainer:
    cfg = LoopConfig(epochs=epochs, iterations_per_epoch=3, val_iterations=1, lr=1e-2, preview_every=1,
                     save_every=1)
    torch.manual_seed(0)
    return Pretrainer(Toy(), METHOD, cfg, _batches(), _batches(), out, {"method": "toy"}, torch.device("cpu"),
                      progress=False, monitor=monitor, writes=writes)


def test_probe_best_checkpoint_logger_and_eta(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nnunet_hyspark.pretraining.loggers import make_logger

    probe = ProbeRunner(_data(), lambda model, x: [model.encoder(x)], every=2, dataset="toy",
                        cfg=ProbeConfig(steps=5))
    out = tmp_path / "run"
    trainer = _trainer(out, RunMonitor(make_logger("tensorboard", out, {"method": "toy"}), probe))
    trainer.run()
    trainer.monitor.close()
    history = json.loads((out / "progress.json").read_text())
    assert [p["epoch"] for p in history["probe"]] == [0, 2, 3]  # the initial encoder, every 2, the last
    best = history["best"]
    assert best["metric"] == "probe_mean_dice" and best["value"] == max(p["mean_dice"] for p in history["probe"])
    assert torch.load(out / BEST, weights_only=False)["history"]["best"] == best
    assert len(history["weight_decay"]) == 3 and all(s > 0 for s in history["samples_per_s"])
    log = (out / "training_log.txt").read_text()
    assert "ETA from this run's first steps:" in log and "s/step" in log and "probe after 0 epoch(s)" in log
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("probe/mean_dice")] == [0, 2, 3]
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3]
    assert "preview/reconstruction" in events.Tags()["images"]


def test_without_a_probe_the_best_checkpoint_follows_the_validation_loss(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.run()
    history = json.loads((tmp_path / "run" / "progress.json").read_text())
    val = history["val_loss"]
    assert history["best"]["metric"] == "val_loss" and history["best"]["value"] == min(val)
    assert history["best"]["epoch"] == val.index(min(val)) + 1 and (tmp_path / "run" / BEST).is_file()
    assert history["probe"] == []


def test_measure_cost_times_steps_measures_memory_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    trainer = _trainer(out, epochs=4, writes=False)
    estimate = measure_cost(trainer, warmup=1, steps=2)
    assert not out.exists()
    assert estimate.seconds_per_step > 0 and estimate.timed_steps == 2 and estimate.batch_size == 2
    assert estimate.val_seconds is not None and estimate.peak_memory is not None and estimate.memory_limit
    text = "\n".join(cost_lines(estimate))
    assert "s/step" in text and "wall time of 4 epochs x 3 iterations" in text and "peak memory" in text


def test_cost_arithmetic_and_the_largest_batch():
    gb = 1024 ** 3
    e = CostEstimate("cuda:0", world_size=2, batch_size=4, epochs=10, iterations=100, seconds_per_step=0.5,
                     timed_steps=5, val_seconds=2.0, probe_seconds=10.0, probes=3, peak_memory=30 * gb,
                     memory_limit=24 * gb, memory_what="CUDA max_memory_allocated", bytes_per_sample=6 * gb)
    assert e.samples_per_second == 16 and e.total_seconds == 10 * 100 * 0.5 + 10 * 2 + 3 * 10
    assert e.fits is False and e.largest_batch == 2  # fixed 6 GB + 2 x 6 GB <= 0.9 x 24 GB < 6 + 3 x 6
    assert "does NOT fit; the largest batch that fits is about 2 (-b 2)" in "\n".join(cost_lines(e))
