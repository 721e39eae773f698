"""``hyspark_pretrain``: self-supervised pre-training over nnU-Net-preprocessed datasets.

Reads the preprocessed data that fine-tuning reads (same spacing and intensity
normalisation), writes under ``$nnUNet_results`` a log, progress.png, previews,
atomic checkpoints and the encoder weights for ``nnUNetv2_train -pretrained_weights``.
Runs under ``torchrun`` for several GPUs / machines.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from nnunet_hyspark.errors import HySparKError, cli_entry, require_nnunet_env

LOOP_DEFAULTS = dict(epochs=100, iterations=250, val_iterations=10, lr=1e-4, warmup_fraction=0.4,
                     weight_decay=(0.04, 0.2), clip_grad=5.0, mask_ratio=0.75)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyspark_pretrain",
        description="Self-supervised pre-training (HySparK by default) on nnU-Net-preprocessed datasets. "
                    "Optimisation options left out take the method's recipe: HySparK: AdamW lr 1e-4, "
                    "warm-up over 40%% of the run then cosine, weight decay 0.04 -> 0.2, gradient clipping 5, "
                    "mask ratio 0.75; MiM: AdamW lr 1e-4 betas 0.9 0.95, warm-up 5%% then cosine, weight decay 0.05 "
                    "constant, no clipping (mask ratios 0.5 / 0.6 / 0.5 per level, crops of 2x the patch); "
                    "Hi-End-MAE: AdamW lr 1e-4 betas 0.9 0.95, warm-up 1%% then cosine, "
                    "weight decay 0.05 constant, no clipping, mask ratio 0.75. Biases, norms and tokens are never "
                    "decayed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", required=True, metavar="ID",
                   help="dataset ids or names, preprocessed with hyspark_plan_and_preprocess (labelled or not)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default=None,
                   help="plans identifier (default: the method's, e.g. nnUNetHySparKPlans, nnUNetHiEndMAEPlans)")
    p.add_argument("--method", default="hyspark", choices=sorted(_methods()), help="pre-training method")
    p.add_argument("--epochs", type=int, default=LOOP_DEFAULTS["epochs"])
    p.add_argument("--iterations", type=int, default=LOOP_DEFAULTS["iterations"], help="iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=LOOP_DEFAULTS["val_iterations"],
                   help="validation batches per epoch, from held-out cases")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="per process; default: the plan's")
    p.add_argument("--patch-size", type=int, nargs=3, default=None,
                   help="default: the plan's patch size (MiM: the level patch; it reads crops of twice that)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the method's (0.75)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's, 1e-4)")
    p.add_argument("--warmup-fraction", type=float, default=None,
                   help="default: the method's (HySparK 0.4, Hi-End-MAE 0.01)")
    p.add_argument("--weight-decay", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="cosine-annealed from START to END (default: the method's; HySparK 0.04 0.2, "
                        "Hi-End-MAE 0.05 0.05)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW betas (default: the method's; HySparK 0.9 0.999, Hi-End-MAE 0.9 0.95)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="gradient-norm clipping, 0 disables (default: the method's; HySparK 5, Hi-End-MAE 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="bf16 autocast also speeds up AMX-capable CPUs; fp16 is CUDA only (with a gradient scaler)")
    p.add_argument("--sparse-backend", default="auto",
                   help="how HySparK's masked CNN runs, all with the same numbers: dense (reference), blocks "
                        "(project's own block-sparse), spconv (CUDA only); auto = blocks on CPU (measured "
                        "faster), dense on CUDA (blocks not yet measured there)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--decoder-width", type=int, default=None, help="default: 2 x the ViT width (768); MiM: 1.5 x (576)")
    p.add_argument("--fuse-full-resolution", action="store_true",
                   help="also fuse the full-resolution skip in the decoder (the reference does not)")
    p.add_argument("--init-from", default=None,
                   help="initialise the encoder from a weights file (ours, or converted with hyspark_convert_checkpoint)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes (default: nnU-Net's)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of cases held out for validation")
    p.add_argument("--preview-every", type=int, default=10, help="epochs between reconstruction previews")
    p.add_argument("--save-every", type=int, default=5, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: $nnUNet_results/<first dataset>/<method>_pretrain__<plans>__<config>)")
    p.add_argument("--c", dest="continue_training", action="store_true", help="continue from checkpoint_latest.pth")
    p.add_argument("--force", action="store_true", help="start over in an output folder that already has a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def _methods() -> dict:
    from nnunet_hyspark.pretraining.methods import METHODS

    return METHODS


def apply_method_defaults(args: argparse.Namespace, method) -> argparse.Namespace:
    """Fill options left out (None) from the method's recipe, else from the HySparK reference recipe."""
    for key in ("lr", "warmup_fraction", "weight_decay", "clip_grad", "mask_ratio"):
        if getattr(args, key, None) is None:
            setattr(args, key, method.recipe.get(key, LOOP_DEFAULTS[key]))
    if getattr(args, "betas", None) is None:
        args.betas = tuple(method.recipe.get("betas", (0.9, 0.999)))
    if getattr(args, "plans", None) is None:
        args.plans = method.plans
    return args


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HySparKError("--device cuda requested but no CUDA device is available", "use --device cpu")
    return torch.device(name)


