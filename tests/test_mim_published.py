"""MiM against its published code: the published checkpoint layout converts (report, nnU-Net's loader, where
tensors land) and loads into the pre-training model, the normalisation eps and the fine-tuning backbone's
layer-scale / stochastic depth / fifth stage, replayable sampling, and the probe's encoder features."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.methods import METHODS, method_for_published
from nnunet_hyspark.methods.mim.backbone import drop_path
from nnunet_hyspark.methods.mim.model import MiM, MiMBackbone
from nnunet_hyspark.methods.mim.network import MiMUNet
from nnunet_hyspark.methods.mim.published import convert_published, load_published_pretraining
from nnunet_hyspark.safe_load import load_user_file
from nnunet_hyspark.weights import load_weights_file, save_weights_file

ARCH = dict(widths=(8, 8, 16, 24), conv_depths=(2, 1, 1), vit_depth=2, vit_heads=2)
DECODER = dict(decoder_width=24, decoder_depth=2, decoder_heads=2)
HEADS = ("aggregate_mid", "aggregate_down", "aggregate_pred_up_feature", "aggregate_pred_mid_feature")


def published_shapes(in_channels=1, widths=(48, 96, 192, 384), conv_depths=(2, 2, 2), vit_depth=11,
                     decoder_width=576, decoder_depth=8, grid_tokens=216, mlp_ratio=4):
    """(name, shape) of every tensor of MiM's published pre-training state dict, in its order (with the
    defaults: the paper's model, 363 entries)."""
    d, w = widths[3], decoder_width
    out = [("pos_embed", (1, grid_tokens, d)), ("mask_token", (1, 1, w)), ("decoder_pos_embed", (1, grid_tokens, w))]
    ins = (in_channels, *widths[:3])
    for i in range(4):
        out += [(f"patch_embed{i + 1}.proj.weight", (widths[i], ins[i], 2, 2, 2)),
                (f"patch_embed{i + 1}.proj.bias", (widths[i],)),
                (f"patch_embed{i + 1}.norm.weight", (widths[i],)), (f"patch_embed{i + 1}.norm.bias", (widths[i],))]
    out += [("patch_embed5.weight", (d, d)), ("patch_embed5.bias", (d,))]
    for i in range(3):
        k = 8 >> i
        out += [(f"stage{i + 1}_output_decode.weight", (d, widths[i], k, k, k)),
                (f"stage{i + 1}_output_decode.bias", (d,))]
    for i in range(3):
        c, h = widths[i], widths[i] * mlp_ratio
        for j in range(conv_depths[i]):
            p = f"blocks{i + 1}.{j}."
            out += [(p + "norm1.weight", (c,)), (p + "norm1.bias", (c,)), (p + "conv1.weight", (c, c, 1, 1, 1)),
                    (p + "conv1.bias", (c,)), (p + "conv2.weight", (c, c, 1, 1, 1)), (p + "conv2.bias", (c,)),
                    (p + "attn.weight", (c, 1, 5, 5, 5)), (p + "attn.bias", (c,)), (p + "norm2.weight", (c,)),
                    (p + "norm2.bias", (c,)), (p + "mlp.fc1.weight", (h, c, 1, 1, 1)), (p + "mlp.fc1.bias", (h,)),
                    (p + "mlp.fc2.weight", (c, h, 1, 1, 1)), (p + "mlp.fc2.bias", (c,))]
    out += _vit("blocks4", vit_depth, d, mlp_ratio)
    out += [("norm.weight", (d,)), ("norm.bias", (d,)), ("decoder_embed.weight", (w, d)), ("decoder_embed.bias", (w,))]
    out += _vit("decoder_blocks", decoder_depth, w, mlp_ratio)
    out += [("decoder_norm.weight", (w,)), ("decoder_norm.bias", (w,)),
            ("decoder_pred.weight", (16 ** 3 * in_channels, w)), ("decoder_pred.bias", (16 ** 3 * in_channels,))]
    for head in HEADS:
        out += [(f"{head}.fc1.weight", (w, w)), (f"{head}.fc1.bias", (w,)), (f"{head}.fc2.weight", (w, w)),
                (f"{head}.fc2.bias", (w,))]
    return out


