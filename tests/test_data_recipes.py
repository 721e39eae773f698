"""Each method's pre-training data recipe (MethodSpec.data_recipe): its statistics on fake preprocessed data,
its augmentation frequencies, the flags that override it, and where it is shown (--help, pretrain_config.json)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import write_fake_preprocessed_dataset
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import METHODS
from nnunet_hyspark.methods.data_recipe import DataRecipe
from nnunet_hyspark.pretraining.data import PretrainDataConfig, body_threshold_to_normalized, build_pretrain_loaders
from nnunet_hyspark.pretraining.data.transforms import PerAxisMirrorTransform, build_pretrain_transforms

FG = {"mean": 0.0, "std": 300.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}
THR = body_threshold_to_normalized(-500, FG)
MIM, HIEND, HYSPARK = (METHODS[m].data_recipe for m in ("mim", "hiend_mae", "hyspark"))


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """101: four 40x48x36 CT-like cases (body centred); 106: two 64^3 cases with a small body in a corner."""
    d = str(tmp_path_factory.mktemp("nnUNet_preprocessed"))
    write_fake_preprocessed_dataset(d, 101, "Fake", fg_props=dict(FG))
    write_fake_preprocessed_dataset(d, 106, "Corner", shapes=((1, 64, 64, 64),) * 2, patch_size=(16, 16, 16),
                                    body_fraction=0.3, body_center=(0.3, 0.35, 0.4), fg_props=dict(FG), seed=2)
    return d


def loaders(pre, ds, recipe, **kw):
    kw = {"num_workers": 0, "batch_size": 8, "val_fraction": 0, "patch_size": (16, 16, 16), **kw}
    return build_pretrain_loaders(PretrainDataConfig([ds], preprocessed_dir=pre, recipe=recipe, **kw))


def test_each_method_has_its_published_recipe():
    assert (HYSPARK.crops_per_volume, HYSPARK.sampler, HYSPARK.flip_probs) == (4, "body", (0.2, 0.2, 0.1))
    assert (HYSPARK.rot90_probability, HYSPARK.intensity_probability) == (0, 0)
    assert (MIM.crops_per_volume, MIM.sampler, MIM.flip_probs) == (1, "uniform", (0, 0, 0))
    assert (MIM.rot90_probability, MIM.intensity_probability) == (0, 0)
    assert (HIEND.crops_per_volume, HIEND.sampler, HIEND.fg_bg_counts()) == (8, "fg_bg", (6, 2))
    assert HIEND.flip_probs == (0.5, 0.5, 0.5) and HIEND.rot90_probability == 0.3
    assert (HIEND.intensity_probability, HIEND.intensity_range) == (0.1, 0.1)
    assert METHODS["mim"].crop_scale == 2  # MiM's crop is twice its level patch


def _locate(crop: np.ndarray, volumes: list[np.ndarray]) -> tuple[int, tuple[int, ...]] | None:
    """(volume, lower bounds) where ``crop`` is a verbatim block of a volume; None if it is nowhere."""
    for vi, vol in enumerate(volumes):
        for lbs in np.argwhere(vol[0] == crop[0, 0, 0, 0]):
            block = vol[(slice(None), *(slice(b, b + s) for b, s in zip(lbs, crop.shape[1:])))]
            if block.shape == crop.shape and np.array_equal(block, crop):
                return vi, tuple(int(b) for b in lbs)
    return None


def test_mim_crops_are_verbatim_uniform_and_one_per_volume(pre):
    train, _, info = loaders(pre, 101, MIM)
    volumes = [train.loader.sampler.load(di, ident) for di, ident in train.loader.cases]
    for n in range(1, 3):
        batch = next(train).numpy()
        assert train.loader.volumes_loaded == 8 * n  # one crop per loaded volume
        # no flips or other augmentation: every crop is the volume's content at its position
        assert all(_locate(crop, volumes) is not None for crop in batch)
    assert set(train.loader.crop_kinds) == {"uniform"} and info["data_recipe"] == MIM
    # positions: uniform over every admissible lower bound (the centred body would bias them inwards)
    rng = np.random.default_rng(0)
    lbs = np.array([p for _ in range(500) for p, _ in train.loader.sampler.positions(volumes[0], 4, (16,) * 3, rng)])
    span = np.array(volumes[0].shape[1:]) - 16
    assert (lbs.min(0) == 0).all() and (lbs.max(0) == span).all()
    np.testing.assert_allclose(lbs.mean(0) / span, 0.5, atol=0.03)
    np.testing.assert_allclose((lbs < span / 4).mean(0), 0.25, atol=0.03)  # flat, not peaked in the middle


def test_hiend_mae_takes_six_foreground_and_two_background_crops_per_volume(pre):
    train, _, _ = loaders(pre, 106, HIEND)
    sampler = train.loader.sampler
    vol = sampler.load(*train.loader.cases[0])
    rng = np.random.default_rng(1)
    for _ in range(50):
        centres = sampler.centres(vol, 8, rng)
        assert Counter(kind for _, kind in centres) == {"fg": 6, "bg": 2}
        for c, kind in centres:
            assert (vol[(0, *c)] > THR) == (kind == "fg")  # foreground = body by the CT threshold
    kinds = [[k for _, k in sampler.centres(vol, 8, rng)] for _ in range(200)]
    assert 0.6 < np.mean([ks[0] == "fg" for ks in kinds]) < 0.9  # mixed order: batches are not all foreground
    for n in range(1, 4):
        b = next(train)
        assert b.shape == (8, 1, 16, 16, 16) and torch.isfinite(b).all()
        assert train.loader.volumes_loaded == n and train.loader.crop_kinds == {"fg": 6 * n, "bg": 2 * n}


def test_hiend_mae_foreground_crops_hold_more_body_than_background_crops(pre):
    recipe = replace(HIEND, flip_probs=(0.0, 0.0, 0.0), rot90_probability=0.0, intensity_probability=0.0)
    train, _, _ = loaders(pre, 106, recipe, batch_size=8)
    sampler, rng = train.loader.sampler, np.random.default_rng(2)
    vol = sampler.load(*train.loader.cases[0])
    body = {"fg": [], "bg": []}
    for _ in range(20):
        for lbs, kind in sampler.positions(vol, 8, (16,) * 3, rng):
            crop = vol[(0, *(slice(b, b + 16) for b in lbs))]
            body[kind].append(float((crop > THR).mean()))
    assert np.mean(body["fg"]) > 0.3 > 0.05 > np.mean(body["bg"])


def test_hiend_mae_augmentation_frequencies():
    tr, _ = build_pretrain_transforms((16, 16, 16), HIEND)
    flips, rot, scale, shift = tr.transforms
    assert isinstance(flips, PerAxisMirrorTransform)
    torch.manual_seed(0)
    np.random.seed(0)
    n = 4000
    axes = Counter(a for _ in range(n) for a in flips.get_parameters(image=None)["axes"])
    np.testing.assert_allclose([axes[a] / n for a in range(3)], [0.5, 0.5, 0.5], atol=0.03)
    for t, p in ((rot, 0.3), (scale, 0.1), (shift, 0.1)):
        assert abs(np.mean([t.get_parameters()["apply_transform"] for _ in range(n)]) - p) < 0.02
    # end to end on a constant image: scale U(0.9, 1.1) and shift U(-0.1, 0.1), each with p 0.1
    out = torch.stack([tr(image=torch.ones(1, 4, 4, 4))["image"] for _ in range(2000)])
    values = out.flatten(1)
    assert (values == values[:, :1]).all()  # one factor and one offset per sample
    changed = (values[:, 0] != 1).float().mean().item()
    assert abs(changed - (1 - 0.9 * 0.9)) < 0.03
    assert values.min() >= 0.8 - 1e-6 and values.max() <= 1.2 + 1e-6


def test_rot90_turns_in_the_last_two_axes_and_keeps_non_square_patches():
    only_rot = DataRecipe(flip_probs=(0.0, 0.0, 0.0), rot90_probability=1.0)
    tr, _ = build_pretrain_transforms((4, 4, 4), only_rot)
    img = torch.arange(64, dtype=torch.float32).reshape(1, 4, 4, 4)
    turns = Counter()
    for _ in range(600):
        out = tr(image=img.clone())["image"]
        k = [k for k in (1, 2, 3) if torch.equal(out, torch.rot90(img, k, dims=(2, 3)))]
        assert len(k) == 1
        turns[k[0]] += 1
    assert all(abs(turns[k] / 600 - 1 / 3) < 0.06 for k in (1, 2, 3))
    tr, _ = build_pretrain_transforms((4, 4, 8), only_rot)  # a 4 x 8 plane: only half turns keep the shape
    img = torch.arange(128, dtype=torch.float32).reshape(1, 4, 4, 8)
    for _ in range(50):
        assert torch.equal(tr(image=img.clone())["image"], torch.rot90(img, 2, dims=(2, 3)))


def test_recipe_values_are_checked():
    for bad, flag in ((DataRecipe(crops_per_volume=0), "crops-per-volume"), (DataRecipe(sampler="x"), "sampler"),
                      (DataRecipe(flip_probs=(0.2, 1.5, 0)), "flip-probabilities"),
                      (DataRecipe(rot90_probability=2), "rot90-probability"),
                      (DataRecipe(fg_bg_ratio=(0, 0)), "fg-bg-ratio")):
        with pytest.raises(HySparKError) as e:
            bad.check()
        assert flag in str(e.value.hint)
    assert DataRecipe(crops_per_volume=4, fg_bg_ratio=(6, 2)).fg_bg_counts() == (3, 1)


# ---------------------------------------------------------------- hyspark_pretrain: defaults, flags, records


def _options(argv: list[str]):
    from nnunet_hyspark.cli.pretrain import build_parser, options_from_args
    from nnunet_hyspark.pretraining.run import with_method_defaults

    opts = options_from_args(build_parser().parse_args(["-d", "1", *argv]))
    return with_method_defaults(opts, METHODS[opts.method])


def test_the_method_chooses_the_recipe_and_flags_override_single_fields():
    from nnunet_hyspark.pretraining.run import data_recipe

    for method in METHODS:
        opts = _options(["--method", method])
        assert data_recipe(opts, METHODS[method]) == METHODS[method].data_recipe
    opts = _options(["--method", "hiend_mae", "--crops-per-volume", "4", "--flip-probabilities", "0", "0", "1",
                     "--rot90-probability", "0", "--fg-bg-ratio", "1", "1"])
    assert data_recipe(opts, METHODS["hiend_mae"]) == replace(HIEND, crops_per_volume=4, flip_probs=(0.0, 0.0, 1.0),
                                                              rot90_probability=0.0, fg_bg_ratio=(1, 1))
    opts = _options(["--method", "mim", "--sampler", "body", "--intensity-probability", "0.5",
                     "--intensity-range", "0.2"])
    assert data_recipe(opts, METHODS["mim"]) == replace(MIM, sampler="body", intensity_probability=0.5,
                                                        intensity_range=0.2)


def test_help_and_pretrain_config_show_the_recipe():
    from nnunet_hyspark.cli.pretrain import build_parser
    from nnunet_hyspark.pretraining.run import run_config

    text = " ".join(build_parser().format_help().split())
    for spec in METHODS.values():
        assert f"{spec.title}: {' '.join(spec.data_recipe.summary().split())}" in text
    assert "8 foreground:background 6:2 crops per volume, flips 0.5/0.5/0.5, rot90 p 0.3" in text
    assert "--crops-per-volume" in text and "HySparK 4, MiM 1, Hi-End-MAE 8" in text
    opts = _options(["--method", "hiend_mae", "--rot90-probability", "0.25"])
    record = json.loads(json.dumps(run_config(opts, METHODS["hiend_mae"], Path("out"))))
    assert (record["crops_per_volume"], record["sampler"], record["rot90_probability"]) == (8, "fg_bg", 0.25)
    assert record["data_recipe"]["fg_bg_ratio"] == [6, 2] and record["data_recipe"]["rot90_probability"] == 0.25
    assert "rot90 p 0.25" in record["data_recipe"]["summary"]
    mim = json.loads(json.dumps(run_config(_options(["--method", "mim"]), METHODS["mim"], Path("out"))))
    assert mim["data_recipe"]["summary"] == "1 uniform crop per volume, no flips"
