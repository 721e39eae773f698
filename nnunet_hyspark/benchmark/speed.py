"""``hyspark_benchmark speed``: time the sparse backends, in one run on one machine.

For each backend, precision and batch size it times the masked encoder alone and the full HySparK
pre-training step (forward, backward, AdamW), and optionally the data pipeline alone (crops per second
from preprocessed data). Reports median step time, samples per second, peak memory, the FLOPs of a full
step and the throughput ratio against the first row of each kind, with the device, its CPU model and bf16 features (AMX,
AVX-512 bf16) and the thread count, as JSON and a markdown table, plus the headline: the best step
against the ``reference`` (the published formulation: dense CNN then mask, plain decoder) in fp32 at
batch 1. Figures on a shared machine are noisy: compare the ratios of one run, not numbers across runs.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nnunet_hyspark.allocator import DEFAULT_MALLOC, apply_malloc_mode
from nnunet_hyspark.hardware import auto_precision, cpu_info
from nnunet_hyspark.io import atomic_json_save, atomic_path
from nnunet_hyspark.sparse.benchmark import (AUTOCAST_DTYPES, as_patch3, current_rss_bytes, parse_widths,
                                             time_encoder)


REFERENCE = "reference"  # a backend name here only: the published formulation of the whole step


def _time_pretrain_step(backend: str, batch: int, patch, widths, mask_ratio: float, steps: int, warmup: int,
                        device: str, dtype: str, num_threads: int | None, seed: int,
                        compile_decoder: bool = False, malloc: str = DEFAULT_MALLOC) -> dict:
    """Median time of a full HySparK step (encoder + densify + light decoder + loss + AdamW); ``backend``
    ``reference`` is the published formulation (dense backend, ``HySparK(reference=True)``). ``gflop``: the
    convolutions and matrix products of one step, forward and backward (torch's FLOP counter, on the first
    warm-up step), which bound what any kernel speed-up can give."""
    from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
    from nnunet_hyspark.methods.hyspark.model import HySparK

    apply_malloc_mode(malloc)  # a spawned process starts with the C library's defaults
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    patch = as_patch3(patch)
    reference = backend == REFERENCE
    model = HySparK(HybridEncoder(1, widths=parse_widths(widths)), mask_ratio=mask_ratio,
                    sparse_backend="dense" if reference else backend, reference=reference).to(dev)
    if compile_decoder:
        model.decoder.compile()  # the decoder only: static shapes (the sparse encoder's change with the mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 1, *patch, device=dev)
    gen = torch.Generator().manual_seed(seed)
    masks = [model.random_mask(x, gen) for _ in range(warmup + steps)]
    autocast = AUTOCAST_DTYPES[dtype]
    rss_before = current_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mem_before = torch.cuda.memory_allocated(dev)
    times, cpu_times = [], []
    if warmup == 0:  # the FLOP count below needs an untimed step
        masks.insert(0, masks[0])
        warmup = 1
    for i, mask in enumerate(masks):
        start, cpu_start = time.perf_counter(), time.process_time()
        with FlopCounterMode(display=False) if i == 0 else nullcontext() as counter:
            with torch.autocast(dev.type, dtype=autocast) if autocast is not None else nullcontext():
                loss = model(x, mask)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if i == 0:
            gflop = counter.get_total_flops() / 1e9
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - mem_before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    median = statistics.median(times)
    return {"backend": backend, "median_s": median, "samples_per_s": batch / median, "peak_mem_bytes": int(peak),
            "times_s": times, "threads": torch.get_num_threads(), "device": str(dev), "dtype": dtype,
            "median_cpu_s": statistics.median(cpu_times), "gflop": gflop}


def time_pretrain_step(backend: str, batch: int = 2, patch=96, widths="base", mask_ratio: float = 0.75,
                       steps: int = 3, warmup: int = 1, device: str = "cpu", dtype: str = "fp32",
                       num_threads: int | None = None, seed: int = 0, compile_decoder: bool = False,
                       malloc: str = DEFAULT_MALLOC) -> dict:
    """Like :func:`nnunet_hyspark.sparse.benchmark.time_encoder`, for the whole pre-training step; on the CPU
    in a fresh process so that the peak resident memory is this measurement's alone."""
    args = (backend, batch, patch, widths, mask_ratio, steps, warmup, device, dtype, num_threads, seed,
            compile_decoder, malloc)
    if torch.device(device).type != "cpu":
        return _time_pretrain_step(*args)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_time_pretrain_step, *args).result()


