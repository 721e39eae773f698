"""What one benchmark is (:class:`BenchmarkSpec`), built from the command's inputs and checked before anything runs.

Every input is validated here (dataset, plans and configuration, arms and their weights, folds,
splits, ``--compare``), so mistakes cost seconds, not GPU-days. Weights whose metadata (the JSON
sidecar of our weights files) says they were pre-trained with other plans are refused by the same
rule the fine-tuning trainer applies (:func:`nnunet_hyspark.nnunet_compat.check_weights_fit_plans`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.benchmark import splits as splits_mod
from nnunet_hyspark.benchmark import summary as summary_mod
from nnunet_hyspark.benchmark.arms import Arm, resolve_arms
from nnunet_hyspark.benchmark.manifest import Manifest
from nnunet_hyspark.errors import HySparKError, require_nnunet_env
from nnunet_hyspark.methods import method_for_trainer
from nnunet_hyspark.weights import load_weights_file

DEFAULT_N_FOLDS = 5


@dataclass
class BenchmarkSpec:
    """Everything that defines one benchmark; two runs with equal identity() are the same benchmark."""

    dataset_arg: str
    dataset: str
    configuration: str
    plans: str
    arms: list[Arm]
    folds: list[int]
    results_root: Path
    output_dir: Path
    splits: splits_mod.Splits | None = None
    splits_source: str | None = None
    compare: tuple[str, str] | None = None
    device: str | None = None  # nnUNetv2_train -device; where it runs is not part of the identity

    def identity(self) -> dict:
        """What must match for a re-run to resume rather than be a different benchmark."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "arms": [a.as_dict() for a in self.arms], "folds": list(self.folds),
                "splits": splits_mod.splits_digest(self.splits) if self.splits is not None else None}

    def summary_identity(self) -> dict:
        """What the summary files describe (weights, splits and --compare do not change which results are read)."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "arms": [{"label": a.label, "trainer": a.trainer} for a in self.arms],
                "folds": list(self.folds)}

    def fold_dir(self, arm: Arm, fold: int) -> Path:
        return summary_mod.trainer_output_dir(self.results_root, self.dataset, arm.trainer, self.plans,
                                              self.configuration) / f"fold_{fold}"


def resolve_dataset(dataset_arg: str) -> str:
    """DatasetXXX_Name from an id or name; a one-line user error if there is none (or several)."""
    return compat.dataset_name(dataset_arg, hint="check -d and that $nnUNet_raw / $nnUNet_preprocessed point to "
                                                 "your data")


def check_plans(dataset: str, plans: str, configuration: str) -> Path:
    """The plans file must exist and contain the configuration, or every fold would fail the same way."""
    hint = "run hyspark_plan_and_preprocess (or nnUNetv2_plan_and_preprocess) with these plans, or fix -p"
    pm = compat.load_plans_manager(dataset, plans, hint=hint)
    compat.check_configuration(pm, configuration, dataset, plans, hint=None)
    return compat.plans_file(dataset, plans)


def check_weights_plans(dataset: str, plans: str, configuration: str, arms: Sequence[Arm]) -> None:
    """Each arm's weights file, before any fold starts: it loads safely (``weights_only=True``), is of the
    arm's method, and fits the plans (the trainer's rule). A bad file would otherwise fail inside every fold."""
    pm = None
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
        pm = pm or compat.load_plans_manager(dataset, plans)
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
    from nnunet_hyspark.methods import method_for_network

    wanted = method_for_trainer(arm.trainer)
    found = method_for_network(str(meta.get("network_class_name", ""))) if meta.get("network_class_name") else None
    if wanted is not None and found is not None and found.name != wanted.name:
        raise HySparKError(f"arm '{arm.label}': {arm.weights} holds {found.title} weights, but {arm.trainer} "
                           f"fine-tunes {wanted.title}", f"use {found.finetune_trainer} for these weights, or "
                           f"weights pre-trained with --method {wanted.name}")


def check_preprocessed(dataset: str, plans: str, configuration: str) -> None:
    """The configuration folder the folds read must be complete (marker of hyspark_plan_and_preprocess)."""
    from nnunet_hyspark.planning import completeness

    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset / compat.data_identifier(dataset, plans, configuration)
    completeness.check_complete(folder, completeness.repair_command(compat.dataset_id(dataset), plans,
                                                                    configuration))


def default_output_dir(results_root: str | os.PathLike, dataset: str, plans: str, configuration: str) -> Path:
    """Benchmark outputs live next to the trainers' results, one folder per plans/configuration."""
    return Path(results_root) / dataset / f"hyspark_benchmark__{plans}__{configuration}"


