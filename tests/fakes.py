"""Fake inputs for tests: a tiny nnU-Net-preprocessed dataset written without running the planner."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def write_fake_preprocessed_dataset(preprocessed_dir: str, dataset_id: int = 101, name: str = "Fake",
                                    shapes: Sequence[Sequence[int]] = ((1, 40, 48, 36),) * 4,
                                    patch_size: Sequence[int] = (32, 32, 32), spacing=(1.5, 1.5, 1.5),
                                    body_fraction: float = 0.5, body_center: Sequence[float] | None = None,
                                    fg_props: dict | None = None, normalization: str = "CTNormalization",
                                    plans_identifier: str = "nnUNetHySparKPlans", configuration: str = "3d_fullres",
                                    batch_size: int = 2, seed: int = 0, labelled: bool = False) -> str:
    """Write ``DatasetXXX_Name`` as nnU-Net 2.8 preprocessing would (blosc2 cases, plans, dataset.json).

    Every case is CT-like: air (-1000 HU) around an ellipsoidal "body" (~40 HU with noise) whose radii are
    ``body_fraction`` of the volume's half-extents (centred, or at ``body_center`` given as fractions of the
    shape), z-scored with ``fg_props`` (default mean 0, std 300, clip [-1000, 1000]). Segmentations are all
    -1 (unlabeled) or a 0/1 body mask (``labelled``). Returns the dataset folder.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    fg = fg_props or {"mean": 0.0, "std": 300.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0,
                      "median": 40.0, "min": -1000.0, "max": 1000.0}
    n_ch = int(shapes[0][0])
    root = os.path.join(preprocessed_dir, f"Dataset{int(dataset_id):03d}_{name}")
    data_identifier = f"{plans_identifier}_{configuration}"
    folder = os.path.join(root, data_identifier)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(shapes):
        shape = tuple(int(s) for s in shape)
        sp = shape[1:]
        centre = [(c if body_center is None else body_center[d]) * s for d, (s, c) in
                  enumerate(zip(sp, (0.5, 0.5, 0.5)))]
        radii = [max(body_fraction * s / 2, 0.5) for s in sp]
        grids = np.ogrid[tuple(slice(0, s) for s in sp)]
        r2 = sum(((g + 0.5 - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        body = r2 <= 1.0
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, sp)
        if normalization == "CTNormalization":
            img = (np.clip(hu, fg["percentile_00_5"], fg["percentile_99_5"]) - fg["mean"]) / fg["std"]
        else:
            img = (hu - hu.mean()) / hu.std()
        data = np.repeat(img[None].astype(np.float32), shape[0], axis=0)
        seg = (body[None].astype(np.int8) if labelled else -np.ones((1, *sp), np.int8))
        blocks, chunks = comp_blosc2_params(data.shape, patch_size, bytes_per_pixel=4)
        bseg, cseg = comp_blosc2_params(seg.shape, patch_size, bytes_per_pixel=1)
        props = {"spacing": list(spacing), "shape_before_cropping": sp, "shape_after_cropping_and_before_resampling": sp,
                 "class_locations": {}}
        nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(folder, f"{name}_{i:03d}"), chunks=chunks,
                                      blocks=blocks, chunks_seg=cseg, blocks_seg=bseg)
    plans = {
        "dataset_name": os.path.basename(root),
        "plans_name": plans_identifier,
        "original_median_spacing_after_transp": list(spacing),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: {
            "data_identifier": data_identifier,
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch_size,
            "patch_size": list(patch_size),
            "spacing": list(spacing),
            "normalization_schemes": [normalization] * n_ch,
            "use_mask_for_norm": [False] * n_ch,
        }},
        "experiment_planner_used": "fake",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(fg) for c in range(n_ch)},
    }
    with open(os.path.join(root, plans_identifier + ".json"), "w") as f:
        json.dump(plans, f, indent=2)
    dataset_json = {"channel_names": {str(c): "CT" for c in range(n_ch)}, "labels": {"background": 0, "body": 1},
                    "numTraining": len(shapes), "file_ending": ".nii.gz"}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return root


def run_benchmark_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``hyspark_benchmark`` in-process; return (exit status, stdout, stderr). A SystemExit (argparse, or a
    subcommand's non-zero status) becomes its code."""
    from nnunet_hyspark.cli.benchmark import main

    try:
        status = main(args)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status or 0, out, err


def write_fake_nnunet_tree(root, dataset: str, cases: Sequence[str], plans: dict, configuration: str = "3d_fullres",
                           monkeypatch=None) -> dict:
    """Raw images (empty files), dataset.json, the given plans (name -> plans JSON), each with its configuration's
    preprocessed folder marked complete, and an empty results folder; with ``monkeypatch`` the nnU-Net env vars
    point at them. Returns the three roots."""
    from pathlib import Path

    from nnunet_hyspark.planning import completeness

    root = Path(root)
    raw, pre, res = root / "raw", root / "preprocessed", root / "results"
    dataset_json = {"labels": {"background": 0, "liver": 1, "tumor": 2}, "file_ending": ".nii.gz",
                    "channel_names": {"0": "CT"}, "numTraining": len(cases)}
    (raw / dataset / "imagesTr").mkdir(parents=True)
    for c in cases:
        (raw / dataset / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
    for folder in (raw / dataset, pre / dataset):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    for name, content in plans.items():
        (pre / dataset / f"{name}.json").write_text(json.dumps(content))
        (pre / dataset / f"{name}_{configuration}").mkdir()
        completeness.write_marker(pre / dataset / f"{name}_{configuration}", len(cases))
    res.mkdir()
    if monkeypatch is not None:
        for k, v in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
            monkeypatch.setenv(k, str(v))
    return {"raw": raw, "pre": pre, "res": res}
