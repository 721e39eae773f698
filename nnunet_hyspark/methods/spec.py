"""What a self-supervised method is, as every consumer sees it: one :class:`MethodSpec` per method.

The pre-training command, the planners, the converter, the benchmark and the fine-tuning
trainers read a method's properties from its spec (``nnunet_hyspark.methods.METHODS``) instead
of keeping their own tables. Adding a method is described in ``docs/architecture.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from nnunet_hyspark.memory import MemoryEstimate
from nnunet_hyspark.methods.data_recipe import DataRecipe

if TYPE_CHECKING:  # typing only: the sparse package is not needed to describe a method
    from nnunet_hyspark.sparse import SparseBackend

#: the optimisation options a recipe may set (hyspark_pretrain's option names; weight decay and betas are pairs)
RECIPE_KEYS = ("lr", "betas", "weight_decay", "warmup_fraction", "clip_grad", "mask_ratio")


@dataclass(frozen=True)
class ModelOptions:
    """What a pre-training model builder needs besides the plan's ``arch_kwargs`` and the channel count."""

    mask_ratio: float
    decoder_width: int | None = None
    fuse_full_resolution: bool = False
    #: a resolved backend object (``nnunet_hyspark.sparse.resolve_backend``); None = the dense reference
    sparse_backend: "SparseBackend | None" = None
    #: the ``--patch-size`` override, None = the plan's patch (MiM: the level patch; crops are twice that)
    level_patch: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class FinetuneNetwork:
    """The fine-tuning network of a method and its weights protocol (file format: :mod:`nnunet_hyspark.weights`)."""

    class_name: str  # dotted path written into new plans and weights metadata
    legacy_class_names: tuple[str, ...]  # dotted paths that plans and weights of earlier versions name
    stem_key: str  # state-dict key whose dim 1 is the number of input channels
    stem_name: str  # what that tensor is called in messages ("stem", "first conv", "patch embedding")
    build: Callable[[Mapping[str, Any], int, int], nn.Module]  # (architecture, in_channels, num_classes)
    #: (network_weights, meta, in_channels) -> (weights, meta) for another number of input channels
    adapt_channels: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], int], tuple[dict, dict]]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every dotted path that names this network (current first)."""
        return (self.class_name, *self.legacy_class_names)


@dataclass(frozen=True)
class MethodSpec:
    """One self-supervised method: its models, weights protocol, plans, trainer and recipe."""

    name: str  # "hyspark" | "mim" | "hiend_mae": the --method / --network value
    title: str  # "HySparK"
    citation: str  # authors, title, venue, year
    #: (plan arch_kwargs, in_channels, options) -> the pre-training model (with ``.encoder``)
    build_model: Callable[[Mapping[str, Any], int, ModelOptions], nn.Module]
    validation_loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
    preview: Callable[[nn.Module, torch.Tensor, torch.Generator], dict]
    export: Callable[[nn.Module, dict, Path], Path]  # (model, meta, path) -> weights file
    network: FinetuneNetwork
    #: (patch_size, batch_size, input_channels, num_classes, **plan arch_kwargs) -> training memory of the network
    estimate_memory: Callable[..., MemoryEstimate]
    planner: str  # dotted path of the planner class
    plans_name: str  # default plans identifier
    finetune_trainer: str  # trainer class (its variants share the prefix, e.g. ..._test)
    patch_multiple: int  # what every axis of the loader's patch must be a multiple of (1: the builder checks)
    crop_scale: int = 1  # loader crops are crop_scale x the network patch per axis (MiM: 2)
    #: optimisation values that differ from the pre-training loop's defaults (keys: RECIPE_KEYS)
    recipe: Mapping[str, Any] = field(default_factory=dict)
    #: the data / masking part of the recipe for --help, when the single mask ratio does not describe it
    recipe_note: str = ""
    #: how pre-training crops are sampled and augmented (the defaults are HySparK's; flags override fields)
    data_recipe: DataRecipe = field(default_factory=DataRecipe)
    #: published checkpoint (a loaded object) -> (network_weights, meta, report); None: nothing published
    convert_published: Callable[..., tuple[dict, dict, dict]] | None = None
    #: does a (unwrapped) state dict have this method's published key layout? (the converter asks each method)
    recognise_published: Callable[[Mapping[str, torch.Tensor]], bool] | None = None
    #: (pre-training model, loaded published checkpoint) -> key report: the whole published pre-training model
    #: (encoder, decoder, tokens) into ours, for ``hyspark_pretrain --init-from``; None: not supported
    load_published_pretraining: Callable[[nn.Module, Any], dict] | None = None
    #: (pre-training model, unmasked batch) -> the encoder's feature maps (B, C_i, d_i, h_i, w_i), for the probe
    encoder_features: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]] | None = None

    def resolved_recipe(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe with every key of ``defaults`` (the loop's defaults, keyed like RECIPE_KEYS) filled in."""
        return {**dict(defaults), **dict(self.recipe)}

    def recipe_summary(self, defaults: Mapping[str, Any] | None = None) -> str:
        """One line for ``--help``: the method's optimisation recipe over the loop's ``defaults``.

        ``defaults`` holds the values a recipe does not set (keys as :data:`RECIPE_KEYS`); the
        pre-training loop's configuration owns them, so the caller passes them in.
        """
        r = self.resolved_recipe(defaults or {})
        parts = []
        if "lr" in r:
            parts.append(f"AdamW lr {r['lr']:g}" + (f" betas {r['betas'][0]:g} {r['betas'][1]:g}"
                                                    if "betas" in r else ""))
        if "warmup_fraction" in r:
            parts.append(f"warm-up over {100 * r['warmup_fraction']:g}% of the run then cosine")
        if "weight_decay" in r:
            start, end = r["weight_decay"]
            parts.append(f"weight decay {start:g} constant" if start == end else f"weight decay {start:g} -> {end:g}")
        if "clip_grad" in r:
            parts.append(f"gradient clipping {r['clip_grad']:g}" if r["clip_grad"] else "no clipping")
        if self.recipe_note:
            parts.append(self.recipe_note)
        elif "mask_ratio" in r:
            parts.append(f"mask ratio {r['mask_ratio']:g}")
        return f"{self.title}: " + ", ".join(parts)
