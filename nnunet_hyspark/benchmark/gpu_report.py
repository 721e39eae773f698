"""``report.md`` of the GPU check, rendered from ``report.json`` (any state: stages may be pending, partial,
failed or timed out -- the markdown says which, and shows what there is)."""
from __future__ import annotations

from typing import Any


def _f(v: Any, fmt: str = ".3f", none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _status_line(name: str, entry: dict) -> list[str]:
    line = f"status: **{entry.get('status', 'pending')}**"
    if "seconds" in entry:
        line += f" ({entry['seconds']} s)"
    out = [f"## {name}", "", line]
    if entry.get("error"):
        out.append(f"\nerror: `{entry['error']}`")
    return out


def _env(r: dict) -> list[str]:
    keys = ("gpu", "gpu_memory_gib", "compute_capability", "torch", "torch_cuda", "cudnn", "device", "cpu",
            "cpu_count", "python", "git_commit", "sparse_backends", "packages")
    lines = [f"- {k}: {r[k]}" for k in keys if k in r]
    if r.get("spconv_note"):
        lines.append(f"- **{r['spconv_note']}**")
    return lines


def _tests(r: dict) -> list[str]:
    c = r.get("counts", {})
    lines = [f"{len(r.get('cases', []))} CUDA-only tests: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
             f"{c.get('error', 0)} errors, {c.get('skipped', 0)} skipped (pytest exit code {r.get('exit_code')})"]
    if not r.get("device_has_cuda"):
        lines.append("(no CUDA here: the CUDA-only tests skip)")
    lines += ["", "| test | outcome | s |", "|---|---|---|"]
    lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} |" for c in r.get("cases", [])]
    for f in r.get("failures", []):
        lines += ["", f"### {f['test']}", "", "```", f["details"][-2000:], "```"]
    return lines


def _speed(r: dict) -> list[str]:
    lines = [f"HySparK pre-training step (forward, backward, AdamW), patch {r.get('patch')}, batch {r.get('batch')} "
             f"({r.get('batch_source', 'given')}), widths {r.get('widths', 'base')}, {r.get('device')}; "
             "reference = the published formulation (dense CNN then mask, plain decoder)", "",
             "| backend | precision | median step s | samples/s | peak memory GiB | vs dense fp32 | vs reference fp32 |",
             "|---|---|---|---|---|---|---|"]
    for row in r.get("rows", []):
        if row.get("error"):
            lines.append(f"| {row['backend']} | - | not run: {row['error']} | | | | |")
            continue
        peak = row.get("peak_mem_bytes")
        lines.append(f"| {row['backend']} | {row['precision']} | {_f(row.get('median_s'))} | "
                     f"{_f(row.get('samples_per_s'), '.2f')} | {_f(peak / 2**30 if peak else None, '.2f')} | "
                     f"{_f(row.get('speedup_vs_dense_fp32'), '.2f')}x | "
                     f"{_f(row.get('speedup_vs_reference_fp32'), '.2f')}x |")
    return lines


def _memory(r: dict) -> list[str]:
    lines = [f"One fine-tuning step (autocast {r.get('precision')}, deep supervision, Dice + CE, AdamW) at patch "
             f"{r.get('patch')}, batch {r.get('batch_source', 'given')}. measured = peak "
             "reserved by the allocator + CUDA context; correction factor = measured / estimate.", "",
             "| method | batch | estimate GiB | measured GiB | peak allocated GiB | correction factor | step s | "
             "pre-training peak GiB (crop) |", "|---|---|---|---|---|---|---|---|"]
    for method, row in r.get("rows", {}).items():
        ft, pt = row.get("finetune", {}), row.get("pretrain", {})
        pre = (f"{_f(pt.get('measured_total_gib'), '.2f')} ({pt.get('crop')})" if pt
               else row.get("pretrain_error", "-"))
        ft_cell = _f(ft.get("measured_total_gib"), ".2f") if ft else row.get("finetune_error", "-")
        lines.append(f"| {method} | {row.get('batch', '-')} | {_f(row.get('estimate_gib'), '.2f')} | {ft_cell} | "
                     f"{_f(ft.get('peak_allocated_gib'), '.2f')} | {_f(row.get('correction_factor'), '.2f')} | "
                     f"{_f(ft.get('step_s'), '.3f')} | {pre} |")
    return lines


