"""``hyspark_plan_and_preprocess``: nnU-Net's fingerprint, a method's planner, nnU-Net's preprocessing.

The work is done by :mod:`nnunet_hyspark.planning` (what is checked, planned, written and rolled
back is described there); this module parses the options and prints.
"""
from __future__ import annotations

import argparse
import inspect
import sys

from nnunet_hyspark.errors import cli_entry
from nnunet_hyspark.methods import METHODS
from nnunet_hyspark.planning import from_images
from nnunet_hyspark.planning import run as planning


def _network_help() -> str:
    parts = []
    for name, spec in METHODS.items():
        planner = planning.planner_class(name)
        network = spec.network.class_name.rsplit(".", 1)[-1]
        multiple = ("multiples of --vit-patch" if "vit_patch" in inspect.signature(planner).parameters
                    else f"multiples of {planner.patch_multiple}")
        parts.append(f"{name} = {network}, for {spec.title} pre-training and {spec.finetune_trainer} (plans "
                     f"{spec.plans_name}, patch axes {multiple})")
    return "network of the 3D configurations: " + "; ".join(parts) + " (default: hyspark)"


def build_parser() -> argparse.ArgumentParser:
    from nnunet_hyspark.planners import hiend_mae_planner

    gpu_default = planning.default_gpu_memory_target()
    presets = "; ".join(f"{n}: {', '.join(sorted(planning.planner_class(n).arch_presets))}" for n in METHODS)
    p = argparse.ArgumentParser(
        prog="hyspark_plan_and_preprocess",
        description=(
            "nnU-Net v2 fingerprint extraction, experiment planning with the HySparK hybrid CNN/ViT network "
            "(3D configurations; patch sizes multiples of 16; batch size from a GPU memory estimate) and "
            "preprocessing. Labelled datasets only need -d. Unlabeled image collections (imagesTr only, for "
            "pre-training) need --plans-from LABELLED_ID: they are preprocessed with that dataset's plans "
            "(same spacing and CT normalisation). Any folder of CT becomes such a collection with --images DIR "
            "--plans-from LABELLED_ID. The 2d configuration, if requested, keeps nnU-Net's plain "
            "2D U-Net."),
    )
    p.add_argument("-d", nargs="+", default=None, metavar="ID",
                   help="dataset id(s) or name(s) in $nnUNet_raw; with --images: the id of the new dataset "
                        f"(default: the first free id from {from_images.FIRST_FREE_ID})")
    p.add_argument("--images", nargs="+", default=None, metavar="DIR",
                   help="folders of CT (NIfTI, NRRD, MHA files and DICOM series, one series per folder; searched "
                        "recursively) or JSON lists of image paths: written as a new unlabeled raw dataset, then "
                        "preprocessed with --plans-from's plans. NIfTI files are linked, others converted")
    p.add_argument("--name", default=None,
                   help="--images: the new dataset's name, DatasetXXX_NAME (default: the first folder's name)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="--images: leave out unreadable files, non-3D images and duplicate case names (listed "
                        "in dataset.json) instead of refusing them")
    p.add_argument("--copy", action="store_true", help="--images: copy NIfTI files instead of linking them")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], metavar="CONFIG",
                   help="configurations to preprocess (default: 3d_fullres). 3d_lowres exists only where "
                        "nnU-Net would create one")
    p.add_argument("-np", type=int, default=None, metavar="N",
                   help="processes for fingerprint extraction and preprocessing (default: nnU-Net's default, "
                        "$nnUNet_def_n_proc or 8)")
    p.add_argument("--network", choices=sorted(METHODS), default="hyspark", help=_network_help())
    p.add_argument("--vit-patch", type=int, choices=list(hiend_mae_planner.VIT_PATCHES), default=None,
                   help=f"--network hiend_mae only: the ViT patch, i.e. the patch-size multiple (default: "
                        f"{hiend_mae_planner.HiEndMAEPlanner.patch_multiple})")
    p.add_argument("--arch", choices=planning.arch_choices(), default="base",
                   help=f"network size: base = the published network, tiny = for CPU demos and tests; the presets of "
                        f"each --network: {presets} (default: base)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="fix the 3d_fullres patch size (multiples of 16, in the axis order of the plans, i.e. "
                        "after nnU-Net's transpose; default: chosen from the data and the memory target)")
    p.add_argument("--gpu-memory-target", type=float, default=gpu_default, metavar="GB",
                   help=f"GPU memory per training process the plans may use, in GB (default "
                        f"{gpu_default:g}, like nnU-Net's ResEnc-L preset; nnU-Net's plain default "
                        f"is 8 for its own, smaller network)")
    p.add_argument("--plans-name", default=None,
                   help="plans identifier (default: the --network's, "
                        + ", ".join(f"{n} {s.plans_name}" for n, s in METHODS.items()) + ")")
    p.add_argument("--plans-from", default=None, metavar="SOURCE_ID",
                   help="use the plans of this (already planned) dataset instead of planning: needed for "
                        "unlabeled image collections; also works for labelled datasets, like "
                        "nnUNetv2_move_plans_between_datasets followed by preprocessing")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="accept channels other than CT (the hybrid plans and pre-training assume CT "
                        "normalisation; other channels get nnU-Net's normalisation for their name)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="run nnU-Net's dataset integrity check first (labelled datasets)")
    p.add_argument("--replace-non-finite", type=float, default=None, metavar="VALUE",
                   help="replace NaN/inf voxels of the images by VALUE while preprocessing (e.g. -1000, air in CT); "
                        "without it an image with NaN/inf is refused, naming the case")
    p.add_argument("--clean", action="store_true",
                   help="re-extract the dataset fingerprint even if one exists (like nnU-Net's --clean)")
    return p


def options_from_args(args: argparse.Namespace) -> planning.PlanOptions:
    """The typed options of a parsed command line."""
    return planning.PlanOptions(
        datasets=tuple(args.d or ()), configurations=tuple(args.c), num_processes=args.np, network=args.network,
        vit_patch=args.vit_patch, arch=args.arch, patch_size=tuple(args.patch_size) if args.patch_size else None,
        gpu_memory_target=args.gpu_memory_target, plans_name=args.plans_name, plans_from=args.plans_from,
        allow_non_ct=args.allow_non_ct, verify_dataset_integrity=args.verify_dataset_integrity, clean=args.clean,
        images=tuple(args.images) if args.images else None, name=args.name, skip_unreadable=args.skip_unreadable,
        copy=args.copy, replace_non_finite=args.replace_non_finite)


def _validate_args(args: argparse.Namespace) -> None:
    """Check the options; fills in ``args.plans_name`` (the method's) like the command does."""
    args.plans_name = planning.resolve_options(options_from_args(args)).plans_name


@cli_entry
def main(argv: list[str] | None = None) -> int:
    # 0. --images: the folders become a raw dataset (removed again if a later step fails)
    with from_images.images_as_dataset(options_from_args(build_parser().parse_args(argv))) as (options, imported):
        if imported is not None:
            print(f"{imported.folder}: {imported.num_images} images"
                  + (f", {len(imported.skipped)} inputs skipped (listed in its dataset.json)" if imported.skipped
                     else ""))
        run = planning.prepare(options)  # 1. check everything first
        for name in run.names:  # 2. one dataset at a time, each all-or-nothing
            for line in planning.summary_lines(planning.run_dataset(run, name)):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
