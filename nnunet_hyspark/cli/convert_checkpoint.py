"""``hyspark_convert_checkpoint``: published HySparK checkpoints and channel adaptation.

Turns a file with the published key layout (or one of our weights files) into the
format ``nnUNetv2_train -tr nnUNetTrainerHySparKFinetune -pretrained_weights`` loads,
optionally adapting a 1-channel stem to N input channels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnunet_hyspark.convert import converted_network_weights, unwrap_state_dict
from nnunet_hyspark.errors import HySparKError, cli_entry
from nnunet_hyspark.weights import save_weights_file

# The published weights were pre-trained with HySparK's own preprocessing, not nnU-Net's plans.
REFERENCE_PREPROCESSING = {
    "spacing": [1.5, 1.5, 1.5],
    "normalization_schemes": ["HySparK reference: HU clipped to [-175, 250], scaled to [0, 1]"],
}


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
    if source_meta.get("network_class_name") in OWN_NETWORKS:
        _adapt_own(obj, source_meta, args, out)
        return
    weights, arch, report = converted_network_weights(unwrap_state_dict(obj), args.vit_heads, args.in_channels)
    if source_meta:  # one of ours: keep its provenance, update what changed
        meta = {**source_meta, "architecture": arch, "converted_from": str(args.source)}
    else:
        meta = {"method": "hyspark", "source": f"published HySparK checkpoint {args.source}", "architecture": arch,
                **REFERENCE_PREPROCESSING, "plans_check": "warn",
                "network_class_name": "nnunet_hyspark.models.unet.HySparKUNet", "pretrained_prefixes": ["encoder."],
                "decoder": "random initialisation (seed 0), not pre-trained"}
    meta["conversion_report"] = report
    save_weights_file(weights, meta, out)
    print(f"loaded {len(report['loaded'])} encoder tensors; ignored {len(report['ignored'])}; missing 0")
    for line in report["ignored"]:
        print(f"  ignored: {line}")
    print(f"architecture: {arch}")
    print(f"wrote {out} (+ {out.with_suffix('.json').name})")


#: weights files of our other methods' networks -> (method, module with ``adapt_weights_channels``, what it adapts)
OWN_NETWORKS = {
    "nnunet_hyspark.models.unetr.HiEndUNETR": ("Hi-End-MAE", "nnunet_hyspark.models.unetr", "patch embedding"),
    "nnunet_hyspark.models.mim_unet.MiMUNet": ("MiM", "nnunet_hyspark.models.mim_unet", "first convolution"),
}


def _adapt_own(obj: dict, meta: dict, args: argparse.Namespace, out: Path) -> None:
    """A Hi-End-MAE or MiM weights file (ours) only needs converting for another number of input channels."""
    import importlib

    method, module, first = OWN_NETWORKS[meta["network_class_name"]]
    if args.in_channels is None:
        raise HySparKError(f"{args.source} is a {method} weights file: it loads as it is",
                           f"give --in-channels N to adapt its {first} to N input channels")
    weights, meta = importlib.import_module(module).adapt_weights_channels(obj["network_weights"], meta,
                                                                           args.in_channels)
    save_weights_file(weights, {**meta, "converted_from": str(args.source)}, out)
    print(f"{first} repeated over {args.in_channels} input channels (scaled by 1/{args.in_channels}); "
          f"the parts that read the image directly and are not pre-trained re-initialised")
    print(f"wrote {out} (+ {out.with_suffix('.json').name})")


if __name__ == "__main__":
    main()
