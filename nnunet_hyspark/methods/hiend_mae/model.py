"""Hi-End-MAE: a plain-ViT masked autoencoder whose decoder queries several encoder depths.

Read top to bottom with ``encoder.py``, this file is the whole method (``docs/methods.md``):

1. :class:`~nnunet_hyspark.methods.hiend_mae.encoder.ViTEncoder`: patch embedding by a strided
   Conv3d (kernel = stride = the ViT patch, 12 by default), a class token (zero position; only in
   pre-training, as published), fixed 3D sin-cos positions rebuilt for the actual token grid (any patch whose axes are multiples of
   the ViT patch), pre-norm blocks (qkv bias, LayerNorm eps 1e-6). It returns the outputs of the
   tapped blocks (4, 7, 10, 1-based) and the final normed output. The same module is the encoder
   of the fine-tuning network :class:`~nnunet_hyspark.methods.hiend_mae.network.HiEndUNETR`.
2. masking: per sample a uniform random 75 % of the tokens is dropped (MAE); the project's
   mask convention (:mod:`nnunet_hyspark.masking`: True = kept).
3. :class:`HierarchicalDecoder`, the encoder-driven hierarchical dense decoder: Linear
   projections of the tapped layers and of the final output to the decoder width; queries =
   projected final output (class token + kept tokens) with mask tokens at the masked positions
   (original order), plus decoder sin-cos positions; 2 self-attention blocks; one
   cross-attention block per tapped layer, deepest first (self-attention -> cross-attention with
   keys/values from the projected layer 10, then 7, then 4, read as projected, without a norm ->
   MLP); LayerNorm; Linear to the ``patch^3 * C`` voxels of a patch.
4. loss: MSE against per-patch normalised targets (a layer norm without affine parameters:
   biased variance, eps 1e-6), averaged over MASKED patches only.

The sampling can come from outside (``forward(x, keep_idx=...)``), so a run can be replayed, and
a published pre-training checkpoint loads into :class:`HiEndMAE` with
:func:`nnunet_hyspark.methods.hiend_mae.published.load_published_pretraining`.

Recipe (see :data:`RECIPE`): AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05 constant with
NO decay on biases, norm weights and tokens (the published code meant to exempt them but decays
everything; the project's :func:`nnunet_hyspark.optim.decay_groups` exempts them), warm-up over
the first 1 % of the run (10 of 1000 epochs), then cosine.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.layers.blocks import Attention, Mlp, TransformerBlock, init_vit_weights
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.mae import masked_patch_mse, preview_images
from nnunet_hyspark.masking import kept_token_indices, random_cell_mask
from nnunet_hyspark.methods.hiend_mae.encoder import LN_EPS, ViTEncoder, token_grid
from nnunet_hyspark.methods.spec import ModelOptions

#: Pre-training decoder (width, heads) per encoder width; the decoder heads are not given by the paper.
DECODER_CONFIGS: dict[int, tuple[int, int]] = {768: (384, 12), 1536: (528, 16), 48: (24, 2)}
SELF_ATTENTION_BLOCKS = 2

#: Hi-End-MAE's optimisation recipe, as defaults of ``hyspark_pretrain --method hiend_mae``.
RECIPE: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": (0.05, 0.05), "warmup_fraction": 0.01,
                          "clip_grad": 0.0, "mask_ratio": 0.75}


def decoder_config(embed_dim: int, num_heads: int) -> tuple[int, int]:
    """(width, heads) of the pre-training decoder: the preset's, else half the width (multiple of 6)."""
    if embed_dim in DECODER_CONFIGS:
        return DECODER_CONFIGS[embed_dim]
    width = max(6, embed_dim // 12 * 6)
    heads = next(h for h in range(min(num_heads, width), 0, -1) if width % h == 0)
    return width, heads


# ----------------------------------------------------------------------------------------------- decoder


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over keys/values from ``memory``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        kv = self.kv(memory).reshape(b, memory.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttentionBlock(nn.Module):
    """x + SelfAttn(LN0 x); x + CrossAttn(LN1 x, memory); x + MLP(LN2 x) (the published block and its names).

    The memory (a projected encoder layer) is read as it is: the published decoder has no norm there.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))


class HierarchicalDecoder(nn.Module):
    """Encoder-driven hierarchical dense decoder (see the module docstring, step 3)."""

    def __init__(self, embed_dim: int, num_taps: int, out_voxels: int, width: int = 384, num_heads: int = 12,
                 self_blocks: int = SELF_ATTENTION_BLOCKS, mlp_ratio: float = 4.0):
        super().__init__()
        if width % 6:
            raise ValueError(f"decoder width {width} must be divisible by 6 (3D sin-cos positions)")
        self.width = width
        # proj[i] for tapped layer i (shallowest first); proj[-1] for the final normed output
        self.proj = nn.ModuleList(nn.Linear(embed_dim, width) for _ in range(num_taps + 1))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.self_blocks = nn.ModuleList(TransformerBlock(width, num_heads, mlp_ratio, eps=LN_EPS)
                                         for _ in range(self_blocks))
        # cross_blocks[j] attends to the tapped layers deepest first (layer 10, then 7, then 4)
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(width, num_heads, mlp_ratio) for _ in range(num_taps))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.pred = nn.Linear(width, out_voxels)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, feats: list[torch.Tensor], keep_idx: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``feats`` = encoder outputs (cls + K kept tokens each) -> (B, L, out_voxels), one row per grid cell."""
        *taps, final = feats
        kept = self.proj[-1](final)  # (B, 1 + K, W)
        b, num_cells = kept.shape[0], int(torch.tensor(grid).prod())
        queries = self.mask_token.to(kept.dtype).expand(b, num_cells, -1).clone()
        queries.scatter_(1, keep_idx[..., None].expand(-1, -1, self.width), kept[:, 1:])  # restore the order
        queries = torch.cat([kept[:, :1], queries], dim=1)  # class token first
        pos = sincos_3d(self.width, grid).to(device=kept.device, dtype=kept.dtype)
        h = queries + F.pad(pos, (0, 0, 1, 0))[None]  # zero position for the class token
        for block in self.self_blocks:
            h = block(h)
        for block, layer, proj in zip(self.cross_blocks, reversed(taps), reversed(self.proj[:-1])):
            h = block(h, proj(layer))
        return self.pred(self.norm(h))[:, 1:]


# ----------------------------------------------------------------------------------------------- model


class HiEndMAE(nn.Module):
    """The pre-training model: a :class:`ViTEncoder` on kept tokens and the hierarchical decoder."""

    def __init__(self, encoder: ViTEncoder, mask_ratio: float = 0.75, decoder_width: int | None = None,
                 decoder_heads: int | None = None, arch: Mapping[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch = encoder.vit_patch
        width, heads = decoder_config(encoder.embed_dim, encoder.blocks[0].attn.num_heads)
        self.decoder = HierarchicalDecoder(encoder.embed_dim, len(encoder.taps),
                                           self.patch ** 3 * encoder.in_channels,
                                           decoder_width or width, decoder_heads or heads)
        self.arch = dict(arch or {})  # the fine-tuning network's arch_kwargs (for export)

    def random_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, gx, gy, gz) bool, True = kept; the same number of kept tokens in every sample."""
        return random_cell_mask(x.shape[0], self.encoder.grid(x.shape[2:]), self.mask_ratio, generator, x.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                keep_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``pred`` (B, L, patch^3 * C; normalised-patch space) and the ``mask`` used.

        The sampling is ``mask`` (B, gx, gy, gz), True = kept, or ``keep_idx`` (B, K): the flat indices
        of the kept tokens per sample in the order they enter the encoder (the published code's
        ``ids_keep``, to replay its sampling); a random mask when neither is given.
        """
        grid = self.encoder.grid(x.shape[2:])
        if keep_idx is not None:
            if mask is not None:
                raise ValueError("give the sampling as mask or keep_idx, not both")
            mask = mask_of_kept(keep_idx, grid)
        else:
            mask = self.random_mask(x) if mask is None else mask
            keep_idx = kept_token_indices(mask)
        feats = self.encoder(x, keep_idx)
        pred = self.decoder(feats, keep_idx, grid)
        loss = masked_patch_mse(pred.float(), x.float(), mask, self.patch, unbiased=False)
        return {"loss": loss, "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preview images: input, masked input, reconstruction (predicted patches de-normalised with the
        target's own statistics, kept patches from the input, as MAE visualises)."""
        return preview_images(x, pred, mask, self.patch, unbiased=False)


def mask_of_kept(keep_idx: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, gx, gy, gz) bool mask, True at the flat indices ``keep_idx`` (B, K); each index at most once."""
    flat = torch.zeros(keep_idx.shape[0], int(torch.tensor(grid).prod()), dtype=torch.bool, device=keep_idx.device)
    flat.scatter_(1, keep_idx, True)
    if int(flat.sum(1).min()) != keep_idx.shape[1]:
        raise ValueError("keep_idx repeats a token index within a sample")
    return flat.view(-1, *grid)


# ----------------------------------------------------------------------------------------------- method hooks


def encoder_kwargs(arch: Mapping[str, Any]) -> dict[str, Any]:
    """ViTEncoder arguments from a plan's ``arch_kwargs`` (HiEndUNETR's)."""
    keys = ("vit_patch", "embed_dim", "depth", "num_heads", "mlp_ratio", "taps")
    return {k: arch[k] for k in keys if k in arch}


def build_model(arch_kwargs: Mapping[str, Any], in_channels: int, options: ModelOptions) -> HiEndMAE:
    """``hyspark_pretrain --method hiend_mae``: the model for a plan's HiEndUNETR ``arch_kwargs``."""
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch_kwargs.items()}
    encoder = ViTEncoder(in_channels, **encoder_kwargs(arch))
    patch = options.level_patch or arch.get("patch_size")
    if patch is not None:
        token_grid(patch, encoder.vit_patch, "--patch-size" if options.level_patch else "plans patch size")
    return HiEndMAE(encoder, mask_ratio=options.mask_ratio, decoder_width=options.decoder_width, arch=arch)


def encoder_features(model: HiEndMAE, x: torch.Tensor) -> list[torch.Tensor]:
    """The linear probe's features: the maps the UNETR reads (tapped blocks, final normed output) of the
    unmasked batch ``x``, each (B, D, gx, gy, gz) on the token grid (class token dropped)."""
    return model.encoder.token_maps(x)
