"""HySparKPlanner, the memory estimate and ``hyspark_plan_and_preprocess`` (tiny volumes, -np 1)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_hyspark.methods.hyspark import memory
from nnunet_hyspark.cli.plan_and_preprocess import main
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.planners.hyspark_planner import (ARCH_PRESETS, DEEP_SUPERVISION_STRIDES, NETWORK_CLASS_NAME,
                                                     PLANS_NAME, HySparKPlanner)
from nnunet_hyspark.synthetic import write_dataset

TINY = ARCH_PRESETS["tiny"]
BASE = ARCH_PRESETS["base"]
ISO_ID, UNLABELED_ID = 901, 903
CONFIG_DIR = f"{PLANS_NAME}_3d_fullres"


# ----------------------------------------------------------------------------------------------- fixtures


def _set_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("nnUNet_raw", str(root / "raw"))
    mp.setenv("nnUNet_preprocessed", str(root / "pre"))
    mp.setenv("nnUNet_results", str(root / "res"))
    mp.setenv("nnUNet_def_n_proc", "1")
    mp.setenv("nnUNet_n_proc_DA", "0")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """nnU-Net folders with one labelled dataset (901) planned and preprocessed by the command (tiny arch)."""
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, root)
        write_dataset(root / "raw", ISO_ID, "HypIso", num_cases=3, shape=(32, 32, 32), spacing=(1.5, 1.5, 1.5),
                      seed=0, progress=False)
        assert main(["-d", str(ISO_ID), "-np", "1", "--arch", "tiny"]) == 0
        yield root


@pytest.fixture
def env(workdir, monkeypatch):
    _set_env(monkeypatch, workdir)
    return workdir


def _iso_name(root: Path) -> str:
    return next((root / "raw").glob(f"Dataset{ISO_ID}_*")).name


def _snapshot(folder: Path) -> dict:
    """Relative path -> content hash of everything under ``folder``."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _expect_user_error(capsys, argv, *fragments) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _fake_fingerprint(root: Path, dataset_id: int, spacings, shapes, num_training: int | None = None) -> str:
    """A raw dataset (two 16^3 cases, for the reader and file lists) with a hand-written fingerprint."""
    folder = write_dataset(root / "raw", dataset_id, f"Fp{dataset_id}", num_cases=2, shape=(16, 16, 16),
                           spacing=(1.0, 1.0, 1.0), seed=0, progress=False)
    dj = json.loads((folder / "dataset.json").read_text())
    dj["numTraining"] = num_training or len(spacings)
    (folder / "dataset.json").write_text(json.dumps(dj))
    pre = root / "pre" / folder.name
    pre.mkdir(parents=True)
    stats = {"mean": 50.0, "median": 50.0, "std": 40.0, "min": -100.0, "max": 300.0, "percentile_99_5": 250.0,
             "percentile_00_5": -80.0}
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": spacings, "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {"0": stats},
        "median_relative_size_after_cropping": 1.0}))
    return folder.name


def _quiet_plan(planner: HySparKPlanner) -> dict:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return planner.plan_experiment()


# ----------------------------------------------------------------------------------------------- memory estimate


@pytest.mark.parametrize("arch", ["tiny", "base"])
def test_memory_estimate_is_monotone_in_patch_and_batch(arch):
    kw = ARCH_PRESETS[arch]
    patches = [[32, 32, 32], [32, 32, 48], [48, 48, 48], [64, 64, 64], [96, 96, 96], [128, 128, 128]]
    for bs in (1, 2, 4):
        est = [memory.estimate_training_memory_gb(p, bs, **kw) for p in patches]
        assert all(a < b for a, b in zip(est, est[1:])), est
    for p in patches:
        est = [memory.estimate_training_memory_gb(p, bs, **kw) for bs in (1, 2, 3, 8)]
        assert all(a < b for a, b in zip(est, est[1:])), est
    assert memory.estimate_training_memory_gb([64] * 3, 2, num_classes=14, **kw) > \
        memory.estimate_training_memory_gb([64] * 3, 2, num_classes=2, **kw)


@pytest.mark.parametrize("arch", ["tiny", "base"])
def test_parameter_count_matches_the_network(arch):
    from nnunet_hyspark.methods.hyspark.network import HySparKUNet

    net = HySparKUNet(1, 4, **ARCH_PRESETS[arch])
    assert memory.count_parameters(1, 4, **ARCH_PRESETS[arch]) == sum(p.numel() for p in net.parameters())


