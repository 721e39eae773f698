"""Cost columns of the benchmark: parameters from nnU-Net checkpoints, wall time from nnU-Net's training logs,
pre-training time from the weights' sidecar (and that pre-training writes it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_hyspark.benchmark import cost as C
from nnunet_hyspark.benchmark.arms import Arm
from nnunet_hyspark.benchmark.fractions import FoldEntry
from nnunet_hyspark.benchmark.spec import BenchmarkSpec
from nnunet_hyspark.errors import HySparKError

# Lines of a real nnU-Net 2.8 training_log_*.txt (a 2-epoch fine-tuning fold), trimmed: banner, set-up,
# epochs, the final validation. Wall time = 14:51:02.019962 - 14:50:26.615299 = 35.404663 s.
REAL_LOG = """
#######################################################################
Please cite the following paper when using nnU-Net:
Isensee, F., Jaeger, P. F., Kohl, S. A., Petersen, J., & Maier-Hein, K. H. (2021). nnU-Net: a self-configuring method.
#######################################################################
 
2026-11-30 14:50:26.615299: HySparK pre-trained weights /tmp/w.pth (method hyspark): 
2026-11-30 14:50:26.676225: do_dummy_2d_data_aug: False 
2026-11-30 14:50:26.677476: This split has 5 training and 1 validation cases. 

This is the configuration used by this training:
Configuration name: 3d_fullres
 {'data_identifier': 'nnUNetHySparKPlans_3d_fullres', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2} 

2026-11-30 14:50:26.985951:  
2026-11-30 14:50:26.986445: Epoch 0 
2026-11-30 14:50:26.986922: Current learning rate: 0.003 
2026-11-30 14:50:34.190572: train_loss 1.0692 
2026-11-30 14:50:34.190892: val_loss 0.8492 
2026-11-30 14:50:34.191193: Pseudo dice [np.float32(0.1648), np.float32(0.0116), np.float32(0.0113)] 
2026-11-30 14:50:34.191506: Epoch time: 7.21 s 
2026-11-30 14:50:34.242222: Yayy! New best EMA pseudo Dice: 0.0625 
2026-11-30 14:50:35.537872:  
2026-11-30 14:50:35.538162: Epoch 1 
2026-11-30 14:50:35.538445: Current learning rate: 0.0015 
2026-11-30 14:50:42.944805: train_loss 0.7946 
2026-11-30 14:50:42.945891: Epoch time: 7.41 s 
2026-11-30 14:50:44.273880: Training done. 
2026-11-30 14:50:44.302484: predicting SyntheticCT_001 
2026-11-30 14:51:02.019655: Validation complete 
2026-11-30 14:51:02.019962: Mean Validation Dice:  0.006986430202875185 
"""
REAL_WALL = 35.404663
# a resumed run of the same fold: a second log file (its stamps without microseconds, as datetime prints them)
RESUMED_LOG = """2026-11-30 15:00:00: Epoch 2 
2026-11-30 15:00:09.500000: Epoch time: 9.5 s 
2026-11-30 15:00:10: Training done. 
2026-11-30 15:00:1"""  # cut off by a crash mid-line: ignored


class TinyNet(nn.Module):
    """Conv + InstanceNorm (affine) + BatchNorm (running-stat buffers that are not parameters)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.inorm = nn.InstanceNorm3d(4, affine=True)
        self.bnorm = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 3, 1)


