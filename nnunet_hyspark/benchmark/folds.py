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
from nnunet_hyspark.benchmark import fractions as fractions_mod
from nnunet_hyspark.benchmark import splits as splits_mod
from nnunet_hyspark.benchmark import summary as summary_mod
from nnunet_hyspark.benchmark import cost as cost_mod
from nnunet_hyspark.benchmark import summary_fractions, summary_tables, test_set_tables
from nnunet_hyspark.benchmark import test_set as test_set_mod
from nnunet_hyspark.benchmark.arms import (ARM_SPEC_HELP, DEFAULT_ARM_SPECS, DEFAULT_FINETUNE_TRAINER,
                                           DEFAULT_SCRATCH_TRAINER, Arm, needs_weights, parse_arm, resolve_arms)
from nnunet_hyspark.benchmark.manifest import MANIFEST_FORMAT, MANIFEST_NAME, Manifest, now
from nnunet_hyspark.benchmark.running import (FINISHED, NEW, RESUME, TRAIN_EXECUTABLE, FoldJob, JobOutcome, Runner,
                                              describe_plan, execute_jobs, find_train_executable, format_duration,
                                              fraction_fields, hyspark_trainers_dir, plan_jobs, subprocess_runner,
                                              train_command, training_env, training_state)
from nnunet_hyspark.benchmark.spec import (DEFAULT_N_FOLDS, BenchmarkSpec, build_spec, build_summary_spec,
                                           check_compare, check_plans, default_output_dir, resolve_dataset,
                                           resolve_folds)
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import check_writable

__all__ = ["ARM_SPEC_HELP", "DEFAULT_ARM_SPECS", "DEFAULT_FINETUNE_TRAINER", "DEFAULT_N_FOLDS",
           "DEFAULT_SCRATCH_TRAINER", "FINISHED", "MANIFEST_FORMAT", "MANIFEST_NAME", "NEW", "RESUME",
           "TRAIN_EXECUTABLE", "Arm", "BenchmarkSpec", "FoldJob", "JobOutcome", "Manifest", "Runner",
           "build_spec", "build_summary_spec", "check_compare", "check_plans", "claim_manifest",
           "default_output_dir", "describe_plan", "execute_jobs", "find_train_executable",
           "format_duration", "guard_summary", "hyspark_trainers_dir", "needs_weights", "parse_arm",
           "plan_jobs", "print_locations", "resolve_arms", "resolve_dataset", "resolve_folds", "run_benchmark",
           "subprocess_runner", "summarize_benchmark", "train_command", "training_env", "training_state"]


# --------------------------------------------------------------------------- manifest

def _differences(recorded: dict, wanted: dict) -> list[str]:
    """The keys that differ, including one only the recorded benchmark has (e.g. its fractions)."""
    return [k for k in [*wanted, *(k for k in recorded if k not in wanted)] if recorded.get(k) != wanted.get(k)]


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
    if recorded is not None and isinstance(recorded.get("arms"), list):  # older manifests: arms without "plans"
        recorded = {**recorded, "arms": [Arm.from_dict(a).as_dict() for a in recorded["arms"]]}
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
                  base_env: dict[str, str] | None = None, test_set: "test_set_mod.TestSet | None" = None) -> int:
    """Install splits, run every unfinished fold, then the test-set ensembles, summarize; exit status 1 if any
    fold or ensemble failed.

    ``runner`` defaults to starting ``nnUNetv2_train``; tests inject a fake one.
    """
    out = out or sys.stdout
    if not dry_run:  # before anything is written (splits_final.json included), not at the first log
        check_writable(spec.output_dir, "benchmark output folder (--output)")
        check_writable(Path(os.environ["nnUNet_preprocessed"]) / spec.dataset, "preprocessed dataset folder")
    manifest = claim_manifest(spec, force)
    guard_summary(spec, manifest, force)
    env = training_env(base_env)
    if spec.splits is not None:
        _install_custom_splits(spec, force, dry_run, out)
    elif not dry_run:
        _install_default_splits(spec, out)
    if spec.fractions != fractions_mod.DEFAULT_FRACTIONS:
        _install_subsets(spec, dry_run, out)
    jobs = plan_jobs(spec)
    todo = [j for j in jobs if j.state != FINISHED]
    n_fractions = (f" x {len(spec.fractions)} training fraction(s)"
                   if spec.fractions != fractions_mod.DEFAULT_FRACTIONS else "")
    print(f"benchmark {spec.dataset} {spec.configuration} {spec.plans}: {len(spec.arms)} arm(s) x "
          f"{len(spec.folds)} fold(s){n_fractions}; {len(jobs) - len(todo)} finished, "
          f"{sum(j.state == RESUME for j in todo)} to resume, {sum(j.state == NEW for j in todo)} to start",
          file=out)
    if dry_run:
        print("dry run, nothing is executed:", file=out)
        for line in describe_plan(jobs, gpus):
            print(line, file=out)
        if test_set is not None:
            for line in test_set_mod.describe_test_set(spec, test_set):
                print(line, file=out)
        return 0
    injected = runner  # the test set's nnUNetv2_predict needs its own executable unless a runner is injected
    if runner is None:
        runner = subprocess_runner(find_train_executable(env))
    manifest.data["output_dir"] = str(spec.output_dir)
    if spec.fold_entries is not None:
        manifest.data["fraction_entries"] = [e.as_dict() for e in spec.fold_entries]
    for j in jobs:
        entry = manifest.data.setdefault("folds", {}).setdefault(j.arm.label, {}).setdefault(str(j.fold), {})
        entry.update({"status": "finished" if j.state == FINISHED else "pending", "log": str(j.log),
                      **fraction_fields(j)})
    manifest.save()
    outcomes = execute_jobs(spec, todo, runner, manifest, gpus, out, base_env)
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"FAILED: arm {o.job.title} (exit code {o.returncode}); log: {o.job.log}",
              file=out)
    failed_test = 0
    if test_set is not None:
        failed_test = test_set_mod.run_test_set(spec, test_set, injected, out, base_env, gpu=gpus[0] if gpus else None)
    written = summarize_benchmark(spec, manifest, force=force, out=out)
    print_locations(spec, written, out)
    if failed:
        print(f"{len(failed)} of {len(todo)} fold run(s) failed; re-run the same command to retry them", file=out)
    if failed_test:
        print(f"{failed_test} test-set ensemble(s) failed; re-run the same command to retry them", file=out)
    return 1 if failed or failed_test else 0


