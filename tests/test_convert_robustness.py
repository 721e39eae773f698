"""Files users hand us (issue 12, items 1, 9 and 11): a crafted pickle is refused by every command that reads
one and runs nothing; the converter keeps our files' metadata and checks its options; the benchmark checks
each arm's weights and its own output folder before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_hyspark.cli.convert_checkpoint import main as convert
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods.hyspark.weights import export_encoder
from nnunet_hyspark.weights import load_weights_file
from test_benchmark_folds import CONF, DS, FINETUNE, PLANS, SCRATCH, FakeTrainer, cli, nn  # noqa: F401 (nn: fixture)
from test_safe_files import write_crafted_pickle
from test_weights import META, TINY, trained_encoder


def one_line_error(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture
def own_file(tmp_path) -> Path:
    return export_encoder(trained_encoder(), META, tmp_path / "encoder_weights.pth")  # vit_heads 2, not 12


# ------------------------------------------------------------------------------------- crafted pickle


def test_crafted_pickle_refused_by_every_reader_and_nothing_runs(nn, tmp_path, capsys):
    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    write_crafted_pickle(evil, marker)
    # hyspark_convert_checkpoint (published checkpoints): refused, naming the flag that would allow it
    err = one_line_error(capsys, convert, [str(evil), str(tmp_path / "out.pth")])
    assert "refused to load checkpoint" in err and "--trust-checkpoint" in err
    # the fine-tune trainers' inspection (runs in initialize(), before nnU-Net's own torch.load)
    from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import nnUNetTrainerHySparKFinetune

    with pytest.raises(RuntimeError, match="refused to load weights file"):
        nnUNetTrainerHySparKFinetune._inspect_pretrained(object.__new__(nnUNetTrainerHySparKFinetune), str(evil))
    with pytest.raises(HySparKError, match="refused to load weights file"):
        load_weights_file(evil)
    # hyspark_pretrain --init-from
    from nnunet_hyspark.pretraining.model_setup import init_encoder

    with pytest.raises(HySparKError, match="refused to load weights file"):
        init_encoder(None, str(evil), {})
    # hyspark_benchmark folds with an arm's weights
    status, _, err = cli(["folds", "-d", "1", "-c", CONF, "-p", PLANS, "--arms", f"scratch={SCRATCH}",
                          f"pretrained={FINETUNE}:{evil}", "--dry-run"], capsys)
    assert status == 2 and "arm 'pretrained': refused to load weights file" in err
    assert not marker.exists()


def test_trust_checkpoint_is_what_allows_full_unpickling(tmp_path, capsys):
    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    write_crafted_pickle(evil, marker)
    one_line_error(capsys, convert, [str(evil), str(tmp_path / "out.pth"), "--trust-checkpoint"])
    assert marker.exists()  # the flag does what its help says; the conversion itself then fails cleanly


# ------------------------------------------------------------------------------------- converter


def test_own_file_keeps_its_stored_vit_heads(own_file, tmp_path):
    out = tmp_path / "w3.pth"
    convert([str(own_file), str(out), "--in-channels", "3"])  # no --vit-heads: before, 12 replaced the stored 2
    _, meta = load_weights_file(out)
    assert meta["architecture"]["vit_heads"] == TINY["vit_heads"] and meta["architecture"]["in_channels"] == 3
    assert meta["spacing"] == META["spacing"]


def test_own_file_refuses_a_different_vit_heads(own_file, tmp_path, capsys):
    err = one_line_error(capsys, convert, [str(own_file), str(tmp_path / "o.pth"), "--in-channels", "2",
                                           "--vit-heads", "12"])
    assert "--vit-heads 12 differs from the 2 heads stored" in err
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("meta", [None, "hyspark", {"method": "hyspark"}])
def test_malformed_metadata_is_a_clear_error(tmp_path, capsys, meta):
    src = tmp_path / "bad_meta.pth"
    torch.save({"network_weights": {"encoder.w": torch.zeros(1)}, "hyspark_meta": meta}, src)
    err = one_line_error(capsys, convert, [str(src), str(tmp_path / "o.pth"), "--in-channels", "2"])
    assert "malformed metadata" in err and "AttributeError" not in err


@pytest.mark.parametrize("channels", ["0", "-1"])
def test_in_channels_must_be_positive(own_file, tmp_path, capsys, channels):
    err = one_line_error(capsys, convert, [str(own_file), str(tmp_path / "o.pth"), "--in-channels", channels])
    assert f"--in-channels must be >= 1 (got {channels})" in err
    assert not (tmp_path / "o.pth").exists()


def test_unwritable_output_folder_is_one_line_before_reading(own_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = one_line_error(capsys, convert, [str(own_file), str(blocker / "sub" / "o.pth"), "--in-channels", "2"])
    assert "cannot write into the output folder" in err


# ------------------------------------------------------------------------------------- benchmark


def test_benchmark_checks_arm_weights_before_any_fold(nn, tmp_path, capsys):
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("these are not weights")
    args = ["folds", "-d", "1", "-c", CONF, "-p", PLANS, "--arms", f"scratch={SCRATCH}"]
    status, _, err = cli(args + [f"pretrained={FINETUNE}:{not_torch}"], capsys)
    assert status == 2 and "arm 'pretrained': cannot read weights file" in err
    from nnunet_hyspark.methods import get_method

    mim_file = tmp_path / "mim.pth"  # MiM weights for the HySparK fine-tuning trainer
    torch.save({"network_weights": {"encoder.w": torch.zeros(1)},
                "hyspark_meta": {"network_class_name": get_method("mim").network.class_name}}, mim_file)
    status, _, err = cli(args + [f"pretrained={FINETUNE}:{mim_file}"], capsys)
    assert status == 2 and "arm 'pretrained'" in err and "fine-tunes" in err and "--method hyspark" in err


def test_benchmark_checks_its_output_folder_before_installing_splits(nn, tmp_path):
    from nnunet_hyspark.benchmark import folds as F

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    spec = F.build_spec("1", CONF, PLANS, [f"scratch={SCRATCH}"], output=str(blocker / "out"), folds=[0])
    with pytest.raises(HySparKError, match="cannot write into the benchmark output folder"):
        F.run_benchmark(spec, runner=FakeTrainer(nn["res"]))
    assert not (nn["pre"] / spec.dataset / "splits_final.json").exists()


def test_benchmark_refuses_an_incomplete_preprocessed_folder(nn, capsys):
    from nnunet_hyspark.planning import completeness

    data = nn["pre"] / DS / f"{PLANS}_{CONF}"
    completeness.remove_marker(data)
    (nn["pre"] / DS / "dataset.json").write_text(json.dumps({"numTraining": 6, "labels": {"background": 0}}))
    for c in ("a", "b"):  # 2 of 6 cases: a killed run
        (data / f"{c}.b2nd").write_bytes(b"x")
        (data / f"{c}.pkl").write_bytes(b"x")
    status, _, err = cli(["folds", "-d", "1", "-c", CONF, "-p", PLANS, "--arms", f"scratch={SCRATCH}"], capsys)
    assert status == 2 and "2 of 6 cases" in err and "hyspark_plan_and_preprocess -d 1" in err


def test_every_console_script_goes_through_cli_entry():
    """cli_entry is what turns permission / disk-full errors into one line: every command must use it."""
    import importlib
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        main = getattr(importlib.import_module(module), func)
        assert getattr(main, "__wrapped__", None) is not None, f"{name} is not wrapped by cli_entry"
