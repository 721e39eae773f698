"""The summary of a label-efficiency benchmark: the usual report once per training fraction, plus Dice vs. fraction.

Each fraction's results are a :class:`~.summary.BenchmarkResults` over the cross-validation folds
(read from the nnU-Net fold of that fold x fraction), so the tables, paired comparisons and plots
are :mod:`.summary_tables`' own, computed per fraction. Across fractions this module adds a table
and a figure of Dice against the fraction of training cases, per arm (mean ± std over folds, per
class and the foreground mean). The CSVs are the per-fraction CSVs stacked, with a leading
``fraction`` column.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from nnunet_hyspark.benchmark import summary_tables as tables
from nnunet_hyspark.benchmark.fractions import SUBSET_SEED, format_fraction
from nnunet_hyspark.benchmark.summary import FOREGROUND_MEAN, BenchmarkResults, Comparison, aggregate, comparisons

FractionResults = list[tuple[float, BenchmarkResults]]
FIGURE_NAME = "summary_fractions.png"
CURVE_METRIC = "Dice"


def _cell(results: BenchmarkResults, arm: str, cls: str, metric: str) -> str:
    agg = aggregate(results, arm, cls, metric)
    return "n/a" if not agg.n else f"{tables.fmt(agg.mean)} ± {tables.fmt(agg.std)} (n={agg.n})"


def curve_markdown(per_fraction: FractionResults, metric: str = CURVE_METRIC) -> list[str]:
    """Rows arm x class, one column per fraction: mean ± std over the folds that finished (n)."""
    first = per_fraction[0][1]
    classes = _classes(per_fraction)
    header = ["arm", "class"] + [f"fraction {format_fraction(f)}" for f, _ in per_fraction]
    out = [f"## {metric} vs. training fraction: mean ± std over folds (n folds)", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, _ in first.arms:
        for cls in classes:
            out.append("| " + " | ".join([arm, cls] + [_cell(r, arm, cls, metric) for _, r in per_fraction]) + " |")
    return out + ["", f"![{metric} vs. training fraction]({FIGURE_NAME})", ""]


def _classes(per_fraction: FractionResults) -> list[str]:
    """Classes in the order of the first fraction that has them, foreground mean last."""
    seen: list[str] = []
    for _, r in per_fraction:
        seen += [c for c in r.classes if c not in seen]
    return [c for c in seen if c != FOREGROUND_MEAN] + ([FOREGROUND_MEAN] if FOREGROUND_MEAN in seen else [])


def entries_markdown(per_fraction: FractionResults, entries: list) -> list[str]:
    """Which nnU-Net fold (entry of splits_final.json) holds which fold x fraction."""
    folds = per_fraction[0][1].folds
    where = {(e.cv_fold, e.fraction): e.nnunet_fold for e in entries}
    header = ["fold"] + [f"fraction {format_fraction(f)}" for f, _ in per_fraction]
    out = ["nnU-Net fold (entry of `splits_final.json`, `nnUNetv2_train -f`) of each fold x fraction:", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fold in folds:
        out.append("| " + " | ".join([str(fold)] + [str(where.get((fold, f), "—")) for f, _ in per_fraction]) + " |")
    return out + [""]


def render_markdown(per_fraction: FractionResults, entries: list, comps: dict[float, list[Comparison]],
                    compare_arms: tuple[str, str] | None) -> str:
    """The report: fractions and entries, Dice vs. fraction, then the usual report per fraction."""
    first = per_fraction[0][1]
    fractions = ", ".join(format_fraction(f) for f, _ in per_fraction)
    out = [f"# HySparK benchmark: {first.dataset} / {first.configuration} / {first.plans}, "
           f"training fractions {fractions}", "",
           f"Each fold is trained on nested subsets of its training cases (fractions {fractions}; one permutation "
           f"per fold, seed {SUBSET_SEED} + fold) and always validated on the fold's own validation cases, so "
           "the fractions are compared on the same held-out cases.", ""]
    out += entries_markdown(per_fraction, entries)
    if CURVE_METRIC in first.metrics or any(CURVE_METRIC in r.metrics for _, r in per_fraction):
        out += curve_markdown(per_fraction)
    for fraction, results in per_fraction:
        arms = tables.compared_arms(results, compare_arms)
        out.append(tables.render_markdown(results, comps[fraction], *(arms or (None, None)),
                                          title=f"Training fraction {format_fraction(fraction)}", level=2))
    return "\n".join(out)


def stack_csv(parts: list[tuple[float, str]]) -> str:
    """The per-fraction CSVs as one table with a leading ``fraction`` column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header_written = False
    for fraction, text in parts:
        rows = list(csv.reader(io.StringIO(text)))
        if not header_written:
            w.writerow(["fraction", *rows[0]])
            header_written = True
        w.writerows([format_fraction(fraction), *r] for r in rows[1:])
    return buf.getvalue()


def plot_curves(per_fraction: FractionResults, path: str | os.PathLike, metric: str = CURVE_METRIC) -> Path | None:
    """One panel per arm: metric against training fraction, a line per class and the foreground mean (thick),
    error bars ± std over folds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = [lab for lab, _ in per_fraction[0][1].arms]
    classes = _classes(per_fraction)
    if not arms or not classes:
        return None
    fig = Figure(figsize=(4.5 * len(arms) + 1.5, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(arms), squeeze=False, sharey=True)[0]
    fractions = [f for f, _ in per_fraction]
    for ax, arm in zip(axes, arms):
        for cls in classes:
            xs, means, stds = [], [], []
            for fraction, results in per_fraction:
                agg = aggregate(results, arm, cls, metric)
                if agg.n:
                    xs.append(fraction)
                    means.append(agg.mean)
                    stds.append(agg.std or 0.0)
            fg = cls == FOREGROUND_MEAN
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=cls, linewidth=2.5 if fg else 1.2,
                        color="black" if fg else None)
        ax.set_xticks(fractions)
        ax.set_xticklabels([format_fraction(f) for f in fractions])
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("fraction of the fold's training cases")
        ax.set_title(f"{arm}: {metric} (mean ± std over folds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return tables.save_figure(fig, path)


def write_summary(per_fraction: FractionResults, entries: list, output_dir: str | os.PathLike,
                  compare_arms: tuple[str, str] | None = None, extra_markdown: list[str] | None = None,
                  extra_csv: dict[str, str] | None = None) -> list[Path]:
    """summary.md, the stacked CSVs, summary.png (the largest fraction's bars) and the Dice-vs-fraction figure."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    comps = {}
    for fraction, results in per_fraction:
        arms = tables.compared_arms(results, compare_arms)
        comps[fraction] = comparisons(results, *arms) if arms else []
    written = tables.write_files(out, {
        "summary.md": render_markdown(per_fraction, entries, comps, compare_arms),
        "summary.csv": stack_csv([(f, tables.long_csv(r)) for f, r in per_fraction]),
        "summary_aggregate.csv": stack_csv([(f, tables.aggregate_csv(r)) for f, r in per_fraction]),
        "summary_comparison.csv": stack_csv([(f, tables.comparison_csv(comps[f])) for f, _ in per_fraction]),
    }, extra_markdown, extra_csv)
    largest, results = per_fraction[-1]
    for png in (tables.plot(results, out / "summary.png", f", training fraction {format_fraction(largest)}"),
                plot_curves(per_fraction, out / FIGURE_NAME)):
        if png is not None:
            written.append(png)
    return written
