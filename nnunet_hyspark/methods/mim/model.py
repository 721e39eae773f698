"""MiM (Mask in Mask, IEEE TMI 2025): the pre-training model on the ConvMAE-style backbone.

Read top to bottom with ``backbone.py`` and ``levels.py``, this is the whole method (``docs/methods.md``):

1. :class:`~nnunet_hyspark.methods.mim.backbone.MiMBackbone` -- three conv stages, a fourth
   Conv3d k2 s2 to the 1/16 token grid, a Linear, sin-cos positions, ViT blocks on the KEPT
   tokens only, a final LayerNorm. The same module is the fine-tuning network's encoder.
2. :class:`MiM` -- one crop of ``2P`` per sample gives three levels of volumes of the level
   patch ``P`` (:mod:`nnunet_hyspark.methods.mim.levels`): coarse (the crop resized; octants
   masked as groups), middle (``n_middle`` crop octants masked at the coarse level, native
   resolution), fine (``n_fine`` 16^3 cells masked at the middle level, upsampled). What is
   random in a step is one :class:`~nnunet_hyspark.methods.mim.levels.MiMSampling`; ``forward``
   draws it or takes it from the caller, so a step can be replayed exactly. Every level goes
   through the same encoder (with the stage 1-3 outputs projected to the token width by
   Conv3d kernel = stride = 8, 4, 2, gathered at the kept tokens and added before the final
   LayerNorm, as ConvMAE does) and the same MAE decoder (Linear, mask token, sin-cos
   positions, blocks, LayerNorm, Linear to the 16^3 x C voxels of a cell).
3. Loss: per level, MSE on MASKED cells against per-cell normalised targets (weights 1, 1,
   1), plus cross-level alignment (weights 0.1, 0.1): decoder outputs (after its norm)
   mean-pooled per volume, ``2 - 2 cos`` between every finer volume and the region of the
   coarser volume it came from (the coarse octant for a middle volume, the middle cell for a
   fine volume). Each side goes through its own two-layer MLP of the decoder width, named as
   in the published checkpoint (:data:`ALIGNMENT`); the coarser side is a fixed target
   (detached after its head, which is therefore frozen).

Defaults are the paper's: widths 48/96/192/384, 2 conv blocks per stage, 11 ViT blocks with
12 heads, decoder 576 wide with 8 blocks and 16 heads, mask ratios 0.5 / 0.6 / 0.5,
4 middle volumes per sample and 4 fine volumes per middle volume (1 + 4 + 16 encoder passes
per sample). Level patches need axes that are multiples of 32 (see ``levels.py``).
A published pre-training checkpoint loads with
:func:`nnunet_hyspark.methods.mim.published.load_published_pretraining`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.layers.blocks import Mlp, init_vit_weights
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.mae import masked_patch_mse, preview_images
from nnunet_hyspark.masking import kept_token_indices
from nnunet_hyspark.methods.mim.backbone import MiMBackbone, VIT_LN_EPS, ViTBlock
from nnunet_hyspark.methods.mim.levels import (CELL, LEVEL_MULTIPLE, MiMSampling, coarse_volume, cut_octants,
                                               draw_sampling, fine_volumes, keep_mask, level_patch_size,
                                               octant_pooling_matrix, token_grid)
from nnunet_hyspark.methods.spec import ModelOptions
from nnunet_hyspark.patch_rules import check_patch_multiple

__all__ = ["ALIGNMENT", "MiM", "MiMBackbone", "RECIPE", "alignment_loss", "build_model"]  # MiMBackbone: re-exported

#: the paper's optimisation (hyspark_pretrain defaults for --method mim): AdamW betas (0.9, 0.95), weight decay
#: 0.05 (biases and 1-D parameters exempt), 40 warm-up epochs of 800, half-cycle cosine, no gradient clipping.
#: The paper scales the peak lr as 1e-4 x batch / 256; pass --lr for that (the default is 1e-4 unscaled).
RECIPE = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": (0.05, 0.05), "warmup_fraction": 0.05, "clip_grad": 0.0}

#: the alignment pairs (finer level, coarser level, head of the finer side, head of the coarser side). The heads
#: carry the published checkpoint's names, read as: down = the coarse level (the crop scaled down), mid = the
#: middle level, up = the fine level (cells scaled up), pred_* = the side that must predict the other.
ALIGNMENT = (("middle", "coarse", "aggregate_pred_mid_feature", "aggregate_down"),
             ("fine", "middle", "aggregate_pred_up_feature", "aggregate_mid"))


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


def alignment_loss(finer: torch.Tensor, coarser: torch.Tensor, finer_head: nn.Module,
                   coarser_head: nn.Module) -> torch.Tensor:
    """``2 - 2 cos(finer_head(finer), coarser_head(coarser))`` averaged; the coarser side is a fixed target."""
    p = F.normalize(finer_head(finer), dim=-1)
    z = F.normalize(coarser_head(coarser.detach()), dim=-1).detach()
    return (2 - 2 * (p * z).sum(-1)).mean()


class MiM(nn.Module):
    """The MiM pre-training model around a :class:`MiMBackbone` (``self.encoder``, shared with fine-tuning).

    ``forward(crops, generator=None, sampling=None)`` takes crops of ``2P`` (B, C, 2X, 2Y, 2Z) and
    returns ``loss`` (the total), the per-level terms (``loss_coarse`` ... ``align_middle_fine``,
    detached) and ``levels``: per level the volumes, the masks and the predictions (for previews),
    and the step's ``sampling`` (a :class:`MiMSampling`; pass it back to replay the step).
    """

    LEVELS = ("coarse", "middle", "fine")

    def __init__(self, encoder: MiMBackbone, decoder_width: int | None = None, decoder_depth: int = 8,
                 decoder_heads: int | None = None, mask_ratios: Sequence[float] = (0.5, 0.6, 0.5),
                 n_middle: int = 4, n_fine: int = 4, level_weights: Sequence[float] = (1.0, 1.0, 1.0),
                 align_weights: Sequence[float] = (0.1, 0.1), mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        w, d = encoder.widths, encoder.widths[3]
        width = decoder_width or default_decoder_width(d)
        heads = decoder_heads or default_decoder_heads(width)
        if width % 6 or width % heads:
            raise ValueError(f"decoder width {width} must be divisible by 6 (sin-cos positions) and by {heads} heads")
        self._set_level_settings(mask_ratios, n_middle, n_fine, level_weights, align_weights)

        # stage 1-3 outputs projected to the token grid (kernel = stride = 8, 4, 2), added before the final norm
        self.fusion = nn.ModuleList(nn.Conv3d(w[i], d, 8 >> i, stride=8 >> i) for i in range(3))
        # MAE decoder
        self.decoder_width = width
        self.decoder_embed = nn.Linear(d, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.ModuleList(ViTBlock(width, heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=VIT_LN_EPS)
        self.decoder_pred = nn.Linear(width, CELL ** 3 * encoder.in_channels)
        # cross-level alignment: one two-layer GELU MLP (width -> width -> width) per side of each pair
        for _, _, finer_head, coarser_head in ALIGNMENT:
            setattr(self, finer_head, Mlp(width, width))
            setattr(self, coarser_head, Mlp(width, width))
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_vit_weights)
        for _, _, finer_head, coarser_head in ALIGNMENT:
            getattr(self, finer_head).apply(init_vit_weights)
            # the target side is detached after its head, so the head gets no gradient: frozen, because
            # DDP requires every trained parameter to receive one (a published checkpoint's values load)
            getattr(self, coarser_head).apply(init_vit_weights).requires_grad_(False)
        nn.init.normal_(self.mask_token, std=0.02)

    def _set_level_settings(self, mask_ratios: Sequence[float], n_middle: int, n_fine: int,
                            level_weights: Sequence[float], align_weights: Sequence[float]) -> None:
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
    def draw_sampling(self, batch_size: int, grid: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> MiMSampling:
        """One step's random choices with this model's mask ratios and volume counts."""
        return draw_sampling(batch_size, grid, self.mask_ratios, self.n_middle, self.n_fine, generator, device)

    def make_levels(self, crops: torch.Tensor, generator: torch.Generator | None = None,
                    sampling: MiMSampling | None = None) -> dict:
        """Cut the levels and their masks from ``crops``, by ``sampling`` (drawn with ``generator`` if None)."""
        patch = level_patch_size(crops.shape[2:])
        grid = token_grid(patch)
        if sampling is None:
            sampling = self.draw_sampling(crops.shape[0], grid, generator, crops.device)
        sampling.check(crops.shape[0], grid)
        s = sampling.to(crops.device)
        middle = cut_octants(crops, s.octants)  # (B * n_middle, C, P)
        return {"coarse": {"volume": coarse_volume(crops, patch), "mask": keep_mask(s.coarse_keep, grid)},
                "middle": {"volume": middle, "mask": keep_mask(s.middle_keep, grid)},
                "fine": {"volume": fine_volumes(middle, s.cells), "mask": keep_mask(s.fine_keep, grid)},
                "octants": s.octants, "cells": s.cells, "grid": grid, "sampling": sampling}

    def forward(self, crops: torch.Tensor, generator: torch.Generator | None = None,
                sampling: MiMSampling | None = None) -> dict:
        levels = self.make_levels(crops, generator, sampling)
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
        b, nm = levels["octants"].shape
        nf = levels["cells"].shape[1]
        (_, _, mid_pred, coarse_target), (_, _, fine_pred, mid_target) = ALIGNMENT
        # coarse -> middle: each middle volume against the coarse octant it was cut from
        pool = octant_pooling_matrix(levels["grid"], decoded["coarse"].device).to(decoded["coarse"].dtype)
        coarse_side = gather_tokens(pool @ decoded["coarse"], levels["octants"])  # (B, n_middle, W)
        middle_side = decoded["middle"].mean(1).view(b, nm, -1)
        align_cm = alignment_loss(middle_side, coarse_side, getattr(self, mid_pred), getattr(self, coarse_target))
        # middle -> fine: each fine volume against the middle cell it was cut from
        cell_side = gather_tokens(decoded["middle"], levels["cells"])  # (B * n_middle, n_fine, W)
        fine_side = decoded["fine"].mean(1).view(b * nm, nf, -1)
        align_mf = alignment_loss(fine_side, cell_side, getattr(self, fine_pred), getattr(self, mid_target))
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


def encoder_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's stage outputs for an unmasked batch (B, C_i, d, h, w) at 1/2 ... 1/16 (linear probes)."""
    return model.encoder(x)
