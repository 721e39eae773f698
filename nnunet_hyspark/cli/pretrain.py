"""``hyspark_pretrain``: self-supervised pre-training over nnU-Net-preprocessed datasets.

Parses the options into :class:`~nnunet_hyspark.pretraining.run.PretrainOptions` and calls
:func:`~nnunet_hyspark.pretraining.run.pretrain` (what a run reads and writes is described there).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

from nnunet_hyspark.errors import cli_entry
from nnunet_hyspark.methods import METHODS, MethodSpec
from nnunet_hyspark.pretraining.loop import recipe_defaults
from nnunet_hyspark.pretraining.run import PretrainOptions, finetune_command, pretrain, with_method_defaults

_DEFAULTS = PretrainOptions(datasets=())


def build_parser() -> argparse.ArgumentParser:
    recipes = "; ".join(spec.recipe_summary(recipe_defaults()) for spec in METHODS.values())
    p = argparse.ArgumentParser(
        prog="hyspark_pretrain",
        description="Self-supervised pre-training (HySparK by default) on nnU-Net-preprocessed datasets. "
                    f"Optimisation options left out take the method's recipe: {recipes}. Biases, norms and tokens "
                    "are never decayed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", required=True, metavar="ID",
                   help="dataset ids or names, preprocessed with hyspark_plan_and_preprocess (labelled or not)")
    p.add_argument("-c", "--configuration", default=_DEFAULTS.configuration)
    p.add_argument("-p", "--plans", default=None,
                   help="plans identifier (default: the method's: "
                        + ", ".join(f"{s.title} {s.plans_name}" for s in METHODS.values()) + ")")
    p.add_argument("--method", default=_DEFAULTS.method, choices=sorted(METHODS), help="pre-training method")
    p.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
    p.add_argument("--iterations", type=int, default=_DEFAULTS.iterations, help="iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=_DEFAULTS.val_iterations,
                   help="validation batches per epoch, from held-out cases")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="per process; default: the plan's")
    p.add_argument("--patch-size", type=int, nargs=3, default=None,
                   help="default: the plan's patch size (MiM: the level patch; it reads crops of twice that)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the method's (see above)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's, see above)")
    p.add_argument("--warmup-fraction", type=float, default=None, help="default: the method's (see above)")
    p.add_argument("--weight-decay", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="cosine-annealed from START to END (default: the method's, see above)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW betas (default: the method's, see above)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="gradient-norm clipping, 0 disables (default: the method's, see above)")
    p.add_argument("--device", default=_DEFAULTS.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=_DEFAULTS.precision, choices=["fp32", "bf16", "fp16"],
                   help="bf16 autocast also speeds up AMX-capable CPUs; fp16 is CUDA only (with a gradient scaler)")
    p.add_argument("--sparse-backend", default=_DEFAULTS.sparse_backend,
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
    p.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction,
                   help="fraction of cases held out for validation")
    p.add_argument("--preview-every", type=int, default=_DEFAULTS.preview_every,
                   help="epochs between reconstruction previews")
    p.add_argument("--save-every", type=int, default=_DEFAULTS.save_every, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: $nnUNet_results/<first dataset>/<method>_pretrain__<plans>__<config>)")
    p.add_argument("--c", dest="continue_training", action="store_true", help="continue from checkpoint_latest.pth")
    p.add_argument("--force", action="store_true", help="start over in an output folder that already has a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


_TUPLES = ("datasets", "patch_size", "weight_decay", "betas")


def options_from_args(args: argparse.Namespace) -> PretrainOptions:
    """The typed options of a parsed command line (list options become tuples)."""
    values = {f.name: getattr(args, f.name) for f in fields(PretrainOptions)}
    for k in _TUPLES:
        if values[k] is not None:
            values[k] = tuple(values[k])
    return PretrainOptions(**values)


def apply_method_defaults(args: argparse.Namespace, method: MethodSpec) -> argparse.Namespace:
    """``args`` with the options left out filled from the method's recipe (what :func:`pretrain` will use)."""
    for k, v in asdict(with_method_defaults(options_from_args(args), method)).items():
        setattr(args, k, v)
    return args


@cli_entry
def main(argv: list[str] | None = None) -> None:
    options = options_from_args(build_parser().parse_args(argv))
    from nnunet_hyspark.pretraining.loop import NonFiniteLoss

    try:
        weights = pretrain(options)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if weights is not None:
        print(f"encoder weights: {weights}")
        print(f"fine-tune with: {finetune_command(options, weights)}")


if __name__ == "__main__":
    main()
