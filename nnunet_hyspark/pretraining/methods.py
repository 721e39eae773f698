"""Self-supervised methods as the pre-training loop sees them: build, validate, preview, export.

Each method registers a :class:`Method`; ``hyspark_pretrain --method NAME`` picks it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from nnunet_hyspark.models.encoder import HybridEncoder
from nnunet_hyspark.models.hyspark import HySparK
from nnunet_hyspark.weights import export_encoder


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Mapping[str, Any], int, argparse.Namespace], nn.Module]
    validation_loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
    preview: Callable[[nn.Module, torch.Tensor, torch.Generator], dict[str, dict[str, torch.Tensor]]]
    export: Callable[[nn.Module, dict[str, Any], Path], Path]


def hybrid_encoder_from_arch(arch_kwargs: Mapping[str, Any], in_channels: int) -> HybridEncoder:
    """The encoder described by a plan's ``arch_kwargs`` (the same one fine-tuning builds)."""
    keys = ("widths", "depths", "expansions", "vit_depth", "vit_heads", "vit_mlp_ratio")
    return HybridEncoder(in_channels, **{k: arch_kwargs[k] for k in keys if k in arch_kwargs})


def _build_hyspark(arch_kwargs: Mapping[str, Any], in_channels: int, args: argparse.Namespace) -> HySparK:
    encoder = hybrid_encoder_from_arch(arch_kwargs, in_channels)
    return HySparK(encoder, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width,
                   fuse_full_resolution=args.fuse_full_resolution, sparse_backend=args.sparse_backend)


def _hyspark_validation_loss(model: HySparK, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return model(batch, mask=model.random_mask(batch, gen))["loss"]


def _hyspark_preview(model: HySparK, batch: torch.Tensor, gen: torch.Generator) -> dict:
    out = model(batch, mask=model.random_mask(batch, gen))
    return {"": model.reconstruct(batch, out["pred"], out["mask"])}


def _hyspark_export(model: HySparK, meta: dict[str, Any], path: Path) -> Path:
    return export_encoder(model.encoder, meta, path)


METHODS: dict[str, Method] = {
    "hyspark": Method("hyspark", _build_hyspark, _hyspark_validation_loss, _hyspark_preview, _hyspark_export),
}
