"""HySparK pre-training model: masked hybrid encoder -> densify -> light decoder -> masked patch MSE.

Read top to bottom, this file is the whole method (``docs/methods.md``):

1. one random mask per sample on the 1/16 grid, the same keep count in every sample;
2. the encoder in masked mode (submanifold CNN at every scale, ViT on kept tokens);
3. densify: masked positions of every skip map get a learnable per-scale mask token,
   then a projection to the decoder width;
4. a light U-shaped decoder (BatchNorm, synchronised under DDP) back to full resolution;
5. MSE against per-patch normalised 16^3 targets, averaged over MASKED patches only.

``reference=True`` runs the plain formulation of the published code (float masks multiplied in, the
decoder in channels-first memory, nn.ConvTranspose3d); the default path computes the same function
faster (channels-last 3D memory, bool masks, the 2x up-convolution as one matrix product or, on
large maps, composed with the k3 conv after it into one convolution: ``layers/upsampling.py``) and is
tested against it (float64: equal to ~1e-12). Measured per layer, forward + backward, 1 thread on a
2-core AMD EPYC (AVX2): the decoder's k3 convs ~1.3x faster channels-last; the up-convolution 1.3x
(384 ch at 6^3) to 2.8x (96 ch at 24^3) faster as a matrix product than oneDNN's transposed conv.
The bool select, torch.cat of skips and the loss are each ~30 ms against seconds of convolutions.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.layers.upsampling import composition_pays, up_conv_2x, up_then_conv3
from nnunet_hyspark.mae import masked_patch_mse, patchify, preview_images
from nnunet_hyspark.masking import ENCODER_STRIDE, masks_per_scale, random_cell_mask
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.methods.spec import ModelOptions
from nnunet_hyspark.sparse import SparseBackend, get_backend


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True)]


class UpStep(nn.Module):
    """Optional fusion with the skip ([conv k3 + BN + ReLU] x2), then x2 upsampling and halving."""

    def __init__(self, channels: int, fuse_skip: bool):
        super().__init__()
        c = channels
        self.fuse = nn.Sequential(*conv_bn_relu(2 * c, c), *conv_bn_relu(c, c)) if fuse_skip else None
        self.up = nn.Sequential(nn.ConvTranspose3d(c, c, 2, stride=2), *conv_bn_relu(c, c // 2),
                                *conv_bn_relu(c // 2, c // 2))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, reference: bool = True) -> torch.Tensor:
        if self.fuse is not None:
            x = self.fuse(torch.cat([x, skip], dim=1))
        if reference:
            return self.up(x)
        up, conv = self.up[0], self.up[1]
        if composition_pays(x, up, conv):  # up-conv and k3 conv as one conv (layers/upsampling.py)
            return self.up[2:](up_then_conv3(up, conv, x))
        return self.up[1:](up_conv_2x(up, x))


class LightDecoder(nn.Module):
    """Four up-steps from 1/16 to full resolution; widths halve from ``width``."""

    def __init__(self, width: int, out_channels: int, fuse_full_resolution: bool = False):
        super().__init__()
        self.steps = nn.ModuleList(UpStep(width >> i, fuse_skip=i > 0) for i in range(4))
        c_full = width >> 4
        self.full_res_fuse = nn.Sequential(*conv_bn_relu(2 * c_full, c_full), *conv_bn_relu(c_full, c_full)) \
            if fuse_full_resolution else None
        self.proj = nn.Conv3d(c_full, out_channels, 1)

    def forward(self, projected: list[torch.Tensor], reference: bool = True) -> torch.Tensor:
        """``projected`` = densified skips, smallest first: [x5, x4, x3, x2(, x1)] at decoder widths."""
        x = projected[0]
        for i, step in enumerate(self.steps):
            x = step(x, projected[i] if i > 0 else None, reference)
        if self.full_res_fuse is not None:
            x = self.full_res_fuse(torch.cat([x, projected[4]], dim=1))
        return self.proj(x)


def upsample_mask_bool(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, gx, gy, gz) -> bool (B, 1, gx*f, gy*f, gz*f): one broadcast copy (no float passes)."""
    b, gx, gy, gz = mask.shape
    m = mask.bool()[:, None, :, None, :, None, :, None].expand(b, 1, gx, factor, gy, factor, gz, factor)
    return m.reshape(b, 1, gx * factor, gy * factor, gz * factor)


