"""``hyspark_convert_checkpoint``: published HySparK checkpoints and channel adaptation.

Turns a file with the published key layout (or one of our weights files) into the
format ``nnUNetv2_train -tr nnUNetTrainerHySparKFinetune -pretrained_weights`` loads,
optionally adapting a 1-channel stem to N input channels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnunet_hyspark.errors import HySparKError, cli_entry
from nnunet_hyspark.methods import MethodSpec, get_method, method_for_network
from nnunet_hyspark.weights import save_weights_file

#: what a file without our metadata is taken for: the command converts this method's published checkpoints
PUBLISHED_METHOD = "hyspark"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hyspark_convert_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="published HySparK .pth (embeddings.*, mae.* keys) or one of our weights files")
    p.add_argument("output", help="weights file to write (a .json sidecar is written beside it)")
    p.add_argument("--in-channels", type=int, default=None, help="adapt the stem to this many input channels")
    p.add_argument("--vit-heads", type=int, default=12, help="attention heads (not visible in tensor shapes)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    args = p.parse_args(argv)

    out = Path(args.output)
    if out.exists() and not args.force:
        raise HySparKError(f"{out} exists", "choose another output or pass --force")
    try:
        obj = torch.load(args.source, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise HySparKError(f"checkpoint not found: {args.source}") from None
    except Exception as e:
        raise HySparKError(f"cannot read {args.source}: {type(e).__name__}: {e}", "is it a torch checkpoint?") from e
    source_meta = obj.get("hyspark_meta", {}) if isinstance(obj, dict) else {}
    spec = method_for_network(source_meta.get("network_class_name", ""))
    if spec is not None and spec.convert_published is None:  # ours, of a method without published checkpoints
        _adapt_own(obj, source_meta, spec, args.source, args.in_channels, out)
        return
    spec = spec or get_method(PUBLISHED_METHOD)
    weights, meta, report = spec.convert_published(obj, args.vit_heads, args.in_channels, str(args.source))
    save_weights_file(weights, meta, out)
    print(f"loaded {len(report['loaded'])} encoder tensors; ignored {len(report['ignored'])}; missing 0")
    for line in report["ignored"]:
        print(f"  ignored: {line}")
    print(f"architecture: {meta['architecture']}")
    print(f"wrote {out} (+ {out.with_suffix('.json').name})")


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
