"""Hi-End-MAE as published: checkpoints in the published layout (tiny widths) convert and load, the model
replays a given sampling, and it computes what the published code computes (no norm on the cross-attention
memory, layer-norm targets, a UNETR of feature size 32 without class token)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.mae import patchify
from nnunet_hyspark.masking import kept_token_indices
from nnunet_hyspark.methods import METHODS, method_for_published
from nnunet_hyspark.methods.hiend_mae import published
from nnunet_hyspark.methods.hiend_mae.encoder import ViTEncoder
from nnunet_hyspark.methods.hiend_mae.memory import count_parameters
from nnunet_hyspark.methods.hiend_mae.model import HiEndMAE
from nnunet_hyspark.methods.hiend_mae.network import HiEndUNETR
from nnunet_hyspark.weights import load_weights_file, transfer_report

SPEC = METHODS["hiend_mae"]
# the published depth (12 blocks, taps 4 / 7 / 10) at tiny widths; 12^3 voxels per token as published
VIT = dict(embed_dim=12, depth=12, num_heads=2, mlp_ratio=4.0, taps=(4, 7, 10))
PATCH, DEC_WIDTH, DEC_HEADS = 12, 6, 2
SHAPE = (24, 24, 36)  # a 2 x 2 x 3 token grid
PUBLISHED_ENTRIES = 248  # entries of the published ViT-B / ViT-L state dicts (12 blocks)
ENCODER_LOADED = 2 + 12 * 12 + 2  # patch embedding, 12 blocks of 12 tensors, final norm


# ------------------------------------------------------------------------------------------ the published layout


def _block(prefix: str, d: int, hidden: int) -> dict[str, tuple]:
    return {f"{prefix}norm1.weight": (d,), f"{prefix}norm1.bias": (d,), f"{prefix}attn.qkv.weight": (3 * d, d),
            f"{prefix}attn.qkv.bias": (3 * d,), f"{prefix}attn.proj.weight": (d, d), f"{prefix}attn.proj.bias": (d,),
            f"{prefix}norm2.weight": (d,), f"{prefix}norm2.bias": (d,), f"{prefix}mlp.fc1.weight": (hidden, d),
            f"{prefix}mlp.fc1.bias": (hidden,), f"{prefix}mlp.fc2.weight": (d, hidden), f"{prefix}mlp.fc2.bias": (d,)}


def _cross_block(prefix: str, w: int) -> dict[str, tuple]:
    shapes = {"norm0.weight": (w,), "norm0.bias": (w,), "self_attn.qkv.weight": (3 * w, w),
              "self_attn.qkv.bias": (3 * w,), "self_attn.proj.weight": (w, w), "self_attn.proj.bias": (w,),
              "norm1.weight": (w,), "norm1.bias": (w,), "cross_attn.q.weight": (w, w), "cross_attn.q.bias": (w,),
              "cross_attn.kv.weight": (2 * w, w), "cross_attn.kv.bias": (2 * w,), "cross_attn.proj.weight": (w, w),
              "cross_attn.proj.bias": (w,), "norm2.weight": (w,), "norm2.bias": (w,), "mlp.fc1.weight": (4 * w, w),
              "mlp.fc1.bias": (4 * w,), "mlp.fc2.weight": (w, 4 * w), "mlp.fc2.bias": (w,)}
    return {prefix + k: v for k, v in shapes.items()}


def published_shapes(d: int = 12, depth: int = 12, w: int = DEC_WIDTH, patch: int = PATCH, side: int = 8,
                     channels: int = 1) -> dict[str, tuple]:
    """The published pre-training model's state-dict names and shapes (its ``state_dict()`` order)."""
    n = side ** 3
    shapes = {"mask_token": (1, 1, w), "encoder_pos_embed": (1, n, d), "decoder_pos_embed": (1, n, w),
              "encoder.cls_token": (1, 1, d), "encoder.patch_embed.proj.weight": (d, channels, patch, patch, patch),
              "encoder.patch_embed.proj.bias": (d,)}
    for i in range(depth):
        shapes.update(_block(f"encoder.blocks.{i}.", d, 4 * d))
    shapes.update({"encoder.norm.weight": (d,), "encoder.norm.bias": (d,)})
    for i in range(2):
        shapes.update(_block(f"decoder.blocks.{i}.", w, 4 * w))
    for j in range(3):
        shapes.update(_cross_block(f"decoder.cross_attention_blocks.{j}.", w))
    shapes.update({"decoder.norm.weight": (w,), "decoder.norm.bias": (w,),
                   "decoder.head.weight": (patch ** 3 * channels, w), "decoder.head.bias": (patch ** 3 * channels,)})
    for i in range(4):
        shapes.update({f"encoder_to_decoder.{i}.weight": (w, d), f"encoder_to_decoder.{i}.bias": (w,)})
    return shapes


