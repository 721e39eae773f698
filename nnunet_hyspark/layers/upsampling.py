"""The 2x up-convolution of the light decoder, computed fast on CPUs with the same numbers.

The HySparK decoder upsamples with a kernel-2, stride-2 transposed conv and immediately applies a k3
conv (no bias, no non-linearity in between). Two forms of that pair, both tested against
``conv(up(x))`` (float64: equal to ~1e-12):

* :func:`up_conv_2x`: the transposed conv alone as one matrix product per input voxel.
* :func:`up_then_conv3`: the pair as ONE convolution on the low-resolution input. Two linear maps
  compose into one: an output voxel at ``2i + a`` (per axis) sees, through the k3 conv, up-conv output
  at ``2i + a - 1 .. 2i + a + 1``, i.e. input voxels ``i - 1, i`` (a = 0) or ``i, i + 1`` (a = 1). So
  each of the 8 output phases is a 2x2x2 convolution of the input, and all 8 are one k2 conv with
  ``8 * C_out`` channels on the input padded by one voxel. Cost per output voxel: ``4 C_in C_out``
  multiply-adds instead of ``C_in C_mid / 8 + 27 C_mid C_out`` (about 3.5x fewer at the decoder's
  widths), plus composing the kernel once per call, which pays when the output has many more voxels
  than channels (:func:`composition_pays`). Two backward details decide whether the saving shows: the
  k2 conv's weight gradient as matrix products (:func:`conv_weight_grad_gemm`), and the 8 phases
  interleaved by one custom copy (:class:`_PhaseShuffle`). Measured, forward + backward, 2 threads,
  AMD EPYC (AVX2): 96 channels at 48^3 -> 96^3 6.4 s -> 2.5 s; the whole HySparK step at 96^3
  (``blocks`` backend, batch 1) 28.6 s -> 22.9 s.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

#: per axis, output phase a and k3 tap t -> (tap d of the composed k2 kernel, sub-position a' of the up-conv)
#: (a = 0: taps -1, 0, +1 land on input i-1 (a' 1), i (a' 0), i (a' 1); a = 1: on i (0), i (1), i+1 (0))
_PHASE_TAP = {(0, 0): (0, 1), (0, 1): (1, 0), (0, 2): (1, 1), (1, 0): (0, 0), (1, 1): (0, 1), (1, 2): (1, 0)}
#: the 8 output phases (a, b, c) in the order of the composed kernel's output channels
_PHASE_IDS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def up_conv_2x(conv: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a kernel-2, stride-2 transposed conv, as one matrix product per input voxel (each
    writes its own 2^3 output block) and one reordering copy; the output is channels-last 3D.
    Why: oneDNN's transposed-conv backward is slow on CPUs, a plain GEMM is not."""
    b, c, d, h, w = x.shape
    out = conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(c, 8 * out)  # (C_in, [a, b, c, C_out])
    bias = conv.bias.repeat(8) if conv.bias is not None else None
    y = F.linear(x.permute(0, 2, 3, 4, 1), weight.t(), bias)  # (B, D, H, W, 8 * C_out)
    y = y.view(b, d, h, w, 2, 2, 2, out).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, 2 * d, 2 * h, 2 * w, out)
    return y.permute(0, 4, 1, 2, 3)


