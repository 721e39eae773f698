"""Published fold files: MONAI-style datalist JSON, mapped onto an nnU-Net dataset's case ids.

Self-supervised segmentation papers publish their cross-validation folds as a datalist::

    {"training": [{"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/img0001.nii.gz", "fold": 0}, ...]}

Each entry's image file becomes an nnU-Net case id by its file name: the folder and the file
ending are dropped (``imagesTr/img0001.nii.gz`` -> ``img0001``), and a channel suffix ``_0000``
too if only that names a case. Other naming needs ``--case-id-pattern REGEX`` (one capture group,
or a group named ``case``, searched in the image path as written). Entries that name no case of
the dataset, and dataset cases without an entry, are refused (a benchmark on other cases than the
paper's is not the paper's benchmark) unless the user allows partial splits.
"""
from __future__ import annotations

import re
import sys
from pathlib import PurePosixPath
from typing import Any, Sequence

from nnunet_hyspark.errors import HySparKError

#: image file endings nnU-Net's readers know (longest first, so .nii.gz wins over .gz)
_ENDINGS = (".nii.gz", ".nrrd.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tiff", ".tif", ".png", ".bmp",
            ".npz", ".npy", ".b2nd", ".gz")
_CHANNEL = re.compile(r"^(.*)_\d{4}$")
FORMAT_HELP = ('a MONAI datalist is {"training": [{"image": "imagesTr/img0001.nii.gz", "label": ..., "fold": 0}, '
               '...]} with folds numbered 0..K-1')


def is_datalist(data: Any) -> bool:
    """A JSON object (nnU-Net's splits_final.json is a list)."""
    return isinstance(data, dict)


def compile_pattern(pattern: str | None) -> re.Pattern | None:
    """``--case-id-pattern``: a valid regex with one capture group or a group named ``case``."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise HySparKError(f"--case-id-pattern {pattern!r} is not a valid regular expression ({e})",
                           r"e.g. --case-id-pattern 'img(\d+)' or '(?P<case>[^/]+)_ct\.nii\.gz$'") from None
    if "case" not in rx.groupindex and rx.groups != 1:
        raise HySparKError(f"--case-id-pattern {pattern!r} has {rx.groups} capture groups",
                           "use exactly one group (...) or name the case id's group (?P<case>...)")
    return rx


def case_from_image(image: str, known: set[str], pattern: re.Pattern | None = None) -> str | None:
    """The dataset case an image path names, or None."""
    if pattern is not None:
        m = pattern.search(image)
        if m is None:
            return None
        name = m.group("case") if "case" in pattern.groupindex else m.group(1)
        return name if name in known else None
    name = PurePosixPath(image.replace("\\", "/")).name
    lower = name.lower()
    ending = next((e for e in _ENDINGS if lower.endswith(e)), "")
    name = name[: len(name) - len(ending)]
    if name in known:
        return name
    m = _CHANNEL.match(name)  # the datalist names nnU-Net's channel file img0001_0000
    return m.group(1) if m and m.group(1) in known else None


def _entries(data: dict, source: str) -> list[tuple[str, int]]:
    """(image path, fold) of every training entry; one-line errors for anything else."""
    training = data.get("training")
    if not isinstance(training, list):
        found = ", ".join(sorted(map(str, data))) or "none"
        raise HySparKError(f"datalist {source} has no 'training' list (keys: {found})", FORMAT_HELP)
    entries, no_fold = [], 0
    for k, entry in enumerate(training):
        image = entry.get("image") if isinstance(entry, dict) else None
        if isinstance(image, list) and image:  # several channels: the first names the case
            image = image[0]
        if not isinstance(image, str):
            raise HySparKError(f"datalist {source}: training entry {k} has no 'image' path", FORMAT_HELP)
        fold = entry.get("fold")
        if isinstance(fold, str) and fold.isdigit():
            fold = int(fold)
        if fold is None:
            no_fold += 1
        elif isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise HySparKError(f"datalist {source}: training entry {k} ({image}) has fold {fold!r}",
                               "folds are numbers 0..K-1")
        entries.append((image, fold))
    if not entries or no_fold == len(entries):
        fixed = ("; its 'validation' list is one fixed split: write it as nnU-Net's splits_final.json with one "
                 '{"train": [...], "val": [...]} entry' if isinstance(data.get("validation"), list) else "")
        raise HySparKError(f"datalist {source} has no folds ({len(entries)} training entries, none with 'fold')",
                           FORMAT_HELP + fixed)
    if no_fold:
        example = next(img for img, f in entries if f is None)
        raise HySparKError(f"datalist {source}: {no_fold} of {len(entries)} training entries have no 'fold' "
                           f"(e.g. {example})", "give every training entry a fold")
    return entries


def _examples(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def datalist_assignment(data: dict, source: str, case_ids: Sequence[str], case_id_pattern: str | None = None,
                        allow_partial: bool = False) -> dict[str, list[int]]:
    """case id -> the folds its entries name (a case named twice is the caller's error to report)."""
    pattern = compile_pattern(case_id_pattern)
    known = set(case_ids)
    assignment: dict[str, list[int]] = {}
    unmatched: list[str] = []
    for image, fold in _entries(data, source):
        case = case_from_image(image, known, pattern)
        if case is None:
            unmatched.append(image)
        else:
            assignment.setdefault(case, []).append(fold)
    missing = sorted(known - set(assignment))
    if unmatched or missing:
        what = (f"{len(unmatched)} entr{'y names' if len(unmatched) == 1 else 'ies name'} no case of the dataset"
                + (f" (e.g. {_examples(unmatched)})" if unmatched else "")
                + f" and {len(missing)} dataset case(s) have no entry"
                + (f" (e.g. {_examples(missing)})" if missing else ""))
        how = ("--case-id-pattern REGEX maps other file names to case ids"
               + (", or pass --allow-partial-splits to use only the cases both name" if assignment else ""))
        if not assignment or not allow_partial:
            raise HySparKError(f"datalist {source}: {what}", how)
        print(f"warning: datalist {source}: {what}; --allow-partial-splits: using the {len(assignment)} "
              "case(s) both name", file=sys.stderr)
    return assignment
