"""Hi-End-MAE: ViT encoder, hierarchical decoder, loss, optimiser groups, HiEndUNETR, weights, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import loss_before_and_after_training
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.mae import masked_patch_mse, normalised_targets, patchify
from nnunet_hyspark.methods import ModelOptions
from nnunet_hyspark.methods.hiend_mae.encoder import ViTEncoder
from nnunet_hyspark.methods.hiend_mae.model import HiEndMAE
from nnunet_hyspark.methods.hiend_mae.model import build_model as build
from nnunet_hyspark.methods.hiend_mae.weights import export
from nnunet_hyspark.methods.hiend_mae.network import (HiEndUNETR, deep_supervision_scales,
                                                     plans_strides, up_factors)

# 6 blocks so that the tapped layers (2, 4, 5) are neither the first nor the last
TINY = dict(embed_dim=24, depth=6, num_heads=2, mlp_ratio=2.0, taps=(2, 4, 5))


def tiny_mae(vit_patch: int = 12, **kw) -> HiEndMAE:
    torch.manual_seed(0)
    return HiEndMAE(ViTEncoder(1, vit_patch, **TINY), decoder_width=12, decoder_heads=2, arch={**TINY}, **kw)


def smooth_volumes(n: int, shape, cell: int, seed: int = 0) -> torch.Tensor:
    """Trilinear ramps between random values on a coarse grid: masked patches are predictable from neighbours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(max(2, s // cell) for s in shape), generator=g)
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)


# ------------------------------------------------------------------------------------------ pre-training model


def test_cross_attention_reads_layers_10_7_4_deepest_first():
    """Cross block j gets keys/values from proj(tapped layer), deepest first; a perturbation of an encoder
    block reaches exactly the cross blocks fed by it or by deeper tapped layers."""
    model = tiny_mae().eval()
    x = smooth_volumes(2, (36, 24, 24), 12)
    mask = model.random_mask(x, torch.Generator().manual_seed(1))
    blocks, memories = {}, {}
    hooks = [model.encoder.blocks[t - 1].register_forward_hook(
        lambda m, a, out, t=t: blocks.__setitem__(t, out.detach())) for t in TINY["taps"]]
    hooks += [blk.register_forward_pre_hook(lambda m, a, j=j: memories.__setitem__(j, a[1].detach()))
              for j, blk in enumerate(model.decoder.cross_blocks)]
    with torch.no_grad():
        model(x, mask)
        deepest_first = list(reversed(TINY["taps"]))  # 5, 4, 2 here (10, 7, 4 in the base network)
        for j, t in enumerate(deepest_first):
            proj = model.decoder.proj[TINY["taps"].index(t)]
            assert torch.allclose(memories[j], proj(blocks[t]), atol=1e-6), (j, t)
        clean = dict(memories)
        # perturb the output of block 4 (a tapped layer): layers 4 and 5 change, layer 2 does not
        perturb = model.encoder.blocks[3].register_forward_hook(lambda m, a, out: out + 1.0)
        model(x, mask)
        perturb.remove()
    for h in hooks:
        h.remove()
    changed = [not torch.allclose(memories[j], clean[j]) for j in range(3)]
    assert changed == [True, True, False]  # cross blocks for layers 5, 4 (changed) and 2 (unchanged)


def test_queries_restore_the_original_order_with_mask_tokens():
    model = tiny_mae().eval()
    x = smooth_volumes(1, (24, 24, 36), 12)
    mask = model.random_mask(x, torch.Generator().manual_seed(0))
    seen = {}
    model.decoder.self_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0].detach()))
    with torch.no_grad():
        feats = model.encoder(x, torch.nonzero(mask.flatten())[:, 0][None])
        model(x, mask)
    from nnunet_hyspark.layers.pos_embed import sincos_3d
    q = seen["q"][0, 1:] - sincos_3d(12, mask.shape[1:])
    kept = mask.flatten()
    assert torch.allclose(q[kept], model.decoder.proj[-1](feats[-1])[0, 1:], atol=1e-5)
    assert torch.allclose(q[~kept], model.decoder.mask_token[0].expand(int((~kept).sum()), -1), atol=1e-6)
    assert torch.allclose(seen["q"][0, 0], model.decoder.proj[-1](feats[-1])[0, 0], atol=1e-5)  # cls, zero pos