def _axis_selection(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(a, t, d, a') 0/1 tensor of :data:`_PHASE_TAP` for one axis."""
    sel = torch.zeros(2, 3, 2, 2, dtype=dtype, device=device)
    for (a, t), (d, sub) in _PHASE_TAP.items():
        sel[a, t, d, sub] = 1
    return sel


def composed_kernel(up: nn.ConvTranspose3d, conv: nn.Conv3d) -> torch.Tensor:
    """The k2 kernel ``(8 * C_out, C_in, 2, 2, 2)`` (output channel = phase * C_out + o, phase = 4 ax + 2 ay
    + az) of ``conv(up(.))`` without the up-conv's bias (that is :func:`border_bias_table`)."""
    c_in, c_mid = up.weight.shape[:2]
    c_out = conv.weight.shape[0]
    sel = _axis_selection(up.weight.dtype, up.weight.device)
    # every (k3 tap, up-conv sub-position) pair: one GEMM over the middle channels
    pair = conv.weight.permute(0, 2, 3, 4, 1).reshape(c_out * 27, c_mid) @ up.weight.reshape(c_in, c_mid, 8) \
        .permute(1, 0, 2).reshape(c_mid, c_in * 8)
    pair = pair.view(c_out, 3, 3, 3, c_in, 2, 2, 2)  # (o, tx, ty, tz, i, a'x, a'y, a'z)
    # (tap, sub-position) -> (phase, composed tap), per axis; each output element sums <= 2 terms per axis
    kernel = torch.einsum("otuvipqr,atdp,bueq,cvfr->abcoidef", pair, sel, sel, sel)
    return kernel.reshape(8 * c_out, c_in, 2, 2, 2)


#: per axis and border class of an output voxel (0: the first plane, 1: inside, 2: the last plane), which of
#: the k3 conv's taps (-1, 0, +1) read the up-conv's output rather than the conv's zero padding
_TAP_INSIDE = ((0, 1, 1), (1, 1, 1), (1, 1, 0))


def border_bias_table(up: nn.ConvTranspose3d, conv: nn.Conv3d) -> torch.Tensor:
    """``(3, 3, 3, C_out)``: what the up-conv's bias adds to ``conv(up(x))`` at an output voxel of border class
    ``(kx, ky, kz)`` (:data:`_TAP_INSIDE`). Why a table: the bias is the same at every voxel of the up-conv's
    output, so its contribution differs between voxels only by which k3 taps fall into the zero padding,
    i.e. only on the first and last plane of each axis. Adding 27 constants costs one pass over the output
    and its gradient is 27 region sums, where a bias map as large as the output and its convolution had
    made the forward + backward 1.36x slower (1.32 s vs 0.97 s; 96 -> 48 channels, 48^3 -> 96^3, fp32, 2 threads,
    Xeon with AMX, one run)."""
    per_tap = torch.einsum("omtuv,m->tuvo", conv.weight, up.bias)  # (tx, ty, tz, o)
    inside = torch.tensor(_TAP_INSIDE, dtype=per_tap.dtype, device=per_tap.device)
    return torch.einsum("tuvo,at,bu,cv->abco", per_tap, inside, inside, inside)


def _border_regions(n: int) -> tuple[slice, slice, slice]:
    """The first plane, the inside and the last plane of an axis of ``n >= 2`` voxels."""
    return slice(0, 1), slice(1, n - 1), slice(n - 1, n)


def _add_border_bias(y: torch.Tensor, table: torch.Tensor) -> None:
    """``y`` (B, X, Y, Z, C) += ``table[class(x), class(y), class(z)]``, in place: the inside constant once,
    then the 26 border classes' differences to it on the shell (planes, edges and corners)."""
    inside = table[1, 1, 1]
    y += inside
    regions = [_border_regions(n) for n in y.shape[1:4]]
    for kx, ky, kz in itertools.product(range(3), repeat=3):
        if (kx, ky, kz) != (1, 1, 1):
            y[:, regions[0][kx], regions[1][ky], regions[2][kz]] += table[kx, ky, kz] - inside


def _border_class_sums(g: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z, C) -> (3, 3, 3, C): the sum of ``g`` over each border class's region (the gradient of
    :func:`_add_border_bias` with respect to the table), one axis at a time so only the first pass is large."""
    for dim in (1, 2, 3):
        g = torch.stack([g[(slice(None),) * dim + (r,)].sum(dim) for r in _border_regions(g.shape[dim])], dim)
    return g.sum(0)


def composition_pays(x: torch.Tensor, up: nn.ConvTranspose3d, conv: nn.Conv3d) -> bool:
    """Whether composing costs less than it saves, in multiply-adds: the plain pair costs ``C_in C_mid / 8
    + 27 C_mid C_out`` per output voxel, the composed conv ``4 C_in C_out`` (times ``(1 + 1/n)^3`` for the
    padded input), plus the kernel's composition and its two backward products (``3 x 216 C_out C_mid C_in``).
    Measured (96^3 patch, 2 threads, AMD EPYC AVX2, forward + backward): 96 ch at 48^3 2.6x and 192 ch at
    24^3 2.4x faster; 384 ch at 12^3 0.95x and 768 ch at 6^3 0.12x, which this rule leaves plain."""
    c_in, c_mid = up.weight.shape[:2]
    c_out = conv.weight.shape[0]
    n = x.shape[2:].numel()
    grow = 1.0
    for s in x.shape[2:]:
        grow *= 1.0 + 1.0 / s
    plain = n * 8 * (c_in * c_mid / 8 + 27 * c_mid * c_out)
    composed = n * 8 * 4 * c_in * c_out * grow + 3 * 216 * c_out * c_mid * c_in / x.shape[0]
    return composed < 0.8 * plain


def conv_weight_grad_gemm(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weight gradient of an unpadded, stride-1 ``conv3d(x, w)`` with a cubic kernel, one matrix product
    per tap. Why: for the composed k2 conv (few input, many output channels) oneDNN's weight gradient ran
    ~5x slower than these products (96 -> 384 channels at 49^3, 2 threads, AMD EPYC AVX2: 3.9 s vs 0.8 s).
    In the flat channels-last layout a tap is a constant row offset, so every product reads contiguous
    rows: ``grad_out`` is embedded at the low corner of ``x``'s grid (zeros elsewhere, so rows that wrap
    around contribute nothing)."""
    b, o, d, h, w = grad_out.shape
    _, c, dp, hp, wp = x.shape
    xs = x.permute(0, 2, 3, 4, 1).reshape(-1, c)  # (B * Dp * Hp * Wp, C)
    g = grad_out.new_zeros(b, dp, hp, wp, o)
    g[:, :d, :h, :w] = grad_out.permute(0, 2, 3, 4, 1)
    g = g.view(-1, o)
    rows = g.shape[0]
    k = kernel_size
    # each tap as (C_in, C_out) = x^T g: 1.1-1.4x faster than g^T x (the same numbers) at 96 -> 384 channels
    # on 49^3 (fp32, 2 threads, Xeon with AMX, one run; not slower with MKL and oneDNN capped at AVX2)
    grad_w = grad_out.new_empty(k, k, k, c, o)
    for i in range(k):
        for j in range(k):
            for m in range(k):
                off = (i * hp + j) * wp + m
                torch.mm(xs[off:].t(), g[:rows - off], out=grad_w[i, j, m])
    return grad_w.permute(4, 3, 0, 1, 2)


class _ConvK2(torch.autograd.Function):
    """``conv3d(x, w)`` for the composed k2 kernel: oneDNN forward and input gradient, the weight
    gradient as matrix products (:func:`conv_weight_grad_gemm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv3d(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad_gemm(grad_out, x, weight.shape[2]).to(weight.dtype)
        return grad_x, grad_w


def up_then_conv3(up: nn.ConvTranspose3d, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(up(x))`` for a kernel-2 stride-2 transposed conv ``up`` and a k3, padding 1, bias-free
    ``conv``, as one k2 convolution of ``x`` (module docstring); output channels-last 3D."""
    with torch.autocast(x.device.type, enabled=False):  # compose in the weights' precision
        kernel = composed_kernel(up, conv)
        table = border_bias_table(up, conv) if up.bias is not None else None
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # as F.conv3d would
    kernel = kernel.to(dtype)
    xp = F.pad(x.to(dtype), (1, 1, 1, 1, 1, 1)).contiguous(memory_format=torch.channels_last_3d)
    z = _ConvK2.apply(xp, kernel.contiguous(memory_format=torch.channels_last_3d))  # (B, 8 C_out, nx+1, ...)
    return _PhaseShuffle.apply(z, table.to(z.dtype) if table is not None else None)


def _phases(t: torch.Tensor) -> torch.Tensor:
    """(B, 8 C, X, Y, Z) channels-last -> a (B, X, Y, Z, 2, 2, 2, C) view of the same memory."""
    b, c8, *grid = t.shape
    return t.permute(0, 2, 3, 4, 1).view(b, *grid, 2, 2, 2, c8 // 8)


class _PhaseShuffle(torch.autograd.Function):
    """Output voxel ``(2i + a, 2j + b, 2k + c)`` = phase ``(a, b, c)`` of the k2 conv at ``(i + a, j + b,
    k + c)``, plus the up-conv's bias by border class (:func:`border_bias_table`): 8 strided copies forward
    and backward, where autograd through slicing would allocate and zero a full-size gradient for each of
    the 8 slices."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
        b, c8, gx, gy, gz = z.shape
        n = (gx - 1, gy - 1, gz - 1)
        c = c8 // 8
        zp = _phases(z.contiguous(memory_format=torch.channels_last_3d))
        y = z.new_empty(b, n[0], 2, n[1], 2, n[2], 2, c)
        for a, bb, cc in _PHASE_IDS:
            y[:, :, a, :, bb, :, cc] = zp[:, a:a + n[0], bb:bb + n[1], cc:cc + n[2], a, bb, cc]
        y = y.view(b, 2 * n[0], 2 * n[1], 2 * n[2], c)
        if table is not None:
            _add_border_bias(y, table)
        ctx.shape, ctx.has_bias = z.shape, table is not None
        return y.permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        b, c8, gx, gy, gz = ctx.shape
        n = (gx - 1, gy - 1, gz - 1)
        c = c8 // 8
        gyv = grad_y.permute(0, 2, 3, 4, 1).reshape(b, n[0], 2, n[1], 2, n[2], 2, c)
        grad_z = grad_y.new_zeros(b, gx, gy, gz, 2, 2, 2, c)
        for a, bb, cc in _PHASE_IDS:
            grad_z[:, a:a + n[0], bb:bb + n[1], cc:cc + n[2], a, bb, cc] = gyv[:, :, a, :, bb, :, cc]
        grad_z = grad_z.view(b, gx, gy, gz, c8).permute(0, 4, 1, 2, 3)
        grad_table = _border_class_sums(gyv.view(b, 2 * n[0], 2 * n[1], 2 * n[2], c)) if ctx.has_bias else None
        return grad_z, grad_table
