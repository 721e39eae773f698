"""Plan and run the cross-validation folds of a benchmark (scratch vs. pre-trained, or any arms).

Every fold is trained by nnU-Net's own ``nnUNetv2_train`` in a subprocess, so a benchmark
fold is exactly what a user would get by hand. The state of a fold is read from disk
(nnU-Net's output folder), never from our own bookkeeping: a finished fold is skipped, a
half-trained fold is continued with ``--c``, anything else starts fresh. The manifest
(``benchmark.json`` in the output folder) records what the benchmark *is* (arms, weights,
folds, splits) so that a re-run of the same benchmark resumes, while a re-run of a
different one cannot silently mix results or overwrite its outputs.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from nnunet_hyspark.benchmark import splits as splits_mod
from nnunet_hyspark.benchmark import summary as summary_mod
from nnunet_hyspark.errors import HySparKError, require_nnunet_env
from nnunet_hyspark.io import atomic_json_save

DEFAULT_SCRATCH_TRAINER = "nnUNetTrainerHySparK"
DEFAULT_FINETUNE_TRAINER = "nnUNetTrainerHySparKFinetune"
DEFAULT_ARM_SPECS = (f"scratch={DEFAULT_SCRATCH_TRAINER}", f"pretrained={DEFAULT_FINETUNE_TRAINER}")
#: trainers (and their variants, e.g. ..._test) that fine-tune from -pretrained_weights
FINETUNE_TRAINER_PREFIXES = (DEFAULT_FINETUNE_TRAINER, "nnUNetTrainerMiMFinetune", "nnUNetTrainerHiEndMAEFinetune")
DEFAULT_N_FOLDS = 5
MANIFEST_NAME = "benchmark.json"
MANIFEST_FORMAT = 1
TRAIN_EXECUTABLE = "nnUNetv2_train"

ARM_SPEC_HELP = (
    "Each arm is LABEL=TRAINER[:WEIGHTS] (or just TRAINER[:WEIGHTS], then LABEL=TRAINER). "
    "LABEL names the arm in tables and log files; TRAINER is any nnU-Net trainer class "
    "(nnUNetTrainer, nnUNetTrainerHySparK, nnUNetTrainerHySparK_test, ...); WEIGHTS is a "
    "checkpoint passed as -pretrained_weights. Arms whose trainer starts with "
    f"{' or '.join(FINETUNE_TRAINER_PREFIXES)} need weights: given in the spec or via --pretrained_weights. "
    f"Default: {' '.join(DEFAULT_ARM_SPECS)}. Example: "
    f"--arms scratch={DEFAULT_SCRATCH_TRAINER} pretrained={DEFAULT_FINETUNE_TRAINER}:/path/weights.pth"
)

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRAINER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: (command, environment, log file) -> exit code. Injectable so tests need no training.
Runner = Callable[[list[str], dict[str, str], Path], int]


# --------------------------------------------------------------------------- arms

@dataclass(frozen=True)
class Arm:
    """One benchmark arm: a label, the nnU-Net trainer class, optional pre-trained weights."""

    label: str
    trainer: str
    weights: str | None = None

    def as_dict(self) -> dict:
        return {"label": self.label, "trainer": self.trainer, "weights": self.weights}


def parse_arm(spec: str) -> Arm:
    """Parse ``LABEL=TRAINER[:WEIGHTS]`` or ``TRAINER[:WEIGHTS]`` (see ARM_SPEC_HELP)."""
    eq, colon = spec.find("="), spec.find(":")
    labelled = eq != -1 and (colon == -1 or eq < colon)
    label, rest = (spec[:eq], spec[eq + 1:]) if labelled else (None, spec)
    trainer, sep, weights = rest.partition(":")
    label = trainer if label is None else label
    if not _TRAINER_RE.match(trainer):
        raise HySparKError(f"invalid arm {spec!r}: {trainer!r} is not a trainer class name", ARM_SPEC_HELP)
    if not _LABEL_RE.match(label):
        raise HySparKError(f"invalid arm {spec!r}: label {label!r} may only use letters, digits, '_', '.', '-'",
                           ARM_SPEC_HELP)
    if sep and not weights:
        raise HySparKError(f"invalid arm {spec!r}: empty weights path after ':'", ARM_SPEC_HELP)
    return Arm(label, trainer, weights or None)


def needs_weights(trainer: str) -> bool:
    """Fine-tuning trainers without weights would silently train from scratch."""
    return trainer.startswith(FINETUNE_TRAINER_PREFIXES)


def resolve_arms(specs: Sequence[str] | None, pretrained_weights: str | None,
                 require_weights: bool = True) -> list[Arm]:
    """Parse the arms and attach/verify their weights.

    ``--pretrained_weights`` fills in every fine-tuning arm that has no weights of its own;
    it is an error if no arm uses it (a weights file that is silently ignored would make
    a 'pre-trained' result meaningless).
    """
    arms = [parse_arm(s) for s in (specs or DEFAULT_ARM_SPECS)]
    _check_unique(arms)
    used_flag = False
    resolved = []
    for arm in arms:
        if arm.weights is None and pretrained_weights and needs_weights(arm.trainer):
            arm, used_flag = Arm(arm.label, arm.trainer, pretrained_weights), True
        if require_weights and arm.weights is None and needs_weights(arm.trainer):
            others = " ".join(f"{a.label}={a.trainer}" for a in arms if a is not arm and a.label != arm.label)
            raise HySparKError(
                f"arm '{arm.label}' ({arm.trainer}) needs pre-trained weights",
                f"pass --pretrained_weights FILE, or --arms {arm.label}={arm.trainer}:FILE ..., "
                f"or drop the arm (e.g. --arms {others or 'scratch=' + DEFAULT_SCRATCH_TRAINER})")
        if require_weights and arm.weights is not None:
            if not Path(arm.weights).is_file():
                raise HySparKError(f"weights file of arm '{arm.label}' not found: {arm.weights}",
                                   "check the path (pre-train with hyspark_pretrain, convert with "
                                   "hyspark_convert_checkpoint)")
            arm = Arm(arm.label, arm.trainer, os.path.abspath(arm.weights))
        resolved.append(arm)
    if require_weights and pretrained_weights and not used_flag:
        raise HySparKError("--pretrained_weights is given but no arm uses it",
                           f"only arms with a {'* or '.join(FINETUNE_TRAINER_PREFIXES)}* trainer and no weights of their own "
                           "take it; give weights per arm as LABEL=TRAINER:WEIGHTS instead")
    return resolved


def _check_unique(arms: list[Arm]) -> None:
    """Labels name log files and table columns; trainers name nnU-Net's output folders."""
    for attr, why in (("label", "labels must be unique"),
                      ("trainer", "nnU-Net writes both into the same results folder TRAINER__PLANS__CONFIG; "
                                  "use a differently named trainer subclass for the second arm")):
        seen: set[str] = set()
        for arm in arms:
            value = getattr(arm, attr)
            if value in seen:
                raise HySparKError(f"two arms share the {attr} {value!r}", why)
            seen.add(value)


