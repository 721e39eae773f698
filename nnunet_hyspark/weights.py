"""Weight files for fine-tuning: export, inspection, channel adaptation, and the official checkpoint.

The file format is the one ``nnUNetv2_train -pretrained_weights`` loads:
``{"network_weights": <HySparKUNet state dict without seg_layers>, "hyspark_meta": {...}}``
with CPU tensors (nnU-Net loads it without ``map_location``) and a JSON sidecar
holding the same metadata. nnU-Net's loader requires every non-head key of the
network, so the file carries the pre-trained encoder *and* a decoder at its
(seeded) random initialisation; the metadata says which is which. Position
embeddings are fixed sin-cos, rebuilt for any patch size, and never stored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save, atomic_torch_save
from nnunet_hyspark.models.encoder import HybridEncoder
from nnunet_hyspark.models.unet import HySparKUNet

HEAD_KEY = ".seg_layers."  # nnU-Net never transfers these
DECODER_INIT_SEED = 0


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


def finetune_network(arch: Mapping[str, Any], num_classes: int = 1) -> HySparKUNet:
    return HySparKUNet(arch["in_channels"], num_classes, widths=arch["widths"], depths=arch["depths"],
                       expansions=arch["expansions"], vit_depth=arch["vit_depth"], vit_heads=arch["vit_heads"])


def network_weights_with_encoder(encoder_state: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict:
    """A full HySparKUNet state dict (minus heads): ``encoder_state`` plus a seeded decoder initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DECODER_INIT_SEED)
        net = finetune_network(arch)
    net.encoder.load_state_dict(encoder_state)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if HEAD_KEY not in k}


def save_weights_file(network_weights: Mapping[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the weights file and its ``.json`` sidecar atomically; returns the weights path."""
    path = Path(path)
    atomic_torch_save({"network_weights": dict(network_weights), "hyspark_meta": meta}, path)
    atomic_json_save(meta, path.with_suffix(".json"))
    return path


def export_encoder(encoder: HybridEncoder, meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Export a (pre-trained) encoder in the format ``nnUNetv2_train -pretrained_weights`` loads."""
    arch = arch_config(encoder)
    meta = {**meta, "architecture": arch, "network_class_name": "nnunet_hyspark.models.unet.HySparKUNet",
            "pretrained_prefixes": ["encoder."],
            "decoder": f"random initialisation (seed {DECODER_INIT_SEED}), not pre-trained"}
    weights = network_weights_with_encoder(encoder.state_dict(), arch)
    return save_weights_file(weights, meta, path)


def load_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file on the CPU; a one-line HySparKError if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise HySparKError(f"weights file not found: {path}", "check the path printed at the end of hyspark_pretrain")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise HySparKError(f"cannot read weights file {path}: {type(e).__name__}: {e}",
                           "the file is corrupt or not a torch checkpoint") from e
    if not isinstance(obj, dict) or "network_weights" not in obj:
        raise HySparKError(f"{path} has no 'network_weights' entry",
                           "convert published/encoder-only files with hyspark_convert_checkpoint")
    return obj["network_weights"], obj.get("hyspark_meta", {})


def transfer_report(network_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor]) -> dict:
    """What nnU-Net's loader would do: loaded, missing (in network, not in file), ignored, wrong shape."""
    net_keys = [k for k in network_state if HEAD_KEY not in k]
    loaded = [k for k in net_keys if k in file_state and file_state[k].shape == network_state[k].shape]
    mismatched = [k for k in net_keys if k in file_state and file_state[k].shape != network_state[k].shape]
    missing = [k for k in net_keys if k not in file_state]
    ignored = [k for k in file_state if k not in network_state or HEAD_KEY in k]
    return {"loaded": loaded, "missing": missing, "ignored": ignored, "shape_mismatch": mismatched}


def format_report(report: Mapping[str, list], meta: Mapping[str, Any] | None = None) -> list[str]:
    """Human-readable lines: counts per category, with encoder and decoder separated."""
    pre = tuple((meta or {}).get("pretrained_prefixes", ["encoder."]))
    n_pre = sum(k.startswith(pre) for k in report["loaded"])
    lines = [f"loaded {len(report['loaded'])} tensors ({n_pre} pre-trained encoder tensors, "
             f"{len(report['loaded']) - n_pre} decoder tensors at their exported initialisation)",
             f"missing {len(report['missing'])}, ignored {len(report['ignored'])}, "
             f"shape mismatch {len(report['shape_mismatch'])}"]
    for what in ("missing", "ignored", "shape_mismatch"):
        for k in report[what][:20]:
            lines.append(f"  {what}: {k}")
        if len(report[what]) > 20:
            lines.append(f"  ... and {len(report[what]) - 20} more {what}")
    return lines


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat a stem kernel over ``channels`` inputs, scaled so identical inputs give the same response."""
    c = weight.shape[1]
    if c == channels:
        return weight
    if c != 1:
        raise HySparKError(f"can only adapt a 1-channel stem, this one has {c} channels")
    return weight.repeat(1, channels, *([1] * (weight.ndim - 2))) / channels
