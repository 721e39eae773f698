"""Pre-training data: random body-biased crops from nnU-Net-preprocessed datasets.

The pre-training stage reads exactly the data that fine-tuning reads:
``$nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>`` of the HySparK plans
(same spacing, same intensity normalisation), through nnU-Net's own dataset
classes (``infer_dataset_class(folder)(folder, identifiers)``). Segmentations are
never used, so labelled and unlabeled preprocessed datasets both work.

Reference recipe (see ``shared/design/hyspark_method.md`` section 2): random
crops of the patch size biased to the body, ``crops_per_volume`` (4) crops cut
from each loaded volume, random flips with probabilities (0.2, 0.2, 0.1) per
axis. Optional extras on nnU-Net's batchgeneratorsv2 stack: mild rotation
(+-15 deg) / scaling (0.85-1.15) through ``SpatialTransform`` and a mild
brightness / contrast / noise jitter.

Entry points
------------
``build_pretrain_loaders(cfg) -> (train_iter, val_iter, info)``
    ``train_iter`` and ``val_iter`` yield ``torch.FloatTensor (B, C, X, Y, Z)``
    forever (``next()``); both have ``close()`` and are context managers
    (``pretrain_loaders(cfg)`` is a context manager closing both). ``val_iter`` is
    ``None`` when no case is held out.
``measure_crops_per_second(cfg, seconds)``
    throughput of the training iterator, for the benchmark command.

Design
------
*Body bias.* For every loaded volume a few hundred random voxels of channel 0
are probed; those above the body threshold are candidate crop centres (no
``argwhere`` over the whole volume). With CT normalisation the threshold is
given in HU (``body_threshold``, default -500) and converted to normalised
units with the plans' ``foreground_intensity_properties_per_channel['0']``
exactly as nnU-Net's ``CTNormalization`` does (clip to the 0.5/99.5 percentiles,
subtract the mean, divide by the std). If the HU threshold lies below the lower
clip value, "body" means "above the lower clip value". For other normalisation
schemes the threshold is the ``body_percentile`` percentile of the probed voxels
of that volume. When no probed voxel is in the body the crop falls back to a
uniform position. ``body_threshold=None`` gives uniform crops.

*Padding.* A volume smaller than the crop is padded (centred) with its own
per-channel minimum, i.e. the normalised air value for CT.

*Distributed training.* Every rank samples from the *whole* training split with
its own random streams, derived from ``SeedSequence([seed, rank, worker])``; the
train/val split itself depends on ``seed`` only, so all ranks agree on it.
Independent streams keep every rank statistically identical even when there are
fewer cases than ranks. ``shard_cases=True`` additionally gives rank ``r`` only
the training cases ``r::world_size`` (disjoint case sets). The validation
iterator is identical on all ranks (same fixed crops, same order).

*Workers.* ``num_workers=0`` generates batches in the calling process.
``num_workers>0`` uses batchgenerators' ``NonDetMultiThreadedAugmenter`` (what
nnU-Net uses) around a batchgenerators ``DataLoader`` subclass; everything handed
to the workers is picklable, so the ``spawn`` start method works too. Each
worker re-derives its random streams from its worker index (with several workers the
order in which their batches arrive is not deterministic). Call ``close()`` (or
use the context managers) to stop the workers.

*Randomness without side effects.* The batchgeneratorsv2 transforms draw from
the global numpy / torch generators; the loader swaps in its own private states
around each batch and restores the caller's afterwards, so batches are
reproducible for a seed and the training loop's random state is untouched.

*Validation.* Crops from held-out cases only, no augmentation, a fixed list of
``(case, crop position)`` entries: the positions of a case are drawn from a
generator seeded by ``(seed, case)`` the first time it is needed, then
memoised (and the crops cached in memory up to ``val_cache_mb``), so every
validation pass sees the same batches. ``len(val_iter)`` batches form one pass
(``num_val_batches`` sets it); ``val_iter.reset()`` restarts it: a loop that
draws another number of batches per validation should call ``reset()`` first.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from threadpoolctl import threadpool_limits

from nnunet_hyspark.errors import HySparKError, require_nnunet_env

__all__ = [
    "PretrainDataConfig",
    "PerAxisMirrorTransform",
    "PretrainTrainIterator",
    "PretrainValIterator",
    "build_pretrain_loaders",
    "build_pretrain_transforms",
    "pretrain_loaders",
    "measure_crops_per_second",
    "body_threshold_to_normalized",
    "write_fake_preprocessed_dataset",
    "ROTATION_DEGREES",
    "SCALING_RANGE",
]

#: Optional spatial augmentation (``rotation`` / ``scaling``): ranges and per-sample probabilities
#: (the probabilities are nnU-Net's defaults, the ranges milder than nnU-Net's).
ROTATION_DEGREES = 15.0
ROTATION_PROBABILITY = 0.2
SCALING_RANGE = (0.85, 1.15)
SCALING_PROBABILITY = 0.2
#: Optional intensity jitter (``intensity_jitter``): ranges and per-sample probabilities.
BRIGHTNESS_RANGE = (0.9, 1.1)
CONTRAST_RANGE = (0.9, 1.1)
NOISE_VARIANCE = (0.0, 0.05)
JITTER_PROBABILITY = 0.15
NOISE_PROBABILITY = 0.1

_DIVISOR = 16  # every patch axis must be a multiple of the encoder's total stride
_AXES = "xyz"
_PROBES_PER_ROUND = 512  # random voxels probed per round when looking for body voxels
_PROBE_ROUNDS = 16
_PERCENTILE_PROBES = 4096
_SPLIT_STREAM = 0x5EED_5917  # stream keys for SeedSequence, so split / val / train never share randomness
_VAL_STREAM = 0x5EED_7A11


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class PretrainDataConfig:
    """What to read and how to crop / augment it for pre-training.

    dataset_ids: nnU-Net dataset ids (``101``) or folder names (``"Dataset101_Fake"``); several datasets
        must share spacing and normalisation.
    configuration / plans_identifier: which plans configuration's preprocessed data to read.
    patch_size: crop size (x, y, z); ``None`` = the plans' patch size of the first dataset. Every axis must
        be a multiple of ``patch_multiple`` (16, the hybrid encoder's stride; a ViT method passes its own).
    batch_size: ``None`` = the plans' batch size of the first dataset.
    crops_per_volume: crops cut from each loaded volume (reference: 4); consecutive batches may share volumes.
    body_threshold: body threshold in HU for CT normalisation (default -500); ``None`` = uniform crops.
    body_percentile: for non-CT normalisation (or CT plans without intensity properties), the percentile of a
        volume's own intensities above which a voxel counts as body.
    val_fraction / num_val_cases: held-out cases (over all datasets together, by ``seed``); at least one when
        there are >= 2 cases, unless ``val_fraction == 0`` or ``num_val_cases == 0``.
    val_crops_per_case: fixed crop positions per held-out case. num_val_batches: length of one validation
        pass (``None`` = all held-out crops). val_cache_mb: memory for caching validation crops.
    flip_probs: flip probability per axis (x, y, z). rotation / scaling / intensity_jitter: optional mild
        augmentation (module constants give the ranges).
    num_workers: background processes; ``None`` = nnU-Net's ``get_allowed_n_proc_DA()``, 0 = in-process.
    seed / rank / world_size: randomness and distributed position (see the module docstring);
        shard_cases gives each rank a disjoint subset of the training cases.
    preprocessed_dir: ``None`` = ``$nnUNet_preprocessed``.
    pin_memory: pin batches (worker mode, CUDA only).
    """

    dataset_ids: Sequence[int | str]
    configuration: str = "3d_fullres"
    plans_identifier: str = "nnUNetHySparKPlans"
    patch_size: tuple[int, int, int] | None = None
    patch_multiple: int = _DIVISOR
    batch_size: int | None = None
    crops_per_volume: int = 4
    body_threshold: float | None = -500.0
    body_percentile: float = 50.0
    val_fraction: float = 0.1
    num_val_cases: int | None = None
    val_crops_per_case: int = 4
    num_val_batches: int | None = None
    val_cache_mb: float = 512.0
    flip_probs: tuple[float, float, float] = (0.2, 0.2, 0.1)
    rotation: bool = False
    scaling: bool = False
    intensity_jitter: bool = False
    num_workers: int | None = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shard_cases: bool = False
    preprocessed_dir: str | None = None
    pin_memory: bool = False


# --------------------------------------------------------------------------------------------------
# reading plans and datasets


@dataclass
class _Source:
    dataset_id: int | str
    name: str
    root: str  # preprocessed dataset folder (plans, dataset.json)
    folder: str  # preprocessed data folder (<data_identifier>)
    plans_file: str
    plans: dict
    config: dict  # resolved configuration
    dataset: Any  # nnU-Net dataset object
    identifiers: list[str]


def _plan_hint(dataset_id, configuration: str | None = None, plans_identifier: str | None = None) -> str:
    c = f" -c {configuration}" if configuration and configuration != "3d_fullres" else ""
    p = f" --plans-name {plans_identifier}" if plans_identifier and plans_identifier != "nnUNetHySparKPlans" else ""
    return f"run `hyspark_plan_and_preprocess -d {dataset_id}{c}{p}` first"


def _find_dataset_root(preprocessed: str, dataset_id: int | str) -> tuple[str, str]:
    if isinstance(dataset_id, str) and not dataset_id.strip().isdigit():
        name = dataset_id.strip()
        root = os.path.join(preprocessed, name)
        if not os.path.isdir(root):
            raise HySparKError(f"preprocessed dataset {name} not found in {preprocessed}", _plan_hint(name))
        return name, root
    did = int(dataset_id)
    prefix = f"Dataset{did:03d}_"
    names = sorted(d for d in os.listdir(preprocessed) if d.startswith(prefix)
                   and os.path.isdir(os.path.join(preprocessed, d))) if os.path.isdir(preprocessed) else []
    if not names:
        raise HySparKError(f"no preprocessed dataset with id {did} (Dataset{did:03d}_*) in {preprocessed}",
                           _plan_hint(did))
    if len(names) > 1:
        raise HySparKError(f"several preprocessed datasets with id {did} in {preprocessed}: {names}",
                           "remove or rename the stale one(s)")
    return names[0], os.path.join(preprocessed, names[0])


def _resolve_configuration(plans: dict, name: str, plans_file: str, dataset_id) -> dict:
    confs = plans.get("configurations", {})
    if name not in confs:
        raise HySparKError(f"configuration {name!r} not in {plans_file} (available: {sorted(confs)})",
                           _plan_hint(dataset_id, name))
    conf = dict(confs[name])
    seen = {name}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in confs:
            raise HySparKError(f"configuration {name!r} in {plans_file} inherits from a missing or circular "
                               f"parent {parent!r}", _plan_hint(dataset_id, name))
        seen.add(parent)
        merged = dict(confs[parent])
        merged.update(conf)
        conf = merged
    for key in ("data_identifier", "patch_size", "spacing", "normalization_schemes"):
        if key not in conf:
            raise HySparKError(f"configuration {name!r} in {plans_file} has no {key!r}", _plan_hint(dataset_id, name))
    return conf


def _load_source(cfg: PretrainDataConfig, preprocessed: str, dataset_id) -> _Source:
    name, root = _find_dataset_root(preprocessed, dataset_id)
    plans_file = os.path.join(root, cfg.plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise HySparKError(f"plans {cfg.plans_identifier}.json not found in {root}",
                           _plan_hint(dataset_id, cfg.configuration, cfg.plans_identifier))
    with open(plans_file) as f:
        plans = json.load(f)
    conf = _resolve_configuration(plans, cfg.configuration, plans_file, dataset_id)
    folder = os.path.join(root, conf["data_identifier"])
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise HySparKError(f"preprocessed data folder {folder} is missing or empty",
                           _plan_hint(dataset_id, cfg.configuration))
    try:
        ds_class = infer_dataset_class(folder)
    except (AssertionError, KeyError) as e:
        raise HySparKError(f"cannot tell the nnU-Net dataset format of {folder} ({e})",
                           f"remove stray files or re-run `hyspark_plan_and_preprocess -d {dataset_id}`") from None
    identifiers = sorted(ds_class.get_identifiers(folder))
    if not identifiers:
        raise HySparKError(f"no preprocessed cases in {folder}", _plan_hint(dataset_id, cfg.configuration))
    dataset = ds_class(folder, list(identifiers))
    return _Source(dataset_id, name, root, folder, plans_file, plans, conf, dataset, identifiers)


def _fg_props(src: _Source) -> dict:
    plans = src.plans
    return plans.get("foreground_intensity_properties_per_channel",
                     plans.get("foreground_intensity_properties_by_modality", {})) or {}


_CT_KEYS = ("percentile_00_5", "percentile_99_5", "mean", "std")


def _check_compatible(sources: list[_Source]) -> None:
    """Several datasets must share spacing and intensity normalisation (else HySparKError)."""
    ref = sources[0]
    for src in sources[1:]:
        a, b = np.asarray(ref.config["spacing"], float), np.asarray(src.config["spacing"], float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-6):
            raise HySparKError(
                f"datasets {ref.name} and {src.name} have different spacings in their plans "
                f"({list(a)} vs {list(b)}); pre-training data must share one spacing",
                "plan them with the same target spacing or pre-train on them separately")
        if list(ref.config["normalization_schemes"]) != list(src.config["normalization_schemes"]):
            raise HySparKError(
                f"datasets {ref.name} and {src.name} use different normalisation schemes "
                f"({ref.config['normalization_schemes']} vs {src.config['normalization_schemes']})",
                "pre-train on datasets with the same channels and normalisation")
        for c, scheme in enumerate(ref.config["normalization_schemes"]):
            if scheme != "CTNormalization":
                continue
            pa, pb = _fg_props(ref).get(str(c), {}), _fg_props(src).get(str(c), {})
            for key in _CT_KEYS:
                va, vb = pa.get(key), pb.get(key)
                if va is None or vb is None or not math.isclose(float(va), float(vb), rel_tol=1e-4, abs_tol=1e-4):
                    raise HySparKError(
                        f"datasets {ref.name} and {src.name} normalise CT channel {c} differently "
                        f"(foreground_intensity_properties_per_channel['{c}']['{key}']: {va} vs {vb}), "
                        f"so the same HU would map to different network inputs",
                        "plan them with shared CT intensity properties or pre-train on them separately")


def _check_patch_size(patch_size, origin: str, multiple: int = _DIVISOR) -> tuple[int, int, int]:
    ps = tuple(int(p) for p in patch_size)
    if len(ps) != 3:
        raise HySparKError(f"patch size {ps} ({origin}) is not 3D", "HySparK pre-training needs a 3D patch (x, y, z)")
    for ax, p in enumerate(ps):
        if p <= 0 or p % multiple:
            lo, hi = max(multiple, p // multiple * multiple), (p // multiple + 1) * multiple
            raise HySparKError(
                f"patch size {list(ps)} ({origin}): axis {ax} ({_AXES[ax]}) = {p} is not a multiple of {multiple}",
                f"use e.g. {lo} or {hi} for axis {ax} (PretrainDataConfig.patch_size), or re-plan with "
                f"hyspark_plan_and_preprocess")
    return ps


def body_threshold_to_normalized(hu: float, props: dict) -> float:
    """Map a HU threshold to nnU-Net CT-normalised units (clip to the 0.5/99.5 percentiles, z-score)."""
    lo, hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
    mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
    return (min(max(float(hu), lo), hi) - mean) / std


# --------------------------------------------------------------------------------------------------
# transforms


class PerAxisMirrorTransform(MirrorTransform):
    """batchgeneratorsv2 ``MirrorTransform`` with an independent flip probability per spatial axis.

    (``MirrorTransform`` itself flips each allowed axis with probability 0.5.)
    """

    def __init__(self, probabilities: Sequence[float]):
        probs = tuple(float(p) for p in probabilities)
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise HySparKError(f"flip probabilities {probs} must lie in [0, 1]")
        super().__init__(allowed_axes=tuple(i for i, p in enumerate(probs) if p > 0))
        self.probabilities = probs

    def get_parameters(self, **data_dict) -> dict:
        r = torch.rand(len(self.probabilities))
        return {"axes": [i for i, p in enumerate(self.probabilities) if r[i].item() < p]}


def build_pretrain_transforms(patch_size: Sequence[int], flip_probs: Sequence[float] = (0.2, 0.2, 0.1),
                              rotation: bool = False, scaling: bool = False, intensity_jitter: bool = False
                              ) -> tuple[BasicTransform | None, tuple[int, int, int]]:
    """Per-sample training transforms (image only) and the crop size to cut before them.

    With rotation / scaling a larger crop is cut (nnU-Net's ``get_patch_size``) and ``SpatialTransform``
    resamples its centre to ``patch_size``; otherwise the crop already has the patch size.
    Returns ``(transform or None, crop_size)``.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(flip_probs) != len(patch_size):
        raise HySparKError(f"flip_probs {tuple(flip_probs)} needs one probability per axis ({len(patch_size)})")
    transforms: list[BasicTransform] = []
    crop_size = patch_size
    if rotation or scaling:
        rot = math.radians(ROTATION_DEGREES) if rotation else 0.0
        scale_range = SCALING_RANGE if scaling else (1.0, 1.0)
        crop_size = tuple(int(max(p, c)) for p, c in
                          zip(patch_size, get_patch_size(patch_size, (-rot, rot), (-rot, rot), (-rot, rot),
                                                         scale_range)))
        transforms.append(SpatialTransform(
            patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
            p_rotation=ROTATION_PROBABILITY if rotation else 0.0, rotation=(-rot, rot),
            p_scaling=SCALING_PROBABILITY if scaling else 0.0, scaling=SCALING_RANGE,
            p_synchronize_scaling_across_axes=1, padding_mode_image="border",
        ))
    if intensity_jitter:
        transforms.append(RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast(BRIGHTNESS_RANGE), synchronize_channels=False, p_per_channel=1),
            apply_probability=JITTER_PROBABILITY))
        transforms.append(RandomTransform(ContrastTransform(
            contrast_range=BGContrast(CONTRAST_RANGE), preserve_range=True, synchronize_channels=False,
            p_per_channel=1), apply_probability=JITTER_PROBABILITY))
        transforms.append(RandomTransform(GaussianNoiseTransform(
            noise_variance=NOISE_VARIANCE, p_per_channel=1, synchronize_channels=True),
            apply_probability=NOISE_PROBABILITY))
    if any(p > 0 for p in flip_probs):
        transforms.append(PerAxisMirrorTransform(flip_probs))
    return (ComposeTransforms(transforms) if transforms else None), crop_size


