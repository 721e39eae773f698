"""Tables, paired statistics and a plot from nnU-Net's per-fold validation summaries.

Only nnU-Net's own ``fold_X/validation/summary.json`` files are read, so the numbers in
the benchmark tables are exactly the numbers nnU-Net reports. Folds that are missing or
unfinished are listed as such and left out of every aggregate explicitly: a mean over
fewer folds than asked for must never look like a complete result.

This module reads the results and computes the statistics; :mod:`.summary_tables` writes them
(markdown, CSV, plot).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

FINISHED, UNFINISHED, MISSING = "finished", "unfinished", "missing"
FOREGROUND_MEAN = "foreground_mean"
#: Confusion-matrix counts: exported to CSV but not worth a mean +- std table.
COUNT_METRICS = frozenset({"TP", "FP", "FN", "TN", "n_pred", "n_ref"})
#: Metrics compared between arms and plotted, when present.
KEY_METRICS = ("Dice", "IoU")
#: Below this many paired folds a two-sided Wilcoxon signed-rank test cannot reach p < 0.05.
MIN_FOLDS_WILCOXON = 6
SUMMARY_FILES = ("summary.md", "summary.csv", "summary_aggregate.csv", "summary_comparison.csv", "summary.png",
                 "summary_fractions.png", "summary_test_set.csv", "summary_cost.csv")


def sample_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1): folds are a sample of possible splits; None below 2 values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


class ArmLike(Protocol):
    """What the summary needs to know about an arm (``folds.Arm`` satisfies it)."""

    label: str
    trainer: str


@dataclass
class FoldResult:
    """One arm's outcome on one fold: its status and, if finished, class -> metric -> value."""

    arm: str
    fold: int
    status: str
    path: Path | None  # None: no nnU-Net fold holds this fold (e.g. a training subset never installed)
    values: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Aggregate:
    """Mean and sample std (ddof=1) of one arm/class/metric over the folds that have a value."""

    arm: str
    cls: str
    metric: str
    folds: list[int]
    values: list[float]
    excluded: dict[int, str]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.n else None

    @property
    def std(self) -> float | None:
        return sample_std(self.values)


@dataclass
class Comparison:
    """Paired difference (other minus baseline) over folds finished in both arms."""

    baseline: str
    other: str
    cls: str
    metric: str
    folds: list[int]
    diffs: list[float]
    p_wilcoxon: float | None
    p_ttest: float | None
    note: str

    @property
    def mean_diff(self) -> float | None:
        return sum(self.diffs) / len(self.diffs) if self.diffs else None

    @property
    def std_diff(self) -> float | None:
        return sample_std(self.diffs)


@dataclass
class BenchmarkResults:
    """Everything read from disk for one benchmark, in arm and fold order."""

    dataset: str
    configuration: str
    plans: str
    arms: list[tuple[str, str]]  # (label, trainer)
    folds: list[int]
    classes: list[str]
    metrics: list[str]
    fold_results: dict[str, dict[int, FoldResult]]

    def finished_folds(self, arm: str) -> list[int]:
        return [f for f in self.folds if self.fold_results[arm][f].status == FINISHED]


# --------------------------------------------------------------------------- reading

def trainer_output_dir(results_root: str | os.PathLike, dataset: str, trainer: str, plans: str,
                       configuration: str) -> Path:
    """nnU-Net's output folder for one trainer: ``DatasetXXX/TRAINER__PLANS__CONFIG``."""
    return Path(results_root) / dataset / f"{trainer}__{plans}__{configuration}"


def arm_title(arm: ArmLike) -> str:
    """The trainer, with ``@PLANS`` for an arm with its own plans (as the arm was given)."""
    plans = getattr(arm, "plans", None)
    return f"{arm.trainer}@{plans}" if plans else arm.trainer


def label_names(dataset_json: dict | None) -> dict[str, str]:
    """Map the class keys of summary.json (label values as strings) to dataset.json label names.

    Region-based labels (a list of values) appear in summary.json as the str() of a tuple.
    """
    names: dict[str, str] = {}
    for name, value in (dataset_json or {}).get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            key = str(tuple(int(v) for v in value)) if len(value) > 1 else str(int(value[0]))
        else:
            key = str(int(value))
        if key != "0":
            names[key] = name
    return names


def read_summary_json(path: str | os.PathLike, names: dict[str, str]) -> dict[str, dict[str, float]]:
    """Read one nnU-Net validation summary as {class name: {metric: value}} incl. foreground mean."""
    data = json.loads(Path(path).read_text())
    out: dict[str, dict[str, float]] = {}
    for key, metrics in data.get("mean", {}).items():
        out[names.get(key, key)] = {m: float(v) for m, v in metrics.items() if isinstance(v, (int, float))}
    if isinstance(data.get(FOREGROUND_MEAN), dict):
        out[FOREGROUND_MEAN] = {m: float(v) for m, v in data[FOREGROUND_MEAN].items()
                                if isinstance(v, (int, float))}
    return out


def fold_status(fold_dir: Path | None) -> str:
    """finished: validation summary written; unfinished: fold folder exists; missing: nothing there."""
    if fold_dir is None:
        return MISSING
    if (fold_dir / "validation" / "summary.json").is_file():
        return FINISHED
    return UNFINISHED if fold_dir.is_dir() else MISSING


