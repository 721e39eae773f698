"""Hi-End-MAE's published pre-training checkpoints: recognise them, convert them for fine-tuning, load them
for further pre-training (``docs/methods.md``, Hi-End-MAE).

The published training script saves ``{'epoch', 'state_dict', 'optimizer', 'scaler'}`` with the
keys of a DistributedDataParallel model (``module.`` prefix); a bare state dict is accepted too.
Its names map onto :class:`~nnunet_hyspark.methods.hiend_mae.model.HiEndMAE`'s by
:data:`RENAMES`; the architecture is read off the tensor shapes, except the number of attention
heads (the published widths 768 and 1536 have 12 and 16). Every key is accounted for: loaded,
ignored with a reason, or reported missing.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.methods.hiend_mae.encoder import DEFAULT_TAPS, VIT_CONFIGS, ViTEncoder
from nnunet_hyspark.methods.hiend_mae.weights import (NETWORK_CLASS_NAME, PRETRAINING_ONLY_KEYS,
                                                      adapt_weights_channels, network_weights_with_encoder)
from nnunet_hyspark.weights import DECODER_NOTE, ENCODER_PREFIX, adapt_input_channels

#: published name prefix -> ours (the pre-training model), first match wins; the rest keep their names
RENAMES = (
    ("encoder.patch_embed.proj.", "encoder.patch_embed."),
    ("mask_token", "decoder.mask_token"),
    ("decoder.blocks.", "decoder.self_blocks."),
    ("decoder.cross_attention_blocks.", "decoder.cross_blocks."),
    ("decoder.head.", "decoder.pred."),
    ("encoder_to_decoder.", "decoder.proj."),  # index i: tapped block i (shallowest first), last: final output
)
#: stored sin-cos tables: we rebuild them for the token grid of every input
POSITION_KEYS = ("encoder_pos_embed", "decoder_pos_embed")
PATCH_EMBED_KEY = "encoder.patch_embed.proj.weight"
#: heads of the published configurations (shapes do not show them), by ViT width
PUBLISHED_HEADS = {VIT_CONFIGS[n]["embed_dim"]: VIT_CONFIGS[n]["num_heads"] for n in ("base", "large")}
#: the published pre-training's own preprocessing, not nnU-Net's plans (fine-tuning warns instead of refusing)
REFERENCE_PREPROCESSING = {
    "spacing": [1.5, 1.5, 1.5],
    "normalization_schemes": ["Hi-End-MAE reference: HU clipped to [-175, 250], scaled to [0, 1]"],
}
DECODER_REASON = "pre-training decoder: not part of the fine-tuning network (hyspark_pretrain --init-from loads it)"


def new_report() -> dict[str, list[str]]:
    return {"loaded": [], "missing": [], "ignored": [], "shape_mismatch": []}


def published_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model state dict of a loaded checkpoint (``obj['state_dict']`` or ``obj``), prefixes stripped."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HySparKError("the checkpoint holds no state dict of tensors",
                           "pass the published Hi-End-MAE .pth (a dict with 'state_dict', or a state dict)")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}


def recognise_published(checkpoint: Any) -> bool:
    """Is this (a loaded checkpoint or its state dict) a published Hi-End-MAE model? Key lookups only."""
    try:
        sd = published_state_dict(checkpoint)
    except HySparKError:
        return False
    stem = sd.get(PATCH_EMBED_KEY)
    return stem is not None and stem.ndim == 5 and "encoder.blocks.0.attn.qkv.weight" in sd


def our_key(published: str) -> str:
    """The pre-training model's name for a published key (unchanged where the names agree)."""
    for old, new in RENAMES:
        if published.startswith(old):
            return new + published[len(old):]
    return published


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def infer_architecture(sd: Mapping[str, torch.Tensor], vit_heads: int | None = None) -> dict[str, Any]:
    """HiEndUNETR's ViT arguments (and ``in_channels``) from the shapes of a published state dict."""
    stem = sd.get(PATCH_EMBED_KEY)
    if stem is None or stem.ndim != 5 or len(set(stem.shape[2:])) != 1:
        raise HySparKError(f"no cubic 3D '{PATCH_EMBED_KEY}' in the checkpoint: not a Hi-End-MAE model",
                           "pass the published Hi-End-MAE .pth")
    width, depth = int(stem.shape[0]), _count(sd, r"encoder\.blocks\.(\d+)\.")
    heads = vit_heads or PUBLISHED_HEADS.get(width)
    if heads is None or width % heads:
        raise HySparKError(f"cannot tell the attention heads of a {width}-wide ViT from tensor shapes"
                           + (f" ({heads} does not divide it)" if heads else ""), "give --vit-heads N")
    if depth < max(DEFAULT_TAPS):
        raise HySparKError(f"the checkpoint's ViT has {depth} blocks; the published decoder taps blocks "
                           f"{list(DEFAULT_TAPS)}", "only Hi-End-MAE checkpoints with at least 10 blocks convert")
    hidden = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    return {"vit_patch": int(stem.shape[2]), "embed_dim": width, "depth": depth, "num_heads": int(heads),
            "mlp_ratio": hidden / width, "taps": list(DEFAULT_TAPS), "in_channels": int(stem.shape[1])}


