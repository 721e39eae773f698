"""``hyspark_pretrain``: self-supervised pre-training over nnU-Net-preprocessed datasets.

Parses the options into :class:`~nnunet_hyspark.pretraining.run.PretrainOptions` and calls
:func:`~nnunet_hyspark.pretraining.run.pretrain` (what a run reads and writes is described there).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

from nnunet_hyspark.allocator import MALLOC_MODES
from nnunet_hyspark.errors import cli_entry
from nnunet_hyspark.methods import METHODS, MethodSpec
from nnunet_hyspark.methods.data_recipe import SAMPLERS
from nnunet_hyspark.pretraining.loop import recipe_defaults
from nnunet_hyspark.pretraining.run import PretrainOptions, finetune_command, pretrain, with_method_defaults

_DEFAULTS = PretrainOptions(datasets=())


def build_parser() -> argparse.ArgumentParser:
    recipes = "; ".join(spec.recipe_summary(recipe_defaults()) for spec in METHODS.values())
    data = "; ".join(f"{spec.title}: {spec.data_recipe.summary()}" for spec in METHODS.values())
    p = argparse.ArgumentParser(
        prog="hyspark_pretrain",
        description="Self-supervised pre-training (HySparK by default) on nnU-Net-preprocessed datasets. "
                    f"Optimisation options left out take the method's recipe: {recipes}. Biases, norms and tokens "
                    f"are never decayed. Data options left out take the method's data recipe: {data}. Intensities "
                    "are normalised as the nnU-Net plans say, for every method.",
        epilog="Please cite the paper of the method you pre-train with: "
               + " ".join(f"{s.title} (--method {s.name}): {s.citation}" for s in METHODS.values()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", required=True, metavar="ID",
                   help="dataset ids or names, preprocessed with hyspark_plan_and_preprocess (labelled or not)")
    p.add_argument("-c", "--configuration", default=_DEFAULTS.configuration)
    p.add_argument("-p", "--plans", default=None,
                   help="plans identifier (default: the method's: "
                        + ", ".join(f"{s.title} {s.plans_name}" for s in METHODS.values()) + ")")
    p.add_argument("--method", default=_DEFAULTS.method, choices=sorted(METHODS),
                   help="pre-training method (the papers to cite are listed at the end)")
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
    p.add_argument("--precision", default=_DEFAULTS.precision, choices=["fp32", "bf16", "fp16", "auto"],
                   help="bf16 autocast speeds up CUDA GPUs and CPUs with AMX (Intel Xeon Sapphire Rapids and later); "
                        "on CPUs with AVX-512 bf16 only it measured 1.8x faster (AMD EPYC Zen 4) or slower (Intel "
                        "Xeon) than fp32; fp16 is CUDA only (with a gradient scaler); auto = bf16 on CUDA and on "
                        "AMX CPUs, fp32 on CPUs without bf16 units, and on AVX-512 bf16 CPUs whichever a short "
                        "convolution timing finds faster (bf16 only at >= 1.15x); ONEDNN_MAX_CPU_ISA caps count; "
                        "the log says what auto chose and why")
    p.add_argument("--sparse-backend", default=_DEFAULTS.sparse_backend,
                   help="how HySparK's masked CNN runs, all with the same numbers: dense (reference), blocks "
                        "(project's own block-sparse), spconv (CUDA only); auto = blocks on CPU (measured "
                        "faster), dense on CUDA (blocks not yet measured there)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--malloc", default=_DEFAULTS.malloc, choices=MALLOC_MODES,
                   help="reuse = keep freed memory for the next step (glibc: mmap and trimming off): measured 1.2-2.2x "
                        "faster CPU steps (2-core AMD EPYC, no AMX), more resident memory; system = the C library's defaults")
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
    p.add_argument("--c", dest="continue_training", action="store_true",
                   help="continue from checkpoint_latest.pth (the same run: method, data, batch and schedule must "
                        "match)")
    p.add_argument("--force", action="store_true",
                   help="start over in an output folder that already has a run (the old run is moved to "
                        "<output>.previous-<time> first)")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="with --c: continue with other --epochs/--lr/--warmup-fraction/--weight-decay/--betas/"
                        "--clip-grad; the schedules are recomputed over the new length (said in the log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_data_recipe_options(p)
    _add_monitoring_options(p)
    return p


def _add_monitoring_options(p: argparse.ArgumentParser) -> None:
    """Curves, the probe that tells when to stop, and the cost before launch."""
    g = p.add_argument_group("monitoring and cost")
    g.add_argument("--logger", choices=["tensorboard", "wandb", "none"], default=None,
                   help="also log losses, learning rate, weight decay, throughput, probe scores and previews to "
                        "TensorBoard (<output>/tensorboard) or Weights & Biases (project $nnUNet_wandb_project, "
                        "mode $nnUNet_wandb_mode, like nnUNetv2_train); extras: pip install "
                        "'nnunet-hyspark[tensorboard]' / '[wandb]' (default: wandb if nnUNet_wandb_enabled=1, "
                        "else none)")
    g.add_argument("--probe-dataset", default=None, metavar="LABELLED_ID",
                   help="a labelled dataset preprocessed with the same plans: a linear classifier on the frozen "
                        "encoder's features, trained on 3 of its cases and scored (Dice) on 2 others, at epoch 0 and "
                        "every --probe-every epochs; plotted in progress.png, and checkpoint_best.pth follows it "
                        "(without a probe: the validation loss)")
    g.add_argument("--probe-every", type=int, default=_DEFAULTS.probe_every, help="epochs between probes")
    g.add_argument("--estimate", action="store_true",
                   help="build the model and loader, time a few steps, and print seconds per step, samples per "
                        "second, the wall time of --epochs x --iterations, peak memory and the largest batch that "
                        "fits; writes nothing")


def _per_method(field: str, fmt=lambda v: f"{v:g}") -> str:
    """``default: the method's (HySparK 4, MiM 1, Hi-End-MAE 8)`` for one DataRecipe field."""
    return "default: the method's (" + ", ".join(f"{s.title} {fmt(getattr(s.data_recipe, field))}"
                                                  for s in METHODS.values()) + ")"


