"""``hyspark_export_weights CHECKPOINT OUT``: a ``-pretrained_weights`` file from any pre-training checkpoint.

Pick the checkpoint to fine-tune from: ``checkpoint_best.pth`` (best linear-probe Dice, or best
validation loss without a probe), ``checkpoint_latest.pth`` (a run still going) or
``checkpoint_final.pth``. The file is what the run itself writes as ``encoder_weights.pth`` (with its
``.json`` sidecar: method, plans, preprocessing, the paper to cite, and which checkpoint and step it
comes from).
"""
from __future__ import annotations

import argparse
import sys

from nnunet_hyspark.errors import cli_entry
from nnunet_hyspark.methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyspark_export_weights", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Please cite the paper of the method the checkpoint was pre-trained with: "
               + " ".join(f"{s.title}: {s.citation}" for s in METHODS.values()))
    p.add_argument("checkpoint", help="checkpoint_best.pth, checkpoint_latest.pth or checkpoint_final.pth of a "
                                      "hyspark_pretrain output folder")
    p.add_argument("out", help="weights file to write (.pth; a .json sidecar is written beside it)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from nnunet_hyspark.methods import get_method
    from nnunet_hyspark.pretraining.export import export_checkpoint
    from nnunet_hyspark.weights import load_weights_file

    weights = export_checkpoint(args.checkpoint, args.out, force=args.force)
    _, meta = load_weights_file(weights)
    spec = get_method(meta["method"])
    print(f"encoder weights: {weights} (from {args.checkpoint}, step {meta.get('steps')})")
    print(f"fine-tune with: nnUNetv2_train DATASET {meta.get('configuration', '3d_fullres')} FOLD -tr "
          f"{spec.finetune_trainer} -p {meta.get('plans_name', spec.plans_name)} -pretrained_weights {weights}")
    print(f"cite: {meta.get('citation', spec.citation)}")


if __name__ == "__main__":
    sys.exit(main())
