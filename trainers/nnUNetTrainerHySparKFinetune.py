"""Fine-tuning the hybrid network from pre-trained encoder weights, through nnU-Net's own command:

    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerHySparKFinetune -p nnUNetHySparKPlans \\
        -pretrained_weights <encoder_weights.pth>

nnU-Net's module-level ``load_pretrained_weights`` does the loading after this
trainer's ``initialize()``. Before that, ``initialize()`` inspects the same file
and (a) refuses weights pre-trained with a different spacing or intensity
normalisation, a different architecture or a different number of input channels
(with the command that fixes it), and (b) logs what will be loaded, missing and
ignored. After loading, ``on_train_start`` verifies the encoder really holds the
file's tensors. The encoder trains at a lower learning rate than the decoder, and
can be frozen for the first epochs.
"""
from __future__ import annotations

import os
import sys

import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import get_method
from nnunet_hyspark.nnunet_compat import Preprocessing, check_weights_fit_plans
from nnunet_hyspark.nnunet_compat import plans_compatibility_problems as compat_problems
from nnunet_hyspark.trainers.nnUNetTrainerHySparK import ScheduleVariant, nnUNetTrainerHySparK, short_schedule
from nnunet_hyspark.weights import format_report, load_weights_file, transfer_report

__all__ = ["nnUNetTrainerHySparKFinetune", "nnUNetTrainerHySparKFinetune_demo", "nnUNetTrainerHySparKFinetune_test",
           "nnUNetTrainerHySparKFinetune_frozen_test", "pretrained_weights_argument", "plans_compatibility_problems"]


def pretrained_weights_argument(argv: list[str] | None = None) -> str | None:
    """The ``-pretrained_weights`` value of the running ``nnUNetv2_train`` command, if any.

    nnU-Net does not hand the path to the trainer, so we read the command line (or the
    ``HYSPARK_PRETRAINED_WEIGHTS`` variable when training is started from Python).
    """
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        if a == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("-pretrained_weights="):
            return a.split("=", 1)[1]
    return os.environ.get("HYSPARK_PRETRAINED_WEIGHTS")


def plans_compatibility_problems(meta: dict, spacing, normalization_schemes, intensity_properties) -> list[str]:
    """Differences in spacing or intensity normalisation between pre-training (``meta``) and this plan
    (the one rule of :mod:`nnunet_hyspark.nnunet_compat`)."""
    plan = Preprocessing(tuple(spacing), tuple(normalization_schemes), intensity_properties)
    return compat_problems(Preprocessing.from_meta(meta), plan, "pre-training", "this plan")