# --------------------------------------------------------------------------- the benchmark spec

@dataclass
class BenchmarkSpec:
    """Everything that defines one benchmark; two runs with equal identity() are the same benchmark."""

    dataset_arg: str
    dataset: str
    configuration: str
    plans: str
    arms: list[Arm]
    folds: list[int]
    results_root: Path
    output_dir: Path
    splits: splits_mod.Splits | None = None
    splits_source: str | None = None
    compare: tuple[str, str] | None = None
    device: str | None = None  # nnUNetv2_train -device; where it runs is not part of the identity

    def identity(self) -> dict:
        """What must match for a re-run to resume rather than be a different benchmark."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "arms": [a.as_dict() for a in self.arms], "folds": list(self.folds),
                "splits": splits_mod.splits_digest(self.splits) if self.splits is not None else None}

    def summary_identity(self) -> dict:
        """What the summary files describe (weights, splits and --compare do not change which results are read)."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "arms": [{"label": a.label, "trainer": a.trainer} for a in self.arms],
                "folds": list(self.folds)}

    def fold_dir(self, arm: Arm, fold: int) -> Path:
        return summary_mod.trainer_output_dir(self.results_root, self.dataset, arm.trainer, self.plans,
                                              self.configuration) / f"fold_{fold}"


def resolve_dataset(dataset_arg: str) -> str:
    """DatasetXXX_Name from an id or name; nnU-Net's RuntimeError becomes a one-line user error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return str(maybe_convert_to_dataset_name(dataset_arg))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HySparKError(f"dataset {dataset_arg!r} not found ({first})",
                           "check -d and that $nnUNet_raw / $nnUNet_preprocessed point to your data")


def check_plans(dataset: str, plans: str, configuration: str) -> Path:
    """The plans file must exist and contain the configuration, or every fold would fail the same way."""
    import json

    path = Path(os.environ["nnUNet_preprocessed"]) / dataset / f"{plans}.json"
    if not path.is_file():
        raise HySparKError(f"plans file not found: {path}",
                           "run hyspark_plan_and_preprocess (or nnUNetv2_plan_and_preprocess) with these plans, "
                           "or fix -p")
    configs = json.loads(path.read_text()).get("configurations", {})
    if configuration not in configs:
        raise HySparKError(f"configuration {configuration!r} not in {path.name}",
                           f"available: {', '.join(sorted(configs)) or 'none'}")
    return path


def default_output_dir(results_root: str | os.PathLike, dataset: str, plans: str, configuration: str) -> Path:
    """Benchmark outputs live next to the trainers' results, one folder per plans/configuration."""
    return Path(results_root) / dataset / f"hyspark_benchmark__{plans}__{configuration}"


