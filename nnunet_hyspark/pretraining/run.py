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
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import MethodSpec, ModelOptions, get_method, method_for_network
from nnunet_hyspark.pretraining.data.config import PretrainDataConfig
from nnunet_hyspark.pretraining.loop import LoopConfig, recipe_defaults

_LOOP = LoopConfig()


@dataclass(frozen=True)
class PretrainOptions:
    """Everything ``hyspark_pretrain`` can be told (the field names are its option names).

    None means: the method's recipe (lr, warmup_fraction, weight_decay, betas, clip_grad, mask_ratio),
    the method's plans (plans), the plan's (batch_size, patch_size), nnU-Net's (num_workers).
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
    device: str = "auto"  # auto | cpu | cuda
    precision: str = _LOOP.precision
    sparse_backend: str = "auto"  # auto | dense | blocks | spconv
    compile: bool = False
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
    no_progress: bool = False


def with_method_defaults(opts: PretrainOptions, spec: MethodSpec) -> PretrainOptions:
    """Fill the options left out (None) from the method's recipe over the loop's defaults, and its plans."""
    recipe = spec.resolved_recipe(recipe_defaults())
    filled: dict[str, Any] = {k: recipe[k] for k in ("lr", "warmup_fraction", "clip_grad", "mask_ratio")
                              if getattr(opts, k) is None}
    for k in ("weight_decay", "betas"):
        filled[k] = tuple(getattr(opts, k) if getattr(opts, k) is not None else recipe[k])
    if opts.plans is None:
        filled["plans"] = spec.plans_name
    return replace(opts, **filled)


def default_output(dataset_name: str, method: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<first dataset>/<method>_pretrain__<plans>__<configuration>``."""
    return Path(os.environ["nnUNet_results"]) / dataset_name / f"{method}_pretrain__{plans}__{configuration}"


def check_output_folder(output: Path, continue_training: bool, force: bool) -> Path | None:
    """Return the checkpoint to resume from; refuse to overwrite an earlier run without --force."""
    latest = output / "checkpoint_latest.pth"
    if continue_training:
        if not latest.is_file():
            raise HySparKError(f"--c given but {latest} does not exist", "start without --c")
        return latest
    if latest.is_file() or (output / "checkpoint_final.pth").is_file():
        if not force:
            raise HySparKError(f"{output} already holds a pre-training run",
                               "continue it with --c, choose another --output, or start over with --force")
        for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "progress.json", "training_log.txt"):
            (output / name).unlink(missing_ok=True)
    return None


def plan_arch_kwargs(dataset: int | str, plans: str, configuration: str, spec: MethodSpec) -> dict:
    """The network arguments of a configuration, which must be the method's fine-tuning network."""
    cm = compat.configuration(dataset, plans, configuration,
                              hint="plan the dataset with hyspark_plan_and_preprocess")
    if method_for_network(cm.network_arch_class_name) is not spec:
        raise HySparKError(f"{compat.plans_file(dataset, plans)} configuration {configuration} uses "
                           f"{cm.network_arch_class_name}, not {spec.network.class_name.rsplit('.', 1)[-1]}",
                           f"plan the dataset with hyspark_plan_and_preprocess --network {spec.name}, then "
                           f"-p {spec.plans_name}")
    return dict(cm.network_arch_init_kwargs)


def plan_patch_size(dataset: int | str, plans: str, configuration: str) -> tuple[int, ...]:
    """The patch size of a configuration (``inherits_from`` resolved by nnU-Net)."""
    cm = compat.configuration(dataset, plans, configuration, hint="plan the dataset with hyspark_plan_and_preprocess")
    return tuple(int(p) for p in cm.patch_size)


def _resolve_sparse_backend(name: str, device):
    """The sparse backend object, resolved once for the run (``auto``: by device)."""
    from nnunet_hyspark.sparse import resolve_backend

    try:
        return resolve_backend(name, device)
    except (ValueError, RuntimeError, ImportError) as e:
        raise HySparKError(f"--sparse-backend {name}: {e}") from None


def _init_encoder(model, path: str, info: dict) -> None:
    """``--init-from``: the encoder's tensors from a weights file whose plans fit this pre-training's."""
    from nnunet_hyspark.weights import format_report, load_weights_file, transfer_report

    weights, meta = load_weights_file(path)
    plans = compat.Preprocessing(tuple(info["spacing"]), tuple(info["normalization_schemes"]),
                                 info.get("foreground_intensity_properties_per_channel"))
    compat.check_weights_fit_plans(meta, plans, "this pre-training's plans", lambda m: print(m, file=sys.stderr))
    enc_state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    report = transfer_report(model.encoder.state_dict(), enc_state)
    if report["missing"] or report["shape_mismatch"]:
        raise HySparKError(f"--init-from {path} does not fit this encoder: " + "; ".join(format_report(report)[1:3]))
    model.encoder.load_state_dict(enc_state)


