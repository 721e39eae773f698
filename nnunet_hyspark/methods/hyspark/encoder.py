"""The HySparK hybrid encoder: a MedNeXt-style CNN down to 1/16, then a ViT on the 1/16 tokens.

One module serves fine-tuning (dense: ``encoder(x)``) and pre-training (masked:
``encoder(x, mask)``). Masking is a mode, not a copy: in masked mode every CNN
operator behaves as a submanifold sparse operator (zero output at masked
positions; kept outputs depend only on kept inputs) and the ViT sees only kept
tokens. How the masked CNN is executed (dense-then-mask, or block-sparse) is a
pluggable backend object with identical numbers (:mod:`nnunet_hyspark.sparse`), resolved once
per run and passed in.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nnunet_hyspark.layers.blocks import MedNeXtBlock, TransformerBlock, init_vit_weights
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.masking import ENCODER_STRIDE, kept_token_indices
from nnunet_hyspark.patch_rules import check_patch_multiple
from nnunet_hyspark.sparse import DENSE, SparseBackend, get_backend

DEFAULT_WIDTHS = (32, 64, 128, 256, 384)
DEFAULT_DEPTHS = (1, 1, 3, 3, 1)
DEFAULT_EXPANSIONS = (2, 4, 4, 4, 2)


def check_divisible(spatial_shape: Sequence[int], stride: int = ENCODER_STRIDE, what: str = "patch size") -> None:
    """The project's one patch rule (a PatchSizeError, also a ValueError) for the hybrid encoder's stride."""
    check_patch_multiple(spatial_shape, stride, what, why=f"the hybrid encoder downsamples by {stride}", dims=None)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class CNNEmbeddings(nn.Module):
    """stem, layer1..5 (MedNeXt blocks), expend1..4 (k3 width changes), max-pool between scales."""

    def __init__(self, in_channels: int, widths: Sequence[int], depths: Sequence[int],
                 expansions: Sequence[int], kernel_size: int = 3):
        super().__init__()
        w = list(widths)
        self.stem = nn.Conv3d(in_channels, w[0], kernel_size, padding=kernel_size // 2)
        layer_widths = [w[0], w[1], w[2], w[3], w[4]]
        for i in range(5):
            blocks = [MedNeXtBlock(layer_widths[i], expansions[i], kernel_size) for _ in range(depths[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        for i in range(4):
            setattr(self, f"expend{i + 1}", nn.Conv3d(w[i], w[i + 1], kernel_size, padding=kernel_size // 2))
        self.down = nn.MaxPool3d(2)

    def layers(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(5)]

    def expends(self) -> list[nn.Conv3d]:
        return [getattr(self, f"expend{i + 1}") for i in range(4)]

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None,
                channels_last: bool = False) -> list[torch.Tensor]:
        """Returns [x1, x2, x3, x4, h5]; with ``masks`` (one per scale) the dense-masked reference semantics.
        ``channels_last`` puts the stem's output in channels_last_3d memory (same numbers): the full-resolution
        MedNeXt layer then runs without layout copies (oneDNN's depthwise conv keeps the format; the dense
        k3 convs after it return channels-first maps, so later layers run as before).

        Masking after every block (not after every op inside it) gives the same
        numbers: inside a block only conv1 is spatial, and it reads a masked input.
        Max-pooling needs no mask: 2x2x2 windows never straddle a 16^3 cell.
        """
        m = masks if masks is not None else [None] * 5
        h = _masked(self.stem(_masked(x, m[0])), m[0])
        if channels_last:  # after the stem: a one-channel input is both layouts, so the stem decides nothing
            h = h.contiguous(memory_format=torch.channels_last_3d)
        feats = []
        for s, layer in enumerate(self.layers()):
            if s > 0:
                h = self.down(h)
            for block in layer:
                h = _masked(block(h), m[s])
            if s < 4:
                h = _masked(self.expends()[s](h), m[s])
                feats.append(h)
        feats.append(h)
        return feats


class TokenTransformer(nn.Module):
    """Pre-norm ViT blocks plus a final LayerNorm over the 1/16 tokens ("mae" in the checkpoint)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList([TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.apply(init_vit_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class HybridEncoder(nn.Module):
    """CNN to 1/16, ViT on the tokens; returns the five skip maps [x1, x2, x3, x4, x5]."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS,
                 depths: Sequence[int] = DEFAULT_DEPTHS, expansions: Sequence[int] = DEFAULT_EXPANSIONS,
                 vit_depth: int = 3, vit_heads: int = 12, vit_mlp_ratio: float = 4.0, kernel_size: int = 3):
        super().__init__()
        if len(widths) != 5 or len(depths) != 5 or len(expansions) != 5:
            raise ValueError("widths, depths and expansions need five entries (one per scale)")
        if widths[4] % 6 != 0:
            raise ValueError(f"the ViT width widths[4]={widths[4]} must be divisible by 6 (3D sin-cos positions)")
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.embeddings = CNNEmbeddings(in_channels, widths, depths, expansions, kernel_size)
        self.mae = TokenTransformer(widths[4], vit_depth, vit_heads, vit_mlp_ratio)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def pos_embed(self, grid: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, L, C) fixed sin-cos embedding for this token grid (rebuilt, never interpolated)."""
        key = (tuple(grid), device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(self.widths[4], grid)[None].to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                backend: SparseBackend | None = None, channels_last: bool = False) -> list[torch.Tensor]:
        """Dense when ``mask`` is None; otherwise ``mask`` (B, gx, gy, gz), True = kept cell, and the CNN
        runs on ``backend`` (a resolved :mod:`nnunet_hyspark.sparse` backend object; None = dense).
        ``channels_last`` (dense only): see :meth:`CNNEmbeddings.forward`; same numbers."""
        check_divisible(x.shape[2:], what="input")
        grid = tuple(n // ENCODER_STRIDE for n in x.shape[2:])
        if mask is None:
            feats = self.embeddings(x, channels_last=channels_last)
        else:
            if tuple(mask.shape) != (x.shape[0], *grid):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match batch and grid {(x.shape[0], *grid)}")
            feats = (backend or DENSE)(self.embeddings, x, mask)
        feats[4] = self.transformer(feats[4], mask)
        return feats

    def transformer(self, h5: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The ViT part on the CNN's 1/16 map ``h5``: positions added, only kept tokens encoded when ``mask``
        is given (masked cells come back as zeros); the map (B, C, gx, gy, gz) of the normed tokens."""
        b, c = h5.shape[:2]
        grid = h5.shape[2:]
        tokens = h5.flatten(2).transpose(1, 2)  # (B, L, C) in row-major (x, y, z) order
        tokens = tokens + self.pos_embed(grid, tokens.device, tokens.dtype)
        if mask is None:
            out = self.mae(tokens)
        else:
            # Only kept tokens enter the ViT, so its cost scales with the kept fraction. Masked
            # cells come back as zeros: the decoder's densify step fills them with its own
            # per-scale mask tokens (the reference's ViT mask token is overwritten there anyway).
            idx = kept_token_indices(mask)
            kept = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, c))
            out = torch.zeros_like(tokens).scatter(1, idx[..., None].expand(-1, -1, c), self.mae(kept))
        return out.transpose(1, 2).reshape(b, c, *grid)


def run_masked_cnn(embeddings: CNNEmbeddings, x: torch.Tensor, mask: torch.Tensor,
                   backend: SparseBackend | str | None = None) -> list[torch.Tensor]:
    """The CNN part alone with submanifold-sparse semantics, on a backend object or name (None = dense)."""
    if isinstance(backend, str):
        backend = get_backend(backend)
    return (backend or DENSE)(embeddings, x, mask)
