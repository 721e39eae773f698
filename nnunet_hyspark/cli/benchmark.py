"""``hyspark_benchmark``: compare training arms (e.g. scratch vs. HySparK pre-trained) over nnU-Net folds.

Subcommands are registered in :func:`subcommands`. EXTENSION POINT: to add one (e.g.
``speed``), write the library function (typed options in, no argparse) in
``nnunet_hyspark/benchmark/``, then here ``add_arguments(parser)`` and ``run(args) -> int``
(building the options and printing) and one entry in the dict returned by :func:`subcommands`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, NamedTuple, Sequence

from nnunet_hyspark.errors import cli_entry


class Subcommand(NamedTuple):
    """One ``hyspark_benchmark`` subcommand: help texts, argument setup and the function that runs it."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- shared arguments

def _add_common(parser: argparse.ArgumentParser) -> None:
    """Arguments that identify a benchmark; shared so folds and summarize agree on them."""
    from nnunet_hyspark.benchmark.arms import ARM_SPEC_HELP
    from nnunet_hyspark.methods import get_method

    parser.add_argument("-d", dest="dataset", required=True, help="dataset name or id, e.g. 1 or Dataset001_Liver")
    parser.add_argument("-c", dest="configuration", default="3d_fullres",
                        help="nnU-Net configuration (default: %(default)s)")
    parser.add_argument("-p", dest="plans", default=get_method("hyspark").plans_name,
                        help="plans identifier (default: %(default)s)")
    parser.add_argument("-f", dest="folds", nargs="+", type=int, default=None, metavar="FOLD",
                        help="folds (default: all folds of the splits in effect, nnU-Net's default is 0 1 2 3 4)")
    parser.add_argument("--arms", nargs="+", default=None, metavar="LABEL=TRAINER[@PLANS][:WEIGHTS]",
                        help=ARM_SPEC_HELP)
    parser.add_argument("--compare", nargs=2, default=None, metavar=("BASELINE", "OTHER"),
                        help="arms for the difference table: reports OTHER minus BASELINE with paired tests "
                             "across folds (default: second arm minus first arm)")
    parser.add_argument("--train-fractions", "--train_fractions", dest="train_fractions", nargs="+", type=float,
                        default=None, metavar="F",
                        help="label efficiency: train every fold also on these fractions of its training cases, "
                             "e.g. 0.1 0.25 0.5 1.0 (nested subsets, fixed seed, at least one case; validated on "
                             "the fold's own validation cases). The subsets are extra entries of the dataset's "
                             "splits_final.json; the manifest records which entry is which fold x fraction. "
                             "Default: 1.0 (all training cases)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="benchmark folder for manifest, logs and summary (default: "
                             "$nnUNet_results/DatasetXXX_Name/hyspark_benchmark__PLANS__CONFIG)")
    parser.add_argument("--force", action="store_true",
                        help="replace a manifest/summary of a different benchmark in the output folder and a "
                             "different existing splits_final.json (kept as .bak). Finished folds are never "
                             "retrained; delete their fold_X folder to retrain")


# --------------------------------------------------------------------------- folds

def add_folds_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyspark_benchmark folds``."""
    from nnunet_hyspark.benchmark.splits import TEXT_FORMAT_HELP
    from nnunet_hyspark.methods import METHODS

    _add_common(parser)
    parser.add_argument("--pretrained_weights", default=None, metavar="FILE",
                        help="weights for every fine-tuning arm (" + ", ".join(
                            f"{s.finetune_trainer}*" for s in METHODS.values()) + ") that has none in its spec "
                             "(required for the default 'pretrained' arm)")
    parser.add_argument("--splits", default=None, metavar="FILE",
                        help="custom folds, installed as $nnUNet_preprocessed/DatasetXXX/splits_final.json: "
                             "nnU-Net's splits_final.json format, a MONAI-style datalist JSON as papers publish "
                             "their folds ({\"training\": [{\"image\": \"imagesTr/img0001.nii.gz\", \"fold\": 0}, "
                             "...]}; image file names map to case ids, img0001.nii.gz -> img0001), or a text file "
                             "with " + TEXT_FORMAT_HELP)
    parser.add_argument("--case-id-pattern", "--case_id_pattern", dest="case_id_pattern", default=None,
                        metavar="REGEX",
                        help="datalist only: regular expression searched in each image path whose one capture "
                             "group (or group named 'case') is the nnU-Net case id, e.g. 'img(\\d+)' (default: "
                             "the file name without folder and file ending, or without _0000)")
    parser.add_argument("--allow-partial-splits", "--allow_partial_splits", dest="allow_partial_splits",
                        action="store_true",
                        help="datalist only: use the cases that both the datalist and the dataset name, instead "
                             "of refusing entries without a case or cases without an entry")
    parser.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                        help="run folds in parallel, one per GPU, via CUDA_VISIBLE_DEVICES (default: sequential "
                             "with the inherited environment)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the exact nnUNetv2_train commands and run nothing")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"],
                        help="nnUNetv2_train -device; auto = cuda when a GPU is visible, else cpu")
    parser.add_argument("--test-images", "--test_images", dest="test_images", default=None, metavar="DIR",
                        help="held-out test images named as nnU-Net expects (CASE_0000.nii.gz, one file per "
                             "channel): after the folds, each arm's ensemble of all its folds predicts them with "
                             "nnUNetv2_predict into OUTPUT/test_set/<arm>/ and nnU-Net's evaluation scores them "
                             "against --test-labels; arms with missing folds are reported, not ensembled")
    parser.add_argument("--test-labels", "--test_labels", dest="test_labels", default=None, metavar="DIR",
                        help="the test images' labels, CASE.nii.gz for every CASE of --test-images")


def run_folds(args: argparse.Namespace) -> int:
    """Validate everything, then train/resume every arm x fold and summarize."""
    from nnunet_hyspark.benchmark.folds import build_spec, run_benchmark
    from nnunet_hyspark.benchmark.test_set import resolve_test_set
    from nnunet_hyspark.nnunet_compat import resolve_device

    if args.gpus is not None and len(set(args.gpus)) != len(args.gpus):
        from nnunet_hyspark.errors import HySparKError

        raise HySparKError(f"--gpus lists a GPU twice: {' '.join(args.gpus)}", "list each GPU id once")
    spec = build_spec(args.dataset, args.configuration, args.plans, args.arms, args.pretrained_weights,
                      args.folds, args.splits, args.output, args.compare, train_fractions=args.train_fractions,
                      case_id_pattern=args.case_id_pattern, allow_partial_splits=args.allow_partial_splits)
    spec.device = resolve_device(args.device, check=False).type  # the folds may run where this one does not
    test_set = resolve_test_set(spec, args.test_images, args.test_labels)  # checked before anything runs
    return run_benchmark(spec, gpus=args.gpus, dry_run=args.dry_run, force=args.force, test_set=test_set)


# --------------------------------------------------------------------------- summarize

def add_summarize_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyspark_benchmark summarize``."""
    _add_common(parser)


def run_summarize(args: argparse.Namespace) -> int:
    """Write the tables and plot from the folds finished so far."""
    from nnunet_hyspark.benchmark.folds import build_summary_spec, print_locations, summarize_benchmark

    spec = build_summary_spec(args.dataset, args.configuration, args.plans, args.arms, args.folds, args.output,
                              args.compare, train_fractions=args.train_fractions)
    written = summarize_benchmark(spec, force=args.force)
    print_locations(spec, written, sys.stdout)
    return 0


# --------------------------------------------------------------------------- registry

def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyspark_benchmark speed`` (defaults: :class:`~nnunet_hyspark.benchmark.speed.SpeedOptions`)."""
    from nnunet_hyspark.benchmark.speed import SpeedOptions
    from nnunet_hyspark.sparse.benchmark import AUTOCAST_DTYPES

    d = SpeedOptions()
    parser.add_argument("--backends", nargs="+", default=list(d.backends),
                        help="first one is the baseline; reference = the published formulation (dense CNN then "
                             "mask, plain decoder), dense / blocks / spconv = our step with that CNN backend")
    parser.add_argument("--what", nargs="+", default=list(d.what),
                        choices=["encoder", "pretrain", "finetune", "data"],
                        help="encoder alone, the full pre-training step, one fine-tuning step of HySparKUNet vs "
                             "nnU-Net's own network (first --batch, fp32, CPU), and/or the data pipeline (needs -d)")
    parser.add_argument("-b", "--batch", type=int, nargs="+", default=list(d.batches),
                        help="one or more batch sizes, every backend at each (samples/s in one table)")
    parser.add_argument("--patch", type=int, nargs="+", default=list(d.patch), help="one size (cubic) or three")
    parser.add_argument("--widths", default=d.widths, help="base, tiny, or five comma-separated widths")
    parser.add_argument("--mask-ratio", type=float, default=d.mask_ratio)
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help="untimed steps first; the process heap grows for about 4 steps at 96^3 (page faults), "
                             "so use 4 for steady-state figures there")
    parser.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    parser.add_argument("--precision", nargs="+", default=list(d.precision), choices=sorted(AUTOCAST_DTYPES),
                        help="one or more; e.g. 'fp32 bf16' times every backend in both, against fp32 + the "
                             "first backend")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: torch's)")
    parser.add_argument("-d", dest="dataset", default=d.dataset, help="preprocessed dataset for --what data")
    parser.add_argument("-p", dest="plans", default=d.plans)
    parser.add_argument("--output", default=d.output, help="folder for speed.json and speed.md")
    parser.add_argument("--malloc", default=d.malloc, choices=["reuse", "system"],
                        help="memory allocator of every row: reuse = keep freed memory for the next step (glibc: mmap "
                             "and trimming off), system = the C library's defaults; run both to see what it buys")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder (inductor) in the pretrain rows; off by default (compiling takes "
                             "minutes on a CPU; measured slower there: blocks fp32 at 96^3 on a 2-core Xeon with AMX, "
                             "1.09x slower, 10.96 s vs 10.03 s a step)")


def run_speed(args: argparse.Namespace) -> int:
    """Time the backends and print the table."""
    from nnunet_hyspark.benchmark.speed import SpeedOptions, run

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedOptions)}
    for k in ("backends", "what", "patch", "precision", "batch"):
        values[k] = tuple(values[k])
    md = run(SpeedOptions(**values))
    print("\n" + md.read_text() + f"\nwritten: {md.with_name('speed.json')}, {md}")
    return 0


def subcommands() -> dict[str, Subcommand]:
    """All subcommands, in --help order. EXTENSION POINT: add new subcommands here."""
    return {
        "folds": Subcommand(
            help="train (or resume) every arm x fold with nnUNetv2_train, then summarize",
            description="For every requested fold and arm run `nnUNetv2_train ID CONFIG FOLD -tr TRAINER -p PLANS "
                        "[-pretrained_weights FILE]`. Finished folds (validation/summary.json present) are skipped, "
                        "folds with a checkpoint are resumed with --c, others start fresh. Logs go to "
                        "OUTPUT/logs/<arm>_fold<F>.log, state to OUTPUT/benchmark.json; a failing fold is reported "
                        "and the others still run (exit status 1).",
            add_arguments=add_folds_arguments,
            run=run_folds,
        ),
        "summarize": Subcommand(
            help="tables (markdown, CSV), paired tests and a plot from the folds' validation summaries",
            description="Reads $nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG/fold_F/validation/summary.json "
                        "for every arm and fold and writes summary.md, summary.csv, summary_aggregate.csv, "
                        "summary_comparison.csv and summary.png into the benchmark folder. Missing or unfinished "
                        "folds are listed and excluded. Without --arms/-f the arms and folds of the benchmark's "
                        "manifest are used.",
            add_arguments=add_summarize_arguments,
            run=run_summarize,
        ),
        "speed": Subcommand(
            help="time the sparse backends: encoder alone, full pre-training step, data pipeline",
            description="In one run on this machine: median forward+backward+AdamW step time, samples per second "
                        "and peak memory of the masked encoder and of the full HySparK pre-training step for each "
                        "backend, with ratios against the first backend (dense); optionally crops per second of "
                        "the pre-training data pipeline. Writes OUTPUT/speed.json and OUTPUT/speed.md.",
            add_arguments=add_speed_arguments,
            run=run_speed,
        ),
    }


def build_parser(commands: dict[str, Subcommand] | None = None) -> argparse.ArgumentParser:
    """The argparse parser with one subparser per registered subcommand."""
    commands = subcommands() if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="hyspark_benchmark",
        description="Compare training arms (e.g. scratch vs. HySparK pre-trained) over nnU-Net cross-validation "
                    "folds. Run `hyspark_benchmark SUBCOMMAND --help` for details.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(commands) + "}", required=True)
    for name, cmd in commands.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hyspark_benchmark``; exits with the subcommand's status."""
    args = build_parser().parse_args(argv)
    status = args._run(args)
    if status:
        sys.exit(status)
    return 0


if __name__ == "__main__":
    main()
