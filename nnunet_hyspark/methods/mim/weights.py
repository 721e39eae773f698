"""MiM's weights files: the pre-trained backbone in a MiMUNet file, and channel adaptation.

The file (format: :mod:`nnunet_hyspark.weights`) holds the full MiMUNet state dict minus heads: the
backbone pre-trained (``encoder.``; its layer-scale tensors, which pre-training does not have, at
their initial value 1) and everything else (fifth stage, stage norms, decoder) at a seeded
initialisation; the fusion convs, the MAE decoder and the alignment heads of pre-training are
dropped. Published checkpoints convert with :mod:`nnunet_hyspark.methods.mim.published`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_hyspark.methods.mim.backbone import MiMBackbone, layer_scale_keys
from nnunet_hyspark.methods.mim.levels import CROP_SCALE
from nnunet_hyspark.methods.mim.network import ARCH_KEYS, MiMUNet
from nnunet_hyspark.methods.spec import FinetuneNetwork
from nnunet_hyspark.weights import (DECODER_NOTE, ENCODER_PREFIX, adapt_network_channels, export_network_weights,
                                    seeded_network_weights)

NETWORK_CLASS_NAME = "nnunet_hyspark.methods.mim.network.MiMUNet"
#: what plans and weights files of earlier versions name the network
LEGACY_CLASS_NAMES = ("nnunet_hyspark.models.mim_unet.MiMUNet",)
STEM_KEY = "encoder.downs.0.conv.weight"  # the first conv: its second axis is the number of input channels
#: the metadata's description of the parts of a MiMUNet file that are not pre-trained
FINETUNE_DECODER_NOTE = (f"layer-scale at 1; fifth stage, stage norms and decoder at a {DECODER_NOTE}; MiM's "
                         f"fusion convs, MAE decoder and alignment heads are not part of the fine-tuning network")


def arch_config(encoder: MiMBackbone, finetune_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments of MiMUNet (besides the classes) for this backbone and the plan's other choices."""
    cfg = {"in_channels": encoder.in_channels, **encoder.config()}
    for k in ARCH_KEYS:
        if finetune_kwargs and k in finetune_kwargs and k not in cfg:
            v = finetune_kwargs[k]
            cfg[k] = list(v) if isinstance(v, (list, tuple)) else v
    return cfg


def finetune_network(arch: Mapping[str, Any], in_channels: int | None = None, num_classes: int = 1) -> MiMUNet:
    """The MiMUNet a weights file's ``architecture`` describes (``in_channels`` default: the file's)."""
    return MiMUNet(arch["in_channels"] if in_channels is None else in_channels, num_classes,
                   **{k: arch[k] for k in ARCH_KEYS if k in arch})


def complete_encoder_state(encoder_state: Mapping[str, torch.Tensor],
                           arch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``encoder_state`` plus the layer-scale tensors of MiMUNet's backbone it lacks, at their initial value 1
    (pre-training has no layer-scale); returns the state and the added keys."""
    if not arch.get("layer_scale", True):
        return dict(encoder_state), []
    width = int(arch["widths"][3])
    added = [k for k in layer_scale_keys(int(arch["vit_depth"])) if k not in encoder_state]
    return {**encoder_state, **{k: torch.ones(width) for k in added}}, added


def network_weights(encoder_state: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A full MiMUNet state dict minus heads: ``encoder_state`` (completed with layer-scale at 1) plus a seeded
    initialisation of the rest (CPU)."""
    state, _ = complete_encoder_state(encoder_state, arch)
    return seeded_network_weights(lambda: finetune_network(arch), state)


def export_mim_weights(encoder: MiMBackbone, finetune_kwargs: Mapping[str, Any] | None, meta: dict[str, Any],
                       path: str | os.PathLike) -> Path:
    """Write the weights file ``nnUNetv2_train -pretrained_weights`` loads, and its JSON sidecar."""
    arch = arch_config(encoder, finetune_kwargs)
    return export_network_weights(network_weights(encoder.state_dict(), arch), arch, NETWORK_CLASS_NAME, meta, path,
                                  decoder=FINETUNE_DECODER_NOTE)


def export(model: nn.Module, meta: dict[str, Any], path: Path) -> Path:
    """The pre-training loop's export hook: the backbone in a MiMUNet weights file, with MiM's settings."""
    meta = {**meta, "mim": model.config()}
    meta.pop("mask_ratio", None)  # MiM has one per level (in meta["mim"])
    if meta.get("patch_size"):  # the loader's patch is the crop; the networks see the level patch
        meta["crop_size"] = list(meta["patch_size"])
        meta["patch_size"] = [p // CROP_SCALE for p in meta["patch_size"]]
    return export_mim_weights(model.encoder, getattr(model, "finetune_kwargs", None), meta, path)


def adapt_weights_channels(weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                           in_channels: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights for ``in_channels`` inputs: the pre-trained first conv repeated over the channels (scaled by
    1/channels), the non-pre-trained parts re-initialised for that many channels."""
    arch = dict(meta.get("architecture") or {})
    if arch:  # a file of an earlier version may lack the layer-scale tensors
        encoder, _ = complete_encoder_state({k[len(ENCODER_PREFIX):]: v for k, v in weights.items()
                                             if k.startswith(ENCODER_PREFIX)}, arch)
        weights = {**weights, **{ENCODER_PREFIX + k: v for k, v in encoder.items()}}
    weights, meta = adapt_network_channels(weights, meta, in_channels, STEM_KEY, finetune_network)
    return weights, {**meta, "adapted_input_channels": in_channels}


#: the weights protocol of this method's fine-tuning network, as the registry publishes it
NETWORK = FinetuneNetwork(NETWORK_CLASS_NAME, LEGACY_CLASS_NAMES, STEM_KEY, "first conv", finetune_network,
                          adapt_weights_channels)