def published_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """Random tensors in the published layout; the position tables are the published fixed sin-cos ones."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.2 * torch.randn(s, generator=g) for k, s in published_shapes(**kw).items()}
    for key in published.POSITION_KEYS:
        n, width = sd[key].shape[1:]
        sd[key] = sincos_3d(width, (round(n ** (1 / 3)),) * 3)[None]
    for k in sd:  # norms near identity, as after training
        if ".norm" in k and k.endswith(".weight"):
            sd[k] = 1.0 + sd[k]
    return sd


def checkpoint(sd: dict) -> dict:
    """How the published training script saves: DDP keys, optimizer and scaler state."""
    return {"epoch": 200, "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, "params": [0]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0}}


def test_the_layout_has_the_published_entry_count():
    assert len(published_shapes()) == PUBLISHED_ENTRIES
    assert len(published_shapes(d=768, w=384)) == PUBLISHED_ENTRIES


# ------------------------------------------------------------------------------------------ recognising, architecture


def test_recognised_wrapped_or_bare_and_nothing_else():
    sd = published_state()
    assert published.recognise_published(checkpoint(sd)) and published.recognise_published(sd)
    assert method_for_published(checkpoint(sd)) is SPEC
    hyspark_like = {"embeddings.stem.weight": torch.zeros(8, 1, 3, 3, 3), "mae.pos_embed": torch.zeros(1, 8, 24)}
    assert not published.recognise_published(hyspark_like)
    assert not published.recognise_published({"network_weights": {}, "hyspark_meta": {}})
    assert not published.recognise_published([1, 2])


def test_architecture_from_shapes_and_heads_of_the_published_widths():
    base = {k: torch.empty(s, device="meta") for k, s in published_shapes(d=768, w=384).items()}
    arch = published.infer_architecture(base)
    assert arch == {"vit_patch": 12, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                    "taps": [4, 7, 10], "in_channels": 1}
    large = {k: torch.empty(s, device="meta") for k, s in published_shapes(d=1536, w=528).items()}
    assert published.infer_architecture(large)["num_heads"] == 16
    p16 = {k: torch.empty(s, device="meta") for k, s in published_shapes(d=768, w=384, patch=16, side=6).items()}
    assert published.infer_architecture(p16)["vit_patch"] == 16
    with pytest.raises(HySparKError, match="--vit-heads"):  # a width the published code never used
        published.infer_architecture(published_state())
    assert published.infer_architecture(published_state(), vit_heads=2)["num_heads"] == 2


# ------------------------------------------------------------------------------------------ conversion for fine-tuning


def test_convert_report_counts_and_reasons():
    _, meta, report = published.convert_published(checkpoint(published_state()), vit_heads=2, source="x.pth")
    assert (len(report["loaded"]), len(report["ignored"]), len(report["missing"])) == \
        (ENCODER_LOADED, PUBLISHED_ENTRIES - ENCODER_LOADED, 0)
    assert not report["shape_mismatch"]
    assert "encoder.patch_embed.proj.weight -> encoder.patch_embed.weight" in report["loaded"]
    reasons = {line.split(" ")[0]: line for line in report["ignored"]}
    assert "differs from ours by at most 0.0e+00" in reasons["encoder_pos_embed"]
    assert "fine-tuning ViT has none" in reasons["encoder.cls_token"]
    assert "--init-from" in reasons["encoder_to_decoder.3.weight"] and "--init-from" in reasons["mask_token"]
    assert meta["plans_check"] == "warn" and meta["method"] == "hiend_mae"
    assert meta["architecture"]["embed_dim"] == 12 and meta["conversion_report"] is report


def test_converted_checkpoint_loads_through_nnunet_and_tensors_land_where_published_uses_them(tmp_path, capsys):
    from nnunet_hyspark.cli.convert_checkpoint import main as convert

    sd = published_state()
    marked = torch.arange(12 * PATCH ** 3, dtype=torch.float32).reshape(12, 1, PATCH, PATCH, PATCH) / 1e4
    sd["encoder.patch_embed.proj.weight"] = marked
    sd["encoder.blocks.9.mlp.fc2.bias"] = torch.full((12,), 7.0)  # block 10 (1-based): the deepest tapped block
    src, out = tmp_path / "hi_end_mae_ckpt_0200.pth", tmp_path / "converted.pth"
    torch.save(checkpoint(sd), src)
    convert([str(src), str(out), "--vit-heads", "2"])  # read with weights_only=True: no code runs
    printed = capsys.readouterr().out
    assert f"loaded {ENCODER_LOADED} encoder tensors; ignored {PUBLISHED_ENTRIES - ENCODER_LOADED}" in printed
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["network_class_name"] == SPEC.network.class_name and sidecar["plans_check"] == "warn"

    net = HiEndUNETR(1, 3, (24, 36, 24), vit_patch=PATCH, **VIT)  # the plan's network, feature size 32
    weights, _ = load_weights_file(out)
    report = transfer_report(net.state_dict(), weights)
    assert not report["missing"] and not report["shape_mismatch"] and not report["ignored"]
    load_pretrained_weights(net, str(out))  # nnU-Net's own loader, as -pretrained_weights runs it
    assert torch.equal(net.encoder.patch_embed.weight, marked)
    assert torch.equal(net.encoder.blocks[9].mlp.fc2.bias, torch.full((12,), 7.0))
    # the published UNETR applies this tensor as a Linear on each flattened 12^3 patch: the same numbers
    x = torch.randn(1, 1, 24, 36, 24)
    linear = F.linear(patchify(x, PATCH), marked.flatten(1), sd["encoder.patch_embed.proj.bias"])
    conv = net.encoder.patch_embed(x).flatten(2).transpose(1, 2)
    assert torch.allclose(conv, linear, atol=1e-4)


def test_conversion_adapts_the_patch_embedding_to_more_channels():
    sd = published_state()
    weights, meta, report = published.convert_published(sd, vit_heads=2, in_channels=3)
    w = sd["encoder.patch_embed.proj.weight"]
    assert torch.allclose(weights["encoder.patch_embed.weight"], w.repeat(1, 3, 1, 1, 1) / 3)
    assert meta["architecture"]["in_channels"] == 3 and "repeated over 3 input channels" in report["loaded"][-1]
    net = HiEndUNETR(3, 2, (24, 24, 24), vit_patch=PATCH, **VIT)
    assert not transfer_report(net.state_dict(), weights)["missing"]


def test_an_incomplete_checkpoint_is_refused_with_the_missing_keys():
    sd = published_state()
    del sd["encoder.blocks.3.attn.qkv.weight"]
    with pytest.raises(HySparKError, match="1 missing.*encoder.blocks.3.attn.qkv.weight"):
        published.convert_published(sd, vit_heads=2)


# ------------------------------------------------------------------------------------------ the pre-training model


def tiny_model(channels: int = 1) -> HiEndMAE:
    torch.manual_seed(0)
    return HiEndMAE(ViTEncoder(channels, PATCH, **VIT), decoder_width=DEC_WIDTH, decoder_heads=DEC_HEADS)


def test_the_whole_published_model_loads_for_pretraining():
    sd = published_state()
    model = tiny_model()
    report = published.load_published_pretraining(model, checkpoint(sd))
    assert (len(report["loaded"]), len(report["ignored"]), len(report["missing"])) == (PUBLISHED_ENTRIES - 2, 2, 0)
    assert torch.equal(model.decoder.mask_token, sd["mask_token"])
    assert torch.equal(model.encoder.cls_token, sd["encoder.cls_token"])
    assert torch.equal(model.decoder.proj[3].weight, sd["encoder_to_decoder.3.weight"])  # the final output's
    assert torch.equal(model.decoder.pred.weight, sd["decoder.head.weight"])
    assert torch.equal(model.decoder.cross_blocks[0].cross_attn.kv.weight,
                       sd["decoder.cross_attention_blocks.0.cross_attn.kv.weight"])
    assert torch.equal(model.decoder.self_blocks[1].mlp.fc1.bias, sd["decoder.blocks.1.mlp.fc1.bias"])
    # two input channels: the patch embedding and the reconstruction head are repeated per channel
    two = tiny_model(channels=2)
    published.load_published_pretraining(two, sd)
    assert torch.allclose(two.encoder.patch_embed.weight[:, 1:], sd["encoder.patch_embed.proj.weight"] / 2)
    assert torch.equal(two.decoder.pred.weight[PATCH ** 3:], sd["decoder.head.weight"])
    # another decoder width: refused, nothing loaded
    other = HiEndMAE(ViTEncoder(1, PATCH, **VIT), decoder_width=12, decoder_heads=2)
    before = other.decoder.pred.weight.clone()
    with pytest.raises(HySparKError, match="another shape"):
        published.load_published_pretraining(other, sd)
    assert torch.equal(other.decoder.pred.weight, before)


def _ln(h, sd, p):
    return F.layer_norm(h, h.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps=1e-6)


def _lin(h, sd, p):
    return F.linear(h, sd[p + "weight"], sd[p + "bias"])


def _attend(q, k, v, heads):
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)
    return (a @ split(v)).transpose(1, 2).reshape(b, n, c)


def _self_attn(h, sd, p, heads):
    q, k, v = _lin(h, sd, p + "qkv.").chunk(3, dim=-1)
    return _lin(_attend(q, k, v, heads), sd, p + "proj.")


def _block_fwd(h, sd, p, heads):
    h = h + _self_attn(_ln(h, sd, p + "norm1."), sd, p + "attn.", heads)
    return h + _lin(F.gelu(_lin(_ln(h, sd, p + "norm2."), sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")


def reference_loss(sd: dict, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The published forward pass written out over the published state dict (keys as stored), for ``ids_keep``
    in the order the published sampling draws them: a second statement of the method to compare against."""
    b, d = x.shape[0], sd["encoder.cls_token"].shape[-1]
    tokens = F.conv3d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=PATCH)
    grid = tokens.shape[2:]
    tokens = tokens.flatten(2).transpose(1, 2) + sincos_3d(d, grid)[None]
    h = torch.cat([sd["encoder.cls_token"].expand(b, -1, -1),
                   torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, d))], dim=1)
    taps = []
    for i in range(12):
        h = _block_fwd(h, sd, f"encoder.blocks.{i}.", VIT["num_heads"])
        if i + 1 in (4, 7, 10):
            taps.append(h)
    y = _lin(_ln(h, sd, "encoder.norm."), sd, "encoder_to_decoder.3.")
    full = sd["mask_token"].expand(b, tokens.shape[1], -1).clone()
    full.scatter_(1, ids_keep[..., None].expand(-1, -1, DEC_WIDTH), y[:, 1:])
    q = torch.cat([y[:, :1], full + sincos_3d(DEC_WIDTH, grid)[None]], dim=1)
    for i in range(2):
        q = _block_fwd(q, sd, f"decoder.blocks.{i}.", DEC_HEADS)
    for j, tap in enumerate(reversed(taps)):  # deepest first; the memory is only projected, never normed
        memory, p = _lin(tap, sd, f"encoder_to_decoder.{2 - j}."), f"decoder.cross_attention_blocks.{j}."
        q = q + _self_attn(_ln(q, sd, p + "norm0."), sd, p + "self_attn.", DEC_HEADS)
        k, v = _lin(memory, sd, p + "cross_attn.kv.").chunk(2, dim=-1)
        q = q + _lin(_attend(_lin(_ln(q, sd, p + "norm1."), sd, p + "cross_attn.q."), k, v, DEC_HEADS), sd,
                     p + "cross_attn.proj.")
        q = q + _lin(F.gelu(_lin(_ln(q, sd, p + "norm2."), sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")
    pred = _lin(_ln(q, sd, "decoder.norm."), sd, "decoder.head.")[:, 1:]
    target = F.layer_norm(patchify(x, PATCH), (PATCH ** 3,), eps=1e-6)  # no affine parameters
    masked = torch.ones(b, tokens.shape[1]).scatter_(1, ids_keep, 0.0)
    return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()


def published_sampling(b: int, n: int, keep: int, seed: int) -> torch.Tensor:
    """MAE's sampling: the first ``keep`` of a random permutation (argsort of uniform noise), unsorted."""
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    return torch.argsort(noise, dim=1)[:, :keep]


def test_loaded_published_model_computes_the_published_loss_number_for_number():
    sd = published_state(seed=3)
    model = tiny_model().eval()
    published.load_published_pretraining(model, sd)
    x = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
    ids_keep = published_sampling(2, 12, 3, seed=5)  # 75 % of the 12 tokens masked
    with torch.no_grad():
        ours = model(x, keep_idx=ids_keep)["loss"]
        assert torch.allclose(ours, reference_loss(sd, x, ids_keep), rtol=1e-5, atol=1e-6), ours


def test_replayed_kept_indices_give_identical_losses():
    model = tiny_model().eval()
    x = torch.randn(2, 1, *SHAPE)
    ids_keep = published_sampling(2, 12, 3, seed=0)
    with torch.no_grad():
        first, again = model(x, keep_idx=ids_keep), model(x, keep_idx=ids_keep)
        assert torch.equal(first["loss"], again["loss"]) and torch.equal(first["pred"], again["pred"])
        mask = first["mask"]
        assert mask.flatten(1).sum(1).tolist() == [3, 3]
        assert torch.equal(mask.flatten(1).gather(1, ids_keep), torch.ones(2, 3, dtype=torch.bool))
        assert torch.equal(model(x, mask=mask)["loss"], model(x, keep_idx=kept_token_indices(mask))["loss"])
        # the order of the kept tokens does not change the numbers (attention does not see order)
        assert torch.allclose(model(x, mask=mask)["loss"], first["loss"], atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(x, mask=mask, keep_idx=ids_keep)
    with pytest.raises(ValueError, match="repeats"):
        model(x, keep_idx=torch.tensor([[0, 0, 1], [1, 2, 3]]))


def test_cross_attention_reads_the_projected_layers_without_a_norm():
    model = tiny_model().eval()
    for block in model.decoder.cross_blocks:
        norms = [n for n, m in block.named_modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms == ["norm0", "norm1", "norm2"]  # self-attention, query of the cross-attention, MLP
    seen = {}
    blk = model.decoder.cross_blocks[0]
    blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("block", a[1]))
    blk.cross_attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[1]))
    with torch.no_grad():
        model(torch.randn(1, 1, *SHAPE))
    assert torch.equal(seen["block"], seen["attn"])


# ------------------------------------------------------------------------------------------ fine-tuning network, probe


def test_unetr_has_feature_size_32_and_no_class_token():
    net = HiEndUNETR(1, 2, (24, 24, 36), vit_patch=PATCH, **VIT)
    assert net.encoder.cls_token is None and not any("cls_token" in k for k in net.state_dict())
    assert [c.out_channels for c in (net.decoder.encoder1.conv1, net.decoder.encoder2.layers[0],
                                     net.decoder.encoder3.layers[0], net.decoder.encoder4.layers[0])] == [32, 64, 128, 256]
    seen = {}
    net.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("n", a[0].shape[1]))
    with torch.no_grad():
        net.decoder.deep_supervision = False
        assert net(torch.randn(1, 1, 24, 24, 36)).shape == (1, 2, 24, 24, 36)
    assert seen["n"] == 12  # the 2 x 2 x 3 tokens, no class token
    from nnunet_hyspark.planners.hiend_mae_planner import ARCH_PRESETS

    assert ARCH_PRESETS["base"]["feature_size"] == ARCH_PRESETS["large"]["feature_size"] == 32


@pytest.mark.parametrize("arch", [dict(embed_dim=768, depth=12, num_heads=12),
                                  dict(embed_dim=1536, depth=12, num_heads=16, vit_patch=16),
                                  dict(VIT, vit_patch=PATCH, feature_size=4)])
def test_memory_estimate_counts_the_networks_parameters(arch):
    with torch.device("meta"):
        net = HiEndUNETR(2, 5, **arch)
    kw = {k: v for k, v in arch.items() if k not in ("num_heads", "taps")}
    assert count_parameters(2, 5, **kw) == sum(p.numel() for p in net.parameters())
    estimate = SPEC.estimate_memory([96, 96, 96], 2, 2, 5, **arch)  # the planner's call
    assert estimate.parameters == count_parameters(2, 5, **kw)


def test_encoder_features_are_the_unetr_token_maps():
    model = tiny_model().eval()
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        maps = SPEC.encoder_features(model, x)
        outputs = model.encoder(x)
    assert [tuple(m.shape) for m in maps] == [(2, 12, 2, 2, 3)] * 4
    # grid cell (1, 0, 2) is token 1 * 6 + 0 * 3 + 2 = 8, after the class token
    assert torch.equal(maps[-1][:, :, 1, 0, 2], outputs[-1][:, 1 + 8])


# ------------------------------------------------------------------------------------------ --init-from


def test_init_from_loads_a_published_checkpoint_or_our_export_into_the_pretraining_model(tmp_path, capsys):
    from nnunet_hyspark.pretraining.model_setup import init_encoder

    sd = published_state(seed=4)
    src = tmp_path / "hi_end_mae_ckpt_1000.pth"
    torch.save(checkpoint(sd), src)
    model = tiny_model()
    init_encoder(model, str(src), {}, SPEC)
    captured = capsys.readouterr()
    assert f"loaded {PUBLISHED_ENTRIES - 2} tensors, ignored 2, missing 0" in captured.out
    assert "WARNING" in captured.err and "preprocessing" in captured.err
    assert torch.equal(model.decoder.proj[0].weight, sd["encoder_to_decoder.0.weight"])
    # our own export (a HiEndUNETR file, no class token) fills the encoder; the class token stays as it was
    model.arch = {**VIT, "vit_patch": PATCH, "feature_size": 4}
    path = SPEC.export(model, {"method": "hiend_mae", "spacing": [1.0, 1.0, 1.0],
                               "normalization_schemes": ["CTNormalization"]}, tmp_path / "w.pth")
    fresh = tiny_model()
    torch.nn.init.constant_(fresh.encoder.cls_token, 5.0)
    info = {"spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"]}
    init_encoder(fresh, str(path), info, SPEC)
    assert torch.equal(fresh.encoder.blocks[11].mlp.fc2.weight, sd["encoder.blocks.11.mlp.fc2.weight"])
    assert torch.equal(fresh.encoder.cls_token, torch.full_like(fresh.encoder.cls_token, 5.0))
