"""The study's plan (scripts/study.sh, nnunet_hyspark.benchmark.study): its commands, splits and trainers, without
training anything (the study itself runs for about 35 minutes and is not part of CI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_hyspark.benchmark import study
from nnunet_hyspark.cli.benchmark import build_parser
from nnunet_hyspark.cli.study import main
from nnunet_hyspark.errors import HySparKError


def _step(cmds, program, sub=None):
    return next(c for _, c in cmds if c[0] == program and (sub is None or c[1] == sub))


def test_commands_are_the_documented_study():
    opts = study.StudyOptions()
    cmds = study.commands(opts, Path("/s"))
    assert opts.unlabeled_cases >= 3 * opts.labelled_cases  # "several times larger than the labelled set"
    folds = build_parser().parse_args(_step(cmds, "hyspark_benchmark", "folds")[1:])  # the real CLI accepts it
    assert folds.folds == [0, 1, 2] and folds.train_fractions == [0.25, 1.0] and len(folds.train_fractions) >= 2
    assert folds.arms == ["nnunet=nnUNetTrainer_study@nnUNetPlans",
                          "scratch=nnUNetTrainerHySparK_study@nnUNetHySparKPlans",
                          "hyspark=nnUNetTrainerHySparKFinetune_study@nnUNetHySparKPlans:/s/pretrain/encoder_weights.pth"]
    assert folds.splits == "/s/splits.json" and folds.output == "/s/benchmark"
    summary = build_parser().parse_args(_step(cmds, "hyspark_benchmark", "summarize")[1:])
    assert summary.arms == folds.arms and summary.output == folds.output
    # the pre-training reads both datasets and writes the weights the hyspark arm uses
    pre = _step(cmds, "hyspark_pretrain")
    assert pre[pre.index("-d") + 1:pre.index("-d") + 3] == ["981", "982"] and pre[pre.index("-o") + 1] == "/s/pretrain"
    # nnU-Net's own plans exist for the baseline arm, the unlabeled set shares HySparK's plans
    assert _step(cmds, "nnUNetv2_plan_and_preprocess")[1:3] == ["-d", "981"]
    assert "--plans-from" in [c for _, cmd in cmds if cmd[0] == "hyspark_plan_and_preprocess" for c in cmd]


def test_kfold_splits_cover_every_case_once():
    cases = study.case_ids(study.StudyOptions())
    assert cases[0] == "SyntheticCT_000" and len(cases) == 12
    splits = study.kfold_splits(cases, 3)
    assert len(splits) == 3
    assert sorted(c for s in splits for c in s["val"]) == sorted(cases)
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and sorted(s["train"] + s["val"]) == sorted(cases)
        assert len(s["val"]) == 4


@pytest.mark.parametrize("overrides, fragment", [
    ({"folds": 1}, "folds"), ({"labelled_cases": 2}, "folds"), ({"fractions": (0.0, 1.0)}, "fractions"),
    ({"fractions": (1.5,)}, "fractions"), ({"unlabeled_cases": 0}, "unlabeled"), ({"unlabeled_id": 981}, "ids"),
    ({"train_folds": (3,)}, "3-fold")])
def test_bad_options_refused(overrides, fragment):
    with pytest.raises(HySparKError, match=fragment):
        study.check_options(study.StudyOptions(**overrides))


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["-o", str(out), "--dry-run", "--smoke"]) == 0
    text = capsys.readouterr().out
    assert "hyspark_benchmark folds" in text and "nnUNetTrainer_smoke@nnUNetPlans" in text and "-f 0 --compare" in text
    assert not out.exists()


def test_bad_option_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-o", str(tmp_path / "s"), "--folds", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "->" in err[0]
    assert not (tmp_path / "s").exists()


def test_existing_output_refused_without_force(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "old").write_text("x")
    with pytest.raises(HySparKError, match="--force"):
        study.prepare_output(study.StudyOptions(output=str(tmp_path / "s")), force=False)
    assert (tmp_path / "s" / "old").exists()


def test_study_trainers_share_one_schedule():
    from nnunet_hyspark.trainers import nnUNetTrainerStudy as t
    from nnunet_hyspark.trainers.nnunet_lookup import hyspark_trainers

    classes = [t.nnUNetTrainer_study, t.nnUNetTrainerHySparK_study, t.nnUNetTrainerHySparKFinetune_study]
    keys = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")
    assert len({tuple(c.schedule[k] for k in keys) for c in classes}) == 1
    assert all(getattr(hyspark_trainers, c.__name__) is c for c in classes)  # nnU-Net's lookup finds them
    assert set(study.StudyOptions().trainers.values()) == {c.__name__ for c in classes}
    json.dumps(study.StudyOptions().__dict__)  # the options are recorded in study.json


def test_nnunet_planner_steps_get_at_least_one_augmentation_thread(tmp_path):
    """nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA); with the common small-CPU setting 0 the
    study's nnUNetv2_plan_and_preprocess step crashed. Other steps keep the user's 0."""
    import io
    import os

    from nnunet_hyspark.benchmark.steps import Steps

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train"):
        script = bindir / name
        script.write_text('#!/bin/sh\necho "DA=$nnUNet_n_proc_DA"\n')
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "nnUNet_n_proc_DA": "0"}
    steps = Steps(tmp_path, env, total=2, out=io.StringIO())
    steps.run("plan", ["nnUNetv2_plan_and_preprocess", "-d", "1"])
    steps.run("train", ["nnUNetv2_train", "1"])
    assert (tmp_path / "logs" / "01_nnUNetv2_plan_and_preprocess.log").read_text().strip() == "DA=1"
    assert (tmp_path / "logs" / "02_nnUNetv2_train.log").read_text().strip() == "DA=0"