# --------------------------------------------------------------------------------------------------
# cropping


class _RNGStream:
    """Private states for the global numpy / torch generators (which batchgeneratorsv2 draws from).

    ``with stream:`` swaps them in and restores the caller's states on exit.
    """

    def __init__(self, seed_seq: np.random.SeedSequence):
        s = seed_seq.generate_state(2)
        self._np_state = np.random.RandomState(int(s[0])).get_state()
        g = torch.Generator()
        g.manual_seed(int(s[1]))
        self._torch_state = g.get_state()
        self._saved = None

    def __enter__(self):
        self._saved = (np.random.get_state(), torch.get_rng_state())
        np.random.set_state(self._np_state)
        torch.set_rng_state(self._torch_state)
        return self

    def __exit__(self, *exc):
        self._np_state = np.random.get_state()
        self._torch_state = torch.get_rng_state()
        np.random.set_state(self._saved[0])
        torch.set_rng_state(self._saved[1])
        self._saved = None
        return False


def _crop_pad(vol, lbs: Sequence[int], size: Sequence[int], pad_values: np.ndarray | None) -> np.ndarray:
    """Crop ``vol[:, lbs:lbs+size]`` (numpy or lazy blosc2 array), padding outside with ``pad_values`` per channel.

    ``pad_values`` may be None when the crop lies inside the volume.
    """
    shape = vol.shape[1:]
    src, dst, inside = [], [], True
    for d in range(3):
        s0, s1 = max(lbs[d], 0), min(lbs[d] + size[d], shape[d])
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lbs[d], s1 - lbs[d]))
        inside &= s0 == lbs[d] and s1 == lbs[d] + size[d]
    region = vol[(slice(None), *src)]
    if inside:
        return np.array(region, dtype=np.float32, copy=True, order="C")
    out = np.empty((vol.shape[0], *size), dtype=np.float32)
    out[:] = np.asarray(pad_values, dtype=np.float32).reshape(-1, 1, 1, 1)
    out[(slice(None), *dst)] = region
    return out


