"""MiM: level geometry, grouped masks, alignment, masked losses, optimisation, fine-tuning network, weights,
planner/benchmark registrations, and (e2e) the real commands from synthetic data to prediction."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_hyspark.methods.mim import levels as L
from nnunet_hyspark.mae import masked_patch_mse as masked_cell_loss
from nnunet_hyspark.methods.mim.model import MiM, MiMBackbone, alignment_loss
from nnunet_hyspark.masking import upsample_mask
from nnunet_hyspark.methods.mim.network import MiMUNet, strides_for
from nnunet_hyspark.methods.mim.weights import adapt_weights_channels, export_mim_weights

TINY = dict(widths=(8, 8, 16, 24), conv_depths=(1, 1, 1), vit_depth=1, vit_heads=2)
TINY_UNET = dict(TINY, feature_size=8, fifth_width=32)


def tiny_mim(in_channels: int = 1, **kw) -> MiM:
    torch.manual_seed(0)
    return MiM(MiMBackbone(in_channels, **TINY), decoder_width=24, decoder_depth=1, decoder_heads=2, **kw)


def coordinate_crop(shape, batch: int = 2) -> torch.Tensor:
    """(B, 3, X, Y, Z) whose channel a holds the voxel's coordinate along axis a."""
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(axes)[None].repeat(batch, 1, 1, 1, 1)