def _loss(r: dict) -> list[str]:
    s = r.get("summary") or r.get("partial") or {}
    lines = [f"HySparK pre-training on synthetic CT phantoms, patch {r.get('patch')}, batch {r.get('batch')}, "
             f"backend {r.get('backend')}, {s.get('steps_done', 0)} of {r.get('steps')} steps per precision, "
             f"same initial weights, batches and masks.", "",
             "| precision | first loss | mean of the last steps | median step s |", "|---|---|---|---|"]
    for p in ("fp32", "bf16"):
        if p in s:
            lines.append(f"| {p} | {_f(s[p].get('first'), '.4f')} | {_f(s[p].get('tail_mean'), '.4f')} | "
                         f"{_f(s[p].get('median_step_s'), '.3f')} |")
    if "tail_relative_difference" in s:
        lines.append(f"\nbf16 vs fp32: tail means differ by {100 * s['tail_relative_difference']:.2f} % "
                     f"(last {s['tail_steps']} steps); median per-step difference "
                     f"{100 * s['median_step_relative_difference']:.2f} %.")
    for k, v in (r.get("errors") or {}).items():
        lines.append(f"\n{k}: {v}")
    if r.get("plot"):
        lines.append(f"\n![loss curves]({r['plot']})")
    return lines


RENDERERS = {"env": _env, "tests": _tests, "memory": _memory, "speed": _speed, "loss": _loss}
TITLES = {"env": "Machine", "tests": "CUDA tests", "memory": "Peak memory vs the planner's estimate",
          "speed": "Speed: dense / blocks / spconv x fp32 / bf16", "loss": "Loss curves: bf16 vs fp32"}


def summary_lines(stages: dict) -> list[str]:
    """One line per finished stage: what to read first."""
    res = {n: e.get("result") or {} for n, e in stages.items()}
    out = []
    if res.get("env"):
        e = res["env"]
        out.append(f"- machine: {e.get('gpu', e.get('cpu'))}, torch {e.get('torch')}, "
                   f"backends {', '.join(e.get('sparse_backends', []))}")
    if res.get("tests"):
        c = res["tests"].get("counts", {})
        out.append(f"- CUDA tests: {c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
                   f"{c.get('skipped', 0)} skipped")
    factors = {m: r["correction_factor"] for m, r in res.get("memory", {}).get("rows", {}).items()
               if r.get("correction_factor")}
    if factors:
        out.append("- memory correction factors (measured / estimate): "
                   + ", ".join(f"{m} {f:.2f}" for m, f in factors.items()))
    rows = [r for r in res.get("speed", {}).get("rows", []) if r.get("median_s")]
    if rows:
        best = min(rows, key=lambda r: r["median_s"])
        out.append(f"- fastest pre-training step: {best['backend']} {best['precision']} {best['median_s']:.3f} s"
                   f" ({_f(best.get('speedup_vs_dense_fp32'), '.2f')}x dense fp32, "
                   f"{_f(best.get('speedup_vs_reference_fp32'), '.2f', 'n/a ')}x reference fp32)")
    s = res.get("loss", {}).get("summary", {})
    if "tail_relative_difference" in s:
        out.append(f"- loss curves: bf16 vs fp32 tail means differ by {100 * s['tail_relative_difference']:.2f} % "
                   f"after {s['steps_done']} steps")
    return ["", "## Summary", "", *out] if out else []


def render_markdown(data: dict) -> str:
    """The whole report; a stage still running shows its partial results."""
    lines = ["# GPU check", "", f"started {data.get('started', '?')}, finished {data.get('finished', '(running)')}"]
    try:
        lines += summary_lines(data.get("stages", {}))
    except (KeyError, TypeError, ValueError) as e:  # the summary never stops the report
        lines.append(f"\n(summary not shown: {type(e).__name__}: {e})")
    for name, entry in data.get("stages", {}).items():
        lines += [""] + _status_line(f"{name}: {TITLES.get(name, name)}", entry)
        result = entry.get("result") or {k: v for k, v in entry.items() if k not in ("status", "error", "traceback")}
        if name in RENDERERS and result:
            try:
                lines += [""] + RENDERERS[name](result)
            except (KeyError, TypeError, ValueError) as e:  # partial data: show what there is, never fail
                lines.append(f"\n(partial results not shown: {type(e).__name__}: {e})")
    return "\n".join(lines) + "\n"
