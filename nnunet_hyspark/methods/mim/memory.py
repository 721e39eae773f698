"""Estimate of the GPU memory needed to fine-tune MiMUNet (mixed precision, AdamW; for the planner)."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from nnunet_hyspark.memory import MemoryEstimate, adamw_estimate
from nnunet_hyspark.methods.mim.backbone import DEFAULT_CONV_DEPTHS, DEFAULT_WIDTHS
from nnunet_hyspark.methods.mim.network import ARCH_KEYS, MiMUNet


def count_parameters(input_channels: int = 1, num_classes: int = 2, **arch) -> int:
    """Exact parameter count, from a network built on the meta device (no memory used; cached)."""
    arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in arch.items() if k in ARCH_KEYS}
    return _count_parameters(input_channels, num_classes, tuple(sorted(arch.items())))


@lru_cache(maxsize=64)  # the planner asks for the same network once per candidate patch
def _count_parameters(input_channels: int, num_classes: int, arch: tuple) -> int:
    with torch.device("meta"):
        net = MiMUNet(input_channels, num_classes, **dict(arch))
    return sum(p.numel() for p in net.parameters())


def activation_bytes_per_sample(patch_size: Sequence[int], input_channels: int = 1, num_classes: int = 2,
                                widths: Sequence[int] = DEFAULT_WIDTHS, conv_depths: Sequence[int] = DEFAULT_CONV_DEPTHS,
                                vit_depth: int = 11, vit_heads: int = 12, vit_mlp_ratio: float = 4.0,
                                fifth_stage: bool = True, fifth_width: int | None = None, feature_size: int = 48,
                                **_: object) -> float:
    """Bytes autograd keeps for one sample under autocast: a per-voxel count per layer, like
    :mod:`nnunet_hyspark.methods.hyspark.memory` does for HySparKUNet but coarser (2 bytes per fp16 tensor, 4 per fp32
    norm input/output; ~22C + 4rC per conv block, 10C per down conv, 14C for the fifth stage, ViT
    ``22D + 4mD + 4hL`` per token, ~28C per residual block, 16K + 10 per head with nnU-Net's loss). Layer-scale
    and stochastic depth (the other keyword arguments) keep about one more token-sized tensor each: ignored."""
    w = list(widths)
    scales = 6 if fifth_stage else 5
    n = [math.prod(int(s) // 2 ** k for s in patch_size) for k in range(scales)]
    c = [feature_size, *w] + ([int(fifth_width or 2 * w[3])] if fifth_stage else [])
    total = n[0] * 6 * input_channels
    for i in range(3):  # conv stages at 1/2, 1/4, 1/8 and their output norms
        total += n[i + 1] * (10 * w[i] + conv_depths[i] * (22 * w[i] + 4 * 4 * w[i]) + 8 * w[i])
    d, tokens = w[3], n[4]
    total += tokens * (10 * d + vit_depth * (22 * d + 4 * vit_mlp_ratio * d + 4 * vit_heads * tokens) + 8 * d)
    if fifth_stage:  # conv, BatchNorm, GELU, stage norm
        total += n[5] * 14 * c[5]
    for k in range(4):  # skip residual blocks (their input is kept too)
        total += n[k] * (28 * c[k] + 2 * (input_channels if k == 0 else c[k]))
    total += n[scales - 1] * 30 * c[scales - 1]  # bottleneck block
    for k in range(scales - 1, 0, -1):  # up step to scale k - 1: up conv, concat, residual block, head + loss
        total += n[k - 1] * (2 * c[k - 1] + 4 * c[k - 1] + 28 * c[k - 1] + 16 * num_classes + 10)
    return float(total)


def estimate_training_memory(patch_size: Sequence[int], batch_size: int, input_channels: int = 1,
                             num_classes: int = 2, **arch) -> MemoryEstimate:
    """A :class:`nnunet_hyspark.memory.MemoryEstimate` for MiMUNet (AdamW, autocast, deep supervision)."""
    arch = {k: v for k, v in arch.items() if k in ARCH_KEYS}  # plans' arch_kwargs also hold patch_size, strides
    params = count_parameters(input_channels, num_classes, **arch)
    act = activation_bytes_per_sample(patch_size, input_channels, num_classes, **arch)
    return adamw_estimate(act, batch_size, params)


def max_batch_size(patch_size: Sequence[int], target_gb: float, **kwargs) -> int:
    """Largest batch size whose estimate stays within ``target_gb`` (0 if not even one sample fits)."""
    return estimate_training_memory(patch_size, 1, **kwargs).max_batch_size(target_gb)