def resolve_folds(folds: Sequence[int] | None, n_splits: int | None) -> list[int]:
    """Requested folds, defaulting to all folds of the splits in effect (nnU-Net's default: 5)."""
    n = n_splits or DEFAULT_N_FOLDS
    if not folds:
        return list(range(n))
    bad = [f for f in folds if f < 0 or f >= n]
    if bad:
        raise HySparKError(f"fold(s) {bad} do not exist: the splits have {n} folds (0..{n - 1})",
                           "fix -f, or pass --splits with more folds")
    if len(set(folds)) != len(folds):
        raise HySparKError(f"fold(s) listed twice in -f {' '.join(map(str, folds))}", "list every fold once")
    return list(folds)


def build_spec(dataset_arg: str, configuration: str, plans: str, arm_specs: Sequence[str] | None,
               pretrained_weights: str | None = None, folds: Sequence[int] | None = None,
               splits_file: str | None = None, output: str | None = None,
               compare: Sequence[str] | None = None) -> BenchmarkSpec:
    """Validate every input of ``folds`` before anything runs, so mistakes cost seconds, not GPU-days."""
    env = require_nnunet_env()
    dataset = resolve_dataset(dataset_arg)
    check_plans(dataset, plans, configuration)
    arms = resolve_arms(arm_specs, pretrained_weights, require_weights=True)
    custom = None
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset
    if splits_file:
        custom = splits_mod.load_splits_file(splits_file)
        splits_mod.validate_splits(custom, splits_mod.dataset_case_ids(dataset), source=str(splits_file))
        n_splits = len(custom)
    else:
        current = splits_mod.existing_splits(preprocessed)
        n_splits = len(current) if current else None
    results_root = Path(env["nnUNet_results"])
    return BenchmarkSpec(
        dataset_arg=str(dataset_arg), dataset=dataset, configuration=configuration, plans=plans, arms=arms,
        folds=resolve_folds(folds, n_splits), results_root=results_root,
        output_dir=Path(output) if output else default_output_dir(results_root, dataset, plans, configuration),
        splits=custom, splits_source=os.path.abspath(splits_file) if splits_file else None,
        compare=check_compare(compare, arms))


