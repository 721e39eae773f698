"""Fine-tuning HiEndUNETR (the Hi-End-MAE ViT under a UNETR decoder) through nnU-Net's own command:

    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerHiEndMAEFinetune -p nnUNetHiEndMAEPlans \\
        -pretrained_weights <encoder_weights.pth>

Everything but the network is :class:`nnUNetTrainerHySparKFinetune`'s: the plans check (spacing,
CT normalisation), the load report before nnU-Net's ``load_pretrained_weights``, the verification
after it, AdamW with the encoder at 0.1 x the learning rate. Particular to the ViT: the file must
come from Hi-End-MAE pre-training (HiEndUNETR weights) and its patch embedding must take this
dataset's number of channels (``hyspark_convert_checkpoint IN OUT --in-channels N`` adapts it).
Position embeddings are fixed sin-cos, rebuilt for the plans' token grid (patch / ViT patch).
"""
from __future__ import annotations

from nnunet_hyspark.methods import get_method
from nnunet_hyspark.trainers.nnUNetTrainerHySparK import ScheduleVariant, short_schedule
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import nnUNetTrainerHySparKFinetune

__all__ = ["nnUNetTrainerHiEndMAEFinetune", "nnUNetTrainerHiEndMAEFinetune_test"]

NETWORK = get_method("hiend_mae").network


class nnUNetTrainerHiEndMAEFinetune(nnUNetTrainerHySparKFinetune):
    """Fine-tunes HiEndUNETR from ``-pretrained_weights`` written by ``hyspark_pretrain --method hiend_mae``."""

    def initialize(self):
        if not self.was_initialized:
            name = self.configuration_manager.network_arch_class_name
            if name not in NETWORK.class_names:  # plans of earlier versions name the legacy path
                raise RuntimeError(f"{type(self).__name__} fine-tunes {NETWORK.class_name}, but the plans' "
                                   f"{self.configuration_name} configuration uses {name}: plan with "
                                   f"hyspark_plan_and_preprocess --network hiend_mae and train with -p nnUNetHiEndMAEPlans")
        super().initialize()

    def _check_plans(self, meta: dict) -> None:
        made_for = meta.get("network_class_name")
        if made_for is not None and made_for not in NETWORK.class_names:
            raise RuntimeError(f"the pre-trained weights are for {made_for} (method {meta.get('method')}), not "
                               f"{NETWORK.class_name}: pre-train with hyspark_pretrain --method hiend_mae "
                               f"-p nnUNetHiEndMAEPlans")
        super()._check_plans(meta)

    stem_key = NETWORK.stem_key
    stem_name = NETWORK.stem_name


class nnUNetTrainerHiEndMAEFinetune_test(ScheduleVariant, nnUNetTrainerHiEndMAEFinetune):
    """The test suite's schedule: one tiny epoch."""

    schedule = short_schedule(epochs=1, iterations=3, val_iterations=1, initial_lr=1e-3, warmup_epochs=1)
