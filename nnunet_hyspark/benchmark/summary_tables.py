"""The benchmark's summary files: markdown report, CSV tables and a plot, from :mod:`.summary`'s results.

Every number comes from :func:`nnunet_hyspark.benchmark.summary.aggregate` / ``compare``; folds
left out of an aggregate are named next to it.
"""
from __future__ import annotations

import csv
import io
import math
import os
import threading
from pathlib import Path

from nnunet_hyspark.benchmark.summary import (COUNT_METRICS, FINISHED, KEY_METRICS, MIN_FOLDS_WILCOXON,
                                              BenchmarkResults, Comparison, aggregate, comparisons)


def fmt(v: float | None, digits: int = 4) -> str:
    """A value with 4 decimals, or n/a."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.4g}"


def _fold_status_line(results: BenchmarkResults, arm: str) -> str:
    done = results.finished_folds(arm)
    parts = [f"{len(done)}/{len(results.folds)} folds ({', '.join(map(str, done)) or 'none'})"]
    parts += [f"fold {f}: {r.status}" for f, r in results.fold_results[arm].items() if r.status != FINISHED]
    return "; ".join(parts)


def render_markdown(results: BenchmarkResults, comps: list[Comparison], baseline: str | None,
                    other: str | None, title: str | None = None, level: int = 1) -> str:
    """The human-readable report: fold accounting first, then aggregates, per-fold values, differences.

    ``level`` is the depth of the title's heading (the sections are one deeper), so the report of
    one training fraction can be a section of a larger one.
    """
    table_metrics = [m for m in results.metrics if m not in COUNT_METRICS]
    h = "#" * (level + 1)
    title = title or f"HySparK benchmark: {results.dataset} / {results.configuration} / {results.plans}"
    out = [f"{'#' * level} {title}", ""]
    out.append("Folds contributed per arm (missing or unfinished folds are excluded from every number below):")
    out.append("")
    for label, trainer in results.arms:
        out.append(f"- **{label}** (`{trainer}`): {_fold_status_line(results, label)}")
    out += ["", "Aggregates are mean ± sample standard deviation (ddof=1) over the contributing folds; "
                "`(n=k)` marks a cell based on fewer folds than the arm contributed.", ""]
    for metric in table_metrics:
        out += [f"{h} {metric}: mean ± std over folds", ""]
        header = ["class"] + [f"{lab} ({len(results.finished_folds(lab))} folds)" for lab, _ in results.arms]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for cls in results.classes:
            cells = [cls]
            for lab, _ in results.arms:
                agg = aggregate(results, lab, cls, metric)
                cell = "n/a" if not agg.n else f"{fmt(agg.mean)} ± {fmt(agg.std)}"
                if agg.n and agg.n < len(results.finished_folds(lab)):
                    cell += f" (n={agg.n})"
                cells.append(cell)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    for metric in table_metrics:
        out += [f"{h} Per-fold {metric}", ""]
        header = ["arm", "fold", "status"] + results.classes
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for lab, _ in results.arms:
            for f, r in results.fold_results[lab].items():
                vals = [fmt(r.values.get(c, {}).get(metric)) if r.status == FINISHED else "—"
                        for c in results.classes]
                out.append("| " + " | ".join([lab, str(f), r.status] + vals) + " |")
        out.append("")
    if baseline and other:
        out += [f"{h} Difference {other} − {baseline} (paired over folds finished in both)", ""]
        out += ["| class | metric | paired folds | mean diff | std diff | Wilcoxon p | paired t-test p | note |",
                "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            out.append(f"| {c.cls} | {c.metric} | {len(c.folds)} ({', '.join(map(str, c.folds)) or '-'}) | "
                       f"{fmt(c.mean_diff)} | {fmt(c.std_diff)} | {_fmt_p(c.p_wilcoxon)} | "
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


def plot(results: BenchmarkResults, path: str | os.PathLike, title_suffix: str = "") -> Path | None:
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
        ax.set_title(f"{metric} per class (bars: mean ± std over folds, dots: folds){title_suffix}")
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out and write a matplotlib Figure as PNG atomically (a reader never sees half a file)."""
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.png")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def compared_arms(results: BenchmarkResults, compare_arms: tuple[str, str] | None) -> tuple[str, str] | None:
    """(baseline, other): ``--compare``, by default the second arm minus the first; None with one arm."""
    labels = [lab for lab, _ in results.arms]
    if compare_arms is None and len(labels) >= 2:
        return labels[0], labels[1]
    return compare_arms


def write_files(output_dir: Path, texts: dict[str, str], extra_markdown: list[str] | None = None,
                extra_csv: dict[str, str] | None = None) -> list[Path]:
    """Write the text files (summary.md with the extra sections appended; empty extra CSVs are skipped)."""
    texts = dict(texts)
    texts["summary.md"] = "\n".join([texts["summary.md"].rstrip("\n"), *[m for m in extra_markdown or [] if m]]) + "\n"
    texts.update({name: text for name, text in (extra_csv or {}).items() if text})
    written = []
    for name, text in texts.items():
        write_text_atomic(output_dir / name, text)
        written.append(output_dir / name)
    return written


def write_summary(results: BenchmarkResults, output_dir: str | os.PathLike,
                  compare_arms: tuple[str, str] | None = None, extra_markdown: list[str] | None = None,
                  extra_csv: dict[str, str] | None = None) -> list[Path]:
    """Write summary.md, the CSVs and summary.png into output_dir; return the paths written.

    ``compare_arms`` is (baseline, other); by default the second arm minus the first.
    ``extra_markdown`` sections are appended to summary.md, ``extra_csv`` (name -> text) written beside it.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    compare_arms = compared_arms(results, compare_arms)
    baseline, other = compare_arms if compare_arms else (None, None)
    comps = comparisons(results, baseline, other) if compare_arms else []
    written = write_files(out, {"summary.md": render_markdown(results, comps, baseline, other),
                                "summary.csv": long_csv(results),
                                "summary_aggregate.csv": aggregate_csv(results),
                                "summary_comparison.csv": comparison_csv(comps)}, extra_markdown, extra_csv)
    png = plot(results, out / "summary.png")
    if png is not None:
        written.append(png)
    return written