def loop_config(opts: PretrainOptions) -> LoopConfig:
    """The loop's configuration of resolved options (see :func:`with_method_defaults`)."""
    return LoopConfig(epochs=opts.epochs, iterations_per_epoch=opts.iterations, val_iterations=opts.val_iterations,
                      lr=opts.lr, warmup_fraction=opts.warmup_fraction, weight_decay_start=opts.weight_decay[0],
                      weight_decay_end=opts.weight_decay[1], betas=tuple(opts.betas), clip_grad=opts.clip_grad or None,
                      precision=opts.precision, preview_every=opts.preview_every, save_every=opts.save_every,
                      seed=opts.seed)


def finetune_command(opts: PretrainOptions, weights: Path) -> str:
    """The nnU-Net command that fine-tunes from the exported weights."""
    spec = get_method(opts.method)
    return (f"nnUNetv2_train DATASET {opts.configuration} FOLD -tr {spec.finetune_trainer} "
            f"-p {opts.plans or spec.plans_name} -pretrained_weights {weights}")


def pretrain(opts: PretrainOptions) -> Path | None:
    """Run one pre-training; returns the exported weights (None on rank > 0 or after an interrupt)."""
    import torch

    from nnunet_hyspark.pretraining.data import build_pretrain_loaders
    from nnunet_hyspark.pretraining.distributed import DistContext

    compat.require_nnunet_env()
    spec = get_method(opts.method)
    opts = with_method_defaults(opts, spec)
    if not 0.0 <= opts.mask_ratio < 1.0:
        raise HySparKError(f"--mask-ratio {opts.mask_ratio} is outside [0, 1)")
    if opts.epochs < 1 or opts.iterations < 1:
        raise HySparKError("--epochs and --iterations must be at least 1")
    device = compat.resolve_device(opts.device)
    backend = _resolve_sparse_backend(opts.sparse_backend, device)
    opts = replace(opts, sparse_backend=backend.name)
    dist = DistContext.from_environment(device.type)
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
        patch_size=patch_size, patch_multiple=spec.patch_multiple, batch_size=opts.batch_size,
        val_fraction=opts.val_fraction, num_val_batches=opts.val_iterations, num_workers=opts.num_workers,
        seed=opts.seed, rank=dist.rank, world_size=dist.world_size)
    train_iter, val_iter, info = build_pretrain_loaders(data_cfg)
    finished = False
    try:
        weights_path = _run(opts, spec, backend, device, dist, train_iter, val_iter, info)
        finished = True
        return weights_path
    finally:
        _close(train_iter, val_iter)
        # the model (and DDP's reducer, which holds the process group) went with _run's frame;
        # collect cycles so the group is torn down here, not by interpreter shutdown
        gc.collect()
        dist.close(wait_for_peers=finished)


def _run(opts: PretrainOptions, spec: MethodSpec, backend, device, dist, train_iter, val_iter,
         info: dict) -> Path | None:
    """Build the model and run the loop; returns the exported weights (None on rank > 0 or interrupt)."""
    import torch

    from nnunet_hyspark.io import atomic_json_save
    from nnunet_hyspark.pretraining.loop import Pretrainer

    output = Path(opts.output) if opts.output else default_output(info["datasets"][0], opts.method, opts.plans,
                                                                  opts.configuration)
    resume = check_output_folder(output, opts.continue_training, opts.force)
    torch.manual_seed(opts.seed + dist.rank)  # different masks on every rank
    model_options = ModelOptions(mask_ratio=opts.mask_ratio, decoder_width=opts.decoder_width,
                                 fuse_full_resolution=opts.fuse_full_resolution, sparse_backend=backend,
                                 level_patch=tuple(opts.patch_size) if opts.patch_size else None)
    arch = plan_arch_kwargs(info["datasets"][0], opts.plans, opts.configuration, spec)
    model = spec.build_model(arch, info["num_input_channels"], model_options)
    if opts.init_from:
        _init_encoder(model, opts.init_from, info)
    uses_backend = getattr(model, "sparse_backend", None) is not None  # a masked CNN (HySparK); others ignore it
    if opts.compile:
        model = torch.compile(model)
    meta = {"method": opts.method, "datasets": info["datasets"], "plans_name": opts.plans,
            "configuration": opts.configuration, "patch_size": list(info["patch_size"]),
            "spacing": list(info["spacing"]), "normalization_schemes": info["normalization_schemes"],
            "foreground_intensity_properties_per_channel": info.get("foreground_intensity_properties_per_channel"),
            "mask_ratio": opts.mask_ratio, "batch_size": info["batch_size"], "world_size": dist.world_size}
    if uses_backend:
        meta["sparse_backend"] = opts.sparse_backend
    trainer = Pretrainer(model, spec, loop_config(opts), train_iter, val_iter, output, meta, device, dist,
                         progress=not opts.no_progress)
    if dist.is_main:
        atomic_json_save({**asdict(opts), "output": str(output)}, output / "pretrain_config.json")
    return trainer.run(resume_from=resume)


def _close(*iterators) -> None:
    for it in iterators:
        close = getattr(it, "close", None)
        if callable(close):
            close()
