"""Sparse execution backends of the masked CNN encoder must reproduce the dense reference.

Every backend available on CPU is compared with ``dense`` (dense op, then multiply by the
mask): the five maps, and the gradients w.r.t. the input and every parameter under a random
upstream gradient, over several shapes, mask ratios and batch sizes.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_hyspark.masking import random_cell_mask, upsample_mask
from nnunet_hyspark.methods.hyspark.encoder import CNNEmbeddings, HybridEncoder, run_masked_cnn
from nnunet_hyspark.sparse import available_backends, get_backend
from nnunet_hyspark.sparse.blocks import BlockSparseBackend, CellLayout, gather_halo

WIDTHS = (8, 16, 16, 24, 24)
DEPTHS = (1, 2, 1, 1, 1)
EXPANSIONS = (2, 4, 4, 4, 2)
SPARSE_BACKENDS = [name for name in available_backends("cpu") if name != "dense"]

# (spatial shape, batch, mask ratio)
CASES = [
    ((32, 32, 32), 1, 0.0),
    ((32, 32, 32), 3, 0.75),
    ((32, 48, 16), 3, 0.5),  # anisotropic grid 2x3x1
    ((64, 32, 32), 1, 0.75),
    ((64, 32, 32), 3, 0.9),
]


def _embeddings(seed: int = 0) -> CNNEmbeddings:
    torch.manual_seed(seed)
    emb = CNNEmbeddings(1, WIDTHS, DEPTHS, EXPANSIONS)
    with torch.no_grad():  # non-trivial norms, so that their gradients are checked meaningfully
        for name, p in emb.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return emb


def _inputs(shape, batch, ratio, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *shape, generator=gen)
    mask = random_cell_mask(batch, tuple(s // 16 for s in shape), ratio, generator=gen)
    return x, mask


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(float(expected.detach().abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _forward_backward(emb: CNNEmbeddings, x: torch.Tensor, mask: torch.Tensor, backend, upstream=None):
    """Outputs and gradients (input first, then parameters in named order) for one backend."""
    emb.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    outs = backend(emb, x, mask) if callable(backend) else run_masked_cnn(emb, x, mask, backend)
    if upstream is None:
        gen = torch.Generator().manual_seed(123)
        upstream = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    torch.autograd.backward(outs, upstream)
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in emb.named_parameters()})
    return [o.detach() for o in outs], grads, upstream


def _compare_with_dense(backend, shape, batch, ratio, mask=None, device="cpu"):
    emb = _embeddings().to(device)
    x, random_mask = _inputs(shape, batch, ratio)
    mask = random_mask if mask is None else mask
    x, mask = x.to(device), mask.to(device)
    ref_out, ref_grads, upstream = _forward_backward(emb, x, mask, "dense")
    out, grads, _ = _forward_backward(emb, x, mask, backend, upstream)
    assert [o.shape for o in out] == [o.shape for o in ref_out]
    for i, (a, b) in enumerate(zip(out, ref_out)):
        _assert_close(a, b, f"output {i}")
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert grads[name] is not None, f"no gradient reached {name}"
        _assert_close(grads[name], ref_grads[name], f"gradient of {name}")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("shape,batch,ratio", CASES)
def test_forward_and_gradients_match_dense(backend, shape, batch, ratio):
    _compare_with_dense(backend, shape, batch, ratio)


@pytest.mark.parametrize("options", [{"dense_from_scale": 5}, {"dense_from_scale": 1},
                                     {"dense_from_scale": 0}, {"channels_last": False}])
def test_blocks_configurations_match_dense(options):
    """Cells at every scale (down to 1^3), the dense fallback from any scale, channels-first outputs."""
    _compare_with_dense(get_backend("blocks", **options), (32, 48, 16), 3, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,batch,ratio", CASES[1:3])
def test_cuda_backends_match_dense(shape, batch, ratio):
    """On a GPU machine: every backend available there (spconv too, when installed)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for backend in available_backends("cuda"):
        if backend != "dense":
            _compare_with_dense(backend, shape, batch, ratio, device="cuda")


