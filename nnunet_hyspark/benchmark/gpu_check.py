"""``scripts/gpu_check.sh``: everything worth knowing from a first, short session on a CUDA machine.

Five stages, each time-boxed, each recording its own result or failure, so that one failing or hanging
stage loses nothing of the others:

``env``      torch / CUDA / GPU, which sparse backends and optional packages are there (spconv);
``tests``    the suite's CUDA-only tests (found by their ``skipif(not torch.cuda.is_available())`` markers);
``memory``   peak memory of one fine-tuning step of each method's network at the planner's patch and batch,
             against the planner's estimate (the correction factor), and of the pre-training model;
``speed``    the pre-training step of dense / blocks / spconv x fp32 / bf16 (``hyspark_benchmark speed``);
``loss``     HySparK pre-training loss curves, bf16 against fp32, same seed, same batches, same masks.

The results go into ``report.json`` (rewritten after every stage and as stages progress) and ``report.md``,
plus ``loss_curves.png`` and ``gpu_check.log`` (the stages' output) -- four files, in one folder.
On a machine without CUDA it runs on the CPU; ``smoke`` shrinks every size so that the unit test walks
every stage's code in seconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from nnunet_hyspark.benchmark.gpu_options import LOG, PLOT, REPO_ROOT, REPORT_JSON, REPORT_MD, GpuCheckOptions
from nnunet_hyspark.io import atomic_json_save, atomic_path


# ----------------------------------------------------------------------------------------------- the report
class Report:
    """``report.json`` + ``report.md`` in the output folder, rewritten on every update (the stages run one
    after the other, in this process or a child, so read-merge-write is safe)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def read(self) -> dict:
        try:
            return json.loads((self.folder / REPORT_JSON).read_text())
        except (OSError, ValueError):
            return {"stages": {}}

    def update(self, stage: str | None = None, **fields: Any) -> dict:
        """Merge ``fields`` into the stage's entry (or the top level) and rewrite both files."""
        data = self.read()
        target = data.setdefault("stages", {}).setdefault(stage, {}) if stage else data
        target.update(fields)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_json_save(data, self.folder / REPORT_JSON)
        from nnunet_hyspark.benchmark.gpu_report import render_markdown

        with atomic_path(self.folder / REPORT_MD) as tmp:
            Path(tmp).write_text(render_markdown(data))
        return data

    def recorder(self, stage: str) -> Callable[..., None]:
        """``record(key=value, ...)``: partial results of ``stage`` as they come."""
        def record(**fields: Any) -> None:
            self.update(stage, **fields)
        return record


# ----------------------------------------------------------------------------------------------- running
def _stage_functions() -> dict[str, Callable]:
    from nnunet_hyspark.benchmark import gpu_stages, gpu_training

    return {"env": gpu_stages.stage_env, "tests": gpu_stages.stage_tests, "speed": gpu_stages.stage_speed,
            "memory": gpu_training.stage_memory, "loss": gpu_training.stage_loss}


def run_stage(name: str, opts: GpuCheckOptions, deadline: float) -> None:
    """Run stage ``name`` here and record its result; a failure is recorded, not raised."""
    report = Report(opts.output)
    record = report.recorder(name)
    start = time.time()
    record(status="running", started=start)
    try:
        result = _stage_functions()[name](opts, record, deadline)
        record(status="ok", seconds=round(time.time() - start, 1), result=result)
    except BaseException as e:  # noqa: BLE001 -- a stage's failure is a finding, recorded for the report
        record(status="failed", seconds=round(time.time() - start, 1), error=f"{type(e).__name__}: {e}",
               traceback=traceback.format_exc()[-4000:])
        if isinstance(e, KeyboardInterrupt):
            raise


def run_stage_from_json(payload: str) -> None:
    """Entry point of a stage's child process: ``payload`` = JSON of (stage, options, deadline)."""
    d = json.loads(payload)
    opts = dataclasses.replace(GpuCheckOptions(), **{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in d["options"].items()})
    run_stage(d["stage"], opts, float(d["deadline"]))


def _options_json(opts: GpuCheckOptions) -> dict:
    return dataclasses.asdict(opts)


def _run_isolated(name: str, opts: GpuCheckOptions, limit: float, log) -> None:
    payload = json.dumps({"stage": name, "options": _options_json(opts), "deadline": time.time() + limit})
    code = "import sys; from nnunet_hyspark.benchmark.gpu_check import run_stage_from_json; run_stage_from_json(sys.argv[1])"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the repository first on the path: the check runs from a checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    log.write(f"\n===== stage {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    # its own process group: on timeout the stage's children (pytest, speed's worker) go with it, so that
    # nothing left running skews the next stage's timings or holds GPU memory
    proc = subprocess.Popen([sys.executable, "-c", code, payload], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, env=env, start_new_session=True)
    try:
        returncode = proc.wait(timeout=limit + 15)  # +15 s: the stage's own soft deadline comes first
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if returncode is None:
        Report(opts.output).update(name, status="timeout", error=f"stopped after {limit + 15:.0f} s")
        return
    entry = Report(opts.output).read()["stages"].get(name, {})
    if returncode != 0 and entry.get("status") in (None, "running"):  # died without recording (a crash)
        Report(opts.output).update(name, status="failed", error=f"the stage's process exited {returncode} "
                                                                 f"(see {LOG})")


def run(opts: GpuCheckOptions, say: Callable[[str], None] = print) -> Path:
    """Run the stages of ``opts`` one after the other within ``opts.budget_s``; returns ``report.md``."""
    out = Path(opts.output).resolve()  # the stages' processes run in the repository's folder
    opts = dataclasses.replace(opts, output=str(out))
    out.mkdir(parents=True, exist_ok=True)
    for stale in (REPORT_JSON, REPORT_MD, PLOT, LOG):  # a report is one run's
        (out / stale).unlink(missing_ok=True)
    report = Report(out)
    report.update(started=time.strftime("%Y-%m-%d %H:%M:%S"), options=_options_json(opts),
                  stages={s: {"status": "pending"} for s in opts.stages})
    end = time.time() + opts.budget_s
    with open(out / LOG, "a") as log:
        for name in opts.stages:
            left = end - time.time()
            limit = min(float(opts.stage_limits_s.get(name, 60)), left)
            if limit < 5:
                report.update(name, status="skipped", error="no time left in the check's budget")
                continue
            say(f"[gpu_check] stage {name} (up to {limit:.0f} s)")
            t0 = time.time()
            if opts.isolate:
                _run_isolated(name, opts, limit, log)
            else:
                run_stage(name, opts, time.time() + limit)
            entry = report.read()["stages"][name]
            say(f"[gpu_check] stage {name}: {entry.get('status')} ({time.time() - t0:.0f} s)"
                + (f": {entry['error']}" if entry.get("error") else ""))
    data = report.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    from nnunet_hyspark.benchmark.gpu_report import summary_lines

    try:
        for line in summary_lines(data.get("stages", {})):  # the headline, also on screen
            say(line)
    except (KeyError, TypeError, ValueError):  # malformed partial results: report.md says what there is
        pass
    return out / REPORT_MD
