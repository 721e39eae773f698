"""Fine-tuning MiMUNet from MiM pre-trained weights, through nnU-Net's own command:

    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerMiMFinetune -p nnUNetMiMPlans \\
        -pretrained_weights <encoder_weights.pth from hyspark_pretrain --method mim>

Everything but the first-conv check is the HySparK fine-tuning trainer's: plans
compatibility (spacing, normalisation), a load report before nnU-Net loads the file,
verification after loading, the pre-trained backbone (``encoder.``) at 0.1 x the
learning rate (the fifth stage and the decoder are not pre-trained and train at the full
rate), optional freezing. Position embeddings are fixed sin-cos, rebuilt for the plan's
patch, so any patch size loads. A file pre-trained on fewer input channels is refused
with the command that adapts it (first conv repeated over the channels).
"""
from __future__ import annotations

from nnunet_hyspark.methods import get_method
from nnunet_hyspark.trainers.nnUNetTrainerHySparK import ScheduleVariant, short_schedule
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import nnUNetTrainerHySparKFinetune

__all__ = ["nnUNetTrainerMiMFinetune", "nnUNetTrainerMiMFinetune_test"]


class nnUNetTrainerMiMFinetune(nnUNetTrainerHySparKFinetune):
    """Fine-tunes MiMUNet (plans ``nnUNetMiMPlans``) from ``-pretrained_weights``."""

    stem_key = get_method("mim").network.stem_key
    stem_name = get_method("mim").network.stem_name


class nnUNetTrainerMiMFinetune_test(ScheduleVariant, nnUNetTrainerMiMFinetune):
    """The test suite's schedule."""

    schedule = short_schedule(epochs=1, iterations=3, val_iterations=1, initial_lr=3e-3, warmup_epochs=1)