class _CropSampler:
    """Loads volumes with nnU-Net's dataset classes and picks body-biased crop positions. Picklable."""

    def __init__(self, datasets: list, body_mode: str | None, body_value: float | None):
        self.datasets = datasets
        self.body_mode = body_mode  # None (uniform), "fixed" (normalised threshold), "percentile"
        self.body_value = body_value

    def open(self, di: int, ident: str):
        return self.datasets[di].load_case(ident)[0]  # data only; seg / properties are never used

    def load(self, di: int, ident: str) -> np.ndarray:
        data = self.open(di, ident)
        vol = np.ascontiguousarray(data[:], dtype=np.float32)
        if vol.ndim != 4:
            raise HySparKError(f"case {ident} has data of shape {vol.shape}; expected (C, X, Y, Z)",
                               "pre-training needs a 3D configuration (e.g. 3d_fullres)")
        return vol

    def body_centres(self, vol: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[int, ...]] | None:
        """``n`` crop centres among probed body voxels of channel 0, or None (-> uniform crops)."""
        if self.body_mode is None:
            return None
        flat = vol[0].reshape(-1)
        size = flat.size
        if self.body_mode == "percentile":
            thr = float(np.percentile(flat[rng.integers(0, size, _PERCENTILE_PROBES)], self.body_value))
        else:
            thr = self.body_value
        found, total = [], 0
        for _ in range(_PROBE_ROUNDS):
            idx = rng.integers(0, size, _PROBES_PER_ROUND)
            inside = idx[flat[idx] > thr]
            if inside.size:
                found.append(inside)
                total += inside.size
                if total >= 4 * n:
                    break
        if not found:
            return None
        pool = np.concatenate(found)
        chosen = rng.choice(pool, size=n, replace=pool.size < n)
        return list(zip(*(c.tolist() for c in np.unravel_index(chosen, vol.shape[1:]))))

    @staticmethod
    def lbs_from_centre(shape, centre, size) -> list[int]:
        return [min(max(int(c) - s // 2, 0), sh - s) if sh >= s else -((s - sh) // 2)
                for sh, c, s in zip(shape, centre, size)]

    @staticmethod
    def uniform_lbs(shape, size, rng: np.random.Generator) -> list[int]:
        return [int(rng.integers(0, sh - s + 1)) if sh >= s else -((s - sh) // 2) for sh, s in zip(shape, size)]

    def positions(self, vol: np.ndarray, n: int, size, rng: np.random.Generator) -> list[list[int]]:
        shape = vol.shape[1:]
        centres = self.body_centres(vol, n, rng)
        if centres is None:
            return [self.uniform_lbs(shape, size, rng) for _ in range(n)]
        return [self.lbs_from_centre(shape, c, size) for c in centres]


def _pad_values(vol: np.ndarray) -> np.ndarray:
    """Per-channel minimum of a volume (the normalised air value for CT): what crops are padded with."""
    return vol.reshape(vol.shape[0], -1).min(axis=1)


def _needs_padding(shape, lbs_list, size) -> bool:
    return any(lb < 0 or lb + s > sh for lbs in lbs_list for lb, s, sh in zip(lbs, size, shape))


# --------------------------------------------------------------------------------------------------
# training loader / iterator


class _PretrainTrainLoader(DataLoader):
    """Infinite batchgenerators DataLoader: body-biased crops, ``crops_per_volume`` per loaded volume."""

    def __init__(self, sampler: _CropSampler, cases: list[tuple[int, str]], case_names: list[str],
                 batch_size: int, crops_per_volume: int, crop_size, patch_size, num_channels: int,
                 transforms: BasicTransform | None, seed: int, rank: int):
        super().__init__(None, batch_size, 1, None, True, False, True)  # infinite=True
        self.indices = list(range(len(cases)))
        self.sampler = sampler
        self.cases = cases
        self.case_names = case_names
        self.crops_per_volume = crops_per_volume
        self.crop_size = tuple(crop_size)
        self.patch_size = tuple(patch_size)
        self.num_channels = num_channels
        self.transforms = transforms
        self.seed, self.rank = seed, rank
        self._init_streams(0)

    def _init_streams(self, thread_id: int) -> None:
        crop_ss, aug_ss = np.random.SeedSequence([self.seed, self.rank, thread_id]).spawn(2)
        self._rng = np.random.default_rng(crop_ss)
        self._aug = _RNGStream(aug_ss)
        self._pending: list[tuple[np.ndarray, str]] = []
        self.volumes_loaded = 0
        self.uniform_fallbacks = 0

    def set_thread_id(self, thread_id):  # called by batchgenerators in every worker
        super().set_thread_id(thread_id)
        self._init_streams(thread_id)

    def _refill(self) -> None:
        ci = int(self._rng.integers(len(self.cases)))
        di, ident = self.cases[ci]
        vol = self.sampler.load(di, ident)
        self.volumes_loaded += 1
        centres = self.sampler.body_centres(vol, self.crops_per_volume, self._rng)
        if centres is None:
            self.uniform_fallbacks += self.sampler.body_mode is not None
            lbs_list = [self.sampler.uniform_lbs(vol.shape[1:], self.crop_size, self._rng)
                        for _ in range(self.crops_per_volume)]
        else:
            lbs_list = [self.sampler.lbs_from_centre(vol.shape[1:], c, self.crop_size) for c in centres]
        key = self.case_names[ci]
        pad = _pad_values(vol) if _needs_padding(vol.shape[1:], lbs_list, self.crop_size) else None
        self._pending.extend((_crop_pad(vol, lbs, self.crop_size, pad), key) for lbs in reversed(lbs_list))

    def generate_train_batch(self) -> dict:
        out = torch.empty((self.batch_size, self.num_channels, *self.patch_size), dtype=torch.float32)
        keys = []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None), self._aug:
            for j in range(self.batch_size):
                if not self._pending:
                    self._refill()
                crop, key = self._pending.pop()
                img = torch.from_numpy(crop)
                if self.transforms is not None:
                    img = self.transforms(image=img)["image"]
                out[j] = img
                keys.append(key)
        return {"data": out, "keys": keys}


class PretrainTrainIterator:
    """Yields training batches ``torch.FloatTensor (B, C, X, Y, Z)`` forever; ``close()`` stops the workers.

    ``last_keys`` holds ``"DatasetName/case"`` of every sample of the last batch.
    """

    def __init__(self, loader: _PretrainTrainLoader, num_workers: int, pin_memory: bool = False):
        self.loader = loader
        self.num_workers = int(num_workers)
        self.last_keys: list[str] = []
        self._augmenter = None
        if self.num_workers > 0:
            seeds = [int(s) for s in np.random.SeedSequence([loader.seed, loader.rank, 0xA06]).generate_state(
                self.num_workers)]
            self._augmenter = NonDetMultiThreadedAugmenter(
                data_loader=loader, transform=None, num_processes=self.num_workers,
                num_cached=max(6, self.num_workers // 2), seeds=seeds, pin_memory=pin_memory, wait_time=0.002)
        self._closed = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("PretrainTrainIterator was closed")
        item = next(self._augmenter) if self._augmenter is not None else self.loader.generate_train_batch()
        self.last_keys = list(item["keys"])
        return item["data"]

    def close(self) -> None:
        """Stop background workers (idempotent)."""
        self._closed = True
        if self._augmenter is not None:
            self._augmenter._finish()
            self._augmenter = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------
# validation iterator


class PretrainValIterator:
    """Fixed validation crops from held-out cases, no augmentation, the same batches every pass.

    One pass is ``len(self)`` batches; the iterator cycles forever; ``reset()`` goes back to the first batch.
    ``last_keys`` holds ``"DatasetName/case"`` of every sample of the last batch.
    """

    def __init__(self, sampler: _CropSampler, cases: list[tuple[int, str]], case_names: list[str],
                 case_seeds: list[int], batch_size: int, crops_per_case: int, patch_size,
                 num_batches: int | None, seed: int, cache_mb: float):
        if not cases:
            raise ValueError("PretrainValIterator needs at least one case")
        self.sampler = sampler
        self.cases, self.case_names, self.case_seeds = cases, case_names, case_seeds
        self.batch_size = batch_size
        self.crops_per_case = max(1, int(crops_per_case))
        self.patch_size = tuple(patch_size)
        self.seed = seed
        # crop-major order, so a truncated pass still covers many cases
        entries = [(ci, k) for k in range(self.crops_per_case) for ci in range(len(cases))]
        n_batches = int(num_batches) if num_batches else math.ceil(len(entries) / batch_size)
        total = n_batches * batch_size
        self._entries = [entries[i % len(entries)] for i in range(total)]
        self.num_batches = n_batches
        self._memo: dict[int, tuple[list[list[int]], np.ndarray | None]] = {}
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._cache_budget = int(cache_mb * 2 ** 20)
        self._cache_bytes = 0
        self._pos = 0
        self.last_keys: list[str] = []

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return self

    def reset(self) -> None:
        self._pos = 0

    def _case_positions(self, ci: int) -> None:
        di, ident = self.cases[ci]
        vol = self.sampler.load(di, ident)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _VAL_STREAM, self.case_seeds[ci]]))
        lbs_list = self.sampler.positions(vol, self.crops_per_case, self.patch_size, rng)
        pad = _pad_values(vol) if _needs_padding(vol.shape[1:], lbs_list, self.patch_size) else None
        self._memo[ci] = (lbs_list, pad)
        for k, lbs in enumerate(lbs_list):  # the volume is in memory now: cut (and cache) all its crops
            crop = _crop_pad(vol, lbs, self.patch_size, pad)
            if self._cache_bytes + crop.nbytes <= self._cache_budget:
                self._cache[(ci, k)] = crop
                self._cache_bytes += crop.nbytes

    def _crop(self, ci: int, k: int) -> np.ndarray:
        if ci not in self._memo:
            self._case_positions(ci)
        crop = self._cache.get((ci, k))
        if crop is not None:
            return crop
        lbs_list, pad = self._memo[ci]
        di, ident = self.cases[ci]
        return _crop_pad(self.sampler.open(di, ident), lbs_list[k], self.patch_size, pad)  # partial read

    def __next__(self) -> torch.Tensor:
        b = self._pos
        self._pos = (self._pos + 1) % self.num_batches
        entries = self._entries[b * self.batch_size:(b + 1) * self.batch_size]
        with threadpool_limits(limits=1, user_api=None):
            crops = [self._crop(ci, k) for ci, k in entries]
        self.last_keys = [self.case_names[ci] for ci, _ in entries]
        return torch.from_numpy(np.stack(crops))  # a copy: callers may modify it

    def close(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --------------------------------------------------------------------------------------------------
# entry points


def _validate(cfg: PretrainDataConfig) -> None:
    if not cfg.dataset_ids:
        raise HySparKError("no dataset ids given for pre-training", "pass at least one, e.g. -d 101")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise HySparKError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    if cfg.crops_per_volume < 1:
        raise HySparKError(f"crops_per_volume must be >= 1 (got {cfg.crops_per_volume})")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise HySparKError(f"val_fraction must lie in [0, 1) (got {cfg.val_fraction})")
    if len(cfg.flip_probs) != 3 or any(not 0.0 <= float(p) <= 1.0 for p in cfg.flip_probs):
        raise HySparKError(f"flip_probs must be three probabilities in [0, 1] (got {cfg.flip_probs})")
    if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
        raise HySparKError(f"invalid distributed position rank={cfg.rank}, world_size={cfg.world_size}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise HySparKError(f"num_workers must be >= 0 (got {cfg.num_workers})")


def _split(n: int, cfg: PretrainDataConfig) -> np.ndarray:
    """Indices of the held-out cases (sorted), deterministic by seed, independent of rank."""
    if cfg.num_val_cases is not None:
        n_val = int(cfg.num_val_cases)
        if n_val < 0 or (n_val > 0 and n_val >= n):
            raise HySparKError(f"num_val_cases={n_val} leaves no training case ({n} cases in total)",
                               "use fewer validation cases")
    else:
        n_val = int(round(cfg.val_fraction * n))
        if n >= 2 and cfg.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(np.random.SeedSequence([cfg.seed, _SPLIT_STREAM])).permutation(n)
    return np.sort(perm[:n_val])


def build_pretrain_loaders(cfg: PretrainDataConfig
                           ) -> tuple[PretrainTrainIterator, PretrainValIterator | None, dict]:
    """Build the training and validation iterators for HySparK pre-training.

    Returns ``(train_iter, val_iter, info)``. ``train_iter`` / ``val_iter`` yield float32 tensors
    ``(B, C, X, Y, Z)`` forever; ``val_iter`` is None when no case is held out. ``info`` keys:
    ``datasets``, ``dataset_ids``, ``preprocessed_folders``, ``train_cases`` / ``val_cases``
    (dataset name -> case ids), ``rank_train_cases`` (what this rank samples from), ``patch_size``,
    ``crop_size`` (before spatial augmentation), ``batch_size``, ``spacing``, ``normalization_schemes``,
    ``num_input_channels``, ``foreground_intensity_properties_per_channel``, ``body_threshold_normalized``
    (None outside CT), ``body_mode``, ``num_val_batches``, ``num_workers``, ``sharding``, ``plans_identifier``,
    ``configuration``, ``data_identifier``.
    Raises HySparKError for missing preprocessed data, incompatible datasets or a bad patch size.
    """
    _validate(cfg)
    preprocessed = cfg.preprocessed_dir or require_nnunet_env(["nnUNet_preprocessed"])["nnUNet_preprocessed"]
    sources = [_load_source(cfg, preprocessed, d) for d in cfg.dataset_ids]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise HySparKError(f"dataset listed twice: {names}", "list every dataset once")
    _check_compatible(sources)
    ref = sources[0]

    if cfg.patch_size is not None:
        patch_size = _check_patch_size(cfg.patch_size, "PretrainDataConfig.patch_size", cfg.patch_multiple)
    else:
        patch_size = _check_patch_size(ref.config["patch_size"],
                                       f"'{cfg.configuration}' patch_size in {ref.plans_file}", cfg.patch_multiple)
    batch_size = int(cfg.batch_size if cfg.batch_size is not None else ref.config.get("batch_size", 2))
    if batch_size < 1:
        raise HySparKError(f"batch_size must be >= 1 (got {batch_size})")

    # number of input channels, checked on the first case of every dataset (lazy open, cheap)
    channels = set()
    for s in sources:
        data = s.dataset.load_case(s.identifiers[0])[0]
        if len(data.shape) != 4:
            raise HySparKError(f"{s.folder}: case data has shape {tuple(data.shape)}, expected (C, X, Y, Z)",
                               "pre-training needs a 3D configuration (e.g. 3d_fullres)")
        channels.add(int(data.shape[0]))
    if len(channels) != 1:
        raise HySparKError(f"datasets {names} have different numbers of input channels {sorted(channels)}",
                           "pre-train on datasets with the same channels")
    num_channels = channels.pop()

    # body threshold
    schemes = list(ref.config["normalization_schemes"])
    fg = _fg_props(ref)
    body_mode, body_value, body_norm = None, None, None
    if cfg.body_threshold is not None:
        if schemes and schemes[0] == "CTNormalization" and all(k in fg.get("0", {}) for k in _CT_KEYS):
            body_norm = body_threshold_to_normalized(cfg.body_threshold, fg["0"])
            # values clipped at the lower percentile sit exactly at the bound: keep them out of the body
            body_mode, body_value = "fixed", body_norm + 1e-4
        else:
            body_mode, body_value = "percentile", float(cfg.body_percentile)
    sampler = _CropSampler([s.dataset for s in sources], body_mode, body_value)

    # split over all datasets together, by seed only
    all_cases = [(di, ident) for di, s in enumerate(sources) for ident in s.identifiers]
    val_idx = set(_split(len(all_cases), cfg).tolist())
    train_cases = [c for i, c in enumerate(all_cases) if i not in val_idx]
    val_cases = [c for i, c in enumerate(all_cases) if i in val_idx]
    rank_cases = train_cases
    if cfg.shard_cases and cfg.world_size > 1:
        if len(train_cases) < cfg.world_size:
            raise HySparKError(f"shard_cases: {len(train_cases)} training cases for {cfg.world_size} ranks",
                               "disable shard_cases (ranks then sample all cases with their own seeds)")
        rank_cases = train_cases[cfg.rank::cfg.world_size]

    def key(c):
        return f"{names[c[0]]}/{c[1]}"

    def by_dataset(cases):
        out = {n: [] for n in names}
        for di, ident in cases:
            out[names[di]].append(ident)
        return out

    transforms, crop_size = build_pretrain_transforms(patch_size, cfg.flip_probs, cfg.rotation, cfg.scaling,
                                                      cfg.intensity_jitter)
    loader = _PretrainTrainLoader(sampler, rank_cases, [key(c) for c in rank_cases], batch_size,
                                  cfg.crops_per_volume, crop_size, patch_size, num_channels, transforms,
                                  cfg.seed, cfg.rank)
    if cfg.num_workers is None:
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
        num_workers = int(get_allowed_n_proc_DA())
    else:
        num_workers = int(cfg.num_workers)

    val_iter = None
    if val_cases:
        # per-case seeds from (dataset index, case index): stable whatever the other held-out cases are
        case_seeds = [di * 1_000_003 + sources[di].identifiers.index(ident) for di, ident in val_cases]
        val_iter = PretrainValIterator(sampler, val_cases, [key(c) for c in val_cases], case_seeds, batch_size,
                                       cfg.val_crops_per_case, patch_size, cfg.num_val_batches, cfg.seed,
                                       cfg.val_cache_mb)
    train_iter = PretrainTrainIterator(loader, num_workers, pin_memory=cfg.pin_memory)

    info = {
        "datasets": names,
        "dataset_ids": list(cfg.dataset_ids),
        "preprocessed_folders": [s.folder for s in sources],
        "train_cases": by_dataset(train_cases),
        "val_cases": by_dataset(val_cases),
        "rank_train_cases": by_dataset(rank_cases),
        "patch_size": patch_size,
        "crop_size": tuple(crop_size),
        "batch_size": batch_size,
        "crops_per_volume": cfg.crops_per_volume,
        "spacing": tuple(float(x) for x in ref.config["spacing"]),
        "normalization_schemes": schemes,
        "num_input_channels": num_channels,
        "foreground_intensity_properties_per_channel": fg,
        "body_mode": body_mode,
        "body_threshold_normalized": body_norm,
        "num_val_batches": len(val_iter) if val_iter is not None else 0,
        "num_workers": num_workers,
        "sharding": ("disjoint training cases per rank (shard_cases) + per-rank seeds" if rank_cases is not train_cases
                     else "per-rank random streams over all training cases (SeedSequence([seed, rank, worker]))"),
        "plans_identifier": cfg.plans_identifier,
        "configuration": cfg.configuration,
        "data_identifier": ref.config["data_identifier"],
    }
    return train_iter, val_iter, info


@contextlib.contextmanager
def pretrain_loaders(cfg: PretrainDataConfig):
    """``with pretrain_loaders(cfg) as (train_iter, val_iter, info):`` -- closes both on exit."""
    train_iter, val_iter, info = build_pretrain_loaders(cfg)
    try:
        yield train_iter, val_iter, info
    finally:
        train_iter.close()
        if val_iter is not None:
            val_iter.close()


def measure_crops_per_second(cfg: PretrainDataConfig, seconds: float = 10.0) -> dict:
    """Throughput of the training iterator built from ``cfg``: crops (samples) per second.

    The first batch (worker start-up, first volume) is a warm-up and is not timed; then batches are drawn
    for ``seconds``. Returns a dict: ``crops_per_second``, ``crops``, ``batches``, ``seconds``, ``batch_size``,
    ``patch_size``, ``crops_per_volume``, ``num_workers``, ``augmentation``.
    """
    with pretrain_loaders(cfg) as (train_iter, _val, info):
        next(train_iter)
        crops = batches = 0
        t0 = perf_counter()
        while True:
            b = next(train_iter)
            crops += b.shape[0]
            batches += 1
            dt = perf_counter() - t0
            if dt >= seconds:
                break
    aug = [n for n, on in (("flips", any(p > 0 for p in cfg.flip_probs)), ("rotation", cfg.rotation),
                           ("scaling", cfg.scaling), ("intensity_jitter", cfg.intensity_jitter)) if on]
    return {"crops_per_second": crops / dt, "crops": crops, "batches": batches, "seconds": dt,
            "batch_size": info["batch_size"], "patch_size": info["patch_size"],
            "crops_per_volume": info["crops_per_volume"], "num_workers": info["num_workers"],
            "augmentation": aug}


# --------------------------------------------------------------------------------------------------
# a fake preprocessed dataset (tests, benchmarks, demos without the planner)


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