def test_only_masked_patches_contribute_to_the_loss():
    model = tiny_mae()
    x = smooth_volumes(2, (24, 24, 36), 12)
    mask = model.random_mask(x, torch.Generator().manual_seed(0))
    out = model(x, mask)
    pred = out["pred"]
    pred.retain_grad()
    out["loss"].backward()
    kept = mask.flatten(1)
    assert pred.grad[kept].abs().max() == 0
    assert (pred.grad[~kept].abs().sum(-1) > 0).all()
    # the target is each patch through a layer norm without affine parameters (biased variance, eps 1e-6), as
    # the published code normalises; HySparK's helper default (unbiased variance) gives another number
    target = torch.nn.functional.layer_norm(patchify(x, 12), (12 ** 3,), eps=1e-6)
    manual = ((pred.detach() - target) ** 2).mean(-1)[~kept].mean()
    assert torch.allclose(out["loss"], manual, atol=1e-6)
    assert torch.allclose(normalised_targets(x, patch=12, unbiased=False)[0], target, atol=1e-5)
    assert not torch.allclose(masked_patch_mse(pred.detach(), x, mask, 12), manual, atol=1e-5)
    # a perfect prediction on masked patches gives zero, whatever the kept rows hold
    fake = target.clone()
    fake[kept] += 3.0
    assert masked_patch_mse(fake, x, mask, 12, unbiased=False).item() < 1e-10


def test_mask_ratio_and_token_dropping():
    model = tiny_mae()
    x = torch.randn(3, 1, 24, 36, 48)
    mask = model.random_mask(x)
    assert mask.shape == (3, 2, 3, 4) and mask.flatten(1).sum(1).tolist() == [6, 6, 6]  # 75 % of 24 dropped
    seen = {}
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("n", a[0].shape[1]))
    model(x, mask)
    assert seen["n"] == 1 + 6  # class token + kept tokens only


def test_patch_axes_must_be_multiples_of_the_vit_patch():
    model = tiny_mae()
    with pytest.raises(HySparKError, match=r"axis 1 \(y\) = 30 is not a multiple of 12"):
        model(torch.randn(1, 1, 24, 30, 24))
    args = ModelOptions(mask_ratio=0.75)
    with pytest.raises(HySparKError, match=r"axis 2 \(z\) = 20 is not a multiple of 12"):
        build({**TINY, "vit_patch": 12, "patch_size": [24, 24, 20]}, 1, args)
    with pytest.raises(ValueError, match="taps"):
        ViTEncoder(1, 12, 24, 4, 2, taps=(2, 7))


def test_weight_decay_groups_of_the_loop_exempt_biases_norms_and_tokens(tmp_path):
    from nnunet_hyspark.pretraining.loop import LoopConfig, Pretrainer
    from nnunet_hyspark.methods import METHODS

    model = tiny_mae()
    cfg = LoopConfig(weight_decay_start=0.05, weight_decay_end=0.05, betas=(0.9, 0.95))
    trainer = Pretrainer(model, METHODS["hiend_mae"], cfg, iter(()), None, tmp_path, {}, torch.device("cpu"),
                         progress=False)
    names = {n: g["weight_decay"] for g in trainer.optimizer.param_groups for n in g["names"]}
    assert set(names) == {n for n, _ in model.named_parameters()}
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    no_decay = {n for n, wd in names.items() if wd == 0}
    assert {"encoder.cls_token", "decoder.mask_token"} <= no_decay
    assert {f"{n}.weight" for n in norms} | {f"{n}.bias" for n in norms} <= no_decay
    assert {n for n in names if n.endswith(".bias")} <= no_decay
    decayed = {n for n, wd in names.items() if wd == 0.05}
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n}
    assert "encoder.patch_embed.weight" in decayed and "decoder.pred.weight" in decayed
    trainer._apply_schedules()  # the schedule keeps exempt groups at 0
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0, 0.05}
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.95)


def test_method_recipe_fills_left_out_options():
    from nnunet_hyspark.cli.pretrain import apply_method_defaults, build_parser
    from nnunet_hyspark.methods import METHODS

    args = apply_method_defaults(build_parser().parse_args(["-d", "1", "--method", "hiend_mae"]), METHODS["hiend_mae"])
    assert (args.plans, tuple(args.betas), tuple(args.weight_decay)) == ("nnUNetHiEndMAEPlans", (0.9, 0.95), (0.05, 0.05))
    assert (args.lr, args.warmup_fraction, args.clip_grad, args.mask_ratio) == (1e-4, 0.01, 0.0, 0.75)
    args = apply_method_defaults(build_parser().parse_args(["-d", "1", "--method", "hiend_mae", "--weight-decay",
                                                            "0.1", "0.1"]), METHODS["hiend_mae"])
    assert tuple(args.weight_decay) == (0.1, 0.1)
    args = apply_method_defaults(build_parser().parse_args(["-d", "1"]), METHODS["hyspark"])
    assert (args.plans, tuple(args.betas), tuple(args.weight_decay)) == ("nnUNetHySparKPlans", (0.9, 0.999), (0.04, 0.2))


