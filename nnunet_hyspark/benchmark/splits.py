"""Custom cross-validation splits for a benchmark.

nnU-Net reads its folds from ``$nnUNet_preprocessed/DatasetXXX_Name/splits_final.json``
(a list of ``{"train": [...], "val": [...]}``, one entry per fold). A benchmark that
compares arms is only meaningful if every arm sees the same folds, so the splits are
validated here (every case exists, no case validated twice, no train/val leak) and
installed in that one place before any training starts.

Three input formats are accepted:

* nnU-Net's own ``splits_final.json`` format (JSON list of ``{"train", "val"}``),
* a MONAI-style datalist (JSON object with a ``training`` list of ``{"image", "label", "fold"}``, the
  format in which papers publish their folds; mapped onto case ids by :mod:`.datalist`), and
* a plain-text case list, one case per line: ``CASE_ID FOLD`` separated by spaces or a
  tab; blank lines and everything after ``#`` are ignored. Folds are numbered
  ``0..K-1`` without gaps. Fold ``k`` validates on the cases listed with ``k`` and
  trains on every other listed case (cases not listed are not used at all).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from nnunet_hyspark.benchmark import datalist
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save

Splits = list[dict[str, list[str]]]

SPLITS_FILENAME = "splits_final.json"
TEXT_FORMAT_HELP = (
    "one line per case: 'CASE_ID FOLD' (space or tab separated, '#' starts a comment); "
    "fold k validates on the cases marked k and trains on all other listed cases"
)


def load_splits_file(path: str | os.PathLike, case_ids: Sequence[str] | None = None,
                     case_id_pattern: str | None = None, allow_partial: bool = False) -> Splits:
    """Read a splits file in any supported format and return nnU-Net's list form.

    ``case_ids`` (the dataset's cases) map a datalist's image files to cases; ``case_id_pattern`` and
    ``allow_partial`` (``--case-id-pattern``, ``--allow-partial-splits``) apply to datalists only.
    """
    path = Path(path)
    if not path.is_file():
        raise HySparKError(f"splits file not found: {path}", "check the path given to --splits")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HySparKError(f"splits file {path} cannot be read as text ({e})", "check the path given to --splits")
    stripped = text.lstrip()
    data = None
    if stripped.startswith("[") or stripped.startswith("{") or path.suffix.lower() == ".json":
        data = _load_json(text, path)
    if data is not None and datalist.is_datalist(data):
        if case_ids is None:
            raise HySparKError(f"splits file {path} is a datalist, which needs the dataset's cases",
                               "pass it to hyspark_benchmark folds --splits")
        assignment = datalist.datalist_assignment(data, str(path), case_ids, case_id_pattern, allow_partial)
        return assignment_to_splits(assignment, str(path))
    if case_id_pattern is not None or allow_partial:
        raise HySparKError(f"--case-id-pattern / --allow-partial-splits apply to datalists only, and {path} "
                           "is not one", "drop them, or give a MONAI datalist JSON to --splits")
    if data is not None:
        return _parse_json_splits(data, path)
    return parse_case_list(text, str(path))


def _load_json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HySparKError(f"splits file {path} is not valid JSON ({e})",
                           "use nnU-Net's splits_final.json format, a MONAI datalist, or the text format: "
                           + TEXT_FORMAT_HELP) from None


def _parse_json_splits(data: object, path: Path) -> Splits:
    """Parse nnU-Net's splits_final.json format, rejecting anything else early."""
    if not isinstance(data, list) or not data:
        raise HySparKError(f"splits file {path} must contain a non-empty JSON list of "
                           '{"train": [...], "val": [...]} (one per fold)', "see nnU-Net's splits_final.json")
    splits: Splits = []
    for k, fold in enumerate(data):
        if not isinstance(fold, dict) or not {"train", "val"} <= set(fold):
            raise HySparKError(f"splits file {path}: fold {k} is not an object with 'train' and 'val' lists",
                               "see nnU-Net's splits_final.json format")
        if not all(isinstance(c, str) for c in list(fold["train"]) + list(fold["val"])):
            raise HySparKError(f"splits file {path}: fold {k} contains non-string case ids",
                               "case ids are strings such as 'case_000'")
        splits.append({"train": list(fold["train"]), "val": list(fold["val"])})
    return splits


def parse_case_list(text: str, source: str = "<text>") -> Splits:
    """Convert the text format (``CASE_ID FOLD`` per line) into nnU-Net's list form."""
    assignment: dict[str, list[int]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise HySparKError(f"{source}:{lineno}: expected 'CASE_ID FOLD', got {raw.strip()!r}",
                               "text splits format: " + TEXT_FORMAT_HELP)
        assignment.setdefault(parts[0], []).append(int(parts[1]))
    if not assignment:
        raise HySparKError(f"splits file {source} lists no cases", "text splits format: " + TEXT_FORMAT_HELP)
    return assignment_to_splits(assignment, source)


def assignment_to_splits(assignment: dict[str, list[int]], source: str) -> Splits:
    """case -> its validation fold (listed once), as nnU-Net's list: fold k validates on its cases and trains on
    every other listed case."""
    twice = sorted(c for c, folds in assignment.items() if len(folds) > 1)
    if twice:
        raise HySparKError(f"splits file {source}: case(s) listed more than once: {_preview(twice)}",
                           "each case belongs to exactly one validation fold")
    used = sorted({f[0] for f in assignment.values()})
    n_folds = used[-1] + 1
    gaps = sorted(set(range(n_folds)) - set(used))
    if gaps:
        raise HySparKError(f"splits file {source}: fold(s) {gaps} have no cases (folds must be numbered 0..K-1)",
                           "renumber the folds without gaps")
    cases = sorted(assignment)
    return [{"train": [c for c in cases if assignment[c][0] != k],
             "val": [c for c in cases if assignment[c][0] == k]} for k in range(n_folds)]


def validate_splits(splits: Splits, known_cases: Iterable[str], source: str = "splits") -> None:
    """Refuse splits that would make a benchmark silently wrong.

    Unknown cases would crash nnU-Net mid-run (or be ignored); a case in two validation
    sets is counted twice; a case in both train and val of a fold leaks into its score.
    """
    known = set(known_cases)
    unknown = sorted({c for fold in splits for c in fold["train"] + fold["val"]} - known)
    if unknown:
        raise HySparKError(f"{source}: {len(unknown)} case(s) not in the dataset: {_preview(unknown)}",
                           "use the case identifiers of imagesTr (file name without _0000 and file ending)")
    seen: dict[str, int] = {}
    for k, fold in enumerate(splits):
        if not fold["val"] or not fold["train"]:
            raise HySparKError(f"{source}: fold {k} has an empty {'val' if not fold['val'] else 'train'} set",
                               "every fold needs training and validation cases")
        leak = sorted(set(fold["train"]) & set(fold["val"]))
        if leak:
            raise HySparKError(f"{source}: fold {k} has case(s) in both train and val: {_preview(leak)}",
                               "a fold must not train on its own validation cases")
        dup_in_val = sorted({c for c in fold["val"] if fold["val"].count(c) > 1})
        if dup_in_val:
            raise HySparKError(f"{source}: fold {k} lists validation case(s) twice: {_preview(dup_in_val)}",
                               "list every case once")
        for c in fold["val"]:
            if c in seen:
                raise HySparKError(
                    f"{source}: validation sets of folds {seen[c]} and {k} overlap (e.g. case {c!r})",
                    "each case may be validated in one fold only")
            seen[c] = k


def dataset_case_ids(dataset_name: str) -> list[str]:
    """List the training cases of a dataset, from the raw folder or, failing that, the preprocessed one.

    The raw ``imagesTr`` is the authority nnU-Net itself uses; the preprocessed
    ``gt_segmentations`` folder is the fallback for machines that only hold preprocessed data.
    """
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    raw = Path(os.environ.get("nnUNet_raw", "")) / dataset_name if os.environ.get("nnUNet_raw") else None
    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    dataset_json = load_dataset_json(dataset_name)
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    if isinstance(dataset_json.get("dataset"), dict):  # explicit file lists instead of imagesTr
        return sorted(dataset_json["dataset"])
    if raw is not None and (raw / "imagesTr").is_dir():
        return [str(c) for c in get_identifiers_from_splitted_dataset_folder(str(raw / "imagesTr"), file_ending)]
    gt = pre / "gt_segmentations"
    if gt.is_dir():
        return sorted(p.name[: -len(file_ending)] for p in gt.iterdir() if p.name.endswith(file_ending))
    raise HySparKError(f"cannot list the cases of {dataset_name}: neither {raw or '$nnUNet_raw'}/imagesTr "
                       f"nor {gt} exists", "run nnU-Net planning and preprocessing for this dataset first")


def load_dataset_json(dataset_name: str) -> dict:
    """Read dataset.json from the preprocessed folder (nnU-Net's copy) or the raw folder."""
    for var in ("nnUNet_preprocessed", "nnUNet_raw"):
        if os.environ.get(var):
            p = Path(os.environ[var]) / dataset_name / "dataset.json"
            if p.is_file():
                return json.loads(p.read_text())
    raise HySparKError(f"dataset.json of {dataset_name} not found in $nnUNet_preprocessed or $nnUNet_raw",
                       "run nnU-Net planning and preprocessing for this dataset first")


def splits_digest(splits: Splits) -> str:
    """A stable fingerprint, so a benchmark can tell whether its folds changed underneath it."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def existing_splits(preprocessed_dataset_dir: str | os.PathLike) -> Splits | None:
    """Return the splits nnU-Net will use for this dataset, or None if it will generate them."""
    p = Path(preprocessed_dataset_dir) / SPLITS_FILENAME
    return json.loads(p.read_text()) if p.is_file() else None


def install_splits(splits: Splits, preprocessed_dataset_dir: str | os.PathLike, force: bool = False,
                   dry_run: bool = False) -> tuple[Path, str]:
    """Write ``splits_final.json`` where nnU-Net reads it, never clobbering different splits silently.

    Returns the path and what happened: 'unchanged', 'written', or 'replaced' (old copy in ``.bak``).
    """
    target = Path(preprocessed_dataset_dir) / SPLITS_FILENAME
    current = existing_splits(preprocessed_dataset_dir)
    if current is not None and splits_digest(current) == splits_digest(splits):
        return target, "unchanged"
    action = "written"
    if current is not None:
        if not force:
            raise HySparKError(f"{target} already exists with different splits",
                               "pass --force to replace it (the old file is kept as splits_final.json.bak)")
        action = "replaced"
    if dry_run:
        return target, action
    if current is not None:
        shutil.copy2(target, target.with_name(SPLITS_FILENAME + ".bak"))
    atomic_json_save(splits, target)
    return target, action


def default_splits(data_folder: str | os.PathLike) -> Splits | None:
    """nnU-Net's own default split (5 folds, seed 12345, over the sorted case ids of a preprocessed
    configuration folder), or None where nnU-Net would not make one (no data, fewer than 5 cases)."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if not Path(data_folder).is_dir():
        return None  # no preprocessed data: leave it to nnU-Net, whose error names the problem
    try:
        ids = infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder))
    except (AssertionError, KeyError):  # nnU-Net cannot tell the format (no or mixed files)
        return None
    if len(ids) < 5:
        return None  # nnU-Net itself refuses 5 folds over fewer cases
    # exactly the trainer's call (nnUNetTrainer.do_split); str() because numpy's str_ is no JSON string type
    return [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]}
            for f in generate_crossval_split(list(np.sort(list(ids))), seed=12345, n_splits=5)]


