"""Options of the GPU check (:mod:`nnunet_hyspark.benchmark.gpu_check`): what runs, how big, how long."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("env", "tests", "memory", "speed", "loss")
#: seconds each stage may take on the GPU (the whole check stays under 8 minutes, start-up included)
STAGE_LIMITS_S = {"env": 60, "tests": 120, "memory": 90, "speed": 120, "loss": 150}
REPORT_JSON, REPORT_MD, LOG, PLOT = "report.json", "report.md", "gpu_check.log", "loss_curves.png"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class GpuCheckOptions:
    """What the check runs (the field names are ``python -m nnunet_hyspark.cli.gpu_check``'s option names)."""

    output: str = "gpu_check_report"
    smoke: bool = False  # tiny sizes and few steps (CPU unit test)
    device: str = "auto"  # auto: cuda when available, else cpu
    stages: tuple[str, ...] = STAGES
    budget_s: float = 420.0  # all stages together; a stage gets min(its limit, what is left)
    isolate: bool = True  # each stage in its own process (hard time limit; a crash or hang loses one stage)
    patch: int = 96  # cubic patch of speed and memory
    batch: int | None = None  # None: the planner's batch for `patch` (HySparK's for speed)
    gpu_memory_target_gb: float = 24.0  # the planner's default target
    methods: tuple[str, ...] = ("hyspark", "mim", "hiend_mae")  # of the memory stage
    #: speed's backends; ``reference`` = the published formulation of the whole step (dense CNN, plain decoder)
    backends: tuple[str, ...] = ("reference", "dense", "blocks", "spconv")
    precisions: tuple[str, ...] = ("fp32", "bf16")
    speed_steps: int = 5
    speed_warmup: int = 2
    loss_steps: int = 200
    loss_patch: int = 96
    loss_batch: int = 2
    loss_backend: str = "dense"
    seed: int = 0
    stage_limits_s: dict[str, float] = field(default_factory=lambda: dict(STAGE_LIMITS_S))

    def resolved_device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


def smoke_options(**overrides: Any) -> GpuCheckOptions:
    """Tiny sizes for a CPU run of every stage's code (the unit test's and ``--smoke``'s settings)."""
    base = dict(smoke=True, patch=32, batch=1, speed_steps=1, speed_warmup=0, loss_steps=2, loss_patch=32,
                loss_batch=1, budget_s=300.0, backends=("dense", "spconv"), precisions=("fp32",))
    return GpuCheckOptions(**{**base, **overrides})


def check_options(opts: GpuCheckOptions) -> None:
    """Refuse options the stages cannot run, before anything is written (one-line HySparKError)."""
    from nnunet_hyspark.errors import HySparKError

    unknown = [s for s in opts.stages if s not in STAGES]
    if unknown:
        raise HySparKError(f"unknown stage(s) {', '.join(unknown)}", f"choose from {' '.join(STAGES)}")
    methods = ("hyspark", "mim", "hiend_mae")
    if any(m not in methods for m in opts.methods):
        raise HySparKError(f"unknown method(s) in {', '.join(opts.methods)}", f"choose from {' '.join(methods)}")
    bad = [p for p in opts.precisions if p not in ("fp32", "bf16", "fp16")]
    if bad:
        raise HySparKError(f"unknown precision(s) {', '.join(bad)}", "choose from fp32 bf16 fp16")
    for name in ("patch", "loss_patch"):
        value = getattr(opts, name)
        if value <= 0 or value % 16:
            raise HySparKError(f"--{name.replace('_', '-')} {value} is not a positive multiple of 16",
                               "e.g. 96 (the HySparK encoder downsamples by 16)")
    for name in ("loss_steps", "loss_batch", "speed_steps"):
        if getattr(opts, name) < 1:
            raise HySparKError(f"--{name.replace('_', '-')} must be at least 1", "e.g. the default")
    if opts.batch is not None and opts.batch < 1:
        raise HySparKError("--batch must be at least 1", "or leave it out for the planner's batch")
    if opts.budget_s <= 0:
        raise HySparKError("--budget-s must be positive", "e.g. 420 (seconds)")
