"""Speed and memory of the masked encoder (forward + backward + AdamW step) per CNN backend.

    python -m nnunet_hyspark.sparse.benchmark --backends dense blocks --batch 2 --patch 96 --threads 2

``time_encoder`` is the library function (the ``hyspark_benchmark speed`` command builds on it).
On CPU every measurement runs in a fresh spawned process, so that its peak resident memory
(``ru_maxrss``) belongs to that backend alone; on CUDA ``torch.cuda.max_memory_allocated`` is used.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import time
from contextlib import nullcontext
from typing import Sequence

import torch

from nnunet_hyspark.allocator import DEFAULT_MALLOC, apply_malloc_mode

WIDTH_PRESETS = {
    "base": (32, 64, 128, 256, 384),  # the HySparK defaults
    "tiny": (8, 16, 16, 24, 24),  # for smoke tests
}
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_widths(widths: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(widths, str):
        if widths in WIDTH_PRESETS:
            return WIDTH_PRESETS[widths]
        return tuple(int(w) for w in widths.split(","))
    return tuple(int(w) for w in widths)


def as_patch3(patch: int | Sequence[int]) -> tuple[int, int, int]:
    return (int(patch),) * 3 if isinstance(patch, int) else tuple(int(p) for p in patch)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _time_in_process(backend: str, batch: int, patch, widths, mask_ratio: float, steps: int, warmup: int,
                     device: str, dtype: str, num_threads: int | None, seed: int,
                     backend_options: dict | None, malloc: str = DEFAULT_MALLOC) -> dict:
    from nnunet_hyspark.masking import random_cell_mask
    from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
    from nnunet_hyspark.sparse import get_backend

    apply_malloc_mode(malloc)  # a spawned process starts with the C library's defaults
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    patch = as_patch3(patch)
    grid = tuple(p // 16 for p in patch)
    encoder = HybridEncoder(widths=parse_widths(widths)).to(dev)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *patch, device=dev)
    masks = [random_cell_mask(batch, grid, mask_ratio, generator=torch.Generator().manual_seed(seed + i), device=dev)
             for i in range(warmup + steps)]
    cnn = get_backend(backend, **(backend_options or {}))
    autocast_dtype = AUTOCAST_DTYPES[dtype]

    def step(mask: torch.Tensor) -> None:
        ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with ctx:
            feats = encoder(x, mask, backend=cnn)
            loss = sum(f.float().square().mean() for f in feats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rss_before = current_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mem_before = torch.cuda.memory_allocated(dev)
    times, cpu_times = [], []
    for i, mask in enumerate(masks):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(mask)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - mem_before
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    median = statistics.median(times)
    return {"backend": backend, "median_s": median, "samples_per_s": batch / median, "peak_mem_bytes": int(peak),
            "median_cpu_s": statistics.median(cpu_times), "times_s": times, "cpu_times_s": cpu_times, "batch": batch, "patch": patch, "device": str(dev), "dtype": dtype,
            "threads": torch.get_num_threads()}


def time_encoder(backend: str, batch: int = 2, patch: int | Sequence[int] = 96,
                 widths: str | Sequence[int] = "base", mask_ratio: float = 0.75, steps: int = 5,
                 warmup: int = 2, device: str = "cpu", dtype: str = "fp32", num_threads: int | None = None,
                 seed: int = 0, backend_options: dict | None = None, isolate: bool | None = None,
                 malloc: str = DEFAULT_MALLOC) -> dict:
    """Median wall time of one training step of the masked encoder alone (forward, backward, AdamW).

    ``dtype``: 'fp32', or 'bf16' / 'fp16' autocast. ``backend_options`` configure the backend
    (e.g. ``{"dense_from_scale": 4}`` for ``blocks``). ``isolate`` (default: on CPU) runs the
    measurement in a fresh process so that ``peak_mem_bytes`` (peak RSS growth during the steps)
    is this run's alone; on CUDA the peak is ``max_memory_allocated`` growth.
    Returns a dict with ``median_s`` (wall), ``samples_per_s``, ``peak_mem_bytes``, ``median_cpu_s``
    (process CPU time of a step: all threads, less sensitive than wall time to other processes
    on a shared machine) and the raw ``times_s`` / ``cpu_times_s``.
    """
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(AUTOCAST_DTYPES)}, got {dtype!r}")
    args = (backend, batch, patch, widths, mask_ratio, steps, warmup, device, dtype, num_threads, seed,
            backend_options, malloc)
    if isolate is None:
        isolate = torch.device(device).type == "cpu"
    if not isolate:
        return _time_in_process(*args)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_time_in_process, *args).result()


def parse_backend_spec(spec: str) -> tuple[str, dict | None]:
    """'blocks:dense_from_scale=4,channels_last=1' -> ('blocks', {'dense_from_scale': 4, 'channels_last': 1})."""
    name, _, option_text = spec.partition(":")
    options = {}
    for item in filter(None, option_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"backend option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = int(value)
    return name, options or None


def format_table(results: list[dict]) -> str:
    base, base_cpu = results[0]["median_s"], results[0]["median_cpu_s"]
    width = max(24, *(len(r["label"]) for r in results))
    lines = [f"{'backend':<{width}} {'median s':>9} {'samples/s':>10} {'peak MiB':>9} {'speed-up':>9} "
             f"{'CPU s':>8} {'CPU speed-up':>12}"]
    for r in results:
        lines.append(f"{r['label']:<{width}} {r['median_s']:>9.3f} {r['samples_per_s']:>10.3f} "
                     f"{r['peak_mem_bytes'] / 2 ** 20:>9.0f} {base / r['median_s']:>8.2f}x "
                     f"{r['median_cpu_s']:>8.2f} {base_cpu / r['median_cpu_s']:>11.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["dense", "blocks"],
                        help="backend names, optionally with options: 'blocks:dense_from_scale=4,channels_last=1'")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs="+", default=[96])
    parser.add_argument("--widths", default="base", help="'base', 'tiny' or five comma-separated widths")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the backend list, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(AUTOCAST_DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run")
    args = parser.parse_args(argv)
    patch = args.patch[0] if len(args.patch) == 1 else args.patch
    results = {spec: None for spec in args.backends}
    for round_ in range(args.rounds):  # interleaved rounds: drift of a shared machine hits every backend
        for spec in args.backends:
            name, options = parse_backend_spec(spec)
            r = time_encoder(name, args.batch, patch, args.widths, args.mask_ratio, args.steps, args.warmup,
                             args.device, args.dtype, args.threads, backend_options=options)
            print(f"round {round_ + 1} {spec}: " + " ".join(f"{t:.3f}" for t in r["times_s"]), flush=True)
            if results[spec] is None:
                results[spec] = dict(r, label=spec)
            else:
                results[spec]["times_s"] += r["times_s"]
                results[spec]["cpu_times_s"] += r["cpu_times_s"]
                results[spec]["peak_mem_bytes"] = max(results[spec]["peak_mem_bytes"], r["peak_mem_bytes"])
    results = list(results.values())
    for r in results:
        r["median_s"] = statistics.median(r["times_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_times_s"])
        r["samples_per_s"] = args.batch / r["median_s"]
    print(f"batch {args.batch}, patch {as_patch3(patch)}, widths {args.widths}, mask {args.mask_ratio}, "
          f"{args.dtype}, {args.device}, threads {results[0]['threads']}")
    print(format_table(results))


if __name__ == "__main__":
    main()
