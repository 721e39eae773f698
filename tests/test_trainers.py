"""Schedule variants of the trainers: their numbers land on the trainer after every base constructor."""
import json

import numpy as np
import pytest
import torch

from nnunet_hyspark.trainers.nnUNetTrainerHySparK import ScheduleVariant, nnUNetTrainerHySparK
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import (nnUNetTrainerHySparKFinetune,
                                                                  nnUNetTrainerHySparKFinetune_frozen_test)


@pytest.fixture
def plans_and_dataset(synthetic_ct, monkeypatch):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, synthetic_ct["env"][k])
    folder = next(synthetic_ct["preprocessed"].glob("Dataset501_*"))

    def make(cls):
        plans = json.loads((folder / "nnUNetHySparKPlans.json").read_text())
        plans["continue_training"] = False  # nnU-Net 2.8.1 pops it in the constructor
        return cls(plans, "3d_fullres", 0, json.loads((folder / "dataset.json").read_text()), torch.device("cpu"))

    return make


@pytest.mark.e2e
def test_schedule_overrides_the_fine_tuning_trainers_own_settings(plans_and_dataset):
    t = plans_and_dataset(nnUNetTrainerHySparKFinetune_frozen_test)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.save_every) == (2, 5, 1, 1)
    assert (t.initial_lr, t.warmup_epochs, t.freeze_encoder_epochs) == (3e-3, 1, 1)  # the base sets 3e-4, 20, 0
    assert sorted(t.my_init_kwargs) == ["configuration", "dataset_json", "device", "fold", "plans"]


@pytest.mark.e2e
def test_a_misspelt_schedule_attribute_is_an_error(plans_and_dataset):
    class Misspelt(ScheduleVariant, nnUNetTrainerHySparK):
        schedule = {"num_epoch": 3}

    with pytest.raises(AttributeError, match="num_epoch"):
        plans_and_dataset(Misspelt)
    assert plans_and_dataset(nnUNetTrainerHySparKFinetune).warmup_epochs == 20


@pytest.mark.e2e
def test_the_test_schedule_is_seeded(plans_and_dataset):
    from nnunet_hyspark.trainers.nnUNetTrainerHySparK import nnUNetTrainerHySparK_test

    draws = []
    for _ in range(2):
        plans_and_dataset(nnUNetTrainerHySparK_test)
        draws.append((torch.rand(3), np.random.rand(3)))
    assert torch.equal(draws[0][0], draws[1][0]) and (draws[0][1] == draws[1][1]).all()


# ------------------------------------------------------------------ the papers' fine-tuning protocol


def _plans_for(spec) -> dict:
    """Plans of one 3d_fullres configuration naming the method's network (nnU-Net 2.8.1's trainer constructor
    reads no files; the network is built by the test)."""
    same = "resample_data_or_seg_to_shape"
    config = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "patch_size": [32, 32, 32], "median_image_size_in_voxels": [64, 64, 64], "spacing": [1.0, 1.0, 1.0],
              "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "batch_dice": False,
              "resampling_fn_data": same, "resampling_fn_seg": same, "resampling_fn_probabilities": same,
              "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities_kwargs": {},
              "architecture": {"network_class_name": spec.network.class_name, "arch_kwargs": {},
                               "_kw_requires_import": []}}
    return {"dataset_name": "Dataset999_Fake", "plans_name": spec.plans_name, "image_reader_writer": "SimpleITKIO",
            "original_median_spacing_after_transp": [1.0] * 3, "original_median_shape_after_transp": [64] * 3,
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
            "experiment_planner_used": "x", "label_manager": "LabelManager", "continue_training": False,
            "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0}}}


def _tiny_network(method: str) -> torch.nn.Module:
    from nnunet_hyspark.methods import METHODS

    if method == "hyspark":
        from nnunet_hyspark.planners.hyspark_planner import ARCH_PRESETS
        arch = dict(ARCH_PRESETS["tiny"])
    elif method == "mim":
        from nnunet_hyspark.planners.mim_planner import ARCH_PRESETS
        arch = dict(ARCH_PRESETS["tiny"])
    else:
        from nnunet_hyspark.planners.hiend_mae_planner import ARCH_PRESETS
        arch = {**ARCH_PRESETS["tiny"], "vit_patch": 16}
    return METHODS[method].network.build(arch, 1, 2)


@pytest.fixture
def paper_trainer(tmp_path, monkeypatch):
    from nnunet_hyspark.methods import METHODS

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / k))
    monkeypatch.delenv("HYSPARK_PRETRAINED_WEIGHTS", raising=False)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
                    "file_ending": ".nii.gz"}

    def make(cls, method: str):
        t = cls(_plans_for(METHODS[method]), "3d_fullres", 0, dataset_json, torch.device("cpu"))
        t.network = _tiny_network(method)
        return t

    return make


PAPER = {"hyspark": "nnUNetTrainerHySparKFinetunePaper", "mim": "nnUNetTrainerMiMFinetunePaper",
         "hiend_mae": "nnUNetTrainerHiEndMAEFinetunePaper"}


def _lrs(scheduler, step: int) -> dict[str, float]:
    scheduler.step(step)
    return {g["group"]: g["lr"] for g in scheduler.optimizer.param_groups}