def install_default_splits(preprocessed_dataset_dir: str | os.PathLike, data_folder: str | os.PathLike) -> Path | None:
    """Write nnU-Net's own default split (:func:`default_splits`) if none exists.

    nnU-Net's trainer would create exactly this file, but folds started in parallel would each
    create it at once; writing it first, atomically, removes that race. Returns the path if written.
    """
    target = Path(preprocessed_dataset_dir) / SPLITS_FILENAME
    if target.is_file():
        return None
    splits = default_splits(data_folder)
    if splits is None:
        return None
    atomic_json_save(splits, target)
    return target


def fold_table(splits: Splits, folds: Sequence[int] | None = None, source: str = "") -> list[str]:
    """The folds as ``--dry-run`` shows them: per fold, the number of training cases and the validation case ids."""
    lines = [f"folds{f' from {source}' if source else ''}: {len(splits)} fold(s), "
             f"{len({c for fold in splits for c in fold['train'] + fold['val']})} case(s)"]
    for k in (range(len(splits)) if folds is None else folds):
        fold = splits[k]
        lines.append(f"  fold {k}: {len(fold['train'])} training case(s); validation ({len(fold['val'])}): "
                     + " ".join(fold["val"]))
    return lines


def _preview(items: list[str], n: int = 10) -> str:
    """Name the offending items, but keep the error on one readable line."""
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