def test_activation_estimate_matches_what_autograd_keeps():
    """The per-layer accounting against the bytes autograd really saves (CPU autocast, tiny net, 32x32x48)."""
    from nnunet_hyspark.methods.hyspark.network import HySparKUNet

    torch.manual_seed(0)
    net = HySparKUNet(1, 2, **TINY)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    patch = (32, 32, 48)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = net(torch.randn(1, 1, *patch))
        for o in outs:  # nnU-Net's loss: CE + soft Dice on every deep-supervision output
            tgt = torch.randint(0, 2, (1, *o.shape[2:]))
            p = torch.softmax(o.float(), 1)
            onehot = torch.zeros_like(p, dtype=torch.bool).scatter_(1, tgt[:, None], True)
            torch.nn.functional.cross_entropy(o, tgt) + (p * onehot).sum() / (p.sum() + onehot.sum())
    measured = sum(v for k, v in saved.items() if k not in params)
    estimate = memory.activation_bytes_per_sample(patch, 1, 2, **TINY)
    assert 0.8 < estimate / measured < 1.25, (estimate, measured)


def test_base_network_at_96_cubed_is_a_single_gpu_job():
    est = memory.estimate_training_memory([96, 96, 96], 2, **BASE)
    assert 8 < est.total_gb < 40, str(est)
    assert memory.max_batch_size([96, 96, 96], est.total_gb, **BASE) == 2
    assert memory.max_batch_size([96, 96, 96], 0.5, **BASE) == 0


# ----------------------------------------------------------------------------------------------- planner


PLANNER_CASES = {
    # name: (spacings, shapes, arch, target GB)
    "isotropic-ct": ([[1.5, 1.5, 1.5]] * 40, [[200, 250, 250]] * 40, "base", 24.0),
    "anisotropic-ct": ([[2.5, 0.8, 0.8]] * 40, [[150, 512, 512]] * 40, "base", 24.0),
    "thick-slices-tiny": ([[5.0, 0.7, 0.7]] * 6, [[30, 200, 180]] * 6, "tiny", 2.0),
}


@pytest.mark.parametrize("case", sorted(PLANNER_CASES))
def test_planner_constraints(case, tmp_path, monkeypatch):
    _set_env(monkeypatch, tmp_path)
    spacings, shapes, arch, target = PLANNER_CASES[case]
    name = _fake_fingerprint(tmp_path, 950, spacings, shapes)
    planner = HySparKPlanner(name, gpu_memory_target_in_gb=target, arch=arch)
    plans = _quiet_plan(planner)
    assert plans["plans_name"] == PLANS_NAME
    assert (tmp_path / "pre" / name / f"{PLANS_NAME}.json").is_file()
    configs = plans["configurations"]
    assert "3d_fullres" in configs
    assert configs["2d"]["architecture"]["network_class_name"].endswith("PlainConvUNet")  # 2d stays nnU-Net's
    for c in ("3d_fullres", "3d_lowres"):
        if c not in configs:
            continue
        cfg = configs[c]
        patch, bs = cfg["patch_size"], cfg["batch_size"]
        assert len(patch) == 3 and all(p >= 16 and p % 16 == 0 for p in patch), patch
        median = cfg["median_image_size_in_voxels"]
        assert all(p <= max(16, int(np.ceil(m / 16) * 16)) for p, m in zip(patch, median)), (patch, median)
        arch_cfg = cfg["architecture"]
        assert arch_cfg["network_class_name"] == NETWORK_CLASS_NAME
        assert arch_cfg["_kw_requires_import"] == []
        kw = arch_cfg["arch_kwargs"]
        assert kw["patch_size"] == patch and kw["strides"] == DEEP_SUPERVISION_STRIDES
        assert {k: kw[k] for k in ARCH_PRESETS[arch]} == ARCH_PRESETS[arch]
        assert bs >= 2
        assert planner.estimate(patch, 2).total_gb <= target
        assert planner.estimate(patch, bs).total_gb <= target
        five_percent = round(np.prod(median) * len(spacings) * 0.05 / np.prod(patch))
        assert bs == 2 or bs == five_percent or planner.estimate(patch, bs + 1).total_gb > target
        assert bs <= max(2, five_percent)
    # nnU-Net's trainer reads the deep-supervision scales from the strides: 1, 1/2, 1/4, 1/8
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration("3d_fullres")
    scales = 1 / np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0)[:-1]
    assert np.allclose(scales, [[1] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3])


def test_planner_patch_grows_with_memory_target(tmp_path, monkeypatch):
    _set_env(monkeypatch, tmp_path)
    name = _fake_fingerprint(tmp_path, 951, [[1.0, 1.0, 1.0]] * 20, [[300, 300, 300]] * 20)
    planner = HySparKPlanner(name, arch="base")
    median = [300.0] * 3
    sizes = []
    for target in (8, 16, 40):
        planner.UNet_vram_target_GB = target
        patch = planner.shrink_to_fit(planner.initial_patch_size([1.0] * 3, median), median)
        assert all(p % 16 == 0 for p in patch) and max(patch) - min(patch) <= 16
        sizes.append(np.prod(patch))
    assert sizes[0] < sizes[1] < sizes[2]