def test_uneven_masks_and_isolated_cells():
    """The backend does not need equal keep counts; isolated cells and full rows of kept cells."""
    mask = torch.zeros(2, 4, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = True  # one isolated corner cell
    mask[1, :, 1, :] = True  # a slab of 8 touching cells
    mask[1, 2, 0, 1] = True
    for backend in SPARSE_BACKENDS:
        _compare_with_dense(backend, (64, 32, 32), 2, 0.0, mask=mask)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_full_encoder_matches_dense(backend):
    torch.manual_seed(0)
    enc = HybridEncoder(widths=WIDTHS, depths=DEPTHS, expansions=EXPANSIONS, vit_heads=4)
    x, mask = _inputs((32, 48, 32), 2, 0.5)
    ref = enc(x, mask, backend=get_backend("dense"))
    out = enc(x, mask, backend=get_backend(backend))
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.shape == b.shape
        _assert_close(a, b, f"encoder output {i}")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_masked_positions_zero_and_independent_of_masked_input(backend):
    emb = _embeddings()
    x, mask = _inputs((64, 32, 32), 2, 0.75)
    with torch.no_grad():
        out = run_masked_cnn(emb, x, mask, backend)
        for s, o in enumerate(out):
            masked = upsample_mask(mask, 16 >> s).expand_as(o) == 0
            assert bool((o[masked] == 0).all()), f"output {s} is not exactly zero at masked positions"
        # scramble the input inside masked cells: kept outputs must not move at all
        x2 = torch.where(upsample_mask(mask, 16).bool(), x, 100 * torch.randn_like(x))
        out2 = run_masked_cnn(emb, x2, mask, backend)
    for s, (a, b) in enumerate(zip(out, out2)):
        assert torch.equal(a, b), f"output {s} depends on masked input voxels"


def test_halo_gather_gradcheck():
    """The halo gather (the only non-trivial index op) has exact gradients, also for reach > 1."""
    for grid, cell, halo in [((3, 2, 2), 2, 1), ((2, 3, 2), 1, 1), ((3, 3, 2), 1, 2)]:
        mask = random_cell_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(3))
        layout = CellLayout.from_mask(mask)
        cells = torch.randn(layout.num_kept, cell, cell, cell, 3, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: gather_halo(t, layout, halo), (cells,))


def test_spconv_voxel_indices_follow_cell_rows():
    """The spconv backend (untested here: no GPU) addresses cell-batch rows by these coordinates."""
    from nnunet_hyspark.sparse.blocks import dense_to_cells
    from nnunet_hyspark.sparse.spconv_backend import voxel_indices

    x, mask = _inputs((32, 48, 16), 2, 0.5)
    x = x.expand(-1, 3, -1, -1, -1) * torch.tensor([1.0, 2.0, 3.0])[:, None, None, None]
    layout = CellLayout.from_mask(mask)
    rows = dense_to_cells(x, layout, 16).reshape(-1, 3)
    b, i, j, k = voxel_indices(layout, 16, torch.device("cpu")).long().unbind(1)
    assert torch.equal(rows, x[b, :, i, j, k])


def test_backend_registry_errors():
    assert available_backends("cpu") == ["dense", "blocks"]
    assert isinstance(get_backend("blocks"), BlockSparseBackend)
    with pytest.raises(ValueError, match="blocks"):
        get_backend("no-such-backend")
    with pytest.raises(ValueError, match="dense_from_scale"):
        get_backend("blocks", dense_from_scale=7)
    enc = HybridEncoder(widths=WIDTHS, depths=DEPTHS, expansions=EXPANSIONS, vit_heads=4)
    x, mask = _inputs((32, 32, 32), 1, 0.5)
    with pytest.raises(ValueError, match="unknown sparse backend"):
        enc(x, mask, backend=get_backend("no-such-backend"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_spconv_refused_on_cpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        get_backend("spconv")


def test_benchmark_smoke():
    from nnunet_hyspark.sparse.benchmark import parse_backend_spec, time_encoder

    assert parse_backend_spec("blocks:dense_from_scale=4,channels_last=1") == (
        "blocks", {"dense_from_scale": 4, "channels_last": 1})
    result = time_encoder("blocks", batch=1, patch=32, widths="tiny", steps=1, warmup=0, isolate=False)
    assert result["median_s"] > 0 and result["samples_per_s"] > 0 and result["peak_mem_bytes"] >= 0