def _vit(prefix, n, dim, r):
    out = []
    for j in range(n):
        p = f"{prefix}.{j}."
        out += [(p + "norm1.weight", (dim,)), (p + "norm1.bias", (dim,)), (p + "attn.qkv.weight", (3 * dim, dim)),
                (p + "attn.qkv.bias", (3 * dim,)), (p + "attn.proj.weight", (dim, dim)), (p + "attn.proj.bias", (dim,)),
                (p + "norm2.weight", (dim,)), (p + "norm2.bias", (dim,)), (p + "mlp.fc1.weight", (r * dim, dim)),
                (p + "mlp.fc1.bias", (r * dim,)), (p + "mlp.fc2.weight", (dim, r * dim)), (p + "mlp.fc2.bias", (dim,))]
    return out


def published_state(seed=0, grid=(4, 4, 4), **kw) -> dict:
    """A tiny published-layout state dict with random values (positions: the sin-cos tables)."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    shapes = published_shapes(widths=ARCH["widths"], conv_depths=ARCH["conv_depths"], vit_depth=ARCH["vit_depth"],
                              decoder_width=DECODER["decoder_width"], decoder_depth=DECODER["decoder_depth"],
                              grid_tokens=n, **kw)
    sd = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes}
    sd["pos_embed"] = sincos_3d(ARCH["widths"][3], grid)[None]
    sd["decoder_pos_embed"] = sincos_3d(DECODER["decoder_width"], grid)[None]
    return sd


def published_file(tmp_path, sd) -> dict:
    """The published checkpoint as saved by its training script and read back by our safe loader."""
    path = tmp_path / "checkpoint-final.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 799, "scaler": {"scale": 1.0},
                "args": argparse.Namespace(mask_ratio=0.5, input_size=96, norm_pix_loss=True)}, path)
    return load_user_file(path, "checkpoint")


def tiny_model(in_channels=1) -> MiM:
    torch.manual_seed(1)
    return MiM(MiMBackbone(in_channels, **ARCH), **DECODER)


def n_backbone(sd) -> int:
    return sum(k.startswith(("patch_embed", "blocks", "norm.")) for k in sd)


# ------------------------------------------------------------------------------------------------ conversion


def test_published_checkpoint_converts_with_a_full_report_and_loads_through_nnunet(tmp_path):
    sd = published_state()
    obj = published_file(tmp_path, sd)
    assert method_for_published(obj["model"]) is METHODS["mim"]
    weights, meta, report = convert_published(obj, vit_heads=2, source="checkpoint-final.pth")
    n_pos = 2
    assert len(report["loaded"]) == n_backbone(sd)
    assert len(report["loaded"]) + len(report["ignored"]) == len(sd)  # every published key accounted for
    assert len(report["ignored"]) == len(sd) - n_backbone(sd)
    assert n_pos == sum("sin-cos" in r for r in report["ignored"])
    assert all("identical to ours" in r for r in report["ignored"] if "sin-cos" in r)
    assert len(report["missing"]) == 2 * ARCH["vit_depth"] and all("gamma" in m for m in report["missing"])
    assert sum("alignment head" in r for r in report["ignored"]) == 16
    assert meta["architecture"] == {"in_channels": 1, "widths": [8, 8, 16, 24], "conv_depths": [2, 1, 1],
                                    "vit_depth": 2, "vit_heads": 2, "vit_mlp_ratio": 4.0}
    assert meta["plans_check"] == "warn" and meta["mim"]["epoch"] == 799
    assert meta["mim"]["published_args"]["input_size"] == 96 and meta["mim"]["decoder_width"] == 24

    path = save_weights_file(weights, meta, tmp_path / "mim_converted.pth")
    net = MiMUNet(1, 3, patch_size=(64, 32, 32), **ARCH)
    load_pretrained_weights(net, str(path))  # nnU-Net's own loader: every non-head key present, same shape
    enc = net.encoder
    # marked tensors land on the modules that use them where the published code uses them
    assert torch.equal(enc.stages[0][0].dw.weight, sd["blocks1.0.attn.weight"])  # the depthwise 5^3 conv
    assert torch.equal(enc.stages[0][1].pw1.weight, sd["blocks1.1.conv1.weight"])  # before the mask
    assert torch.equal(enc.stages[2][0].mlp[2].bias, sd["blocks3.0.mlp.fc2.bias"])
    assert torch.equal(enc.downs[3].norm.weight, sd["patch_embed4.norm.weight"])
    assert torch.equal(enc.token_linear.weight, sd["patch_embed5.weight"])
    assert torch.equal(enc.blocks[1].attn.qkv.weight, sd["blocks4.1.attn.qkv.weight"])
    assert torch.equal(enc.norm.bias, sd["norm.bias"])
    assert all(torch.equal(b.gamma_1, torch.ones(24)) and torch.equal(b.gamma_2, torch.ones(24)) for b in enc.blocks)
    assert torch.equal(net.stage5[1].running_var, torch.ones(48))  # the fifth stage's BatchNorm at its init


def test_the_converter_command_recognises_the_published_file(tmp_path, capsys):
    from nnunet_hyspark.cli.convert_checkpoint import main as convert_main

    sd = published_state()
    published_file(tmp_path, sd)  # writes checkpoint-final.pth as the training script saves it
    out = tmp_path / "mim.pth"
    convert_main([str(tmp_path / "checkpoint-final.pth"), str(out), "--vit-heads", "2"])
    printed = capsys.readouterr().out
    assert f"loaded {n_backbone(sd)} " in printed and f"ignored {len(sd) - n_backbone(sd)}" in printed
    assert "missing 4" in printed and "encoder.blocks.1.gamma_2" in printed
    _, meta = load_weights_file(out)
    assert meta["method"] == "mim" and meta["network_class_name"].endswith("MiMUNet")
    load_pretrained_weights(MiMUNet(1, 2, **ARCH), str(out))


def test_converted_backbone_computes_what_the_published_conv_stages_compute(tmp_path):
    """The published ConvMAE stages written out with the published tensors (LayerNorm eps 1e-5): patch
    embedding = conv k2 s2, LayerNorm over channels, GELU; conv block = x + conv2(attn(conv1(LN x))),
    x + fc2(GELU(fc1(LN x))); tokens = patch_embed5(patch_embed4(...)). Ours, converted, gives the same."""
    sd = published_state(seed=3)
    weights, _, _ = convert_published(published_file(tmp_path, sd), vit_heads=2)
    net = MiMUNet(1, 2, **ARCH)
    net.load_state_dict({**net.state_dict(), **weights})
    x = torch.randn(1, 1, 32, 32, 64)

    def ln(t, p):  # LayerNorm over channels of a (B, C, ...) map, as the published code permutes and norms
        return F.layer_norm(t.movedim(1, -1), t.shape[1:2], sd[p + ".weight"], sd[p + ".bias"], 1e-5).movedim(-1, 1)

    def conv(t, p, **kw):
        return F.conv3d(t, sd[p + ".weight"], sd[p + ".bias"], **kw)

    h = x
    for i, depth in enumerate(ARCH["conv_depths"]):
        h = F.gelu(ln(conv(h, f"patch_embed{i + 1}.proj", stride=2), f"patch_embed{i + 1}.norm"))
        for j in range(depth):
            p = f"blocks{i + 1}.{j}"
            dw = conv(conv(ln(h, p + ".norm1"), p + ".conv1"), p + ".attn", padding=2, groups=h.shape[1])
            h = h + conv(dw, p + ".conv2")
            h = h + conv(F.gelu(conv(ln(h, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
    t = F.gelu(ln(conv(h, "patch_embed4.proj", stride=2), "patch_embed4.norm")).flatten(2).transpose(1, 2)
    tokens = F.linear(t, sd["patch_embed5.weight"], sd["patch_embed5.bias"]) + sincos_3d(24, (2, 2, 4))[None]
    with torch.no_grad():
        ours = net.encoder.embed_tokens(net.encoder.conv_stages(x)[2])
    assert torch.allclose(ours, tokens, atol=1e-5)


def test_conversion_adapts_channels_and_refuses_incomplete_or_foreign_files(tmp_path):
    sd = published_state()
    weights, meta, report = convert_published({"model": sd}, vit_heads=2, in_channels=3)
    assert meta["architecture"]["in_channels"] == 3 and any("repeated over 3" in r for r in report["loaded"])
    stem = sd["patch_embed1.proj.weight"]
    assert torch.allclose(weights["encoder.downs.0.conv.weight"], stem.repeat(1, 3, 1, 1, 1) / 3)
    net = MiMUNet(3, 2, **ARCH)
    path = save_weights_file(weights, meta, tmp_path / "w3.pth")
    load_pretrained_weights(net, str(path))
    broken = {k: v for k, v in sd.items() if k != "blocks4.1.norm2.bias"}
    with pytest.raises(HySparKError, match="blocks.1.norm2.bias"):
        convert_published({"model": broken}, vit_heads=2)
    with pytest.raises(HySparKError, match="--vit-heads"):
        convert_published({"model": sd}, vit_heads=5)
    assert method_for_published({"embeddings.stem.weight": torch.zeros(1)}) is not METHODS["mim"]
    # a MiMUNet file of an earlier version (no layer-scale tensors) is completed when its channels are adapted
    older = {k: v for k, v in weights.items() if "gamma" not in k}
    w3, _ = METHODS["mim"].network.adapt_channels(older, meta, 3)
    assert torch.equal(w3["encoder.blocks.1.gamma_2"], torch.ones(24))
    assert torch.equal(w3["encoder.blocks.1.attn.qkv.weight"], weights["encoder.blocks.1.attn.qkv.weight"])


# ------------------------------------------------------------------------------------------------ pre-training


def test_published_checkpoint_loads_into_the_pretraining_model_and_replays_exactly(tmp_path):
    sd = published_state(seed=5)
    model = tiny_model()
    report = load_published_pretraining(model, published_file(tmp_path, sd))
    assert len(report["loaded"]) == len(sd) - 2 == len(model.state_dict())
    assert report["missing"] == [] and len(report["ignored"]) == 2
    assert torch.equal(model.aggregate_down.fc1.weight, sd["aggregate_down.fc1.weight"])
    assert torch.equal(model.fusion[1].weight, sd["stage2_output_decode.weight"])
    assert torch.equal(model.mask_token, sd["mask_token"])
    crops = torch.randn(2, 1, 64, 64, 128)
    with torch.no_grad():
        first = model(crops, torch.Generator().manual_seed(0))
        again = model(crops, sampling=first["levels"]["sampling"])  # the same draws, from outside
        other = model(crops, torch.Generator().manual_seed(1))
    for k in ("loss", "loss_coarse", "loss_middle", "loss_fine", "align_coarse_middle", "align_middle_fine"):
        assert torch.equal(first[k], again[k]), k
    assert not torch.equal(first["loss"], other["loss"])
    # a second model loaded from the same file computes the same numbers for the same sampling
    twin = MiM(MiMBackbone(1, **ARCH), **DECODER)
    load_published_pretraining(twin, {"model": {f"module.{k}": v for k, v in sd.items()}})
    with torch.no_grad():
        assert torch.equal(twin(crops, sampling=first["levels"]["sampling"])["loss"], first["loss"])
    with pytest.raises(HySparKError, match="do not fill|does not fill"):
        load_published_pretraining(MiM(MiMBackbone(1, **ARCH), decoder_width=36, decoder_depth=2), sd)


def test_init_from_takes_a_published_checkpoint_or_our_own_file(tmp_path, capsys):
    """``hyspark_pretrain --init-from``: a published MiM checkpoint fills the whole pre-training model; one of our
    MiMUNet files fills its backbone (its layer-scale tensors have no place in pre-training)."""
    from nnunet_hyspark.methods.mim.weights import export_mim_weights
    from nnunet_hyspark.pretraining.model_setup import init_encoder

    sd = published_state(seed=7)
    published_file(tmp_path, sd)
    info = {"spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"]}
    model = tiny_model()
    init_encoder(model, str(tmp_path / "checkpoint-final.pth"), info, METHODS["mim"])
    assert f"loaded {len(sd) - 2} tensors, ignored 2, missing 0" in capsys.readouterr().out
    assert torch.equal(model.decoder_pred.weight, sd["decoder_pred.weight"])
    own = export_mim_weights(model.encoder, {}, {"method": "mim"}, tmp_path / "encoder_weights.pth")
    fresh = tiny_model()
    init_encoder(fresh, str(own), info, METHODS["mim"])
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[k], v), k


def test_sampling_from_outside_is_checked_and_used_as_given():
    model = tiny_model()
    crops = torch.randn(1, 1, 64, 64, 64)
    s = model.draw_sampling(1, (2, 2, 2), torch.Generator().manual_seed(0))
    levels = model.make_levels(crops, sampling=s)
    assert levels["coarse"]["mask"].flatten(1).nonzero()[:, 1].tolist() == sorted(s.coarse_keep[0].tolist())
    assert torch.equal(levels["octants"], s.octants) and torch.equal(levels["cells"], s.cells)
    bad = type(s)(s.coarse_keep, s.octants + 8, s.middle_keep, s.cells, s.fine_keep)
    with pytest.raises(ValueError, match="octants"):
        model.make_levels(crops, sampling=bad)


def test_alignment_heads_are_the_published_mlps_and_the_targets_are_fixed():
    model = tiny_model()
    for name in HEADS:
        head = getattr(model, name)
        assert head.fc1.weight.shape == head.fc2.weight.shape == (24, 24)
    assert not any(p.requires_grad for n in ("aggregate_down", "aggregate_mid") for p in getattr(model, n).parameters())
    out = model(torch.randn(1, 1, 64, 64, 64), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert model.aggregate_pred_mid_feature.fc1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ backbones


def test_layer_norm_eps_as_published():
    net = MiMUNet(1, 2, **ARCH)
    enc = net.encoder
    assert {m.norm.eps for m in enc.downs} == {1e-5}
    assert {b.norm1.eps for s in enc.stages for b in s} == {b.norm2.eps for s in enc.stages for b in s} == {1e-5}
    assert {b.norm1.eps for b in enc.blocks} == {b.norm2.eps for b in enc.blocks} == {enc.norm.eps} == {1e-6}
    model = tiny_model()
    assert {b.norm1.eps for b in model.decoder_blocks} == {model.decoder_norm.eps} == {1e-6}


def test_finetune_backbone_has_layer_scale_stochastic_depth_and_a_batchnorm_fifth_stage():
    net = MiMUNet(1, 2, **{**ARCH, "vit_depth": 3})
    assert [b.drop_path_rate for b in net.encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert all(b.gamma_1 is not None and b.gamma_2 is not None for b in net.encoder.blocks)
    assert [type(m).__name__ for m in net.stage5] == ["Conv3d", "BatchNorm3d", "GELU"]
    assert tiny_model().encoder.blocks[0].gamma_1 is None  # pre-training: no layer-scale, no stochastic depth
    x = torch.ones(1000, 4)
    dropped = drop_path(x, 0.25, training=True)
    assert set(dropped[:, 0].unique().tolist()) <= {0.0, torch.tensor(4 / 3).item()} and abs(dropped.mean() - 1) < 0.1
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    net.eval()
    y = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(y)[0], net(y)[0])  # no stochastic depth at inference


def test_encoder_features_for_the_probe():
    feats = METHODS["mim"].encoder_features(tiny_model().eval(), torch.randn(2, 1, 32, 64, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 32, 16), (2, 8, 8, 16, 8), (2, 16, 4, 8, 4),
                                               (2, 24, 2, 4, 2)]
