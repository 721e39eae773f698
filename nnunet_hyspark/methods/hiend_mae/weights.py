"""Hi-End-MAE's weights files: the pre-trained ViT in a HiEndUNETR file, and channel adaptation.

The file (format: :mod:`nnunet_hyspark.weights`) holds the full HiEndUNETR state dict minus heads:
the ViT pre-trained (``encoder.``), the UNETR decoder at its seeded initialisation. The
pre-training class token is not in it: the fine-tuning ViT has none (``hyspark_pretrain
--init-from`` leaves it at its initialisation). Published checkpoints: ``published.py``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_hyspark.methods.hiend_mae.encoder import CLASS_TOKEN_KEY, ViTEncoder
from nnunet_hyspark.methods.hiend_mae.network import HiEndUNETR
from nnunet_hyspark.methods.spec import FinetuneNetwork
from nnunet_hyspark.weights import adapt_network_channels, export_network_weights, seeded_network_weights

NETWORK_CLASS_NAME = "nnunet_hyspark.methods.hiend_mae.network.HiEndUNETR"
#: what plans and weights files of earlier versions name the network
LEGACY_CLASS_NAMES = ("nnunet_hyspark.models.unetr.HiEndUNETR",)
STEM_KEY = "encoder.patch_embed.weight"  # the patch embedding: its second axis is the number of input channels
#: pre-training encoder tensors that the fine-tuning network has no place for (its ViT has no class token)
PRETRAINING_ONLY_KEYS = (CLASS_TOKEN_KEY,)


def finetune_network(arch: Mapping[str, Any], in_channels: int, num_classes: int = 1) -> HiEndUNETR:
    """The HiEndUNETR a weights file's ``architecture`` describes, for ``in_channels`` inputs."""
    kw = {k: v for k, v in arch.items() if k not in ("patch_size", "strides", "in_channels")}
    return HiEndUNETR(in_channels, num_classes, **kw)


def network_weights_with_encoder(encoder_state: Mapping[str, torch.Tensor], arch: Mapping[str, Any],
                                 in_channels: int) -> dict[str, torch.Tensor]:
    """A full HiEndUNETR state dict (minus heads): ``encoder_state`` (pre-training-only tensors dropped)
    plus a seeded decoder initialisation."""
    state = {k: v for k, v in encoder_state.items() if k not in PRETRAINING_ONLY_KEYS}
    return seeded_network_weights(lambda: finetune_network(arch, in_channels), state)


def export_vit_encoder(encoder: ViTEncoder, arch: Mapping[str, Any], meta: dict[str, Any],
                       path: str | os.PathLike) -> Path:
    """Write a Hi-End-MAE encoder in the format ``nnUNetv2_train -pretrained_weights`` loads."""
    arch = {k: v for k, v in arch.items() if k not in ("patch_size", "strides")}
    arch.update(vit_patch=encoder.vit_patch, embed_dim=encoder.embed_dim, depth=len(encoder.blocks),
                num_heads=encoder.blocks[0].attn.num_heads, taps=list(encoder.taps),
                in_channels=encoder.in_channels)
    weights = network_weights_with_encoder(encoder.state_dict(), arch, encoder.in_channels)
    return export_network_weights(weights, arch, NETWORK_CLASS_NAME, meta, path)


def export(model: nn.Module, meta: dict[str, Any], path: Path) -> Path:
    """The pre-training loop's export hook: the model's ViT, with the plan's UNETR settings."""
    return export_vit_encoder(model.encoder, model.arch, meta, path)


def adapt_weights_channels(weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                           channels: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A HiEndUNETR weights file for ``channels`` inputs: the 1-channel patch embedding repeated (scaled by
    1/channels), the decoder's image convolution re-initialised (seeded) for the new channel count."""
    return adapt_network_channels(weights, meta, channels, STEM_KEY, finetune_network)


#: the weights protocol of this method's fine-tuning network, as the registry publishes it
NETWORK = FinetuneNetwork(NETWORK_CLASS_NAME, LEGACY_CLASS_NAMES, STEM_KEY, "patch embedding", finetune_network, adapt_weights_channels)
