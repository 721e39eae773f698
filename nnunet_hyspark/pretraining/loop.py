"""The pre-training loop shared by every method: schedules, precision, checkpoints, previews, resume.

A method is any ``nn.Module`` whose ``forward(batch)`` returns a dict with ``loss``;
what to preview and what to export come from its :class:`nnunet_hyspark.methods.MethodSpec`.
Only rank 0 writes files; every write is atomic.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save, atomic_torch_save
from nnunet_hyspark.optim import decay_groups
from nnunet_hyspark.pretraining.distributed import DistContext
from nnunet_hyspark.pretraining.monitor import RunMonitor
from nnunet_hyspark.pretraining.recovery import LATEST, keep_previous, non_finite_hint
from nnunet_hyspark.pretraining.reporting import TrainingLog, plot_progress, save_preview
# RNG states as tensors and plain values, so checkpoints load with weights_only=True
from nnunet_hyspark.safe_load import load_user_file, rng_state, set_rng_state
from nnunet_hyspark.schedules import cosine_between, warmup_cosine


@dataclass
class LoopConfig:
    """Schedule and bookkeeping. Defaults are the HySparK reference recipe."""

    epochs: int = 100
    iterations_per_epoch: int = 250
    val_iterations: int = 10
    lr: float = 1e-4
    warmup_fraction: float = 0.4
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 5.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA only, with a gradient scaler)
    preview_every: int = 10
    save_every: int = 5
    seed: int = 0
    no_decay_on_1d: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iterations_per_epoch


#: the mask ratio of a method whose recipe sets none (HySparK's and Hi-End-MAE's 0.75)
DEFAULT_MASK_RATIO = 0.75


def recipe_defaults() -> dict[str, Any]:
    """The optimisation values a method's recipe starts from, keyed like ``MethodSpec.recipe``: the
    defaults of :class:`LoopConfig` (the one place they are defined) and :data:`DEFAULT_MASK_RATIO`."""
    c = LoopConfig()
    return {"lr": c.lr, "betas": tuple(c.betas), "weight_decay": (c.weight_decay_start, c.weight_decay_end),
            "warmup_fraction": c.warmup_fraction, "clip_grad": c.clip_grad, "mask_ratio": DEFAULT_MASK_RATIO}


class NonFiniteLoss(HySparKError):
    pass


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


class Pretrainer:
    """Runs one pre-training job into ``output_dir``; ``run()`` returns the exported weights path."""

    def __init__(self, model: nn.Module, method, cfg: LoopConfig, train_iter: Iterator[torch.Tensor],
                 val_iter: Iterator[torch.Tensor] | None, output_dir: str | os.PathLike, meta: dict[str, Any],
                 device: torch.device, dist: DistContext | None = None, progress: bool = True,
                 monitor: RunMonitor | None = None, writes: bool = True):
        """``monitor``: probe, best checkpoint, logger, ETA (:mod:`.monitor`); ``writes=False`` (``--estimate``):
        no log file, no output folder."""
        self.cfg = cfg
        self.monitor = monitor or RunMonitor()
        self.method = method
        self.device = device
        self.dist = dist or DistContext()
        self.output_dir = Path(output_dir)
        self.meta = meta
        self.progress = progress and self.dist.is_main
        self.model = model.to(device)
        self.train_model = self.dist.wrap(self.model, device)
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, cfg.weight_decay_start) if cfg.no_decay_on_1d else
            [{"params": list(self.model.parameters()), "weight_decay": cfg.weight_decay_start}],
            lr=cfg.lr, betas=cfg.betas)
        if cfg.precision == "fp16" and device.type != "cuda":
            raise HySparKError("fp16 needs CUDA", "use --precision bf16 on the CPU (AMX-capable CPUs run it fast)")
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.train_iter = train_iter
        self.val_iter = val_iter
        self.step = 0
        self.history: dict[str, list] = {"train_loss": [], "val_loss": [], "lr": [], "epoch_time": []}
        self.epoch_losses: list[float] = []  # of the epoch in progress (kept across an interruption)
        self.log = TrainingLog(self.output_dir, enabled=self.dist.is_main and writes)
        self._preview_batch: torch.Tensor | None = None
        self.last_checkpoint: tuple[Path, int] | None = None  # (checkpoint_latest.pth, its step), for messages
        if self.dist.is_main and writes:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, c.total_steps, c.lr, c.warmup_fraction * c.total_steps)

    def weight_decay_at(self, step: int) -> float:
        c = self.cfg
        return cosine_between(step, c.total_steps, c.weight_decay_start, c.weight_decay_end)

    def _apply_schedules(self) -> float:
        lr, wd = self.lr_at(self.step), self.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("decayed", True):  # not "> 0": a schedule starting at 0 must still be applied
                group["weight_decay"] = wd
        return lr

    # ----------------------------------------------------------------- one step
    def train_step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One optimiser step; returns (learning rate, loss averaged over ranks)."""
        lr = self._apply_schedules()
        self.train_model.train()
        with autocast_context(self.cfg.precision, self.device):
            loss = self.train_model(batch.to(self.device, non_blocking=True))["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"the loss became {loss.item()} at step {self.step} (epoch {self.step // self.cfg.iterations_per_epoch})",
                non_finite_hint(self.last_checkpoint, self.cfg, batch_is_finite=bool(torch.isfinite(batch).all())))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        return lr, self.dist.mean(loss.detach().float()).item()

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.val_iter is None or self.cfg.val_iterations <= 0:
            return None
        self.train_model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)  # the same masks every epoch
        losses = []
        for i in range(self.cfg.val_iterations):
            batch = next(self.val_iter).to(self.device)
            if i == 0 and self._preview_batch is None:
                self._preview_batch = batch[:1].clone()
            with autocast_context(self.cfg.precision, self.device):
                losses.append(self.method.validation_loss(self.model, batch, gen).float())
        return self.dist.mean(torch.stack(losses).mean()).item()

    # ----------------------------------------------------------------- files
    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "step": self.step,
                "history": self.history, "epoch_losses": self.epoch_losses, "rng": rng_state(), "loop_config": asdict(self.cfg), "meta": self.meta}

    def save_checkpoint(self, name: str = LATEST) -> Path | None:
        path = self.output_dir / name
        if name == LATEST:  # every rank knows it, for the NaN message
            self.last_checkpoint = (path, self.step)
        if not self.dist.is_main:
            return None
        if name == LATEST:
            keep_previous(path)  # one corrupt file must never cost the run
        atomic_torch_save(self.checkpoint_state(), path)
        return path

    def load_checkpoint(self, path: str | os.PathLike | dict[str, Any]) -> None:
        """Resume from a checkpoint file or from its already loaded state (``{"path": ..., **state}``)."""
        state = path if isinstance(path, dict) else {"path": path, **load_user_file(path, "checkpoint")}
        path = Path(state["path"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.history = state["history"]
        self.epoch_losses = state.get("epoch_losses", [])
        set_rng_state(state["rng"])
        if path.name == LATEST:
            self.last_checkpoint = (path, self.step)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.step // self.cfg.iterations_per_epoch})")

    def _save_and_stop(self, why: str = "interrupted") -> None:
        path = self.save_checkpoint()
        self.log(f"{why} at step {self.step}: saved {path}; continue with --c")
        raise KeyboardInterrupt

    def _end_of_epoch(self, epoch: int, train_losses: list[float], lr: float, t0: float) -> None:
        val = self.validate()
        self.history["train_loss"].append(float(np.mean(train_losses)))
        self.history["val_loss"].append(val)
        self.history["lr"].append(lr)
        self.history["epoch_time"].append(time.time() - t0)
        val_txt = f"{val:.4f}" if val is not None else "n/a"
        self.log(f"epoch {epoch}: train loss {self.history['train_loss'][-1]:.4f}, val loss {val_txt}, "
                 f"lr {lr:.3g}, {self.history['epoch_time'][-1]:.1f} s")
        self.monitor.end_of_epoch(self, epoch)  # probe, best checkpoint, logger: before the files below
        if not self.dist.is_main:
            return
        plot_progress(self.history, self.output_dir / "progress.png")
        atomic_json_save(self.history, self.output_dir / "progress.json")
        last = epoch == self.cfg.epochs - 1
        if (epoch + 1) % self.cfg.save_every == 0 or last:
            self.save_checkpoint()
        if (epoch + 1) % self.cfg.preview_every == 0 or last or epoch == 0:
            self.write_preview(epoch)

    def write_preview(self, epoch: int) -> None:
        batch = self._preview_batch if self._preview_batch is not None else next(self.train_iter)[:1].to(self.device)
        gen = torch.Generator().manual_seed(self.cfg.seed + 54321)
        self.model.eval()
        with torch.no_grad(), autocast_context(self.cfg.precision, self.device):
            panels = self.method.preview(self.model, batch, gen)
        for name, images in panels.items():
            suffix = f"_{name}" if name else ""
            rgb = save_preview(images, self.output_dir / "previews" / f"epoch_{epoch + 1:04d}{suffix}.png",
                               title=f"epoch {epoch + 1}{' ' + name if name else ''}")
            self.monitor.preview(name, rgb, epoch)

    def _stop_requested(self, interrupted: "_InterruptFlag") -> bool:
        requested = _stop_requested_any_rank(self.dist, interrupted.requested, self.device)
        if requested and not interrupted.requested:
            interrupted.requested, interrupted.reason = True, "interrupted (signal on another rank)"
        return requested

    # ----------------------------------------------------------------- run
    def run(self, resume_from: str | os.PathLike | dict[str, Any] | None = None) -> Path | None:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        c = self.cfg
        self.log(f"pre-training {self.meta.get('method')} for {c.epochs} epochs x {c.iterations_per_epoch} iterations, "
                 f"precision {c.precision}, device {self.device}, world size {self.dist.world_size}"
                 + (f", sparse backend {self.meta['sparse_backend']}" if "sparse_backend" in self.meta else ""))
        self.monitor.start(self)  # the initial encoder's probe
        interrupted = _InterruptFlag()
        with interrupted:
            start_epoch = self.step // c.iterations_per_epoch
            for epoch in range(start_epoch, c.epochs):
                t0 = time.time()
                self.monitor.epoch_started(self)
                lr = self.lr_at(self.step)
                first = self.step - epoch * c.iterations_per_epoch
                bar = _progress_bar(range(first, c.iterations_per_epoch), epoch, c.epochs, self.progress)
                for i in bar:
                    batch = next(self.train_iter)
                    lr, loss = self.train_step(batch)
                    run_eta = self.monitor.after_step(self, batch.shape[0])  # logs the ETA after the first steps
                    self.epoch_losses.append(loss)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", run_eta=run_eta)
                    if self._stop_requested(interrupted) and i < c.iterations_per_epoch - 1:
                        self._save_and_stop(interrupted.reason)
                self._end_of_epoch(epoch, self.epoch_losses, lr, t0)
                self.epoch_losses = []
                if self._stop_requested(interrupted):
                    self._save_and_stop(interrupted.reason)
        if not self.dist.is_main:
            return None
        self.save_checkpoint("checkpoint_final.pth")
        meta = {**self.meta, "steps": self.step, "final_train_loss": self.history["train_loss"][-1],
                "final_val_loss": self.history["val_loss"][-1],
                # summed epoch times (across resumes): the benchmark's cost table reads it from the sidecar
                "pretraining_seconds": round(float(sum(self.history["epoch_time"])), 1)}
        weights = self.method.export(self.model, meta, self.output_dir / "encoder_weights.pth")
        self.log(f"done. encoder weights for nnUNetv2_train -pretrained_weights: {weights}")
        return weights


def _stop_requested_any_rank(dist: DistContext, requested: bool, device: torch.device) -> bool:
    """True on every rank when any rank got a stop signal (a scheduler may signal only some of them),
    so all ranks save and leave at the same step instead of waiting on each other."""
    if not dist.enabled:
        return requested
    import torch.distributed as tdist

    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _progress_bar(iterable, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


#: what schedulers send before killing a job (SLURM: SIGTERM at the time limit or on pre-emption,
#: SIGUSR1 when asked with --signal) and Ctrl-C: each finishes the step, saves and stops
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class _InterruptFlag:
    """Turns the stop signals into a flag checked between steps, so a checkpoint is never written mid-step."""

    def __init__(self):
        self.requested = False
        self.reason = "interrupted"
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True
        self.reason = f"interrupted by {signal.Signals(signum).name}"

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals_interrupt():
    """Outside the loop (data loading, model building, export) a stop signal ends the run like Ctrl-C
    (KeyboardInterrupt), so ``finally`` blocks run and the run lock is released instead of left stale."""
    previous = {}
    for sig in STOP_SIGNALS:
        if sig == signal.SIGINT:
            continue  # Python already raises KeyboardInterrupt for it
        try:
            previous[sig] = signal.signal(sig, _raise_interrupt)
        except ValueError:  # not in the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
