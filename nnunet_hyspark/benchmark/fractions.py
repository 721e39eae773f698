"""Label efficiency: each fold trained on nested fractions of its training cases, by nnU-Net's own fold mechanism.

nnU-Net trains ``-f k`` on entry ``k`` of ``splits_final.json`` (any ``k`` the file has), so a fold
trained on a fraction of its training cases is one more entry: the fold's validation cases
unchanged, a subset of its training cases. No copy of the dataset is made.

* The subsets of one fold are prefixes of one seeded permutation of its sorted training cases:
  fraction ``f`` takes the first ``max(1, round(f * n))``, so every fraction's cases contain the
  smaller fraction's (nested) and a re-run draws the same cases.
* Fraction 1.0 is the fold's own entry ``k``. Smaller fractions are appended after the ``K``
  cross-validation entries, each marked with :data:`MARKER` (``{"fold", "fraction", "seed"}``;
  nnU-Net ignores keys it does not know), so the number of cross-validation folds can still be
  read from the file (:func:`base_count`).
* Entries are never modified or removed: installing finds an entry with the same marker and the
  same cases (idempotent), else appends one. A subset that changed (other base splits) therefore
  gets a new index and never reuses results trained on the old cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save

DEFAULT_FRACTIONS: tuple[float, ...] = (1.0,)
#: seed of the per-fold permutation (plus the fold index); part of the benchmark's identity
SUBSET_SEED = 12345
#: key of the appended entries in splits_final.json
MARKER = "hyspark_subset"
SPLITS_FILENAME = "splits_final.json"
FRACTIONS_HELP = "give fractions of each fold's training cases in (0, 1], each once, e.g. 0.1 0.25 0.5 1.0"

Splits = list[dict]


@dataclass(frozen=True)
class FoldEntry:
    """Cross-validation fold ``cv_fold`` trained on ``fraction`` of its training cases: nnU-Net's fold
    ``nnunet_fold`` (``nnUNetv2_train -f``, entry of splits_final.json)."""

    cv_fold: int
    fraction: float
    nnunet_fold: int

    def as_dict(self) -> dict:
        return {"fold": self.cv_fold, "fraction": self.fraction, "nnunet_fold": self.nnunet_fold}

    @classmethod
    def from_dict(cls, d: dict) -> "FoldEntry":
        return cls(int(d["fold"]), float(d["fraction"]), int(d["nnunet_fold"]))


def format_fraction(fraction: float) -> str:
    """0.25 -> '0.25', 1.0 -> '1' (log names, headings)."""
    return f"{fraction:g}"


def check_fractions(fractions: Sequence[float] | None) -> tuple[float, ...]:
    """The requested fractions, ascending; each in (0, 1] and listed once. None/empty = all cases (1.0)."""
    if not fractions:
        return DEFAULT_FRACTIONS
    given = " ".join(format_fraction(f) for f in fractions)
    bad = [f for f in fractions if not 0 < f <= 1]  # NaN fails this too
    if bad:
        raise HySparKError(f"--train-fractions {given}: {', '.join(map(format_fraction, bad))} outside (0, 1]",
                           FRACTIONS_HELP)
    if len(set(fractions)) != len(fractions):
        twice = sorted({f for f in fractions if list(fractions).count(f) > 1})
        raise HySparKError(f"--train-fractions {given}: {', '.join(map(format_fraction, twice))} listed twice",
                           FRACTIONS_HELP)
    return tuple(sorted(float(f) for f in fractions))


def subset_size(fraction: float, n: int) -> int:
    """round(fraction * n) (halves up), at least one case, at most n."""
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def nested_subsets(train: Sequence[str], fractions: Sequence[float], cv_fold: int,
                   seed: int = SUBSET_SEED) -> dict[float, list[str]]:
    """fraction -> sorted training cases; prefixes of one permutation of the sorted cases, so nested."""
    import numpy as np

    if not train:
        raise HySparKError(f"fold {cv_fold} has no training case, so no fraction of it can be trained",
                           "use splits whose every fold has training cases (--splits), or drop --train-fractions")
    cases = sorted(train)
    # the legacy RandomState stream is frozen by numpy: the same subsets on every machine and version
    order = [cases[i] for i in np.random.RandomState(seed + cv_fold).permutation(len(cases))]
    return {f: sorted(order[:subset_size(f, len(cases))]) for f in fractions}


def base_count(splits: Splits) -> int:
    """Number of cross-validation entries: those before the first appended subset entry."""
    return next((i for i, e in enumerate(splits) if MARKER in e), len(splits))


def base_splits(splits: Splits) -> Splits:
    """The cross-validation entries as plain ``{"train", "val"}`` (for comparing with --splits)."""
    return [{"train": list(e["train"]), "val": list(e["val"])} for e in splits[:base_count(splits)]]


def check_folds_trainable(splits: Splits, folds: Sequence[int], fractions: Sequence[float]) -> None:
    """Every requested fold must have a training case to draw from (before anything is written)."""
    if tuple(fractions) == DEFAULT_FRACTIONS:
        return
    for k in folds:
        nested_subsets(splits[k]["train"], fractions, k)


def _subset_entry(base: dict, cases: list[str], cv_fold: int, fraction: float, seed: int) -> dict:
    return {"train": cases, "val": list(base["val"]), MARKER: {"fold": cv_fold, "fraction": fraction, "seed": seed}}


def _same(entry: dict, wanted: dict) -> bool:
    return (entry.get(MARKER) == wanted[MARKER] and sorted(entry["train"]) == wanted["train"]
            and list(entry["val"]) == wanted["val"])


def plan_entries(splits: Splits, folds: Sequence[int], fractions: Sequence[float],
                 seed: int = SUBSET_SEED) -> tuple[list[FoldEntry], Splits]:
    """Map every fold x fraction to an entry, appending the missing ones; returns (entries, new splits).

    Pure: the caller writes the returned list (only if it grew). Entries 0..K-1 are never changed.
    """
    k = base_count(splits)
    out = [dict(e) for e in splits]
    entries = []
    for fold in folds:
        if not 0 <= fold < k:
            raise HySparKError(f"fold {fold} is not one of the {k} cross-validation folds of {SPLITS_FILENAME}",
                               "fix -f")
        subsets = nested_subsets(splits[fold]["train"], fractions, fold, seed)
        for fraction in fractions:
            if fraction == 1.0:
                entries.append(FoldEntry(fold, fraction, fold))
                continue
            wanted = _subset_entry(splits[fold], subsets[fraction], fold, fraction, seed)
            index = next((i for i in range(k, len(out)) if _same(out[i], wanted)), None)
            if index is None:
                out.append(wanted)
                index = len(out) - 1
            entries.append(FoldEntry(fold, fraction, index))
    return entries, out


def find_entries(splits: Splits, folds: Sequence[int], fractions: Sequence[float],
                 seed: int = SUBSET_SEED) -> list[FoldEntry]:
    """The fold x fraction entries already in ``splits`` (for summaries of benchmarks without a manifest)."""
    try:
        entries, _ = plan_entries(splits, folds, fractions, seed)
    except HySparKError:
        return []
    return [e for e in entries if e.nnunet_fold < len(splits)]


def install(preprocessed_dataset_dir: str | Path, current: Splits, folds: Sequence[int], fractions: Sequence[float],
            dry_run: bool = False, seed: int = SUBSET_SEED) -> tuple[list[FoldEntry], int]:
    """Add the fold x fraction entries to ``current`` and write splits_final.json if it grew; (entries, appended).

    ``current`` is the file's content (in a dry run: what it will be once --splits or nnU-Net's
    default split is written).
    """
    entries, grown = plan_entries(current, folds, fractions, seed)
    appended = len(grown) - len(current)
    if appended and not dry_run:
        atomic_json_save(grown, Path(preprocessed_dataset_dir) / SPLITS_FILENAME)
    return entries, appended
