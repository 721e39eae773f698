"""Shared fixtures: an nnU-Net environment in a temporary folder and a small synthetic CT dataset.

End-to-end tests run the real console scripts in subprocesses, exactly as a user
would, with nnU-Net's multiprocessing turned down for a 2-core machine.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the console scripts of the environment running the tests

LABELLED_ID, UNLABELED_ID = 501, 502
SYNTH = ["--shape", "48", "48", "32", "--spacing", "2", "2", "2.25"]  # 96 x 96 x 72 mm: the whole phantom


def run_cmd(args: list[str], env: dict, timeout: float = 1200, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script of this environment; on failure show the end of its output."""
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    proc = subprocess.run([exe, *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def train_on_masks(model, x, masks, optimizer, autocast_dtype=None) -> list:
    """One optimiser step per mask (CPU autocast to ``autocast_dtype`` if given); the detached losses."""
    import torch

    losses = []
    for m in masks:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(x, m)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def loss_before_and_after_training(model, x, optimizer, steps: int, seed: int = 0) -> tuple[float, float]:
    """Mean masked-modelling loss on 4 fixed masks, before and after ``steps`` steps on fresh random masks.
    Both evaluations stay in train mode, so BatchNorm uses batch statistics as during the steps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    fixed = [model.random_mask(x, gen) for _ in range(4)]

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(model(x, m)["loss"].item() for m in fixed) / len(fixed)

    before = mean_loss()
    for _ in range(steps):
        loss = model(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, mean_loss()


def nnunet_environment(root: Path) -> dict:
    """The product's own environment for nnU-Net runs (folders under ``root``, this installation's console
    scripts first on PATH, our trainers, ``--malloc reuse``), with nnU-Net's workers forced in-process."""
    from nnunet_hyspark.benchmark.steps import nnunet_environment as product_environment

    env = product_environment(root)
    env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
    return env


@pytest.fixture(scope="session")
def synthetic_ct(tmp_path_factory) -> dict:
    """A labelled dataset (6 cases) and an unlabeled collection (4 cases), both preprocessed with the
    labelled dataset's tiny-architecture HySparK plans. Returns the environment for subprocesses."""
    env = nnunet_environment(tmp_path_factory.mktemp("nnunet"))
    run_cmd(["hyspark_synthesize", "-d", str(LABELLED_ID), "--num-cases", "6", *SYNTH], env)
    run_cmd(["hyspark_synthesize", "-d", str(UNLABELED_ID), "--num-cases", "4", "--unlabeled", "--seed", "7",
             *SYNTH], env)
    run_cmd(["hyspark_plan_and_preprocess", "-d", str(LABELLED_ID), "-np", "1", "--arch", "tiny"], env)
    run_cmd(["hyspark_plan_and_preprocess", "-d", str(UNLABELED_ID), "--plans-from", str(LABELLED_ID), "-np", "1"],
            env)
    return {"env": env, "labelled": LABELLED_ID, "unlabeled": UNLABELED_ID,
            "raw": Path(env["nnUNet_raw"]), "preprocessed": Path(env["nnUNet_preprocessed"]),
            "results": Path(env["nnUNet_results"])}
