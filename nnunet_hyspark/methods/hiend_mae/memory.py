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
    N^2 term); the decoder keeps about 24 bytes per voxel and channel at every level; plus the autocast
    copy of the weights, fp32 weights, gradients and AdamW moments, and 1.5 GB of CUDA context/workspace.
    """
    grid = token_grid(patch_size, vit_patch)
    tokens = 1 + int(torch.tensor(grid).prod())
    vit_bytes = depth * tokens * embed_dim * 16 * 2
    voxels = float(torch.tensor([float(p) for p in patch_size]).prod())
    fs, f = feature_size, up_factors(vit_patch)
    scale = [1.0]  # voxel fraction of levels 0..3
    for factor in reversed(f[1:]):
        scale.append(scale[-1] / factor ** 3)
    dec_bytes = sum(voxels * s * c * 24 for s, c in zip(scale, (fs, 2 * fs, 4 * fs, 8 * fs)))
    dec_bytes += voxels * (input_channels + 2 * num_classes) * 4
    n_params = depth * embed_dim ** 2 * (4 + 2 * mlp_ratio) + embed_dim * input_channels * vit_patch ** 3
    n_params += 3 * embed_dim * 8 * fs + 27 * 2 * sum(c * c for c in (fs, 2 * fs, 4 * fs, 8 * fs))
    return MemoryEstimate(activations_per_sample=float(vit_bytes + dec_bytes), batch_size=int(batch_size),
                          parameters=int(n_params), parameter_state=float(BYTES_PER_PARAMETER * n_params),
                          overhead=OVERHEAD_GB * GB, fragmentation=FRAGMENTATION)


def estimate_training_memory_gb(patch_size: Sequence[int], batch_size: int, **kwargs: Any) -> float:
    """Shorthand: the total of :func:`estimate_training_memory` in GB (2**30 bytes)."""
    return estimate_training_memory(patch_size, batch_size, **kwargs).total_gb
