"""MiM's backbone (ConvMAE-style), shared by pre-training (masked) and the fine-tuning MiMUNet (dense).

Three conv stages (Conv3d k2 s2 + LayerNorm + GELU, then conv blocks
``x + pw(dw5(mask * pw(LN x)))``, ``x + MLP(LN x)``; the mask keeps masked regions from
leaking into kept ones), a fourth Conv3d k2 s2 to the 1/16 token grid, a Linear, fixed 3D
sin-cos positions (rebuilt for every grid, never stored), ViT blocks and a final LayerNorm.

LayerNorm eps is 1e-5 in the patch embeddings and the conv blocks and 1e-6 in the ViT, as in
the published model (the two differ by about 1e-4 relative in the encoder's output). The
fine-tuning network adds layer-scale (``gamma_1``, ``gamma_2``, initial value 1) and stochastic
depth (0 to 0.2 over the ViT blocks) to the ViT blocks, as the published fine-tuning backbone
does; pre-training uses neither, and its checkpoints hold no layer-scale tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nnunet_hyspark.layers.blocks import ChannelLayerNorm, TransformerBlock, init_vit_weights
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.masking import upsample_mask
from nnunet_hyspark.methods.mim.levels import CELL, token_grid
from nnunet_hyspark.patch_rules import check_patch_multiple

DEFAULT_WIDTHS = (48, 96, 192, 384)
DEFAULT_CONV_DEPTHS = (2, 2, 2)
CONV_LN_EPS = 1e-5  # patch embeddings and conv blocks (torch's LayerNorm default, as published)
VIT_LN_EPS = 1e-6  # ViT blocks, the final norm and the MAE decoder
#: stochastic depth of the last ViT block in fine-tuning (linearly from 0 at the first), as published
FINETUNE_DROP_PATH = 0.2


class DownConv(nn.Module):
    """Conv3d(k2, s2) + channel LayerNorm + GELU (ConvMAE's patch embedding between stages)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)
        self.norm = ChannelLayerNorm(out_channels, CONV_LN_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvBlock(nn.Module):
    """ConvMAE's CBlock in 3D: ``x + pw2(dw5(mask * pw1(LN x)))``, then ``x + fc2(GELU(fc1(LN x)))``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, kernel_size: int = 5):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels, CONV_LN_EPS)
        self.pw1 = nn.Conv3d(channels, channels, 1)
        self.dw = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.pw2 = nn.Conv3d(channels, channels, 1)
        self.norm2 = ChannelLayerNorm(channels, CONV_LN_EPS)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv3d(channels, hidden, 1), nn.GELU(), nn.Conv3d(hidden, channels, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.pw1(self.norm1(x))
        if mask is not None:
            y = y * mask  # the only spatial op (dw) must not read masked regions
        x = x + self.pw2(self.dw(y))
        return x + self.mlp(self.norm2(x))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch ``x`` of whole samples with probability ``rate``
    (training only), scaling the kept ones by ``1 / (1 - rate)`` so the expectation is unchanged."""
    if rate <= 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= rate
    return x * keep.to(x.dtype) / (1.0 - rate)


class ViTBlock(TransformerBlock):
    """Pre-norm ViT block (qkv bias, LayerNorm eps 1e-6) with optional layer-scale and stochastic depth:
    ``x + drop(gamma_1 * attn(norm1 x))``, ``x + drop(gamma_2 * mlp(norm2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: bool = False,
                 drop_path_rate: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, eps=VIT_LN_EPS)
        # named as the published fine-tuning backbone names them; initial value 1 = the block without them
        self.gamma_1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + drop_path(y if self.gamma_1 is None else self.gamma_1 * y, self.drop_path_rate, self.training)
        y = self.mlp(self.norm2(x))
        return x + drop_path(y if self.gamma_2 is None else self.gamma_2 * y, self.drop_path_rate, self.training)


def layer_scale_keys(vit_depth: int) -> list[str]:
    """The backbone's layer-scale tensors (fine-tuning only; pre-trained files do not hold them)."""
    return [f"blocks.{i}.gamma_{j}" for i in range(vit_depth) for j in (1, 2)]


class MiMBackbone(nn.Module):
    """Conv stages to 1/8, Conv3d k2 s2 to the 1/16 tokens, Linear, sin-cos positions, ViT, LayerNorm.

    ``forward(x)`` (dense) returns the four stage outputs ``[x1, x2, x3, x4]`` at 1/2 ... 1/16,
    ``x4`` being the normed ViT tokens as a map. The masked path used in pre-training is
    :meth:`conv_stages` with a mask, :meth:`embed_tokens`, :meth:`transformer` on the kept
    tokens, and :attr:`norm` (the MiM model adds the fused stage features before the norm).
    ``layer_scale`` and ``drop_path`` are the fine-tuning network's (see the module docstring).
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS,
                 conv_depths: Sequence[int] = DEFAULT_CONV_DEPTHS, vit_depth: int = 11, vit_heads: int = 12,
                 vit_mlp_ratio: float = 4.0, conv_mlp_ratio: float = 4.0, kernel_size: int = 5,
                 layer_scale: bool = False, drop_path: float = 0.0):
        super().__init__()
        if len(widths) != 4 or len(conv_depths) != 3:
            raise ValueError("MiMBackbone needs four widths (stages 1-4) and three conv depths (stages 1-3)")
        if widths[3] % 6 != 0:
            raise ValueError(f"the ViT width {widths[3]} must be divisible by 6 (3D sin-cos positions)")
        self.in_channels = in_channels
        self.widths = tuple(int(w) for w in widths)
        self.vit_mlp_ratio = float(vit_mlp_ratio)
        ins = (in_channels, *self.widths[:3])
        self.downs = nn.ModuleList(DownConv(ins[i], self.widths[i]) for i in range(4))
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvBlock(self.widths[i], conv_mlp_ratio, kernel_size) for _ in range(conv_depths[i]))
            for i in range(3))
        self.token_linear = nn.Linear(self.widths[3], self.widths[3])
        # stochastic depth grows linearly with depth, 0 at the first block (plain floats: no tensor on a meta device)
        rates = [float(drop_path) * i / max(1, vit_depth - 1) for i in range(vit_depth)]
        self.blocks = nn.ModuleList(ViTBlock(self.widths[3], vit_heads, vit_mlp_ratio, layer_scale, rates[i])
                                    for i in range(vit_depth))
        self.norm = nn.LayerNorm(self.widths[3], eps=VIT_LN_EPS)
        self.apply(init_vit_weights)

    def config(self) -> dict:
        """Constructor arguments that rebuild this backbone (stored in weights files)."""
        return {"in_channels": self.in_channels, "widths": list(self.widths),
                "conv_depths": [len(s) for s in self.stages], "vit_depth": len(self.blocks),
                "vit_heads": self.blocks[0].attn.num_heads if len(self.blocks) else 12,
                "vit_mlp_ratio": self.vit_mlp_ratio}

    @staticmethod
    def check_input(spatial_shape: Sequence[int]) -> None:
        """The project's patch rule (a PatchSizeError, also a ValueError) for the backbone's stride."""
        check_patch_multiple(spatial_shape, CELL, "input", why=f"the MiM backbone downsamples by {CELL}", dims=None)

    def conv_stages(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage 1-3 outputs (1/2, 1/4, 1/8). ``mask`` (B, gx, gy, gz), True = kept token cell."""
        feats = []
        for i in range(3):
            x = self.downs[i](x)
            m = None if mask is None else upsample_mask(mask, 8 >> i).to(x.dtype)
            for block in self.stages[i]:
                x = block(x, m)
            feats.append(x)
        return feats

    def embed_tokens(self, x3: torch.Tensor) -> torch.Tensor:
        """Stage 4: (B, C3, 1/8) -> (B, L, D) tokens with their sin-cos positions, row-major order."""
        t = self.downs[3](x3)
        tokens = self.token_linear(t.flatten(2).transpose(1, 2))
        pos = sincos_3d(self.widths[3], t.shape[2:]).to(tokens.device, tokens.dtype)
        return tokens + pos[None]

    def transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x.shape[2:])
        feats = self.conv_stages(x)
        tokens = self.norm(self.transformer(self.embed_tokens(feats[2])))
        grid = token_grid(x.shape[2:])
        feats.append(tokens.transpose(1, 2).reshape(x.shape[0], self.widths[3], *grid))
        return feats
