"""``hyspark_plan_and_preprocess``: nnU-Net's fingerprint, HySparKPlanner, nnU-Net's preprocessing.

Labelled datasets go through nnU-Net's own steps (fingerprint extraction,
planning with :class:`~nnunet_hyspark.planners.hyspark_planner.HySparKPlanner`
instantiated directly, ``preprocess_dataset``), so the output is exactly what
``nnUNetv2_plan_and_preprocess`` would write, under the plans name
``nnUNetHySparKPlans``.

Unlabeled image collections (``imagesTr`` only; pre-training data) are
preprocessed with the plans of a labelled dataset (``--plans-from``): the plans
are copied like ``nnUNetv2_move_plans_between_datasets`` does (same spacing,
same normalisation including the source's CT intensity statistics, same data
identifiers), then every image goes through nnU-Net's ``DefaultPreprocessor``
without a segmentation. The files written are those of nnU-Net's dataset class
(``<case>.b2nd``, ``<case>_seg.b2nd``, ``<case>.pkl``); the seg array is
nnU-Net's own "no segmentation" map: 0 inside the non-zero region of the image,
-1 outside; ``class_locations`` is empty. An unlabeled dataset without
``--plans-from`` is refused: nnU-Net's fingerprint takes the CT intensity
statistics from labelled foreground, and pre-training must see the intensities
that fine-tuning will see.

Nothing is half-written: every input file is checked (gzip stream complete,
image header readable, image and label sizes agree) before anything is written,
and if a later step fails, the dataset's folder in ``nnUNet_preprocessed`` is put
back as it was (new files removed, replaced files restored, overwritten
configuration folders restored).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from nnunet_hyspark.errors import HySparKError, cli_entry, require_nnunet_env

PATCH_MULTIPLE = 16
SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")
BACKUP_SUFFIX = ".hyspark-previous"
#: ``--network NAME`` -> (planner module, planner class); each module defines PLANS_NAME and ARCH_PRESETS
NETWORKS = {"hyspark": ("nnunet_hyspark.planners.hyspark_planner", "HySparKPlanner"),
            "mim": ("nnunet_hyspark.planners.mim_planner", "MiMPlanner"),
            "hiend_mae": ("nnunet_hyspark.planners.hiend_mae_planner", "HiEndMAEPlanner")}


def _planner_module(network: str):
    import importlib

    return importlib.import_module(NETWORKS[network][0])


def _planner_class(network: str):
    return getattr(_planner_module(network), NETWORKS[network][1])


def build_parser() -> argparse.ArgumentParser:
    from nnunet_hyspark.planners.hyspark_planner import ARCH_PRESETS, DEFAULT_GPU_MEMORY_TARGET_GB, PLANS_NAME

    p = argparse.ArgumentParser(
        prog="hyspark_plan_and_preprocess",
        description=(
            "nnU-Net v2 fingerprint extraction, experiment planning with the HySparK hybrid CNN/ViT network "
            "(3D configurations; patch sizes multiples of 16; batch size from a GPU memory estimate) and "
            "preprocessing. Labelled datasets only need -d. Unlabeled image collections (imagesTr only, for "
            "pre-training) need --plans-from LABELLED_ID: they are preprocessed with that dataset's plans "
            "(same spacing and CT normalisation). The 2d configuration, if requested, keeps nnU-Net's plain "
            "2D U-Net."),
    )
    p.add_argument("-d", nargs="+", required=True, metavar="ID", help="dataset id(s) or name(s) in $nnUNet_raw")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], metavar="CONFIG",
                   help="configurations to preprocess (default: 3d_fullres). 3d_lowres exists only where "
                        "nnU-Net would create one")
    p.add_argument("-np", type=int, default=None, metavar="N",
                   help="processes for fingerprint extraction and preprocessing (default: nnU-Net's default, "
                        "$nnUNet_def_n_proc or 8)")
    p.add_argument("--network", choices=sorted(NETWORKS), default="hyspark",
                   help="network of the 3D configurations: hyspark = HySparKUNet (plans nnUNetHySparKPlans); "
                        "mim = MiMUNet, for MiM pre-training and nnUNetTrainerMiMFinetune (plans nnUNetMiMPlans, "
                        "patch axes multiples of 32); hiend_mae = HiEndUNETR (Hi-End-MAE ViT + UNETR decoder), for "
                        "Hi-End-MAE pre-training and nnUNetTrainerHiEndMAEFinetune (plans nnUNetHiEndMAEPlans, patch "
                        "axes multiples of --vit-patch) (default: hyspark)")
    p.add_argument("--vit-patch", type=int, choices=[12, 16], default=None,
                   help="--network hiend_mae only: the ViT patch, i.e. the patch-size multiple (default: 12)")
    arch_names = sorted(set(ARCH_PRESETS).union(*(_planner_module(n).ARCH_PRESETS for n in NETWORKS)))
    p.add_argument("--arch", choices=arch_names, default="base",
                   help="network size: base = the published network (HySparK: widths 32..384, 3 ViT blocks, 12 "
                        "heads; MiM: widths 48..384, 11 ViT blocks; Hi-End-MAE: ViT-B, 768 wide, 12 blocks); large = "
                        "Hi-End-MAE's ViT-L (1536 wide); tiny = for CPU demos and tests (default: base)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="fix the 3d_fullres patch size (multiples of 16, in the axis order of the plans, i.e. "
                        "after nnU-Net's transpose; default: chosen from the data and the memory target)")
    p.add_argument("--gpu-memory-target", type=float, default=DEFAULT_GPU_MEMORY_TARGET_GB, metavar="GB",
                   help=f"GPU memory per training process the plans may use, in GB (default "
                        f"{DEFAULT_GPU_MEMORY_TARGET_GB:g}, like nnU-Net's ResEnc-L preset; nnU-Net's plain default "
                        f"is 8 for its own, smaller network)")
    p.add_argument("--plans-name", default=None,
                   help=f"plans identifier (default {PLANS_NAME}; with --network mim nnUNetMiMPlans)")
    p.add_argument("--plans-from", default=None, metavar="SOURCE_ID",
                   help="use the plans of this (already planned) dataset instead of planning: needed for "
                        "unlabeled image collections; also works for labelled datasets, like "
                        "nnUNetv2_move_plans_between_datasets followed by preprocessing")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="accept channels other than CT (the hybrid plans and pre-training assume CT "
                        "normalisation; other channels get nnU-Net's normalisation for their name)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="run nnU-Net's dataset integrity check first (labelled datasets)")
    p.add_argument("--clean", action="store_true",
                   help="re-extract the dataset fingerprint even if one exists (like nnU-Net's --clean)")
    return p


# ------------------------------------------------------------------------------------------ validation


def _validate_args(args) -> None:
    network = getattr(args, "network", "hyspark")
    module = _planner_module(network)
    if args.plans_name is None:
        args.plans_name = module.PLANS_NAME
    if args.arch not in module.ARCH_PRESETS:
        raise HySparKError(f"--arch {args.arch} is not a preset of --network {network}",
                           f"choose one of {sorted(module.ARCH_PRESETS)}")
    vit_patch = getattr(args, "vit_patch", None)
    if vit_patch is not None and network != "hiend_mae":
        raise HySparKError(f"--vit-patch is for --network hiend_mae, not {network}", "leave out --vit-patch")
    multiple = vit_patch or _planner_class(network).patch_multiple
    if args.patch_size is not None:
        for axis, n in enumerate(args.patch_size):
            if n <= 0 or n % multiple:
                lo = max(multiple, n // multiple * multiple)
                raise HySparKError(
                    f"--patch-size {' '.join(map(str, args.patch_size))}: axis {axis} has {n} voxels, not a positive "
                    f"multiple of {multiple} (the {network} network downsamples by {multiple})",
                    f"use e.g. {lo} or {lo + multiple} on axis {axis}")
    if not args.gpu_memory_target > 0:
        raise HySparKError(f"--gpu-memory-target must be positive, got {args.gpu_memory_target:g}",
                           "give the GPU memory in GB, e.g. --gpu-memory-target 24")
    if args.np is not None and args.np < 1:
        raise HySparKError(f"-np must be at least 1, got {args.np}", "e.g. -np 4")
    if not args.plans_name or os.sep in args.plans_name:
        raise HySparKError(f"invalid plans name {args.plans_name!r}", "use a plain identifier, e.g. nnUNetHySparKPlans")


def _resolve_dataset(ident: str, raw: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(ident)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "More than one" in first:
            raise HySparKError(f"dataset id {ident} is ambiguous: {first}",
                               "keep one DatasetXXX_* folder per id in nnUNet_raw / nnUNet_preprocessed / "
                               "nnUNet_results") from None
        raise HySparKError(f"dataset {ident} not found in nnUNet_raw={raw}",
                           f"check the id (ls $nnUNet_raw), or create a dataset, e.g. "
                           f"`hyspark_synthesize -d {ident}`") from None
    if not os.path.isdir(os.path.join(raw, name)):
        raise HySparKError(f"dataset {name} has no raw data folder in nnUNet_raw={raw}",
                           "put the dataset in $nnUNet_raw in nnU-Net's raw format")
    return name


def _dataset_id(name: str) -> int:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    return convert_dataset_name_to_id(name)


def _load_dataset_json(name: str, raw: str) -> dict:
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


def _channels(dataset_json: dict) -> dict:
    return dataset_json.get("channel_names", dataset_json.get("modality"))


def _check_channels(name: str, dataset_json: dict, allow_non_ct: bool) -> None:
    if allow_non_ct:
        return
    for k, v in _channels(dataset_json).items():
        if str(v).casefold() != "ct":
            raise HySparKError(
                f"{name}: channel {k} is {v!r}, not CT; the hybrid plans and pre-training assume CT intensity "
                f"normalisation",
                "use CT data, or pass --allow-non-ct to plan it with nnU-Net's normalisation for that channel")


def _list_cases(name: str, raw: str, dataset_json: dict) -> dict:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = os.path.join(raw, name)
    if "dataset" not in dataset_json and not os.path.isdir(os.path.join(folder, "imagesTr")):
        raise HySparKError(f"{name}: no imagesTr folder in {folder}", "put the training images in imagesTr")
    cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    if not cases:
        raise HySparKError(f"{name}: no training images ending in {dataset_json['file_ending']!r} in "
                           f"{os.path.join(folder, 'imagesTr')}",
                           "check file_ending in dataset.json and the <case>_0000<ending> file names")
    n_channels = len(_channels(dataset_json))
    for k, case in cases.items():
        if len(case["images"]) != n_channels:
            raise HySparKError(f"{name}: case {k} has {len(case['images'])} image file(s), dataset.json lists "
                               f"{n_channels} channel(s)", "give every case one <case>_XXXX file per channel")
    return cases


def _is_labelled(name: str, cases: dict) -> bool:
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


def _precheck_files(name: str, cases: dict, labelled: bool, num_processes: int) -> None:
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


def _explain_failure(name: str, cases: dict, labelled: bool) -> HySparKError | None:
    """After a failed nnU-Net step: read every case fully to find a file that breaks nnU-Net's reader."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from batchgenerators.utilities.file_and_folder_operations import load_json

    try:
        dj = load_json(os.path.join(os.environ["nnUNet_raw"], name, "dataset.json"))
        first = next(iter(cases.values()))["images"][0]
        rw = determine_reader_writer_from_dataset_json(dj, first, allow_nonmatching_filename=True, verbose=False)()
    except Exception as e:  # the reader itself cannot be determined: the first file is the problem
        return HySparKError(f"{name}: cannot read {next(iter(cases.values()))['images'][0]} ({_first_line(e)})",
                            "re-export or replace this file, or remove the case from the dataset")
    for c in cases.values():
        for f in c["images"] + ([c["label"]] if labelled else []):
            try:
                if f == c.get("label"):
                    rw.read_seg(f)
                else:
                    rw.read_images([f])
            except Exception as e:
                return HySparKError(f"{name}: cannot read {f} ({_first_line(e)})",
                                    "re-export or replace this file, or remove the case from the dataset")
    return None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ------------------------------------------------------------------------------------------ rollback


