"""What a pre-training run will cost, measured on the real model and loader: ``hyspark_pretrain --estimate``.

:func:`measure_cost` runs a few optimiser steps of the run's own :class:`~.loop.Pretrainer` (its
model on its device, its data loader, DDP under torchrun) after a warm-up, and returns a
:class:`CostEstimate`: seconds per step (data loading included), samples per second over all
processes, the wall time of the requested epochs x iterations plus validation and probes, and peak
memory. Memory is measured in one more step at the run's batch and one at twice it, so the largest
batch that fits follows from a line (fixed part + per-sample part): on CUDA
``torch.cuda.max_memory_allocated`` against the device's memory, on the CPU the growth of this
process's resident memory (sampled in a thread) against the RAM available when the measurement
started (data-loading worker processes are not counted).
The real run prints the same estimate, from its own first steps, as its ETA.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

import torch

from nnunet_hyspark.errors import HySparKError

WARMUP_STEPS = 2  # the first steps pay for allocation, autotuning, worker start-up
MEASURED_STEPS = 5
#: memory a run may plan to use: the rest is left for the CUDA context, fragmentation or the system
USABLE_FRACTION = 0.9
GB = 1024 ** 3


@dataclass
class CostEstimate:
    """Measured cost of a run; ``steps_left`` is None for a run not started yet (``--estimate``)."""

    device: str
    world_size: int
    batch_size: int  # per process
    epochs: int
    iterations: int
    seconds_per_step: float
    timed_steps: int
    val_seconds: float | None = None  # one validation pass (per epoch)
    probe_seconds: float | None = None  # one probe
    probes: int = 0  # how many the run does
    steps_left: int | None = None
    peak_memory: float | None = None  # bytes (CUDA: allocated; CPU: growth of resident memory)
    memory_limit: float | None = None  # bytes (CUDA: device memory; CPU: RAM available)
    memory_what: str = ""
    bytes_per_sample: float | None = None  # slope of memory over the batch size

    @property
    def samples_per_second(self) -> float:
        return self.batch_size * self.world_size / self.seconds_per_step

    @property
    def training_seconds(self) -> float:
        steps = self.epochs * self.iterations if self.steps_left is None else self.steps_left
        return steps * self.seconds_per_step

    @property
    def total_seconds(self) -> float:
        return (self.training_seconds + self.epochs * (self.val_seconds or 0.0)
                + self.probes * (self.probe_seconds or 0.0))

    @property
    def fits(self) -> bool | None:
        if self.peak_memory is None or self.memory_limit is None:
            return None
        return self.peak_memory <= USABLE_FRACTION * self.memory_limit

    @property
    def largest_batch(self) -> int | None:
        """The largest batch per process whose memory (by the measured line) stays within the usable part."""
        if self.fits is None or not self.bytes_per_sample or self.bytes_per_sample <= 0:
            return None
        fixed = self.peak_memory - self.bytes_per_sample * self.batch_size
        return max(0, math.floor((USABLE_FRACTION * self.memory_limit - fixed) / self.bytes_per_sample))


def duration(seconds: float) -> str:
    """``1:02:03`` (and ``2 d 1:02:03`` past a day); ``?`` when not known yet."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    text = str(timedelta(seconds=rest))
    return f"{days} d {text}" if days else text


def cost_lines(e: CostEstimate) -> list[str]:
    """The estimate as printed by ``--estimate`` and, as the ETA, at the start of every run."""
    lines = [f"  {e.seconds_per_step:.3f} s/step, {e.samples_per_second:.2f} samples/s ({e.world_size} "
             f"process(es) x batch {e.batch_size}; {e.timed_steps} steps timed after {WARMUP_STEPS} warm-up steps, "
             f"data loading included)"]
    extra = []
    if e.val_seconds is not None:
        extra.append(f"validation {e.val_seconds:.2f} s per epoch")
    if e.probe_seconds is not None:
        extra.append(f"probe {e.probe_seconds:.1f} s x {e.probes}")
    what = (f"{e.epochs} epochs x {e.iterations} iterations" if e.steps_left is None
            else f"the {e.steps_left} steps left of {e.epochs} x {e.iterations}")
    lines.append(f"  wall time of {what}: {duration(e.total_seconds)} (training {duration(e.training_seconds)}"
                 + "".join(f", {x}" for x in extra) + "; checkpoints and previews not included)")
    if e.steps_left is not None:
        lines.append(f"  finishing around {datetime.now() + timedelta(seconds=e.total_seconds):%Y-%m-%d %H:%M}")
    if e.peak_memory is not None:
        line = f"  peak memory {e.peak_memory / GB:.2f} GB ({e.memory_what}"
        if e.memory_limit is not None:
            line += f"; {e.memory_limit / GB:.1f} GB {'device memory' if e.device.startswith('cuda') else 'available'}"
        line += ")"
        line += _fit_text(e)
        lines.append(line)
    return lines


