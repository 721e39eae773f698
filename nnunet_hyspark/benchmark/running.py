"""Running the folds: each fold's state on disk, its ``nnUNetv2_train`` command, and the runs themselves.

The state of a fold is read from nnU-Net's output folder, never from our own bookkeeping: a
finished fold is skipped, a half-trained fold is continued with ``--c``, anything else starts
fresh. Folds run one after the other, or one per GPU (``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import os
import queue
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

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.allocator import DEFAULT_MALLOC, reuse_environment
from nnunet_hyspark.benchmark.arms import Arm
from nnunet_hyspark.benchmark.fractions import DEFAULT_FRACTIONS, FoldEntry, format_fraction
from nnunet_hyspark.benchmark.manifest import Manifest, now
from nnunet_hyspark.benchmark.spec import BenchmarkSpec
from nnunet_hyspark.errors import HySparKError

TRAIN_EXECUTABLE = "nnUNetv2_train"

#: (command, environment, log file) -> exit code. Injectable so tests need no training.
Runner = Callable[[list[str], dict[str, str], Path], int]

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
    cmd = [TRAIN_EXECUTABLE, spec.dataset_arg, spec.configuration, str(fold), "-tr", arm.trainer,
           "-p", spec.arm_plans(arm)]
    if spec.device:
        cmd += ["-device", spec.device]
    if resume:
        cmd.append("--c")
    elif arm.weights:
        cmd += ["-pretrained_weights", arm.weights]
    return cmd


@dataclass
class FoldJob:
    """One arm x fold (x training fraction) with its state on disk, the command that continues it and its log."""

    arm: Arm
    fold: int  # nnU-Net's fold (-f): the cross-validation fold, or the entry of its training subset
    state: str
    command: list[str]
    log: Path
    cv_fold: int | None = None  # set when the benchmark has --train-fractions
    fraction: float | None = None

    @property
    def title(self) -> str:
        """How progress lines name the job: 'scratch fold 1', or 'scratch fold 1 fraction 0.5 (nnU-Net fold 6)'."""
        if self.fraction is None:
            return f"{self.arm.label} fold {self.fold}"
        entry = f" (nnU-Net fold {self.fold})" if self.fold != self.cv_fold else ""
        return f"{self.arm.label} fold {self.cv_fold} fraction {format_fraction(self.fraction)}{entry}"


def plan_jobs(spec: BenchmarkSpec) -> list[FoldJob]:
    """All arm x fold x fraction jobs, fold-major so paired results for a fold become available together.

    The fold x fraction -> nnU-Net fold entries are ``spec.fold_entries`` (set once the training
    subsets are installed, :func:`.fractions.install`); without them, the folds themselves.
    """
    with_fractions = spec.fractions != DEFAULT_FRACTIONS
    entries = spec.fold_entries or [FoldEntry(f, 1.0, f) for f in spec.folds]
    jobs = []
    for e in entries:
        for arm in spec.arms:
            state = training_state(spec.fold_dir(arm, e.nnunet_fold))
            name = f"{arm.label}_fold{e.cv_fold}" + (f"_frac{format_fraction(e.fraction)}" if with_fractions else "")
            jobs.append(FoldJob(arm, e.nnunet_fold, state, train_command(spec, arm, e.nnunet_fold, state == RESUME),
                                spec.output_dir / "logs" / f"{name}.log", e.cv_fold if with_fractions else None,
                                e.fraction if with_fractions else None))
    return jobs


#: the folder nnU-Net must search for our trainers (the same one ``hyspark_env`` exports)
hyspark_trainers_dir = compat.our_trainer_folder


def training_env(base: dict[str, str] | None = None, gpu: str | None = None) -> dict[str, str]:
    """Subprocess environment: our trainers on nnUNet_extTrainer, and the fold's GPU if assigned.

    nnUNet_extTrainer is a path list; like ``hyspark_env`` we put our folder first and keep
    the user's folders, so both kinds of trainers are found. glibc's ``MALLOC_*`` variables of
    ``--malloc reuse`` unless already set (``MALLOC_MMAP_MAX_=65536`` restores glibc's default).
    """
    env = reuse_environment(DEFAULT_MALLOC, os.environ if base is None else base)  # nnunet_hyspark.allocator
    env["nnUNet_extTrainer"] = compat.ext_trainer_value(env.get("nnUNet_extTrainer"))
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
            fh.write(f"\n===== {now()} {shlex.join(cmd)}\n")
            fh.flush()
            return subprocess.run([executable] + cmd[1:], env=env, stdout=fh, stderr=subprocess.STDOUT).returncode

    return run


def fraction_fields(job: FoldJob) -> dict:
    """The manifest's record of which fold x fraction an nnU-Net fold is (nothing without fractions)."""
    return {} if job.fraction is None else {"cv_fold": job.cv_fold, "fraction": job.fraction}


@dataclass
class JobOutcome:
    job: FoldJob
    returncode: int
    seconds: float
    ok: bool = field(default=False)


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
            say(f"[{k}/{total}] {verb} {job.title}{where} "
                f"(elapsed {format_duration(time.monotonic() - started_at)}; log: {job.log})")
            manifest.set_fold(job.arm.label, job.fold, status="running", command=job.command, log=str(job.log),
                              started=now(), gpu=gpu, **fraction_fields(job))
            t0 = time.monotonic()
            try:
                rc = runner(job.command, training_env(base_env, gpu), job.log)
            except OSError as e:  # e.g. executable vanished: report like any failing fold
                say(f"[{k}/{total}] {job.title} could not start: {e}")
                rc = -1
            seconds = time.monotonic() - t0
            ok = rc == 0 and training_state(spec.fold_dir(job.arm, job.fold)) == FINISHED
            status = "finished" if ok else "failed"
            manifest.set_fold(job.arm.label, job.fold, status=status, returncode=rc, ended=now(),
                              seconds=round(seconds, 1))
            detail = "" if ok else (f" (exit code {rc})" if rc != 0 else " (exit code 0 but no validation/summary.json)")
            say(f"[{k}/{total}] {job.title} {status}{detail} after {format_duration(seconds)} "
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
            lines.append(f"# {j.title}: finished, skipped")
    todo = [j for j in jobs if j.state != FINISHED]
    if gpus and len(gpus) > 1:
        lines.append(f"# parallel: one fold per GPU on GPUs {' '.join(gpus)} "
                     "(CUDA_VISIBLE_DEVICES set to the next free GPU)")
    prefix = f"CUDA_VISIBLE_DEVICES={gpus[0]} " if gpus and len(gpus) == 1 else ""
    for j in todo:
        note = "resume" if j.state == RESUME else "new"
        lines.append(f"{prefix}{shlex.join(j.command)}   # {j.title} ({note}); log: {j.log}")
    return lines