class _Rollback:
    """Put a dataset's preprocessed folder back as it was if the run fails (top-level granularity)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.existed = os.path.isdir(folder)
        self.before = set(os.listdir(folder)) if self.existed else set()
        self.saved: dict[str, bytes] = {}
        self.moved: list[tuple[str, str]] = []

    def keep_file(self, path: str) -> None:
        if path not in self.saved and os.path.isfile(path):
            with open(path, "rb") as fh:
                self.saved[path] = fh.read()

    def move_aside(self, path: str) -> None:
        """Move an existing output folder out of the way (restored on failure, deleted on success)."""
        if os.path.isdir(path) and all(p != path for p, _ in self.moved):
            backup = path + BACKUP_SUFFIX
            if os.path.exists(backup):
                shutil.rmtree(backup)
            os.replace(path, backup)
            self.moved.append((path, backup))

    def rollback(self) -> None:
        if not self.existed:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        backups = {os.path.basename(b) for _, b in self.moved}
        for entry in os.listdir(self.folder):
            if entry not in self.before and entry not in backups:
                path = os.path.join(self.folder, entry)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        for path, data in self.saved.items():
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    if fh.read() == data:
                        continue
            with open(path, "wb") as fh:
                fh.write(data)
        for path, backup in reversed(self.moved):
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(backup, path)

    def commit(self) -> None:
        for _, backup in self.moved:
            shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------------------------------------ steps


def _fingerprint(name: str, num_processes: int, clean: bool) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    fpe = DatasetFingerprintExtractor(name, num_processes, verbose=False)
    fpe.run(overwrite_existing=clean)


def _transfer_plans(source: str, target: str, plans_name: str, pre: str, raw: str) -> None:
    """nnU-Net's move_plans_between_datasets (same plans name), plus the target's dataset.json."""
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    os.makedirs(os.path.join(pre, target), exist_ok=True)
    move_plans_between_datasets(source, target, plans_name, plans_name)
    shutil.copy(os.path.join(raw, target, "dataset.json"), os.path.join(pre, target, "dataset.json"))


def _preprocess_unlabeled_case(output_truncated: str, image_files: list, plans: dict, configuration: str,
                               dataset_json: dict) -> None:
    """nnU-Net's DefaultPreprocessor.run_case_save without a segmentation; class_locations left empty."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    preprocessor.run_case_save(output_truncated, image_files, None, plans_manager, configuration_manager,
                               dataset_json)
    # nnU-Net's data loader reads class_locations; no label -> no foreground: random crops
    properties = load_pickle(output_truncated + ".pkl")
    properties["class_locations"] = {c: [] for c in plans_manager.get_label_manager(dataset_json).foreground_labels}
    write_pickle(properties, output_truncated + ".pkl")


