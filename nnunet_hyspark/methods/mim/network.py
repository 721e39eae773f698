"""MiMUNet: the MiM backbone under a Swin-UNETR-style decoder, as nnU-Net builds it from plans.

Encoder: :class:`~nnunet_hyspark.methods.mim.backbone.MiMBackbone` run densely (all tokens) with
the published fine-tuning backbone's additions: layer-scale in the ViT blocks (``gamma_1``,
``gamma_2``, initial value 1, so a pre-trained backbone computes the same function at the start)
and stochastic depth over the ViT blocks (0 at the first to 0.2 at the last; ``drop_path``), plus
a fifth stage ``Conv3d(384 -> 768, k2 s2) + BatchNorm + GELU`` to 1/32 (nnU-Net converts the
BatchNorm to SyncBatchNorm under DDP, as the published code uses). Stage outputs are
layer-normed (eps 1e-5; stage 4 uses the backbone's own pre-trained final LayerNorm): widths
48 / 96 / 192 / 384 / 768 at 1/2 ... 1/32 with the defaults.

Decoder (Swin-UNETR's, feature size 48): a residual conv block on the input (48 at full
resolution) and on the stage 1-3 outputs, a residual block on the deepest output, then per
scale a transposed conv (k2 s2) upsampling, concatenation with the skip (stage 4 is used
as is, as Swin-UNETR does) and a residual block (:class:`~nnunet_hyspark.layers.blocks.ResBlock`:
conv k3 + InstanceNorm + LeakyReLU, twice, with a 1x1 shortcut). With the defaults this is
exactly Swin-UNETR's decoder at feature size 48 on MiM's stage widths.

The fifth stage halves 1/16 to 1/32, so patch axes must be multiples of 32 (the MiM plans,
``hyspark_plan_and_preprocess --network mim``, produce such patches; MiM pre-training
needs them anyway for its octant grouping), and not 32 on every axis (a single deepest
voxel cannot be instance-normed in training). ``fifth_stage=False`` drops the fifth
stage for multiples of 16 (the deepest scale is then the ViT tokens).

nnU-Net contract: constructor ``(input_channels, num_classes, **arch_kwargs)``;
``arch_kwargs['strides']`` = ``[[1,1,1]] + [[2,2,2]] * 5`` (four with ``fifth_stage=False``),
from which nnU-Net's trainer derives its deep-supervision scales; ``decoder.deep_supervision``
toggles between the list of logits (full resolution first: 1, 1/2, 1/4, 1/8, 1/16) and a
single tensor; heads live in ``decoder.seg_layers`` so ``-pretrained_weights`` skips them.
No grid-sized tensors are stored (positions are fixed sin-cos), so one weights file serves
every patch size.

Weights files: ``weights.py`` in this package.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nnunet_hyspark.layers.blocks import ChannelLayerNorm, ResBlock, decode_with_deep_supervision
from nnunet_hyspark.methods.mim.backbone import DEFAULT_CONV_DEPTHS, DEFAULT_WIDTHS, FINETUNE_DROP_PATH, MiMBackbone
from nnunet_hyspark.patch_rules import check_patch_multiple

#: constructor arguments of MiMUNet that describe the architecture (stored in weights files)
ARCH_KEYS = ("widths", "conv_depths", "vit_depth", "vit_heads", "vit_mlp_ratio", "fifth_stage", "fifth_width",
             "feature_size", "layer_scale", "drop_path")
STAGE_NORM_EPS = 1e-5  # torch's layer_norm default, which the published network uses on its stage outputs


def strides_for(fifth_stage: bool = True) -> list[list[int]]:
    """The plans' ``strides``: full resolution, then one 2x downsampling per encoder stage."""
    return [[1, 1, 1]] + [[2, 2, 2]] * (5 if fifth_stage else 4)


