"""HiEndUNETR: the Hi-End-MAE ViT under a UNETR decoder, as nnU-Net builds it from plans.

nnU-Net contract (like :class:`~nnunet_hyspark.methods.hyspark.network.HySparKUNet`): constructor
``(input_channels, num_classes, **arch_kwargs)``; ``network.decoder.deep_supervision``
toggles between a list of logits (largest first) and one tensor; heads live in
``decoder.seg_layers`` so ``-pretrained_weights`` skips them; positions are fixed sin-cos
rebuilt for the token grid, so one weights file serves every patch size (multiples of the
ViT patch on every axis, not only 96^3). As in the published fine-tuning UNETR, the ViT has no
class token and the decoder's feature size is 32 (widths 32, 64, 128, 256).

Resolution pyramid. UNETR with a 16^3 ViT patch climbs from the token grid (1/16) by four x2
steps, with skips from blocks 4, 7, 10 at 1/2, 1/4, 1/8 and the input convolution at full
resolution. A 12^3 patch has only three factors (12 = 3 * 2 * 2), so four levels need one
step of x1: the x3 step comes right after the token grid (cheapest) and the deepest skip
(block 10) joins the final output at the token grid:

============  ======================  ======================
level         ViT patch 16            ViT patch 12
============  ======================  ======================
3 (block 10)  1/8  (x2 from tokens)   1/12 (x1, token grid)
2 (block 7)   1/4  (x2)               1/4  (x3)
1 (block 4)   1/2  (x2)               1/2  (x2)
0 (input)     1    (x2)               1    (x2)
============  ======================  ======================

The decoder has one head per level, so deep supervision gives 4 outputs at scales
1, 1/2, 1/4 and 1/8 (patch 16) or 1/12 (patch 12). nnU-Net derives the scales of its
deep-supervision targets from the plans' ``arch_kwargs['strides']`` (cumulative products,
last one dropped); :func:`plans_strides` writes exactly this pyramid:
``[[1,1,1],[2,2,2],[2,2,2],[2,2,2],[2,2,2]]`` for 16 and
``[[1,1,1],[2,2,2],[2,2,2],[3,3,3],[1,1,1]]`` for 12. Other ViT patches follow the same rule
(prime factors, largest next to the token grid, x1 steps where fewer than four).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nnunet_hyspark.layers.blocks import ResBlock, decode_with_deep_supervision
from nnunet_hyspark.methods.hiend_mae.encoder import DEFAULT_TAPS, DEFAULT_VIT_PATCH, ViTEncoder, token_grid

NUM_LEVELS = 4  # decoder levels above the token grid, i.e. deep-supervision outputs
DEFAULT_FEATURE_SIZE = 32  # the published Hi-End-MAE fine-tuning UNETR's


def up_factors(vit_patch: int) -> tuple[int, ...]:
    """Upsampling factor of each decoder step, from the token grid to full resolution (product = vit_patch)."""
    n, primes, p = int(vit_patch), [], 2
    while n > 1:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if not primes or len(primes) > NUM_LEVELS:
        raise ValueError(f"ViT patch {vit_patch} must have 1 to {NUM_LEVELS} prime factors (e.g. 12 or 16)")
    return (1,) * (NUM_LEVELS - len(primes)) + tuple(sorted(primes, reverse=True))


def plans_strides(vit_patch: int) -> list[list[int]]:
    """``arch_kwargs['strides']`` for the plans: full resolution, then each level's factor from fine to coarse."""
    return [[1, 1, 1]] + [[f] * 3 for f in reversed(up_factors(vit_patch))]


def deep_supervision_scales(vit_patch: int) -> list[float]:
    """What nnU-Net computes from :func:`plans_strides` (its ``_get_deep_supervision_scales``), per axis."""
    scale, scales = 1, []
    for s in plans_strides(vit_patch)[:-1]:
        scale *= s[0]
        scales.append(1 / scale)
    return scales