def _preprocess_unlabeled(name: str, plans_file: str, configurations: Sequence[str], cases: dict,
                          num_processes: int, pre: str) -> None:
    import multiprocessing

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    plans = load_json(plans_file)
    plans_manager = PlansManager(plans)
    dataset_json = load_json(os.path.join(pre, name, "dataset.json"))
    for c in configurations:
        out = os.path.join(pre, name, plans_manager.get_configuration(c).data_identifier)
        os.makedirs(out, exist_ok=True)
        jobs = [(os.path.join(out, k), cases[k]["images"], plans, c, dataset_json) for k in sorted(cases)]
        print(f"Preprocessing {len(jobs)} unlabeled cases of {name}, configuration {c} -> {out}")
        if num_processes == 1:
            for job in tqdm(jobs, desc="Preprocessing cases"):
                _preprocess_unlabeled_case(*job)
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                pool.starmap(_preprocess_unlabeled_case, jobs)


def _print_summary(name: str, plans_file: str, configurations: Sequence[str], notes: Sequence[str]) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_hyspark.memory import estimate_training_memory

    pm = PlansManager(load_json(plans_file))
    dataset_json = load_json(os.path.join(os.path.dirname(plans_file), "dataset.json"))
    print(f"\n{name}: plans {plans_file}")
    for c in configurations:
        if c not in pm.available_configurations:
            continue
        cm = pm.get_configuration(c)
        line = (f"  {c}: network {cm.network_arch_class_name.rsplit('.', 1)[-1]}, patch {list(cm.patch_size)}, "
                f"batch {cm.batch_size}, spacing {[round(float(s), 4) for s in cm.spacing]}")
        kw = cm.network_arch_init_kwargs
        if cm.network_arch_class_name.endswith("HySparKUNet"):
            arch = {k: kw[k] for k in ("widths", "depths", "expansions", "vit_depth", "vit_heads") if k in kw}
            est = estimate_training_memory(cm.patch_size, cm.batch_size, len(_channels(dataset_json)),
                                           max(2, len(dataset_json["labels"])), **arch)
            line += f", estimated training memory {est.total_gb:.1f} GB"
        elif cm.network_arch_class_name.endswith("MiMUNet"):
            from nnunet_hyspark.models.mim_unet import estimate_training_memory as mim_estimate

            est = mim_estimate(cm.patch_size, cm.batch_size, len(_channels(dataset_json)),
                               max(2, len(dataset_json["labels"])), **{k: v for k, v in kw.items() if k != "patch_size"})
            line += f", estimated training memory {est.total_gb:.1f} GB (pre-training reads crops of 2x the patch)"
        elif cm.network_arch_class_name.endswith("HiEndUNETR"):
            from nnunet_hyspark.models.unetr import estimate_training_memory_gb

            gb = estimate_training_memory_gb(cm.patch_size, cm.batch_size, len(_channels(dataset_json)),
                                             max(2, len(dataset_json["labels"])),
                                             **{k: v for k, v in kw.items() if k != "patch_size"})
            line += f", estimated training memory {gb:.1f} GB"
        print(line)
    for n in notes:
        print(f"  {n}")


