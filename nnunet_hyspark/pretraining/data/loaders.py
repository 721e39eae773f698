"""The training / validation iterators and the entry points ``build_pretrain_loaders``, ``pretrain_loaders``,
``measure_crops_per_second`` (behaviour described in the package docstring)."""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from time import perf_counter
from typing import Iterator

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from threadpoolctl import threadpool_limits

from nnunet_hyspark.errors import HySparKError, require_nnunet_env
from nnunet_hyspark.pretraining.data.config import PretrainDataConfig, validate_config
from nnunet_hyspark.pretraining.data.sampling import (
    VAL_STREAM,
    CropSampler,
    RNGStream,
    crop_pad,
    needs_padding,
    pad_values,
    split_cases,
)
from nnunet_hyspark.pretraining.data.sources import (
    body_rule,
    check_patch_size,
    fg_props,
    load_sources,
    num_input_channels,
)
from nnunet_hyspark.pretraining.data.transforms import build_pretrain_transforms

# --------------------------------------------------------------------------------------------------
# training loader / iterator


class _PretrainTrainLoader(DataLoader):
    """Infinite batchgenerators DataLoader: ``crops_per_volume`` crops per loaded volume, placed by the sampler.

    ``volumes_loaded`` and ``crop_kinds`` (kind -> crops, see ``sampling.CROP_KINDS``) count what it cut.
    """

    def __init__(self, sampler: CropSampler, cases: list[tuple[int, str]], case_names: list[str],
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
        self._aug = RNGStream(aug_ss)
        self._pending: list[tuple[np.ndarray, str]] = []
        self.volumes_loaded = 0
        self.crop_kinds: Counter = Counter()

    def set_thread_id(self, thread_id):  # called by batchgenerators in every worker
        super().set_thread_id(thread_id)
        self._init_streams(thread_id)

    def _refill(self) -> None:
        ci = int(self._rng.integers(len(self.cases)))
        di, ident = self.cases[ci]
        vol = self.sampler.load(di, ident)
        self.volumes_loaded += 1
        positions = self.sampler.positions(vol, self.crops_per_volume, self.crop_size, self._rng)
        self.crop_kinds.update(kind for _, kind in positions)
        lbs_list = [lbs for lbs, _ in positions]
        key = self.case_names[ci]
        pad = pad_values(vol) if needs_padding(vol.shape[1:], lbs_list, self.crop_size) else None
        self._pending.extend((crop_pad(vol, lbs, self.crop_size, pad), key) for lbs in reversed(lbs_list))

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

    def __init__(self, sampler: CropSampler, cases: list[tuple[int, str]], case_names: list[str],
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
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, VAL_STREAM, self.case_seeds[ci]]))
        lbs_list = [lbs for lbs, _ in self.sampler.positions(vol, self.crops_per_case, self.patch_size, rng)]
        pad = pad_values(vol) if needs_padding(vol.shape[1:], lbs_list, self.patch_size) else None
        self._memo[ci] = (lbs_list, pad)
        for k, lbs in enumerate(lbs_list):  # the volume is in memory now: cut (and cache) all its crops
            crop = crop_pad(vol, lbs, self.patch_size, pad)
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
        return crop_pad(self.sampler.open(di, ident), lbs_list[k], self.patch_size, pad)  # partial read

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


def build_pretrain_loaders(cfg: PretrainDataConfig
                           ) -> tuple[PretrainTrainIterator, PretrainValIterator | None, dict]:
    """Build the training and validation iterators for pre-training.

    Returns ``(train_iter, val_iter, info)``. ``train_iter`` / ``val_iter`` yield float32 tensors
    ``(B, C, X, Y, Z)`` forever; ``val_iter`` is None when no case is held out. ``info`` keys:
    ``datasets``, ``dataset_ids``, ``preprocessed_folders``, ``train_cases`` / ``val_cases``
    (dataset name -> case ids), ``rank_train_cases`` (what this rank samples from), ``patch_size``,
    ``crop_size`` (before spatial augmentation), ``batch_size``, ``crops_per_volume``, ``data_recipe`` (the
    :class:`DataRecipe` in use), ``spacing``, ``normalization_schemes``,
    ``num_input_channels``, ``foreground_intensity_properties_per_channel``, ``body_threshold_normalized``
    (None outside CT), ``body_mode``, ``num_val_batches``, ``num_workers``, ``sharding``, ``plans_identifier``,
    ``configuration``, ``data_identifier``.
    Raises HySparKError for missing preprocessed data, incompatible datasets or a bad patch size.
    """
    validate_config(cfg)
    preprocessed = cfg.preprocessed_dir or require_nnunet_env(["nnUNet_preprocessed"])["nnUNet_preprocessed"]
    sources = load_sources(cfg, preprocessed)
    names = [s.name for s in sources]
    ref = sources[0]

    if cfg.patch_size is not None:
        patch_size = check_patch_size(cfg.patch_size, "PretrainDataConfig.patch_size", cfg.patch_multiple)
    else:
        patch_size = check_patch_size(ref.config["patch_size"],
                                      f"'{cfg.configuration}' patch_size in {ref.plans_file}", cfg.patch_multiple)
    batch_size = int(cfg.batch_size if cfg.batch_size is not None else ref.config.get("batch_size", 2))
    if batch_size < 1:
        raise HySparKError(f"batch_size must be >= 1 (got {batch_size})")
    num_channels = num_input_channels(sources)
    body_mode, body_value, body_norm = body_rule(cfg, ref)
    recipe = cfg.recipe
    sampler = CropSampler([s.dataset for s in sources], body_mode, body_value, recipe.sampler, recipe.fg_bg_ratio)

    # split over all datasets together, by seed only
    all_cases = [(di, ident) for di, s in enumerate(sources) for ident in s.identifiers]
    val_idx = set(split_cases(len(all_cases), cfg).tolist())
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

    transforms, crop_size = build_pretrain_transforms(patch_size, recipe, rotation=cfg.rotation,
                                                      scaling=cfg.scaling, intensity_jitter=cfg.intensity_jitter)
    loader = _PretrainTrainLoader(sampler, rank_cases, [key(c) for c in rank_cases], batch_size,
                                  recipe.crops_per_volume, crop_size, patch_size, num_channels, transforms,
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
        "crops_per_volume": recipe.crops_per_volume,
        "data_recipe": recipe,
        "spacing": tuple(float(x) for x in ref.config["spacing"]),
        "normalization_schemes": list(ref.config["normalization_schemes"]),
        "num_input_channels": num_channels,
        "foreground_intensity_properties_per_channel": fg_props(ref),
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
def pretrain_loaders(cfg: PretrainDataConfig) -> Iterator[tuple[PretrainTrainIterator, PretrainValIterator | None,
                                                                 dict]]:
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
    r = cfg.recipe
    aug = [n for n, on in (("flips", any(p > 0 for p in r.flip_probs)), ("rot90", r.rot90_probability > 0),
                           ("intensity_scale_shift", r.intensity_probability > 0), ("rotation", cfg.rotation),
                           ("scaling", cfg.scaling), ("intensity_jitter", cfg.intensity_jitter)) if on]
    return {"crops_per_second": crops / dt, "crops": crops, "batches": batches, "seconds": dt,
            "batch_size": info["batch_size"], "patch_size": info["patch_size"],
            "crops_per_volume": info["crops_per_volume"], "num_workers": info["num_workers"],
            "augmentation": aug}
