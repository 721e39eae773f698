"""Estimate of the GPU memory needed to fine-tune HiEndUNETR (bf16 autocast, AdamW; for the planner)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from nnunet_hyspark.memory import BYTES_PER_PARAMETER, GB, MemoryEstimate
from nnunet_hyspark.methods.hiend_mae.encoder import DEFAULT_VIT_PATCH, token_grid
from nnunet_hyspark.methods.hiend_mae.network import DEFAULT_FEATURE_SIZE, up_factors

OVERHEAD_GB = 1.5  # CUDA context and workspaces, as calibrated for this network
FRAGMENTATION = 1.0  # the calibration below already includes the allocator's slack


def estimate_training_memory(patch_size: Sequence[int], batch_size: int, input_channels: int = 1,
                             num_classes: int = 2, vit_patch: int = DEFAULT_VIT_PATCH, embed_dim: int = 768,
                             depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                             feature_size: int = DEFAULT_FEATURE_SIZE, **_: Any) -> MemoryEstimate:
    """Rough fine-tuning memory under bf16 autocast: activations kept for backward + AdamW state.

    A planning heuristic (like nnU-Net's), calibrated on the tensors autograd saves (CPU autocast, base
    network): a ViT block keeps about 16 values (2 bytes each) per token and channel (fused attention, no
    N^2 term; no class token); the decoder keeps about 24 bytes per voxel and channel at every level;
    plus the autocast copy of the weights, fp32 weights, gradients and AdamW moments
    (:func:`count_parameters`), and 1.5 GB of CUDA context/workspace.
    """
    grid = token_grid(patch_size, vit_patch)
    tokens = int(torch.tensor(grid).prod())  # the fine-tuning ViT has no class token
    vit_bytes = depth * tokens * embed_dim * 16 * 2
    voxels = float(torch.tensor([float(p) for p in patch_size]).prod())
    fs, f = feature_size, up_factors(vit_patch)
    scale = [1.0]  # voxel fraction of levels 0..3
    for factor in reversed(f[1:]):
        scale.append(scale[-1] / factor ** 3)
    dec_bytes = sum(voxels * s * c * 24 for s, c in zip(scale, (fs, 2 * fs, 4 * fs, 8 * fs)))
    dec_bytes += voxels * (input_channels + 2 * num_classes) * 4
    n_params = count_parameters(input_channels, num_classes, vit_patch, embed_dim, depth, mlp_ratio, feature_size)
    return MemoryEstimate(activations_per_sample=float(vit_bytes + dec_bytes), batch_size=int(batch_size),
                          parameters=int(n_params), parameter_state=float(BYTES_PER_PARAMETER * n_params),
                          overhead=OVERHEAD_GB * GB, fragmentation=FRAGMENTATION)


def _res_block_parameters(c_in: int, c_out: int) -> int:
    """ResBlock: two 3x3x3 convs and a 1x1 shortcut (with biases), three affine instance norms."""
    return c_in * c_out * 27 + c_out * c_out * 27 + c_in * c_out + 3 * c_out + 3 * 2 * c_out


def count_parameters(input_channels: int = 1, num_classes: int = 2, vit_patch: int = DEFAULT_VIT_PATCH,
                     embed_dim: int = 768, depth: int = 12, mlp_ratio: float = 4.0,
                     feature_size: int = DEFAULT_FEATURE_SIZE) -> int:
    """The parameters of HiEndUNETR, counted from its layer shapes (tested against the network)."""
    d, hidden, fs = embed_dim, int(embed_dim * mlp_ratio), feature_size
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    n = input_channels * d * vit_patch ** 3 + d + depth * block + 2 * d  # patch embedding, blocks, final norm
    f = up_factors(vit_patch)
    widths = (8 * fs, 4 * fs, 2 * fs, fs)
    n += _res_block_parameters(input_channels, fs)  # the image skip
    for c, factors in ((2 * fs, f[:3]), (4 * fs, f[:2]), (8 * fs, f[:1])):  # token pathways (bias-free convs)
        n += d * c * factors[0] ** 3 + sum(c * c * k ** 3 + _res_block_parameters(c, c) for k in factors[1:])
    for c_in, c_out, k in zip((d, *widths[:-1]), widths, f):  # up blocks
        n += c_in * c_out * k ** 3 + _res_block_parameters(2 * c_out, c_out)
    return n + sum(c * num_classes + num_classes for c in widths)  # heads


def estimate_training_memory_gb(patch_size: Sequence[int], batch_size: int, **kwargs: Any) -> float:
    """Shorthand: the total of :func:`estimate_training_memory` in GB (2**30 bytes)."""
    return estimate_training_memory(patch_size, batch_size, **kwargs).total_gb
