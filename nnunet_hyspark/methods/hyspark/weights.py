"""HySparK's weights files: export of a pre-trained encoder, channel adaptation, and the published checkpoint.

The file format is :mod:`nnunet_hyspark.weights`'s: the HySparKUNet state dict without heads, the
encoder pre-trained and the decoder at its seeded initialisation.

The published HySparK file is a plain state dict of the sparse encoder with the
dense encoder's names (``embeddings.*``, ``mae.*``; ``docs/methods.md``). Its
architecture is read off the tensor shapes (except the number of attention heads,
which shapes do not reveal). Every key is accounted for: mapped, ignored with a
reason, or reported as missing.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.methods.hyspark.network import HySparKUNet
from nnunet_hyspark.methods.spec import FinetuneNetwork
from nnunet_hyspark.weights import (DECODER_NOTE, ENCODER_PREFIX, adapt_input_channels, adapt_network_channels,
                                    encoder_state_of, export_network_weights, seeded_network_weights)

NETWORK_CLASS_NAME = "nnunet_hyspark.methods.hyspark.network.HySparKUNet"
#: what plans and weights files of earlier versions name the network
LEGACY_CLASS_NAMES = ("nnunet_hyspark.models.unet.HySparKUNet",)
STEM_KEY = "encoder.embeddings.stem.weight"  # the stem conv: its second axis is the number of input channels
#: the published checkpoint's preprocessing (HySparK's own, not nnU-Net's plans)
REFERENCE_PREPROCESSING = {
    "spacing": [1.5, 1.5, 1.5],
    "normalization_schemes": ["HySparK reference: HU clipped to [-175, 250], scaled to [0, 1]"],
}


def arch_config(encoder: HybridEncoder) -> dict[str, Any]:
    """Constructor arguments that rebuild ``encoder`` (stored in every weights file)."""
    emb = encoder.embeddings
    return {
        "in_channels": encoder.in_channels,
        "widths": list(encoder.widths),
        "depths": [len(layer) for layer in emb.layers()],
        "expansions": [layer[0].conv2.out_channels // layer[0].conv2.in_channels for layer in emb.layers()],
        "vit_depth": len(encoder.mae.blocks),
        "vit_heads": encoder.mae.blocks[0].attn.num_heads if len(encoder.mae.blocks) else 12,
    }


def finetune_network(arch: Mapping[str, Any], in_channels: int | None = None, num_classes: int = 1) -> HySparKUNet:
    """The HySparKUNet a weights file's ``architecture`` describes (``in_channels`` default: the file's)."""
    return HySparKUNet(arch["in_channels"] if in_channels is None else in_channels, num_classes,
                       widths=arch["widths"], depths=arch["depths"], expansions=arch["expansions"],
                       vit_depth=arch["vit_depth"], vit_heads=arch["vit_heads"])


def network_weights_with_encoder(encoder_state: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict:
    """A full HySparKUNet state dict (minus heads): ``encoder_state`` plus a seeded decoder initialisation."""
    return seeded_network_weights(lambda: finetune_network(arch), encoder_state)


def export_encoder(encoder: HybridEncoder, meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Export a (pre-trained) encoder in the format ``nnUNetv2_train -pretrained_weights`` loads."""
    arch = arch_config(encoder)
    weights = network_weights_with_encoder(encoder.state_dict(), arch)
    return export_network_weights(weights, arch, NETWORK_CLASS_NAME, meta, path)


def export(model: torch.nn.Module, meta: dict[str, Any], path: Path) -> Path:
    """The pre-training loop's export hook: the model's encoder."""
    return export_encoder(model.encoder, meta, path)