def _fit_text(e: CostEstimate) -> str:
    best = e.largest_batch
    if e.fits is None:
        return ""
    if e.fits:
        return ": fits" + (f" (largest batch that fits: about {best})" if best else "")
    if best is None:  # the per-sample memory could not be measured (twice the batch ran out of memory)
        return f": does NOT fit; try -b {max(1, e.batch_size // 2)}"
    if best == 0:
        return ": does NOT fit even with batch 1: use a smaller --patch-size or a smaller network"
    return f": does NOT fit; the largest batch that fits is about {best} (-b {best})"


# ----------------------------------------------------------------- memory
def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_ram() -> float | None:
    """RAM this process may still take: MemAvailable, or less where a cgroup (container) limit is lower."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit.isdigit():
            avail = min(avail, int(limit) - used)
    except OSError:
        pass
    return float(avail)


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA ``max_memory_allocated``, or resident-memory growth on the CPU
    above ``baseline`` (sampled every millisecond in a thread; torch's kernels release the GIL)."""

    def __init__(self, device: torch.device, baseline: int | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.baseline = baseline
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = _rss_bytes() if self.baseline is None else self.baseline
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes()) - self.baseline


def memory_limit(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), "CUDA max_memory_allocated"
    return available_ram(), "growth of resident memory"


# ----------------------------------------------------------------- measuring
def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _bytes_per_sample(trainer, double: torch.Tensor, peak: float, baseline: int | None) -> float | None:
    """Memory per sample from one step at twice the batch, after the run's batch (the allocator reuses the
    smaller step's freed memory; measured the other way round, retained memory hides the difference). Batch 1
    is avoided: its kernels and workspaces differ, and were measured to take more memory than batch 2."""
    try:
        with PeakMemory(trainer.device, baseline) as large:
            trainer.train_step(double)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return (large.peak - peak) / (double.shape[0] / 2)


def measure_cost(trainer, probe=None, warmup: int = WARMUP_STEPS, steps: int = MEASURED_STEPS) -> CostEstimate:
    """Time ``steps`` training steps of ``trainer`` (a :class:`~.loop.Pretrainer`) after ``warmup`` steps,
    one validation pass and one probe; memory at two batch sizes. Changes the model; writes nothing."""
    device, cfg = trainer.device, trainer.cfg
    limit, what = memory_limit(device)
    first = next(trainer.train_iter)
    batch = first.shape[0]
    baseline = None if device.type == "cuda" else _rss_bytes()  # fixed: one-time allocations count in every peak
    try:
        for _ in range(warmup):
            trainer.train_step(first)
        # timed without the memory sampler: its thread would take CPU time from the steps on a small machine
        times = [_timed(lambda: trainer.train_step(next(trainer.train_iter)), device) for _ in range(steps)]
        with PeakMemory(device, baseline) as real:
            trainer.train_step(first)
    except torch.cuda.OutOfMemoryError:
        raise HySparKError(f"batch {batch} per process does not fit on {device} (out of memory)",
                           f"try --estimate -b {max(1, batch // 2)}") from None
    per_sample = _bytes_per_sample(trainer, torch.cat([first, first]), real.peak, baseline)
    val = _timed(trainer.validate, device) if trainer.val_iter is not None and cfg.val_iterations > 0 else None
    probe_s = _timed(lambda: probe(trainer.model, device), device) if probe is not None else None
    probes = sum(probe.due(e, cfg.epochs) for e in range(cfg.epochs + 1)) if probe is not None else 0
    return CostEstimate(str(device), trainer.dist.world_size, batch, cfg.epochs, cfg.iterations_per_epoch,
                        statistics.median(times), steps, val, probe_s, probes, None, float(real.peak), limit, what,
                        per_sample)


def eta_estimate(trainer, step_seconds: list[float], batch: int) -> CostEstimate:
    """The ETA of a run from its own first timed steps (validation and probes come from the monitor later)."""
    device, cfg = trainer.device, trainer.cfg
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    limit, what = memory_limit(device) if peak is not None else (None, "")
    return CostEstimate(str(device), trainer.dist.world_size, batch, cfg.epochs, cfg.iterations_per_epoch,
                        statistics.median(step_seconds), len(step_seconds), steps_left=cfg.total_steps - trainer.step,
                        peak_memory=peak, memory_limit=limit, memory_what=what)


def estimate_run(data_cfg, dist, make_trainer: Callable, probe=None) -> CostEstimate | None:
    """``--estimate``: the run's loaders, ``make_trainer(train_iter, val_iter, info)`` (its model and loop,
    writing nothing), :func:`measure_cost`; the estimate on rank 0, None on the others."""
    import gc

    from nnunet_hyspark.pretraining.data import build_pretrain_loaders

    train_iter, val_iter, info = build_pretrain_loaders(data_cfg)
    finished = False
    try:
        estimate = measure_cost(make_trainer(train_iter, val_iter, info), probe)
        finished = True
        return estimate if dist.is_main else None
    finally:
        for it in (train_iter, val_iter):
            if it is not None:
                it.close()
        gc.collect()  # the model and DDP's reducer go before the process group
        dist.close(wait_for_peers=finished)
