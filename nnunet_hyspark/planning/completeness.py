"""Is a preprocessed configuration folder complete? A marker written last says so.

A preprocessing run killed half-way leaves a folder with some of its cases; training on it would
silently use part of the data. ``hyspark_plan_and_preprocess`` therefore writes a marker for each
configuration folder as its very last step, and readers (``hyspark_pretrain``, ``hyspark_benchmark
folds``) call :func:`check_complete`, which refuses a folder without it and names the command that
repairs it. The marker sits beside the folder, ``$nnUNet_preprocessed/DatasetX/.hyspark-preprocessing-complete.
<data_identifier>`` (see :func:`marker_path`), not inside it: nnU-Net infers its dataset class from
the file endings inside the folder and refuses a folder holding any other kind of file.

Folders written by older versions (or by ``nnUNetv2_plan_and_preprocess``) have no marker. They are
accepted when nnU-Net's own per-case files are all there: every case has its ``.pkl`` and its data
file, and there are at least as many cases as ``numTraining`` in the dataset.json nnU-Net copied
beside the plans (a folder killed half-way has fewer).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save

MARKER_NAME = ".hyspark-preprocessing-complete"
#: nnU-Net's data file endings per case (blosc2 since nnU-Net 2.6, npz/npy before)
_DATA_ENDINGS = (".b2nd", ".npz", ".npy")


def marker_path(folder: str | os.PathLike) -> Path:
    """Where the marker of the configuration folder ``folder`` is (beside it, in the dataset folder)."""
    folder = Path(folder)
    return folder.parent / f"{MARKER_NAME}.{folder.name}"


def is_marked(folder: str | os.PathLike) -> bool:
    return marker_path(folder).is_file()


def write_marker(folder: str | os.PathLike, n_cases: int, command: str = "hyspark_plan_and_preprocess") -> Path:
    """Mark ``folder`` complete; call it only after every case was written."""
    path = marker_path(folder)
    atomic_json_save({"complete": True, "cases": int(n_cases), "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "by": command}, path)
    return path


def remove_marker(folder: str | os.PathLike) -> None:
    """Before a folder is rewritten: it is incomplete until the new run writes the marker again."""
    marker_path(folder).unlink(missing_ok=True)


def case_ids(folder: str | os.PathLike) -> list[str]:
    """Cases whose properties (``.pkl``) and data file are both present."""
    folder = Path(folder)
    pkls = {p.name[:-4] for p in folder.glob("*.pkl") if not p.name.startswith(".")}
    return sorted(c for c in pkls if any((folder / (c + e)).is_file() for e in _DATA_ENDINGS))


def problem(folder: str | os.PathLike) -> str | None:
    """What makes ``folder`` unusable (missing, no marker and too few cases), or None if it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return "does not exist (not preprocessed)"
    if is_marked(folder):
        return None
    found = case_ids(folder)
    expected = _expected_cases(folder.parent)
    if not found:
        return "holds no preprocessed cases"
    if expected is None:
        return None  # an older folder of unknown size: every case present is whole, accept it
    if len(found) < expected:
        return (f"is incomplete: {len(found)} of {expected} cases and no {marker_path(folder).name} "
                "(a preprocessing run was interrupted)")
    return None


def _expected_cases(dataset_folder: Path) -> int | None:
    try:
        n = json.loads((dataset_folder / "dataset.json").read_text()).get("numTraining")
    except (OSError, ValueError, AttributeError):
        return None
    return int(n) if isinstance(n, int) and n > 0 else None


def check_complete(folder: str | os.PathLike, repair_command: str) -> None:
    """HySparKError naming ``repair_command`` unless ``folder`` is a complete preprocessed configuration."""
    why = problem(folder)
    if why is not None:
        raise HySparKError(f"preprocessed folder {folder} {why}", f"(re)run: {repair_command}")


def repair_command(dataset_id: int | str, plans_name: str, configuration: str) -> str:
    """The command that writes a configuration folder again (with --plans-from if the dataset was unlabeled)."""
    return (f"hyspark_plan_and_preprocess -d {dataset_id} -c {configuration} --plans-name {plans_name} "
            "(add the --network / --plans-from options of the first run)")