@dataclass(frozen=True)
class SpeedOptions:
    """What ``hyspark_benchmark speed`` times (the field names are its option names)."""

    backends: tuple[str, ...] = (REFERENCE, "dense", "blocks")  # the first is the baseline
    what: tuple[str, ...] = ("encoder", "pretrain")  # and/or "finetune", "data" (needs dataset)
    batch: tuple[int, ...] | int = (1, 2, 4)  # every backend at each; ratios are of samples per second
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
    compile: bool = False  # torch.compile the decoder (inductor) in the pretrain rows
    malloc: str = DEFAULT_MALLOC  # every row, this process and the timing processes (nnunet_hyspark.allocator)

    @property
    def batches(self) -> tuple[int, ...]:
        return (self.batch,) if isinstance(self.batch, int) else tuple(self.batch)


def _auto_line(header: dict) -> str:
    auto = header["precision_auto"]
    return f"hyspark_pretrain --precision auto here: {auto['choice']} ({auto['why']})"


def _markdown(header: dict, rows: list[dict], headline: list[str]) -> str:
    lines = ["# hyspark_benchmark speed", "",
             f"device: {header['device']} ({header['device_name']}), torch threads: {header['threads']}, "
             f"torch {header['torch']}, --malloc {header['malloc']} (every row)", "", _auto_line(header)]
    if not rows:  # data pipeline only
        return "\n".join(lines) + "\n"
    lines += [f"step timings: patch {header['patch']}, widths {header['widths']}, mask ratio {header['mask_ratio']}; "
              "speed = samples/s against the first row of each kind (reference = the published formulation); "
              "CPU s/step = process CPU time of all threads, steadier than wall time on a shared machine; "
              "GFLOP/step = convolutions and matrix products, forward and backward (torch's FLOP counter): the FLOP "
              "ratio is what the speed-up would be at equal FLOP rates", "",
              *headline, "",
              "| what | precision | backend | batch | median step s | samples/s | peak memory MiB | speed vs first "
              "| memory vs first | CPU s/step | GFLOP/step |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gflop = f"{r['gflop']:.0f}" if r.get("gflop") is not None else "-"  # encoder rows: not counted
        lines.append(f"| {r['what']} | {r['precision']} | {r['backend']} | {r['batch']} | {r['median_s']:.3f} | "
                     f"{r['samples_per_s']:.3f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['speedup']:.2f}x | "
                     f"{r['memory_ratio']:.2f} | {r['median_cpu_s']:.2f} | {gflop} |")
    return "\n".join(lines) + "\n"


def _find(steps: list[dict], backend: str, precision: str, batch: int) -> dict | None:
    return next((r for r in steps if (r["backend"], r["precision"], r["batch"]) == (backend, precision, batch)), None)


def _best_step_line(best: dict, base: dict) -> str:
    line = (f"best step vs {base['backend']} {base['precision']} at batch {base['batch']}: "
            f"{base['median_s'] / best['median_s']:.2f}x "
            f"({best['backend']} {best['precision']}, {best['median_s']:.3f} s vs {base['median_s']:.3f} s)")
    if best.get("gflop") and base.get("gflop"):  # what the ratio would be at equal FLOP rates
        line += f"; FLOP ratio {base['gflop'] / best['gflop']:.2f}x"
    return line


def headline(rows: list[dict]) -> list[str]:
    """The ratios to push: the best pre-training step at batch 1, and the best throughput at any batch,
    against the reference fp32 step at batch 1 (else the first pretrain row); and the best step against
    our own ``dense`` fp32 step at batch 1 too when both were timed (the same formulation with our decoder)."""
    steps = [r for r in rows if r["what"] == "pretrain"]
    if not steps:
        return []
    base = _find(steps, REFERENCE, "fp32", 1) or steps[0]
    name = f"{base['backend']} {base['precision']} at batch {base['batch']}"
    best = min((r for r in steps if r["batch"] == base["batch"]), key=lambda r: r["median_s"])
    lines = [_best_step_line(best, base)]
    dense = _find(steps, "dense", "fp32", 1)
    if dense is not None and dense is not base and base["batch"] == 1:
        lines.append(_best_step_line(best, dense))
    top = max(steps, key=lambda r: r["samples_per_s"])
    lines.append(f"best throughput vs {name}: {top['samples_per_s'] / base['samples_per_s']:.2f}x "
                 f"({top['backend']} {top['precision']} at batch {top['batch']}, {top['samples_per_s']:.3f} samples/s)")
    return lines


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}; host CPU {cpu_info().describe()}"
    return cpu_info().describe()


