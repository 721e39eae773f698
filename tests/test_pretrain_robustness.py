"""Issue 12 for hyspark_pretrain: safe loading, one run per folder, --force, --c of the same run only,
option validation, corrupt checkpoints, the NaN-loss message, SIGTERM/SIGUSR1, unwritable output folders
and killed preprocessing. The command runs on a tiny fake dataset (tests/fakes.py with a tiny HySparK
architecture added to its plans), in this process or as real subprocesses where signals and two runs meet."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fakes import write_fake_preprocessed_dataset
from test_pretrain_loop import TINY, NaNAfter, constant_batches, make_trainer
from test_safe_files import write_crafted_pickle

BIN = Path(sys.executable).parent
ARGS = ["-d", "101", "--epochs", "2", "--iterations", "1", "--val-iterations", "0", "-b", "1", "--num-workers", "0",
        "--save-every", "1", "--decoder-width", "16", "--no-progress"]
TINY_ARCH = {"patch_size": [32, 32, 32], "widths": [8, 16, 16, 24, 24], "depths": [1, 1, 1, 1, 1],
             "expansions": [2, 2, 2, 2, 2], "vit_depth": 1, "vit_heads": 2,
             "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory):
    """nnU-Net folders with dataset 101 preprocessed for a tiny HySparK network; the variables are set here."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {n: str(root / n) for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in env.values():
        os.makedirs(folder)
    ds = Path(write_fake_preprocessed_dataset(env["nnUNet_preprocessed"], 101, "Fake", shapes=((1, 32, 32, 32),) * 3,
                                              batch_size=1))
    plans = json.loads((ds / "nnUNetHySparKPlans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"] = {
        "network_class_name": "nnunet_hyspark.methods.hyspark.network.HySparKUNet", "arch_kwargs": TINY_ARCH,
        "_kw_requires_import": []}
    (ds / "nnUNetHySparKPlans.json").write_text(json.dumps(plans))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield {"env": {**os.environ, **env, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1",
                       "PYTHONUNBUFFERED": "1"},
               "config_folder": ds / "nnUNetHySparKPlans_3d_fullres"}


def pretrain(args: list[str], capsys) -> tuple[int, str]:
    """``hyspark_pretrain ARGS`` in this process: (exit status, stderr)."""
    from nnunet_hyspark.cli.pretrain import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(fake_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    from nnunet_hyspark.cli.pretrain import main

    main([*ARGS, "-o", str(out)])
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"]


def no_data_loading(monkeypatch):
    """Fail the test if the command starts reading the preprocessed data."""
    import nnunet_hyspark.pretraining.data as data

    def refuse(*a, **k):
        raise AssertionError("the data loaders were built before the error")

    monkeypatch.setattr(data, "build_pretrain_loaders", refuse)


# ------------------------------------------------------------------ 1: nothing executed
def test_checkpoints_are_plain_and_crafted_files_run_nothing(fake_env, finished_run, tmp_path, capsys):
    state = torch.load(finished_run / "checkpoint_latest.pth", weights_only=True)  # tensors and plain values only
    assert state["step"] == 2
    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    write_crafted_pickle(evil, marker)
    code, err = pretrain([*ARGS, "-o", str(tmp_path / "a"), "--init-from", str(evil)], capsys)
    assert code == 2 and "refused to load weights file" in err and not marker.exists()
    out = copy_run(finished_run, tmp_path)
    shutil.copyfile(evil, out / "checkpoint_latest.pth")
    code, err = pretrain([*ARGS, "-o", str(out), "--c"], capsys)
    assert code == 2 and "refused to load checkpoint" in err and not marker.exists()


# ------------------------------------------------------------------ 2: one run per folder
def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()}")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}")