def collect_results(results_root: str | os.PathLike, dataset: str, configuration: str, plans: str,
                    arms: Sequence[ArmLike], folds: Sequence[int], dataset_json: dict | None,
                    locate: Callable[[ArmLike, int], Path | None] | None = None) -> BenchmarkResults:
    """Read every requested arm x fold; absent or unfinished folds are recorded, not skipped.

    ``locate(arm, fold)`` is the fold's nnU-Net output folder (an arm's own plans, a training
    subset's entry); default ``TRAINER__PLANS__CONFIG/fold_F`` with ``plans``.
    """
    names = label_names(dataset_json)
    fold_results: dict[str, dict[int, FoldResult]] = {}
    for arm in arms:
        base = trainer_output_dir(results_root, dataset, arm.trainer, plans, configuration)
        fold_results[arm.label] = {}
        for f in folds:
            fdir = locate(arm, f) if locate is not None else base / f"fold_{f}"
            status = fold_status(fdir)
            values = read_summary_json(fdir / "validation" / "summary.json", names) if status == FINISHED else {}
            fold_results[arm.label][f] = FoldResult(arm.label, f, status, fdir, values)
    found = {c for per_arm in fold_results.values() for r in per_arm.values() for c in r.values}
    ordered = [n for n in names.values() if n in found]
    classes = ordered + sorted(found - set(ordered) - {FOREGROUND_MEAN}) + (
        [FOREGROUND_MEAN] if FOREGROUND_MEAN in found else [])
    metrics_found = {m for per_arm in fold_results.values() for r in per_arm.values()
                     for ms in r.values.values() for m in ms}
    metrics = [m for m in KEY_METRICS if m in metrics_found] + sorted(metrics_found - set(KEY_METRICS))
    return BenchmarkResults(dataset, configuration, plans, [(a.label, arm_title(a)) for a in arms], list(folds),
                            classes, metrics, fold_results)


# --------------------------------------------------------------------------- statistics

def aggregate(results: BenchmarkResults, arm: str, cls: str, metric: str) -> Aggregate:
    """Mean/std over finished folds with a finite value; every other fold is listed with its reason."""
    folds, values, excluded = [], [], {}
    for f in results.folds:
        r = results.fold_results[arm][f]
        if r.status != FINISHED:
            excluded[f] = r.status
            continue
        v = r.values.get(cls, {}).get(metric)
        if v is None or not math.isfinite(v):
            excluded[f] = "no value" if v is None else "nan"
            continue
        folds.append(f)
        values.append(v)
    return Aggregate(arm, cls, metric, folds, values, excluded)


def paired_tests(diffs: Sequence[float]) -> tuple[float | None, float | None, str]:
    """Wilcoxon signed-rank and paired t-test p-values for paired differences.

    Degenerate inputs get an explanation instead of an exception: fewer than two pairs,
    all differences zero (no test defined), or constant differences (t undefined).
    """
    n = len(diffs)
    if n < 2:
        return None, None, "n/a: fewer than 2 paired folds"
    if all(d == 0 for d in diffs):
        return None, None, "all paired differences are 0"
    from scipy import stats

    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p_w = float(stats.wilcoxon(diffs).pvalue)
        except ValueError:
            p_w = None
        if max(diffs) - min(diffs) <= 1e-12:
            p_t = None
            notes.append("t-test undefined: identical differences in every fold")
        else:
            p_t = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    p_w = p_w if p_w is not None and math.isfinite(p_w) else None
    p_t = p_t if p_t is not None and math.isfinite(p_t) else None
    if n < MIN_FOLDS_WILCOXON:
        notes.append(f"Wilcoxon cannot reach p<0.05 with {n} folds")
    return p_w, p_t, "; ".join(notes)


def compare(results: BenchmarkResults, baseline: str, other: str, cls: str, metric: str) -> Comparison:
    """Paired other-minus-baseline difference over folds where both arms have a finite value."""
    a = aggregate(results, baseline, cls, metric)
    b = aggregate(results, other, cls, metric)
    va, vb = dict(zip(a.folds, a.values)), dict(zip(b.folds, b.values))
    folds = [f for f in results.folds if f in va and f in vb]
    diffs = [vb[f] - va[f] for f in folds]
    p_w, p_t, note = paired_tests(diffs)
    return Comparison(baseline, other, cls, metric, folds, diffs, p_w, p_t, note)


def comparisons(results: BenchmarkResults, baseline: str, other: str) -> list[Comparison]:
    """All key-metric comparisons, class by class."""
    metrics = [m for m in results.metrics if m in KEY_METRICS] or \
        [m for m in results.metrics if m not in COUNT_METRICS]
    return [compare(results, baseline, other, c, m) for m in metrics for c in results.classes]


def existing_outputs(output_dir: str | os.PathLike, names: Iterable[str] = SUMMARY_FILES) -> list[Path]:
    """The summary files already present, which a different configuration must not overwrite."""
    return [Path(output_dir) / n for n in names if (Path(output_dir) / n).exists()]
