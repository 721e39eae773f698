"""Small building blocks of the hybrid network (MedNeXt-style CNN, pre-norm ViT, U-Net decoder).

Names of sub-modules follow the published HySparK checkpoint (conv1/norm/conv2/conv3,
timm's norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2) so weights map one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.layers.depthwise import depthwise_conv3d, depthwise_up2


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, X, Y, Z) map, independently per voxel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


def pointwise_mlp(h: torch.Tensor, norm: ChannelLayerNorm, expand: nn.Conv3d, act: nn.Module,
                  project: nn.Conv3d) -> torch.Tensor:
    """``project(act(expand(norm(h))))`` for 1x1x1 convs, computed channels-last: the LayerNorm over channels
    and the two 1x1 convs become a contiguous LayerNorm and two matrix products (one layout change in, one
    out) instead of permutes around every op. Returns a (B, C, X, Y, Z) view of a channels-last result."""
    h = h.movedim(1, -1)
    h = F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)
    h = act(F.linear(h, expand.weight.flatten(1), expand.bias))
    return F.linear(h, project.weight.flatten(1), project.bias).movedim(-1, 1)


class MedNeXtBlock(nn.Module):
    """Depthwise k3 conv -> channel LayerNorm -> 1x1 expand (r) -> GELU -> 1x1 project, plus residual."""

    def __init__(self, channels: int, expansion: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = ChannelLayerNorm(channels)
        self.conv2 = nn.Conv3d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(expansion * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + pointwise_mlp(depthwise_conv3d(x, self.conv1), self.norm, self.conv2, self.act, self.conv3)


class MedNeXtUpBlock(nn.Module):
    """MedNeXt block whose depthwise conv is a stride-2 transposed conv; doubles the resolution."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 4):
        super().__init__()
        self.conv1 = nn.ConvTranspose3d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels)
        self.norm = ChannelLayerNorm(in_channels)
        self.conv2 = nn.Conv3d(in_channels, expansion * in_channels, 1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(expansion * in_channels, out_channels, 1)
        self.res_conv = nn.ConvTranspose3d(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            # both paths below read x as (B, X, Y, Z, C) rows; on a channels-first x (a ResBlock's output) they
            # ran strided, and the up-convolution's step took 2.2x as long (64 channels at 32^3, fp32, Xeon with
            # AMX); this copy is of the low-resolution input, 1/8 of the output's size
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = pointwise_mlp(depthwise_up2(x, self.conv1), self.norm, self.conv2, self.act, self.conv3)
        return add_up_residual(y, x, self.res_conv)


def add_up_residual(y: torch.Tensor, x: torch.Tensor, res_conv: nn.ConvTranspose3d) -> torch.Tensor:
    """``y + pad_low(res_conv(x))`` for a 1x1x1, stride-2 transposed conv, added into ``y`` in place. Why: that
    conv writes ``W x[i] + b`` at output ``2i``, only its bias between, and the pad shifts all by one voxel, so
    the sum is ``y + b`` everywhere but the low padding planes, plus ``W x`` at the odd voxels: one small
    matrix product at the input's resolution instead of a full-resolution transposed conv, pad and sum."""
    out = y.movedim(1, -1)  # (B, X, Y, Z, C); contiguous where y is channels-last
    weight = res_conv.weight.flatten(1).t()  # (C_out, C_in)
    if res_conv.bias is not None:
        out[:, 1:, 1:, 1:] += res_conv.bias
    out[:, 1::2, 1::2, 1::2] += F.linear(x.movedim(1, -1), weight)
    return out.movedim(-1, 1)


class ResBlock(nn.Module):
    """(Conv k3 -> InstanceNorm -> LeakyReLU) -> Conv k3 -> InstanceNorm, + 1x1 shortcut, -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1)
        self.shortcut_norm = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + self.shortcut_norm(self.shortcut(x)))


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: one qkv projection, one output projection)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"ViT width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_vit_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero bias; unit LayerNorms (MAE's ViT initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def decode_with_deep_supervision(h: torch.Tensor, steps, skips, heads, deep_supervision: bool):
    """Run decoder steps deepest first (``h = step(h, skip)``), in nnU-Net's output convention:
    with deep supervision a list of logits from every step, largest first; else the last head's logits."""
    outputs = []
    for step, skip, head in zip(steps, skips, heads):
        h = step(h, skip)
        if deep_supervision:
            outputs.append(head(h))
    if not deep_supervision:
        return heads[-1](h)
    return outputs[::-1]

