"""nnU-Net's steps as ``hyspark_plan_and_preprocess`` runs them: fingerprint, plans transfer, and the
preprocessing of unlabeled image collections.

Unlabeled image collections (``imagesTr`` only; pre-training data) are preprocessed with the plans of
a labelled dataset (``--plans-from``): the plans are copied like ``nnUNetv2_move_plans_between_datasets``
does (same spacing, same normalisation including the source's CT intensity statistics, same data
identifiers), then every image goes through nnU-Net's ``DefaultPreprocessor`` without a segmentation.
The files written are those of nnU-Net's dataset class (``<case>.b2nd``, ``<case>_seg.b2nd``,
``<case>.pkl``); the seg array is nnU-Net's own "no segmentation" map: 0 inside the non-zero region of
the image, -1 outside; ``class_locations`` is empty.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence


def fingerprint(name: str, num_processes: int, clean: bool, replace_value: float | None = None) -> None:
    """nnU-Net's dataset fingerprint (kept if it exists, unless ``clean``); ``replace_value``: NaN/inf voxels
    are read as this value (planning/finite.py), so the CT intensity statistics stay finite."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe

    fpe = fe.DatasetFingerprintExtractor(name, num_processes, verbose=False)
    if replace_value is None:
        fpe.run(overwrite_existing=clean)
        return
    from nnunet_hyspark.planning.finite import replacing_reader

    determine = fe.determine_reader_writer_from_dataset_json  # nnU-Net's run() looks it up in its module
    fe.determine_reader_writer_from_dataset_json = lambda *a, **k: replacing_reader(determine(*a, **k), replace_value)
    try:
        fpe.run(overwrite_existing=clean)
    finally:
        fe.determine_reader_writer_from_dataset_json = determine


def transfer_plans(source: str, target: str, plans_name: str, pre: str, raw: str) -> None:
    """nnU-Net's move_plans_between_datasets (same plans name), plus the target's dataset.json."""
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    os.makedirs(os.path.join(pre, target), exist_ok=True)
    move_plans_between_datasets(source, target, plans_name, plans_name)
    shutil.copy(os.path.join(raw, target, "dataset.json"), os.path.join(pre, target, "dataset.json"))


def preprocess_labelled(name: str, plans_name: str, configurations: Sequence[str], num_processes: int,
                        replace_value: float | None = None) -> None:
    """nnU-Net's preprocess_dataset; with ``replace_value`` its preprocessor replaces NaN/inf (planning/finite.py)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    from nnunet_hyspark import nnunet_compat as compat

    if replace_value is None:
        preprocess_dataset(compat.dataset_id(name), plans_name, configurations, [num_processes], verbose=False)
        return
    from nnunet_hyspark.planning.finite import preprocessor_for

    pm = compat.load_plans_manager(name, plans_name)
    for c in configurations:
        preprocessor_for(pm.get_configuration(c), replace_value).run(name, c, plans_name, num_processes)
    _copy_ground_truth(name)


def _copy_ground_truth(name: str) -> None:
    """What preprocess_dataset does after preprocessing: the labels into gt_segmentations (for validation)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw = os.path.join(os.environ["nnUNet_raw"], name)
    gt = os.path.join(os.environ["nnUNet_preprocessed"], name, "gt_segmentations")
    os.makedirs(gt, exist_ok=True)
    dataset_json = load_json(os.path.join(raw, "dataset.json"))
    for k, case in get_filenames_of_train_images_and_targets(raw, dataset_json).items():
        shutil.copy(case["label"], os.path.join(gt, k + dataset_json["file_ending"]))


def _preprocess_unlabeled_case(output_truncated: str, image_files: list, plans: dict, configuration: str,
                               dataset_json: dict, replace_value: float | None = None) -> None:
    """nnU-Net's DefaultPreprocessor.run_case_save without a segmentation; class_locations left empty."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_hyspark.planning.finite import preprocessor_for

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = preprocessor_for(configuration_manager, replace_value)
    preprocessor.run_case_save(output_truncated, image_files, None, plans_manager, configuration_manager,
                               dataset_json)
    # nnU-Net's data loader reads class_locations; no label -> no foreground: random crops
    properties = load_pickle(output_truncated + ".pkl")
    properties["class_locations"] = {c: [] for c in plans_manager.get_label_manager(dataset_json).foreground_labels}
    write_pickle(properties, output_truncated + ".pkl")


def preprocess_unlabeled(name: str, plans_file: str, configurations: Sequence[str], cases: dict,
                         num_processes: int, pre: str, replace_value: float | None = None) -> None:
    """Every case of an unlabeled collection through nnU-Net's preprocessor, one configuration at a time."""
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
        jobs = [(os.path.join(out, k), cases[k]["images"], plans, c, dataset_json, replace_value)
                for k in sorted(cases)]
        print(f"Preprocessing {len(jobs)} unlabeled cases of {name}, configuration {c} -> {out}")
        if num_processes == 1:
            for job in tqdm(jobs, desc="Preprocessing cases"):
                _preprocess_unlabeled_case(*job)
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                pool.starmap(_preprocess_unlabeled_case, jobs)
