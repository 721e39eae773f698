"""One pre-training run (``hyspark_pretrain``) as a library call: :func:`pretrain` with :class:`PretrainOptions`.

Reads the preprocessed data that fine-tuning reads (same spacing and intensity normalisation),
writes under ``$nnUNet_results`` a log, progress.png, previews, atomic checkpoints and the
weights for ``nnUNetv2_train -pretrained_weights``. Runs under ``torchrun`` for several GPUs /
machines. Options left out (None) take the method's recipe (``MethodSpec.recipe``) over the loop's
defaults (:func:`nnunet_hyspark.pretraining.loop.recipe_defaults`).
"""
from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.allocator import DEFAULT_MALLOC, apply_malloc_mode
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import MethodSpec, ModelOptions, get_method
from nnunet_hyspark.methods.data_recipe import DataRecipe
from nnunet_hyspark.pretraining.data.config import PretrainDataConfig
from nnunet_hyspark.pretraining.loggers import make_logger, resolve_logger_name
from nnunet_hyspark.pretraining.monitor import RunMonitor
from nnunet_hyspark.pretraining.probe import probe_for_run
from nnunet_hyspark.pretraining.loop import LoopConfig, recipe_defaults, stop_signals_interrupt
from nnunet_hyspark.pretraining.model_setup import init_encoder, plan_arch_kwargs, resolve_sparse_backend
from nnunet_hyspark.pretraining.recovery import read_resume_checkpoint
from nnunet_hyspark.io import remove_atomic_leftovers
from nnunet_hyspark.pretraining.run_folder import check_same_run, read_stored_options, start_fresh
from nnunet_hyspark.pretraining.validation import validate_options
from nnunet_hyspark.runlock import RunLock

if TYPE_CHECKING:
    from torch import nn

    from nnunet_hyspark.hardware import CpuInfo
    from nnunet_hyspark.pretraining.distributed import DistContext
    from nnunet_hyspark.pretraining.estimate import CostEstimate

_LOOP = LoopConfig()


@dataclass(frozen=True)
class PretrainOptions:
    """Everything ``hyspark_pretrain`` can be told (the field names are its option names).

    None means: the method's recipe (lr, warmup_fraction, weight_decay, betas, clip_grad, mask_ratio),
    the method's data recipe (the fields of :data:`DATA_RECIPE_OPTIONS`), the method's plans (plans),
    the plan's (batch_size, patch_size), nnU-Net's (num_workers).
    """

    datasets: tuple[str, ...]
    configuration: str = "3d_fullres"
    plans: str | None = None
    method: str = "hyspark"
    epochs: int = _LOOP.epochs
    iterations: int = _LOOP.iterations_per_epoch
    val_iterations: int = _LOOP.val_iterations
    batch_size: int | None = None
    patch_size: tuple[int, int, int] | None = None  # MiM: the level patch (crops are crop_scale x that)
    mask_ratio: float | None = None
    lr: float | None = None
    warmup_fraction: float | None = None
    weight_decay: tuple[float, float] | None = None  # start, end of the cosine
    betas: tuple[float, float] | None = None
    clip_grad: float | None = None  # 0 disables
    crops_per_volume: int | None = None  # the data recipe from here to intensity_range (MethodSpec.data_recipe)
    sampler: str | None = None  # body | uniform | fg_bg
    fg_bg_ratio: tuple[int, int] | None = None
    flip_probabilities: tuple[float, float, float] | None = None
    rot90_probability: float | None = None
    intensity_probability: float | None = None
    intensity_range: float | None = None
    device: str = "auto"  # auto | cpu | cuda
    precision: str = _LOOP.precision  # or "auto": resolve_precision
    sparse_backend: str = "auto"  # auto | dense | blocks | spconv
    compile: bool = False
    malloc: str = DEFAULT_MALLOC  # reuse | system (nnunet_hyspark.allocator)
    decoder_width: int | None = None
    fuse_full_resolution: bool = False
    init_from: str | None = None
    num_workers: int | None = None
    val_fraction: float = PretrainDataConfig.val_fraction
    preview_every: int = _LOOP.preview_every
    save_every: int = _LOOP.save_every
    seed: int = _LOOP.seed
    output: str | None = None  # None: default_output()
    continue_training: bool = False
    force: bool = False
    allow_schedule_change: bool = False  # --c may change the schedule (recomputed over the new length)
    no_progress: bool = False
    logger: str | None = None  # tensorboard | wandb | none; None: W&B if nnUNet_wandb_enabled, else none
    probe_dataset: str | None = None  # a labelled dataset preprocessed like the pre-training data
    probe_every: int = 5  # epochs between probes (and epoch 0, and the last)
    estimate: bool = False  # measure the cost (time, memory) and write nothing