def test_planner_refuses_thin_volumes_and_warns_on_small_ones(tmp_path, monkeypatch):
    _set_env(monkeypatch, tmp_path)
    name = _fake_fingerprint(tmp_path, 952, [[1.0, 1.0, 1.0]] * 4, [[4, 128, 128]] * 4)
    with pytest.raises(HySparKError, match="2d configuration"):
        _quiet_plan(HySparKPlanner(name, arch="tiny"))
    assert not (tmp_path / "pre" / name / f"{PLANS_NAME}.json").exists()
    name = _fake_fingerprint(tmp_path, 953, [[1.0, 1.0, 1.0]] * 4, [[12, 128, 128]] * 4)
    planner = HySparKPlanner(name, arch="tiny")
    plans = _quiet_plan(planner)
    assert plans["configurations"]["3d_fullres"]["patch_size"][0] == 16
    assert any("pads" in n for n in planner.hyspark_notes)


def test_planner_memory_target_too_small(tmp_path, monkeypatch):
    _set_env(monkeypatch, tmp_path)
    name = _fake_fingerprint(tmp_path, 954, [[1.0, 1.0, 1.0]] * 4, [[64, 64, 64]] * 4)
    with pytest.raises(HySparKError, match="--gpu-memory-target"):
        _quiet_plan(HySparKPlanner(name, gpu_memory_target_in_gb=0.5, arch="base"))


def test_network_rejects_other_strides():
    from nnunet_hyspark.methods.hyspark.network import HySparKUNet

    HySparKUNet(1, 2, strides=DEEP_SUPERVISION_STRIDES, **TINY)
    with pytest.raises(ValueError, match="strides"):
        HySparKUNet(1, 2, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], **TINY)


# ----------------------------------------------------------------------------------------------- the command


def test_command_plans_and_preprocesses_a_labelled_dataset(env):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    name = _iso_name(env)
    pre = env / "pre" / name
    plans = json.loads((pre / f"{PLANS_NAME}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [32, 32, 32] and cfg["batch_size"] >= 2
    assert cfg["architecture"]["network_class_name"] == NETWORK_CLASS_NAME
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    assert (pre / "dataset_fingerprint.json").is_file() and len(list((pre / "gt_segmentations").iterdir())) == 3
    folder = pre / cfg["data_identifier"]
    ds = infer_dataset_class(str(folder))(str(folder))
    assert len(ds.identifiers) == 3
    data, seg, _, props = ds.load_case(ds.identifiers[0])
    assert data.shape[1:] == seg.shape[1:] and "class_locations" in props
    assert not list(pre.glob("*.hyspark-previous"))


def test_network_from_the_plans_builds_and_runs(env):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(env / "pre" / _iso_name(env) / f"{PLANS_NAME}.json"))
    cm = pm.get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 4, allow_init=True,
                                 deep_supervision=True)
    with torch.no_grad():
        outs = net(torch.zeros(1, 1, *cm.patch_size))
    scales = 1 / np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0)[:-1]  # nnU-Net trainer's formula
    assert len(outs) == len(scales)
    for o, s in zip(outs, scales):
        assert list(o.shape) == [1, 4] + [int(p * f) for p, f in zip(cm.patch_size, s)]


def test_unlabeled_collection_with_plans_from(env):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, infer_dataset_class

    folder = write_dataset(env / "raw", UNLABELED_ID, "HypUnl", num_cases=2, shape=(32, 32, 32),
                           spacing=(1.0, 1.0, 1.0), seed=3, unlabeled=True, progress=False)
    assert main(["-d", str(UNLABELED_ID), "--plans-from", str(ISO_ID), "-np", "1"]) == 0
    source = json.loads((env / "pre" / _iso_name(env) / f"{PLANS_NAME}.json").read_text())
    plans = json.loads((env / "pre" / folder.name / f"{PLANS_NAME}.json").read_text())
    assert plans["dataset_name"] == folder.name
    assert plans["configurations"] == source["configurations"]  # same spacing, patch, normalisation
    assert plans["foreground_intensity_properties_per_channel"] == \
        source["foreground_intensity_properties_per_channel"]  # the source's CT statistics
    out = env / "pre" / folder.name / CONFIG_DIR
    assert infer_dataset_class(str(out)) is nnUNetDatasetBlosc2
    ds = nnUNetDatasetBlosc2(str(out))
    assert len(ds.identifiers) == 2
    data, seg, _, props = ds.load_case(ds.identifiers[0])
    assert data.shape[0] == 1 and data.shape[1:] == seg.shape[1:]
    # resampled to the source's 1.5 mm spacing
    assert data.shape[1:] == tuple(round(n * 1.0 / 1.5) for n in props["shape_after_cropping_and_before_resampling"])
    assert set(np.unique(seg[:]).tolist()) <= {-1, 0}  # nnU-Net's "no label": 0 inside the image, -1 outside
    assert props["class_locations"] == {}
    assert np.isfinite(data[:]).all() and abs(float(np.mean(data[:]))) < 10  # CT-normalised, not raw HU
    assert not (env / "pre" / folder.name / "gt_segmentations").exists()


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_dataset_id(env, capsys):
    _expect_user_error(capsys, ["-d", "999", "-np", "1"], "999", "not found")
    assert not list((env / "pre").glob("Dataset999*"))


