"""Console scripts run as numbered, logged steps in a self-contained nnU-Net folder (the demo and the study).

Every step is the real command a user would type, run in a subprocess with its output in
``<root>/logs/NN_<command>.log``; a failing step stops the run with the log's tail and the log's path.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

from nnunet_hyspark.allocator import DEFAULT_MALLOC, reuse_environment
from nnunet_hyspark.errors import HySparKError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (no augmentation workers,
#: a common setting on small CPUs): these commands get at least 1
_PLANNERS = ("nnUNetv2_plan_and_preprocess", "nnUNetv2_plan_experiment")


def nnunet_environment(root: Path, workers: int = 2) -> dict[str, str]:
    """The environment of a run that keeps all nnU-Net data under ``root`` and finds our trainers.

    The interpreter's folder goes first on PATH so the console scripts of this installation run.
    ``workers``: nnU-Net's data-augmentation and preprocessing processes unless already set.
    glibc's ``MALLOC_*`` variables of ``--malloc reuse`` unless already set (``MALLOC_MMAP_MAX_=65536``
    restores glibc's default).
    """
    env = dict(os.environ)
    for name in NNUNET_FOLDERS:
        env[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    from nnunet_hyspark.nnunet_compat import ext_trainer_value

    bindir = str(Path(sys.executable).parent)
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               nnUNet_extTrainer=ext_trainer_value(env.get("nnUNet_extTrainer")))
    env.setdefault("nnUNet_n_proc_DA", str(workers))
    env.setdefault("nnUNet_def_n_proc", str(workers))
    return reuse_environment(DEFAULT_MALLOC, env)  # faster CPU steps (nnunet_hyspark.allocator)


@dataclass
class StepTime:
    """What one finished step took (for the study's record)."""

    title: str
    command: list[str]
    seconds: float
    returncode: int


@dataclass
class Steps:
    """Runs numbered steps, logging each one's output, and stops with the log's tail on failure."""

    root: Path
    env: dict
    total: int
    out: TextIO = sys.stdout
    n: int = 0
    times: list[StepTime] = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run(self, title: str, args: Sequence[str], ok: Sequence[int] = (0,)) -> int:
        """Run ``args`` (a console script of this installation or on PATH); returns its exit status,
        which must be one of ``ok``."""
        self.n += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{self.n:02d}_{args[0]}.log"
        print(f"[{self.n}/{self.total}] {title}\n      $ {shlex.join(args)}", file=self.out, flush=True)
        t = time.time()
        exe = shutil.which(args[0], path=self.env["PATH"]) or args[0]
        env = self.env
        if args[0] in _PLANNERS and env.get("nnUNet_n_proc_DA", "").strip() == "0":
            env = {**env, "nnUNet_n_proc_DA": "1"}
        with open(log, "w") as f:
            rc = subprocess.run([exe, *args[1:]], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        self.times.append(StepTime(title, list(args), time.time() - t, rc))
        if rc not in ok:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(tail, file=sys.stderr)
            raise HySparKError(f"step {self.n} ({args[0]}) failed with exit code {rc}", f"see {log}")
        note = "" if rc == 0 else f", exit status {rc}"
        print(f"      done in {time.time() - t:.0f} s{note} (log: {log})", file=self.out, flush=True)
        return rc
