"""Reading the preprocessed datasets to pre-train on: plans, data folder, cases, and their compatibility.

Datasets, plans and configurations are found through :mod:`nnunet_hyspark.nnunet_compat` (nnU-Net's
``PlansManager`` resolves ``inherits_from``). Several datasets can be pooled only when one voxel means the
same thing in all of them: same spacing, same normalisation schemes, and for CT channels the same clip values
/ mean / std (otherwise one HU maps to different network inputs) -- the same rule that fine-tuning applies to
pre-trained weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.patch_rules import check_patch_multiple
from nnunet_hyspark.pretraining.data.config import DEFAULT_PATCH_MULTIPLE, PretrainDataConfig

#: The foreground intensity properties nnU-Net's CTNormalization uses (clip bounds, then z-score).
CT_KEYS = compat.CT_KEYS


@dataclass
class Source:
    """One preprocessed dataset: where it is, its plans / resolved configuration, nnU-Net's dataset object."""

    dataset_id: int | str
    name: str
    root: str  # preprocessed dataset folder (plans, dataset.json)
    folder: str  # preprocessed data folder (<data_identifier>)
    plans_file: str
    plans: dict
    config: dict  # resolved configuration
    dataset: Any  # nnU-Net dataset object
    identifiers: list[str]


def load_source(cfg: PretrainDataConfig, preprocessed: str, dataset_id: int | str) -> Source:
    """Plans, resolved configuration and nnU-Net dataset object of one preprocessed dataset (HySparKError
    naming the command to run when something is missing).

    Only ``preprocessed`` is searched for the dataset (not nnUNet_raw / nnUNet_results): pre-training reads
    preprocessed data, and a dataset that exists only raw must be planned first.
    """
    hint = compat.plan_hint(dataset_id, cfg.configuration, cfg.plans_identifier)
    root = compat.preprocessed_dir(dataset_id, preprocessed)
    if not root.is_dir():  # a DatasetXXX_Name given by name is not looked up
        raise HySparKError(f"preprocessed dataset {root.name} not found in {preprocessed}",
                           compat.plan_hint(dataset_id))
    pm = compat.load_plans_manager(dataset_id, cfg.plans_identifier, preprocessed, hint=hint)
    plans_file = str(compat.plans_file(dataset_id, cfg.plans_identifier, preprocessed))
    compat.check_configuration(pm, cfg.configuration, dataset_id, cfg.plans_identifier, hint)
    try:  # plain dict: the configuration may lack nnU-Net's ``architecture`` entry (hand-written plans)
        conf = compat.configuration_dict(pm, cfg.configuration)
    except (ValueError, RuntimeError) as e:  # nnU-Net's errors for a missing / circular inherits_from parent
        raise HySparKError(f"configuration {cfg.configuration!r} in {plans_file}: {e}", hint) from None
    for key in ("data_identifier", "patch_size", "spacing", "normalization_schemes"):
        if key not in conf:
            raise HySparKError(f"configuration {cfg.configuration!r} in {plans_file} has no {key!r}", hint)
    folder = os.path.join(root, conf["data_identifier"])
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise HySparKError(f"preprocessed data folder {folder} is missing or empty",
                           compat.plan_hint(dataset_id, cfg.configuration))
    try:
        ds_class = infer_dataset_class(folder)
    except (AssertionError, KeyError) as e:
        raise HySparKError(f"cannot tell the nnU-Net dataset format of {folder} ({e})",
                           f"remove stray files or re-run `hyspark_plan_and_preprocess -d {dataset_id}`") from None
    identifiers = sorted(ds_class.get_identifiers(folder))
    if not identifiers:
        raise HySparKError(f"no preprocessed cases in {folder}", compat.plan_hint(dataset_id, cfg.configuration))
    dataset = ds_class(folder, list(identifiers))
    return Source(dataset_id, root.name, str(root), folder, plans_file, pm.plans, conf, dataset, identifiers)


