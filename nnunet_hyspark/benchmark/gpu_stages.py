"""The GPU check's environment, CUDA-test and speed stages (see :mod:`nnunet_hyspark.benchmark.gpu_check`).

Each stage is ``stage(opts, record, deadline) -> result``: ``record(**fields)`` stores partial results in the
report as they come, ``deadline`` (``time.time()``) is when the stage must have finished.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import torch

from nnunet_hyspark.benchmark.gpu_options import REPO_ROOT, GpuCheckOptions
from nnunet_hyspark.hardware import cpu_info

Record = Callable[..., None]
#: packages the check reports on: optional ones (spconv: a CUDA wheel) and nnU-Net's (absent from bare images)
PACKAGES = ("spconv", "cumm", "nnunetv2", "matplotlib", "pytest")


# ----------------------------------------------------------------------------------------------- env
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def stage_env(opts: GpuCheckOptions, record: Record, deadline: float) -> dict:
    """What this machine is: Python, torch, CUDA, the GPU, the sparse backends and optional packages."""
    from nnunet_hyspark.sparse import available_backends

    device = opts.resolved_device()
    env: dict[str, Any] = {
        "python": sys.executable, "python_version": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device": device,
        "cpu": cpu_info().model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "packages": {p: importlib.util.find_spec(p) is not None for p in PACKAGES},
        "sparse_backends": available_backends(device),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        env.update(gpu=props.name, gpu_memory_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    if not env["packages"]["spconv"]:
        env["spconv_note"] = ("spconv is not installed (it needs a CUDA wheel, e.g. spconv-cu120, that this "
                              "check does not download): the spconv backend is not measured")
    return env


# ----------------------------------------------------------------------------------------------- tests
def _needs_cuda(decorator: ast.expr) -> bool:
    """``pytest.mark.skipif(not torch.cuda.is_available(), ...)`` (any spelling that negates cuda.is_available)."""
    if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("skipif") and decorator.args):
        return False
    cond = decorator.args[0]
    return (isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Not)
            and "cuda.is_available" in ast.unparse(cond.operand))


def cuda_only_tests(tests_dir: Path) -> list[str]:
    """Node ids (``tests/x.py::name``) of the tests that skip without CUDA: decorated functions, or every test
    of a module whose ``pytestmark`` says so."""
    nodes = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # module-level `NAME = pytest.mark.skipif(not torch.cuda.is_available(), ...)`: `@NAME` marks, and
        # `pytestmark = NAME` (or a list holding one) marks the whole module
        marks = {t.id for n in tree.body if isinstance(n, ast.Assign) and _needs_cuda(n.value)
                 for t in n.targets if isinstance(t, ast.Name)}

        def needs(d: ast.expr) -> bool:
            return _needs_cuda(d) or (isinstance(d, ast.Name) and d.id in marks)

        module_mark = "pytestmark" in marks or any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
            and any(needs(d) for d in ast.walk(n.value) if isinstance(d, ast.expr)) for n in tree.body)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if module_mark or any(needs(d) for d in node.decorator_list):
                    nodes.append(f"{path.relative_to(tests_dir.parent).as_posix()}::{node.name}")
    return nodes


def _junit_summary(xml_path: Path) -> dict:
    cases, failures = [], []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                failures.append({"test": name, "message": (child.get("message") or "")[:500],
                                 "details": (child.text or "")[-3000:]})
            elif child.tag == "skipped":
                outcome = "skipped"
        cases.append({"test": name, "outcome": outcome, "seconds": float(case.get("time", 0) or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases, "failures": failures}


def stage_tests(opts: GpuCheckOptions, record: Record, deadline: float) -> dict:
    """pytest on the suite's CUDA-only tests (they skip on a machine without CUDA)."""
    tests_dir = REPO_ROOT / "tests"
    if not tests_dir.is_dir():
        raise FileNotFoundError(f"no tests folder at {tests_dir}: run the check from a checkout")
    nodes = cuda_only_tests(tests_dir)
    record(selected=nodes)
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *nodes]
        timeout = max(5.0, deadline - time.time() - 5)
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise TimeoutError(f"pytest ran past {timeout:.0f} s; last output: {out[-1500:]}") from None
        summary = _junit_summary(junit) if junit.is_file() else {"counts": {}, "cases": [], "failures": []}
    print(proc.stdout[-3000:], proc.stderr[-1000:], sep="\n", flush=True)  # into gpu_check.log
    return {"command": " ".join(cmd[:6] + ["<%d tests>" % len(nodes)]), "exit_code": proc.returncode,
            "device_has_cuda": torch.cuda.is_available(), **summary, "output_tail": proc.stdout[-3000:]}


