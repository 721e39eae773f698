"""The decoder's up-convolution and its k3 conv composed into one convolution: the same function."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from nnunet_hyspark.layers.upsampling import composition_pays, up_conv_2x, up_then_conv3


def _pair(c_in: int, c_mid: int, c_out: int, bias: bool, dtype=torch.float64):
    torch.manual_seed(0)
    up = nn.ConvTranspose3d(c_in, c_mid, 2, stride=2, bias=bias).to(dtype)
    conv = nn.Conv3d(c_mid, c_out, 3, padding=1, bias=False).to(dtype)
    return up, conv


@contextlib.contextmanager
def uninitialised_memory_as_nan():
    """Every ``torch.empty`` filled with NaN: a buffer that the code forgets to write shows in the result
    (without this, fresh memory is often zero and such a bug passes)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory (default True): NaN in empties
    assert torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("nan_empty", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 5, 4, 3), (1, 8, 1, 2, 6)])
def test_composed_conv_equals_up_conv_then_conv(shape, bias, nan_empty):
    """Values and every gradient (input, both kernels, the up-conv's bias) equal to float64 rounding,
    on odd sizes, a size of 1 (every output voxel at a border) and without a bias; also where the
    memory the code allocates starts as NaN (its buffers are written, or zeroed, wherever they are read)."""
    with uninitialised_memory_as_nan() if nan_empty else contextlib.nullcontext():
        _check_composed_conv(shape, bias)


def _check_composed_conv(shape, bias):
    up, conv = _pair(shape[1], shape[1], 3, bias)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    want = conv(up(x))
    got = up_then_conv3(up, conv, x)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    params = [x, up.weight, conv.weight, *([up.bias] if bias else [])]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def test_composed_conv_in_float32_and_bf16_autocast():
    up, conv = _pair(16, 16, 8, True, torch.float32)
    x = torch.randn(2, 16, 4, 4, 4)
    want = conv(up(x))
    assert torch.allclose(up_then_conv3(up, conv, x), want, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = up_then_conv3(up, conv, x)
    assert got.dtype == torch.bfloat16
    assert float(((got.float() - want).norm() / want.norm()).detach()) < 2e-2  # bf16 rounding of inputs and kernel


def test_matrix_product_up_conv_equals_the_transposed_conv():
    up, _ = _pair(6, 4, 4, True)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    assert torch.allclose(up_conv_2x(up, x), up(x), rtol=0, atol=1e-12)


def test_composition_is_chosen_where_it_saves_work():
    """Large maps with few channels compose (the decoder's last steps); a 6^3 map with 768 channels (the
    first step at 96^3) does not: composing the kernel would cost more than it saves."""
    up, conv = nn.ConvTranspose3d(96, 96, 2, stride=2), nn.Conv3d(96, 48, 3, padding=1, bias=False)
    assert composition_pays(torch.empty(1, 96, 48, 48, 48), up, conv)
    up, conv = nn.ConvTranspose3d(768, 768, 2, stride=2), nn.Conv3d(768, 384, 3, padding=1, bias=False)
    assert not composition_pays(torch.empty(1, 768, 6, 6, 6), up, conv)
