"""Training augmentation for pre-training crops, on nnU-Net's batchgeneratorsv2 transforms (image only).

Flips per axis are the published HySparK recipe; rotation, scaling and intensity jitter are optional and
milder than nnU-Net's supervised defaults.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

from nnunet_hyspark.errors import HySparKError

#: Optional spatial augmentation (``rotation`` / ``scaling``): ranges and per-sample probabilities
#: (the probabilities are nnU-Net's defaults, the ranges milder than nnU-Net's).
ROTATION_DEGREES = 15.0
ROTATION_PROBABILITY = 0.2
SCALING_RANGE = (0.85, 1.15)
SCALING_PROBABILITY = 0.2
#: Optional intensity jitter (``intensity_jitter``): ranges and per-sample probabilities.
BRIGHTNESS_RANGE = (0.9, 1.1)
CONTRAST_RANGE = (0.9, 1.1)
NOISE_VARIANCE = (0.0, 0.05)
JITTER_PROBABILITY = 0.15
NOISE_PROBABILITY = 0.1


class PerAxisMirrorTransform(MirrorTransform):
    """batchgeneratorsv2 ``MirrorTransform`` with an independent flip probability per spatial axis.

    (``MirrorTransform`` itself flips each allowed axis with probability 0.5.)
    """

    def __init__(self, probabilities: Sequence[float]):
        probs = tuple(float(p) for p in probabilities)
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise HySparKError(f"flip probabilities {probs} must lie in [0, 1]")
        super().__init__(allowed_axes=tuple(i for i, p in enumerate(probs) if p > 0))
        self.probabilities = probs

    def get_parameters(self, **data_dict) -> dict:
        r = torch.rand(len(self.probabilities))
        return {"axes": [i for i, p in enumerate(self.probabilities) if r[i].item() < p]}


def build_pretrain_transforms(patch_size: Sequence[int], flip_probs: Sequence[float] = (0.2, 0.2, 0.1),
                              rotation: bool = False, scaling: bool = False, intensity_jitter: bool = False
                              ) -> tuple[BasicTransform | None, tuple[int, int, int]]:
    """Per-sample training transforms (image only) and the crop size to cut before them.

    With rotation / scaling a larger crop is cut (nnU-Net's ``get_patch_size``) and ``SpatialTransform``
    resamples its centre to ``patch_size``; otherwise the crop already has the patch size.
    Returns ``(transform or None, crop_size)``.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(flip_probs) != len(patch_size):
        raise HySparKError(f"flip_probs {tuple(flip_probs)} needs one probability per axis ({len(patch_size)})")
    transforms: list[BasicTransform] = []
    crop_size = patch_size
    if rotation or scaling:
        rot = math.radians(ROTATION_DEGREES) if rotation else 0.0
        scale_range = SCALING_RANGE if scaling else (1.0, 1.0)
        crop_size = tuple(int(max(p, c)) for p, c in
                          zip(patch_size, get_patch_size(patch_size, (-rot, rot), (-rot, rot), (-rot, rot),
                                                         scale_range)))
        transforms.append(SpatialTransform(
            patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
            p_rotation=ROTATION_PROBABILITY if rotation else 0.0, rotation=(-rot, rot),
            p_scaling=SCALING_PROBABILITY if scaling else 0.0, scaling=SCALING_RANGE,
            p_synchronize_scaling_across_axes=1, padding_mode_image="border",
        ))
    if intensity_jitter:
        transforms.append(RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast(BRIGHTNESS_RANGE), synchronize_channels=False, p_per_channel=1),
            apply_probability=JITTER_PROBABILITY))
        transforms.append(RandomTransform(ContrastTransform(
            contrast_range=BGContrast(CONTRAST_RANGE), preserve_range=True, synchronize_channels=False,
            p_per_channel=1), apply_probability=JITTER_PROBABILITY))
        transforms.append(RandomTransform(GaussianNoiseTransform(
            noise_variance=NOISE_VARIANCE, p_per_channel=1, synchronize_channels=True),
            apply_probability=NOISE_PROBABILITY))
    if any(p > 0 for p in flip_probs):
        transforms.append(PerAxisMirrorTransform(flip_probs))
    return (ComposeTransforms(transforms) if transforms else None), crop_size
