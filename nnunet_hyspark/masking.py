"""Random cell masks on the 1/16 token grid and their nearest-neighbour upsampling.

Convention: a mask is a bool tensor of shape (B, gx, gy, gz) that is True where a
cell is KEPT (visible) and False where it is masked. Every sample keeps exactly
the same number of cells, so kept tokens stack into a (B, K, C) tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch

ENCODER_STRIDE = 16  # the CNN downsamples four times by two before the ViT


def num_kept(num_cells: int, mask_ratio: float) -> int:
    """round(L * (1 - mask_ratio)), at least one kept cell."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, round(num_cells * (1.0 - mask_ratio)))


def random_cell_mask(batch_size: int, grid: Sequence[int], mask_ratio: float,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample uniform random mask keeping the same number of cells in every sample."""
    num_cells = int(torch.tensor(grid).prod())
    keep = num_kept(num_cells, mask_ratio)
    noise = torch.rand(batch_size, num_cells, generator=generator)
    kept_idx = noise.argsort(dim=1)[:, :keep]
    mask = torch.zeros(batch_size, num_cells, dtype=torch.bool)
    mask.scatter_(1, kept_idx, True)
    return mask.view(batch_size, *grid).to(device)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, gx, gy, gz) -> (B, 1, gx*f, gy*f, gz*f) by nearest repetition (a float 0/1 tensor)."""
    m = mask[:, None].float()
    if factor == 1:
        return m
    for dim in (2, 3, 4):
        m = m.repeat_interleave(factor, dim=dim)
    return m


def masks_per_scale(mask: torch.Tensor, num_scales: int = 5) -> list[torch.Tensor]:
    """The same mask at resolutions 1, 1/2, ..., 1/16 (bottom-up consistent masking)."""
    return [upsample_mask(mask, ENCODER_STRIDE >> s) for s in range(num_scales)]


def kept_token_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, K) flat indices of kept cells, in their original (row-major) order."""
    flat = mask.flatten(1)
    keep = int(flat[0].sum())
    if not bool((flat.sum(1) == keep).all()):
        raise ValueError("every sample of a batch must keep the same number of cells")
    # a stable sort puts kept cells (True) first while preserving their order
    order = torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices
    return order[:, :keep]


def hide(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN at masked voxels (``keep`` is 0 there), so previews can draw them in their own
    colour instead of a grey that reads as tissue."""
    return x.masked_fill(keep.expand_as(x) == 0, float("nan"))