# ----------------------------------------------------------------------------------------------- speed
def planned_batch(method: str, patch: tuple[int, int, int], target_gb: float, arch: dict | None = None) -> int:
    """The planner's batch for ``patch``: the largest whose memory estimate fits ``target_gb``, at least 2
    (nnU-Net's minimum; the planner's dataset-size cap is left out: it depends on the dataset)."""
    from nnunet_hyspark.methods import get_method

    spec = get_method(method)
    fits = 1
    while spec.estimate_memory(patch, fits + 1, 1, 2, **(arch or {})).total_gb <= target_gb and fits < 1024:
        fits += 1
    return max(fits, 2)


def _speed_rows(opts: GpuCheckOptions, backend: str, batch: int, device: str, tmp: Path) -> list[dict]:
    from nnunet_hyspark.benchmark.speed import SpeedOptions, run

    run(SpeedOptions(backends=(backend,), what=("pretrain",), batch=batch, patch=(opts.patch,),
                     widths="tiny" if opts.smoke else "base", steps=opts.speed_steps, warmup=opts.speed_warmup,
                     device=device, precision=tuple(opts.precisions), output=str(tmp)))
    import json

    return json.loads((tmp / "speed.json").read_text())["rows"]


def stage_speed(opts: GpuCheckOptions, record: Record, deadline: float) -> dict:
    """``hyspark_benchmark speed``'s pre-training step for every backend x precision, one backend at a time (a
    backend that cannot run here is recorded, the others still run); ratios against dense fp32."""
    device = opts.resolved_device()
    patch = (opts.patch,) * 3
    batch = opts.batch or planned_batch("hyspark", patch, opts.gpu_memory_target_gb)
    batch_source = "given" if opts.batch else f"the planner's for a {opts.gpu_memory_target_gb:g} GB target"
    rows: list[dict] = []
    record(batch=batch, batch_source=batch_source, patch=list(patch), device=device, rows=rows)
    for backend in opts.backends:
        if time.time() > deadline - 10:
            rows.append({"backend": backend, "error": "skipped: the stage's time was up"})
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for r in _speed_rows(opts, backend, batch, device, Path(tmp)):
                    rows.append({k: r.get(k) for k in ("what", "precision", "backend", "median_s",
                                                       "samples_per_s", "peak_mem_bytes", "times_s")})
        except Exception as e:  # noqa: BLE001 -- e.g. spconv missing: a finding for the report
            rows.append({"backend": backend, "error": f"{type(e).__name__}: {e}"[:500]})
        if device == "cuda":
            torch.cuda.empty_cache()
        record(rows=rows)
    for name in ("dense", "reference"):  # the yardsticks: our dense fp32 step and the published formulation's
        base = next((r for r in rows if (r.get("backend"), r.get("precision")) == (name, "fp32")
                     and r.get("median_s")), None)
        for r in rows:
            if base and r.get("median_s"):
                r[f"speedup_vs_{name}_fp32"] = base["median_s"] / r["median_s"]
    return {"batch": batch, "batch_source": batch_source, "patch": list(patch), "device": device,
            "widths": "tiny" if opts.smoke else "base", "rows": rows}
