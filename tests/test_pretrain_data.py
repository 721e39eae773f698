"""Tests of the pre-training data pipeline (nnunet_hyspark.pretraining.data) on tiny fake preprocessed datasets."""
from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest
import torch

from fakes import write_fake_preprocessed_dataset
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.data_recipe import DataRecipe
from nnunet_hyspark.pretraining.data import (
    PerAxisMirrorTransform,
    PretrainDataConfig,
    body_threshold_to_normalized,
    build_pretrain_loaders,
    build_pretrain_transforms,
    measure_crops_per_second,
    pretrain_loaders,
)

FG = {"mean": 0.0, "std": 300.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}
AIR = -1000.0 / 300.0  # normalised air value of the fake CT
NO_FLIPS = DataRecipe(flip_probs=(0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """nnUNet_preprocessed with: 101 (4 cases), 102 (compatible, 2 cases), 103 (other spacing),
    104 (other CT clip values), 105 (plans patch not a multiple of 16), 106 (small body in a corner),
    107 (z-score normalisation)."""
    d = str(tmp_path_factory.mktemp("nnUNet_preprocessed"))
    write_fake_preprocessed_dataset(d, 101, "Fake", fg_props=dict(FG))
    write_fake_preprocessed_dataset(d, 102, "Other", shapes=((1, 36, 40, 44),) * 2, fg_props=dict(FG), seed=1,
                                    labelled=True)
    write_fake_preprocessed_dataset(d, 103, "Spacing", shapes=((1, 32, 32, 32),), spacing=(2.0, 2.0, 2.0),
                                    fg_props=dict(FG))
    write_fake_preprocessed_dataset(d, 104, "Clip", shapes=((1, 32, 32, 32),),
                                    fg_props=dict(FG, percentile_00_5=-900.0))
    write_fake_preprocessed_dataset(d, 105, "BadPatch", shapes=((1, 32, 32, 32),), patch_size=(32, 40, 32),
                                    fg_props=dict(FG))
    write_fake_preprocessed_dataset(d, 106, "Corner", shapes=((1, 64, 64, 64),) * 2, patch_size=(16, 16, 16),
                                    body_fraction=0.12, body_center=(0.2, 0.25, 0.3), fg_props=dict(FG), seed=2)
    write_fake_preprocessed_dataset(d, 107, "MR", shapes=((1, 48, 48, 48),) * 2, patch_size=(16, 16, 16),
                                    body_fraction=0.3, body_center=(0.3, 0.3, 0.3), normalization="ZScoreNormalization",
                                    seed=3)
    return d


def cfg_for(pre, ids=(101,), **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 2)
    return PretrainDataConfig(list(ids), preprocessed_dir=pre, **kw)


def test_batches_shape_dtype_and_info(pre):
    with pretrain_loaders(cfg_for(pre, batch_size=3)) as (train, val, info):
        for _ in range(3):
            b = next(train)
            assert b.shape == (3, 1, 32, 32, 32) and b.dtype == torch.float32
            assert torch.isfinite(b).all()
        v = next(val)
        assert v.shape == (3, 1, 32, 32, 32) and v.dtype == torch.float32
    assert info["patch_size"] == (32, 32, 32)  # from the plans
    assert info["spacing"] == (1.5, 1.5, 1.5)
    assert info["normalization_schemes"] == ["CTNormalization"]
    assert info["num_input_channels"] == 1
    assert info["foreground_intensity_properties_per_channel"]["0"]["std"] == 300.0
    assert info["body_threshold_normalized"] == pytest.approx(-500 / 300)
    assert info["batch_size"] == 3 and info["num_val_batches"] == len(val)


def test_body_threshold_conversion():
    assert body_threshold_to_normalized(-500, FG) == pytest.approx(-500 / 300)
    # below the lower clip value the threshold is the clipped minimum
    assert body_threshold_to_normalized(-500, dict(FG, percentile_00_5=-200.0)) == pytest.approx(-200 / 300)


def test_split_disjoint_deterministic_across_datasets(pre):
    def split(seed, rank=0, world=1):
        _, val, info = build_pretrain_loaders(cfg_for(pre, (101, 102), seed=seed, val_fraction=0.34,
                                                      rank=rank, world_size=world))
        tr = {(d, c) for d, cs in info["train_cases"].items() for c in cs}
        va = {(d, c) for d, cs in info["val_cases"].items() for c in cs}
        return tr, va

    tr, va = split(0)
    assert len(va) == 2 and len(tr) == 4 and not tr & va
    assert {d for d, _ in tr | va} == {"Dataset101_Fake", "Dataset102_Other"}
    assert split(0) == (tr, va)
    assert split(0, rank=1, world=2) == (tr, va)  # all ranks agree on the split
    assert any(split(s)[1] != va for s in range(1, 6))
    # at least one validation case whenever there are two cases
    _, _, info = build_pretrain_loaders(cfg_for(pre, (102,), val_fraction=0.01))
    assert len(info["val_cases"]["Dataset102_Other"]) == 1
    _, val, info = build_pretrain_loaders(cfg_for(pre, (103,)))  # a single case: nothing held out
    assert val is None and info["val_cases"] == {"Dataset103_Spacing": []}


def test_train_and_val_batches_come_from_their_split_and_val_is_fixed(pre):
    cfg = cfg_for(pre, (101, 102), val_fraction=0.34, val_crops_per_case=3)
    train, val, info = build_pretrain_loaders(cfg)
    train_keys = {f"{d}/{c}" for d, cs in info["train_cases"].items() for c in cs}
    val_keys = {f"{d}/{c}" for d, cs in info["val_cases"].items() for c in cs}
    for _ in range(6):
        next(train)
        assert set(train.last_keys) <= train_keys
    assert len(val) == 3  # 2 cases x 3 crops / batch 2
    first = [next(val) for _ in range(len(val))]
    assert {k for k in val.last_keys} <= val_keys
    second = [next(val) for _ in range(len(val))]  # cycles: the same batches again
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # a fresh iterator without cache (partial reads) gives the same batches
    _, val2, _ = build_pretrain_loaders(cfg_for(pre, (101, 102), val_fraction=0.34, val_crops_per_case=3,
                                                val_cache_mb=0, seed=0, rank=1, world_size=2))
    third = [next(val2) for _ in range(len(val2))]
    assert all(torch.equal(a, b) for a, b in zip(first, third))
    val.reset()
    assert torch.equal(next(val), first[0])


def test_body_bias(pre):
    # body: a ball of radius ~3.8 voxels in a 64^3 volume (~0.09 % of the voxels)
    thr = body_threshold_to_normalized(-500, FG)

    def body_fraction(**kw):
        train, _, _ = build_pretrain_loaders(cfg_for(pre, (106,), batch_size=8, val_fraction=0, **kw))
        return float(np.mean([(next(train) > thr).float().mean().item() for _ in range(6)]))

    biased, uniform = body_fraction(), body_fraction(body_threshold=None)
    assert biased > 0.03, biased
    assert biased > 8 * uniform, (biased, uniform)


def test_body_bias_percentile_for_non_ct(pre):
    train, _, info = build_pretrain_loaders(cfg_for(pre, (107,), batch_size=8, val_fraction=0,
                                                    body_percentile=99.0))
    assert info["body_mode"] == "percentile" and info["body_threshold_normalized"] is None
    b = next(train)
    vol_high = b.amax(dim=(1, 2, 3, 4))
    assert (vol_high > 2.0).all()  # every crop reaches into the bright "body" (z-scored)


def test_seeds_and_ranks_give_different_crops_and_same_seed_reproduces(pre):
    def first(**kw):
        train, _, _ = build_pretrain_loaders(cfg_for(pre, batch_size=4, **kw))
        return torch.cat([next(train), next(train)])

    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    a = first(seed=0)
    # the loader does not consume the caller's global random state
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(a, first(seed=0))
    assert not torch.equal(a, first(seed=1))
    assert not torch.equal(a, first(seed=0, rank=1, world_size=2))


def test_shard_cases_gives_disjoint_case_sets(pre):
    sets = []
    for r in range(2):
        _, _, info = build_pretrain_loaders(cfg_for(pre, (101, 102), val_fraction=0.34, shard_cases=True,
                                                    rank=r, world_size=2))
        sets.append({(d, c) for d, cs in info["rank_train_cases"].items() for c in cs})
    assert sets[0] and sets[1] and not sets[0] & sets[1]
    assert sets[0] | sets[1] == {(d, c) for d, cs in info["train_cases"].items() for c in cs}


def test_incompatible_datasets_refused(pre):
    with pytest.raises(HySparKError, match="spacing"):
        build_pretrain_loaders(cfg_for(pre, (101, 103)))
    with pytest.raises(HySparKError, match="percentile_00_5"):
        build_pretrain_loaders(cfg_for(pre, (101, 104)))
    with pytest.raises(HySparKError, match="normalisation schemes"):
        build_pretrain_loaders(cfg_for(pre, (106, 107)))


def test_patch_size_must_be_multiple_of_16(pre):
    with pytest.raises(HySparKError, match=r"axis 2 \(z\) = 36 is not a multiple of 16"):
        build_pretrain_loaders(cfg_for(pre, patch_size=(32, 32, 36)))
    with pytest.raises(HySparKError, match=r"nnUNetHySparKPlans.json.*axis 1 \(y\) = 40 is not"):
        build_pretrain_loaders(cfg_for(pre, (105,)))
    build_pretrain_loaders(cfg_for(pre, (105,), patch_size=(32, 32, 32)))  # an override fixes it


def test_missing_preprocessed_data_tells_what_to_run(pre, tmp_path):
    with pytest.raises(HySparKError, match=r"hyspark_plan_and_preprocess -d 999"):
        build_pretrain_loaders(cfg_for(pre, (999,)))
    with pytest.raises(HySparKError, match=r"hyspark_plan_and_preprocess -d 101 --plans-name nnUNetPlans"):
        build_pretrain_loaders(cfg_for(pre, (101,), plans_identifier="nnUNetPlans"))
    with pytest.raises(HySparKError, match=r"hyspark_plan_and_preprocess -d 101 -c 3d_lowres"):
        build_pretrain_loaders(cfg_for(pre, (101,), configuration="3d_lowres"))


def test_padding_with_air_when_volume_smaller_than_patch(pre):
    train, val, _ = build_pretrain_loaders(cfg_for(pre, patch_size=(48, 48, 48), recipe=NO_FLIPS,
                                                   body_threshold=None))
    b = next(train)
    assert b.shape == (2, 1, 48, 48, 48)
    # volume (40, 48, 36): 4 voxels of padding at each x border, 6 at each z border
    assert torch.all(b[:, :, :4] == b.amin()) and torch.all(b[:, :, :, :, -6:] == b.amin())
    assert b.amin().item() == pytest.approx(AIR, abs=0.2)
    assert next(val).shape == (2, 1, 48, 48, 48)


def test_flip_probabilities_per_axis():
    t = PerAxisMirrorTransform((0.2, 0.2, 0.1))
    torch.manual_seed(0)
    counts = np.zeros(3)
    n = 4000
    for _ in range(n):
        for a in t.get_parameters(image=None)["axes"]:
            counts[a] += 1
    np.testing.assert_allclose(counts / n, [0.2, 0.2, 0.1], atol=0.025)
    img = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    out = PerAxisMirrorTransform((0, 1, 0))(image=img.clone())["image"]
    assert torch.equal(out, torch.flip(img, (2,)))
    tr, crop = build_pretrain_transforms((32, 32, 32))
    assert crop == (32, 32, 32) and isinstance(tr.transforms[-1], PerAxisMirrorTransform)
    assert build_pretrain_transforms((32, 32, 32), NO_FLIPS)[0] is None


def test_flips_happen_in_batches(pre):
    # flips draw from the augmentation stream, crop positions from their own stream: with probability 1 on x
    # the batch is exactly the unflipped batch flipped along x
    train, _, _ = build_pretrain_loaders(cfg_for(pre, recipe=DataRecipe(flip_probs=(1.0, 0, 0)), body_threshold=None,
                                                 patch_size=(48, 48, 48), val_fraction=0))
    b = next(train)
    ref, _, _ = build_pretrain_loaders(cfg_for(pre, recipe=NO_FLIPS, body_threshold=None,
                                               patch_size=(48, 48, 48), val_fraction=0))
    assert torch.equal(b, torch.flip(next(ref), (2,)))


def test_rotation_scaling_and_intensity_jitter(pre):
    train, _, info = build_pretrain_loaders(cfg_for(pre, rotation=True, scaling=True, intensity_jitter=True))
    assert all(c > p for c, p in zip(info["crop_size"], info["patch_size"]))
    for _ in range(2):
        b = next(train)
        assert b.shape == (2, 1, 32, 32, 32) and torch.isfinite(b).all()


def test_loader_pickles_for_spawn(pre):
    train, _, _ = build_pretrain_loaders(cfg_for(pre))
    loader = pickle.loads(pickle.dumps(train.loader))
    assert loader.generate_train_batch()["data"].shape == (2, 1, 32, 32, 32)


def test_worker_mode_spawn(pre):
    ctx = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        with pretrain_loaders(cfg_for(pre, num_workers=1)) as (train, _, info):
            assert info["num_workers"] == 1
            for _ in range(3):
                b = next(train)
                assert b.shape == (2, 1, 32, 32, 32) and b.dtype == torch.float32
            proc = train._augmenter._processes[0]
        assert not proc.is_alive()
    finally:
        multiprocessing.set_start_method(ctx, force=True)


def test_measure_crops_per_second(pre):
    r = measure_crops_per_second(cfg_for(pre), seconds=0.2)
    assert r["crops_per_second"] > 0 and r["crops"] == 2 * r["batches"] and r["patch_size"] == (32, 32, 32)
