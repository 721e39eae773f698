"""Weight files for fine-tuning, for every method: the file format, the transfer report, channel adaptation.

The file format is the one ``nnUNetv2_train -pretrained_weights`` loads:
``{"network_weights": <fine-tuning network state dict without seg_layers>, "hyspark_meta": {...}}``
with CPU tensors (nnU-Net loads it without ``map_location``) and a JSON sidecar
holding the same metadata. nnU-Net's loader requires every non-head key of the
network, so the file carries the pre-trained encoder *and* the rest of the network
at its (seeded) random initialisation; the metadata says which is which. Position
embeddings are fixed sin-cos, rebuilt for any patch size, and never stored.
Each method's ``weights.py`` builds its network's file on these helpers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save, atomic_torch_save
from nnunet_hyspark.safe_load import load_user_file

HEAD_KEY = ".seg_layers."  # nnU-Net never transfers these
DECODER_INIT_SEED = 0  # the non-pre-trained parts of every exported network start from this seed
ENCODER_PREFIX = "encoder."  # every fine-tuning network keeps its pre-trained part under this name
#: the metadata's description of the parts of a file that are not pre-trained
DECODER_NOTE = f"random initialisation (seed {DECODER_INIT_SEED}), not pre-trained"


def seeded_network_weights(build_network: Callable[[], nn.Module],
                           encoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full network state dict minus heads (CPU): ``encoder_state`` in ``network.encoder``, everything
    else at the initialisation ``build_network()`` gives under :data:`DECODER_INIT_SEED`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DECODER_INIT_SEED)
        net = build_network()
    net.encoder.load_state_dict(encoder_state)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if HEAD_KEY not in k}


def save_weights_file(network_weights: Mapping[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the weights file and its ``.json`` sidecar atomically; returns the weights path."""
    path = Path(path)
    atomic_torch_save({"network_weights": dict(network_weights), "hyspark_meta": meta}, path)
    atomic_json_save(meta, path.with_suffix(".json"))
    return path


def export_network_weights(network_weights: Mapping[str, torch.Tensor], arch: Mapping[str, Any], class_name: str,
                           meta: dict[str, Any], path: str | os.PathLike, decoder: str = DECODER_NOTE) -> Path:
    """Write a method's weights file: ``meta`` plus the architecture, the network's dotted class path,
    which part is pre-trained (``encoder.``) and what ``decoder`` (the rest) is."""
    meta = {**meta, "architecture": dict(arch), "network_class_name": class_name,
            "pretrained_prefixes": [ENCODER_PREFIX], "decoder": decoder}
    return save_weights_file(network_weights, meta, path)


def load_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file on the CPU without running pickled code (``weights_only=True``); a one-line
    HySparKError if it is missing, corrupt, carries pickled objects, or is not ours."""
    path = Path(path)
    if not path.is_file():
        raise HySparKError(f"weights file not found: {path}", "check the path printed at the end of hyspark_pretrain")
    obj = load_user_file(path, "weights file")
    if not isinstance(obj, dict) or "network_weights" not in obj:
        raise HySparKError(f"{path} has no 'network_weights' entry",
                           "convert published/encoder-only files with hyspark_convert_checkpoint")
    return obj["network_weights"], own_file_meta(obj, path, complete=False) or {}


def own_file_meta(obj: Any, path: str | os.PathLike, complete: bool = True) -> dict[str, Any] | None:
    """The ``hyspark_meta`` of one of our weights files, None for a file without it (published checkpoints).

    A file that has the key but a value that is no metadata (``None``, a string, a dict without a network
    class or architecture) is refused: guessing would convert it with the wrong architecture. ``complete=False``
    only asks for a dict (fine-tuning reads the plans fields it needs and reports what is missing)."""
    if not isinstance(obj, dict) or "hyspark_meta" not in obj:
        return None
    meta = obj["hyspark_meta"]
    problem = None
    if not isinstance(meta, dict):
        problem = f"is {type(meta).__name__}, not a dict"
    elif not complete:
        pass
    elif not isinstance(meta.get("network_class_name"), str):
        problem = "names no network_class_name"
    elif not isinstance(meta.get("architecture"), dict):
        problem = "has no architecture"
    elif not isinstance(obj.get("network_weights"), dict):
        problem = "comes without a 'network_weights' state dict"
    if problem:
        raise HySparKError(f"{path}: its 'hyspark_meta' {problem} (malformed metadata)",
                           "export the weights again with hyspark_pretrain, or remove the 'hyspark_meta' entry "
                           "to convert the file as a published checkpoint")
    return meta


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
    pre = tuple((meta or {}).get("pretrained_prefixes", [ENCODER_PREFIX]))
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


def encoder_state_of(network_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder.`` part of a network state dict, with the prefix removed."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in network_weights.items() if k.startswith(ENCODER_PREFIX)}


def adapt_network_channels(network_weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any], in_channels: int,
                           stem_key: str, build_network: Callable[[Mapping[str, Any], int], nn.Module]
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A weights file for ``in_channels`` inputs: the pre-trained ``stem_key`` repeated over the channels
    (:func:`adapt_input_channels`), the parts that are not pre-trained re-initialised (seeded) for that
    many channels by ``build_network(architecture, in_channels)``."""
    arch = dict(meta.get("architecture") or {})
    if not arch:
        raise HySparKError("the weights file has no 'architecture' in its metadata",
                           "export it again with hyspark_pretrain")
    encoder_state = encoder_state_of(network_weights)
    key = stem_key[len(ENCODER_PREFIX):]
    encoder_state[key] = adapt_input_channels(encoder_state[key], in_channels)
    arch["in_channels"] = in_channels
    weights = seeded_network_weights(lambda: build_network(arch, in_channels), encoder_state)
    return weights, {**meta, "architecture": arch}
