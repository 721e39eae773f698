"""Tables, paired statistics and a plot from nnU-Net's per-fold validation summaries.

Only nnU-Net's own ``fold_X/validation/summary.json`` files are read, so the numbers in
the benchmark tables are exactly the numbers nnU-Net reports. Folds that are missing or
unfinished are listed as such and left out of every aggregate explicitly: a mean over
fewer folds than asked for must never look like a complete result.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

FINISHED, UNFINISHED, MISSING = "finished", "unfinished", "missing"
FOREGROUND_MEAN = "foreground_mean"
#: Confusion-matrix counts: exported to CSV but not worth a mean +- std table.
COUNT_METRICS = frozenset({"TP", "FP", "FN", "TN", "n_pred", "n_ref"})
#: Metrics compared between arms and plotted, when present.
KEY_METRICS = ("Dice", "IoU")
#: Below this many paired folds a two-sided Wilcoxon signed-rank test cannot reach p < 0.05.
MIN_FOLDS_WILCOXON = 6
SUMMARY_FILES = ("summary.md", "summary.csv", "summary_aggregate.csv", "summary_comparison.csv", "summary.png")


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
    path: Path
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


def fold_status(fold_dir: Path) -> str:
    """finished: validation summary written; unfinished: fold folder exists; missing: nothing there."""
    if (fold_dir / "validation" / "summary.json").is_file():
        return FINISHED
    return UNFINISHED if fold_dir.is_dir() else MISSING


def collect_results(results_root: str | os.PathLike, dataset: str, configuration: str, plans: str,
                    arms: Sequence[ArmLike], folds: Sequence[int], dataset_json: dict | None) -> BenchmarkResults:
    """Read every requested arm x fold; absent or unfinished folds are recorded, not skipped."""
    names = label_names(dataset_json)
    fold_results: dict[str, dict[int, FoldResult]] = {}
    for arm in arms:
        base = trainer_output_dir(results_root, dataset, arm.trainer, plans, configuration)
        fold_results[arm.label] = {}
        for f in folds:
            fdir = base / f"fold_{f}"
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
    return BenchmarkResults(dataset, configuration, plans, [(a.label, a.trainer) for a in arms], list(folds),
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


# --------------------------------------------------------------------------- rendering

def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.4g}"


def _fold_status_line(results: BenchmarkResults, arm: str) -> str:
    done = results.finished_folds(arm)
    parts = [f"{len(done)}/{len(results.folds)} folds ({', '.join(map(str, done)) or 'none'})"]
    parts += [f"fold {f}: {r.status}" for f, r in results.fold_results[arm].items() if r.status != FINISHED]
    return "; ".join(parts)


def render_markdown(results: BenchmarkResults, comps: list[Comparison], baseline: str | None,
                    other: str | None) -> str:
    """The human-readable report: fold accounting first, then aggregates, per-fold values, differences."""
    table_metrics = [m for m in results.metrics if m not in COUNT_METRICS]
    out = [f"# HySparK benchmark: {results.dataset} / {results.configuration} / {results.plans}", ""]
    out.append("Folds contributed per arm (missing or unfinished folds are excluded from every number below):")
    out.append("")
    for label, trainer in results.arms:
        out.append(f"- **{label}** (`{trainer}`): {_fold_status_line(results, label)}")
    out += ["", "Aggregates are mean ± sample standard deviation (ddof=1) over the contributing folds; "
                "`(n=k)` marks a cell based on fewer folds than the arm contributed.", ""]
    for metric in table_metrics:
        out += [f"## {metric}: mean ± std over folds", ""]
        header = ["class"] + [f"{lab} ({len(results.finished_folds(lab))} folds)" for lab, _ in results.arms]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for cls in results.classes:
            cells = [cls]
            for lab, _ in results.arms:
                agg = aggregate(results, lab, cls, metric)
                cell = "n/a" if not agg.n else f"{_fmt(agg.mean)} ± {_fmt(agg.std)}"
                if agg.n and agg.n < len(results.finished_folds(lab)):
                    cell += f" (n={agg.n})"
                cells.append(cell)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    for metric in table_metrics:
        out += [f"## Per-fold {metric}", ""]
        header = ["arm", "fold", "status"] + results.classes
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for lab, _ in results.arms:
            for f, r in results.fold_results[lab].items():
                vals = [_fmt(r.values.get(c, {}).get(metric)) if r.status == FINISHED else "—"
                        for c in results.classes]
                out.append("| " + " | ".join([lab, str(f), r.status] + vals) + " |")
        out.append("")
    if baseline and other:
        out += [f"## Difference {other} − {baseline} (paired over folds finished in both)", ""]
        out += ["| class | metric | paired folds | mean diff | std diff | Wilcoxon p | paired t-test p | note |",
                "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            out.append(f"| {c.cls} | {c.metric} | {len(c.folds)} ({', '.join(map(str, c.folds)) or '-'}) | "
                       f"{_fmt(c.mean_diff)} | {_fmt(c.std_diff)} | {_fmt_p(c.p_wilcoxon)} | "
                       f"{_fmt_p(c.p_ttest)} | {c.note} |")
        out += ["", f"Two-sided tests across folds. With fewer than {MIN_FOLDS_WILCOXON} paired folds the "
                    "Wilcoxon signed-rank test cannot reach p < 0.05; the paired t-test assumes normally "
                    "distributed differences.", ""]
    elif len(results.arms) < 2:
        out += ["(Only one arm: no difference table.)", ""]
    return "\n".join(out)


def long_csv(results: BenchmarkResults) -> str:
    """Every value of every finished fold: arm, fold, class, metric, value."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "fold", "class", "metric", "value"])
    for lab, _ in results.arms:
        for f, r in results.fold_results[lab].items():
            for cls in results.classes:
                for metric in results.metrics:
                    v = r.values.get(cls, {}).get(metric)
                    if v is not None:
                        w.writerow([lab, f, cls, metric, repr(v)])
    return buf.getvalue()