def check_sparse_backend(name: str) -> None:
    """Unknown backends, or spconv without CUDA, end in one line instead of a traceback mid-run."""
    from nnunet_hyspark.sparse import get_backend

    if name == "dense":
        return
    try:
        get_backend(name)
    except (ValueError, RuntimeError, ImportError) as e:
        raise HySparKError(f"--sparse-backend {name}: {e}") from None


def default_output(dataset_name: str, method: str, plans: str, configuration: str) -> Path:
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


def run(args: argparse.Namespace) -> Path | None:
    import torch

    from nnunet_hyspark.pretrain_data import PretrainDataConfig, build_pretrain_loaders
    from nnunet_hyspark.pretraining.distributed import DistContext

    require_nnunet_env()
    method = _methods()[args.method]
    apply_method_defaults(args, method)
    if not 0.0 <= args.mask_ratio < 1.0:
        raise HySparKError(f"--mask-ratio {args.mask_ratio} is outside [0, 1)")
    if args.epochs < 1 or args.iterations < 1:
        raise HySparKError("--epochs and --iterations must be at least 1")
    device = resolve_device(args.device)
    if args.sparse_backend == "auto":
        args.sparse_backend = "blocks" if device.type == "cpu" else "dense"
    check_sparse_backend(args.sparse_backend)
    dist = DistContext.from_environment(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    dataset_ids = [_dataset_id(d) for d in args.datasets]
    patch_size = tuple(args.patch_size) if args.patch_size else None
    if method.crop_scale != 1:  # e.g. MiM cuts its levels from crops of 2 x the network's patch
        patch_size = tuple(method.crop_scale * p for p in
                           (patch_size or _plan_patch_size(dataset_ids[0], args.plans, args.configuration)))
    data_cfg = PretrainDataConfig(
        dataset_ids=dataset_ids, configuration=args.configuration, plans_identifier=args.plans,
        patch_size=patch_size, patch_multiple=method.patch_multiple, batch_size=args.batch_size,
        val_fraction=args.val_fraction, num_val_batches=args.val_iterations, num_workers=args.num_workers,
        seed=args.seed,
        rank=dist.rank, world_size=dist.world_size)
    train_iter, val_iter, info = build_pretrain_loaders(data_cfg)
    finished = False
    try:
        weights_path = _pretrain(args, method, device, dist, train_iter, val_iter, info)
        finished = True
        return weights_path
    finally:
        _close(train_iter, val_iter)
        # the model (and DDP's reducer, which holds the process group) went with _pretrain's frame;
        # collect cycles so the group is torn down here, not by interpreter shutdown
        gc.collect()
        dist.close(wait_for_peers=finished)


def _pretrain(args: argparse.Namespace, method, device, dist, train_iter, val_iter, info: dict) -> Path | None:
    """Build the model and run the loop; returns the exported weights (None on rank > 0 or interrupt)."""
    import torch

    from nnunet_hyspark.io import atomic_json_save
    from nnunet_hyspark.pretraining.loop import LoopConfig, Pretrainer
    from nnunet_hyspark.weights import load_weights_file, transfer_report, format_report

    output = Path(args.output) if args.output else default_output(info["datasets"][0], args.method,
                                                                args.plans, args.configuration)
    resume = check_output_folder(output, args.continue_training, args.force)
    torch.manual_seed(args.seed + dist.rank)  # different masks on every rank
    model = method.build(plan_arch_kwargs(info["datasets"][0], args.plans, args.configuration, method.network),
                         info["num_input_channels"], args)
    if args.init_from:
        weights, meta = load_weights_file(args.init_from)
        enc_state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
        report = transfer_report(model.encoder.state_dict(), enc_state)
        if report["missing"] or report["shape_mismatch"]:
            raise HySparKError(f"--init-from {args.init_from} does not fit this encoder: "
                               + "; ".join(format_report(report)[1:3]))
        model.encoder.load_state_dict(enc_state)
    if args.compile:
        model = torch.compile(model)
    meta = {"method": args.method, "datasets": info["datasets"], "plans_name": args.plans,
            "configuration": args.configuration, "patch_size": list(info["patch_size"]),
            "spacing": list(info["spacing"]), "normalization_schemes": info["normalization_schemes"],
            "foreground_intensity_properties_per_channel": info.get("foreground_intensity_properties_per_channel"),
            "mask_ratio": args.mask_ratio, "batch_size": info["batch_size"], "world_size": dist.world_size}
    if args.method == "hyspark":  # the only method with a masked CNN; the others ignore --sparse-backend
        meta["sparse_backend"] = args.sparse_backend
    loop_cfg = LoopConfig(epochs=args.epochs, iterations_per_epoch=args.iterations,
                          val_iterations=args.val_iterations, lr=args.lr, warmup_fraction=args.warmup_fraction,
                          weight_decay_start=args.weight_decay[0], weight_decay_end=args.weight_decay[1],
                          betas=tuple(args.betas),
                          clip_grad=args.clip_grad or None, precision=args.precision,
                          preview_every=args.preview_every, save_every=args.save_every, seed=args.seed)
    trainer = Pretrainer(model, method, loop_cfg, train_iter, val_iter, output, meta, device, dist,
                         progress=not args.no_progress)
    if dist.is_main:
        atomic_json_save({**vars(args), "output": str(output)}, output / "pretrain_config.json")
    weights_path = trainer.run(resume_from=resume)
    if weights_path is not None:
        print(f"encoder weights: {weights_path}")
        print(f"fine-tune with: nnUNetv2_train DATASET {args.configuration} FOLD -tr {method.finetune_trainer} "
              f"-p {args.plans} -pretrained_weights {weights_path}")
    return weights_path


def plan_arch_kwargs(dataset_name: str, plans: str, configuration: str, network: str = "HySparKUNet") -> dict:
    """The network arguments of a configuration (inheritance resolved by nnU-Net's PlansManager)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / f"{plans}.json"
    cm = PlansManager(str(plans_file)).get_configuration(configuration)
    if not cm.network_arch_class_name.endswith(network):
        raise HySparKError(f"{plans_file} configuration {configuration} uses {cm.network_arch_class_name}, "
                           f"not {network}", "plan the dataset with hyspark_plan_and_preprocess (MiM: --network mim, "
                           "then -p nnUNetMiMPlans)")
    return dict(cm.network_arch_init_kwargs)


def _plan_patch_size(dataset_id: int, plans: str, configuration: str) -> tuple[int, ...]:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = Path(os.environ["nnUNet_preprocessed"]) / maybe_convert_to_dataset_name(dataset_id) / f"{plans}.json"
    if not plans_file.is_file():
        raise HySparKError(f"no plans {plans_file}", "plan the dataset with hyspark_plan_and_preprocess")
    return tuple(int(p) for p in PlansManager(str(plans_file)).get_configuration(configuration).patch_size)


def _close(*iterators) -> None:
    for it in iterators:
        close = getattr(it, "close", None)
        if callable(close):
            close()


def _dataset_id(name_or_id: str) -> int:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(int(name_or_id) if name_or_id.isdigit() else name_or_id)
    except RuntimeError as e:
        raise HySparKError(f"dataset {name_or_id} not found in nnUNet_raw / nnUNet_preprocessed / nnUNet_results",
                           "check the id, or create it with hyspark_synthesize / your conversion script") from e
    return int(name[len("Dataset"):len("Dataset") + 3])


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from nnunet_hyspark.pretraining.loop import NonFiniteLoss

    try:
        run(args)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
