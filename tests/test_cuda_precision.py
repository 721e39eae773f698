"""On a CUDA machine (skipped elsewhere; ``scripts/gpu_check.sh`` runs them): the pre-training loop's fp16
path with its gradient scaler, bf16 against fp32, and the sparse backends inside the whole HySparK model.

The CPU counterparts are in test_hyspark_pretrain.py (bf16 curve), test_pretrain_loop.py (fp16 refused on
the CPU) and test_sparse_backends.py (the encoder's maps and gradients per backend).
"""
from __future__ import annotations

import pytest
import torch

from nnunet_hyspark.methods import METHODS
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.methods.hyspark.model import HySparK
from nnunet_hyspark.pretraining.loop import LoopConfig, Pretrainer
from nnunet_hyspark.sparse import available_backends, get_backend

TINY = dict(widths=(8, 16, 16, 24, 24), depths=(1, 1, 1, 1, 1), expansions=(2, 2, 2, 2, 2), vit_depth=1,
            vit_heads=2)
STEPS = 30


def smooth_volumes(n: int, device: str, shape=(32, 32, 32), seed: int = 0) -> torch.Tensor:
    """Trilinear ramps between random values on the 1/16 grid: predictable from neighbours, so masked
    modelling learns them within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(max(2, s // 16) for s in shape), generator=g)
    return torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=True).to(device)


def trainer(precision: str, device: str, tmp_path, backend: str | None = None) -> Pretrainer:
    torch.manual_seed(0)
    model = HySparK(HybridEncoder(1, **TINY), decoder_width=32,
                    sparse_backend=get_backend(backend) if backend else None)
    cfg = LoopConfig(epochs=1, iterations_per_epoch=STEPS, lr=3e-3, warmup_fraction=0.0, clip_grad=5.0,
                     precision=precision)
    return Pretrainer(model, METHODS["hyspark"], cfg, iter(()), None, tmp_path, {}, torch.device(device),
                      progress=False, writes=False)


def loss_curve(t: Pretrainer, x: torch.Tensor, steps: int = STEPS) -> list[float]:
    """One loop step per iteration, the random state reset per step: every precision sees the same masks."""
    losses = []
    for i in range(steps):
        torch.manual_seed(1000 + i)
        losses.append(t.train_step(x)[1])
    return losses


def learns(losses: list[float]) -> bool:
    """The loop's schedules (cosine decay, weight decay) make this a slow learner: on the CPU (bf16 and
    fp32) the last five losses averaged 0.937 x the first five, and bf16 stayed within 0.02 % of fp32."""
    return sum(losses[-5:]) / 5 < 0.97 * sum(losses[:5]) / 5


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_fp16_with_the_gradient_scaler_trains_on_cuda(tmp_path):
    t = trainer("fp16", "cuda", tmp_path)
    assert t.scaler is not None
    losses = loss_curve(t, smooth_volumes(2, "cuda"))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert learns(losses), losses
    assert 0 < t.scaler.get_scale() < float("inf")
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # autocast, not an fp16 model
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


@cuda
def test_bf16_loss_curve_follows_fp32_on_cuda(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = smooth_volumes(2, "cuda")
    fp32 = loss_curve(trainer("fp32", "cuda", tmp_path / "a"), x)
    bf16 = loss_curve(trainer("bf16", "cuda", tmp_path / "b"), x)
    assert fp32[0] == pytest.approx(bf16[0], rel=0.02)  # same weights and masks: only rounding differs
    assert learns(fp32) and learns(bf16), (fp32, bf16)
    assert sum(bf16[-10:]) == pytest.approx(sum(fp32[-10:]), rel=0.05), (fp32, bf16)


@cuda
@pytest.mark.parametrize("backend", [b for b in available_backends("cuda") if b != "dense"] or ["blocks"])
def test_sparse_backend_model_matches_dense_on_cuda(backend):
    """The whole pre-training model (encoder, densify, decoder, loss): loss and every gradient as dense."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = smooth_volumes(3, "cuda", shape=(64, 32, 32))
    results = []
    for name in ("dense", backend):
        torch.manual_seed(0)
        model = HySparK(HybridEncoder(1, **TINY), decoder_width=32, sparse_backend=get_backend(name)).cuda()
        mask = model.random_mask(x, torch.Generator().manual_seed(3))
        loss = model(x, mask)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_d, grads_d), (loss_s, grads_s) = results
    assert torch.allclose(loss_s, loss_d, rtol=1e-4, atol=1e-6)
    assert grads_d.keys() == grads_s.keys()
    for n in grads_d:
        assert torch.allclose(grads_s[n], grads_d[n], rtol=1e-3, atol=1e-5), n
