"""Safe loading of user files, run locks and file-system errors (issue: nothing lost, nothing executed)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_hyspark.errors import HySparKError, cli_entry
from nnunet_hyspark.runlock import LOCK_NAME, RunLock
from nnunet_hyspark.safe_load import load_user_file, rng_state, set_rng_state


class _Payload:
    """Unpickling this calls os.system: a crafted 'weights file' that would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_crafted_pickle(path, marker) -> None:
    """A torch-format file whose unpickling would run ``touch marker``."""
    torch.save({"network_weights": {"w": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    write_crafted_pickle(path, marker)
    with pytest.raises(HySparKError, match="refused to load weights file") as info:
        load_user_file(path, "weights file", trust_flag="--trust-checkpoint")
    assert "--trust-checkpoint" in str(info.value)
    assert not marker.exists()


def test_published_namespace_is_allowed(tmp_path):
    path = tmp_path / "published.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    obj = load_user_file(path)
    assert obj["args"].lr == 1e-4 and torch.equal(obj["state_dict"]["w"], torch.ones(2))


def test_corrupt_and_missing_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(HySparKError, match="cannot read checkpoint"):
        load_user_file(bad, "checkpoint")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(1000.0)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(HySparKError, match="cannot read"):
        load_user_file(truncated)
    with pytest.raises(HySparKError, match="not found"):
        load_user_file(tmp_path / "nope.pth")


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pth"
    torch.save({"rng": rng_state()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(load_user_file(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and expected[3] == again[3]


def test_second_run_into_a_locked_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(HySparKError, match=f"in use by another run \\(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with RunLock(tmp_path):  # and can be taken again
        pass


def test_stale_lock_is_reported_with_how_to_clear_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                   "started": "2026-01-01 00:00:00"}))
    with pytest.raises(HySparKError, match="stale run lock") as info:
        RunLock(tmp_path).acquire()
    assert f"rm {tmp_path / LOCK_NAME}" in str(info.value)


def test_lock_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("code,expected", [(errno.EACCES, "permissions"), (errno.ENOSPC, "free disk space")])
def test_cli_entry_turns_file_system_errors_into_one_line(code, expected, capsys):
    @cli_entry
    def main():
        raise OSError(code, os.strerror(code), "/some/output/file")

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "/some/output/file" in err and expected in err and "\n" not in err


def test_cli_entry_keeps_tracebacks_for_bugs():
    @cli_entry
    def main():
        raise OSError(errno.EBADF, "bad file descriptor")

    with pytest.raises(OSError):
        main()
