"""HySparKUNet: the hybrid encoder under a MedNeXt/ResBlock U-Net decoder, as nnU-Net builds it from plans.

nnU-Net contract: constructor ``(input_channels, num_classes, **arch_kwargs)``;
``network.decoder.deep_supervision`` toggles between a list of logits (largest
first: 1, 1/2, 1/4, 1/8) and a single tensor; heads live in
``decoder.seg_layers`` so ``-pretrained_weights`` skips them. The state dict has
no grid-sized tensors, so one weights file serves every patch size.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nnunet_hyspark.layers.blocks import MedNeXtBlock, MedNeXtUpBlock, ResBlock, decode_with_deep_supervision
from nnunet_hyspark.methods.hyspark.encoder import (DEFAULT_DEPTHS, DEFAULT_EXPANSIONS, DEFAULT_WIDTHS, HybridEncoder,
                                                    check_divisible)

DECODER_SKIP_EXPANSIONS = (2, 4, 4, 4)  # MedNeXt ratio on the skip of decoder1..decoder4
FIXED_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # per scale; deep supervision 1..1/8


class FusionStep(nn.Module):
    """Upsample the deeper map, refine the skip, fuse both: ResBlock(cat(Block(e), Up(d)))."""

    def __init__(self, in_channels: int, out_channels: int, skip_expansion: int):
        super().__init__()
        self.skip_block = MedNeXtBlock(in_channels, skip_expansion)
        self.up = MedNeXtUpBlock(in_channels, out_channels)
        self.fuse = ResBlock(in_channels + out_channels, out_channels)

    def forward(self, deeper: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.skip_block(skip), self.up(deeper)], dim=1))


class HySparKDecoder(nn.Module):
    """Four fusion steps, deepest first, and one 1x1 segmentation head per output scale."""

    def __init__(self, widths: Sequence[int], num_classes: int, deep_supervision: bool = True):
        super().__init__()
        self.deep_supervision = deep_supervision
        # steps[0] is decoder4 (x5 + x4 -> w3) ... steps[3] is decoder1 (-> w0 at full resolution)
        self.steps = nn.ModuleList(
            FusionStep(widths[k], widths[k - 1], DECODER_SKIP_EXPANSIONS[k - 1]) for k in (4, 3, 2, 1))
        self.seg_layers = nn.ModuleList(nn.Conv3d(widths[k - 1], num_classes, 1) for k in (4, 3, 2, 1))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x1, x2, x3, x4, x5 = skips
        return decode_with_deep_supervision(x5, self.steps, (x4, x3, x2, x1), self.seg_layers,
                                            self.deep_supervision)


class HySparKUNet(nn.Module):
    """The fine-tuning network of HySparK (``docs/methods.md``)."""

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int] | None = None,
                 widths: Sequence[int] = DEFAULT_WIDTHS, depths: Sequence[int] = DEFAULT_DEPTHS,
                 expansions: Sequence[int] = DEFAULT_EXPANSIONS, vit_depth: int = 3, vit_heads: int = 12,
                 vit_mlp_ratio: float = 4.0, deep_supervision: bool = True, strides: Sequence | None = None):
        super().__init__()
        if patch_size is not None:
            check_divisible(patch_size)
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        # Plans carry the encoder's strides only because nnU-Net's trainer derives its deep-supervision scales
        # from them (ConfigurationManager.pool_op_kernel_sizes); the network's strides are fixed.
        if strides is not None and [[int(s) for s in st] for st in strides] != [list(s) for s in FIXED_STRIDES]:
            raise ValueError(f"strides {strides} do not match HySparKUNet's fixed strides {FIXED_STRIDES} "
                             "(full resolution, then four 2x downsamplings); fix the plans")
        self.strides = FIXED_STRIDES
        self.encoder = HybridEncoder(input_channels, widths, depths, expansions, vit_depth, vit_heads, vit_mlp_ratio)
        self.decoder = HySparKDecoder(widths, num_classes, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        # channels_last_3d stem output on the CPU (same numbers): measured with the other block changes,
        # 64^3 batch 2, 2 threads, Xeon, one training step 15.7 s (13.2 in a second sample) -> 12.4 s
        return self.decoder(self.encoder(x, channels_last=x.device.type == "cpu"))