def test_loss_decreases_on_smooth_volumes():
    torch.manual_seed(0)
    model = HiEndMAE(ViTEncoder(1, 4, embed_dim=24, depth=3, num_heads=2, mlp_ratio=2.0, taps=(1, 2, 3)),
                     decoder_width=12, decoder_heads=2)
    x = smooth_volumes(2, (16, 16, 16), 8)  # 64 tokens of 4^3 voxels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    before, after = loss_before_and_after_training(model, x, opt, 25)
    assert after < 0.6 * before, (before, after)


def test_reconstruction_preview_keeps_visible_patches():
    from nnunet_hyspark.masking import upsample_mask

    model = tiny_mae()
    x = smooth_volumes(1, (24, 36, 24), 12)
    out = model(x)
    imgs = model.reconstruct(x, out["pred"], out["mask"])
    keep = upsample_mask(out["mask"], 12)
    assert imgs["reconstruction"].shape == x.shape
    assert torch.allclose(imgs["reconstruction"] * keep, x * keep, atol=1e-5)
    assert torch.equal(imgs["masked"].nan_to_num(0.0), x * keep)
    assert bool(imgs["masked"].isnan().eq(keep.expand_as(x) == 0).all())  # hidden voxels are NaN, drawn in colour


# ------------------------------------------------------------------------------------------ fine-tuning network


def _nnunet_ds_scales(strides) -> list[list[float]]:
    """nnU-Net's nnUNetTrainer._get_deep_supervision_scales for these plans strides."""
    return [list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]


@pytest.mark.parametrize("vit_patch, patch", [(12, (24, 36, 48)), (12, (12, 24, 12)), (16, (32, 48, 16))])
def test_unetr_outputs_match_the_plans_deep_supervision_scales(vit_patch, patch):
    torch.manual_seed(0)
    net = HiEndUNETR(2, 3, patch, vit_patch, feature_size=2, strides=plans_strides(vit_patch), **TINY)
    with torch.no_grad():
        outs = net(torch.randn(1, 2, *patch))
        scales = _nnunet_ds_scales(plans_strides(vit_patch))
        assert len(outs) == len(scales) == 4
        for out, s in zip(outs, scales):
            assert out.shape[:2] == (1, 3)
            assert list(out.shape[2:]) == [round(p * f) for p, f in zip(patch, s)]
        assert [s[0] for s in scales] == pytest.approx(deep_supervision_scales(vit_patch))
        net.decoder.deep_supervision = False  # what nnU-Net sets for validation and inference
        assert net(torch.randn(1, 2, *patch)).shape == (1, 3, *patch)