def _position_reason(table: torch.Tensor) -> str:
    """Why a stored position table is not loaded, and how far it is from the table we rebuild."""
    reason = "fixed sin-cos positions: rebuilt for the token grid of every input"
    n, width = table.shape[-2], table.shape[-1]
    side = round(n ** (1 / 3))
    if table.ndim == 3 and side ** 3 == n and width % 6 == 0:
        diff = (table[0].float() - sincos_3d(width, (side,) * 3)).abs().max().item()
        reason += f"; the stored {side}^3 table differs from ours by at most {diff:.1e}"
    return reason


# ------------------------------------------------------------------------------------ fine-tuning (converter)


def _finetune_encoder_state(sd: Mapping[str, torch.Tensor], arch: Mapping[str, Any]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The fine-tuning ViT's state dict (no prefix) from a published state dict, and the key report."""
    kwargs = {k: arch[k] for k in ("vit_patch", "embed_dim", "depth", "num_heads", "mlp_ratio", "taps")}
    with torch.device("meta"):  # shapes only: the large ViT has 343 M parameters
        target = ViTEncoder(arch["in_channels"], class_token=False, **kwargs).state_dict()
    report, state = new_report(), {}
    for key, value in sd.items():
        ours = our_key(key)
        name = ours[len(ENCODER_PREFIX):]
        if key in POSITION_KEYS:
            report["ignored"].append(f"{key} ({_position_reason(value)})")
        elif not key.startswith(ENCODER_PREFIX):
            report["ignored"].append(f"{key} ({DECODER_REASON})")
        elif name in PRETRAINING_ONLY_KEYS:
            report["ignored"].append(f"{key} (class token: the fine-tuning ViT has none, as the published UNETR)")
        elif name not in target:
            report["ignored"].append(f"{key} (unknown key)")
        elif target[name].shape != value.shape:
            report["shape_mismatch"].append(f"{key} {tuple(value.shape)} != {tuple(target[name].shape)}")
        else:
            state[name] = value.detach().float().cpu()
            report["loaded"].append(key if key == ours else f"{key} -> {ours}")
    report["missing"] = [ENCODER_PREFIX + k for k in target if k not in state]
    return state, report


def _check_complete(report: Mapping[str, list[str]], what: str, hint: str) -> None:
    if report["missing"] or report["shape_mismatch"]:
        shown = (report["missing"] + report["shape_mismatch"])[:6]
        raise HySparKError(f"the checkpoint does not describe a complete {what}: {len(report['missing'])} missing, "
                           f"{len(report['shape_mismatch'])} of another shape (e.g. {', '.join(shown)})", hint)


def convert_published(obj: Any, vit_heads: int | None = None, in_channels: int | None = None, source: str = "",
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[str]]]:
    """A loaded published checkpoint (or one of our HiEndUNETR weights files) -> (HiEndUNETR weights without
    heads, metadata, report); ``in_channels`` adapts the patch embedding (repeated, scaled by 1/N)."""
    if isinstance(obj, dict) and "network_weights" in obj:
        return _convert_own(obj, in_channels, source)
    sd = published_state_dict(obj)
    arch = infer_architecture(sd, vit_heads)
    state, report = _finetune_encoder_state(sd, arch)
    _check_complete(report, "Hi-End-MAE ViT", "is --vit-heads right? is this a Hi-End-MAE checkpoint?")
    if in_channels is not None and in_channels != arch["in_channels"]:
        key = "patch_embed.weight"
        state[key] = adapt_input_channels(state[key], in_channels)
        report["loaded"].append(f"{PATCH_EMBED_KEY} (repeated over {in_channels} input channels, "
                                f"scaled by 1/{in_channels})")
        arch["in_channels"] = in_channels
    weights = network_weights_with_encoder(state, arch, arch["in_channels"])
    meta = {"method": "hiend_mae", "source": f"published Hi-End-MAE checkpoint {source}", "architecture": arch,
            **REFERENCE_PREPROCESSING, "plans_check": "warn", "network_class_name": NETWORK_CLASS_NAME,
            "pretrained_prefixes": [ENCODER_PREFIX], "decoder": DECODER_NOTE, "conversion_report": report}
    return weights, meta, report


