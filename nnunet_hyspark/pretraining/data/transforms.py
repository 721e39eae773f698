"""Training augmentation for pre-training crops, on nnU-Net's batchgeneratorsv2 transforms (image only).

The method's :class:`~nnunet_hyspark.methods.data_recipe.DataRecipe` gives flips per axis, 90-degree turns and
an intensity scale / shift (in the published order: flips, turn, scale, shift). Rotation by small angles,
scaling and intensity jitter are optional extras, off in every recipe and milder than nnU-Net's supervised
defaults.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.data_recipe import DataRecipe

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


class UniformShiftTransform(ImageOnlyTransform):
    """Adds one offset drawn from U(-r, r) to every voxel of every channel (MONAI's RandShiftIntensity).

    (batchgeneratorsv2's ``BrightnessAdditiveTransform`` draws its offset from a Gaussian.)
    """

    def __init__(self, max_shift: float):
        super().__init__()
        self.max_shift = float(max_shift)

    def get_parameters(self, **data_dict) -> dict:
        return {"shift": float(np.random.uniform(-self.max_shift, self.max_shift))}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return img.add_(params["shift"])


def recipe_transforms(patch_size: Sequence[int], recipe: DataRecipe) -> list[BasicTransform]:
    """The recipe's own augmentation: flips, a 90-degree turn, an intensity scale, an intensity shift."""
    out: list[BasicTransform] = []
    if any(p > 0 for p in recipe.flip_probs):
        out.append(PerAxisMirrorTransform(recipe.flip_probs))
    if recipe.rot90_probability > 0:
        a, b = recipe.rot90_axes
        # a quarter turn swaps the two axes: where they differ in size only half turns keep the patch shape
        turns = (1, 2, 3) if patch_size[a] == patch_size[b] else (2,)
        out.append(RandomTransform(Rot90Transform(num_axis_combinations=1, num_rot_per_combination=turns,
                                                  allowed_axes={a, b}), apply_probability=recipe.rot90_probability))
    if recipe.intensity_probability > 0:
        r = recipe.intensity_range
        # one factor for all channels, as MONAI's RandScaleIntensity: x * U(1 - r, 1 + r)
        out.append(RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=(1.0 - r, 1.0 + r), synchronize_channels=True, p_per_channel=1),
            apply_probability=recipe.intensity_probability))
        out.append(RandomTransform(UniformShiftTransform(r), apply_probability=recipe.intensity_probability))
    return out


def build_pretrain_transforms(patch_size: Sequence[int], recipe: DataRecipe | None = None, *, rotation: bool = False,
                              scaling: bool = False, intensity_jitter: bool = False
                              ) -> tuple[BasicTransform | None, tuple[int, int, int]]:
    """Per-sample training transforms (image only) and the crop size to cut before them.

    ``recipe`` (default: HySparK's) gives the method's augmentation. With the optional ``rotation`` /
    ``scaling`` a larger crop is cut (nnU-Net's ``get_patch_size``) and ``SpatialTransform`` resamples its
    centre to ``patch_size``; otherwise the crop already has the patch size. Returns ``(transform or None,
    crop_size)``.
    """
    recipe = recipe or DataRecipe()
    patch_size = tuple(int(p) for p in patch_size)
    if len(recipe.flip_probs) != len(patch_size):
        raise HySparKError(f"flip probabilities {tuple(recipe.flip_probs)} need one value per axis ({len(patch_size)})")
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
    transforms += recipe_transforms(patch_size, recipe)
    return (ComposeTransforms(transforms) if transforms else None), crop_size
