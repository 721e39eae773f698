"""HySparK pre-training semantics: masks, submanifold masking, kept-token ViT, loss, optimisation."""
import pytest
import torch

from conftest import loss_before_and_after_training, train_on_masks
from nnunet_hyspark.masking import kept_token_indices, masks_per_scale, random_cell_mask
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.mae import normalised_targets, patchify, unpatchify
from nnunet_hyspark.methods.hyspark.model import HySparK, masked_patch_loss

TINY = dict(widths=(8, 16, 16, 24, 24), depths=(1, 2, 1, 1, 1), expansions=(2, 2, 2, 2, 2), vit_depth=1,
            vit_heads=2)


def tiny_model(**kw) -> HySparK:
    torch.manual_seed(0)
    return HySparK(HybridEncoder(1, **TINY), decoder_width=32, **kw)


def smooth_volumes(n: int, shape=(32, 32, 32), seed: int = 0) -> torch.Tensor:
    """Trilinear ramps between random values on the 1/16 grid: each patch's normalised content is
    predictable from its neighbours, so masked modelling can learn it in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(max(2, s // 16) for s in shape), generator=g)
    return torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=True)


def test_mask_keeps_the_same_count_per_sample_and_differs_between_samples():
    m = random_cell_mask(3, (2, 3, 4), 0.75, torch.Generator().manual_seed(0))
    assert m.shape == (3, 2, 3, 4)
    assert m.flatten(1).sum(1).tolist() == [6, 6, 6]  # round(24 * 0.25)
    assert not torch.equal(m[0], m[1])
    idx = kept_token_indices(m)
    assert idx.shape == (3, 6) and bool((idx.diff(dim=1) > 0).all())  # original order
    up = masks_per_scale(m)
    assert [t.shape[2:] for t in up] == [(32, 48, 64), (16, 24, 32), (8, 12, 16), (4, 6, 8), (2, 3, 4)]


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 16, 48)
    p = patchify(x)
    assert p.shape == (2, 2 * 1 * 3, 3 * 16**3)
    assert torch.equal(unpatchify(p, 3, (2, 1, 3)), x)


def test_loss_near_one_at_initialisation():
    model = tiny_model()
    with torch.no_grad():
        loss = model(torch.randn(2, 1, 32, 32, 48))["loss"].item()
    assert 0.9 < loss < 1.1


def test_only_masked_patches_contribute_to_the_loss():
    x = torch.randn(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 1, 1, 1] = True
    target, _, _ = normalised_targets(x)
    pred = unpatchify(target.clone(), 1, (2, 2, 2))  # perfect everywhere ...
    assert masked_patch_loss(pred, x, mask).item() < 1e-8
    p = patchify(pred)
    p[0, 0] += 5.0  # ... then ruin a kept patch: no effect
    assert masked_patch_loss(unpatchify(p, 1, (2, 2, 2)), x, mask).item() < 1e-8
    p[0, 1] += 1.0  # ... ruin a masked patch: 1/6 of the masked patches have error 1
    assert abs(masked_patch_loss(unpatchify(p, 1, (2, 2, 2)), x, mask).item() - 1 / 6) < 1e-5


def test_submanifold_masking_kept_features_ignore_masked_input():
    enc = HybridEncoder(1, **TINY)
    x = torch.randn(3, 1, 32, 48, 32)
    mask = random_cell_mask(3, (2, 3, 2), 0.5, torch.Generator().manual_seed(1))
    feats = enc(x, mask)
    scales = masks_per_scale(mask)
    x2 = x + 10 * torch.randn_like(x) * (1 - scales[0])  # change only masked voxels
    feats2 = enc(x2, mask)
    for s, (a, b) in enumerate(zip(feats, feats2)):
        m = scales[s]
        assert torch.allclose(a, b, atol=1e-5), f"scale {s} kept outputs depend on masked input"
        assert float((a.detach() * (1 - m)).abs().max()) == 0.0, f"scale {s} has non-zero outputs at masked positions"


def test_batch_of_three_equals_samples_run_one_by_one():
    """Per-sample masks in a batch: each sample's result is what it gets alone (no cross-talk)."""
    enc = HybridEncoder(1, **TINY).eval()
    x = torch.randn(3, 1, 32, 32, 32)
    mask = random_cell_mask(3, (2, 2, 2), 0.75, torch.Generator().manual_seed(2))
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1
    batched = enc(x, mask)
    for i in range(3):
        alone = enc(x[i:i + 1], mask[i:i + 1])
        for a, b in zip(batched, alone):
            assert torch.allclose(a[i:i + 1], b, atol=1e-5)


def test_zero_mask_ratio_equals_the_dense_encoder():
    enc = HybridEncoder(1, **TINY)
    x = torch.randn(2, 1, 32, 32, 32)
    full = torch.ones(2, 2, 2, 2, dtype=torch.bool)
    for a, b in zip(enc(x), enc(x, full)):
        assert torch.allclose(a, b, atol=1e-5)


def test_loss_decreases_over_a_few_dozen_steps():
    model = tiny_model()
    x = smooth_volumes(2)
    before, after = loss_before_and_after_training(model, x, torch.optim.AdamW(model.parameters(), lr=3e-3), 40)
    assert after < 0.8 * before, (before, after)