def _run_dataset(name: str, args, env: dict, cases: dict, labelled: bool, source: str | None) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    raw, pre = env["nnUNet_raw"], env["nnUNet_preprocessed"]
    folder = os.path.join(pre, name)
    plans_file = os.path.join(folder, args.plans_name + ".json")
    tx = _Rollback(folder)
    notes: list[str] = []
    try:
        for f in ("dataset_fingerprint.json", args.plans_name + ".json", "dataset.json", "splits_final.json"):
            tx.keep_file(os.path.join(folder, f))
        if source is None:
            try:
                _fingerprint(name, args.np, args.clean)
            except Exception as e:
                err = _explain_failure(name, cases, labelled)
                if err is None:
                    raise
                raise err from e
            notes = _plan(name, args)
        else:
            _transfer_plans(source, name, args.plans_name, pre, raw)
        plans = load_json(plans_file)
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(plans)
        configurations = [c for c in args.c if c in pm.available_configurations]
        for c in args.c:
            if c not in configurations:
                print(f"INFO: configuration {c} is not in the plans of {name} (nnU-Net created none); skipping it")
        if not configurations:
            raise HySparKError(f"{name}: none of the configurations {args.c} exists in {plans_file} "
                               f"(available: {pm.available_configurations})", "choose one of those with -c")
        for c in configurations:
            tx.move_aside(os.path.join(folder, pm.get_configuration(c).data_identifier))
        try:
            if labelled:
                from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

                tx.move_aside(os.path.join(folder, "gt_segmentations"))
                preprocess_dataset(_dataset_id(name), args.plans_name, configurations, [args.np], verbose=False)
            else:
                _preprocess_unlabeled(name, plans_file, configurations, cases, args.np, pre)
        except HySparKError:
            raise
        except Exception as e:
            if "background worker" in str(e):
                raise HySparKError(f"{name}: a preprocessing worker died (out of memory?)",
                                   "use fewer processes, e.g. -np 1") from e
            err = _explain_failure(name, cases, labelled)
            if err is None:
                raise
            raise err from e
    except BaseException:
        tx.rollback()
        raise
    tx.commit()
    _print_summary(name, plans_file, configurations, notes)


