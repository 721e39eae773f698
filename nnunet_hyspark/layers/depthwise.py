"""Depthwise 3D convolution (groups = channels, stride 1) with a fast backward on the CPU.

The forward is ``F.conv3d``. The backward computes the same gradients as autograd's, by other routes:
oneDNN's depthwise 3D backward on the CPU is many times slower than its forward (measured: 10-30x
on an AVX2 EPYC), so the input gradient is a depthwise forward convolution of the output gradient
with the flipped kernel, and each kernel tap's weight gradient is one product-and-sum of the output
gradient with the shifted, padded input. Both keep the input's memory format (channels_last_3d
included, where oneDNN's depthwise forward is fastest). On other devices, under ``no_grad``, and for
strided or dilated convolutions the native path is used. Measured, one training step of HySparKUNet at
64^3, batch 2, 2 threads, Xeon: 16.4 s -> 15.7 s with this alone (noisy; 19.4 -> 15.7 in another run).
The same backward serves the ``blocks`` backend's cells (already padded, so padding 0): there oneDNN's
bf16 depthwise backward took 1.9-3.6x as long as this one (2 Zen 4 cores; fp32 about even).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int, int],
                 padding: tuple[int, int, int]) -> torch.Tensor:
    """dL/dw[c, 0, a, b, d] = sum over batch and voxels of grad[n, c, v] * pad(x)[n, c, v + (a, b, d)]."""
    xp = F.pad(x, (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]))
    out_shape = grad.shape[2:]
    taps = []
    product = torch.empty_like(grad)  # one buffer for all taps
    for a, b, d in itertools.product(*(range(k) for k in kernel)):
        shifted = xp[:, :, a:a + out_shape[0], b:b + out_shape[1], d:d + out_shape[2]]
        taps.append(torch.mul(grad, shifted, out=product).sum(dim=(0, 2, 3, 4)))
    return torch.stack(taps, 1).view(grad.shape[1], 1, *kernel)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format


class _DepthwiseConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        if torch.is_autocast_enabled("cpu"):  # what autocast would do to the conv: all operands in its dtype
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel, padding = tuple(weight.shape[2:]), ctx.padding
        if not (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last_3d)):
            grad = grad.contiguous(memory_format=_memory_format(x))
        grad = grad.to(x.dtype)  # autograd casts the returned gradients back to the inputs' dtypes
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # the adjoint of a stride-1 correlation is a correlation with the flipped kernel
            back_pad = tuple(k - 1 - p for k, p in zip(kernel, padding))
            gx = F.conv3d(grad, weight.flip(2, 3, 4), padding=back_pad, groups=weight.shape[0])
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(x, grad, kernel, padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3, 4))
        return gx, gw, gb, None


def _is_fast_case(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    """CPU, stride 1, no dilation, 'same'-style integer padding, one input channel per group."""
    return (x.device.type == "cpu" and conv.groups == conv.in_channels == conv.out_channels
            and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and not isinstance(conv.padding, str)
            and conv.padding_mode == "zeros"
            and all(2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size)))


def depthwise_conv3d(x: torch.Tensor, conv: nn.Conv3d, pre_padded: bool = False) -> torch.Tensor:
    """``conv(x)`` for a depthwise ``nn.Conv3d``; the fast backward where it applies (see module docstring).
    ``pre_padded``: ``x`` already holds the halo that ``conv.padding`` would add (the ``blocks`` backend's
    cells), so the conv runs with padding 0."""
    padding = (0, 0, 0) if pre_padded else tuple(conv.padding)
    if not _is_fast_case(x, conv) or not torch.is_grad_enabled():
        return F.conv3d(x, conv.weight, conv.bias, padding=padding, groups=conv.groups) if pre_padded else conv(x)
    return _DepthwiseConv3d.apply(x, conv.weight, conv.bias, padding)


# ------------------------------------------------------------------ the decoder's depthwise 2x up-convolution

#: per axis and output phase (0: even p = 2j, 1: odd p = 2j + 1): the kernel taps that reach it, each with
#: the input slice it reads, and the output positions j it covers. Why: a stride-2, padding-1 transposed k3
#: conv followed by one voxel of zero padding at the low end maps input i through tap k to output 2i + k, so
#: even outputs 2j (j >= 1) read x[j] (tap 0) and x[j - 1] (tap 2), odd outputs 2j + 1 read x[j] (tap 1), and
#: output 0 is the padding.
def _phase_taps(n: int) -> dict[int, tuple[slice, list[tuple[int, slice]]]]:
    return {0: (slice(1, n), [(0, slice(1, n)), (2, slice(0, n - 1))]), 1: (slice(0, n), [(1, slice(0, n))])}


def _phase_terms(n: tuple[int, int, int]):
    """For each of the 8 output phases: its (B, X, 2, Y, 2, Z, 2, C) index and the (tap, input index) terms."""
    axes = [_phase_taps(s) for s in n]
    for phase in itertools.product((0, 1), repeat=3):
        outs, taps = zip(*(axes[d][phase[d]] for d in range(3)))
        index = (slice(None), outs[0], phase[0], outs[1], phase[1], outs[2], phase[2], slice(None))
        terms = [((ka, kb, kc), (slice(None), sa, sb, sc, slice(None)))
                 for (ka, sa), (kb, sb), (kc, sc) in itertools.product(*taps)]
        yield index, terms


class _DepthwiseUp2(torch.autograd.Function):
    """``pad_low(conv_transpose3d(x, w, b, stride=2, padding=1, groups=C))`` for a k3 depthwise kernel, on a
    channels-last (B, X, Y, Z, C) input, as 27 per-channel multiply-adds into the 8 output phases."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, *n, c = x.shape
        w = weight[:, 0]  # (C, 3, 3, 3)
        out = x.new_empty(b, n[0], 2, n[1], 2, n[2], 2, c)
        for index, terms in _phase_terms(tuple(n)):
            acc = out[index]
            for i, (k, src) in enumerate(terms):
                if i == 0:
                    torch.mul(x[src], w[:, k[0], k[1], k[2]], out=acc)
                else:
                    acc.addcmul_(x[src], w[:, k[0], k[1], k[2]])
        full = out.view(b, 2 * n[0], 2 * n[1], 2 * n[2], c)
        if bias is not None:
            full[:, 1:, 1:, 1:] += bias
        full[:, 0] = 0  # the padding planes (never written above)
        full[:, :, 0] = 0
        full[:, :, :, 0] = 0
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, *n, c = x.shape
        w = weight[:, 0]
        grad = grad.contiguous()
        g = grad.view(b, n[0], 2, n[1], 2, n[2], 2, c)
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for index, terms in _phase_terms(tuple(n)):
            g_phase = g[index]
            for k, src in terms:
                if gx is not None:
                    gx[src].addcmul_(g_phase, w[:, k[0], k[1], k[2]])
                if gw is not None:
                    gw[:, k[0], k[1], k[2]] = (g_phase * x[src]).sum(dim=(0, 1, 2, 3))
        gb = _sum_past_low_planes(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, (gw.unsqueeze(1) if gw is not None else None), gb


def _sum_past_low_planes(grad: torch.Tensor) -> torch.Tensor:
    """``grad[:, 1:, 1:, 1:].sum(dim=(0, 1, 2, 3))`` for a contiguous (B, X, Y, Z, C) tensor, one leading axis at
    a time. Why: each step then reduces a contiguous block over its first axis (vectorised adds of whole
    rows), where torch's one-call reduction of the strided slice took 11x as long (118 ms vs 11 ms at
    2 x 64^3 x 64, fp32, 2 Zen 4 cores), and it is the up-convolution bias's gradient at full resolution."""
    total = grad.sum(dim=0)
    for _ in range(3):
        total = total[1:].sum(dim=0)
    return total


def depthwise_up2(x: torch.Tensor, conv: nn.ConvTranspose3d) -> torch.Tensor:
    """``F.pad(conv(x), (1, 0, 1, 0, 1, 0))`` for MedNeXt's depthwise up-convolution (k3, stride 2, padding 1,
    groups = channels): (B, C, n, n, n) -> (B, C, 2n, 2n, 2n), a view of channels-last memory. On the CPU
    computed by :class:`_DepthwiseUp2`: oneDNN's grouped transposed conv and the pad's copy took ~2 s of a
    4 s decoder block (64^3, batch 2, 2 threads, AMD EPYC); elsewhere the native op."""
    if x.device.type != "cpu" or conv.kernel_size != (3, 3, 3) or conv.stride != (2, 2, 2) \
            or conv.padding != (1, 1, 1) or conv.output_padding != (0, 0, 0) or conv.groups != conv.in_channels \
            or conv.in_channels != conv.out_channels or torch.is_autocast_enabled("cpu"):
        return F.pad(conv(x), (1, 0, 1, 0, 1, 0))
    y = _DepthwiseUp2.apply(x.permute(0, 2, 3, 4, 1), conv.weight, conv.bias)
    return y.permute(0, 4, 1, 2, 3)
