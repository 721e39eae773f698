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
