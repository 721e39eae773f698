"""The fine-tuning speed row, and that every speed-up of the CNN blocks computes the same function.

Each optimised block is compared with its previous formulation (kept here as the reference): same
parameters -> same outputs and the same gradients for inputs and parameters, within float tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.layers.blocks import MedNeXtBlock, MedNeXtUpBlock
from nnunet_hyspark.layers.depthwise import depthwise_conv3d, depthwise_up2
from nnunet_hyspark.methods.hyspark.network import HySparKUNet

TINY = dict(widths=(8, 16, 16, 24, 48), depths=(1, 1, 2, 1, 1), expansions=(2, 2, 4, 2, 2), vit_depth=1,
            vit_heads=2)


class ReferenceMedNeXtBlock(MedNeXtBlock):
    """The formulation before the speed-up: nn.Conv3d depthwise, permute-based LayerNorm, 1x1 convs."""

    def forward(self, x):
        return x + self.conv3(self.act(self.conv2(self.norm(self.conv1(x)))))


def _pad_low_end(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 1, 0, 1, 0))


class ReferenceMedNeXtUpBlock(MedNeXtUpBlock):
    """Native transposed convs, padded, summed (before depthwise_up2 and add_up_residual)."""

    def forward(self, x):
        y = self.conv3(self.act(self.conv2(self.norm(_pad_low_end(self.conv1(x))))))
        return y + _pad_low_end(self.res_conv(x))


class ReferenceHySparKUNet(HySparKUNet):
    """Maps in contiguous (channels-first) memory throughout, as before."""

    def forward(self, x):
        return self.decoder(self.encoder(x))


def as_reference(net: nn.Module) -> nn.Module:
    """The same modules (shared parameters) running the previous formulation."""
    for m in net.modules():
        if type(m) is HySparKUNet:
            m.__class__ = ReferenceHySparKUNet
        elif type(m) is MedNeXtBlock:
            m.__class__ = ReferenceMedNeXtBlock
        elif type(m) is MedNeXtUpBlock:
            m.__class__ = ReferenceMedNeXtUpBlock
    return net


def _grads(module: nn.Module, x: torch.Tensor, fn, seed: int = 0):
    """Output, input gradient and parameter gradients of ``fn(x)`` under a fixed random upstream gradient."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16 outputs: weigh them in fp32
    sum(((o.to(dtype) * torch.randn(o.shape, generator=gen, dtype=dtype)).sum() for o in outs)).backward()
    params = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], x.grad.clone(), params


def _assert_same(a, b, rtol=1e-4, atol=1e-5):
    (oa, ga, pa), (ob, gb, pb) = a, b
    for u, v in zip(oa, ob):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)
    assert pa.keys() == pb.keys() and len(pa) > 0
    # absolute tolerance on the scale of all parameter gradients: some are zero in exact arithmetic (the bias
    # of a conv before InstanceNorm) and hold only rounding noise, which a per-tensor scale would magnify
    scale = max(1.0, max(g.abs().max().item() for g in pb.values()))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=10 * atol * scale, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kernel,bias", [(3, True), (5, True), (3, False)])
