"""Conversion of published / encoder-only checkpoints into the fine-tuning weights format.

The published HySparK file is a plain state dict of the sparse encoder with the
dense encoder's names (``embeddings.*``, ``mae.*``; design doc section 4). Its
architecture is read off the tensor shapes (except the number of attention heads,
which shapes do not reveal). Every key is accounted for: mapped, ignored with a
reason, or reported as missing.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.models.encoder import HybridEncoder
from nnunet_hyspark.weights import adapt_input_channels, network_weights_with_encoder

# keys of the published file that this project deliberately does not load, and why
IGNORED_WITH_REASON = {
    "mae.pos_embed": "fixed sin-cos position embedding: rebuilt for the target grid",
    "mae.mask_token": "unused: masked cells are filled by the decoder's per-scale mask tokens",
}
STEM_KEY = "embeddings.stem.weight"


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under common keys; strip DDP / compile prefixes."""
    if isinstance(obj, dict) and "network_weights" in obj:
        sd = {k[len("encoder."):]: v for k, v in obj["network_weights"].items() if k.startswith("encoder.")}
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
    if STEM_KEY not in sd:
        raise HySparKError(f"no '{STEM_KEY}' in the checkpoint: not a HySparK encoder",
                           "check the file; keys must be named embeddings.* and mae.*")
    w0 = sd[STEM_KEY].shape[0]
    widths = [w0] + [sd[f"embeddings.expend{k}.weight"].shape[0] for k in range(1, 5)]
    depths, expansions = [], []
    for i in range(1, 6):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"embeddings\.layer{i}\.(\d+)\.", k))}
        depths.append(len(blocks))
        conv2 = sd.get(f"embeddings.layer{i}.0.conv2.weight")
        expansions.append(conv2.shape[0] // conv2.shape[1] if conv2 is not None else 1)
    vit_depth = len({int(m.group(1)) for k in sd if (m := re.match(r"mae\.blocks\.(\d+)\.", k))})
    return {"in_channels": sd[STEM_KEY].shape[1], "widths": widths, "depths": depths, "expansions": expansions,
            "vit_depth": vit_depth, "vit_heads": vit_heads}


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
        state[STEM_KEY] = adapt_input_channels(state[STEM_KEY], in_channels)
        report["loaded"].append(f"{STEM_KEY} (repeated over {in_channels} input channels, scaled by 1/{in_channels})")
        arch["in_channels"] = in_channels
    return state, arch, report


def converted_network_weights(sd: Mapping[str, torch.Tensor], vit_heads: int = 12,
                              in_channels: int | None = None) -> tuple[dict, dict[str, Any], dict[str, list]]:
    """Fine-tuning-network weights (encoder converted + seeded decoder init), architecture and report."""
    state, arch, report = convert_encoder_state(sd, vit_heads, in_channels)
    return network_weights_with_encoder(state, arch), arch, report
