"""Each arm of a benchmark, checked before any fold trains: its plans, its trainer, its weights.

An arm trains ``nnUNetv2_train ... -tr TRAINER -p PLANS``. Whatever would make that fail in every
fold is found here, in seconds, as one line naming the fix: a plans file that does not exist (with
the exact command that writes it: nnU-Net's planner, a ResEnc preset, or ``hyspark_plan_and_preprocess``
for a method's plans), a configuration missing from it, a configuration folder that was never
(completely) preprocessed, a trainer that nnU-Net's own lookup does not find, and weights that were
pre-trained with other preprocessing than the arm's plans (the fine-tuning trainer's own rule,
:func:`nnunet_hyspark.nnunet_compat.check_weights_fit_plans`).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.benchmark.arms import Arm
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import METHODS, method_for_network, method_for_trainer
from nnunet_hyspark.weights import load_weights_file

#: nnU-Net's ResEnc presets: plans identifier -> the planner that writes it
_RESENC_PLANS = re.compile(r"^nnUNetResEncUNet(M|L|XL)Plans$")
#: configurations nnUNetv2_plan_and_preprocess writes without -c
_NNUNET_DEFAULT_CONFIGS = ("2d", "3d_fullres", "3d_lowres")

PlansOf = Callable[[Arm], str]


# --------------------------------------------------------------------------- plans

def plans_command(dataset: str, plans: str, configuration: str) -> str:
    """The exact command that writes ``plans`` (and its preprocessed data) for ``dataset``."""
    ident = compat.dataset_id(dataset)
    if plans == "nnUNetPlans" or _RESENC_PLANS.match(plans):
        m = _RESENC_PLANS.match(plans)
        pl = f" -pl nnUNetPlannerResEnc{m.group(1)}" if m else ""
        c = "" if configuration in _NNUNET_DEFAULT_CONFIGS else f" -c {configuration}"
        return f"nnUNetv2_plan_and_preprocess -d {ident}{pl}{c}"
    c = "" if configuration == "3d_fullres" else f" -c {configuration}"
    for name, method in METHODS.items():
        if method.plans_name == plans:
            network = "" if name == "hyspark" else f" --network {name}"
            return f"hyspark_plan_and_preprocess -d {ident}{network}{c}"
    return (f"hyspark_plan_and_preprocess -d {ident}{c} --plans-name {plans} (or nnU-Net's "
            f"nnUNetv2_plan_and_preprocess -d {ident} -overwrite_plans_name {plans})")


def _preprocess_command(dataset: str, plans: str, configuration: str) -> str:
    """The command that (re)writes one configuration folder of existing plans."""
    ident = compat.dataset_id(dataset)
    if plans == "nnUNetPlans" or _RESENC_PLANS.match(plans):
        return f"nnUNetv2_preprocess -d {ident} -plans_name {plans} -c {configuration}"
    from nnunet_hyspark.planning import completeness

    return completeness.repair_command(ident, plans, configuration)


def check_plans(dataset: str, plans: str, configuration: str, who: str = "") -> Path:
    """The plans file exists, holds the configuration, and its folder is completely preprocessed.

    ``who`` (e.g. "arm 'nnunet': ") prefixes the message so the user knows which arm is meant.
    """
    from nnunet_hyspark.planning import completeness

    run = f"run `{plans_command(dataset, plans, configuration)}` first"
    try:
        pm = compat.load_plans_manager(dataset, plans, hint=run)
        compat.check_configuration(pm, configuration, dataset, plans, hint=run)
    except HySparKError as e:
        raise HySparKError(who + e.args[0], e.hint) from None
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset / compat.data_identifier(dataset, plans, configuration)
    why = completeness.problem(folder)
    if why is not None:
        raise HySparKError(f"{who}preprocessed folder {folder} {why}",
                           f"(re)run: {_preprocess_command(dataset, plans, configuration)}")
    return compat.plans_file(dataset, plans)


def check_arm_plans(dataset: str, configuration: str, arms: Sequence[Arm], plans_of: PlansOf) -> None:
    """Every distinct plans of the arms, once (several arms usually share one)."""
    users: dict[str, list[str]] = {}
    for arm in arms:
        users.setdefault(plans_of(arm), []).append(arm.label)
    for plans, labels in users.items():
        who = f"arm{'s' if len(labels) > 1 else ''} {', '.join(repr(x) for x in labels)}: "
        check_plans(dataset, plans, configuration, who)


# --------------------------------------------------------------------------- trainers

def find_trainer_class(trainer: str, ext_trainer: str) -> type | None:
    """The class ``nnUNetv2_train -tr TRAINER`` would use: nnU-Net's own lookup, in nnU-Net's order.

    nnU-Net searches ``nnunetv2.training.nnUNetTrainer`` first, then each folder of
    ``nnUNet_extTrainer`` (``ext_trainer``, a path list). This imports trainer modules (seconds).
    """
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    root = nnunetv2.__path__[0]
    with warnings.catch_warnings():  # deprecation notes of modules the trainers import: noise before our answer
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        found = recursive_find_python_class(os.path.join(root, "training", "nnUNetTrainer"), trainer,
                                            "nnunetv2.training.nnUNetTrainer", root)
        for path in (p for p in ext_trainer.split(os.pathsep) if p.strip() and os.path.isdir(p)):
            if found is not None:
                break
            found = recursive_find_python_class(path, trainer, None, base_folder=path,
                                                cleanup_imports_from_base_folder=True)
    return found


def _known_trainer_names() -> list[str]:
    """Names of the trainer classes imported so far (after a failed lookup: all of nnU-Net's)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    names, todo = {nnUNetTrainer.__name__}, [nnUNetTrainer]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__name__ not in names:
                names.add(sub.__name__)
                todo.append(sub)
    return sorted(names)


def check_trainers(arms: Sequence[Arm], env: Mapping[str, str] | None = None) -> None:
    """Every distinct trainer of the arms is found by nnU-Net's lookup (once per trainer: it imports them)."""
    env = os.environ if env is None else env
    ext = compat.ext_trainer_value(env.get("nnUNet_extTrainer"))  # what the folds' environment will hold
    for trainer in dict.fromkeys(a.trainer for a in arms):
        try:
            found = find_trainer_class(trainer, ext)
        except Exception as e:  # a broken trainer module: nnUNetv2_train would crash on it the same way
            first = (str(e).splitlines() or [""])[0]
            raise HySparKError(f"nnU-Net's trainer lookup for {trainer} failed: {type(e).__name__}: {first}",
                               "fix or remove the failing module (in nnunetv2's trainers or nnUNet_extTrainer)"
                               ) from None
        if found is None:
            close = difflib.get_close_matches(trainer, _known_trainer_names(), n=3)
            labels = ", ".join(repr(a.label) for a in arms if a.trainer == trainer)
            raise HySparKError(
                f"trainer {trainer} not found by nnU-Net (arm {labels}; searched nnunetv2.training.nnUNetTrainer "
                f"and nnUNet_extTrainer={ext})",
                (f"did you mean {' or '.join(close)}? " if close else "check the spelling, ")
                + "or add the folder that defines it to nnUNet_extTrainer")


# --------------------------------------------------------------------------- networks and weights

def check_network_plans(dataset: str, configuration: str, arms: Sequence[Arm], plans_of: PlansOf) -> None:
    """A method's fine-tuning trainer needs plans that build that method's network: with nnU-Net's plans it
    would build nnU-Net's U-Net and every fold would fail to load the pre-trained encoder."""
    for arm in arms:
        method = method_for_trainer(arm.trainer)
        if method is None:
            continue
        plans = plans_of(arm)
        pm = compat.load_plans_manager(dataset, plans)
        arch = compat.configuration_dict(pm, configuration).get("architecture") or {}
        network = arch.get("network_class_name")
        if not network:
            continue  # plans of an older format name no network: the trainer decides
        found = method_for_network(str(network))
        if found is None or found.name != method.name:
            raise HySparKError(
                f"arm '{arm.label}': {plans} builds {str(network).rsplit('.', 1)[-1]}, but {arm.trainer} fine-tunes "
                f"{method.title}", f"use {arm.trainer}@{method.plans_name} (written by "
                f"`{plans_command(dataset, method.plans_name, configuration)}`), or a trainer for {plans}")



def check_weights_plans(dataset: str, configuration: str, arms: Sequence[Arm], plans_of: PlansOf) -> None:
    """Each arm's weights file, before any fold starts: it loads safely (``weights_only=True``), is of the
    arm's method, and fits the arm's plans (the trainer's rule). A bad file would otherwise fail inside every fold."""
    managers: dict[str, object] = {}
    checked: dict[str, dict] = {}
    for arm in arms:
        if not arm.weights or method_for_trainer(arm.trainer) is None:
            continue
        if arm.weights not in checked:
            try:
                checked[arm.weights] = _weights_meta(arm.weights)
            except HySparKError as e:
                raise HySparKError(f"arm '{arm.label}': {e.args[0]}", e.hint) from None
        meta = checked[arm.weights]
        _check_method(arm, meta)
        if not meta:
            continue
        plans = plans_of(arm)
        pm = managers.get(plans) or compat.load_plans_manager(dataset, plans)
        managers[plans] = pm
        plan = compat.Preprocessing.from_plans(pm.plans, compat.configuration_dict(pm, configuration))
        try:
            compat.check_weights_fit_plans(meta, plan, f"{plans} {configuration} of {dataset}",
                                           lambda m: print(f"warning: arm '{arm.label}': {m}", file=sys.stderr))
        except HySparKError as e:
            raise HySparKError(f"arm '{arm.label}' ({arm.weights}): {e.args[0]}", e.hint) from None


def _weights_meta(path: str) -> dict:
    """The metadata of a weights file read safely; its JSON sidecar for files whose own metadata is empty."""
    _, meta = load_weights_file(path)
    if meta:
        return meta
    sidecar = Path(path).with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    return meta if isinstance(meta, dict) else {}


def _check_method(arm: Arm, meta: dict) -> None:
    """A HySparK file given to the MiM trainer (say) would fail in every fold with a key mismatch."""
    wanted = method_for_trainer(arm.trainer)
    found = method_for_network(str(meta.get("network_class_name", ""))) if meta.get("network_class_name") else None
    if wanted is not None and found is not None and found.name != wanted.name:
        raise HySparKError(f"arm '{arm.label}': {arm.weights} holds {found.title} weights, but {arm.trainer} "
                           f"fine-tunes {wanted.title}", f"use {found.finetune_trainer} for these weights, or "
                           f"weights pre-trained with --method {wanted.name}")


# --------------------------------------------------------------------------- all of it

def check_arms(dataset: str, configuration: str, arms: Sequence[Arm], plans_of: PlansOf,
               env: Mapping[str, str] | None = None) -> None:
    """Plans (cheap) first, then trainers (imports them), then weights (loads them)."""
    check_arm_plans(dataset, configuration, arms, plans_of)
    check_network_plans(dataset, configuration, arms, plans_of)
    check_trainers(arms, env)
    check_weights_plans(dataset, configuration, arms, plans_of)