def smooth_volumes(n: int, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(s // 8 for s in shape), generator=g)
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------ levels


def test_levels_come_from_where_they_are_aligned():
    """Non-cubic level patch (64, 32, 32): every fine voxel lies in its middle cell, inside the crop octant of
    its middle volume, inside the coarse octant it is aligned with; the regions were masked one level up."""
    patch = (64, 32, 32)
    crop = coordinate_crop(tuple(2 * p for p in patch))
    model = tiny_mim(in_channels=3)
    lv = model.make_levels(crop, torch.Generator().manual_seed(3))
    grid = L.token_grid(patch)
    assert lv["grid"] == (4, 2, 2)
    coarse = lv["coarse"]["volume"]
    assert coarse.shape == (2, 3, *patch)
    for a in range(3):  # trilinear by 1/2 == mean of voxels 2i and 2i + 1
        idx = torch.arange(patch[a], dtype=torch.float32)
        assert torch.allclose(coarse[0, a].movedim(a, 0).flatten(1), (2 * idx + 0.5)[:, None].expand(-1, coarse[0, a].numel() // patch[a]))
    octant_of = L.octant_of_cells(grid)
    middle, fine = lv["middle"]["volume"], lv["fine"]["volume"]
    assert middle.shape == (2 * 4, 3, *patch) and fine.shape == (2 * 4 * 4, 3, *patch)
    for b in range(2):
        for k in range(model.n_middle):
            o = int(lv["octants"][b, k])
            n = b * model.n_middle + k
            # the middle volume was masked at the coarse level, and is that octant of the crop, native resolution
            assert not lv["coarse"]["mask"][b].flatten()[octant_of == o].any()
            box = L.octant_box_in_crop(o, patch)
            for a, (lo, hi) in enumerate(box):
                assert middle[n, a].min() == lo and middle[n, a].max() == hi - 1
            # the coarse region it is aligned with shows the same crop region
            region = (octant_of == o).view(grid)
            region_vox = region.repeat_interleave(16, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)
            for a, (lo, hi) in enumerate(box):
                vals = coarse[b, a][region_vox]
                assert vals.min() == lo + 0.5 and vals.max() == hi - 1.5
            for j in range(model.n_fine):
                c = int(lv["cells"][n, j])
                f = fine[n * model.n_fine + j]
                assert not lv["middle"]["mask"][n].flatten()[c]  # masked at the middle level
                for a, (lo, hi) in enumerate(L.fine_box_in_crop(o, c, patch)):
                    assert box[a][0] <= lo and hi <= box[a][1]  # inside the middle volume's crop octant
                    assert f[a].min() == lo and f[a].max() == hi - 1  # one 16^3 cell, stretched to the patch
                    assert torch.unique(f[a]).numel() > 16  # upsampled (interpolated), not a crop of the patch


def test_coarse_mask_groups_are_spatial_octants():
    for grid in ((6, 6, 6), (4, 2, 6)):
        mask, masked = L.grouped_mask(5, grid, 0.5, torch.Generator().manual_seed(0))
        assert masked.shape == (5, 4)
        gx, gy, gz = grid
        blocks = mask.view(5, 2, gx // 2, 2, gy // 2, 2, gz // 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(5, 8, -1)
        assert bool((blocks.all(-1) | ~blocks.any(-1)).all())  # every octant entirely kept or entirely masked
        assert blocks.all(-1).sum(1).tolist() == [4] * 5
        for b in range(5):
            assert sorted((~blocks[b].any(-1)).nonzero().flatten().tolist()) == sorted(masked[b].tolist())
    # 27 consecutive flat indices (the published grouping) are not one octant of a 6^3 grid
    assert L.octant_of_cells((6, 6, 6))[:27].unique().numel() > 1
    assert L.octant_of_cells((6, 6, 6)).view(6, 6, 6)[:3, :3, :3].unique().tolist() == [0]


def test_non_multiple_of_32_level_patch_is_refused():
    with pytest.raises(ValueError, match="multiples of 32"):
        L.level_patch_size((96, 96, 96))  # level patch 48: odd token grid
    assert L.level_patch_size((192, 128, 64)) == (96, 64, 32)


# ------------------------------------------------------------------------------------------------ losses


def test_alignment_targets_are_detached():
    model = tiny_mim()
    lv = model.make_levels(smooth_volumes(2, (64, 64, 64)), torch.Generator().manual_seed(0))
    grid_cells = 8
    decoded = {"coarse": torch.randn(2, grid_cells, 24, requires_grad=True),
               "middle": torch.randn(8, grid_cells, 24, requires_grad=True),
               "fine": torch.randn(32, grid_cells, 24, requires_grad=True)}
    cm, mf = model.alignment(lv, decoded)
    g_coarse, g_middle = torch.autograd.grad(cm, [decoded["coarse"], decoded["middle"]], allow_unused=True)
    assert g_coarse is None and g_middle.abs().sum() > 0
    g_middle, g_fine = torch.autograd.grad(mf, [decoded["middle"], decoded["fine"]], allow_unused=True)
    assert g_middle is None and g_fine.abs().sum() > 0
    # the loss itself: 0 for identical directions, 2 - 2cos otherwise
    head = torch.nn.Identity()
    v = torch.randn(3, 5)
    assert alignment_loss(v, 2 * v, head, head).abs() < 1e-6
    assert torch.isclose(alignment_loss(v, -v, head, head), torch.tensor(4.0))


def test_only_masked_cells_contribute_to_a_level_loss():
    vol = smooth_volumes(2, (32, 32, 32))
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[:, 0] = True  # kept: the lower half along x
    pred = torch.randn(2, 8, 16 ** 3)
    base = masked_cell_loss(pred, vol, mask)
    pred2, vol2 = pred.clone(), vol.clone()
    pred2[:, :4] += 5.0  # cells 0-3 are x = 0: kept
    vol2[:, :, :16] = torch.randn_like(vol2[:, :, :16])
    assert torch.isclose(masked_cell_loss(pred2, vol2, mask), base)
    pred2[:, 4:] += 1.0
    assert not torch.isclose(masked_cell_loss(pred2, vol2, mask), base)


def test_kept_latents_ignore_masked_input():
    """The conv blocks' mask keeps masked regions from leaking into kept tokens (through the fusion too)."""
    model = tiny_mim().eval()
    x = smooth_volumes(1, (64, 32, 32))
    mask = torch.ones(1, 4, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 1] = mask[0, 2, 1, 1] = False
    noisy = x + 10 * torch.randn_like(x) * (1 - upsample_mask(mask, 16))
    with torch.no_grad():
        assert torch.allclose(model.encode(x, mask), model.encode(noisy, mask), atol=1e-5)
        full = torch.ones_like(mask)
        assert not torch.allclose(model.encode(x, full), model.encode(noisy, full), atol=1e-3)


def test_every_parameter_gets_a_gradient_and_loss_decreases():
    model = tiny_mim(n_middle=2, n_fine=2)
    ramp = torch.linspace(-1, 1, 64)[:, None, None].expand(64, 64, 64)
    x = ramp + 0.3 * smooth_volumes(1, (64, 64, 64))  # smooth, with structure shared by all levels

    def reconstruction_loss(out):
        return sum(out[f"loss_{n}"] for n in model.LEVELS).item()

    out = model(x, torch.Generator().manual_seed(0))
    out["loss"].backward()
    # DDP needs no unused trained parameters (the alignment targets' heads are frozen)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert 2.7 < reconstruction_loss(out) < 3.3  # ~1 per level at initialisation (normalised targets)

    def fixed_masks_loss():
        with torch.no_grad():
            return sum(reconstruction_loss(model(x, torch.Generator().manual_seed(s))) for s in range(2)) / 2

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = fixed_masks_loss()
    for _ in range(12):
        loss = model(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_masks_loss()
    assert after < 0.7 * before, (before, after)


def test_preview_panels_per_level():
    from nnunet_hyspark.methods import METHODS

    model = tiny_mim().eval()
    with torch.no_grad():
        panels = METHODS["mim"].preview(model, smooth_volumes(1, (64, 64, 64)), torch.Generator().manual_seed(0))
    assert sorted(panels) == ["coarse", "fine", "middle"]
    for images in panels.values():
        assert sorted(images) == ["input", "masked", "reconstruction"]
        assert all(v.shape == (1, 1, 32, 32, 32) for v in images.values())
        assert images["masked"].isnan().any() and not images["reconstruction"].isnan().any()


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_finetune_network_shapes_and_deep_supervision():
    net = MiMUNet(2, 3, patch_size=(64, 32, 32), strides=strides_for(True), **TINY_UNET)
    x = torch.randn(1, 2, 64, 32, 32)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 64 // 2 ** k, 32 // 2 ** k, 32 // 2 ** k) for k in range(5)]
    net.decoder.deep_supervision = False
    assert net(x).shape == (1, 3, 64, 32, 32)
    heads = [k for k in net.state_dict() if "seg_layers" in k]
    assert len(heads) == 10 and all(k.startswith("decoder.seg_layers.") for k in heads)
    with pytest.raises(ValueError, match="multiple of 32"):
        MiMUNet(1, 2, patch_size=(48, 32, 32), **TINY_UNET)
    with pytest.raises(ValueError, match="single voxel"):
        MiMUNet(1, 2, patch_size=(32, 32, 32), **TINY_UNET)
    with pytest.raises(ValueError, match="strides"):
        MiMUNet(1, 2, strides=strides_for(False), **TINY_UNET)
    small = MiMUNet(1, 2, patch_size=(48, 32, 16), fifth_stage=False, strides=strides_for(False), **TINY_UNET)
    assert len(small(torch.randn(1, 1, 48, 32, 16))) == 4


def test_exported_weights_load_into_the_finetune_network(tmp_path):
    from nnunet_hyspark.weights import load_weights_file, transfer_report

    model = tiny_mim()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01)  # "pre-trained"
    arch = dict(TINY_UNET, fifth_stage=True, patch_size=[64, 32, 32], strides=strides_for(True))
    path = export_mim_weights(model.encoder, arch, {"method": "mim"}, tmp_path / "w.pth")
    weights, meta = load_weights_file(path)
    assert json.loads(path.with_suffix(".json").read_text())["method"] == "mim"
    assert meta["network_class_name"] == "nnunet_hyspark.methods.mim.network.MiMUNet"
    assert all(v.device.type == "cpu" for v in weights.values())
    assert not any(".seg_layers." in k for k in weights)
    assert not any(k.startswith(("fusion", "decoder_", "mask_token", "align")) for k in weights)
    for patch in ((64, 32, 32), (32, 96, 64)):  # any patch size: nothing grid-sized is stored
        net = MiMUNet(1, 4, patch_size=patch, **{k: v for k, v in arch.items() if k != "patch_size"})
        report = transfer_report(net.state_dict(), weights)
        assert report["missing"] == [] and report["shape_mismatch"] == [] and report["ignored"] == []
    net.load_state_dict({**net.state_dict(), **weights})
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v)
    # another number of input channels: the first conv repeated, the rest re-initialised for that count
    w2, meta2 = adapt_weights_channels(weights, meta, 2)
    net2 = MiMUNet(2, 4, **{k: v for k, v in arch.items() if k != "patch_size"})
    report = transfer_report(net2.state_dict(), w2)
    assert report["missing"] == [] and report["shape_mismatch"] == []
    stem = weights["encoder.downs.0.conv.weight"]
    assert torch.allclose(w2["encoder.downs.0.conv.weight"], stem.repeat(1, 2, 1, 1, 1) / 2)
    # ... through the converter command
    from nnunet_hyspark.cli.convert_checkpoint import main as convert

    convert([str(path), str(tmp_path / "w2.pth"), "--in-channels", "2"])
    w3, meta3 = load_weights_file(tmp_path / "w2.pth")
    assert meta3["architecture"]["in_channels"] == 2 and torch.equal(w3["encoder.downs.0.conv.weight"],
                                                                     w2["encoder.downs.0.conv.weight"])


# ------------------------------------------------------------------------------------------------ registrations


def test_planner_and_benchmark_accept_mim(tmp_path):
    from nnunet_hyspark.benchmark.folds import resolve_arms
    from nnunet_hyspark.cli.plan_and_preprocess import build_parser, _validate_args
    from nnunet_hyspark.errors import HySparKError
    from nnunet_hyspark.planners.mim_planner import MiMPlanner

    args = build_parser().parse_args(["-d", "1", "--network", "mim", "--arch", "tiny", "--patch-size", "64", "32", "96"])
    _validate_args(args)
    assert args.plans_name == "nnUNetMiMPlans" and MiMPlanner.patch_multiple == 32
    with pytest.raises(HySparKError, match="multiple of 32"):
        _validate_args(build_parser().parse_args(["-d", "1", "--network", "mim", "--patch-size", "48", "32", "32"]))
    args = build_parser().parse_args(["-d", "1"])
    _validate_args(args)
    assert args.plans_name == "nnUNetHySparKPlans"

    from nnunet_hyspark.methods import METHODS, ModelOptions

    with pytest.raises(HySparKError, match="multiple of 32"):  # hyspark_pretrain --method mim --patch-size 48 64 64
        METHODS["mim"].build_model(dict(TINY), 1, ModelOptions(mask_ratio=0.75, level_patch=(48, 64, 64)))

    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    arms = resolve_arms(["scratch=nnUNetTrainerHySparK", f"mim=nnUNetTrainerMiMFinetune:{w}"], None)
    assert [a.weights for a in arms] == [None, str(w)]
    with pytest.raises(HySparKError, match="needs pre-trained weights"):
        resolve_arms(["mim=nnUNetTrainerMiMFinetune_test"], None)


# ------------------------------------------------------------------------------------------------ end to end


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.mark.e2e
def test_mim_end_to_end_through_the_real_commands(tmp_path):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    line = _run([str(bindir / "hyspark_env")], env, tmp_path).stdout.strip()  # export nnUNet_extTrainer=...
    env["nnUNet_extTrainer"] = line.split("nnUNet_extTrainer=", 1)[1].strip("'\"")
    ds = "987"
    _run([str(bindir / "hyspark_synthesize"), "-d", ds, "--num-cases", "5", "--shape", "64", "48", "32",
          "--spacing", "2", "2", "2"], env, tmp_path)
    _run([str(bindir / "hyspark_plan_and_preprocess"), "-d", ds, "--network", "mim", "--arch", "tiny",
          "--patch-size", "32", "32", "64", "-np", "1"], env, tmp_path)
    name = next(p.name for p in (tmp_path / "pre").iterdir() if p.name.startswith(f"Dataset{ds}"))
    plans = json.loads((tmp_path / "pre" / name / "nnUNetMiMPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"].endswith("MiMUNet") and cfg["patch_size"] == [32, 32, 64]

    out = tmp_path / "pretrain"
    r = _run([str(bindir / "hyspark_pretrain"), "-d", ds, "--method", "mim", "--epochs", "1",
              "--iterations", "2", "--val-iterations", "1", "-b", "1", "--num-workers", "0", "--no-progress",
              "--device", "cpu", "-o", str(out)], env, tmp_path)
    weights = out / "encoder_weights.pth"
    assert weights.is_file() and "nnUNetTrainerMiMFinetune" in r.stdout
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["method"] == "mim" and meta["patch_size"] == [32, 32, 64] and meta["crop_size"] == [64, 64, 128]
    assert {p.name for p in (out / "previews").iterdir()} == {f"epoch_0001_{n}.png" for n in ("coarse", "middle", "fine")}

    trainer = "nnUNetTrainerMiMFinetune_test"
    _run([str(bindir / "nnUNetv2_train"), ds, "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetMiMPlans",
          "-pretrained_weights", str(weights), "-device", "cpu"], env, tmp_path)
    fold = tmp_path / "results" / name / f"{trainer}__nnUNetMiMPlans__3d_fullres" / "fold_0"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "pre-trained encoder verified in the network" in log
    assert (fold / "checkpoint_final.pth").is_file()

    inp, pred = tmp_path / "predict_in", tmp_path / "predict_out"
    inp.mkdir()
    first = sorted((tmp_path / "raw" / name / "imagesTr").iterdir())[0]
    shutil.copy(first, inp / first.name)
    _run([str(bindir / "nnUNetv2_predict"), "-i", str(inp), "-o", str(pred), "-d", ds, "-c", "3d_fullres", "-f", "0",
          "-tr", trainer, "-p", "nnUNetMiMPlans", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
         env, tmp_path)
    assert len(list(pred.glob("*.nii.gz"))) == 1
