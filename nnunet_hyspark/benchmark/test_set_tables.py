"""The held-out test-set table and CSV of the benchmark summary, from the ensembles' nnU-Net ``summary.json``.

:mod:`.test_set` predicts and scores; this module only reads what it wrote (``OUTPUT/test_set/<arm>/summary.json``),
so ``hyspark_benchmark summarize`` shows the table without the test folders being given again.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nnunet_hyspark.benchmark import summary as summary_mod
from nnunet_hyspark.benchmark.test_set import (SUMMARY, TEST_SET_DIR, EnsembleGroup, ensemble_groups, group_dir,
                                               missing_folds, not_ensembled)
from nnunet_hyspark.errors import HySparKError

if TYPE_CHECKING:
    from nnunet_hyspark.benchmark.spec import BenchmarkSpec


@dataclass
class TestResult:
    """One ensemble's scores on the test set ({class name: {metric: value}}), or why there are none."""

    __test__ = False

    group: EnsembleGroup
    values: dict[str, dict[str, float]]
    n_cases: int | None
    status: str  # "scored", "not ensembled: folds 1, 3 missing", "not predicted yet"


def collect_test_results(spec: "BenchmarkSpec", dataset_json: dict | None) -> list[TestResult]:
    """Every ensemble's summary.json from disk; empty when no test set was ever evaluated here."""
    if not (spec.output_dir / TEST_SET_DIR).is_dir():
        return []
    names = summary_mod.label_names(dataset_json)
    results = []
    for g in ensemble_groups(spec):
        path = group_dir(spec, g) / SUMMARY
        if path.is_file():
            n = len(json.loads(path.read_text()).get("metric_per_case", []))
            results.append(TestResult(g, summary_mod.read_summary_json(path, names), n, "scored"))
            continue
        missing = missing_folds(spec, g)
        results.append(TestResult(g, {}, None, not_ensembled(missing) if missing else "not predicted yet"))
    return results


def _classes(results: list[TestResult]) -> list[str]:
    found = []
    for r in results:
        for c in r.values:
            if c not in found and c != summary_mod.FOREGROUND_MEAN:
                found.append(c)
    return found + ([summary_mod.FOREGROUND_MEAN] if any(summary_mod.FOREGROUND_MEAN in r.values
                                                          for r in results) else [])


def render_test_set_markdown(results: list[TestResult], metric: str = "Dice") -> str:
    """The held-out test table: one row per ensemble, Dice per class and the foreground mean."""
    if not results:
        return ""
    classes = _classes(results)
    with_fraction = any(r.group.fraction is not None for r in results)
    header = ["arm"] + (["fraction"] if with_fraction else []) + ["folds", "cases"] + \
        [("mean" if c == summary_mod.FOREGROUND_MEAN else c) for c in classes]
    out = [f"## Held-out test set: {metric} of each arm's ensemble of its folds", "",
           "Each arm's folds predict the test images together (nnUNetv2_predict -f ...); scores are nnU-Net's "
           "own evaluation (mean over test cases). Arms with missing folds are not ensembled.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r.group.arm.label] + ([f"{r.group.fraction:g}" if r.group.fraction is not None else "-"]
                                    if with_fraction else [])
        row += [_listed(r.group.cv_folds), str(r.n_cases) if r.n_cases is not None else "-"]
        if r.status == "scored":
            row += [_fmt(r.values.get(c, {}).get(metric)) for c in classes]
        else:
            row += [r.status] + [""] * max(0, len(classes) - 1)
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out + [""])


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"


def render_test_set_csv(results: list[TestResult]) -> str:
    """arm, fraction, folds, n_cases, class, metric, value (scored ensembles only)."""
    if not results:
        return ""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "fraction", "folds", "n_cases", "class", "metric", "value"])
    for r in results:
        for cls, metrics in r.values.items():
            for metric, value in metrics.items():
                w.writerow([r.group.arm.label, "" if r.group.fraction is None else r.group.fraction,
                            " ".join(map(str, r.group.cv_folds)), r.n_cases, cls, metric, repr(value)])
    return buf.getvalue()


def _labels_json(spec: "BenchmarkSpec") -> dict | None:
    from nnunet_hyspark.benchmark.splits import load_dataset_json

    try:
        return load_dataset_json(spec.dataset)
    except HySparKError:
        return None  # class keys instead of names, as the cross-validation tables do


def test_set_markdown(spec: "BenchmarkSpec", dataset_json: dict | None = None) -> str:
    """Summary hook: the test-set table ("" when this benchmark never evaluated a test set)."""
    return render_test_set_markdown(collect_test_results(spec, dataset_json or _labels_json(spec)))


def test_set_csv(spec: "BenchmarkSpec", dataset_json: dict | None = None) -> str:
    """Summary hook: the test-set CSV ("" when this benchmark never evaluated a test set)."""
    return render_test_set_csv(collect_test_results(spec, dataset_json or _labels_json(spec)))


def _listed(values) -> str:
    return ", ".join(map(str, values))
