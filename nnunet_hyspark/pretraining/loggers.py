"""Experiment loggers for pre-training curves and previews: TensorBoard, Weights & Biases, or none.

``hyspark_pretrain --logger tensorboard|wandb|none``. Both packages are optional extras
(``pip install "nnunet-hyspark[tensorboard]"`` / ``"[wandb]"``); a missing one is a one-line
error before anything is built. W&B follows nnU-Net's own variables so pre-training and
fine-tuning land in one project: ``nnUNet_wandb_project`` (default ``nnunet``) and
``nnUNet_wandb_mode`` (``online``/``offline``; default ``online``). ``--logger wandb`` is
the explicit switch; ``nnUNet_wandb_enabled=1`` with no ``--logger`` given turns it on
too, as it does for ``nnUNetv2_train``. Only rank 0 logs.
"""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nnunet_hyspark.errors import HySparKError

LOGGERS = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve_logger_name(requested: str | None) -> str:
    """``None`` (not given): W&B when nnU-Net's switch is on, else none; a missing package is an error."""
    name = requested or ("wandb" if os.environ.get("nnUNet_wandb_enabled", "0").lower() in ("1", "true") else "none")
    if name not in LOGGERS:
        raise HySparKError(f"--logger {name}: unknown", f"choose one of {', '.join(LOGGERS)}")
    package = _PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise HySparKError(f"--logger {name} needs the '{package}' package, which is not installed",
                           f"pip install \"nnunet-hyspark[{name}]\" (or pip install {package})")
    return name


class NullLogger:
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Event files under ``<output>/tensorboard``: ``tensorboard --logdir <output>``."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()), 0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(NullLogger):
    """A W&B run in nnU-Net's project (``nnUNet_wandb_project``), resumed with the pre-training run."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any], run_name: str):
        import wandb

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        run_id_file = Path(output_dir) / "wandb_run_id.txt"  # --c continues the same W&B run
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
        self.run = wandb.init(project=os.environ.get("nnUNet_wandb_project", "nnunet"),
                              mode=os.environ.get("nnUNet_wandb_mode", "online"), dir=str(output_dir),
                              id=run_id, resume="allow", name=run_name, config=dict(config))
        run_id_file.write_text(run_id)
        self._wandb = wandb

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        self.run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(name: str, output_dir: str | os.PathLike, config: Mapping[str, Any], run_name: str = "pretrain",
                enabled: bool = True) -> NullLogger:
    """The logger for an already resolved name (:func:`resolve_logger_name`); a no-op on ranks > 0."""
    if not enabled or name == "none":
        return NullLogger()
    if name == "tensorboard":
        return TensorBoardLogger(Path(output_dir), config)
    return WandbLogger(Path(output_dir), config, run_name)
