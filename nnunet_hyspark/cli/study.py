"""``python -m nnunet_hyspark.cli.study`` (``scripts/study.sh``): does HySparK pre-training pay on synthetic CT?

Synthesises a labelled CT dataset and an unlabeled collection 4x larger, pre-trains HySparK on both,
then trains nnU-Net's own network, HySparK from scratch and HySparK fine-tuned at two label fractions
over a 3-fold split with ``hyspark_benchmark folds`` and writes the tables and figures with
``hyspark_benchmark summarize``. About 46 minutes on 2 CPU cores (measured); ``--smoke`` runs the same pipeline in
a few minutes (few cases, one fold, 3 iterations per training) to check that it works, not what it finds.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from nnunet_hyspark.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    from nnunet_hyspark.benchmark.study import StudyOptions

    d = StudyOptions()
    p = argparse.ArgumentParser(prog="study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default=d.output, help="folder for all study data and results")
    p.add_argument("--smoke", action="store_true", help="a minutes-long check of the pipeline (not a result)")
    p.add_argument("--labelled-cases", type=int, default=None, help=f"default {d.labelled_cases}")
    p.add_argument("--unlabeled-cases", type=int, default=None, help=f"default {d.unlabeled_cases}")
    p.add_argument("--folds", type=int, default=None, help=f"k of the k-fold split, all trained (default {d.folds})")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help=f"label fractions (default {' '.join(map(str, d.fractions))})")
    p.add_argument("--pretrain-epochs", type=int, default=None, help=f"default {d.pretrain_epochs}")
    p.add_argument("--pretrain-iterations", type=int, default=None, help=f"default {d.pretrain_iterations}")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    p.add_argument("--force", action="store_true", help="delete an existing study folder first")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from nnunet_hyspark.benchmark import study

    args = build_parser().parse_args(argv)
    given = {k: v for k, v in {
        "output": args.output, "labelled_cases": args.labelled_cases, "unlabeled_cases": args.unlabeled_cases,
        "folds": args.folds, "fractions": tuple(args.fractions) if args.fractions else None,
        "pretrain_epochs": args.pretrain_epochs, "pretrain_iterations": args.pretrain_iterations,
        "device": args.device}.items() if v is not None}
    opts = study.smoke_options(**given) if args.smoke else study.StudyOptions(**given)
    study.check_options(opts)
    if args.dry_run:
        for title, cmd in study.commands(opts, Path(opts.output).resolve()):
            print(f"# {title}\n{shlex.join(cmd)}")
        return 0
    bench = study.run_study(opts, force=args.force, out=sys.stdout)
    print(f"\nstudy finished; tables and figures: {bench}/summary.md (and summary*.png, *.csv), "
          f"commands and wall times: {bench.parent / study.STUDY_FILE}")
    return 0


if __name__ == "__main__":
    main()
