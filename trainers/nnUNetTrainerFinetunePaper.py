"""Fine-tuning with the papers' optimisation protocol instead of this package's, one trainer per method:

    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerHySparKFinetunePaper -p nnUNetHySparKPlans \\
        -pretrained_weights <encoder_weights.pth>
    (nnUNetTrainerMiMFinetunePaper -p nnUNetMiMPlans, nnUNetTrainerHiEndMAEFinetunePaper -p nnUNetHiEndMAEPlans)

Everything but the optimiser is the method's fine-tuning trainer (plans check, load report,
verification, nnU-Net's data, augmentation, loss, deep supervision, gradient clipping and epochs).
What changes, because it changes results: the encoder trains at the full learning rate (ours:
0.1 x), and the peak learning rate, weight decay, betas and the warm-up + cosine shape are the
protocol's (:class:`FinetuneProtocol`). Both protocols and when to use which: ``docs/methods.md``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nnunet_hyspark.optim import decay_groups
from nnunet_hyspark.schedules import WarmupCosineLR
from nnunet_hyspark.trainers.nnUNetTrainerHiEndMAEFinetune import nnUNetTrainerHiEndMAEFinetune
from nnunet_hyspark.trainers.nnUNetTrainerHySparK import ScheduleVariant, short_schedule
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import nnUNetTrainerHySparKFinetune
from nnunet_hyspark.trainers.nnUNetTrainerMiMFinetune import nnUNetTrainerMiMFinetune

__all__ = ["FinetuneProtocol", "PAPER_PROTOCOLS", "PaperProtocol",
           "nnUNetTrainerHySparKFinetunePaper", "nnUNetTrainerHySparKFinetunePaper_test",
           "nnUNetTrainerMiMFinetunePaper", "nnUNetTrainerMiMFinetunePaper_test",
           "nnUNetTrainerHiEndMAEFinetunePaper", "nnUNetTrainerHiEndMAEFinetunePaper_test"]


@dataclass(frozen=True)
class FinetuneProtocol:
    """The optimisation of a fine-tuning protocol: AdamW, linear warm-up, then cosine decay (per epoch)."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_fraction: float  # of the run's epochs (MONAI's BTCV recipe: 50 of 5000 epochs)
    warmup_start_factor: float  # learning rate at epoch 0, as a fraction of the peak
    final_factor: float  # learning rate at the end of the cosine, as a fraction of the peak
    encoder_lr_scale: float = 1.0  # the pre-trained encoder's learning rate relative to the decoder's

    def summary(self) -> str:
        return (f"AdamW lr {self.lr:g} betas {self.betas[0]:g} {self.betas[1]:g}, weight decay {self.weight_decay:g}, "
                f"linear warm-up from {self.warmup_start_factor:g} x over {100 * self.warmup_fraction:g}% of the "
                f"epochs then cosine to {self.final_factor:g} x, encoder at {self.encoder_lr_scale:g} x the lr")


#: The BTCV fine-tuning optimisation of each paper: MONAI's UNETR / Swin-UNETR BTCV recipe (AdamW, lr 1e-4,
#: weight decay 1e-5, torch's default betas, linear warm-up from 0 over 50 of 5000 epochs, cosine to 0),
#: with one learning rate for the whole network. One entry per method, so a method's values can change alone.
_MONAI_BTCV = FinetuneProtocol(lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.999), warmup_fraction=0.01,
                               warmup_start_factor=0.0, final_factor=0.0)
PAPER_PROTOCOLS: dict[str, FinetuneProtocol] = {"hyspark": _MONAI_BTCV, "mim": _MONAI_BTCV, "hiend_mae": _MONAI_BTCV}


class PaperProtocol:
    """Mixin for a fine-tuning trainer: the optimiser and schedule of ``protocol`` instead of ours."""

    protocol: FinetuneProtocol

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.protocol.lr
        self.weight_decay = self.protocol.weight_decay
        self.encoder_lr_scale = self.protocol.encoder_lr_scale

    def protocol_warmup_epochs(self) -> int:
        """Warm-up epochs: the protocol's fraction of this run's epochs (the schedule may shorten the run)."""
        return int(round(self.protocol.warmup_fraction * self.num_epochs))

    def configure_optimizers(self):
        p = self.protocol
        self.warmup_epochs = self.protocol_warmup_epochs()
        groups = decay_groups(self.network, self.weight_decay, self.param_group_of)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=p.betas)
        scheduler = WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs,
                                   start_factor=p.warmup_start_factor, final_factor=p.final_factor)
        return optimizer, scheduler

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"fine-tuning protocol of the paper: {self.protocol.summary()} "
                               f"(peak lr {self.initial_lr:g}, {self.warmup_epochs} warm-up epochs of {self.num_epochs})")


class nnUNetTrainerHySparKFinetunePaper(PaperProtocol, nnUNetTrainerHySparKFinetune):
    """HySparKUNet from ``-pretrained_weights`` with the HySparK paper's fine-tuning optimisation."""

    protocol = PAPER_PROTOCOLS["hyspark"]


class nnUNetTrainerMiMFinetunePaper(PaperProtocol, nnUNetTrainerMiMFinetune):
    """MiMUNet from ``-pretrained_weights`` with the MiM paper's fine-tuning optimisation."""

    protocol = PAPER_PROTOCOLS["mim"]


class nnUNetTrainerHiEndMAEFinetunePaper(PaperProtocol, nnUNetTrainerHiEndMAEFinetune):
    """HiEndUNETR from ``-pretrained_weights`` with the Hi-End-MAE paper's fine-tuning optimisation."""

    protocol = PAPER_PROTOCOLS["hiend_mae"]


# the test suite's schedules: one tiny epoch at the protocol's learning rate (they check loading and wiring)
_TEST = short_schedule(epochs=1, iterations=3, val_iterations=1)


class nnUNetTrainerHySparKFinetunePaper_test(ScheduleVariant, nnUNetTrainerHySparKFinetunePaper):
    schedule = _TEST


class nnUNetTrainerMiMFinetunePaper_test(ScheduleVariant, nnUNetTrainerMiMFinetunePaper):
    schedule = _TEST


class nnUNetTrainerHiEndMAEFinetunePaper_test(ScheduleVariant, nnUNetTrainerHiEndMAEFinetunePaper):
    schedule = _TEST
