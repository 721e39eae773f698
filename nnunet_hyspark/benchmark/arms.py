"""Benchmark arms: ``LABEL=TRAINER[@PLANS][:WEIGHTS]`` specs, parsed and checked before anything runs.

An arm without ``@PLANS`` uses the benchmark's ``-p``; with it, nnU-Net's own baselines
(``nnUNetTrainer@nnUNetPlans``, ``nnUNetTrainer@nnUNetResEncUNetMPlans``) sit in the same table.

Which trainers fine-tune from ``-pretrained_weights`` (and so need weights) comes from the method
registry (:func:`nnunet_hyspark.methods.method_for_trainer`), never from a list kept here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import METHODS, get_method, method_for_trainer

DEFAULT_SCRATCH_TRAINER = "nnUNetTrainerHySparK"
DEFAULT_FINETUNE_TRAINER = get_method("hyspark").finetune_trainer
DEFAULT_ARM_SPECS = (f"scratch={DEFAULT_SCRATCH_TRAINER}", f"pretrained={DEFAULT_FINETUNE_TRAINER}")
#: the fine-tuning trainers of the registered methods (their variants, e.g. ..._test, share the prefix)
_FINETUNE_TRAINERS = tuple(spec.finetune_trainer for spec in METHODS.values())

ARM_SPEC_HELP = (
    "Each arm is LABEL=TRAINER[@PLANS][:WEIGHTS] (or just TRAINER[@PLANS][:WEIGHTS], then LABEL=TRAINER). "
    "LABEL names the arm in tables and log files; TRAINER is any nnU-Net trainer class "
    "(nnUNetTrainer, nnUNetTrainer_5epochs, nnUNetTrainerHySparK, ...); PLANS is the arm's plans identifier "
    "(default: -p), e.g. nnunet=nnUNetTrainer@nnUNetPlans or resenc=nnUNetTrainer@nnUNetResEncUNetMPlans; "
    "WEIGHTS is a checkpoint passed as -pretrained_weights. Arms whose trainer starts with "
    f"{' or '.join(_FINETUNE_TRAINERS)} need weights: given in the spec or via --pretrained_weights. "
    f"Default: {' '.join(DEFAULT_ARM_SPECS)}. Example: "
    f"--arms nnunet=nnUNetTrainer@nnUNetPlans scratch={DEFAULT_SCRATCH_TRAINER} "
    f"pretrained={DEFAULT_FINETUNE_TRAINER}:/path/weights.pth"
)

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRAINER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: nnU-Net plans identifiers are file names (PLANS.json) in the preprocessed dataset folder
_PLANS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- arms

@dataclass(frozen=True)
class Arm:
    """One benchmark arm: a label, the nnU-Net trainer class, optional pre-trained weights and plans.

    ``plans`` None means the benchmark's ``-p`` (see :meth:`BenchmarkSpec.arm_plans`).
    """

    label: str
    trainer: str
    weights: str | None = None
    plans: str | None = None

    def as_dict(self) -> dict:
        return {"label": self.label, "trainer": self.trainer, "weights": self.weights, "plans": self.plans}

    @classmethod
    def from_dict(cls, d: dict) -> "Arm":
        """Inverse of as_dict; manifests of older versions have no 'plans' (= the benchmark's -p)."""
        return cls(d["label"], d["trainer"], d.get("weights"), d.get("plans"))


def parse_arm(spec: str) -> Arm:
    """Parse ``LABEL=TRAINER[@PLANS][:WEIGHTS]`` or ``TRAINER[@PLANS][:WEIGHTS]`` (see ARM_SPEC_HELP)."""
    eq, colon = spec.find("="), spec.find(":")
    labelled = eq != -1 and (colon == -1 or eq < colon)
    label, rest = (spec[:eq], spec[eq + 1:]) if labelled else (None, spec)
    head, sep, weights = rest.partition(":")  # the weights path may contain '@', so split it off first
    trainer, at, plans = head.partition("@")
    label = trainer if label is None else label
    if not _TRAINER_RE.match(trainer):
        raise HySparKError(f"invalid arm {spec!r}: {trainer!r} is not a trainer class name", ARM_SPEC_HELP)
    if at and not _PLANS_RE.match(plans):
        raise HySparKError(f"invalid arm {spec!r}: {plans!r} after '@' is not a plans identifier "
                           "(e.g. nnUNetPlans)", ARM_SPEC_HELP)
    if not _LABEL_RE.match(label):
        raise HySparKError(f"invalid arm {spec!r}: label {label!r} may only use letters, digits, '_', '.', '-'",
                           ARM_SPEC_HELP)
    if sep and not weights:
        raise HySparKError(f"invalid arm {spec!r}: empty weights path after ':'", ARM_SPEC_HELP)
    return Arm(label, trainer, weights or None, plans or None)


def needs_weights(trainer: str) -> bool:
    """Fine-tuning trainers (a method's, or a variant of it) without weights would silently train from scratch."""
    return method_for_trainer(trainer) is not None


def resolve_arms(specs: Sequence[str] | None, pretrained_weights: str | None,
                 require_weights: bool = True, default_plans: str | None = None) -> list[Arm]:
    """Parse the arms and attach/verify their weights.

    ``--pretrained_weights`` fills in every fine-tuning arm that has no weights of its own;
    it is an error if no arm uses it (a weights file that is silently ignored would make
    a 'pre-trained' result meaningless). ``default_plans`` (the benchmark's ``-p``) stands in for
    arms without ``@PLANS`` when telling whether two arms would share nnU-Net's output folder.
    """
    arms = [parse_arm(s) for s in (specs or DEFAULT_ARM_SPECS)]
    _check_unique(arms, default_plans)
    used_flag = False
    resolved = []
    for arm in arms:
        if arm.weights is None and pretrained_weights and needs_weights(arm.trainer):
            arm, used_flag = replace(arm, weights=pretrained_weights), True
        if require_weights and arm.weights is None and needs_weights(arm.trainer):
            others = " ".join(f"{a.label}={a.trainer}" for a in arms if a is not arm and a.label != arm.label)
            raise HySparKError(
                f"arm '{arm.label}' ({arm.trainer}) needs pre-trained weights",
                f"pass --pretrained_weights FILE, or --arms {arm.label}={arm.trainer}"
                f"{'@' + arm.plans if arm.plans else ''}:FILE ..., "
                f"or drop the arm (e.g. --arms {others or 'scratch=' + DEFAULT_SCRATCH_TRAINER})")
        if require_weights and arm.weights is not None:
            if not Path(arm.weights).is_file():
                raise HySparKError(f"weights file of arm '{arm.label}' not found: {arm.weights}",
                                   "check the path (pre-train with hyspark_pretrain, convert with "
                                   "hyspark_convert_checkpoint)")
            arm = replace(arm, weights=os.path.abspath(arm.weights))
        resolved.append(arm)
    if require_weights and pretrained_weights and not used_flag:
        raise HySparKError("--pretrained_weights is given but no arm uses it",
                           f"only arms with a {'* or '.join(_FINETUNE_TRAINERS)}* trainer and no weights of their own "
                           "take it; give weights per arm as LABEL=TRAINER[@PLANS]:WEIGHTS instead")
    return resolved


def _check_unique(arms: list[Arm], default_plans: str | None) -> None:
    """Labels name log files and table columns; trainer + plans name nnU-Net's output folder."""
    labels: set[str] = set()
    folders: dict[tuple[str, str | None], str] = {}
    for arm in arms:
        if arm.label in labels:
            raise HySparKError(f"two arms share the label {arm.label!r}",
                               "give every arm its own LABEL (LABEL=TRAINER[@PLANS][:WEIGHTS])")
        labels.add(arm.label)
        key = (arm.trainer, arm.plans or default_plans)
        if key in folders:
            plans = key[1] or "PLANS"
            raise HySparKError(
                f"arms '{folders[key]}' and '{arm.label}' both train {arm.trainer} with "
                f"{key[1] or 'the same plans'}: nnU-Net would write both into one results folder "
                f"{arm.trainer}__{plans}__CONFIG",
                "give one of them other plans (TRAINER@PLANS) or a differently named trainer subclass")
        folders[key] = arm.label
