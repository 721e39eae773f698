"""Pre-training data: random crops from nnU-Net-preprocessed datasets, by the method's data recipe.

The pre-training stage reads exactly the data that fine-tuning reads:
``$nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>`` of the method's plans
(same spacing, same intensity normalisation), through nnU-Net's own dataset
classes (``infer_dataset_class(folder)(folder, identifiers)``). Segmentations are
never used, so labelled and unlabeled preprocessed datasets both work.

Recipe: each method's published one (``PretrainDataConfig.recipe``, a
:class:`~nnunet_hyspark.methods.data_recipe.DataRecipe`; ``docs/methods.md``):
``crops_per_volume`` crops cut from each loaded volume, placed by a sampler
(``body``: centres in the body, HySparK; ``uniform``: MiM; ``fg_bg``: a fixed
foreground:background split per volume, Hi-End-MAE), then flips per axis, a
90-degree turn and an intensity scale / shift with the recipe's probabilities, on
nnU-Net's batchgeneratorsv2 stack. The default is HySparK's: 4 body-biased crops
per volume, flips with probabilities (0.2, 0.2, 0.1). Optional extras, off in every
recipe: mild rotation (+-15 deg) / scaling (0.85-1.15) through ``SpatialTransform``
and a mild brightness / contrast / noise jitter.

Modules
-------
``config``      :class:`PretrainDataConfig` and its validation.
``sources``     reading the plans and preprocessed folders of the datasets, their compatibility, the body
                threshold in normalised units.
``sampling``    crop positions by the sampler, cropping / padding, the train/val split and the random streams.
``transforms``  the augmentation (batchgeneratorsv2 transforms).
``loaders``     the training / validation iterators and the entry points below.

Entry points
------------
``build_pretrain_loaders(cfg) -> (train_iter, val_iter, info)``
    ``train_iter`` and ``val_iter`` yield ``torch.FloatTensor (B, C, X, Y, Z)``
    forever (``next()``); both have ``close()`` and are context managers
    (``pretrain_loaders(cfg)`` is a context manager closing both). ``val_iter`` is
    ``None`` when no case is held out.
``measure_crops_per_second(cfg, seconds)``
    throughput of the training iterator, for the benchmark command.

Behaviour
---------
*Body bias.* For every loaded volume a few hundred random voxels of channel 0
are probed; those above the body threshold are candidate crop centres (no
``argwhere`` over the whole volume); for ``fg_bg`` the background crops take
their centres among probed voxels at or below it. With CT normalisation the threshold is
given in HU (``body_threshold``, default -500) and converted to normalised
units with the plans' ``foreground_intensity_properties_per_channel['0']``
exactly as nnU-Net's ``CTNormalization`` does (clip to the 0.5/99.5 percentiles,
subtract the mean, divide by the std). If the HU threshold lies below the lower
clip value, "body" means "above the lower clip value". For other normalisation
schemes the threshold is the ``body_percentile`` percentile of the probed voxels
of that volume. When no probed voxel is of the wanted kind the crop falls back to
a uniform position (counted in ``train_iter.loader.crop_kinds["fallback"]``).
``body_threshold=None`` gives uniform crops whatever the sampler.

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

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> defining submodule. Loaded on first use (PEP 562), so that importing the light
# ``config`` module (``PretrainDataConfig``) does not import nnU-Net's and batchgenerators' data stack.
_EXPORTS = {
    "PretrainDataConfig": "config",
    "PretrainTrainIterator": "loaders",
    "PretrainValIterator": "loaders",
    "build_pretrain_loaders": "loaders",
    "pretrain_loaders": "loaders",
    "measure_crops_per_second": "loaders",
    "body_threshold_to_normalized": "sources",
    "PerAxisMirrorTransform": "transforms",
    "build_pretrain_transforms": "transforms",
    "UniformShiftTransform": "transforms",
    "ROTATION_DEGREES": "transforms",
    "SCALING_RANGE": "transforms",
}

if TYPE_CHECKING:
    from nnunet_hyspark.pretraining.data.config import PretrainDataConfig
    from nnunet_hyspark.pretraining.data.loaders import (
        PretrainTrainIterator,
        PretrainValIterator,
        build_pretrain_loaders,
        measure_crops_per_second,
        pretrain_loaders,
    )
    from nnunet_hyspark.pretraining.data.sources import body_threshold_to_normalized
    from nnunet_hyspark.pretraining.data.transforms import (
        ROTATION_DEGREES,
        SCALING_RANGE,
        PerAxisMirrorTransform,
        UniformShiftTransform,
        build_pretrain_transforms,
    )

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
