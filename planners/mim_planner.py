"""MiMPlanner: nnU-Net's planner with MiMUNet (the MiM backbone + Swin-UNETR-style decoder) in the 3D configurations.

The same rules as :class:`~nnunet_hyspark.planners.hyspark_planner.HySparKPlanner` (nnU-Net's
spacing, normalisation and configurations; aspect-ratio patch clipped to the median shape,
shrunk to a GPU memory target; batch size from the same target and nnU-Net's 5 % rule), with:

* the network ``nnunet_hyspark.methods.mim.network.MiMUNet`` (presets :data:`ARCH_PRESETS`: base =
  the paper's, tiny = CPU demos and tests) and its memory estimate;
* patch axes multiples of **32**: the fine-tuning network's fifth stage downsamples to 1/32,
  and MiM pre-training splits the 1/16 token grid of a level patch into halves per axis;
* ``arch_kwargs['strides']`` = ``[[1,1,1]] + [[2,2,2]] * 5``, from which nnU-Net derives its
  deep-supervision scales (1, 1/2, 1/4, 1/8, 1/16).

Plans identifier: ``nnUNetMiMPlans``. Pre-training (``hyspark_pretrain --method mim -p
nnUNetMiMPlans``) reads crops of twice the planned patch per axis.
"""
from __future__ import annotations

from typing import Sequence


from nnunet_hyspark.methods import get_method
from nnunet_hyspark.methods.mim import memory
from nnunet_hyspark.methods.mim.levels import LEVEL_MULTIPLE
from nnunet_hyspark.methods.mim.network import strides_for
from nnunet_hyspark.planners.hyspark_planner import DEFAULT_GPU_MEMORY_TARGET_GB, HySparKPlanner

PLANS_NAME = "nnUNetMiMPlans"

#: Fine-tuning network presets (MiMUNet keyword arguments). ``base`` is the paper's network.
ARCH_PRESETS: dict[str, dict] = {
    "base": {"widths": [48, 96, 192, 384], "conv_depths": [2, 2, 2], "vit_depth": 11, "vit_heads": 12,
             "vit_mlp_ratio": 4.0, "fifth_stage": True, "fifth_width": 768, "feature_size": 48},
    "tiny": {"widths": [8, 8, 16, 24], "conv_depths": [1, 1, 1], "vit_depth": 1, "vit_heads": 2,
             "vit_mlp_ratio": 2.0, "fifth_stage": True, "fifth_width": 32, "feature_size": 8},
}


class MiMPlanner(HySparKPlanner):
    """nnU-Net planner writing ``nnUNetMiMPlans`` with MiMUNet in the 3D configurations."""

    arch_presets = ARCH_PRESETS
    patch_multiple = LEVEL_MULTIPLE  # 32
    network_class_name = get_method("mim").network.class_name
    deep_supervision_strides = strides_for(fifth_stage=True)

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = DEFAULT_GPU_MEMORY_TARGET_GB,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False, arch: str = "base",
                 patch_size: Sequence[int] | None = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose, arch, patch_size)

    def estimate(self, patch_size: Sequence[int], batch_size: int):
        return memory.estimate_training_memory(patch_size, batch_size, self._num_input_channels(),
                                                 self._num_classes(), **self.arch_kwargs)

    def batch_size_for(self, patch: Sequence[int], approximate_n_voxels_dataset: float) -> int:
        """Largest batch size that fits the target, capped by nnU-Net's 5 % rule, at least 2."""
        fits = memory.max_batch_size(patch, self.UNet_vram_target_GB, input_channels=self._num_input_channels(),
                                       num_classes=self._num_classes(), **self.arch_kwargs)
        return self.cap_batch_size(fits, patch, approximate_n_voxels_dataset)
