"""The study's trainers (``scripts/study.sh``): nnU-Net's own, HySparK from scratch and HySparK fine-tuned,
all on ONE schedule, so the arms differ only in network and initialisation.

Every arm trains ``STUDY_SCHEDULE`` (epochs x iterations of the plan's batch, the same validation
batches) with its own optimiser as its authors set it: nnU-Net's trainer SGD lr 1e-2 with poly decay,
the HySparK trainers AdamW with warm-up and cosine decay. The fine-tuning arm's encoder trains at the
decoder's learning rate: on a schedule this short a 10x lower rate leaves the encoder where
pre-training put it, which would measure the pre-trained features frozen rather than fine-tuned.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_hyspark.trainers.nnUNetTrainerHySparK import ScheduleVariant, nnUNetTrainerHySparK, short_schedule
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import nnUNetTrainerHySparKFinetune

__all__ = ["nnUNetTrainer_study", "nnUNetTrainerHySparK_study", "nnUNetTrainerHySparKFinetune_study",
           "nnUNetTrainer_smoke", "nnUNetTrainerHySparK_smoke", "nnUNetTrainerHySparKFinetune_smoke"]

#: 8 x 10 = 80 training iterations per fold: nnU-Net's own network takes ~3 s per iteration at the study's
#: patch on 2 CPU cores, so its 6 trainings alone are ~25 minutes; the whole study must stay within an hour
STUDY_SCHEDULE = short_schedule(epochs=8, iterations=10, val_iterations=2)
#: nnU-Net does not seed training; the study fixes it so a rerun gives the same table (with
#: nnUNet_n_proc_DA=0; with augmentation workers the patches still differ between runs)
STUDY_SEED = 0


class nnUNetTrainer_study(ScheduleVariant, nnUNetTrainer):
    """nnU-Net's trainer (network, SGD lr 1e-2, poly decay) on the study's schedule."""

    schedule = STUDY_SCHEDULE
    seed = STUDY_SEED


class nnUNetTrainerHySparK_study(ScheduleVariant, nnUNetTrainerHySparK):
    """HySparK's network from scratch (AdamW lr 1e-3) on the study's schedule."""

    schedule = {**STUDY_SCHEDULE, "initial_lr": 1e-3, "warmup_epochs": 1}
    seed = STUDY_SEED


class nnUNetTrainerHySparKFinetune_study(ScheduleVariant, nnUNetTrainerHySparKFinetune):
    """HySparK's network from ``-pretrained_weights`` (AdamW lr 1e-3, encoder too) on the study's schedule."""

    schedule = {**STUDY_SCHEDULE, "initial_lr": 1e-3, "warmup_epochs": 1, "encoder_lr_scale": 1.0}
    seed = STUDY_SEED


#: ``--smoke``: checks that every stage of the study runs (seconds of training, results meaningless)
SMOKE_SCHEDULE = short_schedule(epochs=1, iterations=3, val_iterations=1)


class nnUNetTrainer_smoke(nnUNetTrainer_study):
    schedule = SMOKE_SCHEDULE


class nnUNetTrainerHySparK_smoke(nnUNetTrainerHySparK_study):
    schedule = {**nnUNetTrainerHySparK_study.schedule, **SMOKE_SCHEDULE}


class nnUNetTrainerHySparKFinetune_smoke(nnUNetTrainerHySparKFinetune_study):
    schedule = {**nnUNetTrainerHySparKFinetune_study.schedule, **SMOKE_SCHEDULE}
