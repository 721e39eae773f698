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


def fingerprint(name: str, num_processes: int, clean: bool) -> None:
    """nnU-Net's dataset fingerprint (kept if it exists, unless ``clean``)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    fpe = DatasetFingerprintExtractor(name, num_processes, verbose=False)
    fpe.run(overwrite_existing=clean)


def transfer_plans(source: str, target: str, plans_name: str, pre: str, raw: str) -> None:
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


def preprocess_unlabeled(name: str, plans_file: str, configurations: Sequence[str], cases: dict,
                         num_processes: int, pre: str) -> None:
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
        jobs = [(os.path.join(out, k), cases[k]["images"], plans, c, dataset_json) for k in sorted(cases)]
        print(f"Preprocessing {len(jobs)} unlabeled cases of {name}, configuration {c} -> {out}")
        if num_processes == 1:
            for job in tqdm(jobs, desc="Preprocessing cases"):
                _preprocess_unlabeled_case(*job)
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                pool.starmap(_preprocess_unlabeled_case, jobs)