def _convert_own(obj: Mapping[str, Any], in_channels: int | None, source: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[str]]]:
    """One of our weights files only converts to another number of input channels."""
    if in_channels is None:
        raise HySparKError(f"{source} is a Hi-End-MAE weights file: it loads as it is",
                           "give --in-channels N to adapt its patch embedding to N input channels")
    weights, meta = adapt_weights_channels(obj["network_weights"], obj.get("hyspark_meta", {}), in_channels)
    report = new_report()
    report["loaded"] = [k for k in weights if k.startswith(ENCODER_PREFIX)]
    return weights, {**meta, "converted_from": str(source), "conversion_report": report}, report


# ------------------------------------------------------------------------------------ pre-training (--init-from)


def _adapt_to(name: str, value: torch.Tensor, shape: torch.Size, channels: int) -> torch.Tensor:
    """A 1-channel published tensor for a model of ``channels`` inputs: the patch embedding repeated (scaled
    by 1/channels), the reconstruction head's rows repeated per channel (our voxel order is channel first)."""
    if value.shape == shape or channels == 1:
        return value
    if name == "encoder.patch_embed.weight" and value.shape[1] == 1:
        return adapt_input_channels(value, channels)
    if name.startswith("decoder.pred.") and value.shape[0] * channels == shape[0]:
        return value.repeat(channels, *([1] * (value.ndim - 1)))
    return value


def load_published_pretraining(model: torch.nn.Module, checkpoint: Any) -> dict[str, list[str]]:
    """Load a published Hi-End-MAE pre-training checkpoint (all of it: encoder with its class token, decoder,
    mask token, the encoder-to-decoder projections) into ``model`` (a :class:`HiEndMAE` built for the
    same architecture); returns the report. A HySparKError, loading nothing, when anything is missing."""
    target = model.state_dict()
    report, state = new_report(), {}
    for key, value in published_state_dict(checkpoint).items():
        ours = our_key(key)
        if key in POSITION_KEYS:
            report["ignored"].append(f"{key} ({_position_reason(value)})")
        elif ours not in target:
            report["ignored"].append(f"{key} (unknown key)")
        else:
            value = _adapt_to(ours, value, target[ours].shape, model.encoder.in_channels)
            if value.shape != target[ours].shape:
                report["shape_mismatch"].append(f"{key} {tuple(value.shape)} != {tuple(target[ours].shape)}")
            else:
                state[ours] = value.detach().to(target[ours].dtype)
                report["loaded"].append(key if key == ours else f"{key} -> {ours}")
    report["missing"] = [k for k in target if k not in state]
    _check_complete(report, "Hi-End-MAE pre-training model of this architecture",
                    "the plan's arch_kwargs (width, depth, ViT patch) and --decoder-width must be the checkpoint's")
    model.load_state_dict(state)
    return report