def test_depthwise_conv3d_matches_native(kernel, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 6, kernel, padding=kernel // 2, groups=6, bias=bias)
    x = torch.randn(2, 6, 7, 6, 5)
    _assert_same(_grads(conv, x, lambda t: depthwise_conv3d(t, conv)), _grads(conv, x, conv))


@pytest.mark.parametrize("kernel,channels_last", [(3, True), (5, False)])
def test_depthwise_conv3d_on_pre_padded_input_matches_native_valid_conv(kernel, channels_last):
    """The blocks backend's cells arrive with their halo: the fast path then runs with padding 0."""
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 5, kernel, padding=kernel // 2, groups=5).double()
    x = torch.randn(3, 5, 4 + kernel, 3 + kernel, 5 + kernel, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fast = _grads(conv, x, lambda t: depthwise_conv3d(t, conv, pre_padded=True))
    native = _grads(conv, x, lambda t: F.conv3d(t, conv.weight, conv.bias, groups=5))
    assert fast[0][0].shape == (3, 5, 5, 4, 6)  # the valid conv: each axis shrinks by kernel - 1
    _assert_same(fast, native, rtol=1e-10, atol=1e-12)


def test_depthwise_conv3d_under_bf16_autocast_stays_within_bf16_tolerance():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(2, 4, 8, 8, 8)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(conv, x, fn)

    fast, native = run(lambda t: depthwise_conv3d(t, conv)), run(conv)
    assert fast[0][0].dtype == native[0][0].dtype == torch.bfloat16
    assert fast[2]["weight"].dtype == torch.float32
    _assert_same(fast, native, rtol=5e-2, atol=5e-2)


def test_depthwise_conv3d_falls_back_where_the_fast_path_does_not_apply():
    conv = nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=4)
    x = torch.randn(1, 4, 8, 8, 8)
    _assert_same(_grads(conv, x, lambda t: depthwise_conv3d(t, conv)), _grads(conv, x, conv))


@pytest.mark.parametrize("shape,bias,channels_last", [((2, 5, 4, 3, 5), True, False), ((1, 3, 2, 2, 1), False, True),
                                                     ((2, 4, 1, 3, 2), True, True)])
def test_depthwise_up2_matches_native_transposed_conv_then_pad(shape, bias, channels_last):
    torch.manual_seed(0)
    c = shape[1]
    conv = nn.ConvTranspose3d(c, c, 3, stride=2, padding=1, groups=c, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fast = _grads(conv, x, lambda t: depthwise_up2(t, conv))
    native = _grads(conv, x, lambda t: _pad_low_end(conv(t)))
    assert fast[0][0].shape == (shape[0], c, *(2 * n for n in shape[2:]))
    _assert_same(fast, native, rtol=1e-10, atol=1e-12)


def test_depthwise_up2_falls_back_where_it_does_not_apply():
    conv = nn.ConvTranspose3d(4, 4, 2, stride=2, groups=4)  # not the k3, padding-1 up-convolution
    x = torch.randn(1, 4, 3, 3, 3)
    _assert_same(_grads(conv, x, lambda t: depthwise_up2(t, conv)), _grads(conv, x, lambda t: _pad_low_end(conv(t))))


@pytest.mark.parametrize("channels,expansion", [(8, 2), (12, 4)])
def test_mednext_block_matches_previous_formulation(channels, expansion):
    torch.manual_seed(0)
    block = MedNeXtBlock(channels, expansion)
    x = torch.randn(2, channels, 6, 5, 4)
    new = _grads(block, x, block)
    ref = _grads(block, x, as_reference(block))
    assert type(block) is ReferenceMedNeXtBlock
    _assert_same(new, ref)


def test_mednext_up_block_matches_previous_formulation():
    torch.manual_seed(0)
    block = MedNeXtUpBlock(8, 4)
    for p in block.parameters():  # non-zero biases, so that the bias of every path counts
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 8, 3, 4, 3)
    new = _grads(block, x, block)
    y = block(x)
    assert y.shape == (2, 4, 6, 8, 6)
    _assert_same(new, _grads(block, x, as_reference(block)))


def test_hyspark_unet_matches_previous_formulation_outputs_and_gradients():
    """In float64. Why not float32: the encoder max-pools, and the argmax of a window is discontinuous. With
    this seed one window's two largest values differ by 4e-7; float32 rounding (~1e-6, and different on AVX2
    and AVX-512 kernels) picks the other voxel in one formulation, and that voxel's gradient then differs by
    O(1) through every convolution below it. float64 compares the two functions, not the rounding."""
    torch.manual_seed(0)
    net = HySparKUNet(1, 3, patch_size=(32, 32, 32), **TINY).double()
    keys = {k: v.shape for k, v in net.state_dict().items()}
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    new = _grads(net, x, net)
    ref = _grads(net, x, as_reference(net))
    assert len(new[0]) == 4  # deep supervision: every output compared
    assert type(net) is ReferenceHySparKUNet
    _assert_same(new, ref, rtol=1e-9, atol=1e-11)
    assert {k: v.shape for k, v in net.state_dict().items()} == keys


def test_hyspark_unet_float32_outputs_match_previous_formulation():
    """The float32 kernels (oneDNN, channels-last memory) on the forward pass, where no argmax can flip a
    gradient's route."""
    torch.manual_seed(0)
    net = HySparKUNet(1, 3, patch_size=(32, 32, 32), **TINY)
    x = torch.randn(2, 1, 32, 32, 32)
    # with autograd on, as in training: the fast paths apply only then (no backward is needed here)
    new = [o.detach() for o in net(x.clone().requires_grad_())]
    ref = [o.detach() for o in as_reference(net)(x.clone().requires_grad_())]
    assert len(new) == len(ref) > 1  # every deep-supervision output
    for u, v in zip(new, ref):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_inference_mode_uses_the_native_path_and_same_numbers():
    torch.manual_seed(0)
    net = HySparKUNet(1, 2, patch_size=(16, 16, 16), deep_supervision=False, **TINY).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        fast = net(x)
        ref = as_reference(net)(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_presets_are_the_planners():
    from nnunet_hyspark.benchmark.speed_finetune import HYSPARK_PRESETS
    from nnunet_hyspark.planners.hyspark_planner import ARCH_PRESETS

    assert HYSPARK_PRESETS == ARCH_PRESETS


def test_finetune_rows_time_both_networks_at_a_tiny_patch():
    from nnunet_hyspark.benchmark.speed_finetune import (NNUNET_LABEL, FinetuneSpeedOptions, finetune_markdown,
                                                         finetune_rows)

    rows = finetune_rows(FinetuneSpeedOptions(patch=(32, 32, 32), batch=1, widths="tiny", steps=1, warmup=0,
                                              threads=1))
    assert [r["network"] for r in rows] == [NNUNET_LABEL, "HySparKUNet"]
    assert rows[0]["class"].endswith("PlainConvUNet") and rows[1]["class"].endswith("HySparKUNet")
    assert rows[0]["ratio_vs_nnunet"] == 1.0
    for r in rows:
        assert r["params"] > 0 and r["median_s"] > 0 and len(r["times_s"]) == 1 and r["threads"] == 1
    assert rows[1]["ratio_vs_nnunet"] == pytest.approx(rows[1]["median_s"] / rows[0]["median_s"])
    # FLOPs of one step: at least the forward pass's convolutions, whose count is known in closed form
    first_conv = 2 * 32 ** 3 * 27 * 1 * 32 / 1e9  # PlainConvUNet's stem: 1 -> 32 channels, 3x3x3, at 32^3
    assert rows[0]["gflop"] > first_conv and rows[1]["gflop"] > 0
    assert rows[1]["flop_ratio_vs_nnunet"] == pytest.approx(rows[1]["gflop"] / rows[0]["gflop"])
    table = finetune_markdown(rows)
    assert "HySparKUNet" in table and "PlainConvUNet" in table
    assert f"| {rows[1]['flop_ratio_vs_nnunet']:.2f}x |" in table


def test_nnunet_architecture_comes_from_nnunets_planner():
    from nnunet_hyspark.benchmark.speed_finetune import nnunet_default_architecture

    arch = nnunet_default_architecture((64, 64, 64))
    kw = arch["arch_kwargs"]
    assert arch["network_class_name"].endswith("PlainConvUNet")
    assert kw["n_stages"] == 5 and kw["features_per_stage"] == [32, 64, 128, 256, 320]
    anisotropic = nnunet_default_architecture((16, 64, 64), spacing=(4.0, 1.0, 1.0))["arch_kwargs"]
    assert anisotropic["kernel_sizes"][0] == [1, 3, 3]  # nnU-Net's rule for thick slices, not ours


def test_channels_last_option_changes_no_numbers():
    torch.manual_seed(0)
    net = HySparKUNet(1, 2, patch_size=(16, 16, 16), **TINY)
    x = torch.randn(2, 1, 16, 16, 16)
    fast = _grads(net.encoder, x, lambda t: net.encoder(t, channels_last=True))
    plain = _grads(net.encoder, x, lambda t: net.encoder(t))
    _assert_same(fast, plain)
