"""The Hi-End-MAE encoder: a plain 3D ViT, shared by pre-training (kept tokens) and fine-tuning (all tokens).

Patch embedding by a strided Conv3d (kernel = stride = the ViT patch, 12 by default), fixed 3D
sin-cos positions rebuilt for the actual token grid (any patch whose axes are multiples of the
ViT patch), pre-norm blocks (qkv bias, LayerNorm eps 1e-6). Pre-training prepends a class token
(zero position); the fine-tuning network has none, as the published fine-tuning UNETR. It
returns the outputs of the tapped blocks (4, 7, 10, 1-based) and the final normed output, which
the pre-training decoder (``model.py``) and the UNETR skips (``network.py``) read.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from nnunet_hyspark.layers.blocks import TransformerBlock, init_vit_weights
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.patch_rules import check_patch_multiple

DEFAULT_VIT_PATCH = 12
DEFAULT_TAPS = (4, 7, 10)  # 1-based encoder blocks whose outputs the decoder (and the UNETR skips) read
LN_EPS = 1e-6
CLASS_TOKEN_KEY = "cls_token"  # pre-training only: the fine-tuning ViT has no class token

#: Encoder presets (the plans carry the expanded values) and the pre-training decoder of each.
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "taps": [4, 7, 10]},
    "large": {"embed_dim": 1536, "depth": 12, "num_heads": 16, "mlp_ratio": 4.0, "taps": [4, 7, 10]},
    "tiny": {"embed_dim": 48, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "taps": [1, 2, 3]},  # tests, CPU demos
}


def token_grid(spatial_shape: Sequence[int], vit_patch: int, what: str = "patch size") -> tuple[int, ...]:
    """The token grid of an input; the project's patch rule (a PatchSizeError, also a ValueError) otherwise."""
    check_patch_multiple(spatial_shape, vit_patch, what, dims=None, why=f"the ViT patch is {vit_patch}",
                         hint=f"use e.g. {{lo}} or {{hi}} on axis {{axis}} (plan with hyspark_plan_and_preprocess "
                              f"--network hiend_mae --vit-patch {vit_patch})")
    return tuple(int(n) // vit_patch for n in spatial_shape)


class ViTEncoder(nn.Module):
    """Plain 3D ViT. ``forward(x, keep_idx)`` -> [tapped block outputs..., final normed], each
    (B, P + K, D) with P = :attr:`num_prefix_tokens` (1 with a class token, else 0)."""

    def __init__(self, in_channels: int = 1, vit_patch: int = DEFAULT_VIT_PATCH, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, taps: Sequence[int] = DEFAULT_TAPS,
                 class_token: bool = True):
        super().__init__()
        taps = tuple(int(t) for t in taps)
        if list(taps) != sorted(set(taps)) or not taps or taps[0] < 1 or taps[-1] > depth:
            raise ValueError(f"taps {list(taps)} must be increasing 1-based block numbers within 1..{depth}")
        if embed_dim % 6:
            raise ValueError(f"ViT width {embed_dim} must be divisible by 6 (3D sin-cos positions)")
        self.in_channels, self.vit_patch, self.embed_dim, self.taps = in_channels, vit_patch, embed_dim, taps
        self.patch_embed = nn.Conv3d(in_channels, embed_dim, vit_patch, stride=vit_patch)
        # pre-training keeps the published class token; the published fine-tuning ViT has none
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.num_prefix_tokens = int(class_token)
        self.blocks = nn.ModuleList(TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=True, eps=LN_EPS)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self._pos_cache: dict = {}
        # MAE's initialisation: patch embedding like a Linear, class token N(0, 0.02), Xavier linears
        nn.init.xavier_uniform_(self.patch_embed.weight.view(embed_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_vit_weights)

    @property
    def pretraining_only_keys(self) -> tuple[str, ...]:
        """State-dict keys that fine-tuning weights files do not carry (``--init-from`` keeps their initialisation)."""
        return (CLASS_TOKEN_KEY,) if self.cls_token is not None else ()

    def grid(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        return token_grid(spatial_shape, self.vit_patch, "input")

    def pos_embed(self, grid: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, L, D) fixed sin-cos positions of the token grid (the class token's position is zero)."""
        key = (tuple(grid), device, dtype)
        if key not in self._pos_cache:
            self._pos_cache = {key: sincos_3d(self.embed_dim, grid)[None].to(device=device, dtype=dtype)}
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``keep_idx`` (B, K): flat indices of the tokens to encode (all tokens when None)."""
        grid = self.grid(x.shape[2:])
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, D), row-major grid order
        tokens = tokens + self.pos_embed(grid, tokens.device, tokens.dtype)
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx[..., None].expand(-1, -1, tokens.shape[-1]))
        h = tokens
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        outputs = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            if i in self.taps:
                outputs.append(h)
        return outputs + [self.norm(h)]

    def token_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All tokens of ``x`` encoded; every output (tapped blocks, final) as a (B, D, gx, gy, gz) map."""
        grid = self.grid(x.shape[2:])
        return [f[:, self.num_prefix_tokens:].transpose(1, 2).reshape(f.shape[0], f.shape[-1], *grid)
                for f in self(x)]
