"""Masked-autoencoder helpers shared by every method: patches, normalised targets, the masked loss, previews.

Conventions (``docs/methods.md``): volumes are ``(B, C, X, Y, Z)``; a patch grid is flattened
row-major, cell ``(i, j, k)`` of a grid ``(gx, gy, gz)`` being row ``(i * gy + j) * gz + k``;
masks are bool ``(B, gx, gy, gz)``, True where a cell is KEPT (:mod:`nnunet_hyspark.masking`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from nnunet_hyspark.masking import ENCODER_STRIDE, hide, upsample_mask


def patchify(x: torch.Tensor, patch: int = ENCODER_STRIDE) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, L, C * patch^3), one row per grid cell in row-major (x, y, z) order."""
    b, c, X, Y, Z = x.shape
    gx, gy, gz = X // patch, Y // patch, Z // patch
    x = x.reshape(b, c, gx, patch, gy, patch, gz, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, gx * gy * gz, c * patch**3)


def unpatchify(p: torch.Tensor, channels: int, grid: Sequence[int], patch: int = ENCODER_STRIDE) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = p.shape[0]
    gx, gy, gz = grid
    x = p.reshape(b, gx, gy, gz, channels, patch, patch, patch).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, gx * patch, gy * patch, gz * patch)


def normalised_targets(x: torch.Tensor, eps: float = 1e-6, patch: int = ENCODER_STRIDE,
                       unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch normalised targets and the statistics used (mean, sqrt(var + eps)).

    ``unbiased``: the variance HySparK's published code uses (the default); False gives a layer norm
    without affine parameters (biased variance), as Hi-End-MAE's published code normalises.
    """
    target = patchify(x, patch)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=unbiased) + eps).sqrt()
    return (target - mean) / std, mean, std


def masked_patch_mse(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                     patch: int = ENCODER_STRIDE, unbiased: bool = True) -> torch.Tensor:
    """MSE of predicted rows ``pred`` (B, L, C * patch^3) against per-patch normalised targets of ``x``
    (:func:`normalised_targets`, ``unbiased`` variance or not), averaged over masked cells (mask False) only."""
    target, _, _ = normalised_targets(x, patch=patch, unbiased=unbiased)
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
    masked = (~mask.flatten(1)).to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


def preview_images(x: torch.Tensor, pred_patches: torch.Tensor, mask: torch.Tensor,
                   patch: int = ENCODER_STRIDE, unbiased: bool = True) -> dict[str, torch.Tensor]:
    """Images for previews of any masked-patch model: the input, the masked input (NaN where hidden),
    and the reconstruction (predicted patches de-normalised with the target's own statistics, the
    model's ``unbiased`` choice, kept patches from the input, as MAE visualises).
    ``pred_patches`` is (B, L, C * patch^3)."""
    x = x.float()
    _, mean, std = normalised_targets(x, patch=patch, unbiased=unbiased)
    keep = mask.flatten(1)[..., None].to(x.dtype)
    full = pred_patches.float() * std + mean
    recon = unpatchify(full * (1 - keep) + patchify(x, patch) * keep, x.shape[1], mask.shape[1:], patch)
    return {"input": x, "masked": hide(x, upsample_mask(mask, patch)), "reconstruction": recon}


def masked_validation_loss(model: torch.nn.Module, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Validation loss of a model with the MAE interface (``random_mask(x, gen)``, ``forward(x, mask)``)."""
    return model(batch, mask=model.random_mask(batch, gen))["loss"]


def masked_preview(model: torch.nn.Module, batch: torch.Tensor, gen: torch.Generator) -> dict:
    """One preview panel of a model with the MAE interface (plus ``reconstruct(x, pred, mask)``)."""
    out = model(batch, mask=model.random_mask(batch, gen))
    return {"": model.reconstruct(batch, out["pred"], out["mask"])}
