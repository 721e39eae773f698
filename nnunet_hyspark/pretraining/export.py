"""``hyspark_export_weights``: ``-pretrained_weights`` files from any pre-training checkpoint.

A run exports ``encoder_weights.pth`` from its final model; this rebuilds the pre-training model of
any checkpoint of the run (``checkpoint_best.pth``, ``checkpoint_latest.pth``, ``checkpoint_final.pth``)
and exports it with the method's own export (``MethodSpec.export``), so the file is the one the run
would have written at that point. The model is rebuilt from ``model_build`` in the checkpoint's
``loop_config.extra``; checkpoints of earlier versions lack it and are rebuilt from the plans and the
``pretrain_config.json`` beside them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import MethodSpec, ModelOptions, get_method
from nnunet_hyspark.safe_load import load_user_file

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DDP


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A pre-training checkpoint (read without running pickled code); a one-line error for anything else."""
    state = load_user_file(path, "checkpoint")
    if not isinstance(state, dict) or not {"model", "meta", "step"} <= set(state):
        raise HySparKError(f"{path} is not a hyspark_pretrain checkpoint (no model / meta / step)",
                           "give checkpoint_best.pth, checkpoint_latest.pth or checkpoint_final.pth of a "
                           "pre-training output folder")
    return state


def _model_build(state: Mapping[str, Any], checkpoint: Path, spec: MethodSpec) -> dict[str, Any]:
    build = ((state.get("loop_config") or {}).get("extra") or {}).get("model_build")
    if build:
        return dict(build)
    from nnunet_hyspark.pretraining.model_setup import plan_arch_kwargs

    meta = state["meta"]
    config_file = checkpoint.parent / "pretrain_config.json"
    options = json.loads(config_file.read_text()) if config_file.is_file() else {}
    patch = options.get("patch_size")
    return {"arch": plan_arch_kwargs(meta["datasets"][0], meta["plans_name"], meta["configuration"], spec),
            "in_channels": len(meta["normalization_schemes"]), "mask_ratio": meta.get("mask_ratio", 0.75),
            "decoder_width": options.get("decoder_width"),
            "fuse_full_resolution": bool(options.get("fuse_full_resolution", False)), "level_patch": patch}


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def pretraining_seconds(history: Mapping[str, Any]) -> float | None:
    """Wall time of the run up to this checkpoint: the sum of its epoch times (each epoch's training and
    validation; kept in the checkpoint, so resumed runs add up), for the benchmark's cost table."""
    times = history.get("epoch_time") or []
    return round(float(sum(times)), 1) if times else None


def export_meta(state: Mapping[str, Any], checkpoint: Path, spec: MethodSpec) -> dict[str, Any]:
    """The run's metadata plus where the weights come from: the checkpoint, its step and its last scores."""
    history = state.get("history") or {}
    iterations = (state.get("loop_config") or {}).get("iterations_per_epoch")
    meta = {**state["meta"], "citation": state["meta"].get("citation") or spec.citation,
            "exported_from": str(checkpoint), "steps": int(state["step"])}
    if iterations:
        meta["epochs_done"] = int(state["step"]) // int(iterations)
    seconds = pretraining_seconds(history)
    if seconds is not None:
        meta["pretraining_seconds"] = seconds
    if history.get("train_loss"):
        meta["final_train_loss"] = history["train_loss"][-1]
        meta["final_val_loss"] = history["val_loss"][-1]
    if history.get("probe"):
        meta["probe"] = history["probe"][-1]
    if history.get("best"):
        meta["best"] = history["best"]
    return meta


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write ``out`` (+ its ``.json`` sidecar) from ``checkpoint``; returns the weights file."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".pth":
        raise HySparKError(f"{out}: the weights file name must end in .pth", f"e.g. {out.with_suffix('.pth')}")
    if out.exists() and not force:
        raise HySparKError(f"{out} already exists", "choose another name, or pass --force to overwrite it")
    state = read_checkpoint(checkpoint)
    spec = get_method(state["meta"].get("method", ""))
    build = _model_build(state, checkpoint, spec)
    options = ModelOptions(mask_ratio=float(build["mask_ratio"]), decoder_width=build.get("decoder_width"),
                           fuse_full_resolution=bool(build.get("fuse_full_resolution")), sparse_backend=None,
                           level_patch=tuple(build["level_patch"]) if build.get("level_patch") else None)
    model = spec.build_model(build["arch"], int(build["in_channels"]), options)
    try:
        model.load_state_dict(_strip_wrappers(state["model"]))
    except RuntimeError as e:
        raise HySparKError(f"{checkpoint}: the model does not fit the {spec.title} model rebuilt from its "
                           f"configuration ({str(e).splitlines()[0][:160]})",
                           "export from the output folder the checkpoint was written in") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    return spec.export(model, export_meta(state, checkpoint, spec), out)