class UpStep(nn.Module):
    """Swin-UNETR's up block: transposed conv k2 s2, concatenate the skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
        self.block = ResBlock(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class MiMUNetDecoder(nn.Module):
    """Skip blocks at scales 0-3, a block on the deepest map, one up step per scale, one head per output."""

    def __init__(self, input_channels: int, stage_widths: Sequence[int], feature_size: int, num_classes: int,
                 deep_supervision: bool = True):
        super().__init__()
        self.deep_supervision = deep_supervision
        c = [feature_size, *stage_widths]  # channels per scale: full resolution, 1/2, 1/4, ...
        self.skip_blocks = nn.ModuleList([ResBlock(input_channels, c[0])] + [ResBlock(c[k], c[k]) for k in (1, 2, 3)])
        self.bottleneck = ResBlock(c[-1], c[-1])
        deepest = len(c) - 1
        # ups[0] goes from the deepest scale to the one above it; ups[-1] ends at full resolution
        self.ups = nn.ModuleList(UpStep(c[k], c[k - 1], c[k - 1]) for k in range(deepest, 0, -1))
        self.seg_layers = nn.ModuleList(nn.Conv3d(c[k - 1], num_classes, 1) for k in range(deepest, 0, -1))

    def forward(self, x: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        skips = [block(f) for block, f in zip(self.skip_blocks, [x, *stages[:3]])] + stages[3:-1]
        return decode_with_deep_supervision(self.bottleneck(stages[-1]), self.ups, list(reversed(skips)),
                                            self.seg_layers, self.deep_supervision)


class MiMUNet(nn.Module):
    """The MiM fine-tuning network (see the module docstring)."""

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int] | None = None,
                 widths: Sequence[int] = DEFAULT_WIDTHS, conv_depths: Sequence[int] = DEFAULT_CONV_DEPTHS,
                 vit_depth: int = 11, vit_heads: int = 12, vit_mlp_ratio: float = 4.0, fifth_stage: bool = True,
                 fifth_width: int | None = None, feature_size: int = 48, deep_supervision: bool = True,
                 strides: Sequence | None = None, layer_scale: bool = True, drop_path: float = FINETUNE_DROP_PATH):
        super().__init__()
        self.fifth_stage = bool(fifth_stage)
        self.multiple = 32 if self.fifth_stage else 16
        if patch_size is not None:
            self.check_input(patch_size, "MiMUNet patch_size")
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        # plans carry the strides only because nnU-Net's trainer derives its deep-supervision scales from them
        expected = strides_for(self.fifth_stage)
        if strides is not None and [[int(s) for s in st] for st in strides] != expected:
            raise ValueError(f"strides {strides} do not match MiMUNet's fixed strides {expected} (full resolution, "
                             f"then {len(expected) - 1} 2x downsamplings); fix the plans")
        self.strides = expected
        self.encoder = MiMBackbone(input_channels, widths, conv_depths, vit_depth, vit_heads, vit_mlp_ratio,
                                   layer_scale=layer_scale, drop_path=drop_path)
        w = list(self.encoder.widths)
        self.stage_norms = nn.ModuleList(ChannelLayerNorm(c, STAGE_NORM_EPS) for c in w[:3])
        if self.fifth_stage:
            fifth_width = int(fifth_width or 2 * w[3])
            self.stage5 = nn.Sequential(nn.Conv3d(w[3], fifth_width, 2, stride=2), nn.BatchNorm3d(fifth_width),
                                        nn.GELU())
            self.stage5_norm = ChannelLayerNorm(fifth_width, STAGE_NORM_EPS)
            w.append(fifth_width)
        self.decoder = MiMUNetDecoder(input_channels, w, feature_size, num_classes, deep_supervision)

    def check_input(self, spatial_shape: Sequence[int], what: str = "input") -> None:
        """The project's patch rule (a PatchSizeError, also a ValueError), and at least two deepest voxels."""
        hint = " (or use fifth_stage=False for multiples of 16)" if self.fifth_stage else ""
        shape = check_patch_multiple(spatial_shape, self.multiple, what, dims=None,
                                     why=f"MiMUNet downsamples by {self.multiple}",
                                     hint=f"use e.g. {{lo}} or {{hi}} on axis {{axis}}{hint}")
        # the fifth stage's BatchNorm and the decoder's instance norms need more than one value per channel
        if all(n == self.multiple for n in shape):
            raise ValueError(f"{what} {shape} leaves a single voxel at the deepest scale, where the decoder's "
                             f"instance norms cannot train: make one axis at least {2 * self.multiple}{hint}")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x.shape[2:])
        x1, x2, x3, x4 = self.encoder(x)  # x4: the backbone's normed ViT tokens
        stages = [norm(f) for norm, f in zip(self.stage_norms, (x1, x2, x3))] + [x4]
        if self.fifth_stage:
            stages.append(self.stage5_norm(self.stage5(x4)))
        return self.decoder(x, stages)
