"""``hyspark_synthesize``: write a synthetic abdomen-like CT dataset in nnU-Net v2 raw format."""
from __future__ import annotations

import argparse
import sys

from nnunet_hyspark.errors import cli_entry
from nnunet_hyspark import synthetic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyspark_synthesize",
        description=(
            "Write a synthetic abdomen-like CT dataset (HU values; air, fat, muscle, liver, spleen, kidneys, "
            "aorta, spine, ribs, lungs, noise) as an nnU-Net v2 raw dataset "
            "<root>/DatasetXXX_Name/{imagesTr,labelsTr,dataset.json}. "
            f"Labels: {synthetic.LABELS}. The anatomy has a fixed physical size in mm (body cross-section up "
            f"to about {synthetic.PHANTOM_EXTENT_MM[0]:g} x {synthetic.PHANTOM_EXTENT_MM[1]:g} mm), so the voxel "
            "spacing (also anisotropic) changes the sampling, not the organ sizes. The same --seed gives the "
            "same cases; case k does not depend on --num-cases."
        ),
    )
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id, 1..999")
    p.add_argument("--name", default=None,
                   help=f"dataset name (default {synthetic.DEFAULT_NAME}, or {synthetic.DEFAULT_NAME_UNLABELED} "
                        "with --unlabeled)")
    p.add_argument("--num-cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(synthetic.DEFAULT_SHAPE),
                   help="voxels per axis, each >= %d (default %s)" % (
                       synthetic.MIN_SHAPE, " ".join(map(str, synthetic.DEFAULT_SHAPE))))
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   default=list(synthetic.DEFAULT_SPACING),
                   help="voxel size in mm, anisotropic allowed, e.g. 1.0 1.0 3.0 (default %s)" % (
                       " ".join(map(str, synthetic.DEFAULT_SPACING))))
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--unlabeled", action="store_true",
                   help="images only: imagesTr without labelsTr, dataset.json labels just {'background': 0}. "
                        "Such a dataset is meant for self-supervised pre-training collections, not for "
                        "supervised nnU-Net training")
    p.add_argument("--output-root", default=None,
                   help="folder to write DatasetXXX_Name into (default: $nnUNet_raw)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing dataset with this id (any name); without it an existing "
                        "DatasetXXX_* folder is an error")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = synthetic.write_dataset(
        args.output_root, args.dataset_id, args.name, num_cases=args.num_cases, shape=args.shape,
        spacing=args.spacing, seed=args.seed, unlabeled=args.unlabeled, force=args.force,
        progress=True)
    fov = [n * s for n, s in zip(args.shape, args.spacing)]
    if fov[0] < synthetic.PHANTOM_EXTENT_MM[0] or fov[1] < synthetic.PHANTOM_EXTENT_MM[1]:
        print(f"note: the field of view {fov[0]:g} x {fov[1]:g} mm is smaller than the phantom body (up to "
              f"{synthetic.PHANTOM_EXTENT_MM[0]:g} x {synthetic.PHANTOM_EXTENT_MM[1]:g} mm): the body may be cut "
              "at the image border", file=sys.stderr)
    kind = "unlabeled" if args.unlabeled else "labelled"
    print(f"wrote {args.num_cases} {kind} case(s) to {folder}")
    return 0


if __name__ == "__main__":
    main()