def test_missing_environment_variable(env, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_preprocessed")
    _expect_user_error(capsys, ["-d", str(ISO_ID)], "nnUNet_preprocessed")


def test_patch_size_not_a_multiple_of_16(env, capsys):
    _expect_user_error(capsys, ["-d", str(ISO_ID), "--patch-size", "32", "40", "32"], "axis 1", "multiple of 16")


def test_patch_size_larger_than_every_volume_leaves_outputs_untouched(env, capsys):
    pre = env / "pre" / _iso_name(env)
    before = _snapshot(pre)
    _expect_user_error(capsys, ["-d", str(ISO_ID), "-np", "1", "--arch", "tiny", "--patch-size", "64", "32", "32"],
                       "axis 0", "largest volume")
    assert _snapshot(pre) == before


def _copy_dataset(env: Path, new_id: int, name: str) -> Path:
    dst = env / "raw" / f"Dataset{new_id:03d}_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(env / "raw" / _iso_name(env), dst)
    return dst


def test_non_ct_channel_is_refused(env, capsys):
    folder = _copy_dataset(env, 905, "HypMR")
    dj = json.loads((folder / "dataset.json").read_text())
    dj["channel_names"] = {"0": "MRI"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    _expect_user_error(capsys, ["-d", "905", "-np", "1"], "MRI", "--allow-non-ct")
    assert not (env / "pre" / folder.name).exists()
    from nnunet_hyspark.planning.raw_checks import check_channels

    check_channels(folder.name, dj, allow_non_ct=True)  # the switch lets it through


def test_unlabeled_without_plans_from_is_refused(env, capsys):
    folder = write_dataset(env / "raw", 906, "HypUnl2", num_cases=2, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0),
                           seed=1, unlabeled=True, progress=False)
    _expect_user_error(capsys, ["-d", "906", "-np", "1"], "no labels", "--plans-from")
    assert not (env / "pre" / folder.name).exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped-bytes"])
def test_corrupt_image_is_named_and_nothing_is_written(env, capsys, damage):
    folder = _copy_dataset(env, 907, "HypBad")
    victim = sorted((folder / "imagesTr").iterdir())[1]
    raw = bytearray(victim.read_bytes())
    if damage == "garbage":
        victim.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
        victim.write_bytes(bytes(raw))
    _expect_user_error(capsys, ["-d", "907", "-np", "1"], "cannot read", str(victim))
    assert not (env / "pre" / folder.name).exists()


def test_failure_while_preprocessing_restores_the_previous_outputs(env, monkeypatch):
    """A crash half-way through preprocessing leaves the preprocessed folder exactly as it was."""
    import nnunetv2.experiment_planning.plan_and_preprocess_api as api

    pre = env / "pre" / _iso_name(env)
    before = _snapshot(pre)

    def half_written(dataset_id, plans_identifier, configurations, *args, **kwargs):
        out = pre / CONFIG_DIR
        out.mkdir(exist_ok=True)
        (out / "partial.b2nd").write_bytes(b"half")
        (pre / "gt_segmentations").mkdir(exist_ok=True)
        raise RuntimeError("worker crashed")

    monkeypatch.setattr(api, "preprocess_dataset", half_written)
    with pytest.raises(RuntimeError, match="worker crashed"):
        main(["-d", str(ISO_ID), "-np", "1", "--arch", "tiny", "--gpu-memory-target", "12"])
    assert _snapshot(pre) == before
    assert not list(pre.glob("*.hyspark-previous"))


def test_failure_on_a_new_dataset_removes_its_folder(env, monkeypatch):
    import nnunet_hyspark.planning.nnunet_steps as steps

    folder = _copy_dataset(env, 908, "HypNew")

    def crash(name, num_processes, clean):
        out = env / "pre" / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "dataset_fingerprint.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(steps, "fingerprint", crash)
    with pytest.raises(SystemExit) as e:
        main(["-d", "908", "-np", "1"])
    assert e.value.code == 130
    assert not (env / "pre" / folder.name).exists()


def test_console_script_prints_one_line(env):
    exe = Path(sys.executable).with_name("hyspark_plan_and_preprocess")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nnunet_hyspark.cli.plan_and_preprocess"]
    r = subprocess.run(cmd + ["-d", "998", "-np", "1"], capture_output=True, text=True, env=dict(os.environ),
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
