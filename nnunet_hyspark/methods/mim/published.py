"""MiM's published pre-training checkpoints: their key layout, conversion to a MiMUNet weights file,
and loading into the pre-training model (``docs/methods.md``).

The published file (``checkpoint-<epoch>.pth``, ``checkpoint-final.pth``) is a dict ``{'model':
state_dict, 'optimizer', 'epoch', 'scaler', 'args'}`` ('args' a pickled ``argparse.Namespace``,
which :func:`nnunet_hyspark.safe_load.load_user_file` allows); the state dict has no ``module.``
prefix. Its names, and ours (in the pre-training model :class:`~nnunet_hyspark.methods.mim.model.MiM`):

================================================  ============================================
published                                         ours
================================================  ============================================
``patch_embed{1-4}.proj`` / ``.norm``             ``encoder.downs.{0-3}.conv`` / ``.norm``
``patch_embed5`` (Linear)                         ``encoder.token_linear``
``blocks{1-3}.j.norm1 conv1 attn conv2 norm2``    ``encoder.stages.{0-2}.j.norm1 pw1 dw pw2 norm2``
``blocks{1-3}.j.mlp.fc1`` / ``.fc2``              ``encoder.stages.{0-2}.j.mlp.0`` / ``.2``
``blocks4.k.*`` (ViT), ``norm``                   ``encoder.blocks.k.*``, ``encoder.norm``
``stage{1-3}_output_decode``                      ``fusion.{0-2}``
``decoder_*``, ``mask_token``, ``aggregate_*``    the same names
``pos_embed``, ``decoder_pos_embed``              none: fixed sin-cos tables, rebuilt per grid
================================================  ============================================

(``attn`` is the depthwise 5^3 conv between the two pointwise convs ``conv1`` and ``conv2``.) The
architecture is read off the shapes, except the number of attention heads. Every key is accounted
for: loaded, ignored with a reason, or reported missing with what it gets instead.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Mapping

import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.methods.mim.levels import CELL
from nnunet_hyspark.methods.mim.weights import (FINETUNE_DECODER_NOTE, NETWORK_CLASS_NAME, STEM_KEY,
                                                complete_encoder_state, finetune_network, network_weights)
from nnunet_hyspark.weights import ENCODER_PREFIX, adapt_input_channels

PUBLISHED_STEM_KEY = "patch_embed1.proj.weight"
PUBLISHED_VIT_HEADS = 12  # the released model's (shapes do not show the number of heads)
#: ConvMAE's conv block: conv1 (pointwise, its output masked), attn (the depthwise 5^3 conv), conv2 (pointwise)
_CONV_BLOCK = {"conv1": "pw1", "attn": "dw", "conv2": "pw2", "norm1": "norm1", "norm2": "norm2",
               "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
#: published name -> ours (regular expressions, applied in order; the first match wins)
_RENAMES = (
    (r"patch_embed([1-4])\.proj\.", lambda m: f"encoder.downs.{int(m[1]) - 1}.conv."),
    (r"patch_embed([1-4])\.norm\.", lambda m: f"encoder.downs.{int(m[1]) - 1}.norm."),
    (r"patch_embed5\.", lambda m: "encoder.token_linear."),
    (r"blocks([1-3])\.(\d+)\.(conv1|attn|conv2|norm1|norm2|mlp\.fc1|mlp\.fc2)\.",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.{m[2]}.{_CONV_BLOCK[m[3]]}."),
    (r"blocks4\.", lambda m: "encoder.blocks."),
    (r"norm\.", lambda m: "encoder.norm."),
    (r"stage([1-3])_output_decode\.", lambda m: f"fusion.{int(m[1]) - 1}."),
    (r"(decoder_embed|decoder_blocks|decoder_norm|decoder_pred|aggregate_\w+?)\.", lambda m: f"{m[1]}."),
)
POSITION_KEYS = ("pos_embed", "decoder_pos_embed")
#: why the fine-tuning network has no place for the pre-training-only parts (by our name's first part)
FINETUNE_IGNORED = {
    "fusion": "pre-training only: projects the stage 1-3 outputs into the kept tokens; fine-tuning uses them as skips",
    "decoder": "pre-training only: the MAE decoder",
    "mask_token": "pre-training only: the MAE decoder's mask token",
    "aggregate": "pre-training only: a cross-level alignment head",
}
#: the published preprocessing (not nnU-Net's plans): fine-tuning warns about the mismatch instead of refusing
REFERENCE_PREPROCESSING = {"normalization_schemes": ["MiM reference: HU clipped to [-1000, 1000], scaled to [0, 1]"]}


def our_name(key: str) -> str | None:
    """Our pre-training model's name of published ``key``; None for keys without one."""
    if key == "mask_token":
        return key
    for pattern, rename in _RENAMES:
        m = re.match(pattern, key)
        if m:
            return rename(m) + key[m.end():]
    return None