def build_summary_spec(dataset_arg: str, configuration: str, plans: str, arm_specs: Sequence[str] | None,
                       folds: Sequence[int] | None = None, output: str | None = None,
                       compare: Sequence[str] | None = None) -> BenchmarkSpec:
    """Like build_spec, but only results are needed; arms/folds default to the benchmark's manifest."""
    env = require_nnunet_env(["nnUNet_results"])
    dataset = resolve_dataset(dataset_arg)
    results_root = Path(env["nnUNet_results"])
    output_dir = Path(output) if output else default_output_dir(results_root, dataset, plans, configuration)
    recorded = Manifest.load(output_dir).data.get("config") or {}
    if arm_specs:
        arms = resolve_arms(arm_specs, None, require_weights=False)
    elif recorded.get("arms"):
        arms = [Arm(a["label"], a["trainer"], a.get("weights")) for a in recorded["arms"]]
    else:
        arms = resolve_arms(None, None, require_weights=False)
    if folds:
        folds = resolve_folds(folds, max(folds) + 1)
    elif recorded.get("folds"):
        folds = list(recorded["folds"])
    else:
        pre = os.environ.get("nnUNet_preprocessed")
        current = splits_mod.existing_splits(Path(pre) / dataset) if pre else None
        folds = resolve_folds(None, len(current) if current else None)
    return BenchmarkSpec(str(dataset_arg), dataset, configuration, plans, arms, list(folds), results_root,
                         output_dir, compare=check_compare(compare, arms))


def check_compare(compare: Sequence[str] | None, arms: list[Arm]) -> tuple[str, str] | None:
    """``--compare BASELINE OTHER`` must name two different arms."""
    if not compare:
        return None
    labels = [a.label for a in arms]
    unknown = [c for c in compare if c not in labels]
    if len(compare) != 2 or unknown or compare[0] == compare[1]:
        raise HySparKError(f"--compare needs two different arm labels, got {' '.join(compare)}",
                           f"arms are: {', '.join(labels)}")
    return compare[0], compare[1]


# --------------------------------------------------------------------------- fold states and commands

NEW, RESUME, FINISHED = "new", "resume", "finished"


def training_state(fold_dir: Path) -> str:
    """finished: nnU-Net wrote validation/summary.json; resume: a checkpoint exists; else new.

    A final checkpoint without a validation summary is also 'resume': nnU-Net's ``--c``
    then re-runs the aborted validation.
    """
    if (fold_dir / "validation" / "summary.json").is_file():
        return FINISHED
    if any((fold_dir / c).is_file() for c in ("checkpoint_final.pth", "checkpoint_latest.pth",
                                               "checkpoint_best.pth")):
        return RESUME
    return NEW


def train_command(spec: BenchmarkSpec, arm: Arm, fold: int, resume: bool) -> list[str]:
    """The nnUNetv2_train call for one fold.

    nnU-Net refuses ``--c`` together with ``-pretrained_weights``; on resume the weights
    are already inside the checkpoint, so they are dropped.
    """
    cmd = [TRAIN_EXECUTABLE, spec.dataset_arg, spec.configuration, str(fold), "-tr", arm.trainer, "-p", spec.plans]
    if spec.device:
        cmd += ["-device", spec.device]
    if resume:
        cmd.append("--c")
    elif arm.weights:
        cmd += ["-pretrained_weights", arm.weights]
    return cmd


@dataclass
class FoldJob:
    """One arm x fold with its state on disk, the command that continues it and its log file."""

    arm: Arm
    fold: int
    state: str
    command: list[str]
    log: Path


def plan_jobs(spec: BenchmarkSpec) -> list[FoldJob]:
    """All arm x fold jobs, fold-major so paired results for a fold become available together."""
    jobs = []
    for fold in spec.folds:
        for arm in spec.arms:
            state = training_state(spec.fold_dir(arm, fold))
            jobs.append(FoldJob(arm, fold, state, train_command(spec, arm, fold, state == RESUME),
                                spec.output_dir / "logs" / f"{arm.label}_fold{fold}.log"))
    return jobs