def _plan(name: str, args) -> list[str]:
    planner = _planner_class(getattr(args, "network", "hyspark"))(
        name, gpu_memory_target_in_gb=args.gpu_memory_target, plans_name=args.plans_name, arch=args.arch,
        patch_size=args.patch_size, **({"vit_patch": args.vit_patch} if getattr(args, "vit_patch", None) else {}))
    planner.plan_experiment()
    for n in planner.hyspark_notes:
        print(n, file=sys.stderr)
    return planner.hyspark_notes


def _check_source(source: str, args, pre: str, targets: dict) -> None:
    """The source's plans must exist and fit the targets' channels."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    path = os.path.join(pre, source, args.plans_name + ".json")
    if not os.path.isfile(path):
        raise HySparKError(f"--plans-from {source}: no plans {path}",
                           f"plan the source first: hyspark_plan_and_preprocess -d {_dataset_id(source)}")
    plans = load_json(path)
    cfg = next(iter(plans.get("configurations", {}).values()), {})
    n_source = len(cfg.get("normalization_schemes", []))
    for name, dj in targets.items():
        n = len(_channels(dj))
        if n_source and n != n_source:
            raise HySparKError(f"{name} has {n} channel(s), the plans of {source} are for {n_source}",
                               "use a source dataset with the same channels")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate_args(args)
    env = require_nnunet_env(("nnUNet_raw", "nnUNet_preprocessed"))
    raw, pre = env["nnUNet_raw"], env["nnUNet_preprocessed"]
    if args.np is None:
        from nnunetv2.configuration import default_num_processes

        args.np = default_num_processes
    if args.plans_from is not None and args.patch_size is not None:
        raise HySparKError("--patch-size cannot be combined with --plans-from (the source's plans fix the patch)",
                           "leave out one of them")

    # 1. check every input before writing anything
    names = list(dict.fromkeys(_resolve_dataset(d, raw) for d in args.d))
    source = None
    if args.plans_from is not None:
        source = _resolve_dataset(args.plans_from, raw)
        if source in names:
            raise HySparKError(f"--plans-from {source} is also a target (-d)", "plan the source first, on its own")
    jsons, all_cases, labelled = {}, {}, {}
    for name in names:
        jsons[name] = _load_dataset_json(name, raw)
        _check_channels(name, jsons[name], args.allow_non_ct)
        all_cases[name] = _list_cases(name, raw, jsons[name])
        labelled[name] = _is_labelled(name, all_cases[name])
        if not labelled[name] and source is None:
            raise HySparKError(
                f"{name} has no labels (an image collection): its own fingerprint would have no labelled foreground "
                f"for the CT intensity statistics",
                f"preprocess it with the plans of a labelled CT dataset: hyspark_plan_and_preprocess -d "
                f"{_dataset_id(name)} --plans-from LABELLED_ID")
        _precheck_files(name, all_cases[name], labelled[name], args.np)
        if args.verify_dataset_integrity and labelled[name]:
            from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

            try:
                verify_dataset_integrity(os.path.join(raw, name), args.np)
            except Exception as e:
                raise HySparKError(f"{name}: nnU-Net's dataset integrity check failed: {_first_line(e)}",
                                   "fix the dataset (see nnU-Net's dataset_format documentation)") from None
    if source is not None:
        _check_source(source, args, pre, jsons)

    # 2. run, one dataset at a time, each all-or-nothing
    for name in names:
        _run_dataset(name, args, env, all_cases[name], labelled[name], source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
