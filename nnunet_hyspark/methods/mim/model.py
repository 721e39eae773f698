"""MiM (Mask in Mask, IEEE TMI 2025): hierarchical masked image modelling on a ConvMAE-style backbone.

Read top to bottom, this file is the whole method (``docs/methods.md``):

1. :class:`MiMBackbone` -- three conv stages (Conv3d k2 s2 + LayerNorm + GELU, then conv
   blocks ``x + pw(dw5(mask * pw(LN x)))``, ``x + MLP(LN x)``; the mask keeps masked regions
   from leaking into kept ones), a fourth Conv3d k2 s2 to the 1/16 token grid, a Linear,
   fixed 3D sin-cos positions (rebuilt for every grid, never stored) and ViT blocks on the
   KEPT tokens only, then a final LayerNorm. The same module is the encoder of the
   fine-tuning network (:mod:`nnunet_hyspark.methods.mim.network`), run densely there.
2. :class:`MiM` -- the pre-training model. One crop of ``2P`` per sample gives three levels
   of volumes of the level patch ``P`` (geometry: :mod:`nnunet_hyspark.methods.mim.levels`):
   coarse (the crop resized; octants masked as groups), middle (``n_middle`` crop octants
   masked at the coarse level, native resolution), fine (``n_fine`` 16^3 cells masked at
   the middle level, upsampled). Every level goes through the same encoder (with the
   stage 1-3 outputs projected to the token width by Conv3d kernel = stride = 8, 4, 2,
   gathered at the kept tokens and added before the final LayerNorm, as ConvMAE does) and
   the same MAE decoder (Linear, mask token, sin-cos positions, blocks, LayerNorm, Linear
   to the 16^3 x C voxels of a cell).
3. Loss: per level, MSE on MASKED cells against per-cell normalised targets (weights 1, 1,
   1), plus cross-level alignment: decoder outputs (after its norm) mean-pooled per volume,
   through a 2-layer GELU MLP head, ``2 - 2 cos`` between every finer volume and the region
   of the coarser volume it came from (the coarse octant for a middle volume, the middle
   cell for a fine volume; mean-pooled over that region), the coarser side detached
   (weights 0.1, 0.1). The published code aligns the middle level with itself; here the
   middle level is aligned with the coarse level.

Defaults are the paper's: widths 48/96/192/384, 2 conv blocks per stage, 11 ViT blocks with
12 heads, decoder 576 wide with 8 blocks and 16 heads, mask ratios 0.5 / 0.6 / 0.5,
4 middle volumes per sample and 4 fine volumes per middle volume (1 + 4 + 16 encoder passes
per sample). Level patches need axes that are multiples of 32 (see ``levels.py``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.layers.blocks import ChannelLayerNorm, TransformerBlock, init_vit_weights
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.mae import masked_patch_mse, preview_images
from nnunet_hyspark.masking import kept_token_indices, random_cell_mask, upsample_mask
from nnunet_hyspark.methods.mim.levels import (CELL, LEVEL_MULTIPLE, choose_among, coarse_volume, cut_octants,
                                               fine_volumes, grouped_mask, level_patch_size, masked_cells,
                                               octant_pooling_matrix, token_grid)
from nnunet_hyspark.methods.spec import ModelOptions
from nnunet_hyspark.patch_rules import check_patch_multiple

DEFAULT_WIDTHS = (48, 96, 192, 384)
DEFAULT_CONV_DEPTHS = (2, 2, 2)
LN_EPS = 1e-6
#: the paper's optimisation (hyspark_pretrain defaults for --method mim): AdamW betas (0.9, 0.95), weight decay
#: 0.05 (biases and 1-D parameters exempt), 40 warm-up epochs of 800, half-cycle cosine, no gradient clipping.
#: The paper scales the peak lr as 1e-4 x batch / 256; pass --lr for that (the default is 1e-4 unscaled).
RECIPE = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": (0.05, 0.05), "warmup_fraction": 0.05, "clip_grad": 0.0}


# ============================================================================================ backbone


class DownConv(nn.Module):
    """Conv3d(k2, s2) + channel LayerNorm + GELU (ConvMAE's patch embedding between stages)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)
        self.norm = ChannelLayerNorm(out_channels, LN_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvBlock(nn.Module):
    """ConvMAE's CBlock in 3D: ``x + pw2(dw5(mask * pw1(LN x)))``, then ``x + fc2(GELU(fc1(LN x)))``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, kernel_size: int = 5):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels, LN_EPS)
        self.pw1 = nn.Conv3d(channels, channels, 1)
        self.dw = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.pw2 = nn.Conv3d(channels, channels, 1)
        self.norm2 = ChannelLayerNorm(channels, LN_EPS)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv3d(channels, hidden, 1), nn.GELU(), nn.Conv3d(hidden, channels, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.pw1(self.norm1(x))
        if mask is not None:
            y = y * mask  # the only spatial op (dw) must not read masked regions
        x = x + self.pw2(self.dw(y))
        return x + self.mlp(self.norm2(x))


class MiMBackbone(nn.Module):
    """Conv stages to 1/8, Conv3d k2 s2 to the 1/16 tokens, Linear, sin-cos positions, ViT, LayerNorm.

    ``forward(x)`` (dense) returns the four stage outputs ``[x1, x2, x3, x4]`` at 1/2 ... 1/16,
    ``x4`` being the normed ViT tokens as a map. The masked path used in pre-training is
    :meth:`conv_stages` with a mask, :meth:`embed_tokens`, :meth:`transformer` on the kept
    tokens, and :attr:`norm` (the MiM model adds the fused stage features before the norm).
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS,
                 conv_depths: Sequence[int] = DEFAULT_CONV_DEPTHS, vit_depth: int = 11, vit_heads: int = 12,
                 vit_mlp_ratio: float = 4.0, conv_mlp_ratio: float = 4.0, kernel_size: int = 5):
        super().__init__()
        if len(widths) != 4 or len(conv_depths) != 3:
            raise ValueError("MiMBackbone needs four widths (stages 1-4) and three conv depths (stages 1-3)")
        if widths[3] % 6 != 0:
            raise ValueError(f"the ViT width {widths[3]} must be divisible by 6 (3D sin-cos positions)")
        self.in_channels = in_channels
        self.widths = tuple(int(w) for w in widths)
        ins = (in_channels, *self.widths[:3])
        self.downs = nn.ModuleList(DownConv(ins[i], self.widths[i]) for i in range(4))
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvBlock(self.widths[i], conv_mlp_ratio, kernel_size) for _ in range(conv_depths[i]))
            for i in range(3))
        self.token_linear = nn.Linear(self.widths[3], self.widths[3])
        self.blocks = nn.ModuleList(TransformerBlock(self.widths[3], vit_heads, vit_mlp_ratio, qkv_bias=True, eps=LN_EPS)
                                    for _ in range(vit_depth))
        self.norm = nn.LayerNorm(self.widths[3], eps=LN_EPS)
        self.apply(init_vit_weights)

    def config(self) -> dict:
        """Constructor arguments that rebuild this backbone (stored in weights files)."""
        return {"in_channels": self.in_channels, "widths": list(self.widths),
                "conv_depths": [len(s) for s in self.stages], "vit_depth": len(self.blocks),
                "vit_heads": self.blocks[0].attn.num_heads if len(self.blocks) else 12}

    @staticmethod
    def check_input(spatial_shape: Sequence[int]) -> None:
        for axis, n in enumerate(spatial_shape):
            if n % CELL or n <= 0:
                raise ValueError(f"input {tuple(spatial_shape)}: axis {axis} has {n} voxels, not a positive multiple "
                                 f"of {CELL} (the MiM backbone downsamples by {CELL})")

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