def masked_patch_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss on the decoder's full-resolution output ``pred``: per-patch MSE against normalised 16^3
    targets, averaged over masked cells (mask False) only."""
    return masked_patch_mse(patchify(pred), x, mask)


class HySparK(nn.Module):
    """The pre-training model around a :class:`HybridEncoder` (shared, by reference, with fine-tuning)."""

    def __init__(self, encoder: HybridEncoder, mask_ratio: float = 0.75, decoder_width: int | None = None,
                 fuse_full_resolution: bool = False, sparse_backend: SparseBackend | str | None = None,
                 reference: bool = False):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.reference = reference  # the published formulation (module docstring), e.g. as a speed baseline
        # resolved once here (a name is looked up now, never per forward); None = the dense reference
        self.sparse_backend = get_backend(sparse_backend) if isinstance(sparse_backend, str) else sparse_backend
        w = encoder.widths
        skip_channels = [w[4], w[4], w[3], w[2], w[1]]  # x5, x4, x3, x2, x1 (smallest first)
        width = decoder_width or 2 * w[4]  # 768 at the default widths
        if width % 16 != 0:
            raise ValueError(f"decoder width {width} must be divisible by 16 (it halves four times)")
        dec = [width >> i for i in range(5)]
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1, 1)) for c in skip_channels)
        self.densify_proj = nn.ModuleList(
            nn.Conv3d(c, d, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
            for i, (c, d) in enumerate(zip(skip_channels, dec)))
        self.decoder = LightDecoder(width, encoder.in_channels, fuse_full_resolution)
        self.fuse_full_resolution = fuse_full_resolution
        self._init_weights()
        if not fuse_full_resolution:
            # The reference keeps the full-resolution mask token and projection but never uses them.
            # We keep them too (checkpoints compare) but frozen: DDP requires every trained parameter
            # to get a gradient, and skipping the unused full-resolution conv saves time.
            for p in (*self.mask_tokens[4:].parameters(), *self.densify_proj[4].parameters()):
                p.requires_grad_(False)

    def _init_weights(self) -> None:
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        for m in [*self.densify_proj.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def random_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grid = tuple(n // ENCODER_STRIDE for n in x.shape[2:])
        return random_cell_mask(x.shape[0], grid, self.mask_ratio, generator, x.device)

    def densify(self, feats: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """Fill masked positions with the per-scale mask tokens and project; smallest scale first."""
        used = 5 if self.fuse_full_resolution else 4
        if self.reference:
            masks = masks_per_scale(mask)  # resolutions 1 ... 1/16, aligned with [x1 ... x5]
            out = []
            for i, (feat, m) in enumerate(list(zip(reversed(feats), reversed(masks)))[:used]):
                m = m.to(feat.dtype)
                filled = feat * m + self.mask_tokens[i].to(feat.dtype) * (1 - m)
                out.append(self.densify_proj[i](filled))
            return out
        out = []
        for i, feat in enumerate(list(reversed(feats))[:used]):
            # a bool select instead of two float multiplies: the same values (x * 1 + t * 0 == x),
            # and channels-last memory, which oneDNN's 3D convolutions run faster on this decoder
            keep = upsample_mask_bool(mask, feat.shape[2] // mask.shape[1])
            feat = feat.contiguous(memory_format=torch.channels_last_3d)
            filled = torch.where(keep, feat, self.mask_tokens[i].to(feat.dtype))
            out.append(self.densify_proj[i](filled.contiguous(memory_format=torch.channels_last_3d)))
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Returns ``loss``, the reconstruction ``pred`` (normalised-patch space) and the ``mask`` used."""
        if mask is None:
            mask = self.random_mask(x)
        feats = self.encoder(x, mask, backend=self.sparse_backend)
        pred = self.decoder(self.densify(feats, mask), self.reference)
        return {"loss": masked_patch_loss(pred.float(), x.float(), mask), "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images for previews: masked input, and the reconstruction (predicted patches de-normalised
        with the target's own statistics, kept patches from the input, as MAE visualises)."""
        return preview_images(x, patchify(pred.float()), mask)


# ------------------------------------------------------------------------------------- method hooks


def hybrid_encoder_from_arch(arch_kwargs: Mapping[str, Any], in_channels: int) -> HybridEncoder:
    """The encoder described by a plan's ``arch_kwargs`` (the same one fine-tuning builds)."""
    keys = ("widths", "depths", "expansions", "vit_depth", "vit_heads", "vit_mlp_ratio")
    return HybridEncoder(in_channels, **{k: arch_kwargs[k] for k in keys if k in arch_kwargs})


def build_model(arch_kwargs: Mapping[str, Any], in_channels: int, options: ModelOptions) -> HySparK:
    """``hyspark_pretrain --method hyspark``: the model for a plan's HySparKUNet ``arch_kwargs``."""
    return HySparK(hybrid_encoder_from_arch(arch_kwargs, in_channels), mask_ratio=options.mask_ratio,
                   decoder_width=options.decoder_width, fuse_full_resolution=options.fuse_full_resolution,
                   sparse_backend=options.sparse_backend)