@pytest.mark.parametrize("method", sorted(PAPER))
def test_paper_protocol_trains_the_encoder_at_the_full_rate_with_the_papers_optimiser(paper_trainer, method):
    import nnunet_hyspark.trainers.nnUNetTrainerFinetunePaper as P
    from nnunet_hyspark.methods import METHODS

    ours_cls = {"hyspark": nnUNetTrainerHySparKFinetune, "mim": P.nnUNetTrainerMiMFinetune,
                "hiend_mae": P.nnUNetTrainerHiEndMAEFinetune}[method]
    t = paper_trainer(getattr(P, PAPER[method]), method)
    protocol = P.PAPER_PROTOCOLS[method]
    assert (t.initial_lr, t.weight_decay, t.encoder_lr_scale) == (protocol.lr, protocol.weight_decay, 1.0)
    optimizer, scheduler = t.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == protocol.betas
    groups = {g["group"]: g for g in optimizer.param_groups}
    assert set(groups) == {"encoder/decay", "encoder/no_decay", "decoder/decay", "decoder/no_decay"}
    assert {g["group"]: g.get("lr_scale", 1.0) for g in groups.values()} == dict.fromkeys(groups, 1.0)
    assert {g["group"]: g["weight_decay"] for g in groups.values()} == {
        "encoder/decay": 1e-5, "decoder/decay": 1e-5, "encoder/no_decay": 0.0, "decoder/no_decay": 0.0}
    n_params = sum(1 for p in t.network.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_params
    # 1000 epochs: linear warm-up from 0 over 10 epochs (1 %), then cosine to 0, the same for every group
    assert t.num_epochs == 1000 and t.warmup_epochs == 10
    assert set(_lrs(scheduler, 0).values()) == {0.0}
    assert _lrs(scheduler, 5) == pytest.approx(dict.fromkeys(groups, 0.5e-4))
    assert _lrs(scheduler, 10) == pytest.approx(dict.fromkeys(groups, 1e-4))
    assert _lrs(scheduler, 505) == pytest.approx(dict.fromkeys(groups, 0.5e-4))
    assert _lrs(scheduler, 1000) == pytest.approx(dict.fromkeys(groups, 0.0), abs=1e-12)
    # ours, for contrast: the encoder at 0.1 x, 20 warm-up epochs capped at 10 % of the run
    ours = paper_trainer(ours_cls, method)
    _, scheduler = ours.configure_optimizers()
    lrs = _lrs(scheduler, 100)
    assert lrs["encoder/decay"] == pytest.approx(0.1 * lrs["decoder/decay"])


def test_demo_warms_up_over_three_epochs_not_one_jump(paper_trainer):
    """nnU-Net sets the lr once per epoch: a 1-epoch warm-up jumped 1e-4 -> 1e-2 and the demo's organs
    collapsed to background (see the demo trainer's docstring); its ramp must stay gradual."""
    from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import nnUNetTrainerHySparKFinetune_demo

    t = paper_trainer(nnUNetTrainerHySparKFinetune_demo, "hyspark")
    _, scheduler = t.configure_optimizers()
    lrs = [_lrs(scheduler, epoch)["decoder/decay"] for epoch in range(t.num_epochs)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[3] == pytest.approx(1e-2) == max(lrs)
    assert lrs[1] == pytest.approx(1e-4 + (1e-2 - 1e-4) / 3) and lrs[2] == pytest.approx(1e-4 + 2 * (1e-2 - 1e-4) / 3)
    assert all(b < a for a, b in zip(lrs[3:], lrs[4:]))  # then cosine decay
    # other schedules keep the cap at a tenth of their epochs: the same 12 epochs warm up over 1
    other = paper_trainer(nnUNetTrainerHySparKFinetune, "hyspark")
    other.num_epochs, other.warmup_epochs, other.initial_lr = 12, 3, 1e-2
    _, scheduler = other.configure_optimizers()
    assert _lrs(scheduler, 1)["decoder/decay"] == pytest.approx(1e-2)


@pytest.mark.parametrize("method", sorted(PAPER))
def test_paper_protocol_test_schedules_keep_the_protocol(paper_trainer, method):
    import nnunet_hyspark.trainers.nnUNetTrainerFinetunePaper as P

    t = paper_trainer(getattr(P, PAPER[method] + "_test"), method)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.initial_lr, t.encoder_lr_scale) == (1, 3, 1e-4, 1.0)
    _, scheduler = t.configure_optimizers()
    assert t.warmup_epochs == 0 and set(_lrs(scheduler, 0).values()) == {1e-4}  # one epoch: the peak, no warm-up


def test_nnunet_finds_the_paper_trainers(monkeypatch):
    import nnunet_hyspark.trainers.nnUNetTrainerFinetunePaper as P
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_hyspark.methods import METHODS, method_for_trainer
    from nnunet_hyspark.nnunet_compat import ext_trainer_value

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value())
    for method, name in PAPER.items():
        for variant in (name, name + "_test"):
            assert recursive_find_trainer_class_by_name(variant) is getattr(P, variant)
            assert method_for_trainer(variant) is METHODS[method]  # the benchmark knows which weights it takes