def adapt_channels(weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                   in_channels: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A HySparKUNet weights file for ``in_channels`` inputs: the stem repeated over the channels (scaled by
    1/channels), the decoder re-initialised (seeded)."""
    return adapt_network_channels(weights, meta, in_channels, STEM_KEY, finetune_network)


# ------------------------------------------------------------------------------------ published checkpoint


# keys of the published file that this project deliberately does not load, and why
IGNORED_WITH_REASON = {
    "mae.pos_embed": "fixed sin-cos position embedding: rebuilt for the target grid",
    "mae.mask_token": "unused: masked cells are filled by the decoder's per-scale mask tokens",
}
PUBLISHED_STEM_KEY = STEM_KEY[len(ENCODER_PREFIX):]  # "embeddings.stem.weight"


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under common keys; strip DDP / compile prefixes."""
    if isinstance(obj, dict) and "network_weights" in obj:
        sd = encoder_state_of(obj["network_weights"])
    else:
        sd = obj
        for key in ("state_dict", "model", "net", "encoder"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HySparKError("the checkpoint holds no state dict of tensors", "pass the published HySparK .pth file")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def infer_architecture(sd: Mapping[str, torch.Tensor], vit_heads: int) -> dict[str, Any]:
    """Widths, depths, expansions and ViT depth from tensor shapes."""
    if PUBLISHED_STEM_KEY not in sd:
        raise HySparKError(f"no '{PUBLISHED_STEM_KEY}' in the checkpoint: not a HySparK encoder",
                           "check the file; keys must be named embeddings.* and mae.*")
    w0 = sd[PUBLISHED_STEM_KEY].shape[0]
    widths = [w0] + [sd[f"embeddings.expend{k}.weight"].shape[0] for k in range(1, 5)]
    depths, expansions = [], []
    for i in range(1, 6):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"embeddings\.layer{i}\.(\d+)\.", k))}
        depths.append(len(blocks))
        conv2 = sd.get(f"embeddings.layer{i}.0.conv2.weight")
        expansions.append(conv2.shape[0] // conv2.shape[1] if conv2 is not None else 1)
    vit_depth = len({int(m.group(1)) for k in sd if (m := re.match(r"mae\.blocks\.(\d+)\.", k))})
    return {"in_channels": sd[PUBLISHED_STEM_KEY].shape[1], "widths": widths, "depths": depths,
            "expansions": expansions, "vit_depth": vit_depth, "vit_heads": vit_heads}


def convert_encoder_state(sd: Mapping[str, torch.Tensor], vit_heads: int = 12,
                          in_channels: int | None = None) -> tuple[dict, dict[str, Any], dict[str, list]]:
    """(encoder state dict, architecture, report) for a published-layout encoder state dict."""
    arch = infer_architecture(sd, vit_heads)
    target = HybridEncoder(arch["in_channels"], arch["widths"], arch["depths"], arch["expansions"],
                           arch["vit_depth"], vit_heads).state_dict()
    report = {"loaded": [], "missing": [], "ignored": [], "shape_mismatch": []}
    state = {}
    for k, v in sd.items():
        if k in IGNORED_WITH_REASON:
            report["ignored"].append(f"{k} ({IGNORED_WITH_REASON[k]})")
        elif k not in target:
            report["ignored"].append(f"{k} (unknown key)")
        elif target[k].shape != v.shape:
            report["shape_mismatch"].append(f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}")
        else:
            state[k] = v.detach().float().cpu()
            report["loaded"].append(k)
    report["missing"] = [k for k in target if k not in state]
    if report["missing"] or report["shape_mismatch"]:
        shown = (report["missing"] + report["shape_mismatch"])[:8]
        raise HySparKError(f"the checkpoint does not describe a complete encoder: {len(report['missing'])} missing, "
                           f"{len(report['shape_mismatch'])} of another shape (e.g. {', '.join(shown)})",
                           "is --vit-heads right? is this a HySparK encoder file?")
    if in_channels is not None and in_channels != arch["in_channels"]:
        state[PUBLISHED_STEM_KEY] = adapt_input_channels(state[PUBLISHED_STEM_KEY], in_channels)
        report["loaded"].append(f"{PUBLISHED_STEM_KEY} (repeated over {in_channels} input channels, "
                                f"scaled by 1/{in_channels})")
        arch["in_channels"] = in_channels
    return state, arch, report


def converted_network_weights(sd: Mapping[str, torch.Tensor], vit_heads: int = 12,
                              in_channels: int | None = None) -> tuple[dict, dict[str, Any], dict[str, list]]:
    """Fine-tuning-network weights (encoder converted + seeded decoder init), architecture and report."""
    state, arch, report = convert_encoder_state(sd, vit_heads, in_channels)
    return network_weights_with_encoder(state, arch), arch, report


def convert_published(obj: Any, vit_heads: int = 12, in_channels: int | None = None, source: str = "",
                      ) -> tuple[dict, dict[str, Any], dict[str, list]]:
    """A loaded published (or encoder-only, or our own HySparK) checkpoint -> (network weights, metadata, report).

    Our own files keep their metadata (provenance) with the architecture updated; a published file gets
    the reference preprocessing, ``plans_check: warn`` and this version's network class.
    """
    weights, arch, report = converted_network_weights(unwrap_state_dict(obj), vit_heads, in_channels)
    source_meta = obj.get("hyspark_meta", {}) if isinstance(obj, dict) else {}
    if source_meta:  # one of ours: keep its provenance, update what changed
        meta = {**source_meta, "architecture": arch, "converted_from": str(source)}
    else:
        meta = {"method": "hyspark", "source": f"published HySparK checkpoint {source}", "architecture": arch,
                **REFERENCE_PREPROCESSING, "plans_check": "warn", "network_class_name": NETWORK_CLASS_NAME,
                "pretrained_prefixes": [ENCODER_PREFIX], "decoder": DECODER_NOTE}
    meta["conversion_report"] = report
    return weights, meta, report


#: the weights protocol of this method's fine-tuning network, as the registry publishes it
NETWORK = FinetuneNetwork(NETWORK_CLASS_NAME, LEGACY_CLASS_NAMES, STEM_KEY, "stem", finetune_network, adapt_channels)