def _check(args: SpeedOptions) -> None:
    """Unknown / unsafe (spconv on CPU) backends, fp16 on the CPU and bad batch sizes fail here, in one line."""
    from nnunet_hyspark.errors import HySparKError
    from nnunet_hyspark.sparse import resolve_backend

    for b in args.backends:
        try:
            resolve_backend("dense" if b == REFERENCE else b, args.device)
        except (ValueError, RuntimeError, ImportError) as e:
            raise HySparKError(f"--backends {b}: {e}", f"choose from {REFERENCE}, dense, blocks, spconv") from None
    if "fp16" in args.precision and args.device != "cuda":
        raise HySparKError("--precision fp16 needs --device cuda", "use bf16 on the CPU")
    if not args.batches or min(args.batches) < 1:
        raise HySparKError(f"--batch {' '.join(map(str, args.batches))}: batch sizes must be >= 1", "e.g. --batch 1 2 4")
    if "finetune" in args.what and (args.widths not in ("base", "tiny") or args.device != "cpu"):
        raise HySparKError(f"--what finetune times base or tiny widths on the CPU (got --widths {args.widths}, "
                           f"--device {args.device})", "use --widths base or tiny and --device cpu for that row")


def _time_rows(args: SpeedOptions, patch: tuple[int, ...]) -> list[dict]:
    rows = []
    for what in [w for w in args.what if w in ("encoder", "pretrain")]:
        base = None
        for precision in args.precision:
            for batch in args.batches:
                for backend in args.backends:
                    common = dict(batch=batch, patch=patch, widths=args.widths, mask_ratio=args.mask_ratio,
                                  steps=args.steps, warmup=args.warmup, device=args.device, dtype=precision,
                                  num_threads=args.threads, malloc=args.malloc)
                    if what == "encoder":  # the encoder of the reference is the dense backend's
                        r = time_encoder("dense" if backend == REFERENCE else backend, **common)
                    else:
                        r = time_pretrain_step(backend, compile_decoder=args.compile, **common)
                    base = base or r
                    rows.append({"what": what, "precision": precision, "backend": backend, "batch": batch,
                                 "median_s": r["median_s"], "samples_per_s": r["samples_per_s"],
                                 "median_cpu_s": r["median_cpu_s"],
                                 "peak_mem_bytes": r["peak_mem_bytes"],
                                 "speedup": r["samples_per_s"] / base["samples_per_s"],
                                 "memory_ratio": r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1),
                                 "times_s": r["times_s"], "gflop": r.get("gflop")})
                    print(f"{what:8s} {precision:4s} {backend:10s} batch {batch} {r['median_s']:.3f} s/step  "
                          f"{r['samples_per_s']:.3f} samples/s  peak {r['peak_mem_bytes'] / 2**20:.0f} MiB  "
                          f"{rows[-1]['speedup']:.2f}x vs the first", flush=True)
    return rows


