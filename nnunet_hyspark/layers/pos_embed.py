"""Fixed 3D sin-cos position embeddings.

Fixed (not trained), so a different patch size needs no interpolation: the
embedding is simply rebuilt for the new token grid. Nothing grid-sized is ever
stored in a state dict.
"""
from __future__ import annotations

from typing import Sequence

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) as [sin(p * omega), cos(p * omega)], dim/2 frequencies."""
    assert dim % 2 == 0
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_3d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """(prod(grid), dim) embedding for a (h, w, d) token grid flattened in row-major order.

    Per axis dim/6 frequencies; the layout is
    [sin(h), cos(h), sin(w), cos(w), sin(d), cos(d)] (HySparK / MAE convention).
    """
    if dim % 6 != 0:
        raise ValueError(f"sin-cos 3D position embedding needs a width divisible by 6, got {dim}")
    h, w, d = (torch.arange(n) for n in grid)
    hh, ww, dd = torch.meshgrid(h, w, d, indexing="ij")
    per_axis = dim // 3
    emb = [sincos_1d(per_axis, axis.reshape(-1)) for axis in (hh, ww, dd)]
    return torch.cat(emb, dim=1).float()