def _install_default_splits(spec: BenchmarkSpec, out: TextIO) -> None:
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec.dataset
    written = splits_mod.install_default_splits(pre, _data_folder(spec, pre))
    if written is not None:
        print(f"splits: nnU-Net's default 5-fold split written before any fold starts: {written}", file=out)


def _install_custom_splits(spec: BenchmarkSpec, force: bool, dry_run: bool, out: TextIO) -> None:
    """Install --splits; warn that results trained on the replaced splits are still reused."""
    if dry_run:  # H-arms: the folds as read from --splits (datalists are mapped onto case ids)
        for line in splits_mod.fold_table(spec.splits, spec.folds, spec.splits_source or ""):
            print(line, file=out)
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec.dataset
    current = splits_mod.existing_splits(pre)
    if current is not None and fractions_mod.base_splits(current) == spec.splits:
        # installed before, with training subsets appended after the folds: in place as they are
        print(f"splits already in place: {pre / splits_mod.SPLITS_FILENAME}", file=out)
        return
    target, action = splits_mod.install_splits(spec.splits, pre, force=force, dry_run=dry_run)
    verb = {"unchanged": "already in place", "written": "written", "replaced": "replaced (old: .bak)"}[action]
    print(f"splits {'would be ' if dry_run and action != 'unchanged' else ''}{verb}: {target}", file=out)
    if action == "replaced":
        trained = [f"{a.label}/fold_{f}" for a in spec.arms for f in spec.folds
                   if training_state(spec.fold_dir(a, f)) != NEW]
        if trained:
            print(f"warning: {', '.join(trained)} already have results trained on the previous splits and will "
                  "be reused; delete those fold folders to retrain them", file=sys.stderr)


def _data_folder(spec: BenchmarkSpec, pre: Path) -> Path:
    """A preprocessed configuration folder the folds read (the first arm's plans: -p may not exist)."""
    return pre / compat.data_identifier(spec.dataset, spec.arm_plans(spec.arms[0]), spec.configuration)


def _splits_in_effect(spec: BenchmarkSpec, pre: Path) -> splits_mod.Splits:
    """splits_final.json as the folds will read it (in a dry run it may not be written yet)."""
    current = splits_mod.existing_splits(pre)
    if spec.splits is not None and (current is None or fractions_mod.base_splits(current) != spec.splits):
        return [dict(e) for e in spec.splits]  # a dry run: --splits would replace the file
    if current is None:  # a dry run before nnU-Net's default split is written
        current = splits_mod.default_splits(_data_folder(spec, pre))
    if current is None:
        raise HySparKError(f"{pre / splits_mod.SPLITS_FILENAME} does not exist and nnU-Net's default split cannot "
                           "be drawn (no preprocessed cases, or fewer than 5), so no training subsets either",
                           "preprocess the dataset, or pass --splits")
    return current


