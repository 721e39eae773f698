"""Checks of an nnU-Net raw dataset before anything is written (``hyspark_plan_and_preprocess`` step 1).

Every input file is checked (gzip stream complete, image header readable, image and label sizes
agree) before nnU-Net reads it, so a broken file is named in one line instead of failing a worker
half-way through; after a failed nnU-Net step, :func:`explain_failure` finds the file that broke it.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from nnunet_hyspark.errors import HySparKError

SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")


def load_dataset_json(name: str, raw: str) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    path = os.path.join(raw, name, "dataset.json")
    if not os.path.isfile(path):
        raise HySparKError(f"{name}: no dataset.json in {os.path.dirname(path)}",
                           "write one in nnU-Net v2's format (channel_names, labels, numTraining, file_ending)")
    try:
        dj = load_json(path)
    except Exception as e:
        raise HySparKError(f"{name}: dataset.json is not valid JSON ({e})", f"fix {path}") from None
    missing = [k for k in ("labels", "file_ending") if k not in dj]
    if "channel_names" not in dj and "modality" not in dj:
        missing.insert(0, "channel_names")
    if missing:
        raise HySparKError(f"{name}: dataset.json lacks {', '.join(missing)}",
                           "see nnU-Net's dataset_format documentation")
    return dj


def channels(dataset_json: dict) -> dict:
    return dataset_json.get("channel_names", dataset_json.get("modality"))


def check_channels(name: str, dataset_json: dict, allow_non_ct: bool) -> None:
    if allow_non_ct:
        return
    for k, v in channels(dataset_json).items():
        if str(v).casefold() != "ct":
            raise HySparKError(
                f"{name}: channel {k} is {v!r}, not CT; the hybrid plans and pre-training assume CT intensity "
                f"normalisation",
                "use CT data, or pass --allow-non-ct to plan it with nnU-Net's normalisation for that channel")


def list_cases(name: str, raw: str, dataset_json: dict) -> dict:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = os.path.join(raw, name)
    if "dataset" not in dataset_json and not os.path.isdir(os.path.join(folder, "imagesTr")):
        raise HySparKError(f"{name}: no imagesTr folder in {folder}", "put the training images in imagesTr")
    cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    if not cases:
        raise HySparKError(f"{name}: no training images ending in {dataset_json['file_ending']!r} in "
                           f"{os.path.join(folder, 'imagesTr')}",
                           "check file_ending in dataset.json and the <case>_0000<ending> file names")
    n_channels = len(channels(dataset_json))
    for k, case in cases.items():
        if len(case["images"]) != n_channels:
            raise HySparKError(f"{name}: case {k} has {len(case['images'])} image file(s), dataset.json lists "
                               f"{n_channels} channel(s)", "give every case one <case>_XXXX file per channel")
    return cases


def is_labelled(name: str, cases: dict) -> bool:
    """True if every case has its label file, False if none has; mixed is an error."""
    missing = [k for k, c in cases.items() if not os.path.isfile(c["label"])]
    if not missing:
        return True
    if len(missing) == len(cases):
        return False
    raise HySparKError(
        f"{name}: {len(missing)} of {len(cases)} cases have no label file (e.g. {cases[missing[0]]['label']})",
        "add the missing labels, or move those cases into a separate unlabeled dataset")


def _check_gzip(path: str) -> str | None:
    """Decompress the whole gzip stream (output discarded); return what is wrong, or None."""
    d = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as fh:
            while not d.eof:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                while chunk and not d.eof:
                    d.decompress(chunk, 1 << 24)
                    chunk = d.unconsumed_tail
    except zlib.error as e:
        return f"corrupt gzip data ({e})"
    except OSError as e:
        return f"cannot open ({e.strerror or e})"
    if not d.eof:
        return "truncated (the gzip stream ends early)"
    return None


def _check_file(path: str) -> tuple[str, str | None, tuple | None]:
    """(path, problem or None, image size or None); reads the gzip stream and the image header only."""
    if not os.path.isfile(path):
        return path, "file not found", None
    lower = path.lower()
    if lower.endswith(".gz"):
        problem = _check_gzip(path)
        if problem:
            return path, problem, None
    if lower.endswith(SITK_ENDINGS):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return path, f"unreadable image header ({lines[-1] if lines else 'SimpleITK error'})", None
        return path, None, tuple(reader.GetSize())
    return path, None, None


def precheck_files(name: str, cases: dict, labelled: bool, num_processes: int) -> None:
    """Fail before writing anything if an input file is missing, truncated, unreadable or of the wrong size."""
    files = [f for c in cases.values() for f in c["images"] + ([c["label"]] if labelled else [])]
    with ThreadPoolExecutor(max_workers=max(1, num_processes)) as ex:  # zlib and ITK release the GIL
        results = {p: (problem, size) for p, problem, size in ex.map(_check_file, files)}
    for f in files:
        problem = results[f][0]
        if problem:
            raise HySparKError(f"{name}: cannot read {f}: {problem}",
                               "re-export or replace this file, or remove the case from the dataset")
    for k, c in cases.items():
        group = c["images"] + ([c["label"]] if labelled else [])
        sizes = {f: results[f][1] for f in group if results[f][1] is not None}
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{os.path.basename(f)} {list(s)}" for f, s in sizes.items())
            raise HySparKError(f"{name}: case {k} has images/labels of different sizes: {shown}",
                               "every channel and the label of a case must have the same grid")


def explain_failure(name: str, cases: dict, labelled: bool) -> HySparKError | None:
    """After a failed nnU-Net step: read every case fully to find a file that breaks nnU-Net's reader."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from batchgenerators.utilities.file_and_folder_operations import load_json

    try:
        dj = load_json(os.path.join(os.environ["nnUNet_raw"], name, "dataset.json"))
        first = next(iter(cases.values()))["images"][0]
        rw = determine_reader_writer_from_dataset_json(dj, first, allow_nonmatching_filename=True, verbose=False)()
    except Exception as e:  # the reader itself cannot be determined: the first file is the problem
        return HySparKError(f"{name}: cannot read {next(iter(cases.values()))['images'][0]} ({first_line(e)})",
                            "re-export or replace this file, or remove the case from the dataset")
    for c in cases.values():
        for f in c["images"] + ([c["label"]] if labelled else []):
            try:
                if f == c.get("label"):
                    rw.read_seg(f)
                else:
                    rw.read_images([f])
            except Exception as e:
                return HySparKError(f"{name}: cannot read {f} ({first_line(e)})",
                                    "re-export or replace this file, or remove the case from the dataset")
    return None


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
