"""What one benchmark is (:class:`BenchmarkSpec`), built from the command's inputs and checked before anything runs.

Every input is validated here (dataset, arms with their plans, trainers and weights (see
:mod:`.arm_checks`), folds, splits, ``--compare``), so mistakes cost seconds, not GPU-days.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.benchmark import arm_checks
from nnunet_hyspark.benchmark import fractions as fractions_mod
from nnunet_hyspark.benchmark import splits as splits_mod
from nnunet_hyspark.benchmark import summary as summary_mod
from nnunet_hyspark.benchmark.arms import Arm, resolve_arms
from nnunet_hyspark.benchmark.manifest import Manifest
from nnunet_hyspark.errors import HySparKError, require_nnunet_env

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
    fractions: tuple[float, ...] = fractions_mod.DEFAULT_FRACTIONS  # --train-fractions, ascending
    #: fold x fraction -> nnU-Net fold, once the training subsets are installed/read (None: the folds themselves)
    fold_entries: list[fractions_mod.FoldEntry] | None = None

    def identity(self) -> dict:
        """What must match for a re-run to resume rather than be a different benchmark."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "arms": [a.as_dict() for a in self.arms], "folds": list(self.folds),
                "splits": splits_mod.splits_digest(self.splits) if self.splits is not None else None,
                **self._fraction_identity()}

    def summary_identity(self) -> dict:
        """What the summary files describe (weights, splits and --compare do not change which results are read)."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "arms": [{"label": a.label, "trainer": a.trainer} for a in self.arms],
                "folds": list(self.folds), **self._fraction_identity()}

    def _fraction_identity(self) -> dict:
        """Absent for the default (all cases), so manifests written before --train-fractions still match."""
        if self.fractions == fractions_mod.DEFAULT_FRACTIONS:
            return {}
        return {"fractions": list(self.fractions), "subset_seed": fractions_mod.SUBSET_SEED}

    def arm_plans(self, arm: Arm) -> str:
        """The plans an arm trains with: its own ``@PLANS``, else the benchmark's ``-p``."""
        return arm.plans or self.plans

    def fold_dir(self, arm: Arm, fold: int) -> Path:
        """nnU-Net's output folder of one arm x fold (TRAINER__PLANS__CONFIG/fold_F, with the arm's plans)."""
        return summary_mod.trainer_output_dir(self.results_root, self.dataset, arm.trainer, self.arm_plans(arm),
                                              self.configuration) / f"fold_{fold}"


def resolve_dataset(dataset_arg: str) -> str:
    """DatasetXXX_Name from an id or name; a one-line user error if there is none (or several)."""
    return compat.dataset_name(dataset_arg, hint="check -d and that $nnUNet_raw / $nnUNet_preprocessed point to "
                                                 "your data")


def check_plans(dataset: str, plans: str, configuration: str) -> Path:
    """The plans file must exist, contain the configuration and be preprocessed, or every fold would fail."""
    return arm_checks.check_plans(dataset, plans, configuration)


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
               compare: Sequence[str] | None = None,
               train_fractions: Sequence[float] | None = None, case_id_pattern: str | None = None,
               allow_partial_splits: bool = False) -> BenchmarkSpec:
    """Validate every input of ``folds`` before anything runs, so mistakes cost seconds, not GPU-days.

    ``case_id_pattern`` / ``allow_partial_splits``: for a MONAI datalist given as ``splits_file``.
    """
    env = require_nnunet_env()
    fractions = fractions_mod.check_fractions(train_fractions)
    dataset = resolve_dataset(dataset_arg)
    arms = resolve_arms(arm_specs, pretrained_weights, require_weights=True, default_plans=plans)
    arm_checks.check_arms(dataset, configuration, arms, lambda arm: arm.plans or plans)
    custom = None
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset
    if not splits_file and (case_id_pattern or allow_partial_splits):
        raise HySparKError("--case-id-pattern / --allow-partial-splits need a datalist given to --splits",
                           "add --splits DATALIST.json, or drop them")
    if splits_file:
        known = splits_mod.dataset_case_ids(dataset)
        custom = splits_mod.load_splits_file(splits_file, known, case_id_pattern, allow_partial_splits)
        splits_mod.validate_splits(custom, known, source=str(splits_file))
        n_splits = len(custom)
    else:
        current = splits_mod.existing_splits(preprocessed)
        n_splits = fractions_mod.base_count(current) if current else None
    base = custom if custom is not None else current
    if base:  # else nnU-Net's default split (every fold has training cases) is written at the start
        fractions_mod.check_folds_trainable(base, resolve_folds(folds, n_splits), fractions)
    results_root = Path(env["nnUNet_results"])
    return BenchmarkSpec(
        dataset_arg=str(dataset_arg), dataset=dataset, configuration=configuration, plans=plans, arms=arms,
        folds=resolve_folds(folds, n_splits), results_root=results_root,
        output_dir=Path(output) if output else default_output_dir(results_root, dataset, plans, configuration),
        splits=custom, splits_source=os.path.abspath(splits_file) if splits_file else None,
        compare=check_compare(compare, arms), fractions=fractions)


def build_summary_spec(dataset_arg: str, configuration: str, plans: str, arm_specs: Sequence[str] | None,
                       folds: Sequence[int] | None = None, output: str | None = None,
                       compare: Sequence[str] | None = None,
                       train_fractions: Sequence[float] | None = None) -> BenchmarkSpec:
    """Like build_spec, but only results are needed; arms/folds/fractions default to the benchmark's manifest."""
    env = require_nnunet_env(["nnUNet_results"])
    dataset = resolve_dataset(dataset_arg)
    results_root = Path(env["nnUNet_results"])
    output_dir = Path(output) if output else default_output_dir(results_root, dataset, plans, configuration)
    recorded = Manifest.load(output_dir).data.get("config") or {}
    if arm_specs:
        arms = resolve_arms(arm_specs, None, require_weights=False, default_plans=plans)
    elif recorded.get("arms"):
        arms = [Arm.from_dict(a) for a in recorded["arms"]]
    else:
        arms = resolve_arms(None, None, require_weights=False, default_plans=plans)
    if folds:
        folds = resolve_folds(folds, max(folds) + 1)
    elif recorded.get("folds"):
        folds = list(recorded["folds"])
    else:
        pre = os.environ.get("nnUNet_preprocessed")
        current = splits_mod.existing_splits(Path(pre) / dataset) if pre else None
        folds = resolve_folds(None, fractions_mod.base_count(current) if current else None)
    fractions = fractions_mod.check_fractions(train_fractions or recorded.get("fractions"))
    return BenchmarkSpec(str(dataset_arg), dataset, configuration, plans, arms, list(folds), results_root,
                         output_dir, compare=check_compare(compare, arms), fractions=fractions)


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