def run(args: SpeedOptions) -> Path:
    """Time everything asked for, write speed.json and speed.md into ``args.output``; returns speed.md."""
    from nnunet_hyspark.nnunet_compat import resolve_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    resolve_device(args.device)
    malloc_note = apply_malloc_mode(args.malloc)  # this process: the fine-tuning rows
    _check(args)
    patch = tuple(args.patch) * 3 if len(args.patch) == 1 else tuple(args.patch)
    cpu = cpu_info()
    # what hyspark_pretrain --precision auto would run here (a short timing on AVX-512 bf16 CPUs without AMX),
    # taken before the rows so that it sees the same quiet machine; the fp32 / bf16 rows are the full evidence
    auto = auto_precision(torch.device(args.device).type, cpu)
    header = {"device": args.device, "threads": args.threads or torch.get_num_threads(),
              "device_name": _device_name(args.device), "cpu": cpu.model, "cpu_amx_bf16": cpu.amx_bf16,
              "cpu_avx512_bf16": cpu.avx512_bf16, "onednn_isa_cap": cpu.isa_cap,
              "precision": list(args.precision), "batch": list(args.batches),
              "patch": list(patch), "widths": args.widths, "mask_ratio": args.mask_ratio, "torch": torch.__version__,
              "compile": args.compile, "malloc": args.malloc, "precision_auto": {"choice": auto[0], "why": auto[1]}}
    print(f"device: {args.device} ({header['device_name']}); {malloc_note}", flush=True)
    print(_auto_line(header), flush=True)
    rows = _time_rows(args, patch)
    result = {"header": header, "rows": rows, "headline": headline(rows)}
    if "finetune" in args.what:
        result["finetune"] = _finetune_rows(args, patch)
    if "data" in args.what:
        result["data"] = _data_pipeline(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json_save(result, out / "speed.json")
    md = _markdown(header, rows, result["headline"])
    if "finetune" in result:
        from nnunet_hyspark.benchmark.speed_finetune import finetune_markdown

        md += "\n" + finetune_markdown(result["finetune"])
    if "data" in result:
        d = result["data"]
        md += (f"\ndata pipeline: {d['crops_per_second']:.1f} crops/s at patch {list(d['patch_size'])} "
               f"({d['num_workers']} workers, {d['augmentation']})\n")
    with atomic_path(out / "speed.md") as tmp:
        Path(tmp).write_text(md)
    return out / "speed.md"


def _finetune_rows(args: SpeedOptions, patch: tuple[int, ...]) -> list[dict]:
    """One nnU-Net training step of HySparKUNet vs nnU-Net's own network planned for the same patch (fp32, the
    first batch size): what the hybrid network costs in every fine-tuning epoch and prediction."""
    from nnunet_hyspark.benchmark.speed_finetune import FinetuneSpeedOptions, finetune_rows

    options = FinetuneSpeedOptions(patch=patch, batch=args.batches[0], widths=args.widths, steps=args.steps,
                                   warmup=args.warmup, threads=args.threads)
    rows = finetune_rows(options)
    for r in rows:
        print(f"finetune {r['network']:14s} batch {r['batch']} {r['median_s']:.3f} s/step  "
              f"{r['params'] / 1e6:.1f} M params  {r['ratio_vs_nnunet']:.2f}x nnU-Net's", flush=True)
    return rows


def _data_pipeline(args: SpeedOptions) -> dict:
    from nnunet_hyspark.errors import HySparKError
    from nnunet_hyspark.pretraining.data import PretrainDataConfig, measure_crops_per_second

    if args.dataset is None:
        raise HySparKError("--what data needs a preprocessed dataset", "pass -d ID")
    cfg = PretrainDataConfig([args.dataset], plans_identifier=args.plans, batch_size=args.batches[0])
    r = measure_crops_per_second(cfg, seconds=10.0)
    print(f"data     {r['crops_per_second']:.1f} crops/s at patch {r['patch_size']}")
    return r