def aggregate_csv(results: BenchmarkResults) -> str:
    """Per-arm aggregates with the folds used and the folds excluded (and why)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "trainer", "class", "metric", "n_folds", "mean", "std", "folds_used", "folds_excluded"])
    for lab, trainer in results.arms:
        for cls in results.classes:
            for metric in results.metrics:
                a = aggregate(results, lab, cls, metric)
                w.writerow([lab, trainer, cls, metric, a.n, "" if a.mean is None else repr(a.mean),
                            "" if a.std is None else repr(a.std), " ".join(map(str, a.folds)),
                            " ".join(f"{f}:{why}" for f, why in a.excluded.items())])
    return buf.getvalue()


def comparison_csv(comps: list[Comparison]) -> str:
    """The paired differences and p-values, machine-readable."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["baseline", "other", "class", "metric", "n_pairs", "folds", "mean_diff", "std_diff",
                "p_wilcoxon", "p_ttest", "note"])
    for c in comps:
        w.writerow([c.baseline, c.other, c.cls, c.metric, len(c.folds), " ".join(map(str, c.folds)),
                    "" if c.mean_diff is None else repr(c.mean_diff),
                    "" if c.std_diff is None else repr(c.std_diff),
                    "" if c.p_wilcoxon is None else repr(c.p_wilcoxon),
                    "" if c.p_ttest is None else repr(c.p_ttest), c.note])
    return buf.getvalue()


def plot(results: BenchmarkResults, path: str | os.PathLike) -> Path | None:
    """Grouped bars per class and arm (mean, std error bars) with each fold as a dot.

    Uses the object-oriented Agg canvas rather than pyplot, so no global backend or figure
    state is touched (safe on headless machines and inside other programs).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in results.metrics if m in KEY_METRICS]
    if not metrics or not results.classes:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(results.classes) * max(1, len(results.arms)) + 2), 4 * len(metrics)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    n_arms = len(results.arms)
    width = 0.8 / n_arms
    for ax, metric in zip(axes, metrics):
        for i, (lab, _) in enumerate(results.arms):
            xs, means, stds = [], [], []
            for j, cls in enumerate(results.classes):
                agg = aggregate(results, lab, cls, metric)
                x = j - 0.4 + width * (i + 0.5)
                xs.append(x)
                means.append(agg.mean if agg.mean is not None else 0.0)
                stds.append(agg.std or 0.0)
                if agg.n:
                    offsets = [width * 0.5 * (k / max(1, agg.n - 1) - 0.5) for k in range(agg.n)]
                    ax.scatter([x + o for o in offsets], agg.values, color="black", s=12, zorder=3)
            ax.bar(xs, means, width=width, yerr=stds, capsize=3, alpha=0.75,
                   label=f"{lab} ({len(results.finished_folds(lab))} folds)")
        ax.set_xticks(range(len(results.classes)))
        ax.set_xticklabels(results.classes, rotation=20, ha="right")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        ax.set_title(f"{metric} per class (bars: mean ± std over folds, dots: folds)")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.png")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(results: BenchmarkResults, output_dir: str | os.PathLike,
                  compare_arms: tuple[str, str] | None = None) -> list[Path]:
    """Write summary.md, the CSVs and summary.png into output_dir; return the paths written.

    ``compare_arms`` is (baseline, other); by default the second arm minus the first.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [lab for lab, _ in results.arms]
    if compare_arms is None and len(labels) >= 2:
        compare_arms = (labels[0], labels[1])
    baseline, other = compare_arms if compare_arms else (None, None)
    comps = comparisons(results, baseline, other) if compare_arms else []
    written = []
    for name, text in (("summary.md", render_markdown(results, comps, baseline, other)),
                       ("summary.csv", long_csv(results)),
                       ("summary_aggregate.csv", aggregate_csv(results)),
                       ("summary_comparison.csv", comparison_csv(comps))):
        _write_text_atomic(out / name, text)
        written.append(out / name)
    png = plot(results, out / "summary.png")
    if png is not None:
        written.append(png)
    return written


def existing_outputs(output_dir: str | os.PathLike, names: Iterable[str] = SUMMARY_FILES) -> list[Path]:
    """The summary files already present, which a different configuration must not overwrite."""
    return [Path(output_dir) / n for n in names if (Path(output_dir) / n).exists()]