def hyspark_trainers_dir() -> str:
    """The folder nnU-Net must search for our trainers (the same one ``hyspark_env`` exports).

    That is ``nnunet_hyspark/trainers/nnunet_lookup`` (it only re-exports the trainer classes,
    so nnU-Net's top-level import does not give them a second identity); older layouts
    without it fall back to the trainers package folder. Found via find_spec, so the
    trainers themselves (and torch) are not imported.
    """
    for name in ("nnunet_hyspark.trainers.nnunet_lookup", "nnunet_hyspark.trainers"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin:
            return os.path.dirname(os.path.abspath(spec.origin))
    raise HySparKError("package nnunet_hyspark.trainers not found", "reinstall nnunet-hyspark")


def training_env(base: dict[str, str] | None = None, gpu: str | None = None) -> dict[str, str]:
    """Subprocess environment: our trainers on nnUNet_extTrainer, and the fold's GPU if assigned.

    nnUNet_extTrainer is a path list; like ``hyspark_env`` we put our folder first and keep
    the user's folders, so both kinds of trainers are found.
    """
    env = dict(os.environ if base is None else base)
    ours = hyspark_trainers_dir()
    others = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p and os.path.abspath(p) != ours]
    env["nnUNet_extTrainer"] = os.pathsep.join([ours, *others])
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def find_train_executable(env: dict[str, str] | None = None) -> str:
    """nnUNetv2_train from PATH, else next to this Python (a venv that is not activated)."""
    env = os.environ if env is None else env
    found = shutil.which(TRAIN_EXECUTABLE, path=env.get("PATH"))
    if found:
        return found
    beside = Path(sys.executable).parent / TRAIN_EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise HySparKError(f"{TRAIN_EXECUTABLE} not found on PATH", "activate the environment where nnunetv2 is installed")


