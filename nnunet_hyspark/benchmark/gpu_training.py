"""The GPU check's training stages: peak memory against the planner's estimate, and bf16 vs fp32 loss curves
(see :mod:`nnunet_hyspark.benchmark.gpu_check`; each stage is ``stage(opts, record, deadline) -> result``)."""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from nnunet_hyspark.benchmark.gpu_options import PLOT, GpuCheckOptions
from nnunet_hyspark.benchmark.gpu_stages import planned_batch

Record = Callable[..., None]
NUM_CLASSES = 2
GiB = float(2 ** 30)


def architectures(tiny: bool) -> dict[str, dict[str, Any]]:
    """Each method's fine-tuning architecture: the planner's ``base`` preset (``tiny``: small ones for the
    CPU smoke run; Hi-End-MAE with ViT patch 16 there, so that a 32^3 patch fits every method)."""
    from nnunet_hyspark.methods.hiend_mae.encoder import DEFAULT_VIT_PATCH, VIT_CONFIGS
    from nnunet_hyspark.methods.hiend_mae.network import DEFAULT_FEATURE_SIZE

    if tiny:
        return {"hyspark": {"widths": [8, 16, 16, 24, 24], "depths": [1] * 5, "expansions": [2] * 5,
                            "vit_depth": 1, "vit_heads": 2},
                "mim": {"widths": [8, 8, 16, 24], "conv_depths": [1, 1, 1], "vit_depth": 1, "vit_heads": 2,
                        "vit_mlp_ratio": 2.0, "fifth_stage": False, "feature_size": 8},
                "hiend_mae": {**VIT_CONFIGS["tiny"], "feature_size": 4, "vit_patch": 16}}
    return {"hyspark": {"widths": [32, 64, 128, 256, 384], "depths": [1, 1, 3, 3, 1], "expansions": [2, 4, 4, 4, 2],
                        "vit_depth": 3, "vit_heads": 12},
            "mim": {"widths": [48, 96, 192, 384], "conv_depths": [2, 2, 2], "vit_depth": 11, "vit_heads": 12,
                    "vit_mlp_ratio": 4.0, "fifth_stage": True, "fifth_width": 768, "feature_size": 48},
            "hiend_mae": {**VIT_CONFIGS["base"], "feature_size": DEFAULT_FEATURE_SIZE,
                          "vit_patch": DEFAULT_VIT_PATCH}}


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- memory
def _segmentation_loss() -> tuple[Callable, str]:
    """nnU-Net's Dice + CE (what fine-tuning trains with) when nnU-Net is installed; else the same terms
    written here (soft Dice over the foreground + cross-entropy), so the check runs on a bare image too."""
    try:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
        return loss, "nnU-Net DC_and_CE_loss"
    except ImportError:
        def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            t = target[:, 0].long()
            probs = logits.float().softmax(1)[:, 1:]
            onehot = F.one_hot(t, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
            inter, denom = (probs * onehot).sum((0, 2, 3, 4)), (probs + onehot).sum((0, 2, 3, 4))
            return F.cross_entropy(logits, t) + 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
        return dice_ce, "Dice + CE written in the check (nnU-Net not installed)"


def _deep_supervision_loss(outputs, target: torch.Tensor, loss: Callable) -> torch.Tensor:
    """nnU-Net's weighting: 1/2^k per scale, the lowest dropped, normalised."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    w = [1 / 2 ** k for k in range(len(outputs))]
    if len(w) > 1:
        w[-1] = 0.0
    total = sum(w)
    out = 0.0
    for wk, o in zip(w, outputs):
        if wk:
            t = target if o.shape[2:] == target.shape[2:] else F.interpolate(target, o.shape[2:], mode="nearest")
            out = out + wk / total * loss(o, t)
    return out


def _peak_of(train_step: Callable[[], None], device: str, steps: int) -> dict:
    """Peak memory over ``steps`` calls (the optimiser's state exists from the first step on; on the CPU,
    where nothing is measured, one step shows that the step runs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    if device != "cuda":
        return {"step_s": (time.perf_counter() - t0) / steps}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = (total - free) - torch.cuda.memory_reserved()  # CUDA context and libraries, outside the allocator
    peak_reserved = torch.cuda.max_memory_reserved()
    return {"step_s": (time.perf_counter() - t0) / steps, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "peak_reserved_gib": peak_reserved / GiB, "cuda_context_gib": max(context, 0) / GiB,
            "measured_total_gib": (peak_reserved + max(context, 0)) / GiB}


def _finetune_peak(method: str, arch: dict, patch: tuple, batch: int, device: str, precision: str) -> dict:
    """One fine-tuning step as nnU-Net runs it (autocast, deep supervision, Dice + CE, AdamW)."""
    from nnunet_hyspark.methods import get_method

    _free(device)
    torch.manual_seed(0)
    net = get_method(method).network.build({**arch, "patch_size": list(patch)}, 1, NUM_CLASSES).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    loss_fn, loss_name = _segmentation_loss()
    x = torch.randn(batch, 1, *patch, device=device)
    y = (torch.rand(batch, 1, *patch, device=device) > 0.7).float()

    def step() -> None:
        with _autocast(device, precision):
            loss = _deep_supervision_loss(net(x), y, loss_fn)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    r = _peak_of(step, device, steps=2 if device == "cuda" else 1)
    r.update(parameters_m=sum(p.numel() for p in net.parameters()) / 1e6, loss=loss_name)
    del net, opt, x, y
    _free(device)
    return r


def _pretrain_peak(method: str, arch: dict, patch: tuple, batch: int, device: str, precision: str) -> dict:
    """One pre-training step of the method's model (its loader's crop: ``crop_scale`` x the patch)."""
    from nnunet_hyspark.methods import ModelOptions, get_method

    _free(device)
    torch.manual_seed(0)
    spec = get_method(method)
    model = spec.build_model({**arch, "patch_size": list(patch)}, 1, ModelOptions(mask_ratio=0.75)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    crop = tuple(p * spec.crop_scale for p in patch)
    x = torch.randn(batch, 1, *crop, device=device)

    def step() -> None:
        with _autocast(device, precision):
            loss = model(x)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    r = _peak_of(step, device, steps=2 if device == "cuda" else 1)
    r["crop"] = list(crop)
    del model, opt, x
    _free(device)
    return r


def stage_memory(opts: GpuCheckOptions, record: Record, deadline: float) -> dict:
    """Per method: the planner's batch at the patch, its estimate, the measured fine-tuning peak and the
    correction factor (measured / estimated); then the pre-training model's peak at the same batch."""
    from nnunet_hyspark.methods import get_method

    device = opts.resolved_device()
    precision = "fp16" if device == "cuda" else "bf16"  # nnU-Net's autocast on CUDA is fp16 (+ GradScaler)
    patch = (opts.patch,) * 3
    archs = architectures(opts.smoke)
    rows: dict[str, dict] = {}
    head = {"device": device, "precision": precision, "patch": list(patch), "target_gb": opts.gpu_memory_target_gb,
            "batch_source": "given" if opts.batch else f"the planner's for a {opts.gpu_memory_target_gb:g} GB target"}
    record(**head, rows=rows)
    for phase in ("finetune", "pretrain"):
        for method in opts.methods:
            row = rows.setdefault(method, {})
            if time.time() > deadline - 10:
                row[f"{phase}_error"] = "skipped: the stage's time was up"
                continue
            try:
                if phase == "finetune":
                    batch = opts.batch or planned_batch(method, patch, opts.gpu_memory_target_gb, archs[method])
                    est = get_method(method).estimate_memory(patch, batch, 1, NUM_CLASSES, **archs[method])
                    row.update(batch=batch, estimate_gib=est.total_gb, estimate=str(est))
                    row["finetune"] = _finetune_peak(method, archs[method], patch, batch, device, precision)
                    measured = row["finetune"].get("measured_total_gib")
                    if measured:
                        row["correction_factor"] = measured / est.total_gb
                        row["factor_allocated"] = row["finetune"]["peak_allocated_gib"] / est.total_gb
                elif "batch" in row:
                    row["pretrain"] = _pretrain_peak(method, archs[method], patch, row["batch"], device,
                                                     "bf16" if device == "cuda" else "fp32")
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: a finding; the other methods still run
                row[f"{phase}_error"] = f"{type(e).__name__}: {e}"[:500]
                _free(device)
            print(f"memory {phase} {method}: {row.get(phase, row.get(f'{phase}_error'))}", flush=True)
            record(rows=rows)
    return {**head, "rows": rows}


# ----------------------------------------------------------------------------------------------- loss curves
def synthetic_volumes(n: int, patch: tuple, seed: int) -> torch.Tensor:
    """``n`` CT phantoms (the demo's) of shape ``patch``, each normalised to zero mean and unit variance."""
    from nnunet_hyspark.synthetic import make_case

    vols = [torch.from_numpy(make_case(seed, i, shape=patch)[0]).float() for i in range(n)]
    return torch.stack([(v - v.mean()) / v.std().clamp_min(1e-6) for v in vols])[:, None]


def _pretrainer(arch: dict, patch: tuple, precision: str, opts: GpuCheckOptions, device: str, out: str):
    """The real pre-training loop's trainer (schedules, clipping, autocast) for HySparK, nothing written."""
    from nnunet_hyspark.methods import ModelOptions, get_method
    from nnunet_hyspark.pretraining.loop import LoopConfig, Pretrainer, recipe_defaults
    from nnunet_hyspark.sparse import resolve_backend

    spec = get_method("hyspark")
    r = spec.resolved_recipe(recipe_defaults())
    torch.manual_seed(opts.seed)  # the same initial weights for every precision
    model = spec.build_model({**arch, "patch_size": list(patch)}, 1, ModelOptions(
        mask_ratio=r["mask_ratio"], sparse_backend=resolve_backend(opts.loss_backend, device)))
    cfg = LoopConfig(epochs=1, iterations_per_epoch=opts.loss_steps, lr=r["lr"], betas=tuple(r["betas"]),
                     weight_decay_start=r["weight_decay"][0], weight_decay_end=r["weight_decay"][1],
                     warmup_fraction=r["warmup_fraction"], clip_grad=r["clip_grad"], precision=precision,
                     seed=opts.seed)
    return Pretrainer(model, spec, cfg, iter(()), None, out, {}, torch.device(device), progress=False, writes=False)


def _curve_summary(losses: dict[str, list[float]], times: dict[str, list[float]]) -> dict:
    n = min(len(v) for v in losses.values())
    tail = max(1, min(20, n // 5 or 1))
    out: dict[str, Any] = {"steps_done": n, "tail_steps": tail}
    for p, v in losses.items():
        out[p] = {"first": v[0] if v else None, "tail_mean": statistics.fmean(v[n - tail:n]) if n else None,
                  "median_step_s": statistics.median(times[p][1:] or times[p]) if times[p] else None}
    if n and "fp32" in losses and "bf16" in losses:
        a, b = losses["fp32"][:n], losses["bf16"][:n]
        out["tail_relative_difference"] = abs(out["bf16"]["tail_mean"] - out["fp32"]["tail_mean"]) / \
            max(abs(out["fp32"]["tail_mean"]), 1e-12)
        out["median_step_relative_difference"] = statistics.median(abs(y - x) / max(abs(x), 1e-12)
                                                                   for x, y in zip(a, b))
    return out


def _plot(losses: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for p, v in losses.items():
        ax.plot(range(1, len(v) + 1), v, label=p, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("masked reconstruction loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage_loss(opts: GpuCheckOptions, record: Record, deadline: float) -> dict:
    """HySparK pre-training, fp32 and bf16 stepped in turn on the same batches with the same random state
    (masks), from the same initial weights; losses and step times of both."""
    from nnunet_hyspark.errors import HySparKError

    device = opts.resolved_device()
    patch = (opts.loss_patch,) * 3
    arch = architectures(opts.smoke)["hyspark"]
    data = synthetic_volumes(max(8, 2 * opts.loss_batch), patch, opts.seed).to(device)
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    errors: dict[str, str] = {}
    head = {"device": device, "patch": list(patch), "batch": opts.loss_batch, "backend": opts.loss_backend,
            "steps": opts.loss_steps, "widths": arch["widths"]}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: _pretrainer(arch, patch, p, opts, device, tmp) for p in losses}
        for i in range(opts.loss_steps):
            if time.time() > deadline - 10:
                errors["stopped"] = f"the stage's time was up after {i} steps"
                break
            idx = [(i * opts.loss_batch + j) % len(data) for j in range(opts.loss_batch)]
            for p, t in trainers.items():
                if p in errors:
                    continue
                torch.manual_seed(opts.seed * 1_000_003 + i)  # the same masks (and drop-path) for both
                t0 = time.perf_counter()
                try:
                    losses[p].append(t.train_step(data[idx])[1])
                except HySparKError as e:  # a non-finite loss: a finding
                    errors[p] = str(e)
                times[p].append(time.perf_counter() - t0)
            if (i + 1) % 25 == 0:
                print(f"loss step {i + 1}: " + ", ".join(f"{p} {v[-1]:.4f}" for p, v in losses.items() if v),
                      flush=True)
                record(**head, losses=losses, partial=_curve_summary(losses, times))
    result = {**head, "losses": losses, "step_times_s": times, "summary": _curve_summary(losses, times),
              "errors": errors}
    plot = Path(opts.output) / PLOT
    _plot(losses, plot, f"HySparK pre-training, {device}, patch {patch[0]}^3, batch {opts.loss_batch}, "
                        f"{opts.loss_backend}: bf16 vs fp32 (same seed)")
    result["plot"] = PLOT
    return result