class TokenPathway(nn.Module):
    """UNETR's PrUp block: a token map up to a skip resolution (transposed convs, ResBlocks after the first)."""

    def __init__(self, in_channels: int, out_channels: int, factors: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, f in enumerate(factors):
            layers.append(nn.ConvTranspose3d(in_channels if i == 0 else out_channels, out_channels, f, stride=f,
                                             bias=False))
            if i > 0:
                layers.append(ResBlock(out_channels, out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class UpBlock(nn.Module):
    """UNETR's up block: transposed conv (kernel = stride = factor), concat the skip, ResBlock."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, factor, stride=factor, bias=False)
        self.fuse = ResBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class UNETRDecoder(nn.Module):
    """Skips from the image and three tapped ViT layers; four up blocks; one head per level."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int, vit_patch: int,
                 feature_size: int = DEFAULT_FEATURE_SIZE, deep_supervision: bool = True):
        super().__init__()
        self.deep_supervision = deep_supervision
        f = up_factors(vit_patch)  # coarse (token grid -> level 3) to fine (level 1 -> level 0)
        fs = feature_size
        widths = (8 * fs, 4 * fs, 2 * fs, fs)  # levels 3, 2, 1, 0
        self.encoder1 = ResBlock(in_channels, fs)  # level 0, from the image
        self.encoder2 = TokenPathway(embed_dim, 2 * fs, f[:3])  # block 4 -> level 1
        self.encoder3 = TokenPathway(embed_dim, 4 * fs, f[:2])  # block 7 -> level 2
        self.encoder4 = TokenPathway(embed_dim, 8 * fs, f[:1])  # block 10 -> level 3
        self.up_blocks = nn.ModuleList(UpBlock(c_in, c_out, factor) for c_in, c_out, factor in
                                       zip((embed_dim, *widths[:-1]), widths, f))
        self.seg_layers = nn.ModuleList(nn.Conv3d(c, num_classes, 1) for c in widths)  # coarse first

    def forward(self, image: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """``maps`` = token maps (B, D, gx, gy, gz) of the tapped layers (shallowest first) and the final output."""
        tap1, tap2, tap3, final = maps
        skips = (self.encoder4(tap3), self.encoder3(tap2), self.encoder2(tap1), self.encoder1(image))
        return decode_with_deep_supervision(final, self.up_blocks, skips, self.seg_layers, self.deep_supervision)


class HiEndUNETR(nn.Module):
    """UNETR on the Hi-End-MAE ViT; follows the plans' patch size (multiples of ``vit_patch`` per axis)."""

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int] | None = None,
                 vit_patch: int = DEFAULT_VIT_PATCH, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, taps: Sequence[int] = DEFAULT_TAPS,
                 feature_size: int = DEFAULT_FEATURE_SIZE, strides: Sequence | None = None,
                 deep_supervision: bool = True):
        super().__init__()
        if len(taps) != NUM_LEVELS - 1:
            raise ValueError(f"UNETR needs {NUM_LEVELS - 1} tapped ViT blocks for its skips, got taps {list(taps)}")
        if patch_size is not None:
            token_grid(patch_size, vit_patch)
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        # Plans carry the strides only because nnU-Net's trainer derives its deep-supervision scales from them.
        expected = plans_strides(vit_patch)
        if strides is not None and [[int(s) for s in st] for st in strides] != expected:
            raise ValueError(f"strides {strides} do not match HiEndUNETR's pyramid for ViT patch {vit_patch}: "
                             f"{expected}; fix the plans (hyspark_plan_and_preprocess --network hiend_mae)")
        self.strides = expected
        # no class token: the published fine-tuning ViT has none (pre-training's is not exported)
        self.encoder = ViTEncoder(input_channels, vit_patch, embed_dim, depth, num_heads, mlp_ratio, taps,
                                  class_token=False)
        self.decoder = UNETRDecoder(input_channels, num_classes, embed_dim, vit_patch, feature_size,
                                    deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(x, self.encoder.token_maps(x))