def save_nnunet_checkpoint(path: Path, net: nn.Module) -> None:
    """The dict nnU-Net's save_checkpoint writes, with its NumPy scalars and the torch.device in init_args."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": net.state_dict(),
                "optimizer_state": torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9).state_dict(),
                "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.1), np.float32(0.2)], "ema_fg_dice": [np.float64(0.1)],
                            "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]},
                "_best_ema": np.float64(0.1), "current_epoch": 2,
                "init_args": {"plans": {"plans_name": "p"}, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": {}, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}, path)


def test_real_log_format_is_parsed():
    stamps, epochs = C.parse_training_log(REAL_LOG)
    assert epochs == [7.21, 7.41]
    assert (max(stamps) - min(stamps)).total_seconds() == pytest.approx(REAL_WALL)


def test_fold_times_add_up_over_resumed_runs(tmp_path):
    (tmp_path / "training_log_2026_11_30_14_50_26.txt").write_text(REAL_LOG)
    (tmp_path / "training_log_2026_11_30_15_00_00.txt").write_text(RESUMED_LOG)
    t = C.log_times(tmp_path)
    assert t.wall_seconds == pytest.approx(REAL_WALL + 10.0)  # the pause between the runs is not counted
    assert t.epoch_seconds == pytest.approx(7.21 + 7.41 + 9.5) and t.epochs == 3 and t.runs == 2
    empty = C.log_times(tmp_path / "nothing")
    assert empty.wall_seconds is None and empty.epoch_seconds is None and empty.runs == 0


def test_parameters_counted_from_a_real_format_checkpoint(tmp_path):
    net = TinyNet()
    save_nnunet_checkpoint(tmp_path / "checkpoint_final.pth", net)
    assert C.count_parameters(tmp_path / "checkpoint_final.pth") == sum(p.numel() for p in net.parameters())
    assert sum(b.numel() for b in net.buffers()) > 0  # the buffers really were left out


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"network_weights": {"w": torch.zeros(2)}, "x": Exploit()}, tmp_path / "checkpoint_final.pth")
    with pytest.raises(HySparKError, match="cannot read .*checkpoint_final.pth"):
        C.count_parameters(tmp_path / "checkpoint_final.pth")
    assert not (tmp_path / "pwned").exists()
    assert C.fold_cost(tmp_path, 0).parameters is None  # one n/a cell, not a failed summary


def test_pretraining_seconds_from_sidecar(tmp_path):
    w = tmp_path / "encoder_weights.pth"
    assert C.pretraining_seconds(str(w)) is None and C.pretraining_seconds(None) is None
    w.with_suffix(".json").write_text(json.dumps({"pretraining_seconds": 3723.4}))
    assert C.pretraining_seconds(str(w)) == 3723.4
    w.with_suffix(".json").write_text("not json")
    assert C.pretraining_seconds(str(w)) is None


def make_fold(res: Path, trainer: str, fold: int, epoch_times: list[float], net: nn.Module | None) -> None:
    d = res / "Dataset001_Toy" / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
    d.mkdir(parents=True)
    lines = [f"2026-01-01 10:00:{i * 10:02d}.000000: Epoch time: {t} s " for i, t in enumerate(epoch_times)]
    (d / "training_log_2026_1_1_10_00_00.txt").write_text("\n".join(lines) + "\n")
    if net is not None:
        save_nnunet_checkpoint(d / "checkpoint_final.pth", net)


def test_cost_table_and_csv(tmp_path):
    res = tmp_path / "results"
    w = tmp_path / "encoder_weights.pth"
    w.with_suffix(".json").write_text(json.dumps({"pretraining_seconds": 7380.0}))
    net = TinyNet()
    make_fold(res, "nnUNetTrainer", 0, [5.0, 5.0, 5.0], net)  # wall 20 s (stamps 0..20), epochs 15 s
    make_fold(res, "nnUNetTrainer", 1, [5.0, 5.0, 5.0, 5.0, 5.0], net)  # wall 40 s, epochs 25 s
    make_fold(res, "nnUNetTrainerHySparKFinetune", 0, [1.0], None)  # fold 1 never started
    arms = [Arm("base", "nnUNetTrainer"), Arm("pre", "nnUNetTrainerHySparKFinetune", str(w))]
    spec = BenchmarkSpec("1", "Dataset001_Toy", "3d_fullres", "nnUNetPlans", arms, [0, 1], res, tmp_path / "b")
    md = C.cost_markdown(spec)
    n = sum(p.numel() for p in net.parameters())
    # mean 30 s, sample std 14.1 s over the two folds; epochs only: 20 +- 7.1 s
    assert f"| base | {n:,} | 30.0s ± 14.1s (n=2) | 20.0s ± 7.1s (n=2) | n/a |" in md
    assert "| pre | n/a | 0.0s (n=1) | 1.0s (n=1) | 2h03m |" in md
    rows = C.cost_csv(spec).splitlines()
    assert rows[0] == ("arm,fraction,nnunet_fold,parameters,train_wall_seconds,train_epoch_seconds,epochs,runs,"
                       "pretraining_seconds")
    assert rows[1] == f"base,,0,{n},20.0,15.0,3,1," and rows[3] == "pre,,0,,0.0,1.0,1,1,7380.0"

    # label efficiency: one row per arm x fraction, over that fraction's nnU-Net folds
    make_fold(res, "nnUNetTrainer", 2, [2.0], net)
    spec.fractions, spec.fold_entries = (0.5, 1.0), [FoldEntry(0, 1.0, 0), FoldEntry(1, 1.0, 1),
                                                     FoldEntry(0, 0.5, 2), FoldEntry(1, 0.5, 3)]
    md = C.cost_markdown(spec)
    assert f"| base (fraction 0.5) | {n:,} | 0.0s (n=1) | 2.0s (n=1) | n/a |" in md
    assert f"| base (fraction 1) | {n:,} | 30.0s ± 14.1s (n=2) |" in md


def test_format_seconds():
    assert [C.format_seconds(s) for s in (None, 42.04, 725, 3723)] == ["n/a", "42.0s", "12m05s", "1h02m"]


def test_pretraining_run_and_export_record_their_wall_time(tmp_path):
    """hyspark_pretrain's sidecar and hyspark_export_weights' metadata both carry pretraining_seconds."""
    from test_pretrain_loop import make_trainer

    from nnunet_hyspark.methods import METHODS
    from nnunet_hyspark.pretraining.export import export_meta, read_checkpoint

    weights = make_trainer(tmp_path / "run", epochs=1, iterations=1).run()
    history = json.loads((tmp_path / "run" / "progress.json").read_text())
    want = round(sum(history["epoch_time"]), 1)
    assert want > 0 and C.pretraining_seconds(str(weights)) == want
    ckpt = tmp_path / "run" / "checkpoint_final.pth"
    assert export_meta(read_checkpoint(ckpt), ckpt, METHODS["hyspark"])["pretraining_seconds"] == want
    # a checkpoint resumed twice: the epoch times of all its runs add up
    state = {"meta": {}, "step": 3, "history": {"epoch_time": [10.04, 20.0, 30.0]}}
    assert export_meta(state, ckpt, METHODS["hyspark"])["pretraining_seconds"] == 60.0
