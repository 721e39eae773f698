"""``hyspark_plan_and_preprocess --images DIR [DIR ...] --plans-from L``: any folder of CT as pre-training data.

The folders (or JSON lists of paths) are searched by :mod:`.image_collection`, written as a new
nnU-Net raw dataset (images only, ``_0000`` naming, a ``dataset.json`` that says it is
unlabeled), and then preprocessed exactly like a hand-made collection given with ``-d NEW
--plans-from L``. Everything that can be checked is checked before the raw dataset is written
(options, the source's plans, every image's header); if preprocessing fails afterwards, the new raw
dataset is removed again, so a failed run leaves neither a raw nor a preprocessed dataset behind.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.planning.image_collection import collect_images, remove_stale_temporaries, write_raw_dataset
from nnunet_hyspark.planning.run import PlanOptions, resolve_options

#: where the search for a free dataset id starts when -d is not given; nnU-Net's own and most public
#: datasets use lower ids, so an imported collection rarely takes an id someone will want later
FIRST_FREE_ID = 900
_ID_RE = re.compile(r"^Dataset(\d+)_")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class ImportedImages:
    """The raw dataset written from ``--images``."""

    folder: Path
    num_images: int
    skipped: list[str]  # "<path>: <why>" for each input left out (--skip-unreadable)


def taken_ids(folders: Sequence[str | os.PathLike]) -> set[int]:
    """Dataset ids used by any ``DatasetXXX_*`` entry in ``folders`` (nnU-Net's raw / preprocessed / results)."""
    ids = set()
    for folder in folders:
        if os.path.isdir(folder):
            ids |= {int(m.group(1)) for m in map(_ID_RE.match, os.listdir(folder)) if m}
    return ids


def free_dataset_id(folders: Sequence[str | os.PathLike], start: int = FIRST_FREE_ID) -> int:
    """The lowest id from ``start`` up that no dataset in ``folders`` uses."""
    taken = taken_ids(folders)
    return next(i for i in range(start, start + 10_000) if i not in taken)


def default_name(inputs: Sequence[str]) -> str:
    """The first input's folder name (a JSON list: its file name), made safe for ``DatasetXXX_<name>``."""
    first = Path(inputs[0]).resolve()
    stem = first.stem if first.suffix == ".json" else first.name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-") or "CTImages"


def _nnunet_folders() -> list[str]:
    return [os.environ[v] for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if os.environ.get(v)]


def _new_dataset_id(opts: PlanOptions) -> int:
    """-d's id (which must be free), or the first free one."""
    if not opts.datasets:
        return free_dataset_id(_nnunet_folders())
    if len(opts.datasets) > 1 or not str(opts.datasets[0]).isdigit():
        raise HySparKError(f"with --images, -d names the one new dataset's id (a number), got {list(opts.datasets)}",
                           "give one free id, e.g. -d 900, or leave out -d to take the first free id")
    dataset_id = int(opts.datasets[0])
    if dataset_id in taken_ids(_nnunet_folders()):
        raise HySparKError(f"dataset id {dataset_id} is already used in nnUNet_raw, nnUNet_preprocessed or "
                           f"nnUNet_results", f"choose another -d, or leave it out to take the first free id "
                                              f"(from {FIRST_FREE_ID})")
    return dataset_id


def _check_image_options(opts: PlanOptions) -> tuple[PlanOptions, str]:
    """Everything about ``--images`` that can be checked without reading an image; returns the resolved options
    and the dataset name."""
    if opts.plans_from is None:
        raise HySparKError("--images needs --plans-from LABELLED_ID: images without labels are preprocessed with "
                           "the plans of a labelled CT dataset", "add --plans-from with a planned labelled dataset")
    resolved = resolve_options(opts)
    name = opts.name or default_name(opts.images)
    if not _NAME_RE.match(name):
        raise HySparKError(f"--name {name!r}: only letters, digits, '-' and '_' are allowed", "e.g. --name MyCT")
    raw = compat.require_nnunet_env(("nnUNet_raw", "nnUNet_preprocessed"))["nnUNet_raw"]
    source = compat.dataset_name(opts.plans_from, [raw], hint="give a labelled dataset in $nnUNet_raw")
    if not compat.plans_file(source, resolved.plans_name).is_file():
        raise HySparKError(f"--plans-from {source}: no plans {compat.plans_file(source, resolved.plans_name)}",
                           f"plan the source first: hyspark_plan_and_preprocess -d {compat.dataset_id(source)}")
    return resolved, name


@contextmanager
def images_as_dataset(opts: PlanOptions) -> Iterator[tuple[PlanOptions, ImportedImages | None]]:
    """Without ``--images``: ``opts`` as they are. With it: write the raw dataset, yield ``opts`` naming it,
    and remove it again if the ``with`` block (planning and preprocessing) fails."""
    if not opts.images:
        extra = [f for f, v in (("--name", opts.name), ("--skip-unreadable", opts.skip_unreadable),
                                ("--copy", opts.copy)) if v]
        if extra:
            raise HySparKError(f"{', '.join(extra)} only apply to --images", f"leave out {', '.join(extra)}")
        if not opts.datasets:
            raise HySparKError("no dataset given", "give -d ID [ID ...], or --images DIR --plans-from LABELLED_ID")
        yield opts, None
        return
    resolved, name = _check_image_options(opts)
    dataset_id = _new_dataset_id(opts)
    raw = os.environ["nnUNet_raw"]
    remove_stale_temporaries(raw)
    collection = collect_images(opts.images)  # reads every header: unreadable and non-3D inputs listed here
    folder = write_raw_dataset(collection, dataset_id, name, raw, copy=opts.copy,
                               skip_unreadable=opts.skip_unreadable, progress=sys.stderr.isatty())
    try:
        yield replace(opts, datasets=(folder.name,)), ImportedImages(folder, len(collection.images),
                                                                    collection.problems)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # links and our own conversions only: no source is touched
        raise
