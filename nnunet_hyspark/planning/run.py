"""``hyspark_plan_and_preprocess`` as a library: nnU-Net's fingerprint, a method's planner, nnU-Net's preprocessing.

Labelled datasets go through nnU-Net's own steps (fingerprint extraction, planning with the
``--network`` method's planner instantiated directly, ``preprocess_dataset``), so the output is
exactly what ``nnUNetv2_plan_and_preprocess`` would write, under the method's plans name (e.g.
``nnUNetHySparKPlans``). Unlabeled image collections are preprocessed with the plans of a labelled
dataset (``--plans-from``, see :mod:`.nnunet_steps`); an unlabeled dataset without it is refused:
nnU-Net's fingerprint takes the CT intensity statistics from labelled foreground, and pre-training
must see the intensities that fine-tuning will see.

Nothing is half-written: every input is checked first (:mod:`.raw_checks`), and if a later step
fails, the dataset's folder in ``nnUNet_preprocessed`` is put back as it was (:mod:`.rollback`).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import METHODS, get_method, method_for_network
from nnunet_hyspark.patch_rules import check_patch_multiple
from nnunet_hyspark.io import check_writable, remove_atomic_leftovers
from nnunet_hyspark.planning import completeness, finite, nnunet_steps, raw_checks
from nnunet_hyspark.planning.rollback import Rollback


@dataclass(frozen=True)
class PlanOptions:
    """What ``hyspark_plan_and_preprocess`` does; None = the method's / nnU-Net's default."""

    datasets: tuple[str, ...]
    configurations: tuple[str, ...] = ("3d_fullres",)
    num_processes: int | None = None  # nnU-Net's default_num_processes
    network: str = "hyspark"  # a method name: its planner, network and plans name
    vit_patch: int | None = None  # planners that take a ViT patch (Hi-End-MAE)
    arch: str = "base"
    patch_size: tuple[int, ...] | None = None  # 3d_fullres, in the plans' axis order
    gpu_memory_target: float | None = None  # GB; None = the planner's default
    plans_name: str | None = None  # None = the method's
    plans_from: str | None = None  # use this planned dataset's plans instead of planning
    allow_non_ct: bool = False
    verify_dataset_integrity: bool = False
    clean: bool = False  # re-extract the fingerprint
    #: --images: folders / JSON lists of CT written as a new raw dataset first (:mod:`.from_images`);
    #: ``datasets`` then holds at most the new id
    images: tuple[str, ...] | None = None
    name: str | None = None  # --name of that dataset (default: the first folder's name)
    skip_unreadable: bool = False
    copy: bool = False  # copy NIfTI files instead of linking them
    replace_non_finite: float | None = None  # NaN/inf voxels: None = refuse the dataset, else replace by this


def planner_class(network: str) -> type:
    """The planner class of a method (its spec's dotted ``planner`` path)."""
    module, _, name = get_method(network).planner.rpartition(".")
    return getattr(importlib.import_module(module), name)


def arch_choices() -> list[str]:
    """Every network size preset of every method's planner (``--arch`` choices)."""
    return sorted(set().union(*(planner_class(n).arch_presets for n in METHODS)))


def default_gpu_memory_target(network: str = "hyspark") -> float:
    """The GPU memory target a planner uses when none is given (GB)."""
    return float(inspect.signature(planner_class(network)).parameters["gpu_memory_target_in_gb"].default)


def _takes_vit_patch(planner: type) -> bool:
    return "vit_patch" in inspect.signature(planner).parameters


def resolve_options(opts: PlanOptions) -> PlanOptions:
    """Check the options (no files read) and fill in the defaults; HySparKError for the first problem."""
    spec = get_method(opts.network)
    planner = planner_class(opts.network)
    if opts.arch not in planner.arch_presets:
        raise HySparKError(f"--arch {opts.arch} is not a preset of --network {opts.network}",
                           f"choose one of {sorted(planner.arch_presets)}")
    if opts.vit_patch is not None and not _takes_vit_patch(planner):
        users = [n for n in METHODS if _takes_vit_patch(planner_class(n))]
        raise HySparKError(f"--vit-patch is for --network {' / '.join(users)}, not {opts.network}",
                           "leave out --vit-patch")
    multiple = opts.vit_patch or planner.patch_multiple
    if opts.patch_size is not None:
        check_patch_multiple(opts.patch_size, multiple, "--patch-size",
                             why=f"the {opts.network} network downsamples by {multiple}",
                             hint="use e.g. {lo} or {hi} on axis {axis}")
    gpu = opts.gpu_memory_target if opts.gpu_memory_target is not None else default_gpu_memory_target(opts.network)
    if not gpu > 0:
        raise HySparKError(f"--gpu-memory-target must be positive, got {gpu:g}",
                           "give the GPU memory in GB, e.g. --gpu-memory-target 24")
    if opts.replace_non_finite is not None and not math.isfinite(opts.replace_non_finite):
        raise HySparKError(f"--replace-non-finite must be a finite number, got {opts.replace_non_finite}",
                           "e.g. --replace-non-finite -1000 (air in CT)")
    if opts.num_processes is not None and opts.num_processes < 1:
        raise HySparKError(f"-np must be at least 1, got {opts.num_processes}", "e.g. -np 4")
    plans_name = opts.plans_name if opts.plans_name is not None else spec.plans_name
    if not plans_name or os.sep in plans_name:
        raise HySparKError(f"invalid plans name {plans_name!r}", "use a plain identifier, e.g. nnUNetHySparKPlans")
    return replace(opts, plans_name=plans_name, gpu_memory_target=gpu)


# ------------------------------------------------------------------------------------------ step 1: checks


@dataclass
class PreparedRun:
    """Everything checked before anything is written: the datasets, their cases, the plans source."""

    options: PlanOptions  # resolved (plans_name, num_processes set)
    raw: str
    preprocessed: str
    names: list[str]
    source: str | None
    dataset_jsons: dict[str, dict] = field(default_factory=dict)
    cases: dict[str, dict] = field(default_factory=dict)
    labelled: dict[str, bool] = field(default_factory=dict)
    non_finite: dict[str, list[str]] = field(default_factory=dict)  # replaced (--replace-non-finite) per dataset


def _raw_dataset(ident: str, raw: str) -> str:
    name = compat.dataset_name(ident)
    if not os.path.isdir(os.path.join(raw, name)):
        raise HySparKError(f"dataset {name} has no raw data folder in nnUNet_raw={raw}",
                           "put the dataset in $nnUNet_raw in nnU-Net's raw format")
    return name


def prepare(opts: PlanOptions) -> PreparedRun:
    """Resolve the options and check every input (datasets, files, plans source) before writing anything."""
    opts = resolve_options(opts)
    env = compat.require_nnunet_env(("nnUNet_raw", "nnUNet_preprocessed"))
    raw, pre = env["nnUNet_raw"], env["nnUNet_preprocessed"]
    check_writable(pre, "nnUNet_preprocessed folder")  # now, not after the fingerprint of every dataset
    if opts.num_processes is None:
        from nnunetv2.configuration import default_num_processes

        opts = replace(opts, num_processes=default_num_processes)
    if opts.plans_from is not None and opts.patch_size is not None:
        raise HySparKError("--patch-size cannot be combined with --plans-from (the source's plans fix the patch)",
                           "leave out one of them")
    names = list(dict.fromkeys(_raw_dataset(d, raw) for d in opts.datasets))
    source = None
    if opts.plans_from is not None:
        source = _raw_dataset(opts.plans_from, raw)
        if source in names:
            raise HySparKError(f"--plans-from {source} is also a target (-d)", "plan the source first, on its own")
    run = PreparedRun(opts, raw, pre, names, source)
    from nnunet_hyspark.planning.image_collection import remove_stale_temporaries

    for leftover in remove_stale_temporaries(raw):  # hidden dataset folders of killed --images imports
        print(f"removed {leftover} (left by an interrupted import)", file=sys.stderr)
    for name in names:
        dj = run.dataset_jsons[name] = raw_checks.load_dataset_json(name, raw)
        raw_checks.check_channels(name, dj, opts.allow_non_ct)
        cases = run.cases[name] = raw_checks.list_cases(name, raw, dj)
        labelled = run.labelled[name] = raw_checks.is_labelled(name, cases)
        if not labelled and source is None:
            raise HySparKError(
                f"{name} has no labels (an image collection): its own fingerprint would have no labelled foreground "
                f"for the CT intensity statistics",
                f"preprocess it with the plans of a labelled CT dataset: hyspark_plan_and_preprocess -d "
                f"{compat.dataset_id(name)} --plans-from LABELLED_ID")
        raw_checks.precheck_files(name, cases, labelled, opts.num_processes)
        run.non_finite[name] = finite.check_finite(name, cases, opts.num_processes, opts.replace_non_finite)
        for note in run.non_finite[name]:
            print(f"warning: {note}", file=sys.stderr)
        if opts.verify_dataset_integrity and labelled:
            from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

            try:
                verify_dataset_integrity(os.path.join(raw, name), opts.num_processes)
            except Exception as e:
                raise HySparKError(f"{name}: nnU-Net's dataset integrity check failed: {raw_checks.first_line(e)}",
                                   "fix the dataset (see nnU-Net's dataset_format documentation)") from None
    if source is not None:
        _check_source(run)
    return run


def _check_source(run: PreparedRun) -> None:
    """The source's plans must exist and fit the targets' channels."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    path = compat.plans_file(run.source, run.options.plans_name)
    if not path.is_file():
        raise HySparKError(f"--plans-from {run.source}: no plans {path}",
                           f"plan the source first: hyspark_plan_and_preprocess -d {compat.dataset_id(run.source)}")
    cfg = next(iter(load_json(str(path)).get("configurations", {}).values()), {})
    n_source = len(cfg.get("normalization_schemes", []))
    for name, dj in run.dataset_jsons.items():
        n = len(raw_checks.channels(dj))
        if n_source and n != n_source:
            raise HySparKError(f"{name} has {n} channel(s), the plans of {run.source} are for {n_source}",
                               "use a source dataset with the same channels")


# ------------------------------------------------------------------------------------------ step 2: one dataset


@dataclass
class DatasetResult:
    """What was written for one dataset."""

    name: str
    plans_file: str
    configurations: list[str]
    notes: list[str]  # planner warnings


def _plan(name: str, opts: PlanOptions) -> list[str]:
    planner = planner_class(opts.network)(
        name, gpu_memory_target_in_gb=opts.gpu_memory_target, plans_name=opts.plans_name, arch=opts.arch,
        patch_size=opts.patch_size, **({"vit_patch": opts.vit_patch} if opts.vit_patch else {}))
    planner.plan_experiment()
    for n in planner.hyspark_notes:
        print(n, file=sys.stderr)
    return planner.hyspark_notes


def run_dataset(run: PreparedRun, name: str) -> DatasetResult:
    """Plan (or copy the plans of ``--plans-from``) and preprocess one dataset, all or nothing."""
    opts, cases, labelled = run.options, run.cases[name], run.labelled[name]
    folder = os.path.join(run.preprocessed, name)
    plans_path = os.path.join(folder, opts.plans_name + ".json")
    tx = Rollback(folder)
    remove_atomic_leftovers(folder)  # .tmp files of a killed run (one run per dataset writes here)
    notes: list[str] = []
    try:
        for f in ("dataset_fingerprint.json", opts.plans_name + ".json", "dataset.json", "splits_final.json"):
            tx.keep_file(os.path.join(folder, f))
        if run.source is None:
            try:
                if run.non_finite.get(name):  # statistics of the replaced values (an old fingerprint has NaN)
                    nnunet_steps.fingerprint(name, opts.num_processes, True, replace_value=opts.replace_non_finite)
                else:
                    nnunet_steps.fingerprint(name, opts.num_processes, opts.clean)
            except Exception as e:
                err = raw_checks.explain_failure(name, cases, labelled)
                if err is None:
                    raise
                raise err from e
            notes = _plan(name, opts)
        else:
            nnunet_steps.transfer_plans(run.source, name, opts.plans_name, run.preprocessed, run.raw)
        pm = compat.load_plans_manager(name, opts.plans_name, run.preprocessed)
        configurations = [c for c in opts.configurations if c in pm.available_configurations]
        for c in opts.configurations:
            if c not in configurations:
                print(f"INFO: configuration {c} is not in the plans of {name} (nnU-Net created none); skipping it")
        if not configurations:
            raise HySparKError(f"{name}: none of the configurations {list(opts.configurations)} exists in "
                               f"{plans_path} (available: {pm.available_configurations})",
                               "choose one of those with -c")
        for c in configurations:
            data_folder = os.path.join(folder, pm.get_configuration(c).data_identifier)
            tx.move_aside(data_folder)  # first: it reads the marker to tell a killed run's folder from a good one
            tx.keep_file(str(completeness.marker_path(data_folder)))
            completeness.remove_marker(data_folder)  # incomplete until the last step below
        replace = opts.replace_non_finite if run.non_finite.get(name) else None  # nnU-Net's own path otherwise
        try:
            if labelled:
                tx.move_aside(os.path.join(folder, "gt_segmentations"))
                nnunet_steps.preprocess_labelled(name, opts.plans_name, configurations, opts.num_processes,
                                                 replace)
            else:
                nnunet_steps.preprocess_unlabeled(name, plans_path, configurations, cases, opts.num_processes,
                                                  run.preprocessed, replace)
        except HySparKError:
            raise
        except Exception as e:
            if "background worker" in str(e):
                raise HySparKError(f"{name}: a preprocessing worker died (out of memory?)",
                                   "use fewer processes, e.g. -np 1") from e
            err = raw_checks.explain_failure(name, cases, labelled)
            if err is None:
                raise
            raise err from e
        for c in configurations:  # last: only a folder whose every case was written carries the marker
            completeness.write_marker(os.path.join(folder, pm.get_configuration(c).data_identifier), len(cases))
    except BaseException:
        tx.rollback()
        raise
    tx.commit()
    return DatasetResult(name, plans_path, configurations, notes)


def summary_lines(result: DatasetResult) -> list[str]:
    """The plans of each configuration written (network, patch, batch, spacing, memory estimate)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pm = compat.load_plans_manager(result.name, os.path.basename(result.plans_file)[:-len(".json")],
                                   os.path.dirname(os.path.dirname(result.plans_file)))
    dataset_json = load_json(os.path.join(os.path.dirname(result.plans_file), "dataset.json"))
    lines = [f"\n{result.name}: plans {result.plans_file}"]
    for c in result.configurations:
        if c not in pm.available_configurations:
            continue
        cm = pm.get_configuration(c)
        line = (f"  {c}: network {cm.network_arch_class_name.rsplit('.', 1)[-1]}, patch {list(cm.patch_size)}, "
                f"batch {cm.batch_size}, spacing {[round(float(s), 4) for s in cm.spacing]}")
        spec = method_for_network(cm.network_arch_class_name)
        if spec is not None:
            arch: dict[str, Any] = {k: v for k, v in cm.network_arch_init_kwargs.items() if k != "patch_size"}
            est = spec.estimate_memory(cm.patch_size, cm.batch_size, len(raw_checks.channels(dataset_json)),
                                       max(2, len(dataset_json["labels"])), **arch)
            line += f", estimated training memory {est.total_gb:.1f} GB"
            if spec.crop_scale != 1:
                line += f" (pre-training reads crops of {spec.crop_scale}x the patch)"
        lines.append(line)
    lines += [f"  {n}" for n in result.notes]
    return lines
