"""What to read and how to crop / augment it for pre-training: :class:`PretrainDataConfig` and its checks.

How crops are sampled and augmented is the method's :class:`~nnunet_hyspark.methods.data_recipe.DataRecipe`
(``MethodSpec.data_recipe``); the default is HySparK's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.data_recipe import DataRecipe

#: Default patch multiple: the total stride of HySparK's hybrid encoder. Methods with another rule (MiM's
#: level patches, a ViT's patch size) pass their ``MethodSpec.patch_multiple`` instead.
DEFAULT_PATCH_MULTIPLE = 16


@dataclass
class PretrainDataConfig:
    """What to read and how to crop / augment it for pre-training.

    dataset_ids: nnU-Net dataset ids (``101``) or folder names (``"Dataset101_Fake"``); several datasets
        must share spacing and normalisation.
    configuration / plans_identifier: which plans configuration's preprocessed data to read.
    patch_size: crop size (x, y, z); ``None`` = the plans' patch size of the first dataset. Every axis must
        be a multiple of ``patch_multiple`` (16, the hybrid encoder's stride; a ViT method passes its own).
    batch_size: ``None`` = the plans' batch size of the first dataset.
    recipe: crops per loaded volume (consecutive batches may share volumes), where crops are centred (body-biased,
        uniform, or a foreground:background split, foreground = body), flips, 90-degree rotations and intensity
        scale / shift: the method's published recipe (:class:`DataRecipe`; default HySparK's).
    body_threshold: body threshold in HU for CT normalisation (default -500); ``None`` = no body: uniform crops
        whatever the recipe's sampler.
    body_percentile: for non-CT normalisation (or CT plans without intensity properties), the percentile of a
        volume's own intensities above which a voxel counts as body.
    val_fraction / num_val_cases: held-out cases (over all datasets together, by ``seed``); at least one when
        there are >= 2 cases, unless ``val_fraction == 0`` or ``num_val_cases == 0``.
    val_crops_per_case: fixed crop positions per held-out case. num_val_batches: length of one validation
        pass (``None`` = all held-out crops). val_cache_mb: memory for caching validation crops.
    rotation / scaling / intensity_jitter: optional mild augmentation on top of the recipe, off in every
        method's recipe (``transforms`` module constants give the ranges).
    num_workers: background processes; ``None`` = nnU-Net's ``get_allowed_n_proc_DA()``, 0 = in-process.
    seed / rank / world_size: randomness and distributed position (see the package docstring);
        shard_cases gives each rank a disjoint subset of the training cases.
    preprocessed_dir: ``None`` = ``$nnUNet_preprocessed``.
    pin_memory: pin batches (worker mode, CUDA only).
    """

    dataset_ids: Sequence[int | str]
    configuration: str = "3d_fullres"
    plans_identifier: str = "nnUNetHySparKPlans"
    patch_size: tuple[int, int, int] | None = None
    patch_multiple: int = DEFAULT_PATCH_MULTIPLE
    batch_size: int | None = None
    recipe: DataRecipe = field(default_factory=DataRecipe)
    body_threshold: float | None = -500.0
    body_percentile: float = 50.0
    val_fraction: float = 0.1
    num_val_cases: int | None = None
    val_crops_per_case: int = 4
    num_val_batches: int | None = None
    val_cache_mb: float = 512.0
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


def validate_config(cfg: PretrainDataConfig) -> None:
    """Refuse values no loader can work with (HySparKError), before any file is read."""
    if not cfg.dataset_ids:
        raise HySparKError("no dataset ids given for pre-training", "pass at least one, e.g. -d 101")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise HySparKError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    cfg.recipe.check()
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise HySparKError(f"val_fraction must lie in [0, 1) (got {cfg.val_fraction})")
    if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
        raise HySparKError(f"invalid distributed position rank={cfg.rank}, world_size={cfg.world_size}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise HySparKError(f"num_workers must be >= 0 (got {cfg.num_workers})")