def test_unetr_pyramid_and_errors():
    assert up_factors(12) == (1, 3, 2, 2) and up_factors(16) == (2, 2, 2, 2)
    assert plans_strides(12) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [3, 3, 3], [1, 1, 1]]
    assert plans_strides(16) == [[1, 1, 1]] + [[2, 2, 2]] * 4
    with pytest.raises(HySparKError, match=r"axis 2 \(z\) = 40 is not a multiple of 12"):
        HiEndUNETR(1, 2, (24, 24, 40), 12, **TINY)
    with pytest.raises(ValueError, match="strides"):
        HiEndUNETR(1, 2, (24, 24, 24), 12, strides=plans_strides(16), **TINY)
    # a state dict has no grid-sized tensors: the same weights serve every patch size
    a = HiEndUNETR(1, 2, (24, 24, 24), 12, **TINY).state_dict()
    b = HiEndUNETR(1, 2, (48, 36, 12), 12, **TINY).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_exported_weights_load_with_nnunet_and_adapt_channels(tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    arch = {**TINY, "vit_patch": 12, "feature_size": 2, "patch_size": [24, 24, 24], "strides": plans_strides(12)}
    model = tiny_mae()
    model.arch = arch
    path = export(model, {"method": "hiend_mae"}, tmp_path / "w.pth")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["network_class_name"] == "nnunet_hyspark.methods.hiend_mae.network.HiEndUNETR"
    net = HiEndUNETR(1, 4, (36, 24, 48), **{k: v for k, v in arch.items() if k != "patch_size"})
    load_pretrained_weights(net, str(path))
    for k, v in model.encoder.state_dict().items():
        if k != "cls_token":  # pre-training only: the fine-tuning ViT has none
            assert torch.equal(net.state_dict()[f"encoder.{k}"], v)
    obj = torch.load(path, weights_only=False)
    assert all(v.device.type == "cpu" for v in obj["network_weights"].values())
    assert not any(".seg_layers." in k for k in obj["network_weights"])
    # every network tensor but the heads is in the file, with its shape, and nothing else
    net_state = {k: v.shape for k, v in net.state_dict().items() if ".seg_layers." not in k}
    assert {k: v.shape for k, v in obj["network_weights"].items()} == net_state
    # 2 input channels: hyspark_convert_checkpoint repeats and scales the patch embedding (the image conv of
    # the decoder is re-initialised for 2 channels)
    from nnunet_hyspark.cli.convert_checkpoint import main as convert

    convert([str(path), str(tmp_path / "w2.pth"), "--in-channels", "2"])
    net2 = HiEndUNETR(2, 4, (24, 24, 24), **{k: v for k, v in arch.items() if k != "patch_size"})
    load_pretrained_weights(net2, str(tmp_path / "w2.pth"))
    w1 = model.encoder.patch_embed.weight
    assert torch.allclose(net2.encoder.patch_embed.weight, torch.cat([w1, w1], 1) / 2)
    assert json.loads((tmp_path / "w2.json").read_text())["architecture"]["in_channels"] == 2
    with pytest.raises(SystemExit):  # nothing to convert without --in-channels
        convert([str(path), str(tmp_path / "w3.pth")])


def test_benchmark_requires_weights_for_the_finetune_arm(tmp_path):
    from nnunet_hyspark.benchmark.folds import resolve_arms

    with pytest.raises(HySparKError, match="needs pre-trained weights"):
        resolve_arms(["scratch=nnUNetTrainerHySparK", "hiend=nnUNetTrainerHiEndMAEFinetune"], None)
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    arms = resolve_arms(["hiend=nnUNetTrainerHiEndMAEFinetune_test"], str(w))
    assert arms[0].weights == str(w)


# ------------------------------------------------------------------------------------------ end to end


def _env(root: Path) -> dict:
    from nnunet_hyspark.cli.env import ext_trainer_value

    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="false", OMP_NUM_THREADS="2",
               nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer")))
    return env


def _run(cmd: list[str], env: dict, timeout: int = 300) -> str:
    exe = Path(sys.executable).with_name(cmd[0])
    r = subprocess.run([str(exe), *cmd[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.e2e
def test_end_to_end_pretrain_finetune_predict(tmp_path):
    """hyspark_synthesize -> hyspark_plan_and_preprocess --network hiend_mae -> hyspark_pretrain --method
    hiend_mae -> nnUNetv2_train -pretrained_weights -> nnUNetv2_predict, all through the real commands."""
    env = _env(tmp_path)
    ds, plans = "951", "nnUNetHiEndMAEPlans"
    _run(["hyspark_synthesize", "-d", ds, "--num-cases", "2", "--shape", "24", "24", "24"], env)
    _run(["hyspark_plan_and_preprocess", "-d", ds, "-np", "1", "--network", "hiend_mae", "--arch", "tiny",
          "--patch-size", "24", "24", "24"], env)
    name = next((tmp_path / "raw").glob(f"Dataset{ds}_*")).name
    cfg = json.loads((tmp_path / "pre" / name / f"{plans}.json").read_text())["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"] == "nnunet_hyspark.methods.hiend_mae.network.HiEndUNETR"
    assert cfg["architecture"]["arch_kwargs"]["strides"] == plans_strides(12)
    out = _run(["hyspark_pretrain", "-d", ds, "--method", "hiend_mae", "--epochs", "1", "--iterations", "2",
                "--val-iterations", "1", "-b", "2", "--device", "cpu", "--num-workers", "0", "--no-progress"], env)
    weights = tmp_path / "res" / name / f"hiend_mae_pretrain__{plans}__3d_fullres" / "encoder_weights.pth"
    assert weights.is_file() and weights.with_suffix(".json").is_file(), out
    assert "nnUNetTrainerHiEndMAEFinetune" in out
    trainer = "nnUNetTrainerHiEndMAEFinetune_test"
    log = _run(["nnUNetv2_train", ds, "3d_fullres", "all", "-tr", trainer, "-p", plans, "-device", "cpu",
                "-pretrained_weights", str(weights)], env, timeout=600)
    fold = tmp_path / "res" / name / f"{trainer}__{plans}__3d_fullres" / "fold_all"
    text = next(fold.glob("training_log_*.txt")).read_text()
    assert "pre-trained encoder verified in the network" in text and "shape mismatch 0" in text, log[-2000:]
    images = tmp_path / "in"
    images.mkdir()
    first = sorted((tmp_path / "raw" / name / "imagesTr").iterdir())[0]
    (images / first.name).symlink_to(first)
    _run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-d", ds, "-c", "3d_fullres",
          "-f", "all", "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
         env)
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1
