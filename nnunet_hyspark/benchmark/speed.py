"""``hyspark_benchmark speed``: time the sparse backends, in one run on one machine.

For each backend it times the masked encoder alone and the full HySparK pre-training step
(forward, backward, AdamW), and optionally the data pipeline alone (crops per second from
preprocessed data). Reports median step time, samples per second, peak memory and the ratio
against ``dense``, with the device and thread count, as JSON and a markdown table. Figures
on a shared machine are noisy: compare the ratios of one run, not numbers across runs.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_hyspark.io import atomic_json_save, atomic_path
from nnunet_hyspark.sparse.benchmark import (AUTOCAST_DTYPES, as_patch3, current_rss_bytes, parse_widths,
                                             time_encoder)


def _time_pretrain_step(backend: str, batch: int, patch, widths, mask_ratio: float, steps: int, warmup: int,
                        device: str, dtype: str, num_threads: int | None, seed: int) -> dict:
    """Median time of a full HySparK step (encoder + densify + light decoder + loss + AdamW)."""
    from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
    from nnunet_hyspark.methods.hyspark.model import HySparK

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    patch = as_patch3(patch)
    model = HySparK(HybridEncoder(1, widths=parse_widths(widths)), mask_ratio=mask_ratio, sparse_backend=backend).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 1, *patch, device=dev)
    gen = torch.Generator().manual_seed(seed)
    masks = [model.random_mask(x, gen) for _ in range(warmup + steps)]
    autocast = AUTOCAST_DTYPES[dtype]
    rss_before = current_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mem_before = torch.cuda.memory_allocated(dev)
    times = []
    for i, mask in enumerate(masks):
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=autocast) if autocast is not None else nullcontext():
            loss = model(x, mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - mem_before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    median = statistics.median(times)
    return {"backend": backend, "median_s": median, "samples_per_s": batch / median, "peak_mem_bytes": int(peak),
            "times_s": times, "threads": torch.get_num_threads(), "device": str(dev), "dtype": dtype}


def time_pretrain_step(backend: str, batch: int = 2, patch=96, widths="base", mask_ratio: float = 0.75,
                       steps: int = 3, warmup: int = 1, device: str = "cpu", dtype: str = "fp32",
                       num_threads: int | None = None, seed: int = 0) -> dict:
    """Like :func:`nnunet_hyspark.sparse.benchmark.time_encoder`, for the whole pre-training step; on the CPU
    in a fresh process so that the peak resident memory is this measurement's alone."""
    args = (backend, batch, patch, widths, mask_ratio, steps, warmup, device, dtype, num_threads, seed)
    if torch.device(device).type != "cpu":
        return _time_pretrain_step(*args)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_time_pretrain_step, *args).result()


@dataclass(frozen=True)
class SpeedOptions:
    """What ``hyspark_benchmark speed`` times (the field names are its option names)."""

    backends: tuple[str, ...] = ("dense", "blocks")  # the first is the baseline
    what: tuple[str, ...] = ("encoder", "pretrain")  # and/or "data" (needs dataset)
    batch: int = 2
    patch: tuple[int, ...] = (96,)  # one size (cubic) or three
    widths: str = "base"  # base, tiny, or five comma-separated widths
    mask_ratio: float = 0.75
    steps: int = 3  # timed steps, after `warmup` untimed ones
    warmup: int = 1
    device: str = "cpu"
    precision: tuple[str, ...] = ("fp32",)  # every backend in each, against the first precision + backend
    threads: int | None = None  # torch threads (None: torch's)
    dataset: str | None = None  # preprocessed dataset for "data"
    plans: str = "nnUNetHySparKPlans"
    output: str = "speed_benchmark"  # folder for speed.json and speed.md