def start_run(fake_env, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "hyspark_pretrain"), *ARGS, "-o", str(out), *extra], env=fake_env["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(fake_env, tmp_path):
    out = tmp_path / "run"
    first = start_run(fake_env, out, "--epochs", "1", "--iterations", "100000", "--seed", "0")
    try:
        _wait_for(out / "training_log.txt", "pre-training hyspark", first)
        second = subprocess.run([str(BIN / "hyspark_pretrain"), *ARGS, "-o", str(out), "--seed", "5", "--force"],
                                env=fake_env["env"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"is in use by another run (pid {first.pid} on" in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith("error: ")  # one line, no traceback
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on ...
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    finally:
        first.kill()
    # ... and its files are its own: --force of the second moved nothing, wrote nothing
    assert json.loads((out / "pretrain_config.json").read_text())["seed"] == 0
    assert (out / "checkpoint_latest.pth").is_file()
    assert (out / "training_log.txt").read_text().count("pre-training hyspark") == 1
    assert not list(tmp_path.glob("run.previous-*")) and not (out / ".hyspark-run.lock").exists()


# ------------------------------------------------------------------ 3: --force
def test_force_moves_the_old_run_aside_before_anything_new_is_written(fake_env, finished_run, tmp_path, capsys,
                                                                      monkeypatch):
    out = copy_run(finished_run, tmp_path)
    code, err = pretrain([*ARGS, "-o", str(out)], capsys)
    assert code == 2 and "already holds a pre-training run" in err and "--force" in err and "--c" in err
    from nnunet_hyspark.pretraining.loop import Pretrainer

    def killed(self, batch):  # the new run is interrupted at its first step
        raise KeyboardInterrupt

    monkeypatch.setattr(Pretrainer, "train_step", killed)
    code, _ = pretrain([*ARGS, "-o", str(out), "--force"], capsys)
    assert code == 130
    left = {p.name for p in out.iterdir()}
    assert not left & {"encoder_weights.pth", "encoder_weights.json", "previews", "checkpoint_final.pth",
                       "checkpoint_latest.pth", "checkpoint_previous.pth", "progress.json"}, left
    (aside,) = tmp_path.glob("run.previous-*")
    assert {"encoder_weights.pth", "encoder_weights.json", "previews", "checkpoint_latest.pth"} <= \
        {p.name for p in aside.iterdir()}
    assert "--force: moved the previous run" in (out / "training_log.txt").read_text()


# ------------------------------------------------------------------ 4: --c continues the same run only
def test_continue_refuses_another_schedule_batch_or_masking_and_lists_them(fake_env, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    code, err = pretrain([*ARGS, "-o", str(out), "--c", "--epochs", "3", "-b", "2", "--mask-ratio", "0.5",
                          "--crops-per-volume", "2"], capsys)
    assert code == 2 and err.count("\n") == 1
    for diff in ("--epochs 3 (stored: 2)", "batch size per process 2 (stored: 1)", "--mask-ratio 0.5 (stored: 0.75)",
                 "data recipe '"):
        assert diff in err, err
    assert "--allow-schedule-change" not in err  # batch and masking can never change
    code, err = pretrain([*ARGS, "-o", str(out), "--c", "--epochs", "3"], capsys)
    assert code == 2 and "--allow-schedule-change" in err
    code, err = pretrain([*ARGS, "-o", str(out), "--c", "--epochs", "3", "--allow-schedule-change"], capsys)
    assert code == 0, err
    log = (out / "training_log.txt").read_text()
    assert "schedule changed on --c --allow-schedule-change: --epochs 3 (stored: 2)" in log
    assert "recomputed over 3 epochs (3 steps); at step 2 the learning rate is now" in log
    assert step_of(out / "checkpoint_final.pth") == 3
    assert len(json.loads((out / "progress.json").read_text())["train_loss"]) == 3


# ------------------------------------------------------------------ 5: option ranges, before any data
@pytest.mark.parametrize("option, shown", [
    (["--save-every", "0"], "--save-every 0 (must be an integer >= 1"),
    (["--preview-every", "0"], "--preview-every 0 (must be an integer >= 1"),
    (["--val-iterations", "-1"], "--val-iterations -1 (must be an integer >= 0"),
    (["--lr", "-1"], "--lr -1.0 (must be a number > 0)"),
    (["--lr", "nan"], "--lr nan (must be a number > 0)"),
    (["--epochs", "0"], "--epochs 0 (must be an integer >= 1)"),
    (["--iterations", "0"], "--iterations 0 (must be an integer >= 1)"),
    (["--mask-ratio", "1"], "--mask-ratio 1.0 (must be in [0, 1))"),
    (["--warmup-fraction", "1.5"], "--warmup-fraction 1.5 (must be in [0, 1])"),
    (["--weight-decay", "-1", "0"], "--weight-decay -1.0 0.0 (must be two numbers >= 0"),
    (["--clip-grad", "-1"], "--clip-grad -1.0 (must be a number >= 0"),
    (["-b", "0"], "-b/--batch-size 0 (must be an integer >= 1)"),
    (["--num-workers", "-1"], "--num-workers -1 (must be an integer >= 0)"),
    (["--val-fraction", "1"], "--val-fraction 1.0 (must be in [0, 1))"),
])
def test_numeric_options_are_checked_before_anything_is_built(fake_env, tmp_path, capsys, monkeypatch, option, shown):
    no_data_loading(monkeypatch)
    # dataset 999 does not exist: the range check must come first
    code, err = pretrain(["-d", "999", *option, "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: invalid option: ") and shown in err and err.count("\n") == 1, err
    assert " -> " in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 6: corrupt checkpoint
def test_corrupt_latest_checkpoint_names_the_older_one_and_the_way_back(fake_env, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    assert step_of(out / "checkpoint_previous.pth") == 1  # rotated before the last save
    (out / "checkpoint_latest.pth").write_bytes(b"\0" * 100)
    code, err = pretrain([*ARGS, "-o", str(out), "--c"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot continue: checkpoint {out / 'checkpoint_latest.pth'} is unreadable (truncated or corrupt)" in err
    assert f"an older good checkpoint exists: {out / 'checkpoint_previous.pth'} (step 1)" in err
    assert f"`mv {out / 'checkpoint_previous.pth'} {out / 'checkpoint_latest.pth'}`" in err and "--force" in err
    os.replace(out / "checkpoint_previous.pth", out / "checkpoint_latest.pth")
    code, err = pretrain([*ARGS, "-o", str(out), "--c"], capsys)
    assert code == 0, err
    assert step_of(out / "checkpoint_final.pth") == 2
    (out / "checkpoint_latest.pth").write_bytes(b"\0" * 100)
    (out / "checkpoint_previous.pth").unlink()
    code, err = pretrain([*ARGS, "-o", str(out), "--c"], capsys)
    assert code == 2 and "no older checkpoint exists" in err and "--force instead of --c" in err


# ------------------------------------------------------------------ 7: the NaN-loss message
def nan_trainer(tmp_path, n: int, **cfg):
    torch.manual_seed(0)
    from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
    from nnunet_hyspark.methods.hyspark.model import HySparK

    t = make_trainer(tmp_path, epochs=2, iterations=1, model=NaNAfter(HySparK(HybridEncoder(1, **TINY),
                                                                              decoder_width=16), n=n))
    for k, v in cfg.items():
        setattr(t.cfg, k, v)
    return t


def test_nan_stop_names_the_real_checkpoint_and_the_likely_causes(tmp_path):
    from nnunet_hyspark.pretraining.loop import NonFiniteLoss

    batch = next(constant_batches())
    t = nan_trainer(tmp_path / "a", n=1)
    t.train_step(batch)
    t.save_checkpoint()
    with pytest.raises(NonFiniteLoss) as info:
        t.train_step(batch)
    msg = str(info.value)
    assert msg.startswith("the loss became nan at step 1 (epoch 1)")
    assert f"the last checkpoint is {tmp_path / 'a' / 'checkpoint_latest.pth'} (step 1)" in msg
    assert "(1) the learning rate is too high (peak --lr 0.001; try --lr 0.0001)" in msg
    assert "(2) NaN/inf voxels" in msg and "--precision" not in msg  # an fp32 run: no fp32 advice

    t = nan_trainer(tmp_path / "b", n=0, precision="bf16")
    with pytest.raises(NonFiniteLoss) as info:
        t.train_step(batch)
    msg = str(info.value)
    assert "no checkpoint was saved yet (the first comes after epoch 1)" in msg and "--force" in msg
    assert "(2) bf16 overflow (try --precision fp32)" in msg
    assert not (tmp_path / "b" / "checkpoint_latest.pth").exists()

    t = nan_trainer(tmp_path / "c", n=99)
    bad = batch.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"\(1\) this batch holds NaN/inf voxels"):
        t.train_step(bad)


# ------------------------------------------------------------------ 8: SIGTERM / SIGUSR1
def signalling_batches(sig: int, at: int):
    for i, b in enumerate(constant_batches()):
        if i == at:
            os.kill(os.getpid(), sig)
        yield b


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_scheduler_signals_finish_the_step_and_save(tmp_path, sig):
    t = make_trainer(tmp_path, epochs=1, iterations=3, train_iter=signalling_batches(sig, 1))
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert step_of(tmp_path / "checkpoint_latest.pth") == 2
    assert f"interrupted by {signal.Signals(sig).name} at step 2" in (tmp_path / "training_log.txt").read_text()
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored


def test_sigterm_to_a_real_run_saves_and_continue_finishes_it(fake_env, tmp_path, capsys):
    out = tmp_path / "run"
    steps = 200  # the ETA line comes after 7 steps: ~190 steps left for the signal to land mid-run
    long = ["--epochs", "1", "--iterations", str(steps), "--save-every", "5"]  # no checkpoint but SIGTERM's
    proc = start_run(fake_env, out, *long)
    try:
        # signal once steps have run (a fixed sleep raced: on a quiet machine 25 steps ended within it)
        _wait_for(out / "training_log.txt", "ETA from this run's first steps", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    step = step_of(out / "checkpoint_latest.pth")
    assert 1 <= step < steps and not (out / "encoder_weights.pth").exists()
    assert f"interrupted by SIGTERM at step {step}" in (out / "training_log.txt").read_text()
    assert not (out / ".hyspark-run.lock").exists()
    code, err = pretrain([*ARGS, "-o", str(out), "--c", *long], capsys)
    assert code == 0, err
    assert step_of(out / "checkpoint_final.pth") == steps and (out / "encoder_weights.pth").is_file()


# ------------------------------------------------------------------ 9: unwritable output, before any data
def test_an_unwritable_output_folder_is_one_line_before_data_is_read(fake_env, tmp_path, capsys, monkeypatch):
    import nnunet_hyspark.runlock as runlock

    no_data_loading(monkeypatch)

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runlock.os, "open", denied)
    code, err = pretrain([*ARGS, "-o", str(tmp_path / "ro")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write into {tmp_path / 'ro'}: permission denied -> choose an output folder" in err


# ------------------------------------------------------------------ 10: killed preprocessing
def test_a_killed_preprocessing_is_refused_with_the_command_that_repairs_it(fake_env, tmp_path, capsys,
                                                                           monkeypatch):
    no_data_loading(monkeypatch)
    ds = Path(write_fake_preprocessed_dataset(os.environ["nnUNet_preprocessed"], 102, "Killed",
                                              shapes=((1, 32, 32, 32),) * 3))
    folder = ds / "nnUNetHySparKPlans_3d_fullres"
    for f in folder.glob("Killed_002.*"):  # the run was killed before the last case
        f.unlink()
    code, err = pretrain([*ARGS, "-d", "102", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"preprocessed folder {folder} is incomplete: 2 of 3 cases" in err
    assert "hyspark_plan_and_preprocess -d 102 -c 3d_fullres" in err and not (tmp_path / "o").exists()
