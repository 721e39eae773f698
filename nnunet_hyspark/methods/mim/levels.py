"""MiM level geometry: how one crop becomes the coarse, middle and fine volumes (pure functions), and
:class:`MiMSampling`, everything random in one step (so a step can be replayed).

MiM (Mask in Mask) reconstructs the same anatomy at three granularities. All three
levels are volumes of the same *level patch* ``P`` (the plan's patch size, e.g. 96^3),
so one encoder and one decoder serve them all. From one crop of ``2P`` (per axis):

* **coarse** -- the whole crop resized to ``P`` (trilinear; with a factor of exactly 1/2
  and ``align_corners=False`` this is the mean of each 2x2x2 voxel block). Its token
  grid ``g = P / 16`` is split into its eight *octants* (halves per axis, blocks of
  ``g/2`` tokens per axis); the coarse mask hides whole octants (:func:`grouped_mask`).
  Octant ``o`` of the coarse volume shows octant ``o`` of the crop.
* **middle** -- the crop cut into its eight octants, each a native-resolution volume of
  ``P`` (:func:`cut_octants`); MiM encodes ``n_middle`` of those that were masked at the
  coarse level.
* **fine** -- in a middle volume, single token cells (``16^3`` voxels at native
  resolution) upsampled to ``P`` (:func:`fine_volumes`); MiM takes ``n_fine`` cells that
  were masked at the middle level.

Non-cubic patches (nnU-Net plans are rarely cubic): every rule above is applied per
axis. The crop is ``2 P_i`` on axis ``i``; octants are halves per axis; a fine volume is
one ``16^3`` cell of the middle volume's token grid upsampled to the full ``P``, so
its scale factors ``P_i / 16`` differ between axes (a 16^3 cell of a 160 x 160 x 64
patch is stretched 10 x 10 x 4). The coarse octant grouping needs an even token grid
on every axis, so every axis of ``P`` must be a multiple of 32 (:func:`level_patch_size`).

Indexing conventions (shared with :func:`nnunet_hyspark.mae.patchify`):
volumes are ``(N, C, X, Y, Z)``; token cells and octants are numbered row-major, cell
``(i, j, k)`` of a grid ``(gx, gy, gz)`` is ``(i * gy + j) * gz + k`` and octant
``(a, b, c)`` (each 0 = lower half, 1 = upper half) is ``4a + 2b + c``. Masks are bool
``(N, gx, gy, gz)``, True where a cell is KEPT (visible), as in :mod:`nnunet_hyspark.masking`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from nnunet_hyspark.masking import kept_token_indices, num_kept, random_cell_mask
from nnunet_hyspark.patch_rules import check_patch_multiple

CELL = 16  # voxels per token cell and axis (the encoder's total stride)
CROP_SCALE = 2  # crop = 2 x the level patch on every axis; octants = halves per axis
NUM_OCTANTS = 8
LEVEL_MULTIPLE = CELL * CROP_SCALE  # level patch axes: multiples of 32 (even token grids)


def level_patch_size(crop_shape: Sequence[int]) -> tuple[int, ...]:
    """The level patch ``P`` of a ``2P`` crop; every axis of ``P`` must be a multiple of 32."""
    crop_shape = check_patch_multiple(
        crop_shape, CROP_SCALE * LEVEL_MULTIPLE, "MiM crop", dims=None,
        why=f"MiM cuts its levels from crops of 2 x the level patch, whose axes must be multiples of "
            f"{LEVEL_MULTIPLE} (even 16^3 token grids)")
    return tuple(n // CROP_SCALE for n in crop_shape)


def token_grid(patch: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(p) // CELL for p in patch)


# ---------------------------------------------------------------------------------------- coarse


def coarse_volume(crop: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """The whole crop resized to the level patch (trilinear)."""
    return F.interpolate(crop, size=tuple(patch), mode="trilinear", align_corners=False)


def octant_of_cells(grid: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(L,) octant index of every cell of an even ``grid`` (row-major cell order)."""
    if any(g % 2 for g in grid):
        raise ValueError(f"token grid {tuple(grid)} must be even on every axis to split into octants")
    axes = [torch.arange(g, device=device) // (g // 2) for g in grid]
    a, b, c = torch.meshgrid(*axes, indexing="ij")
    return (4 * a + 2 * b + c).reshape(-1)


def octant_pooling_matrix(grid: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(8, L) matrix whose row ``o`` averages the cells of octant ``o`` (``M @ tokens`` pools per octant)."""
    onehot = F.one_hot(octant_of_cells(grid, device), NUM_OCTANTS).T.float()
    return onehot / onehot.sum(1, keepdim=True)


def grouped_mask(batch_size: int, grid: Sequence[int], mask_ratio: float,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole octants: ``round(8 * mask_ratio)`` random octants per sample (at least one kept).

    Returns the mask (B, gx, gy, gz), True = kept, and the masked octant ids (B, n_masked)
    in random order. The groups are the spatial 2x2x2 blocks of the grid's halves (the
    published code grouped 27 consecutive flat indices instead, which are not blocks).
    """
    n_masked = NUM_OCTANTS - num_kept(NUM_OCTANTS, mask_ratio)
    order = torch.rand(batch_size, NUM_OCTANTS, generator=generator).argsort(dim=1)
    masked = order[:, :n_masked].to(device)
    octant = octant_of_cells(grid, device)  # (L,)
    is_masked = (octant[None, :, None] == masked[:, None, :]).any(-1)  # (B, L)
    return (~is_masked).view(batch_size, *grid), masked


# ---------------------------------------------------------------------------------------- middle


def split_octants(crop: torch.Tensor) -> torch.Tensor:
    """(B, C, 2X, 2Y, 2Z) -> (B, 8, C, X, Y, Z): the crop's octants in octant order."""
    b, c, X, Y, Z = crop.shape
    x = crop.reshape(b, c, 2, X // 2, 2, Y // 2, 2, Z // 2)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, NUM_OCTANTS, c, X // 2, Y // 2, Z // 2)


def cut_octants(crop: torch.Tensor, octants: torch.Tensor) -> torch.Tensor:
    """Octants ``octants`` (B, n) of each crop as native-resolution volumes (B * n, C, X, Y, Z), sample-major."""
    parts = split_octants(crop)
    idx = octants.to(crop.device)[..., None, None, None, None].expand(-1, -1, *parts.shape[2:])
    return torch.gather(parts, 1, idx).flatten(0, 1)


def choose_among(candidates: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random distinct entries per row of ``candidates`` (N, m)."""
    if n > candidates.shape[1]:
        raise ValueError(f"cannot choose {n} of {candidates.shape[1]} candidates")
    pick = torch.rand(candidates.shape, generator=generator).argsort(dim=1)[:, :n].to(candidates.device)
    return torch.gather(candidates, 1, pick)


# ---------------------------------------------------------------------------------------- fine


def masked_cells(mask: torch.Tensor) -> torch.Tensor:
    """(N, M) flat indices of the masked cells of ``mask`` (same count in every sample), in cell order."""
    flat = ~mask.flatten(1)
    m = int(flat[0].sum())
    if not bool((flat.sum(1) == m).all()):
        raise ValueError("every sample must mask the same number of cells")
    return torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices[:, :m]


def split_cells(volumes: torch.Tensor) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N, L, C, 16, 16, 16): the 16^3 cells of the token grid, row-major."""
    n, c, X, Y, Z = volumes.shape
    gx, gy, gz = X // CELL, Y // CELL, Z // CELL
    x = volumes.reshape(n, c, gx, CELL, gy, CELL, gz, CELL)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, gx * gy * gz, c, CELL, CELL, CELL)


def fine_volumes(middle: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Cells ``cells`` (N, n) of each middle volume, upsampled to the level patch: (N * n, C, X, Y, Z)."""
    parts = split_cells(middle)
    idx = cells.to(middle.device)[..., None, None, None, None].expand(-1, -1, *parts.shape[2:])
    picked = torch.gather(parts, 1, idx).flatten(0, 1)
    return F.interpolate(picked, size=tuple(middle.shape[2:]), mode="trilinear", align_corners=False)


# ---------------------------------------------------------------------------------------- where things come from


def octant_box_in_crop(octant: int, patch: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis ``[lo, hi)`` in crop voxels of a middle volume (crop octant)."""
    bits = ((octant >> 2) & 1, (octant >> 1) & 1, octant & 1)
    return [(b * p, (b + 1) * p) for b, p in zip(bits, patch)]


def cell_box(cell: int, grid: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis ``[lo, hi)`` in voxels of token cell ``cell`` of a level volume."""
    gx, gy, gz = grid
    ijk = (cell // (gy * gz), (cell // gz) % gy, cell % gz)
    return [(i * CELL, (i + 1) * CELL) for i in ijk]


def fine_box_in_crop(octant: int, cell: int, patch: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis ``[lo, hi)`` in crop voxels of the fine volume cut from cell ``cell`` of middle octant ``octant``."""
    return [(o_lo + c_lo, o_lo + c_hi)
            for (o_lo, _), (c_lo, c_hi) in zip(octant_box_in_crop(octant, patch), cell_box(cell, token_grid(patch)))]


# ---------------------------------------------------------------------------------------- one step's sampling


@dataclass(frozen=True)
class MiMSampling:
    """Everything random in one MiM step, so that a step can be replayed exactly (e.g. with another
    implementation's draws). Indices are flat row-major cell / octant numbers (module docstring)."""

    coarse_keep: torch.Tensor  # (B, Kc) kept token cells of each coarse volume
    octants: torch.Tensor  # (B, n_middle) crop octant each middle volume is
    middle_keep: torch.Tensor  # (B * n_middle, Km) kept token cells of each middle volume
    cells: torch.Tensor  # (B * n_middle, n_fine) middle-volume cell each fine volume is cut from
    fine_keep: torch.Tensor  # (B * n_middle * n_fine, Kf) kept token cells of each fine volume

    def check(self, batch_size: int, grid: Sequence[int]) -> None:
        """Shapes consistent with ``batch_size`` crops and the level ``grid``; indices in range."""
        n_middle, n_fine = self.octants.shape[1], self.cells.shape[1]
        rows = {"coarse_keep": batch_size, "octants": batch_size, "middle_keep": batch_size * n_middle,
                "cells": batch_size * n_middle, "fine_keep": batch_size * n_middle * n_fine}
        limits = {"octants": NUM_OCTANTS}
        for name, n in rows.items():
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != n:
                raise ValueError(f"sampling.{name} has shape {tuple(t.shape)}, expected ({n}, k)")
            top = limits.get(name, math.prod(grid))
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= top):
                raise ValueError(f"sampling.{name} holds indices outside [0, {top})")

    def to(self, device: torch.device | str) -> "MiMSampling":
        return MiMSampling(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def keep_mask(kept: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(N, K) kept cell indices -> bool mask (N, gx, gy, gz), True = kept; indices must be distinct."""
    mask = torch.zeros(kept.shape[0], math.prod(grid), dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept.long(), True)
    if not bool((mask.sum(1) == kept.shape[1]).all()):
        raise ValueError("kept token indices repeat within a sample")
    return mask.view(kept.shape[0], *grid)


def draw_sampling(batch_size: int, grid: Sequence[int], mask_ratios: Sequence[float], n_middle: int, n_fine: int,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> MiMSampling:
    """Draw one step: whole coarse octants masked, ``n_middle`` of them encoded as middle volumes,
    ``n_fine`` middle cells masked at the middle level encoded as fine volumes (module docstring)."""
    coarse_mask, masked_octants = grouped_mask(batch_size, grid, mask_ratios[0], generator, device)
    octants = choose_among(masked_octants, n_middle, generator)
    middle_mask = random_cell_mask(batch_size * n_middle, grid, mask_ratios[1], generator, device)
    cells = choose_among(masked_cells(middle_mask), n_fine, generator)
    fine_mask = random_cell_mask(batch_size * n_middle * n_fine, grid, mask_ratios[2], generator, device)
    return MiMSampling(kept_token_indices(coarse_mask), octants, kept_token_indices(middle_mask), cells,
                       kept_token_indices(fine_mask))