def _markdown(header: dict, rows: list[dict]) -> str:
    lines = ["# hyspark_benchmark speed", "",
             f"device: {header['device']} ({header['device_name']}), torch threads: {header['threads']}, "
             f"torch {header['torch']}"]
    if not rows:  # data pipeline only
        return "\n".join(lines) + "\n"
    lines += [f"step timings: batch {header['batch']}, patch {header['patch']}, widths {header['widths']}, "
              f"mask ratio {header['mask_ratio']}; ratios against the first row of each kind", "",
              "| what | precision | backend | median step s | samples/s | peak memory MiB | speed vs first "
              "| memory vs first |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['precision']} | {r['backend']} | {r['median_s']:.3f} | "
                     f"{r['samples_per_s']:.3f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['speedup']:.2f}x | "
                     f"{r['memory_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {multiprocessing.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: SpeedOptions) -> Path:
    """Time everything asked for, write speed.json and speed.md into ``args.output``; returns speed.md."""
    from nnunet_hyspark.errors import HySparKError
    from nnunet_hyspark.nnunet_compat import resolve_device
    from nnunet_hyspark.sparse import resolve_backend

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for b in args.backends:  # unknown / unsafe (spconv on CPU) backends fail here, in one line
        try:
            resolve_backend(b, device)
        except (ValueError, RuntimeError, ImportError) as e:
            raise HySparKError(f"--backends {b}: {e}") from None
    if "fp16" in args.precision and args.device != "cuda":
        raise HySparKError("--precision fp16 needs --device cuda", "use bf16 on the CPU")
    patch = tuple(args.patch) * 3 if len(args.patch) == 1 else tuple(args.patch)
    header = {"device": args.device, "threads": args.threads or torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
              "precision": list(args.precision), "batch": args.batch, "patch": list(patch),
              "widths": args.widths, "mask_ratio": args.mask_ratio, "torch": torch.__version__}
    rows = []
    timers = {"encoder": time_encoder, "pretrain": time_pretrain_step}
    baseline = f"{args.precision[0]} {args.backends[0]}"
    for what in [w for w in args.what if w in timers]:
        base = None
        for precision in args.precision:
            for backend in args.backends:
                r = timers[what](backend, batch=args.batch, patch=patch, widths=args.widths,
                                 mask_ratio=args.mask_ratio, steps=args.steps, warmup=args.warmup, device=args.device,
                                 dtype=precision, num_threads=args.threads)
                base = base or r
                rows.append({"what": what, "precision": precision, "backend": backend, "median_s": r["median_s"],
                             "samples_per_s": r["samples_per_s"], "peak_mem_bytes": r["peak_mem_bytes"],
                             "speedup": base["median_s"] / r["median_s"],
                             "memory_ratio": r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1),
                             "times_s": r["times_s"]})
                print(f"{what:8s} {precision:4s} {backend:10s} {r['median_s']:.3f} s/step  "
                      f"{r['samples_per_s']:.3f} samples/s  peak {r['peak_mem_bytes'] / 2**20:.0f} MiB  "
                      f"{rows[-1]['speedup']:.2f}x vs {baseline}", flush=True)
    result = {"header": header, "rows": rows}
    if "data" in args.what:
        result["data"] = _data_pipeline(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json_save(result, out / "speed.json")
    md = _markdown(header, rows)
    if "data" in result:
        d = result["data"]
        md += (f"\ndata pipeline: {d['crops_per_second']:.1f} crops/s at patch {list(d['patch_size'])} "
               f"({d['num_workers']} workers, {d['augmentation']})\n")
    with atomic_path(out / "speed.md") as tmp:
        Path(tmp).write_text(md)
    return out / "speed.md"


def _data_pipeline(args: SpeedOptions) -> dict:
    from nnunet_hyspark.errors import HySparKError
    from nnunet_hyspark.pretraining.data import PretrainDataConfig, measure_crops_per_second

    if args.dataset is None:
        raise HySparKError("--what data needs a preprocessed dataset", "pass -d ID")
    cfg = PretrainDataConfig([args.dataset], plans_identifier=args.plans, batch_size=args.batch)
    r = measure_crops_per_second(cfg, seconds=10.0)
    print(f"data     {r['crops_per_second']:.1f} crops/s at patch {r['patch_size']}")
    return r
