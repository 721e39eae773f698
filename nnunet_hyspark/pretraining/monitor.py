"""What a pre-training run reports besides its loss: the probe, ``checkpoint_best.pth``, the logger, the ETA.

:class:`~.loop.Pretrainer` calls the hooks of a :class:`RunMonitor` (``start``, ``epoch_started``,
``after_step``, ``end_of_epoch``, ``preview``, ``close``). History keys it adds (kept in
``progress.json`` and in checkpoints): ``weight_decay`` and ``samples_per_s`` per epoch, ``probe``
(one entry per probe: epochs done, mean Dice, Dice per class, seconds) and ``best`` (the metric
``checkpoint_best.pth`` follows: the probe's mean Dice when there is a probe, else the validation
loss). The probe, the best checkpoint and the logger act on rank 0 only.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Mapping

import numpy as np

from nnunet_hyspark.pretraining.estimate import MEASURED_STEPS, WARMUP_STEPS, cost_lines, duration, eta_estimate
from nnunet_hyspark.pretraining.loggers import NullLogger
from nnunet_hyspark.pretraining.probe import ProbeRunner

BEST = "checkpoint_best.pth"
HISTORY_KEYS = ("weight_decay", "samples_per_s", "probe")


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class RunMonitor:
    """Probe, best checkpoint, experiment logger and ETA of one run (a no-op monitor without arguments)."""

    def __init__(self, logger: NullLogger | None = None, probe: ProbeRunner | None = None):
        self.logger = logger or NullLogger()
        self.probe = probe
        self._step_seconds: list[float] = []  # every step of this session, data loading included
        self._epoch_end_seconds: list[float] = []  # validation, probe, files: from the last step to the next epoch
        self._eta_done = False
        self._last = time.perf_counter()
        self._epoch_samples = 0
        self._epoch_seconds = 0.0

    # ----------------------------------------------------------------- hooks
    def start(self, trainer) -> None:
        """At the start of ``run()`` (after a resume): the initial encoder's probe, once per run."""
        for key in HISTORY_KEYS:
            trainer.history.setdefault(key, [])
        if self.probe is not None:
            trainer.log(f"probe: linear classifier on the frozen encoder's features, {self.probe.dataset} "
                        f"(train {', '.join(self.probe.data.cases['train'])}; test "
                        f"{', '.join(self.probe.data.cases['test'])}), every {self.probe.every} epoch(s)")
            if trainer.step == 0 and not trainer.history["probe"]:
                self._probe(trainer, 0)

    def epoch_started(self, trainer) -> None:
        now = time.perf_counter()
        if self._step_seconds:  # not the first epoch of this session: the previous epoch's end is measured now
            self._epoch_end_seconds.append(now - self._last)
            if len(self._epoch_end_seconds) == 1:
                trainer.log(f"run ETA (steps and epoch ends so far): {duration(self.seconds_left(trainer))} left")
        self._last = now
        self._epoch_samples, self._epoch_seconds = 0, 0.0

    def after_step(self, trainer, batch_size: int) -> str:
        """Record the step's time; log the ETA once the first steps are measured; the whole run's ETA."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self._epoch_samples += batch_size * trainer.dist.world_size
        self._epoch_seconds += dt
        self._step_seconds.append(dt)
        timed = self._step_seconds[WARMUP_STEPS:]
        last_of_epoch = trainer.step % trainer.cfg.iterations_per_epoch == 0
        if not self._eta_done and timed and (len(timed) >= MEASURED_STEPS or last_of_epoch):
            self._eta_done = True
            trainer.log("ETA from this run's first steps:")
            for line in cost_lines(eta_estimate(trainer, timed, batch_size)):
                trainer.log(line)
        return duration(self.seconds_left(trainer))

    def seconds_left(self, trainer) -> float:
        """Remaining steps x the median of the last steps, plus the remaining epoch ends (validation, probe,
        checkpoints) x their mean so far (none measured yet: not counted)."""
        if not self._step_seconds:
            return float("nan")
        c = trainer.cfg
        per_step = statistics.median(self._step_seconds[-50:])
        ends_left = c.epochs - trainer.step // c.iterations_per_epoch  # the current epoch's end included
        if trainer.step and trainer.step % c.iterations_per_epoch == 0:
            ends_left += 1  # its last step is done, its end is still to come
        per_end = statistics.mean(self._epoch_end_seconds) if self._epoch_end_seconds else 0.0
        return (c.total_steps - trainer.step) * per_step + ends_left * per_end

    def end_of_epoch(self, trainer, epoch: int) -> None:
        """After the epoch's losses are in the history, before progress.png / progress.json are written."""
        h = trainer.history
        for key in HISTORY_KEYS:
            h.setdefault(key, [])
        h["weight_decay"].append(trainer.weight_decay_at(trainer.step))
        h["samples_per_s"].append(self._epoch_samples / self._epoch_seconds if self._epoch_seconds else None)
        if not trainer.dist.is_main:
            return
        done = epoch + 1
        if self.probe is not None and self.probe.due(done, trainer.cfg.epochs):
            self._probe(trainer, done)
        self.logger.scalars({"loss/train": h["train_loss"][-1], "loss/val": h["val_loss"][-1], "lr": h["lr"][-1],
                             "weight_decay": h["weight_decay"][-1], "throughput/samples_per_s": h["samples_per_s"][-1],
                             "time/epoch_s": h["epoch_time"][-1]}, step=done)
        if self.probe is None:
            self._update_best(trainer, "val_loss", _finite_or_none(h["val_loss"][-1]), done, lower_is_better=True)

    def preview(self, name: str, rgb: np.ndarray, epoch: int) -> None:
        self.logger.images({f"preview/{name or 'reconstruction'}": rgb}, step=epoch + 1)

    def close(self) -> None:
        self.logger.close()

    # ----------------------------------------------------------------- probe and best
    def _probe(self, trainer, epochs_done: int) -> None:
        t = time.perf_counter()
        result = self.probe(trainer.model, trainer.device)
        entry = {"epoch": epochs_done, "mean_dice": _finite_or_none(result["mean_dice"]),
                 "dice": {k: _finite_or_none(v) for k, v in result["dice"].items()},
                 "seconds": round(time.perf_counter() - t, 2)}
        trainer.history["probe"].append(entry)
        per_class = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in entry["dice"].items())
        mean = f"{entry['mean_dice']:.4f}" if entry["mean_dice"] is not None else "n/a"
        trainer.log(f"probe after {epochs_done} epoch(s): mean Dice {mean} ({per_class}), {entry['seconds']} s")
        self.logger.scalars({"probe/mean_dice": entry["mean_dice"],
                             **{f"probe/dice_{k}": v for k, v in entry["dice"].items()}}, step=epochs_done)
        self._update_best(trainer, "probe_mean_dice", entry["mean_dice"], epochs_done, lower_is_better=False)

    def _update_best(self, trainer, metric: str, value: float | None, epochs_done: int,
                     lower_is_better: bool) -> None:
        """Save ``checkpoint_best.pth`` when ``value`` beats the best so far (ties keep the earlier one)."""
        if value is None:
            return
        best: Mapping[str, Any] | None = trainer.history.get("best")
        if best is not None and best.get("metric") == metric:
            better = value < best["value"] if lower_is_better else value > best["value"]
            if not better:
                return
        trainer.history["best"] = {"metric": metric, "value": value, "epoch": epochs_done}
        path = trainer.save_checkpoint(BEST)
        trainer.log(f"{BEST}: {metric.replace('_', ' ')} {value:.4f} after {epochs_done} epoch(s) -> {path}")
