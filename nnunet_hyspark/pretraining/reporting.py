"""What a person looks at during pre-training: the log file, progress.png and reconstruction previews."""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from nnunet_hyspark.io import atomic_path


class TrainingLog:
    """Appends timestamped lines to ``training_log.txt`` and echoes them (rank 0 only)."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True, echo: bool = True):
        self.path = Path(folder) / "training_log.txt"
        self.enabled = enabled
        self.echo = echo

    def __call__(self, *parts: object) -> None:
        if not self.enabled:
            return
        line = " ".join(str(p) for p in parts)
        with open(self.path, "a") as f:
            f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S}: {line}\n")
        if self.echo:
            from tqdm import tqdm

            tqdm.write(line)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_progress(history: Mapping[str, Sequence], path: str | os.PathLike) -> None:
    """Train/validation loss per epoch (top) and learning rate (bottom); with a probe, its Dice beside the loss."""
    plt = _pyplot()
    probe = history.get("probe") or []
    if probe:
        fig, axes = plt.subplots(2, 2, figsize=(13, 6), sharex=True)
        (ax_loss, ax_probe), (ax_lr, ax_wd) = axes
        _plot_probe(ax_probe, probe)
        _plot_weight_decay(ax_wd, history)
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    ax_loss.plot(epochs, history["train_loss"], "b-o", ms=3, label="train loss")
    val = [v if v is not None else np.nan for v in history.get("val_loss", [])]
    if val and not all(np.isnan(val)):
        ax_loss.plot(epochs[:len(val)], val, "r-o", ms=3, label="validation loss")
    ax_loss.set_ylabel("masked reconstruction loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(epochs, history["lr"], "g-")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_probe(ax, probe: Sequence[Mapping]) -> None:
    """Mean and per-class Dice of the linear probe over epochs (epoch 0: the initial encoder)."""
    x = [p["epoch"] for p in probe]
    nan = float("nan")
    ax.plot(x, [p["mean_dice"] if p["mean_dice"] is not None else nan for p in probe], "k-o", ms=4, label="mean")
    for name in probe[-1]["dice"]:
        y = [p["dice"].get(name) for p in probe]
        ax.plot(x, [v if v is not None else nan for v in y], "-", alpha=0.5, lw=1, label=name)
    ax.set_ylabel("linear probe Dice (test cases)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _plot_weight_decay(ax, history: Mapping[str, Sequence]) -> None:
    wd = history.get("weight_decay") or []
    ax.plot(np.arange(1, len(wd) + 1), wd, "m-")
    ax.set_ylabel("weight decay")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Three orthogonal slices through the centre of a (X, Y, Z) volume."""
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[x, :, :], volume[:, y, :], volume[:, :, z]]


def save_preview(images: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "") -> np.ndarray:
    """One row per image (e.g. input / masked / reconstruction), three orthogonal slices each.

    Each ``images[name]`` is a (B, C, X, Y, Z) batch or a (C, X, Y, Z) volume; sample 0 and
    channel 0 are shown, and all rows share the intensity window of the first row. NaN voxels
    (masked ones) are drawn in blue. Returns the figure as an RGB array (H, W, 3) for experiment loggers.
    """
    plt = _pyplot()
    names = list(images)
    vols = [images[n].detach().float().cpu().reshape(-1, *images[n].shape[-3:])[0].numpy() for n in names]
    lo, hi = np.nanpercentile(vols[0], [1, 99])
    cmap = plt.get_cmap("gray").with_extremes(bad="tab:blue")  # NaN marks masked voxels (masking.hide)
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)), squeeze=False)
    for r, (name, vol) in enumerate(zip(names, vols)):
        for c, sl in enumerate(_central_slices(vol)):
            ax = axes[r][c]
            ax.imshow(np.rot90(sl), cmap=cmap, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    fig.set_dpi(80)  # the logged image at the file's resolution
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