def subprocess_runner(executable: str) -> Runner:
    """A Runner that starts the real training, appending stdout+stderr to the fold's log."""

    def run(cmd: list[str], env: dict[str, str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n===== {_now()} {shlex.join(cmd)}\n")
            fh.flush()
            return subprocess.run([executable] + cmd[1:], env=env, stdout=fh, stderr=subprocess.STDOUT).returncode

    return run


def find_trainer_definition(trainer: str, env: dict[str, str]) -> bool:
    """Cheap text search for ``class TRAINER`` where nnU-Net looks for trainers (no imports)."""
    import nnunetv2

    roots = [Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"]
    hyspark_spec = importlib.util.find_spec("nnunet_hyspark.trainers")
    if hyspark_spec is not None and hyspark_spec.origin:  # the lookup folder only re-exports these
        roots.append(Path(hyspark_spec.origin).parent)
    roots += [Path(p) for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    pattern = re.compile(rf"^\s*(class\s+{re.escape(trainer)}\b|{re.escape(trainer)}\s*=)", re.MULTILINE)
    for root in roots:
        for py in root.rglob("*.py") if root.is_dir() else []:
            try:
                if pattern.search(py.read_text(errors="ignore")):
                    return True
            except OSError:
                continue
    return False


# --------------------------------------------------------------------------- manifest

class Manifest:
    """The benchmark's state file, rewritten atomically after every change (safe to interrupt)."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def load(cls, output_dir: Path) -> "Manifest":
        import json

        path = Path(output_dir) / MANIFEST_NAME
        if not path.is_file():
            return cls(path, {"format": MANIFEST_FORMAT})
        try:
            return cls(path, json.loads(path.read_text()))
        except ValueError as e:
            raise HySparKError(f"benchmark manifest {path} is corrupt ({e})",
                               "delete it or pass --force to start a new manifest")

    def save(self) -> None:
        with self._lock:
            self.data["updated"] = _now()
            atomic_json_save(self.data, self.path)

    def set_fold(self, arm: str, fold: int, **fields: object) -> None:
        with self._lock:
            entry = self.data.setdefault("folds", {}).setdefault(arm, {}).setdefault(str(fold), {})
            entry.update(fields)
        self.save()


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

@dataclass
class JobOutcome:
    job: FoldJob
    returncode: int
    seconds: float
    ok: bool = field(default=False)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def format_duration(seconds: float) -> str:
    """Human-readable elapsed time for progress lines (e.g. 1h02m03s)."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def execute_jobs(spec: BenchmarkSpec, jobs: list[FoldJob], runner: Runner, manifest: Manifest,
                 gpus: Sequence[str] | None, out: TextIO, base_env: dict[str, str] | None = None) -> list[JobOutcome]:
    """Run the jobs, sequentially or one per GPU, recording each outcome; a failure stops nothing."""
    total = len(jobs)
    started_at = time.monotonic()
    counter = {"n": 0}
    lock = threading.Lock()
    free_gpus: "queue.Queue[str | None]" = queue.Queue()
    for g in (gpus or [None]):
        free_gpus.put(g)

    def say(msg: str) -> None:
        with lock:
            print(msg, file=out, flush=True)

    def run_one(job: FoldJob) -> JobOutcome:
        gpu = free_gpus.get()
        try:
            with lock:
                counter["n"] += 1
                k = counter["n"]
            where = f" on GPU {gpu}" if gpu is not None else ""
            verb = "resuming" if job.state == RESUME else "starting"
            say(f"[{k}/{total}] {verb} {job.arm.label} fold {job.fold}{where} "
                f"(elapsed {format_duration(time.monotonic() - started_at)}; log: {job.log})")
            manifest.set_fold(job.arm.label, job.fold, status="running", command=job.command, log=str(job.log),
                              started=_now(), gpu=gpu)
            t0 = time.monotonic()
            try:
                rc = runner(job.command, training_env(base_env, gpu), job.log)
            except OSError as e:  # e.g. executable vanished: report like any failing fold
                say(f"[{k}/{total}] {job.arm.label} fold {job.fold} could not start: {e}")
                rc = -1
            seconds = time.monotonic() - t0
            ok = rc == 0 and training_state(spec.fold_dir(job.arm, job.fold)) == FINISHED
            status = "finished" if ok else "failed"
            manifest.set_fold(job.arm.label, job.fold, status=status, returncode=rc, ended=_now(),
                              seconds=round(seconds, 1))
            detail = "" if ok else (f" (exit code {rc})" if rc != 0 else " (exit code 0 but no validation/summary.json)")
            say(f"[{k}/{total}] {job.arm.label} fold {job.fold} {status}{detail} after {format_duration(seconds)} "
                f"(elapsed {format_duration(time.monotonic() - started_at)})")
            return JobOutcome(job, rc, seconds, ok)
        finally:
            free_gpus.put(gpu)

    if not gpus or len(gpus) == 1:
        return [run_one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        return list(pool.map(run_one, jobs))


def describe_plan(jobs: list[FoldJob], gpus: Sequence[str] | None) -> list[str]:
    """Lines stating what will happen to each fold, and the exact commands."""
    lines = []
    for j in jobs:
        if j.state == FINISHED:
            lines.append(f"# {j.arm.label} fold {j.fold}: finished, skipped")
    todo = [j for j in jobs if j.state != FINISHED]
    if gpus and len(gpus) > 1:
        lines.append(f"# parallel: one fold per GPU on GPUs {' '.join(gpus)} "
                     "(CUDA_VISIBLE_DEVICES set to the next free GPU)")
    prefix = f"CUDA_VISIBLE_DEVICES={gpus[0]} " if gpus and len(gpus) == 1 else ""
    for j in todo:
        note = "resume" if j.state == RESUME else "new"
        lines.append(f"{prefix}{shlex.join(j.command)}   # {j.arm.label} fold {j.fold} ({note}); log: {j.log}")
    return lines


def run_benchmark(spec: BenchmarkSpec, *, runner: Runner | None = None, gpus: Sequence[str] | None = None,
                  dry_run: bool = False, force: bool = False, out: TextIO | None = None,
                  base_env: dict[str, str] | None = None) -> int:
    """Install splits, run every unfinished fold, summarize; exit status 1 if any fold failed.

    ``runner`` defaults to starting ``nnUNetv2_train``; tests inject a fake one.
    """
    out = out or sys.stdout
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
    written = splits_mod.install_default_splits(pre, pre / _data_identifier(pre / f"{spec.plans}.json",
                                                                             spec.configuration))
    if written is not None:
        print(f"splits: nnU-Net's default 5-fold split written before any fold starts: {written}", file=out)


def _data_identifier(plans_file: Path, configuration: str) -> str:
    """The configuration's preprocessed-data folder name, following ``inherits_from`` as nnU-Net does."""
    import json

    configs = json.loads(plans_file.read_text()).get("configurations", {})
    c = configs.get(configuration, {})
    while "data_identifier" not in c and c.get("inherits_from") in configs:
        c = {**configs[c["inherits_from"]], **{k: v for k, v in c.items() if k != "inherits_from"}}
    return c.get("data_identifier", f"{plans_file.stem}_{configuration}")


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
    written = summary_mod.write_summary(results, spec.output_dir, spec.compare)
    manifest.data["summary"] = {"config": spec.summary_identity(), "written": _now(),
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