def _install_subsets(spec: BenchmarkSpec, dry_run: bool, out: TextIO) -> None:
    """Append each fold's training subsets to splits_final.json (idempotent); set spec.fold_entries."""
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec.dataset
    current = _splits_in_effect(spec, pre)
    entries, appended = fractions_mod.install(pre, current, spec.folds, spec.fractions, dry_run=dry_run)
    spec.fold_entries = entries
    subsets = [e for e in entries if e.fraction != 1.0]
    verb = "would be appended to" if dry_run else "appended to"
    what = f"{appended} {verb}" if appended else "all already in"
    print(f"training subsets (seed {fractions_mod.SUBSET_SEED}): {len(subsets)} fold x fraction entries, {what} "
          f"{pre / splits_mod.SPLITS_FILENAME}", file=out)
    for e in entries:
        n_train = len(current[e.cv_fold]["train"])
        size = fractions_mod.subset_size(e.fraction, n_train)
        print(f"  fold {e.cv_fold} fraction {fractions_mod.format_fraction(e.fraction)}: nnU-Net fold "
              f"{e.nnunet_fold}, {size} of {n_train} training case(s), {len(current[e.cv_fold]['val'])} validation "
              "case(s)", file=out)


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
    """Read the fold results, write tables and plots, and record what they describe in the manifest.

    With training fractions the report is per fraction, each fold read from the nnU-Net fold of
    its fold x fraction entry, plus Dice vs. fraction (:mod:`.summary_fractions`).
    """
    out = out or sys.stdout
    manifest = manifest or Manifest.load(spec.output_dir)
    guard_summary(spec, manifest, force)
    dataset_json = _dataset_json_for_labels(spec)
    if spec.fractions != fractions_mod.DEFAULT_FRACTIONS:
        spec.fold_entries = spec.fold_entries or _recorded_entries(spec, manifest)
    extras = _extra_sections(spec, dataset_json)
    if spec.fractions == fractions_mod.DEFAULT_FRACTIONS:
        results = _collect(spec, dataset_json, spec.fold_dir, out)
        written = summary_tables.write_summary(results, spec.output_dir, spec.compare, *extras)
    else:
        per_fraction = []
        for fraction in spec.fractions:
            where = {e.cv_fold: e.nnunet_fold for e in spec.fold_entries if e.fraction == fraction}

            def locate(arm: Arm, fold: int, where: dict = where) -> Path | None:
                return spec.fold_dir(arm, where[fold]) if fold in where else None

            label = f" at fraction {fractions_mod.format_fraction(fraction)}"
            per_fraction.append((fraction, _collect(spec, dataset_json, locate, out, label)))
        written = summary_fractions.write_summary(per_fraction, spec.fold_entries, spec.output_dir, spec.compare,
                                                  *extras)
    manifest.data["summary"] = {"config": spec.summary_identity(), "written": now(),
                                "files": [p.name for p in written]}
    manifest.save()
    return written


def _extra_sections(spec: BenchmarkSpec, dataset_json: dict | None) -> tuple[list[str], dict[str, str]]:
    """Held-out test set and cost: markdown appended to summary.md, CSVs beside it (empty ones not written)."""
    markdown = [test_set_tables.test_set_markdown(spec, dataset_json), cost_mod.cost_markdown(spec)]
    csvs = {"summary_test_set.csv": test_set_tables.test_set_csv(spec, dataset_json),
            "summary_cost.csv": cost_mod.cost_csv(spec)}
    return markdown, csvs


def _collect(spec: BenchmarkSpec, dataset_json: dict | None, locate, out: TextIO,
             label: str = "") -> summary_mod.BenchmarkResults:
    """One arm x fold table of results, naming on ``out`` the folds each arm lacks."""
    results = summary_mod.collect_results(spec.results_root, spec.dataset, spec.configuration, spec.plans,
                                          spec.arms, spec.folds, dataset_json, locate=locate)
    for arm, _ in results.arms:
        bad = [f"fold {f}: {r.status}" for f, r in results.fold_results[arm].items()
               if r.status != summary_mod.FINISHED]
        if bad:
            print(f"summary: {arm}{label} excludes {', '.join(bad)}", file=out)
    return results


def _recorded_entries(spec: BenchmarkSpec, manifest: Manifest) -> list[fractions_mod.FoldEntry]:
    """fold x fraction -> nnU-Net fold: from the manifest, else looked up in splits_final.json.

    Fraction 1.0 is always the fold itself; a subset found nowhere is reported as missing.
    """
    wanted = {(f, x) for f in spec.folds for x in spec.fractions}
    found = {(e.cv_fold, e.fraction): e for e in map(fractions_mod.FoldEntry.from_dict,
                                                      manifest.data.get("fraction_entries") or [])}
    found.update({(f, 1.0): fractions_mod.FoldEntry(f, 1.0, f) for f in spec.folds})
    pre = os.environ.get("nnUNet_preprocessed")
    current = splits_mod.existing_splits(Path(pre) / spec.dataset) if pre else None
    if current and wanted - set(found):
        for e in fractions_mod.find_entries(current, spec.folds, spec.fractions):
            found.setdefault((e.cv_fold, e.fraction), e)
    return [found[k] for k in sorted(wanted) if k in found]


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