# ============================================================================================ pre-training


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, L, C) at (B, K) indices -> (B, K, C)."""
    return torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))


def default_decoder_width(vit_width: int) -> int:
    """1.5 x the ViT width, a multiple of 6 (576 for the default 384)."""
    return max(6, round(1.5 * vit_width / 6) * 6)


def default_decoder_heads(width: int) -> int:
    """Heads of width 36 (16 for 576), at least one, dividing ``width``."""
    heads = max(1, width // 36)
    while width % heads:
        heads -= 1
    return heads


def alignment_loss(finer: torch.Tensor, coarser: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """``2 - 2 cos(head(finer), head(coarser))`` averaged; the coarser side is detached."""
    p = F.normalize(head(finer), dim=-1)
    z = F.normalize(head(coarser), dim=-1).detach()
    return (2 - 2 * (p * z).sum(-1)).mean()


class MiM(nn.Module):
    """The MiM pre-training model around a :class:`MiMBackbone` (``self.encoder``, shared with fine-tuning).

    ``forward(crops)`` takes crops of ``2P`` (B, C, 2X, 2Y, 2Z) and returns ``loss`` (the total),
    the per-level terms (``loss_coarse`` ... ``align_middle_fine``, detached) and ``levels``:
    per level the volumes, the masks and the predictions (for previews).
    """

    LEVELS = ("coarse", "middle", "fine")

    def __init__(self, encoder: MiMBackbone, decoder_width: int | None = None, decoder_depth: int = 8,
                 decoder_heads: int | None = None, mask_ratios: Sequence[float] = (0.5, 0.6, 0.5),
                 n_middle: int = 4, n_fine: int = 4, level_weights: Sequence[float] = (1.0, 1.0, 1.0),
                 align_weights: Sequence[float] = (0.1, 0.1), align_dim: int = 256, mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        w, d = encoder.widths, encoder.widths[3]
        width = decoder_width or default_decoder_width(d)
        heads = decoder_heads or default_decoder_heads(width)
        if width % 6 or width % heads:
            raise ValueError(f"decoder width {width} must be divisible by 6 (sin-cos positions) and by {heads} heads")
        if len(mask_ratios) != 3 or len(level_weights) != 3 or len(align_weights) != 2:
            raise ValueError("MiM needs three mask ratios, three level weights and two alignment weights")
        self.mask_ratios = tuple(float(r) for r in mask_ratios)
        self.n_middle, self.n_fine = int(n_middle), int(n_fine)
        self.level_weights = tuple(float(x) for x in level_weights)
        self.align_weights = tuple(float(x) for x in align_weights)
        n_coarse_masked = 8 - max(1, round(8 * (1 - self.mask_ratios[0])))
        if not 1 <= self.n_middle <= n_coarse_masked:
            raise ValueError(f"n_middle={n_middle} must be between 1 and the {n_coarse_masked} octants the coarse "
                             f"mask ratio {self.mask_ratios[0]} hides")
        if self.n_fine < 1:
            raise ValueError("n_fine must be at least 1")

        # stage 1-3 outputs projected to the token grid (kernel = stride = 8, 4, 2), added before the final norm
        self.fusion = nn.ModuleList(nn.Conv3d(w[i], d, 8 >> i, stride=8 >> i) for i in range(3))
        # MAE decoder
        self.decoder_width = width
        self.decoder_embed = nn.Linear(d, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, qkv_bias=True, eps=LN_EPS)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.decoder_pred = nn.Linear(width, CELL ** 3 * encoder.in_channels)
        # cross-level alignment heads: coarse-middle and middle-fine
        self.align_heads = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, align_dim))
            for name in ("coarse_middle", "middle_fine")})
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred, self.align_heads):
            module.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def config(self) -> dict:
        """The pre-training hyper-parameters (stored in weights files' metadata)."""
        return {"decoder_width": self.decoder_width, "decoder_depth": len(self.decoder_blocks),
                "decoder_heads": self.decoder_blocks[0].attn.num_heads if len(self.decoder_blocks) else None,
                "mask_ratios": list(self.mask_ratios), "n_middle": self.n_middle, "n_fine": self.n_fine,
                "level_weights": list(self.level_weights), "align_weights": list(self.align_weights)}

    # ------------------------------------------------------------------ encoder and decoder, one level
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Kept-token latents (B, K, D): conv stages under the mask, ViT on kept tokens, fused stages, norm."""
        feats = self.encoder.conv_stages(x, mask)
        idx = kept_token_indices(mask)
        kept = self.encoder.transformer(gather_tokens(self.encoder.embed_tokens(feats[2]), idx))
        for proj, f in zip(self.fusion, feats):
            kept = kept + gather_tokens(proj(f).flatten(2).transpose(1, 2), idx)
        return self.encoder.norm(kept)

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept latents -> (decoder tokens after the norm (B, L, W), per-cell predictions (B, L, 16^3 C))."""
        b, grid = mask.shape[0], mask.shape[1:]
        idx = kept_token_indices(mask)
        kept = self.decoder_embed(latent)
        tokens = self.mask_token.to(kept.dtype).expand(b, grid.numel(), -1).clone()
        tokens = tokens.scatter(1, idx[..., None].expand(-1, -1, kept.shape[-1]), kept)
        tokens = tokens + sincos_3d(self.decoder_width, grid).to(tokens.device, tokens.dtype)[None]
        for block in self.decoder_blocks:
            tokens = block(tokens)
        tokens = self.decoder_norm(tokens)
        return tokens, self.decoder_pred(tokens)

    # ------------------------------------------------------------------ the three levels
    def make_levels(self, crops: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Cut the levels and draw their masks (see :mod:`nnunet_hyspark.methods.mim.levels`)."""
        b, dev = crops.shape[0], crops.device
        patch = level_patch_size(crops.shape[2:])
        grid = token_grid(patch)
        coarse = coarse_volume(crops, patch)
        coarse_mask, masked_octants = grouped_mask(b, grid, self.mask_ratios[0], generator, dev)
        octants = choose_among(masked_octants, self.n_middle, generator)  # (B, n_middle)
        middle = cut_octants(crops, octants)  # (B * n_middle, C, P)
        middle_mask = random_cell_mask(middle.shape[0], grid, self.mask_ratios[1], generator, dev)
        cells = choose_among(masked_cells(middle_mask), self.n_fine, generator)  # (B * n_middle, n_fine)
        fine = fine_volumes(middle, cells)  # (B * n_middle * n_fine, C, P)
        fine_mask = random_cell_mask(fine.shape[0], grid, self.mask_ratios[2], generator, dev)
        return {"coarse": {"volume": coarse, "mask": coarse_mask}, "middle": {"volume": middle, "mask": middle_mask},
                "fine": {"volume": fine, "mask": fine_mask}, "octants": octants, "cells": cells, "grid": grid}

    def forward(self, crops: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        levels = self.make_levels(crops, generator)
        out: dict = {"levels": levels}
        total = crops.new_zeros(())
        decoded = {}
        for name, weight in zip(self.LEVELS, self.level_weights):
            lv = levels[name]
            tokens, pred = self.decode(self.encode(lv["volume"], lv["mask"]), lv["mask"])
            loss = masked_patch_mse(pred.float(), lv["volume"].float(), lv["mask"], CELL)
            lv["pred"], decoded[name] = pred, tokens.float()
            out[f"loss_{name}"] = loss.detach()
            total = total + weight * loss

        align_cm, align_mf = self.alignment(levels, decoded)
        out["align_coarse_middle"], out["align_middle_fine"] = align_cm.detach(), align_mf.detach()
        out["loss"] = total + self.align_weights[0] * align_cm + self.align_weights[1] * align_mf
        return out

    def alignment(self, levels: dict, decoded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-level losses from the decoder tokens (after its norm) of each level: (coarse-middle, middle-fine)."""
        nm, nf = self.n_middle, self.n_fine
        b = levels["octants"].shape[0]
        # coarse -> middle: each middle volume against the coarse octant it was cut from
        pool = octant_pooling_matrix(levels["grid"], decoded["coarse"].device).to(decoded["coarse"].dtype)
        coarse_side = gather_tokens(pool @ decoded["coarse"], levels["octants"])  # (B, n_middle, W)
        middle_side = decoded["middle"].mean(1).view(b, nm, -1)
        align_cm = alignment_loss(middle_side, coarse_side, self.align_heads["coarse_middle"])
        # middle -> fine: each fine volume against the middle cell it was cut from
        cell_side = gather_tokens(decoded["middle"], levels["cells"])  # (B * n_middle, n_fine, W)
        fine_side = decoded["fine"].mean(1).view(b * nm, nf, -1)
        align_mf = alignment_loss(fine_side, cell_side, self.align_heads["middle_fine"])
        return align_cm, align_mf

    @torch.no_grad()
    def reconstruct(self, volume: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preview images of one level: input, masked input, reconstruction (kept cells from the input;
        predicted cells de-normalised with the target's own statistics, as MAE visualises)."""
        return preview_images(volume, pred, mask, CELL)


# ============================================================================================ method hooks


def build_model(arch_kwargs: Mapping[str, Any], in_channels: int, options: ModelOptions) -> MiM:
    """``hyspark_pretrain --method mim``: MiM with the paper's level settings for a plan's MiMUNet
    ``arch_kwargs``; ``options.decoder_width`` is honoured, the mask ratios are the paper's per level."""
    level_patch = options.level_patch or arch_kwargs.get("patch_size")
    if level_patch:
        check_patch_multiple(level_patch, LEVEL_MULTIPLE, "--patch-size" if options.level_patch else "plans patch size",
                             why="MiM's coarse mask groups halves of the 16^3 token grid",
                             hint=f"plan with hyspark_plan_and_preprocess --network mim, or give --patch-size in "
                                  f"multiples of {LEVEL_MULTIPLE}")
    keys = ("widths", "conv_depths", "vit_depth", "vit_heads", "vit_mlp_ratio")
    encoder = MiMBackbone(in_channels, **{k: arch_kwargs[k] for k in keys if k in arch_kwargs})
    model = MiM(encoder, decoder_width=options.decoder_width)
    model.finetune_kwargs = dict(arch_kwargs)  # what export needs to write the plan's MiMUNet
    return model


def validation_loss(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return model(batch, generator=gen)["loss"]


def preview(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> dict:
    """One panel per level, each showing the first volume of that level."""
    levels = model(batch, generator=gen)["levels"]
    return {name: model.reconstruct(levels[name]["volume"][:1], levels[name]["pred"][:1], levels[name]["mask"][:1])
            for name in model.LEVELS}

