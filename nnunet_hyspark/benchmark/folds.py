"""Plan and run the cross-validation folds of a benchmark (scratch vs. pre-trained, or any arms).

Every fold is trained by nnU-Net's own ``nnUNetv2_train`` in a subprocess, so a benchmark
fold is exactly what a user would get by hand. The state of a fold is read from disk
(nnU-Net's output folder), never from our own bookkeeping: a finished fold is skipped, a
half-trained fold is continued with ``--c``, anything else starts fresh. The manifest
(``benchmark.json`` in the output folder) records what the benchmark *is* (arms, weights,
folds, splits) so that a re-run of the same benchmark resumes, while a re-run of a
different one cannot silently mix results or overwrite its outputs.

This module runs a benchmark (:func:`run_benchmark`) and writes its summary; the pieces are
:mod:`.arms` (arm specs), :mod:`.spec` (what a benchmark is, input checks), :mod:`.manifest`
(the state file) and :mod:`.running` (fold states, commands, running them).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence, TextIO

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.benchmark import splits as splits_mod
from nnunet_hyspark.benchmark import summary as summary_mod
from nnunet_hyspark.benchmark import summary_tables
from nnunet_hyspark.benchmark.arms import (ARM_SPEC_HELP, DEFAULT_ARM_SPECS, DEFAULT_FINETUNE_TRAINER,
                                           DEFAULT_SCRATCH_TRAINER, Arm, needs_weights, parse_arm, resolve_arms)
from nnunet_hyspark.benchmark.manifest import MANIFEST_FORMAT, MANIFEST_NAME, Manifest, now
from nnunet_hyspark.benchmark.running import (FINISHED, NEW, RESUME, TRAIN_EXECUTABLE, FoldJob, JobOutcome, Runner,
                                              describe_plan, execute_jobs, find_train_executable,
                                              find_trainer_definition, format_duration, hyspark_trainers_dir,
                                              plan_jobs, subprocess_runner, train_command, training_env,
                                              training_state)
from nnunet_hyspark.benchmark.spec import (DEFAULT_N_FOLDS, BenchmarkSpec, build_spec, build_summary_spec,
                                           check_compare, check_plans, default_output_dir, resolve_dataset,
                                           resolve_folds)
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import check_writable

__all__ = ["ARM_SPEC_HELP", "DEFAULT_ARM_SPECS", "DEFAULT_FINETUNE_TRAINER", "DEFAULT_N_FOLDS",
           "DEFAULT_SCRATCH_TRAINER", "FINISHED", "MANIFEST_FORMAT", "MANIFEST_NAME", "NEW", "RESUME",
           "TRAIN_EXECUTABLE", "Arm", "BenchmarkSpec", "FoldJob", "JobOutcome", "Manifest", "Runner",
           "build_spec", "build_summary_spec", "check_compare", "check_plans", "claim_manifest",
           "default_output_dir", "describe_plan", "execute_jobs", "find_train_executable", "find_trainer_definition",
           "format_duration", "guard_summary", "hyspark_trainers_dir", "needs_weights", "parse_arm",
           "plan_jobs", "print_locations", "resolve_arms", "resolve_dataset", "resolve_folds", "run_benchmark",
           "subprocess_runner", "summarize_benchmark", "train_command", "training_env", "training_state"]


# --------------------------------------------------------------------------- manifest

def _differences(recorded: dict, wanted: dict) -> list[str]:
    return [k for k in wanted if recorded.get(k) != wanted[k]]


def claim_manifest(spec: BenchmarkSpec, force: bool) -> Manifest:
    """Load the output folder's manifest for this benchmark, refusing a different one without --force.

    Without --splits a re-run keeps the recorded splits (they are installed already).
    """
    try:
        manifest = Manifest.load(spec.output_dir)
    except HySparKError:
        if not force:
            raise
        manifest = Manifest(spec.output_dir / MANIFEST_NAME, {"format": MANIFEST_FORMAT})
    wanted = spec.identity()
    recorded = manifest.data.get("config")
    if recorded is not None and wanted["splits"] is None:
        wanted["splits"] = recorded.get("splits")
    if recorded is not None and recorded != wanted:
        if not force:
            raise HySparKError(
                f"{spec.output_dir} holds a different benchmark (differs in: "
                f"{', '.join(_differences(recorded, wanted))})",
                "use another --output, re-run with the recorded settings to resume, or pass --force to replace "
                "its manifest and summary (finished folds in nnUNet_results are still reused)")
        manifest.data = {"format": MANIFEST_FORMAT}
    manifest.data["config"] = wanted
    if spec.splits_source:
        manifest.data["splits_source"] = spec.splits_source
    return manifest


# --------------------------------------------------------------------------- running

def run_benchmark(spec: BenchmarkSpec, *, runner: Runner | None = None, gpus: Sequence[str] | None = None,
                  dry_run: bool = False, force: bool = False, out: TextIO | None = None,
                  base_env: dict[str, str] | None = None) -> int:
    """Install splits, run every unfinished fold, summarize; exit status 1 if any fold failed.

    ``runner`` defaults to starting ``nnUNetv2_train``; tests inject a fake one.
    """
    out = out or sys.stdout
    if not dry_run:  # before anything is written (splits_final.json included), not at the first log
        check_writable(spec.output_dir, "benchmark output folder (--output)")
        check_writable(Path(os.environ["nnUNet_preprocessed"]) / spec.dataset, "preprocessed dataset folder")
    manifest = claim_manifest(spec, force)
    guard_summary(spec, manifest, force)
    env = training_env(base_env)
    for arm in spec.arms:
        if not find_trainer_definition(arm.trainer, env):
            print(f"warning: trainer class {arm.trainer} not found in nnU-Net's trainer folders or "
                  f"nnUNet_extTrainer; its folds will fail if the name is wrong", file=sys.stderr)
    if spec.splits is not None:
        _install_custom_splits(spec, force, dry_run, out)
    elif not dry_run:
        _install_default_splits(spec, out)
    jobs = plan_jobs(spec)
    todo = [j for j in jobs if j.state != FINISHED]
    print(f"benchmark {spec.dataset} {spec.configuration} {spec.plans}: {len(spec.arms)} arm(s) x "
          f"{len(spec.folds)} fold(s); {len(jobs) - len(todo)} finished, "
          f"{sum(j.state == RESUME for j in todo)} to resume, {sum(j.state == NEW for j in todo)} to start",
          file=out)
    if dry_run:
        print("dry run, nothing is executed:", file=out)
        for line in describe_plan(jobs, gpus):
            print(line, file=out)
        return 0
    if runner is None:
        runner = subprocess_runner(find_train_executable(env))
    manifest.data["output_dir"] = str(spec.output_dir)
    for j in jobs:
        entry = manifest.data.setdefault("folds", {}).setdefault(j.arm.label, {}).setdefault(str(j.fold), {})
        entry.update({"status": "finished" if j.state == FINISHED else "pending", "log": str(j.log)})
    manifest.save()
    outcomes = execute_jobs(spec, todo, runner, manifest, gpus, out, base_env)
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"FAILED: arm {o.job.arm.label} fold {o.job.fold} (exit code {o.returncode}); log: {o.job.log}",
              file=out)
    written = summarize_benchmark(spec, manifest, force=force, out=out)
    print_locations(spec, written, out)
    if failed:
        print(f"{len(failed)} of {len(todo)} fold run(s) failed; re-run the same command to retry them", file=out)
    return 1 if failed else 0


def _install_default_splits(spec: BenchmarkSpec, out: TextIO) -> None:
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec.dataset
    written = splits_mod.install_default_splits(
        pre, pre / compat.data_identifier(spec.dataset, spec.plans, spec.configuration))
    if written is not None:
        print(f"splits: nnU-Net's default 5-fold split written before any fold starts: {written}", file=out)


def _install_custom_splits(spec: BenchmarkSpec, force: bool, dry_run: bool, out: TextIO) -> None:
    """Install --splits; warn that results trained on the replaced splits are still reused."""
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec.dataset
    target, action = splits_mod.install_splits(spec.splits, pre, force=force, dry_run=dry_run)
    verb = {"unchanged": "already in place", "written": "written", "replaced": "replaced (old: .bak)"}[action]
    print(f"splits {'would be ' if dry_run and action != 'unchanged' else ''}{verb}: {target}", file=out)
    if action == "replaced":
        trained = [f"{a.label}/fold_{f}" for a in spec.arms for f in spec.folds
                   if training_state(spec.fold_dir(a, f)) != NEW]
        if trained:
            print(f"warning: {', '.join(trained)} already have results trained on the previous splits and will "
                  "be reused; delete those fold folders to retrain them", file=sys.stderr)


# --------------------------------------------------------------------------- summary

def guard_summary(spec: BenchmarkSpec, manifest: Manifest, force: bool) -> None:
    """Refuse to overwrite summary files that describe a different benchmark (or an unknown one)."""
    existing = summary_mod.existing_outputs(spec.output_dir)
    if not existing or force:
        return
    recorded = (manifest.data.get("summary") or {}).get("config")
    if recorded == spec.summary_identity():
        return
    why = "were written for a different benchmark" if recorded else "are not recorded in its manifest"
    raise HySparKError(f"summary files in {spec.output_dir} {why} ({existing[0].name}, ...)",
                       "use another --output, or pass --force to overwrite them")


def summarize_benchmark(spec: BenchmarkSpec, manifest: Manifest | None = None, force: bool = False,
                        out: TextIO | None = None) -> list[Path]:
    """Read the fold results, write tables and plot, and record what they describe in the manifest."""
    out = out or sys.stdout
    manifest = manifest or Manifest.load(spec.output_dir)
    guard_summary(spec, manifest, force)
    dataset_json = _dataset_json_for_labels(spec)
    results = summary_mod.collect_results(spec.results_root, spec.dataset, spec.configuration, spec.plans,
                                          spec.arms, spec.folds, dataset_json)
    for label, _ in results.arms:
        bad = [f"fold {f}: {r.status}" for f, r in results.fold_results[label].items()
               if r.status != summary_mod.FINISHED]
        if bad:
            print(f"summary: {label} excludes {', '.join(bad)}", file=out)
    written = summary_tables.write_summary(results, spec.output_dir, spec.compare)
    manifest.data["summary"] = {"config": spec.summary_identity(), "written": now(),
                                "files": [p.name for p in written]}
    manifest.save()
    return written


def _dataset_json_for_labels(spec: BenchmarkSpec) -> dict | None:
    """Label names from dataset.json: preprocessed/raw copy, else the one nnU-Net put next to the results."""
    try:
        return splits_mod.load_dataset_json(spec.dataset)
    except HySparKError:
        pass
    import json

    for arm in spec.arms:
        p = spec.fold_dir(arm, 0).parent / "dataset.json"
        if p.is_file():
            return json.loads(p.read_text())
    return None


def print_locations(spec: BenchmarkSpec, written: list[Path], out: TextIO) -> None:
    """Tell the user where everything is."""
    print(f"benchmark outputs in {spec.output_dir}:", file=out)
    for p in written:
        print(f"  {p}", file=out)
    print(f"  {spec.output_dir / MANIFEST_NAME} (manifest)", file=out)
    if (spec.output_dir / "logs").is_dir():
        print(f"  {spec.output_dir / 'logs'}/ (one log per arm and fold)", file=out)