class nnUNetTrainerHySparKFinetune(nnUNetTrainerHySparK):
    """Fine-tunes from ``-pretrained_weights``; encoder at ``encoder_lr_scale`` x the learning rate."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.encoder_lr_scale = 0.1
        self.freeze_encoder_epochs = 0
        self.warmup_epochs = 20
        self.pretrained_weights_file = pretrained_weights_argument()
        self._pretrained_encoder: dict[str, torch.Tensor] | None = None

    def param_group_of(self, name: str) -> tuple[str, dict]:
        if name.startswith("encoder."):
            return "encoder", {"lr_scale": self.encoder_lr_scale, "frozen_until": self.freeze_encoder_epochs}
        return "decoder", {}

    def initialize(self):
        was = self.was_initialized
        super().initialize()
        if not was and self.pretrained_weights_file:
            self._inspect_pretrained(self.pretrained_weights_file)

    def _inspect_pretrained(self, path: str) -> None:
        try:
            file_state, meta = load_weights_file(path)
        except HySparKError as e:
            raise RuntimeError(str(e)) from None
        self._check_plans(meta)
        self._check_channels(file_state)
        report = transfer_report(self._network_module().state_dict(), file_state)
        self.print_to_log_file(f"HySparK pre-trained weights {path} (method {meta.get('method', 'unknown')}):")
        for line in format_report(report, meta):
            self.print_to_log_file(line)
        if report["missing"] or report["shape_mismatch"]:
            raise RuntimeError(
                f"the weights in {path} do not fit this network ({len(report['missing'])} missing, "
                f"{len(report['shape_mismatch'])} of another shape; see the log). The plans' architecture "
                f"(arch_kwargs) must match the pre-training's: {meta.get('architecture')}")
        self._pretrained_encoder = {k: v for k, v in file_state.items() if k.startswith("encoder.")}

    def _check_plans(self, meta: dict) -> None:
        cm = self.configuration_manager
        plan = Preprocessing(tuple(cm.spacing), tuple(cm.normalization_schemes),
                             self.plans_manager.plans.get("foreground_intensity_properties_per_channel"))
        try:
            check_weights_fit_plans(meta, plan, "this plan", self.print_to_log_file)
        except HySparKError as e:  # nnU-Net shows exceptions, not our one-line errors
            raise RuntimeError(str(e)) from None

    # the tensor whose input channels must match the dataset's, and how the error names it;
    # subclasses for other networks set these instead of repeating the check
    stem_key = get_method("hyspark").network.stem_key  # subclasses fine-tune other methods' networks
    stem_name = get_method("hyspark").network.stem_name

    def _check_channels(self, file_state: dict) -> None:
        stem = file_state.get(self.stem_key)
        if stem is not None and stem.shape[1] != self.num_input_channels:
            raise RuntimeError(
                f"the pre-trained {self.stem_name} takes {stem.shape[1]} input channel(s), this dataset has "
                f"{self.num_input_channels}. Adapt the file first: hyspark_convert_checkpoint "
                f"{self.pretrained_weights_file} OUT.pth --in-channels {self.num_input_channels}")

    def _network_module(self) -> torch.nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return getattr(mod, "_orig_mod", mod)

    def on_train_start(self):
        super().on_train_start()
        if self._pretrained_encoder is None:
            if self.pretrained_weights_file is None:
                self.print_to_log_file("WARNING: nnUNetTrainerHySparKFinetune without -pretrained_weights: "
                                       "training from scratch.")
            return
        state = self._network_module().state_dict()
        same = all(torch.equal(state[k].cpu(), v) for k, v in self._pretrained_encoder.items())
        self.print_to_log_file(f"pre-trained encoder {'verified in the network' if same else 'NOT LOADED'} "
                               f"({len(self._pretrained_encoder)} tensors)")
        if not same:
            raise RuntimeError("the pre-trained encoder weights are not in the network after loading")
        self._pretrained_encoder = None  # free the copy


class nnUNetTrainerHySparKFinetune_demo(ScheduleVariant, nnUNetTrainerHySparKFinetune):
    """The demo's schedule (500 iterations, minutes on a CPU with the tiny architecture).

    AdamW at lr 1e-2, the encoder at the same rate. The tiny network first gives one class to every
    organ brighter than the liver and parts them later; at lr 2e-3 they had not parted within 250
    iterations in 2 of 2 runs, nor at 1e-3 with the encoder at 0.1x (kidneys <= 0.21 in 3 runs). On
    the same data and weights, lr 5e-3 parted them at epoch 6 and lr 1e-2 at epoch 4; nnU-Net's SGD
    (lr 1e-2, momentum 0.99) found neither spleen nor kidneys in 250 iterations.

    nnU-Net sets the lr once per epoch, so the former 1-epoch warm-up jumped from 1e-4 to 1e-2 at epoch 1
    and every organ's pseudo Dice fell to 0 there (3 of 3 seeded runs); in 2 of them one organ stayed at 0
    until epoch 6-7 of 12, and in one unseeded demo the kidneys never came back. Hence three warm-up
    epochs (1e-4, 3.4e-3, 6.7e-3, then 1e-2; no collapse in 3 of 3 runs on the same seeds, data and
    weights, an organ still late in one, at epoch 6-7) and 20 epochs instead of 12, so that a late organ
    has time to be learnt."""

    schedule = short_schedule(epochs=20, iterations=25, val_iterations=4, initial_lr=1e-2, warmup_epochs=3,
                              warmup_cap_fraction=0.15, encoder_lr_scale=1.0)


class nnUNetTrainerHySparKFinetune_test(ScheduleVariant, nnUNetTrainerHySparKFinetune):
    # checks loading, not accuracy
    schedule = short_schedule(epochs=2, iterations=5, val_iterations=1, initial_lr=3e-3, warmup_epochs=1)


class nnUNetTrainerHySparKFinetune_frozen_test(nnUNetTrainerHySparKFinetune_test):
    """Encoder frozen (lr 0) for the first epoch, then trained."""

    schedule = {**nnUNetTrainerHySparKFinetune_test.schedule, "freeze_encoder_epochs": 1}