#: option name -> DataRecipe field, for the options that override single fields of the method's data recipe
DATA_RECIPE_OPTIONS = {"crops_per_volume": "crops_per_volume", "sampler": "sampler", "fg_bg_ratio": "fg_bg_ratio",
                       "flip_probabilities": "flip_probs", "rot90_probability": "rot90_probability",
                       "intensity_probability": "intensity_probability", "intensity_range": "intensity_range"}


def data_recipe(opts: PretrainOptions, spec: MethodSpec) -> DataRecipe:
    """The method's data recipe with the fields the options set (those not None) replaced."""
    given = {field: getattr(opts, option) for option, field in DATA_RECIPE_OPTIONS.items()
             if getattr(opts, option) is not None}
    return replace(spec.data_recipe, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def with_method_defaults(opts: PretrainOptions, spec: MethodSpec) -> PretrainOptions:
    """Fill the options left out (None) from the method's recipe over the loop's defaults, its data recipe
    and its plans."""
    recipe = spec.resolved_recipe(recipe_defaults())
    filled: dict[str, Any] = {k: recipe[k] for k in ("lr", "warmup_fraction", "clip_grad", "mask_ratio")
                              if getattr(opts, k) is None}
    for k in ("weight_decay", "betas"):
        filled[k] = tuple(getattr(opts, k) if getattr(opts, k) is not None else recipe[k])
    if opts.plans is None:
        filled["plans"] = spec.plans_name
    recipe = asdict(data_recipe(opts, spec))
    filled.update({option: tuple(recipe[field]) if isinstance(recipe[field], (list, tuple)) else recipe[field]
                   for option, field in DATA_RECIPE_OPTIONS.items()})
    return replace(opts, **filled)


def default_output(dataset_name: str, method: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<first dataset>/<method>_pretrain__<plans>__<configuration>``."""
    return Path(os.environ["nnUNet_results"]) / dataset_name / f"{method}_pretrain__{plans}__{configuration}"


def check_preprocessing_complete(dataset: int, plans: str, configuration: str) -> None:
    """Refuse preprocessed data whose preprocessing was killed (it would train on part of the cases)."""
    from nnunet_hyspark.planning import completeness

    folder = compat.preprocessed_dir(dataset) / compat.data_identifier(dataset, plans, configuration)
    completeness.check_complete(folder, completeness.repair_command(dataset, plans, configuration))


def prepare_output_folder(output: Path, opts: PretrainOptions, is_main: bool) -> tuple[dict | None, list[str]]:
    """The checkpoint state to continue from (``--c``) and lines for the log; starts over with ``--force``.
    Rank 0 holds the run lock while this runs, so no other run changes the folder meanwhile."""
    if opts.continue_training:
        return read_resume_checkpoint(output), []
    if is_main:
        remove_atomic_leftovers(output)  # half-written files of a killed run (we hold the lock: no live writer)
    moved = start_fresh(output, opts.force) if is_main else None
    return None, [f"--force: moved the previous run in {output} to {moved}"] if moved else []


def plan_patch_size(dataset: int | str, plans: str, configuration: str) -> tuple[int, ...]:
    """The patch size of a configuration (``inherits_from`` resolved by nnU-Net)."""
    cm = compat.configuration(dataset, plans, configuration, hint="plan the dataset with hyspark_plan_and_preprocess")
    return tuple(int(p) for p in cm.patch_size)


def loop_config(opts: PretrainOptions) -> LoopConfig:
    """The loop's configuration of resolved options (see :func:`with_method_defaults`)."""
    return LoopConfig(epochs=opts.epochs, iterations_per_epoch=opts.iterations, val_iterations=opts.val_iterations,
                      lr=opts.lr, warmup_fraction=opts.warmup_fraction, weight_decay_start=opts.weight_decay[0],
                      weight_decay_end=opts.weight_decay[1], betas=tuple(opts.betas), clip_grad=opts.clip_grad or None,
                      precision=opts.precision, preview_every=opts.preview_every, save_every=opts.save_every,
                      seed=opts.seed)


def run_config(opts: PretrainOptions, spec: MethodSpec, output: Path) -> dict[str, Any]:
    """What ``pretrain_config.json`` records: the resolved options, the whole data recipe in use (with a
    one-line summary) and the output folder."""
    recipe = data_recipe(opts, spec)
    return {**asdict(opts), "data_recipe": {**asdict(recipe), "summary": recipe.summary()}, "output": str(output)}


def finetune_command(opts: PretrainOptions, weights: Path) -> str:
    """The nnU-Net command that fine-tunes from the exported weights."""
    spec = get_method(opts.method)
    return (f"nnUNetv2_train DATASET {opts.configuration} FOLD -tr {spec.finetune_trainer} "
            f"-p {opts.plans or spec.plans_name} -pretrained_weights {weights}")


def pretrain(opts: PretrainOptions) -> "Path | CostEstimate | None":
    """Run one pre-training; returns the exported weights (None on rank > 0 or after an interrupt).
    With ``opts.estimate``: measures a few steps instead, writes nothing and returns the
    :class:`~nnunet_hyspark.pretraining.estimate.CostEstimate` (None on rank > 0)."""
    import torch

    from nnunet_hyspark.pretraining.data import build_pretrain_loaders
    from nnunet_hyspark.pretraining.distributed import DistContext

    compat.require_nnunet_env()
    spec = get_method(opts.method)
    opts = with_method_defaults(opts, spec)
    validate_options(opts)  # before any data or model is built
    if opts.estimate and opts.continue_training:
        raise HySparKError("--estimate cannot be combined with --c: an estimate measures a new run and writes nothing",
                           "leave out --c (a continued run costs the same per step)")
    logger_name = resolve_logger_name(opts.logger)  # a missing package is refused before anything is built
    recipe = data_recipe(opts, spec)
    recipe.check()
    device = compat.resolve_device(opts.device)
    dist = DistContext.from_environment(device.type)
    opts, precision_notes = resolve_precision(opts, device.type, dist=dist)
    precision_notes.append(apply_malloc_mode(opts.malloc))  # before the model and the loaders allocate
    backend = resolve_sparse_backend(opts.sparse_backend, device)
    opts = replace(opts, sparse_backend=backend.name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    hint = "check the id, or create it with hyspark_synthesize / your conversion script"
    dataset_ids = [compat.dataset_id(d, hint=hint) for d in opts.datasets]
    patch_size = tuple(opts.patch_size) if opts.patch_size else None
    if spec.crop_scale != 1:  # e.g. MiM cuts its levels from crops of 2 x the network's patch
        patch_size = tuple(spec.crop_scale * p for p in
                           (patch_size or plan_patch_size(dataset_ids[0], opts.plans, opts.configuration)))
    data_cfg = PretrainDataConfig(
        dataset_ids=dataset_ids, configuration=opts.configuration, plans_identifier=opts.plans,
        patch_size=patch_size, patch_multiple=spec.patch_multiple, batch_size=opts.batch_size, recipe=recipe,
        val_fraction=opts.val_fraction, num_val_batches=opts.val_iterations, num_workers=opts.num_workers,
        seed=opts.seed, rank=dist.rank, world_size=dist.world_size)
    probe = probe_for_run(opts.probe_dataset, opts.plans, opts.configuration, dataset_ids[0], opts.patch_size,
                          spec, opts.probe_every) if opts.probe_dataset else None  # checked before any write
    for d in dataset_ids:
        check_preprocessing_complete(d, opts.plans, opts.configuration)
    if opts.estimate:
        from nnunet_hyspark.pretraining.estimate import estimate_run
        from nnunet_hyspark.pretraining.loop import Pretrainer

        def trainer(train_iter, val_iter, info):  # the run's model and loop; no output folder, no file
            model = _build_model(opts, spec, backend, info, dist)[0]
            return Pretrainer(model, spec, loop_config(opts), train_iter, val_iter, os.devnull, {}, device, dist,
                              progress=False, writes=False)

        return estimate_run(data_cfg, dist, trainer, probe)
    output = Path(opts.output) if opts.output else default_output(compat.dataset_name(dataset_ids[0]), opts.method,
                                                                  opts.plans, opts.configuration)
    # rank 0 holds the folder for the whole run (also under torchrun); taking the lock also proves the
    # folder writable before any data is loaded; a stop signal before the loop releases it (KeyboardInterrupt)
    with stop_signals_interrupt(), RunLock(output, enabled=dist.is_main):
        resume, notes = prepare_output_folder(output, opts, dist.is_main)
        notes = notes + precision_notes
        train_iter, val_iter, info = build_pretrain_loaders(data_cfg)
        finished = False
        try:
            weights_path = _run(opts, spec, backend, device, dist, train_iter, val_iter, info, output, resume, notes,
                                logger_name, probe)
            finished = True
            return weights_path
        finally:
            _close(train_iter, val_iter)
            # the model (and DDP's reducer, which holds the process group) went with _run's frame;
            # collect cycles so the group is torn down here, not by interpreter shutdown
            gc.collect()
            dist.close(wait_for_peers=finished)


def _run(opts: PretrainOptions, spec: MethodSpec, backend, device, dist, train_iter, val_iter,
         info: dict, output: Path, resume: dict | None, notes: list[str], logger_name: str = "none",
         probe=None) -> Path | None:
    """Build the model and run the loop; returns the exported weights (None on rank > 0 or interrupt)."""
    import torch

    from nnunet_hyspark.io import atomic_json_save
    from nnunet_hyspark.pretraining.loop import Pretrainer

    meta = {"method": opts.method, "datasets": info["datasets"], "plans_name": opts.plans,
            "configuration": opts.configuration, "patch_size": list(info["patch_size"]),
            "spacing": list(info["spacing"]), "normalization_schemes": info["normalization_schemes"],
            "foreground_intensity_properties_per_channel": info.get("foreground_intensity_properties_per_channel"),
            "mask_ratio": opts.mask_ratio, "batch_size": info["batch_size"], "world_size": dist.world_size,
            "citation": spec.citation}
    if resume is not None:  # --c: only the same run (the schedule too, unless --allow-schedule-change)
        notes = notes + check_same_run(resume, read_stored_options(output), meta, asdict(loop_config(opts)),
                                       run_config(opts, spec, output), opts.allow_schedule_change)
    model, uses_backend, build = _build_model(opts, spec, backend, info, dist)
    if uses_backend:
        meta["sparse_backend"] = opts.sparse_backend
    logger = make_logger(logger_name, output, run_config(opts, spec, output), run_name=output.name,
                         enabled=dist.is_main)
    # what hyspark_export_weights needs to rebuild the model from any checkpoint (loop_config is saved in each)
    cfg = replace(loop_config(opts), extra={"model_build": build})
    trainer = Pretrainer(model, spec, cfg, train_iter, val_iter, output, meta, device, dist,
                         progress=not opts.no_progress, monitor=RunMonitor(logger, probe))
    for line in [*notes, f"data recipe: {info['data_recipe'].summary()}"]:
        trainer.log(line)
    if dist.is_main:
        atomic_json_save(run_config(opts, spec, output), output / "pretrain_config.json")
    try:
        return trainer.run(resume_from=resume)
    finally:
        trainer.monitor.close()


def resolve_precision(opts: PretrainOptions, device_type: str, cpu: CpuInfo | None = None,
                      dist: DistContext | None = None) -> tuple[PretrainOptions, list[str]]:
    """``--precision auto`` decided by :func:`nnunet_hyspark.hardware.auto_precision` (``cpu``: default this
    machine's); returns the options with the precision chosen and the line saying why (printed, then logged).
    Under torchrun on the CPU rank 0 decides for all: timings on each rank could differ and disturb each other."""
    if opts.precision != "auto":
        return opts, []
    from nnunet_hyspark.hardware import auto_precision

    if dist is None or not dist.enabled or device_type != "cpu":
        precision, why = auto_precision(device_type, cpu)
    else:
        precision, why = dist.from_main(auto_precision(device_type, cpu) if dist.is_main else None)
    line = f"--precision auto: {precision} ({why})"
    print(line)
    return replace(opts, precision=precision), [line]


def _build_model(opts: PretrainOptions, spec: MethodSpec, backend: Any, info: dict,
                dist: DistContext) -> tuple[nn.Module, bool, dict[str, Any]]:
    """The pre-training model of the plans (``--init-from`` loaded, compiled if asked); returns (model, whether
    it uses the sparse backend, the arguments that rebuild it: ``model_build`` of the checkpoints)."""
    import torch

    torch.manual_seed(opts.seed + dist.rank)  # different masks on every rank
    level_patch = tuple(opts.patch_size) if opts.patch_size else None
    model_options = ModelOptions(mask_ratio=opts.mask_ratio, decoder_width=opts.decoder_width,
                                 fuse_full_resolution=opts.fuse_full_resolution, sparse_backend=backend,
                                 level_patch=level_patch)
    arch = plan_arch_kwargs(info["datasets"][0], opts.plans, opts.configuration, spec)
    model = spec.build_model(arch, info["num_input_channels"], model_options)
    if opts.init_from:
        init_encoder(model, opts.init_from, info, spec)
    uses_backend = getattr(model, "sparse_backend", None) is not None  # a masked CNN (HySparK); others ignore it
    if opts.compile:
        model = torch.compile(model)
    build = {"arch": arch, "in_channels": info["num_input_channels"], "mask_ratio": opts.mask_ratio,
             "decoder_width": opts.decoder_width, "fuse_full_resolution": opts.fuse_full_resolution,
             "level_patch": list(level_patch) if level_patch else None}
    return model, uses_backend, build


def _close(*iterators) -> None:
    for it in iterators:
        close = getattr(it, "close", None)
        if callable(close):
            close()
