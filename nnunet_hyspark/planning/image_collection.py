"""Any folder of CT as a pre-training collection: find images, check them, write an nnU-Net raw dataset.

``hyspark_plan_and_preprocess --images DIR [DIR ...] --plans-from L`` calls
:func:`collect_images` then :func:`write_raw_dataset`, then preprocesses the new
dataset exactly as ``--plans-from`` does for a hand-made one.

What counts as an image: NIfTI (``.nii.gz``, ``.nii``), NRRD (``.nrrd``, ``.nhdr``),
MetaImage (``.mha``, ``.mhd``) files, and DICOM series (one series per folder, read
through SimpleITK's GDCM series reader). Folders are searched recursively; a JSON file
holding a list of paths is accepted in place of a folder. The case name is the file
name without its ending (DICOM: the folder name), so ``img0001.nii.gz`` becomes case
``img0001`` written as ``imagesTr/img0001_0000.nii.gz``.

Nothing is half-written: the dataset is assembled in a hidden temporary folder beside
its destination and renamed into place at the end. ``.nii.gz`` files are linked, not
copied (``copy=True`` forces copies); every other format is converted to ``.nii.gz``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from nnunet_hyspark.errors import HySparKError

FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_ENDINGS = (".dcm", ".ima")  # and files without any ending, which DICOM files often have
TMP_PREFIX = ".tmp-"  # hidden temporary dataset folders in nnUNet_raw: .tmp-DatasetXXX_Name-<pid>-<random>
MAX_LISTED = 5  # problems named in one message; the rest are counted


@dataclass(frozen=True)
class FoundImage:
    """One image of the collection: a file, or a folder holding one DICOM series."""

    source: Path
    kind: str  # "nifti_gz" | "file" | "dicom"
    case: str


@dataclass
class Collection:
    images: list[FoundImage]
    problems: list[str]  # "<path>: <what is wrong>", one per skipped input


def collect_images(inputs: Sequence[str | os.PathLike], check: bool = True) -> Collection:
    """All images under ``inputs`` (folders searched recursively, or JSON lists of paths), checked to be 3D."""
    found: list[FoundImage] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix == ".json":
            found += _from_json_list(path, problems)
        elif path.is_dir():
            before = len(problems)
            images = _from_folder(path, problems)
            if not images and len(problems) == before:  # a typo'd or wrong folder: say so, do not skip it
                raise HySparKError(f"--images {path}: no images found (searched recursively for "
                                   f"{', '.join(FILE_ENDINGS)} files and DICOM series)",
                                   "check the folder, or leave it out")
            found += images
        elif path.is_file() and _ending(path) is not None:
            found.append(_file_image(path))
        else:
            raise HySparKError(f"--images {path}: no such folder or image file",
                               "give folders of CT images (NIfTI, NRRD, MHA, DICOM series) or a JSON list of paths")
    if check:
        found = [img for img in found if _keep_if_3d(img, problems)]
    found, duplicates = _drop_duplicate_cases(found)
    problems += duplicates
    return Collection(found, problems)


def write_raw_dataset(collection: Collection, dataset_id: int, name: str, raw_root: str | os.PathLike,
                      copy: bool = False, skip_unreadable: bool = False, progress: bool = True) -> Path:
    """Write ``DatasetXXX_<name>`` (images only) into ``raw_root``; returns its folder."""
    if collection.problems and not skip_unreadable:
        raise HySparKError(f"{len(collection.problems)} input(s) cannot be used: " + _examples(collection.problems),
                           "fix or remove them, or pass --skip-unreadable to leave them out")
    if not collection.images:
        raise HySparKError("no readable 3D images found in the --images inputs",
                           "give folders holding .nii.gz / .nrrd / .mha files or DICOM series")
    raw_root = Path(raw_root)
    final = raw_root / f"Dataset{dataset_id:03d}_{name}"
    clashes = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*")) if raw_root.is_dir() else []
    if clashes:
        raise HySparKError(f"dataset id {dataset_id} is taken in {raw_root} ({', '.join(clashes)})",
                           "choose another id with -d")
    # the pid in the name tells remove_stale_temporaries which temporaries belong to a living import
    tmp = raw_root / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (tmp / "imagesTr").mkdir(parents=True)
    try:
        for img in _progress(collection.images, progress, f"writing {final.name}"):
            _write_image(img, tmp / "imagesTr" / f"{img.case}_0000.nii.gz", copy)
        (tmp / "dataset.json").write_text(json.dumps(_dataset_json(collection, name), indent=4) + "\n")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def remove_stale_temporaries(raw_root: str | os.PathLike) -> list[Path]:
    """Delete temporary folders left by killed imports on this machine (their process is gone: nothing
    else writes them); those of running imports are left alone."""
    removed = []
    for p in Path(raw_root).glob(f"{TMP_PREFIX}Dataset*"):
        pid = p.name.rsplit("-", 2)[-2] if p.name.count("-") >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ----------------------------------------------------------------- finding
def _ending(path: Path) -> str | None:
    name = path.name.lower()
    return next((e for e in FILE_ENDINGS if name.endswith(e)), None)


def _case_name(stem: str) -> str:
    """File-system and nnU-Net safe: letters, digits, '-', '_' (a trailing _0000 channel suffix is dropped)."""
    stem = re.sub(r"_0000$", "", stem)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "case"


def _file_image(path: Path) -> FoundImage:
    ending = _ending(path)
    kind = "nifti_gz" if ending == ".nii.gz" else "file"
    return FoundImage(path.resolve(), kind, _case_name(path.name[: -len(ending)]))


def _from_folder(root: Path, problems: list[str]) -> list[FoundImage]:
    images = []
    def unreadable(e: OSError) -> None:  # os.walk skips folders it cannot list unless told otherwise
        problems.append(f"{e.filename}: unreadable folder ({e.strerror or e})")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs.sort()
        folder = Path(folder)
        plain = [folder / f for f in sorted(files) if _ending(folder / f) is not None]
        images += [_file_image(p) for p in plain if not p.name.lower().endswith(".raw")]
        others = [f for f in files if _ending(folder / f) is None and _maybe_dicom(f)]
        if others and not plain:
            images += _dicom_series(folder, problems)
    return images


def _maybe_dicom(file_name: str) -> bool:
    name = file_name.lower()
    return name.endswith(DICOM_ENDINGS) or ("." not in name and not name.startswith("."))


def _dicom_series(folder: Path, problems: list[str]) -> list[FoundImage]:
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr about every folder without a series
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    if not series:
        return []  # other files (notes, hidden files): not images
    if len(series) > 1:
        problems.append(f"{folder}: {len(series)} DICOM series in one folder (one series per folder is read)")
        return []
    return [FoundImage(folder.resolve(), "dicom", _case_name(folder.name))]


def _from_json_list(path: Path, problems: list[str]) -> list[FoundImage]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HySparKError(f"--images {path}: not a readable JSON list ({e})", "give a JSON list of image paths") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise HySparKError(f"--images {path}: expected a JSON list of path strings", "e.g. [\"/data/ct/a.nii.gz\"]")
    images = []
    for entry in entries:
        p = Path(entry) if os.path.isabs(entry) else path.parent / entry
        if p.is_dir():
            images += _dicom_series(p, problems)
        elif p.is_file() and _ending(p) is not None:
            images.append(_file_image(p))
        else:
            problems.append(f"{p}: listed in {path.name} but not an image file or DICOM folder")
    return images


def _keep_if_3d(img: FoundImage, problems: list[str]) -> bool:
    import SimpleITK as sitk

    try:
        if img.kind == "dicom":
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(img.source))
            dim = 3 if len(files) > 1 else 2
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(img.source))
            reader.ReadImageInformation()
            size = reader.GetSize()
            dim = len([s for s in size if s > 1]) if len(size) == 3 else len(size)
    except RuntimeError as e:
        problems.append(f"{img.source}: unreadable ({str(e).strip().splitlines()[0][:120] if str(e).strip() else e})")
        return False
    if dim != 3:
        problems.append(f"{img.source}: a {dim}D image, not a 3D volume")
        return False
    return True


def _drop_duplicate_cases(images: list[FoundImage]) -> tuple[list[FoundImage], list[str]]:
    by_case: dict[str, list[FoundImage]] = {}
    for img in images:
        by_case.setdefault(img.case, []).append(img)
    kept, problems = [], []
    for case, group in by_case.items():
        if len(group) == 1:
            kept.append(group[0])
        else:
            problems += [f"{img.source}: case name {case!r} is not unique ({len(group)} inputs)" for img in group]
    return kept, problems


# ----------------------------------------------------------------- writing
def _write_image(img: FoundImage, target: Path, copy: bool) -> None:
    if img.kind == "nifti_gz":
        if copy:
            shutil.copyfile(img.source, target)
        else:
            os.symlink(img.source, target)
        return
    import SimpleITK as sitk

    if img.kind == "dicom":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(img.source)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(img.source))
    sitk.WriteImage(image, str(target), useCompression=True)


def _dataset_json(collection: Collection, name: str) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0},
        "numTraining": len(collection.images),
        "file_ending": ".nii.gz",
        "name": name,
        "description": "CT images only (no labels), collected by hyspark_plan_and_preprocess --images for "
                       "self-supervised pre-training",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "unlabeled": True,
        "hyspark_sources": {img.case: str(img.source) for img in collection.images},
        "hyspark_skipped": collection.problems,
    }


def _examples(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED])
    return shown + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")


def _progress(items: Iterable, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image")
