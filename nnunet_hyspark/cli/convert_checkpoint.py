"""``hyspark_convert_checkpoint``: published HySparK checkpoints and channel adaptation.

Turns a file with the published key layout (or one of our weights files) into the
format ``nnUNetv2_train -tr nnUNetTrainerHySparKFinetune -pretrained_weights`` loads,
optionally adapting a 1-channel stem to N input channels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_hyspark.errors import HySparKError, cli_entry
from nnunet_hyspark.io import check_writable
from nnunet_hyspark.methods import MethodSpec, get_method, method_for_network, method_for_published
from nnunet_hyspark.safe_load import load_user_file
from nnunet_hyspark.weights import own_file_meta, save_weights_file

#: what a file without our metadata is taken for: the command converts this method's published checkpoints
PUBLISHED_METHOD = "hyspark"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hyspark_convert_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="published HySparK .pth (embeddings.*, mae.* keys) or one of our weights files")
    p.add_argument("output", help="weights file to write (a .json sidecar is written beside it)")
    p.add_argument("--in-channels", type=int, default=None, help="adapt the stem to this many input channels")
    p.add_argument("--vit-heads", type=int, default=None,
                   help="attention heads (not visible in tensor shapes); default: the published model's "
                        "(HySparK 12; Hi-End-MAE 12 at width 768, 16 at 1536)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle SOURCE fully: allows pickled Python objects besides tensors and argparse.Namespace, "
                        "which can run code stored in the file; only for files whose origin you trust")
    args = p.parse_args(argv)
    _validate(args)

    out = Path(args.output)
    if out.exists() and not args.force:
        raise HySparKError(f"{out} exists", "choose another output or pass --force")
    check_writable(out.parent.absolute())
    obj = load_user_file(args.source, "checkpoint", trust=args.trust_checkpoint, trust_flag="--trust-checkpoint")
    source_meta = own_file_meta(obj, args.source)
    spec = None
    if source_meta is not None:  # one of our files: its stored architecture (vit_heads, ...) is kept
        spec = method_for_network(source_meta["network_class_name"])
        if spec is None:
            raise HySparKError(f"{args.source} names network {source_meta['network_class_name']}, which no method "
                               "provides", "convert it with the nnunet-hyspark version that wrote it")
        _check_own_vit_heads(source_meta, args.vit_heads, argv)
        _adapt_own(obj, source_meta, spec, args.source, args.in_channels, out)
        return
    spec = method_for_published(obj) or get_method(PUBLISHED_METHOD)  # each method recognises its own layout
    heads = {} if args.vit_heads is None else {"vit_heads": args.vit_heads}  # else the method's published default
    weights, meta, report = spec.convert_published(obj, in_channels=args.in_channels, source=str(args.source),
                                                   **heads)
    save_weights_file(weights, {"citation": spec.citation, **meta}, out)  # the published weights' paper
    print(f"loaded {len(report['loaded'])} encoder tensors; ignored {len(report['ignored'])}; "
          f"missing {len(report['missing'])}")
    for what in ("ignored", "missing"):  # missing: tensors the file lacks, set to their initial value (MiM)
        for line in report[what]:
            print(f"  {what}: {line}")
    print(f"architecture: {meta['architecture']}")
    print(f"wrote {out} (+ {out.with_suffix('.json').name})")


def _validate(args: argparse.Namespace) -> None:
    """Ranges up front: a stem with 0 input channels or 0 heads would be written without complaint."""
    if args.in_channels is not None and args.in_channels < 1:
        raise HySparKError(f"--in-channels must be >= 1 (got {args.in_channels})",
                           "give the number of input channels (modalities) of the dataset you fine-tune on")
    if args.vit_heads is not None and args.vit_heads < 1:
        raise HySparKError(f"--vit-heads must be >= 1 (got {args.vit_heads})",
                           "give the attention heads of the published model (12 for the published HySparK)")


def _check_own_vit_heads(meta: dict, vit_heads: int, argv: list[str] | None) -> None:
    """Our files store their heads; an explicit different --vit-heads would silently change the network."""
    given = any(a == "--vit-heads" or a.startswith("--vit-heads=") for a in (sys.argv[1:] if argv is None else argv))
    stored = meta["architecture"].get("vit_heads")
    if given and stored is not None and stored != vit_heads:
        raise HySparKError(f"--vit-heads {vit_heads} differs from the {stored} heads stored in the weights file",
                           "leave --vit-heads out: files written by nnunet-hyspark keep their own architecture")


def _adapt_own(obj: dict, meta: dict, spec: MethodSpec, source: str, in_channels: int | None, out: Path) -> None:
    """A weights file of ours only needs converting for another number of input channels."""
    first = spec.network.stem_name
    if in_channels is None:
        raise HySparKError(f"{source} is a {spec.title} weights file: it loads as it is",
                           f"give --in-channels N to adapt its {first} to N input channels")
    weights, meta = spec.network.adapt_channels(obj["network_weights"], meta, in_channels)
    save_weights_file(weights, {**meta, "converted_from": str(source)}, out)
    print(f"{first} repeated over {in_channels} input channels (scaled by 1/{in_channels}); "
          f"the parts that read the image directly and are not pre-trained re-initialised")
    print(f"wrote {out} (+ {out.with_suffix('.json').name})")


if __name__ == "__main__":
    main()
