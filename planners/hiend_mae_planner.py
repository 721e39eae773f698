"""HiEndMAEPlanner: nnU-Net's planner with the Hi-End-MAE ViT + UNETR network in the 3D configurations.

The same rules as :class:`~nnunet_hyspark.planners.hyspark_planner.HySparKPlanner` (nnU-Net's
spacing, normalisation and configurations; aspect-ratio patch clipped to the median shape, shrunk
to a GPU memory target; batch size from the same target and nnU-Net's 5 % rule), with:

* the network ``nnunet_hyspark.methods.hiend_mae.network.HiEndUNETR`` (presets :data:`ARCH_PRESETS`: base,
  large, tiny) and its ViT patch (12 by default, 16 optional) as the patch multiple on every axis;
* at most :data:`MAX_TOKENS` ViT tokens per patch (attention cost grows with their square; the
  paper's 96^3 crops have 512), on top of the memory target;
* ``arch_kwargs['strides']`` = the network's resolution pyramid
  (:func:`nnunet_hyspark.methods.hiend_mae.network.plans_strides`), from which nnU-Net derives its
  deep-supervision scales (1, 1/2, 1/4, 1/12 for patch 12; 1, 1/2, 1/4, 1/8 for 16).

Plans identifier: ``nnUNetHiEndMAEPlans``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_hyspark.methods import get_method
from nnunet_hyspark.methods.hiend_mae.encoder import DEFAULT_VIT_PATCH, VIT_CONFIGS
from nnunet_hyspark.methods.hiend_mae.memory import estimate_training_memory
from nnunet_hyspark.methods.hiend_mae.network import DEFAULT_FEATURE_SIZE, plans_strides
from nnunet_hyspark.planners.hyspark_planner import DEFAULT_GPU_MEMORY_TARGET_GB, HySparKPlanner

PLANS_NAME = "nnUNetHiEndMAEPlans"
VIT_PATCHES = (12, 16)
MAX_TOKENS = 12 ** 3  # e.g. 144^3 voxels at ViT patch 12

#: Fine-tuning network presets: the ViT (see methods.hiend_mae.encoder.VIT_CONFIGS) and the UNETR decoder's feature size.
ARCH_PRESETS: dict[str, dict] = {name: {**cfg, "feature_size": 4 if name == "tiny" else DEFAULT_FEATURE_SIZE}
                                 for name, cfg in VIT_CONFIGS.items()}


class HiEndMAEPlanner(HySparKPlanner):
    """nnU-Net planner writing ``nnUNetHiEndMAEPlans`` with HiEndUNETR in the 3D configurations."""

    arch_presets = ARCH_PRESETS
    patch_multiple = DEFAULT_VIT_PATCH  # the instance's is its ViT patch
    network_class_name = get_method("hiend_mae").network.class_name

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = DEFAULT_GPU_MEMORY_TARGET_GB,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False, arch: str = "base",
                 patch_size: Sequence[int] | None = None, vit_patch: int = DEFAULT_VIT_PATCH,
                 max_tokens: int = MAX_TOKENS):
        if vit_patch not in VIT_PATCHES:
            raise ValueError(f"ViT patch {vit_patch} is not supported; choose one of {list(VIT_PATCHES)}")
        self.patch_multiple = vit_patch  # read by HySparKPlanner.__init__ to validate a fixed patch size
        self.max_tokens = max_tokens
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose, arch, patch_size)
        self.arch_kwargs["vit_patch"] = vit_patch

    def _tokens(self, patch: Sequence[int]) -> int:
        return int(np.prod([p // self.patch_multiple for p in patch]))

    def estimate(self, patch_size: Sequence[int], batch_size: int):
        return estimate_training_memory(patch_size, batch_size, self._num_input_channels(), self._num_classes(),
                                        **self.arch_kwargs)

    def shrink_to_fit(self, patch: list[int], median_shape: Sequence[float]) -> list[int]:
        """First at most ``max_tokens`` tokens, then the memory target (both with nnU-Net's shrinking rule)."""
        patch = list(patch)
        m = self.patch_multiple
        while self._tokens(patch) > self.max_tokens:
            ratios = [p / max(s, 1) if p > m else -np.inf for p, s in zip(patch, median_shape)]
            patch[int(np.argmax(ratios))] -= m
        return super().shrink_to_fit(patch, median_shape)

    def batch_size_for(self, patch: Sequence[int], approximate_n_voxels_dataset: float) -> int:
        """Largest batch size that fits the target, capped by nnU-Net's 5 % rule, at least 2."""
        fits = 1
        while self.estimate(patch, fits + 1).total_gb <= self.UNet_vram_target_GB and fits < 1024:
            fits += 1
        return self.cap_batch_size(fits, patch, approximate_n_voxels_dataset)

    @property
    def deep_supervision_strides(self) -> list[list[int]]:
        """The UNETR pyramid depends on the ViT patch (x1, x3, x2, x2 for 12), so it is per instance."""
        return plans_strides(self.patch_multiple)

    def check_volumes(self) -> None:
        super().check_volumes()
        if self.fixed_patch_size is not None and self._tokens(self.fixed_patch_size) > self.max_tokens:
            self._note(f"warning: patch size {self.fixed_patch_size} has {self._tokens(self.fixed_patch_size)} ViT "
                       f"tokens, more than the planner's limit of {self.max_tokens}")


__all__ = ["HiEndMAEPlanner", "PLANS_NAME", "ARCH_PRESETS", "VIT_PATCHES", "MAX_TOKENS"]