def published_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict of a loaded published file (``obj['model']``, or a bare state dict), without ``module.``
    prefixes; None when ``obj`` holds none."""
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return None
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def recognise_published(obj: Any) -> bool:
    """Does ``obj`` (a loaded file or its state dict) have MiM's published key layout?"""
    sd = published_state_dict(obj)
    keys = (PUBLISHED_STEM_KEY, "patch_embed5.weight", "blocks4.0.attn.qkv.weight")  # conv, token Linear, ViT
    return sd is not None and all(k in sd for k in keys)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({m[1] for k in sd if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))})


def infer_architecture(sd: Mapping[str, torch.Tensor], vit_heads: int = PUBLISHED_VIT_HEADS) -> dict[str, Any]:
    """MiMUNet's architecture (in_channels, widths, conv_depths, vit_depth, vit_heads, vit_mlp_ratio) from shapes."""
    if PUBLISHED_STEM_KEY not in sd:
        raise HySparKError(f"no '{PUBLISHED_STEM_KEY}' in the checkpoint: not a MiM pre-training model",
                           "pass the published checkpoint-*.pth of MiM")
    widths = [int(sd[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)]
    if widths[3] % vit_heads:
        raise HySparKError(f"the ViT width {widths[3]} is not divisible by --vit-heads {vit_heads}",
                           "give the number of attention heads the checkpoint was trained with")
    fc1 = sd.get("blocks4.0.mlp.fc1.weight")
    return {"in_channels": int(sd[PUBLISHED_STEM_KEY].shape[1]), "widths": widths,
            "conv_depths": [_count(sd, f"blocks{i}.") for i in (1, 2, 3)], "vit_depth": _count(sd, "blocks4."),
            "vit_heads": int(vit_heads), "vit_mlp_ratio": fc1.shape[0] / widths[3] if fc1 is not None else 4.0}


def pretraining_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The MAE decoder's width and depth and the pre-training token count, as far as shapes tell."""
    cfg: dict[str, Any] = {"decoder_depth": _count(sd, "decoder_blocks.")}
    if "decoder_embed.weight" in sd:
        cfg["decoder_width"] = int(sd["decoder_embed.weight"].shape[0])
    if "pos_embed" in sd:
        cfg["pretraining_tokens"] = int(sd["pos_embed"].shape[-2])
    return cfg


def position_reason(table: torch.Tensor) -> str:
    """Why a stored position table is not loaded, and whether it equals the sin-cos table ours computes."""
    n, width = int(table.shape[-2]), int(table.shape[-1])
    side = round(n ** (1 / 3))
    what = f"fixed 3D sin-cos positions ({side}^3 grid)" if side ** 3 == n else "fixed positions"
    if side ** 3 != n or width % 6:
        return f"{what}: rebuilt for every grid"
    diff = float((table.reshape(n, width).float() - sincos_3d(width, (side,) * 3)).abs().max())
    same = "identical to ours" if diff < 1e-5 else f"DIFFERS from ours by up to {diff:.3g}"
    return f"{what}, {same}: rebuilt for every grid"


def map_published(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(our name -> tensor, our name -> published name, ignored-with-reason lines) for a published state dict."""
    mapped, origin, ignored = {}, {}, []
    for k, v in sd.items():
        if k in POSITION_KEYS:
            ignored.append(f"{k} ({position_reason(v)})")
        elif (ours := our_name(k)) is None:
            ignored.append(f"{k} (unknown key)")
        else:
            mapped[ours], origin[ours] = v.detach().float().cpu(), k
    return mapped, origin, ignored


def _adapt_stem_and_prediction(state: dict[str, torch.Tensor], in_channels: int, loaded: list[str]) -> None:
    """Repeat a 1-channel stem over ``in_channels`` inputs (scaled by 1/channels), and the reconstruction head's
    rows per channel (the same voxels predicted for every channel), in place. The pre-training model names its
    first conv as MiMUNet does (``STEM_KEY``)."""
    stem = STEM_KEY
    if stem in state and state[stem].shape[1] != in_channels:
        state[stem] = adapt_input_channels(state[stem], in_channels)
        loaded.append(f"{stem} (repeated over {in_channels} input channels, scaled by 1/{in_channels})")
    for key in ("decoder_pred.weight", "decoder_pred.bias"):
        if key in state and state[key].shape[0] == CELL ** 3 and in_channels > 1:
            state[key] = state[key].repeat(in_channels, *([1] * (state[key].ndim - 1)))
            loaded.append(f"{key} (repeated for {in_channels} channels)")


def load_published_pretraining(model: torch.nn.Module, obj: Any) -> dict[str, list[str]]:
    """Load a published MiM pre-training checkpoint (a loaded file or its state dict) into our pre-training
    ``model`` (:class:`~nnunet_hyspark.methods.mim.model.MiM`): encoder, fusion convs, MAE decoder, mask token and
    the four alignment heads. Returns the report (``loaded`` as 'published -> ours', ``ignored`` with reasons,
    ``missing``, ``shape_mismatch``); raises HySparKError, loading nothing, unless every tensor of ``model`` is
    filled with the right shape. A 1-channel checkpoint is adapted to the model's input channels."""
    sd = published_state_dict(obj)
    if sd is None or not recognise_published(sd):
        raise HySparKError("not a published MiM pre-training checkpoint (no patch_embed1/patch_embed5/blocks4 keys)")
    mapped, origin, ignored = map_published(sd)
    report = {"loaded": [], "ignored": ignored, "missing": [], "shape_mismatch": []}
    _adapt_stem_and_prediction(mapped, model.encoder.in_channels, report["loaded"])
    target = model.state_dict()
    state = {}
    for ours, v in mapped.items():
        if ours not in target:
            report["ignored"].append(f"{origin[ours]} (no {ours} in this model)")
        elif target[ours].shape != v.shape:
            report["shape_mismatch"].append(f"{origin[ours]} {tuple(v.shape)} != {ours} {tuple(target[ours].shape)}")
        else:
            state[ours] = v
            report["loaded"].append(f"{origin[ours]} -> {ours}")
    report["missing"] = [k for k in target if k not in state]
    _refuse_incomplete(report, "this MiM pre-training model", "do the plans' widths and depths and --decoder-width "
                       "match the checkpoint?")
    model.load_state_dict(state)
    return report


def _refuse_incomplete(report: Mapping[str, list[str]], what: str, hint: str) -> None:
    if report["missing"] or report["shape_mismatch"]:
        shown = (list(report["missing"]) + list(report["shape_mismatch"]))[:6]
        raise HySparKError(f"the checkpoint does not fill {what}: {len(report['missing'])} missing, "
                           f"{len(report['shape_mismatch'])} of another shape (e.g. {'; '.join(shown)})", hint)


def plain_args(args: Any) -> dict[str, Any]:
    """The training script's options (a Namespace) as JSON-safe values, for the provenance metadata."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else (args or {}).items()
    ok = (str, int, float, bool, type(None))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items
            if isinstance(v, ok) or (isinstance(v, (list, tuple)) and all(isinstance(x, ok) for x in v))}


def encoder_state(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The fine-tuning backbone's pre-trained tensors (names without ``encoder.``) and the report: every
    published key loaded into the backbone or ignored with its reason."""
    mapped, origin, ignored = map_published(sd)
    report = {"loaded": [], "ignored": ignored, "missing": [], "shape_mismatch": []}
    state = {}
    for ours, v in mapped.items():
        head = ours.split(".", 1)[0]
        if head == "encoder":
            state[ours[len("encoder."):]] = v
            report["loaded"].append(f"{origin[ours]} -> {ours}")
        else:
            reason = next(r for prefix, r in FINETUNE_IGNORED.items() if head.startswith(prefix))
            report["ignored"].append(f"{origin[ours]} ({reason})")
    return state, report


def published_meta(obj: Any, sd: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Provenance of a published checkpoint: source, epoch, the training options, the decoder's shape."""
    mim = pretraining_config(sd)
    if isinstance(obj, Mapping):
        if isinstance(obj.get("epoch"), (int, float)):
            mim["epoch"] = obj["epoch"]
        if obj.get("args") is not None:
            mim["published_args"] = plain_args(obj["args"])
    return {"method": "mim", "source": f"published MiM checkpoint {source}".strip(), "mim": mim,
            **REFERENCE_PREPROCESSING, "plans_check": "warn"}


# ------------------------------------------------------------------------------------ to a MiMUNet weights file


def convert_published(obj: Any, vit_heads: int | None = None, in_channels: int | None = None, source: str = "",
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[str]]]:
    """A loaded published MiM checkpoint -> (MiMUNet weights, metadata, report).

    The backbone is loaded; the layer-scale tensors the fine-tuning backbone adds are reported missing and set to
    their initial value 1 (as the published fine-tuning does); everything else of the network is at the seeded
    initialisation. ``in_channels`` repeats the 1-channel first conv over that many inputs. (Our own weights files
    need no conversion: ``weights.adapt_weights_channels`` adapts their channels.)
    """
    sd = published_state_dict(obj)
    if sd is None or not recognise_published(sd):
        raise HySparKError("the checkpoint has no MiM pre-training layout (patch_embed1-5, blocks1-4)",
                           "pass the published checkpoint-*.pth of MiM")
    arch = infer_architecture(sd, vit_heads or PUBLISHED_VIT_HEADS)
    state, report = encoder_state(sd)
    return _network_file(state, arch, report, in_channels, published_meta(obj, sd, source))


def _network_file(state: dict[str, torch.Tensor], arch: dict[str, Any], report: dict[str, list[str]],
                  in_channels: int | None, meta: dict[str, Any]) -> tuple[dict, dict[str, Any], dict[str, list[str]]]:
    """Check the backbone ``state`` is complete, adapt its channels, and build the network weights and metadata."""
    with torch.device("meta"):  # shapes only
        target = finetune_network(arch).encoder.state_dict()
    state, added = complete_encoder_state(state, arch)
    problems = {"missing": [ENCODER_PREFIX + k for k in target if k not in state],
                "shape_mismatch": [f"{ENCODER_PREFIX}{k} {tuple(v.shape)} != {tuple(target[k].shape)}"
                                   for k, v in state.items() if k in target and v.shape != target[k].shape]}
    _refuse_incomplete(problems, "the MiM backbone", "is --vit-heads right? is this a MiM pre-training checkpoint?")
    report["missing"] = [f"{ENCODER_PREFIX}{k} (layer-scale: initial value 1, as the published fine-tuning)"
                         for k in added]
    if in_channels is not None and in_channels != arch["in_channels"]:
        key = STEM_KEY[len(ENCODER_PREFIX):]
        state[key] = adapt_input_channels(state[key], in_channels)
        report["loaded"].append(f"{STEM_KEY} (repeated over {in_channels} input channels, scaled by 1/{in_channels})")
        arch = {**arch, "in_channels": in_channels}
    meta = {**meta, "architecture": arch, "network_class_name": NETWORK_CLASS_NAME,
            "pretrained_prefixes": [ENCODER_PREFIX], "decoder": FINETUNE_DECODER_NOTE, "conversion_report": report}
    return network_weights(state, arch), meta, report
