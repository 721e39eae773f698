"""Self-supervised methods as the pre-training loop sees them: build, validate, preview, export.

Each method registers a :class:`Method`; ``hyspark_pretrain --method NAME`` picks it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from nnunet_hyspark.models import hiend_mae, mim
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
    crop_scale: int = 1  # crops of crop_scale x the plan's (or --patch-size) patch per axis (MiM: 2)
    network: str = "HySparKUNet"  # the plans' network class (suffix of network_class_name) it pre-trains for
    finetune_trainer: str = "nnUNetTrainerHySparKFinetune"
    plans: str = "nnUNetHySparKPlans"  # default -p of hyspark_pretrain for this method
    patch_multiple: int = 16  # the data loader refuses patches with other axes (1: the model's build checks)
    #: optimisation defaults that differ from the HySparK reference recipe (keys of hyspark_pretrain's LOOP_DEFAULTS,
    #: plus "betas"); explicit command-line options win
    recipe: Mapping[str, Any] = field(default_factory=dict)


def hybrid_encoder_from_arch(arch_kwargs: Mapping[str, Any], in_channels: int) -> HybridEncoder:
    """The encoder described by a plan's ``arch_kwargs`` (the same one fine-tuning builds)."""
    keys = ("widths", "depths", "expansions", "vit_depth", "vit_heads", "vit_mlp_ratio")
    return HybridEncoder(in_channels, **{k: arch_kwargs[k] for k in keys if k in arch_kwargs})


def _build_hyspark(arch_kwargs: Mapping[str, Any], in_channels: int, args: argparse.Namespace) -> HySparK:
    encoder = hybrid_encoder_from_arch(arch_kwargs, in_channels)
    return HySparK(encoder, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width,
                   fuse_full_resolution=args.fuse_full_resolution, sparse_backend=args.sparse_backend)


# HySparK and Hi-End-MAE share the MAE interface: random_mask(x, gen), forward(x, mask) and reconstruct
def _masked_validation_loss(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return model(batch, mask=model.random_mask(batch, gen))["loss"]


def _masked_preview(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> dict:
    out = model(batch, mask=model.random_mask(batch, gen))
    return {"": model.reconstruct(batch, out["pred"], out["mask"])}


def _hyspark_export(model: HySparK, meta: dict[str, Any], path: Path) -> Path:
    return export_encoder(model.encoder, meta, path)


def _build_mim(arch_kwargs: Mapping[str, Any], in_channels: int, args: argparse.Namespace) -> nn.Module:
    """MiM with the paper's level settings (nnunet_hyspark.models.mim); ``--decoder-width`` is honoured."""
    from nnunet_hyspark.errors import HySparKError
    from nnunet_hyspark.mim_levels import LEVEL_MULTIPLE

    level_patch = getattr(args, "patch_size", None) or arch_kwargs.get("patch_size")
    if level_patch and any(int(p) % LEVEL_MULTIPLE for p in level_patch):
        raise HySparKError(f"MiM level patch {list(level_patch)}: every axis must be a multiple of {LEVEL_MULTIPLE} "
                           "(the coarse mask groups halves of the 16^3 token grid)",
                           "plan with hyspark_plan_and_preprocess --network mim, or give --patch-size in multiples of 32")
    keys = ("widths", "conv_depths", "vit_depth", "vit_heads", "vit_mlp_ratio")
    encoder = mim.MiMBackbone(in_channels, **{k: arch_kwargs[k] for k in keys if k in arch_kwargs})
    model = mim.MiM(encoder, decoder_width=getattr(args, "decoder_width", None))
    model.finetune_kwargs = dict(arch_kwargs)  # what export needs to write the plan's MiMUNet
    return model


def _mim_validation_loss(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return model(batch, generator=gen)["loss"]


def _mim_preview(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> dict:
    """One panel per level, each showing the first volume of that level."""
    levels = model(batch, generator=gen)["levels"]
    return {name: model.reconstruct(levels[name]["volume"][:1], levels[name]["pred"][:1], levels[name]["mask"][:1])
            for name in model.LEVELS}


def _mim_export(model: nn.Module, meta: dict[str, Any], path: Path) -> Path:
    from nnunet_hyspark.mim_levels import CROP_SCALE
    from nnunet_hyspark.models.mim_unet import export_mim_weights

    meta = {**meta, "mim": model.config()}
    meta.pop("mask_ratio", None)  # MiM has one per level (in meta["mim"])
    if meta.get("patch_size"):  # the loader's patch is the crop; the networks see the level patch
        meta["crop_size"] = list(meta["patch_size"])
        meta["patch_size"] = [p // CROP_SCALE for p in meta["patch_size"]]
    return export_mim_weights(model.encoder, getattr(model, "finetune_kwargs", None), meta, path)


METHODS: dict[str, Method] = {
    "hyspark": Method("hyspark", _build_hyspark, _masked_validation_loss, _masked_preview, _hyspark_export),
    "mim": Method("mim", _build_mim, _mim_validation_loss, _mim_preview, _mim_export, crop_scale=2,
                  network="MiMUNet", finetune_trainer="nnUNetTrainerMiMFinetune", plans="nnUNetMiMPlans",
                  recipe=mim.RECIPE),
    "hiend_mae": Method("hiend_mae", hiend_mae.build, _masked_validation_loss, _masked_preview, hiend_mae.export,
                        network="HiEndUNETR", finetune_trainer="nnUNetTrainerHiEndMAEFinetune",
                        plans="nnUNetHiEndMAEPlans", patch_multiple=1, recipe=hiend_mae.RECIPE),
}
