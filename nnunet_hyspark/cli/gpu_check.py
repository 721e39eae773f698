"""``python -m nnunet_hyspark.cli.gpu_check OUT_DIR`` (what ``scripts/gpu_check.sh`` runs): the first check of a
CUDA machine -- CUDA tests, speed table, peak memory against the planner, bf16 vs fp32 loss curves -- into
OUT_DIR/report.md and report.json. See :mod:`nnunet_hyspark.benchmark.gpu_check`."""
from __future__ import annotations

import argparse

from nnunet_hyspark.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    from nnunet_hyspark.benchmark.gpu_options import STAGES, GpuCheckOptions

    d = GpuCheckOptions()
    p = argparse.ArgumentParser(
        prog="gpu_check", description="The first check of a CUDA machine: the CUDA tests, the speed table, peak "
        "memory against the planner's estimate, bf16 vs fp32 loss curves -> OUTPUT/report.md and report.json.")
    p.add_argument("output", nargs="?", default=d.output, help="report folder (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (runs on a CPU in about a minute)")
    p.add_argument("--device", default=d.device, choices=["auto", "cuda", "cpu"], help="default: %(default)s")
    p.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                   help=f"stages to run, in order (default: {' '.join(STAGES)})")
    p.add_argument("--methods", nargs="+", default=list(d.methods), metavar="METHOD",
                   help="methods of the memory stage (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all stages together (default: {d.budget_s:g}; --smoke: 300)")
    p.add_argument("--loss-steps", type=int, default=None, help=f"steps per precision (default: {d.loss_steps})")
    p.add_argument("--loss-patch", type=int, default=None, help=f"cubic patch of the loss curves (default: {d.loss_patch})")
    p.add_argument("--loss-batch", type=int, default=None, help=f"batch of the loss curves (default: {d.loss_batch})")
    p.add_argument("--patch", type=int, default=None, help=f"cubic patch of speed and memory (default: {d.patch})")
    p.add_argument("--batch", type=int, default=None, help="batch of speed and memory (default: the planner's)")
    p.add_argument("--in-process", action="store_true",
                   help="run the stages in this process (no hard time limit per stage; for debugging)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from nnunet_hyspark.benchmark.gpu_check import run
    from nnunet_hyspark.benchmark.gpu_options import GpuCheckOptions, check_options, smoke_options

    args = build_parser().parse_args(argv)
    given = {k: v for k, v in dict(budget_s=args.budget_s, loss_steps=args.loss_steps, loss_patch=args.loss_patch,
                                   loss_batch=args.loss_batch, patch=args.patch, batch=args.batch).items()
             if v is not None}
    common = dict(output=args.output, device=args.device, stages=tuple(args.stages), methods=tuple(args.methods),
                  isolate=not args.in_process)
    opts = smoke_options(**common, **given) if args.smoke else GpuCheckOptions(**common, **given)
    check_options(opts)
    md = run(opts)
    print(f"report: {md} (and {md.with_suffix('.json').name}, loss_curves.png, gpu_check.log beside it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