def test_reference_decoder_leaves_full_resolution_skip_unused_unless_asked():
    x = smooth_volumes(2, (32, 32, 32))
    for fuse, expect_grad in ((False, False), (True, True)):
        model = tiny_model(fuse_full_resolution=fuse)
        model(x)["loss"].backward()
        grad = model.densify_proj[4].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad
        assert model.densify_proj[4].weight.requires_grad == expect_grad  # frozen, so DDP accepts it
        assert "densify_proj.4.weight" in model.state_dict()  # kept, so checkpoints compare


def test_reconstruction_preview_keeps_visible_patches():
    model = tiny_model()
    x = smooth_volumes(1, (32, 32, 32))
    out = model(x)
    imgs = model.reconstruct(x, out["pred"], out["mask"])
    keep = masks_per_scale(out["mask"])[0]
    assert torch.allclose(imgs["reconstruction"] * keep, x * keep, atol=1e-5)
    assert torch.equal(imgs["masked"].nan_to_num(0.0), x * keep)
    assert bool(imgs["masked"].isnan().eq(keep.expand_as(x) == 0).all())  # hidden voxels are NaN, drawn in colour


def test_invalid_mask_ratio_is_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_cell_mask(1, (2, 2, 2), 1.0)


def _loss_curve(precision: str, backend: str, steps: int = 30) -> list[float]:
    model = tiny_model(sparse_backend=backend)
    x = smooth_volumes(2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    masks = [model.random_mask(x, gen) for _ in range(steps)]  # the same masks for both precisions
    losses = train_on_masks(model, x, masks, opt, torch.bfloat16 if precision == "bf16" else None)
    return [loss.item() for loss in losses]


@pytest.mark.parametrize("backend", ["dense", "blocks"])
def test_bf16_autocast_loss_curve_follows_fp32(backend):
    fp32, bf16 = _loss_curve("fp32", backend), _loss_curve("bf16", backend)
    assert fp32[0] == pytest.approx(bf16[0], rel=0.02)  # same weights and masks: only rounding differs
    tail32, tail16 = sum(fp32[-10:]) / 10, sum(bf16[-10:]) / 10
    assert tail32 < 0.9 * sum(fp32[:5]) / 5 and tail16 < 0.9 * sum(bf16[:5]) / 5  # both learn
    assert tail16 == pytest.approx(tail32, rel=0.05), (fp32, bf16)  # measured: within 2%


# ------------------------------------------------ the fast path computes the reference's function


def _step_outputs(model: HySparK, x: torch.Tensor, mask: torch.Tensor) -> tuple[dict, dict]:
    out = model(x, mask)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend,fuse", [("dense", False), ("blocks", False), ("blocks", True)])
def test_fast_step_equals_the_reference_formulation(backend, fuse):
    """Channels-last decoder, bool-mask densify, matrix-product up-convs: the same loss, reconstruction and gradients as the published formulation (dense CNN, float masks).
    In float64 the two agree to ~1e-14, so any difference is a bug; in float32 the sums' other order
    alone moves small, cancelling gradients (the stem's) by up to ~1%, so fp32 is checked on outputs."""
    x = torch.randn(2, 1, 32, 48, 32)
    mask = random_cell_mask(2, (2, 3, 2), 0.75, torch.Generator().manual_seed(1))
    ref = tiny_model(sparse_backend="dense", reference=True, fuse_full_resolution=fuse).double()
    fast = tiny_model(sparse_backend=backend, fuse_full_resolution=fuse).double()
    assert not fast.reference
    (out_r, grad_r), (out_f, grad_f) = _step_outputs(ref, x.double(), mask), _step_outputs(fast, x.double(), mask)
    assert out_f["loss"].item() == pytest.approx(out_r["loss"].item(), rel=1e-12)
    assert torch.allclose(out_f["pred"], out_r["pred"], rtol=0, atol=1e-12)
    assert set(grad_f) == set(grad_r)
    for name, g in grad_r.items():
        assert float((grad_f[name] - g).norm() / g.norm().clamp_min(1e-30)) < 1e-9, name
    ref32 = tiny_model(sparse_backend="dense", reference=True, fuse_full_resolution=fuse)
    fast32 = tiny_model(sparse_backend=backend, fuse_full_resolution=fuse)
    out_r, out_f = ref32(x, mask), fast32(x, mask)
    assert out_f["loss"].item() == pytest.approx(out_r["loss"].item(), rel=1e-5)
    assert torch.allclose(out_f["pred"], out_r["pred"], atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_up_conv_as_a_matrix_product_equals_the_transposed_conv(bias):
    from nnunet_hyspark.methods.hyspark.model import up_conv_2x

    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose3d(6, 4, 2, stride=2, bias=bias)
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    want = conv(x)
    got = up_conv_2x(conv, x)
    assert got.shape == want.shape == (2, 4, 6, 8, 10) and got.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(got, want, atol=1e-6)
    g = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, [x, *conv.parameters()], g)
    grads_got = torch.autograd.grad(got, [x, *conv.parameters()], g)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, atol=1e-5)


def test_bool_mask_upsampling_equals_the_float_one():
    from nnunet_hyspark.masking import upsample_mask
    from nnunet_hyspark.methods.hyspark.model import upsample_mask_bool

    mask = random_cell_mask(2, (2, 3, 1), 0.5, torch.Generator().manual_seed(3))
    for f in (1, 2, 8):
        assert torch.equal(upsample_mask_bool(mask, f).float(), upsample_mask(mask, f))