def resolve_folds(folds: Sequence[int] | None, n_splits: int | None) -> list[int]:
    """Requested folds, defaulting to all folds of the splits in effect (nnU-Net's default: 5)."""
    n = n_splits or DEFAULT_N_FOLDS
    if not folds:
        return list(range(n))
    bad = [f for f in folds if f < 0 or f >= n]
    if bad:
        raise HySparKError(f"fold(s) {bad} do not exist: the splits have {n} folds (0..{n - 1})",
                           "fix -f, or pass --splits with more folds")
    if len(set(folds)) != len(folds):
        raise HySparKError(f"fold(s) listed twice in -f {' '.join(map(str, folds))}", "list every fold once")
    return list(folds)


def build_spec(dataset_arg: str, configuration: str, plans: str, arm_specs: Sequence[str] | None,
               pretrained_weights: str | None = None, folds: Sequence[int] | None = None,
               splits_file: str | None = None, output: str | None = None,
               compare: Sequence[str] | None = None) -> BenchmarkSpec:
    """Validate every input of ``folds`` before anything runs, so mistakes cost seconds, not GPU-days."""
    env = require_nnunet_env()
    dataset = resolve_dataset(dataset_arg)
    check_plans(dataset, plans, configuration)
    check_preprocessed(dataset, plans, configuration)
    arms = resolve_arms(arm_specs, pretrained_weights, require_weights=True)
    check_weights_plans(dataset, plans, configuration, arms)
    custom = None
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset
    if splits_file:
        custom = splits_mod.load_splits_file(splits_file)
        splits_mod.validate_splits(custom, splits_mod.dataset_case_ids(dataset), source=str(splits_file))
        n_splits = len(custom)
    else:
        current = splits_mod.existing_splits(preprocessed)
        n_splits = len(current) if current else None
    results_root = Path(env["nnUNet_results"])
    return BenchmarkSpec(
        dataset_arg=str(dataset_arg), dataset=dataset, configuration=configuration, plans=plans, arms=arms,
        folds=resolve_folds(folds, n_splits), results_root=results_root,
        output_dir=Path(output) if output else default_output_dir(results_root, dataset, plans, configuration),
        splits=custom, splits_source=os.path.abspath(splits_file) if splits_file else None,
        compare=check_compare(compare, arms))


def build_summary_spec(dataset_arg: str, configuration: str, plans: str, arm_specs: Sequence[str] | None,
                       folds: Sequence[int] | None = None, output: str | None = None,
                       compare: Sequence[str] | None = None) -> BenchmarkSpec:
    """Like build_spec, but only results are needed; arms/folds default to the benchmark's manifest."""
    env = require_nnunet_env(["nnUNet_results"])
    dataset = resolve_dataset(dataset_arg)
    results_root = Path(env["nnUNet_results"])
    output_dir = Path(output) if output else default_output_dir(results_root, dataset, plans, configuration)
    recorded = Manifest.load(output_dir).data.get("config") or {}
    if arm_specs:
        arms = resolve_arms(arm_specs, None, require_weights=False)
    elif recorded.get("arms"):
        arms = [Arm(a["label"], a["trainer"], a.get("weights")) for a in recorded["arms"]]
    else:
        arms = resolve_arms(None, None, require_weights=False)
    if folds:
        folds = resolve_folds(folds, max(folds) + 1)
    elif recorded.get("folds"):
        folds = list(recorded["folds"])
    else:
        pre = os.environ.get("nnUNet_preprocessed")
        current = splits_mod.existing_splits(Path(pre) / dataset) if pre else None
        folds = resolve_folds(None, len(current) if current else None)
    return BenchmarkSpec(str(dataset_arg), dataset, configuration, plans, arms, list(folds), results_root,
                         output_dir, compare=check_compare(compare, arms))


def check_compare(compare: Sequence[str] | None, arms: list[Arm]) -> tuple[str, str] | None:
    """``--compare BASELINE OTHER`` must name two different arms."""
    if not compare:
        return None
    labels = [a.label for a in arms]
    unknown = [c for c in compare if c not in labels]
    if len(compare) != 2 or unknown or compare[0] == compare[1]:
        raise HySparKError(f"--compare needs two different arm labels, got {' '.join(compare)}",
                           f"arms are: {', '.join(labels)}")
    return compare[0], compare[1]