def load_sources(cfg: PretrainDataConfig, preprocessed: str) -> list[Source]:
    """Every dataset of ``cfg.dataset_ids``, each listed once and all compatible with the first."""
    sources = [load_source(cfg, preprocessed, d) for d in cfg.dataset_ids]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise HySparKError(f"dataset listed twice: {names}", "list every dataset once")
    check_compatible(sources)
    return sources


def fg_props(src: Source) -> dict:
    """The plans' foreground intensity properties per channel (older plans name the key by modality)."""
    plans = src.plans
    return plans.get("foreground_intensity_properties_per_channel",
                     plans.get("foreground_intensity_properties_by_modality", {})) or {}


def check_compatible(sources: list[Source]) -> None:
    """Several datasets must share spacing and intensity normalisation: the one plans-compatibility rule of
    :mod:`nnunet_hyspark.nnunet_compat` (HySparKError naming what differs)."""
    ref = sources[0]
    for src in sources[1:]:
        compat.check_plans_compatible(
            compat.Preprocessing.from_plans(ref.plans, ref.config), compat.Preprocessing.from_plans(src.plans, src.config),
            f"dataset {ref.name}", f"dataset {src.name}",
            hint="plan them with the same plans (hyspark_plan_and_preprocess -d ID --plans-from SOURCE_ID) or "
                 "pre-train on them separately")


def check_patch_size(patch_size: Sequence[int], origin: str,
                     multiple: int = DEFAULT_PATCH_MULTIPLE) -> tuple[int, int, int]:
    """A 3D patch whose every axis is a positive multiple of ``multiple`` (else HySparKError naming ``origin``)."""
    return check_patch_multiple(patch_size, multiple, origin,
                                hint="use e.g. {lo} or {hi} for axis {axis} (PretrainDataConfig.patch_size), or "
                                     "re-plan with hyspark_plan_and_preprocess")


def num_input_channels(sources: list[Source]) -> int:
    """The number of input channels, the same in every dataset (checked on each first case: a cheap lazy open)."""
    channels = set()
    for s in sources:
        data = s.dataset.load_case(s.identifiers[0])[0]
        if len(data.shape) != 4:
            raise HySparKError(f"{s.folder}: case data has shape {tuple(data.shape)}, expected (C, X, Y, Z)",
                               "pre-training needs a 3D configuration (e.g. 3d_fullres)")
        channels.add(int(data.shape[0]))
    if len(channels) != 1:
        raise HySparKError(f"datasets {[s.name for s in sources]} have different numbers of input channels "
                           f"{sorted(channels)}", "pre-train on datasets with the same channels")
    return channels.pop()


def body_threshold_to_normalized(hu: float, props: dict) -> float:
    """Map a HU threshold to nnU-Net CT-normalised units (clip to the 0.5/99.5 percentiles, z-score)."""
    lo, hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
    mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
    return (min(max(float(hu), lo), hi) - mean) / std


def body_rule(cfg: PretrainDataConfig, ref: Source) -> tuple[str | None, float | None, float | None]:
    """How crops find the body in the data of ``ref``: ``(mode, value, threshold in normalised units)``.

    mode None: uniform crops; "fixed": ``value`` is a normalised threshold (CT with intensity properties);
    "percentile": ``value`` is the percentile of each volume's own intensities (other normalisations).
    """
    if cfg.body_threshold is None:
        return None, None, None
    schemes = list(ref.config["normalization_schemes"])
    fg = fg_props(ref)
    if schemes and schemes[0] == "CTNormalization" and all(k in fg.get("0", {}) for k in CT_KEYS):
        body_norm = body_threshold_to_normalized(cfg.body_threshold, fg["0"])
        # values clipped at the lower percentile sit exactly at the bound: keep them out of the body
        return "fixed", body_norm + 1e-4, body_norm
    return "percentile", float(cfg.body_percentile), None
