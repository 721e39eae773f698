"""The self-supervised methods: one package per method and this registry of their specs.

``hyspark_pretrain --method NAME``, ``hyspark_plan_and_preprocess --network NAME``, the converter,
the benchmark, the planners and the fine-tuning trainers read what a method is from
:data:`METHODS`. Adding a method = its package under ``nnunet_hyspark/methods/`` + one line here
+ a planner + a trainer (``docs/architecture.md``).
"""
from __future__ import annotations

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.hiend_mae import SPEC as _HIEND_MAE
from nnunet_hyspark.methods.hyspark import SPEC as _HYSPARK
from nnunet_hyspark.methods.mim import SPEC as _MIM
from nnunet_hyspark.methods.spec import FinetuneNetwork, MethodSpec, ModelOptions

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (_HYSPARK, _MIM, _HIEND_MAE)}


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; a one-line HySparKError listing the methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise HySparKError(f"unknown method {name!r}", f"choose one of {', '.join(METHODS)}") from None


def method_for_network(class_name: str) -> MethodSpec | None:
    """The method whose fine-tuning network ``class_name`` (a dotted path, current or legacy) names; None if
    it is none of ours (e.g. nnU-Net's PlainConvUNet)."""
    for spec in METHODS.values():
        if class_name in spec.network.class_names:
            return spec
    return None


def method_for_trainer(trainer: str) -> MethodSpec | None:
    """The method whose fine-tuning trainer ``trainer`` is (or is a variant of: same prefix, e.g. ``..._test``);
    None for every other trainer (scratch training, nnU-Net's own)."""
    for spec in METHODS.values():
        if trainer.startswith(spec.finetune_trainer):
            return spec
    return None


def method_for_published(state_dict) -> MethodSpec | None:
    """The method whose published checkpoint layout ``state_dict`` has (keys and shapes); None if none does."""
    for spec in METHODS.values():
        if spec.recognise_published is not None and spec.recognise_published(state_dict):
            return spec
    return None


__all__ = ["METHODS", "FinetuneNetwork", "MethodSpec", "ModelOptions", "get_method", "method_for_network",
           "method_for_published", "method_for_trainer"]
