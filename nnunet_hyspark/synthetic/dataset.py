"""Writing synthetic phantoms as an nnU-Net v2 raw dataset (``hyspark_synthesize``), atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_hyspark.errors import HySparKError, require_nnunet_env
from nnunet_hyspark.synthetic.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, LABELS, check_geometry, make_case

DEFAULT_NAME = "SyntheticCT"
DEFAULT_NAME_UNLABELED = "SyntheticCTUnlabeled"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def _check_int(value, what: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HySparKError(f"{what} must be an integer, got {value!r}", hint)
    return int(value)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net folder name ``DatasetXXX_Name``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def _write_nifti(arr_xyz: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    import SimpleITK as sitk

    # SimpleITK wants numpy arrays in (z, y, x) order; spacing/origin are (x, y, z)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(-(n - 1) / 2.0 * s) for n, s in zip(arr_xyz.shape, spacing)))
    sitk.WriteImage(img, str(path), True)


def write_dataset(root: str | os.PathLike | None, dataset_id: int, name: str | None = None,
                  num_cases: int = 8, shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] = DEFAULT_SPACING, seed: int = 0, unlabeled: bool = False,
                  force: bool = False, progress: bool = True) -> Path:
    """Write a synthetic CT dataset in nnU-Net v2 raw format and return its folder.

    Layout: ``root/DatasetXXX_Name/imagesTr/<case>_0000.nii.gz`` (int16 HU),
    ``labelsTr/<case>.nii.gz`` (uint8, :data:`LABELS`; not written when
    ``unlabeled``) and ``dataset.json``. An unlabeled dataset (labels
    ``{"background": 0}`` only) is meant for self-supervised pre-training
    collections, not for supervised nnU-Net training.

    Args:
        root: the nnU-Net raw folder; None -> ``$nnUNet_raw``.
        dataset_id: 1..999.
        name: dataset name; None -> ``SyntheticCT`` (``SyntheticCTUnlabeled``).
        num_cases: number of cases (>= 1).
        shape: voxels (x, y, z), each >= 16.
        spacing: voxel size in mm (x, y, z), positive.
        seed: non-negative; case k uses :func:`case_rng` ``(seed, k)``.
        unlabeled: write images only.
        force: replace any existing ``DatasetXXX_*`` folder with this id.
        progress: show a tqdm progress bar on stderr.

    The dataset is built in a hidden temporary sibling folder and renamed into
    place at the end; on any error the temporary folder is removed and an
    existing dataset is left untouched.

    Raises:
        HySparKError: bad arguments, missing ``nnUNet_raw``, or the dataset id
        already exists and ``force`` is False.
    """
    dataset_id = _check_int(dataset_id, "dataset id", "use an id between 1 and 999, e.g. -d 901")
    if not 1 <= dataset_id <= 999:
        raise HySparKError(f"dataset id must be between 1 and 999, got {dataset_id}",
                           "nnU-Net dataset ids have 3 digits, e.g. -d 901")
    num_cases = _check_int(num_cases, "number of cases", "e.g. --num-cases 8")
    if num_cases < 1:
        raise HySparKError(f"number of cases must be at least 1, got {num_cases}", "e.g. --num-cases 8")
    seed = _check_int(seed, "seed", "e.g. --seed 0")
    if seed < 0:
        raise HySparKError(f"seed must be non-negative, got {seed}", "e.g. --seed 0")
    shape, spacing = check_geometry(shape, spacing)
    if name is None:
        name = DEFAULT_NAME_UNLABELED if unlabeled else DEFAULT_NAME
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise HySparKError(f"invalid dataset name {name!r}",
                           "use letters, digits, '_' and '-' only, starting with a letter or digit")

    if root is None:
        root = require_nnunet_env(["nnUNet_raw"])["nnUNet_raw"]
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise HySparKError(f"output root {root} is not a folder", "point --output-root/$nnUNet_raw to a folder")
    root.mkdir(parents=True, exist_ok=True)

    existing = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*"))
    if existing and not force:
        raise HySparKError(
            f"dataset id {dataset_id} already exists in {root}: {', '.join(p.name for p in existing)}",
            "pass --force (force=True) to replace it, or choose another dataset id")

    folder_name = dataset_folder_name(dataset_id, name)
    final = root / folder_name
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".{folder_name}.tmp-{tag}"
    width = max(3, len(str(num_cases - 1)))
    done = False
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        if not unlabeled:
            (tmp / "labelsTr").mkdir()
        from tqdm import tqdm

        for k in tqdm(range(num_cases), desc=f"synthesizing {folder_name}", unit="case", disable=not progress):
            image, labels = make_case(seed, k, shape, spacing)
            case = f"{name}_{k:0{width}d}"
            _write_nifti(np.rint(image).astype(np.int16), spacing, tmp / "imagesTr" / f"{case}_0000.nii.gz")
            if not unlabeled:
                _write_nifti(labels, spacing, tmp / "labelsTr" / f"{case}.nii.gz")
        fov = [round(n * s, 2) for n, s in zip(shape, spacing)]
        meta = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0} if unlabeled else dict(LABELS),
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
            "name": name,
            "description": (
                "Synthetic abdomen-like CT phantoms (HU) generated by hyspark_synthesize"
                + (" (images only, for self-supervised pre-training collections)" if unlabeled else "")
                + f"; shape {list(shape)}, spacing {list(spacing)} mm, field of view {fov} mm, seed {seed}"
            ),
            "reference": "nnunet-hyspark synthetic data, no real patients",
            "licence": "CC0",
            "release": "1.0",
            "overwrite_image_reader_writer": "SimpleITKIO",
            "hyspark_synthetic": {"seed": seed, "shape": list(shape), "spacing": list(spacing),
                                  "unlabeled": bool(unlabeled)},
        }
        with open(tmp / "dataset.json", "w") as fh:
            json.dump(meta, fh, indent=4)
            fh.write("\n")

        # swap into place: park old datasets with this id, rename, then delete the old ones
        parked: list[tuple[Path, Path]] = []
        try:
            for p in existing:
                if p.exists() or p.is_symlink():
                    trash = root / f".{p.name}.old-{tag}"
                    os.replace(p, trash)
                    parked.append((p, trash))
            os.replace(tmp, final)
        except BaseException:
            for p, trash in reversed(parked):
                if not p.exists():
                    os.replace(trash, p)
            raise
        done = True
        for _, trash in parked:
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
    finally:
        if not done and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