def _add_data_recipe_options(p: argparse.ArgumentParser) -> None:
    """Flags that override single fields of the method's data recipe (``MethodSpec.data_recipe``)."""
    g = p.add_argument_group("data recipe", "each flag replaces one field of the method's data recipe (see above)")
    g.add_argument("--crops-per-volume", type=int, default=None,
                   help="crops cut from each loaded volume; " + _per_method("crops_per_volume"))
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="crop centres: body (in the body, by the CT threshold), uniform, fg_bg (a fixed "
                        "foreground:background split per volume, foreground = body); " + _per_method("sampler", str))
    g.add_argument("--fg-bg-ratio", type=int, nargs=2, default=None, metavar=("FG", "BG"),
                   help="foreground:background crops per volume with --sampler fg_bg; "
                        + _per_method("fg_bg_ratio", lambda r: f"{r[0]}:{r[1]}"))
    g.add_argument("--flip-probabilities", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="flip probability per axis; " + _per_method("flip_probs", lambda f: "/".join(f"{v:g}" for v in f)))
    g.add_argument("--rot90-probability", type=float, default=None,
                   help="probability of a 90/180/270-degree turn in the plane of the last two axes; "
                        + _per_method("rot90_probability"))
    g.add_argument("--intensity-probability", type=float, default=None,
                   help="probability of an intensity scale x U(1-R, 1+R), and independently of a shift + U(-R, R); "
                        + _per_method("intensity_probability"))
    g.add_argument("--intensity-range", type=float, default=None, metavar="R",
                   help="R of --intensity-probability, in the plans' normalised units; " + _per_method("intensity_range"))


_TUPLES = ("datasets", "patch_size", "weight_decay", "betas", "fg_bg_ratio", "flip_probabilities")


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
    if options.estimate:
        if weights is not None:  # a CostEstimate (rank 0)
            _print_estimate(options, weights)
        return
    if weights is not None:
        print(f"encoder weights: {weights}")
        print(f"fine-tune with: {finetune_command(options, weights)}")


def _print_estimate(options: PretrainOptions, estimate) -> None:
    from nnunet_hyspark.pretraining.estimate import cost_lines

    print(f"estimate for hyspark_pretrain --method {options.method} -d {' '.join(options.datasets)} on "
          f"{estimate.device}:")
    for line in cost_lines(estimate):
        print(line)
    print("nothing was written.")


if __name__ == "__main__":
    main()
