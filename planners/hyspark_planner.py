"""HySparKPlanner: nnU-Net's experiment planner with the hybrid CNN/ViT network in the 3D configurations.

Everything nnU-Net decides about the data stays nnU-Net's: target spacing,
transpose, normalisation, resampling, which configurations exist (3d_lowres only
where nnU-Net would create one). What changes, for 3d_fullres and 3d_lowres:

* the architecture is ``nnunet_hyspark.methods.hyspark.network.HySparKUNet`` (base or tiny
  preset, see :data:`ARCH_PRESETS`);
* the patch size is a multiple of 16 on every axis (the hybrid encoder
  downsamples by 16 before the ViT): nnU-Net's aspect-ratio initial patch (the
  volume of 256^3, shaped like 1/spacing), each axis rounded down to a multiple
  of 16, clipped to the median shape rounded up to a multiple of 16, at least 16;
  then, while the memory estimate (:mod:`nnunet_hyspark.methods.hyspark.memory`) for batch size
  2 exceeds the GPU memory target, the axis that is largest relative to the
  median shape shrinks by 16 (nnU-Net's rule, with the hybrid's step);
* the batch size is the largest that fits the target (at least 2), capped by
  nnU-Net's rule that one batch covers at most 5 % of the dataset's voxels;
* ``arch_kwargs['strides']`` is ``[[1,1,1],[2,2,2]x4]``: nnU-Net's trainer reads
  its deep-supervision scales (1, 1/2, 1/4, 1/8) from these
  (``ConfigurationManager.pool_op_kernel_sizes``), matching the network's four outputs.

Before planning, data whose median image is thinner than 8 voxels on an axis
(2D-like) is refused, a median below 16 gives a warning (nnU-Net pads), and a
fixed ``patch_size`` larger than every volume on an axis is refused.

The 2d configuration keeps nnU-Net's plain 2D U-Net (and nnU-Net's own memory
heuristic, scaled to the same GPU memory target): the hybrid network is 3D only.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.patch_rules import check_patch_multiple
from nnunet_hyspark.methods import get_method
from nnunet_hyspark.methods.hyspark.memory import estimate_training_memory, max_batch_size

PLANS_NAME = "nnUNetHySparKPlans"
NETWORK_CLASS_NAME = get_method("hyspark").network.class_name
PATCH_MULTIPLE = 16
DEEP_SUPERVISION_STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
MIN_MEDIAN_EXTENT = 8  # refuse data whose median image is thinner (patches would be mostly padding)
DEFAULT_GPU_MEMORY_TARGET_GB = 24.0  # nnU-Net's ResEnc-L preset target; a 24 GB card or an A100/H100 with headroom

#: Network size presets. ``base`` is HySparK's published network; ``tiny`` is for CPU demos and tests.
ARCH_PRESETS: dict[str, dict] = {
    "base": {"widths": [32, 64, 128, 256, 384], "depths": [1, 1, 3, 3, 1], "expansions": [2, 4, 4, 4, 2],
             "vit_depth": 3, "vit_heads": 12},
    "tiny": {"widths": [8, 16, 16, 24, 24], "depths": [1, 1, 1, 1, 1], "expansions": [2, 2, 2, 2, 2],
             "vit_depth": 1, "vit_heads": 2},
}


def _ceil_to(x: float, m: int) -> int:
    return int(np.ceil(x / m) * m)


def _floor_to(x: float, m: int) -> int:
    return int(np.floor(x / m) * m)


class HySparKPlanner(ExperimentPlanner):
    """nnU-Net planner writing ``nnUNetHySparKPlans`` with HySparKUNet in the 3D configurations."""

    arch_presets = ARCH_PRESETS  # subclasses plan other networks with their own presets and patch multiple
    patch_multiple = PATCH_MULTIPLE
    network_class_name = NETWORK_CLASS_NAME  # ... and their own network and strides (planners.mim_planner)
    deep_supervision_strides = DEEP_SUPERVISION_STRIDES

    def __init__(self, dataset_name_or_id: Union[str, int],
                 gpu_memory_target_in_gb: float = DEFAULT_GPU_MEMORY_TARGET_GB,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = PLANS_NAME,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False, arch: str = "base",
                 patch_size: Sequence[int] | None = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        if arch not in self.arch_presets:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(self.arch_presets)}")
        self.arch = arch
        self.arch_kwargs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.arch_presets[arch].items()}
        if patch_size is not None:
            patch_size = list(check_patch_multiple(patch_size, self.patch_multiple, "patch_size of the planner",
                                                   why=f"the network downsamples by {self.patch_multiple}"))
        # given in the (transposed) axis order of the plans, like the plans' own patch_size; 3d_fullres only
        self.fixed_patch_size = patch_size
        self.hyspark_notes: list[str] = []  # warnings collected while planning (printed by the command)

    # -------------------------------------------------------------------------------- helpers
    def _num_input_channels(self) -> int:
        key = 'channel_names' if 'channel_names' in self.dataset_json else 'modality'
        return len(self.dataset_json[key])

    def _num_classes(self) -> int:
        return max(2, len(self.dataset_json['labels']))

    def estimate(self, patch_size: Sequence[int], batch_size: int):
        """Memory estimate of this plan's network (see :mod:`nnunet_hyspark.methods.hyspark.memory`)."""
        return estimate_training_memory(patch_size, batch_size, self._num_input_channels(), self._num_classes(),
                                        **self.arch_kwargs)

    def initial_patch_size(self, spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
        """nnU-Net's aspect-ratio start (256^3 voxels), on the 16-grid, clipped to the median shape (rounded up)."""
        tmp = 1 / np.array(spacing, dtype=np.float64)
        initial = tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)
        patch = []
        for i, m in zip(initial, median_shape):
            upper = max(self.patch_multiple, _ceil_to(m, self.patch_multiple))
            patch.append(int(min(max(self.patch_multiple, _floor_to(round(i), self.patch_multiple)), upper)))
        return patch

    def shrink_to_fit(self, patch: list[int], median_shape: Sequence[float]) -> list[int]:
        """Shrink the axis largest relative to the median shape by the patch multiple until batch size 2 fits."""
        patch = list(patch)
        while self.estimate(patch, 2).total_gb > self.UNet_vram_target_GB:
            ratios = [p / max(m, 1) if p > self.patch_multiple else -np.inf for p, m in zip(patch, median_shape)]
            axis = int(np.argmax(ratios))
            if not np.isfinite(ratios[axis]):
                est = self.estimate(patch, 2)
                raise HySparKError(
                    f"even the smallest patch {patch} needs about {est.total_gb:.1f} GB at batch size 2 with the "
                    f"'{self.arch}' network, more than the GPU memory target of {self.UNet_vram_target_GB:g} GB",
                    "raise --gpu-memory-target, or use --arch tiny")
            patch[axis] -= self.patch_multiple
        return patch

    def batch_size_for(self, patch: Sequence[int], approximate_n_voxels_dataset: float) -> int:
        """Largest batch size that fits the target, capped by nnU-Net's 5 % rule, at least 2."""
        fits = max_batch_size(patch, self.UNet_vram_target_GB, input_channels=self._num_input_channels(),
                              num_classes=self._num_classes(), **self.arch_kwargs)
        return self.cap_batch_size(fits, patch, approximate_n_voxels_dataset)

    def cap_batch_size(self, fits: int, patch: Sequence[int], approximate_n_voxels_dataset: float) -> int:
        """nnU-Net's rule: a batch covers at most 5 % of the dataset; never below the minimum batch size."""
        five_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered /
                             np.prod(patch, dtype=np.float64))
        return int(max(min(fits, five_percent), self.UNet_min_batch_size))

    def architecture(self, patch_size: Sequence[int]) -> dict:
        arch_kwargs = {'patch_size': [int(i) for i in patch_size]}
        arch_kwargs.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.arch_kwargs.items()})
        arch_kwargs['strides'] = [list(s) for s in self.deep_supervision_strides]
        return {'network_class_name': self.network_class_name, 'arch_kwargs': arch_kwargs, '_kw_requires_import': []}

    # -------------------------------------------------------------------------------- nnU-Net hooks
    @staticmethod
    def static_estimate_VRAM_usage(patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        """nnU-Net's estimate for its plain 2D U-Net, safe with ``nnUNet_n_proc_DA=0`` (nnU-Net would call
        ``torch.set_num_threads(0)``)."""
        import torch
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        threads = torch.get_num_threads()
        try:
            net = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                         output_channels, allow_init=False)
            return net.compute_conv_feature_map_size(patch_size)
        finally:
            torch.set_num_threads(threads)

    def get_plans_for_configuration(self, spacing: Union[np.ndarray, Tuple[float, ...], List[float]],
                                    median_shape: Union[np.ndarray, Tuple[int, ...]], data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        if len(spacing) != 3:  # 2d: nnU-Net's plain U-Net, the hybrid network is 3D only
            return super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)
        assert all(i > 0 for i in spacing), f"Spacing must be > 0! Spacing: {spacing}"
        median_shape = [float(i) for i in median_shape[:3]]
        fullres = data_identifier == self.generate_data_identifier('3d_fullres')
        if self.fixed_patch_size is not None and fullres:
            patch = list(self.fixed_patch_size)
            est = self.estimate(patch, 2)
            if est.total_gb > self.UNet_vram_target_GB:
                self._note(f"warning: patch size {patch} needs about {est.total_gb:.1f} GB at batch size 2, more "
                           f"than the GPU memory target of {self.UNet_vram_target_GB:g} GB")
        else:
            patch = self.shrink_to_fit(self.initial_patch_size(spacing, median_shape), median_shape)
        batch_size = self.batch_size_for(patch, approximate_n_voxels_dataset)

        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, mask_is_used_for_norm = \
            self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        return {
            'data_identifier': data_identifier,
            'preprocessor_name': self.preprocessor_name,
            'batch_size': batch_size,
            'patch_size': [int(i) for i in patch],
            'median_image_size_in_voxels': median_shape,
            'spacing': spacing,
            'normalization_schemes': normalization_schemes,
            'use_mask_for_norm': mask_is_used_for_norm,
            'resampling_fn_data': resampling_data.__name__,
            'resampling_fn_seg': resampling_seg.__name__,
            'resampling_fn_data_kwargs': resampling_data_kwargs,
            'resampling_fn_seg_kwargs': resampling_seg_kwargs,
            'resampling_fn_probabilities': resampling_softmax.__name__,
            'resampling_fn_probabilities_kwargs': resampling_softmax_kwargs,
            'architecture': self.architecture(patch),
        }

    def resampled_shapes(self) -> np.ndarray:
        """Shape of every training case after cropping and resampling to the 3d_fullres spacing (plans' axis order)."""
        transpose_forward, _ = self.determine_transpose()
        spacing = self.determine_fullres_target_spacing()
        shapes = [compute_new_shape(j, i, spacing) for i, j in
                  zip(self.dataset_fingerprint['spacings'], self.dataset_fingerprint['shapes_after_crop'])]
        return np.array(shapes)[:, transpose_forward]

    def check_volumes(self) -> None:
        """Refuse volumes too thin for a 3D network; refuse a fixed patch larger than every volume."""
        shapes = self.resampled_shapes()
        median = np.median(shapes, 0)
        for axis, m in enumerate(median):
            if m < MIN_MEDIAN_EXTENT:
                raise HySparKError(
                    f"{self.dataset_name}: the median image is {[int(round(i)) for i in median]} voxels after "
                    f"resampling, only {m:g} on axis {axis}; the hybrid network needs 3D patches of at least "
                    f"{self.patch_multiple} voxels per axis",
                    "this looks like 2D data: use nnU-Net's 2d configuration (nnUNetv2_plan_and_preprocess)")
            if m < self.patch_multiple:
                self._note(f"warning: the median image has only {m:g} voxels on axis {axis}; patches are "
                           f"{self.patch_multiple} voxels there, so nnU-Net pads every case on that axis")
        if self.fixed_patch_size is not None:
            largest = shapes.max(0)
            for axis, (p, n) in enumerate(zip(self.fixed_patch_size, largest)):
                if p > n:
                    raise HySparKError(
                        f"--patch-size {' '.join(map(str, self.fixed_patch_size))}: axis {axis} has {p} voxels but the largest volume "
                        f"has {int(n)} on that axis after resampling (axis order of the plans)",
                        f"choose at most {max(self.patch_multiple, _floor_to(n, self.patch_multiple))} on axis {axis}, or "
                        f"leave --patch-size out")

    def plan_experiment(self):
        self.check_volumes()
        return super().plan_experiment()

    def _note(self, message: str) -> None:
        if message not in self.hyspark_notes:
            self.hyspark_notes.append(message)
