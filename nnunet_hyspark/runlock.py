"""One run per output folder: an exclusive lock file held for the run's lifetime.

Two pre-training runs writing into one folder would interleave logs and overwrite each
other's checkpoints and weights. The lock is a file created with ``O_CREAT | O_EXCL``
(atomic on local and NFS v3+ file systems) holding who owns it: host, pid and start time.
A second run is refused with one line naming the holder. A lock whose process is gone
(same host, pid no longer running) is reported as stale with the command that clears it;
it is never taken over silently, because a pid on another host cannot be checked.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from nnunet_hyspark.errors import HySparKError

LOCK_NAME = ".hyspark-run.lock"


class RunLock:
    """``with RunLock(folder): ...`` holds ``folder/.hyspark-run.lock``; released on exit (also on errors)."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True):
        self.path = Path(folder) / LOCK_NAME
        self.enabled = enabled  # under torchrun only rank 0 holds it
        self._held = False

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise self._refusal() from None
        except PermissionError:
            raise HySparKError(f"cannot write into {self.path.parent}: permission denied",
                               "choose an output folder you can write to (-o/--output)") from None
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def _refusal(self) -> HySparKError:
        owner = read_owner(self.path)
        who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
               if owner else "an unknown process (unreadable lock file)")
        if owner and is_stale(owner):
            return HySparKError(f"{self.path.parent} has a stale run lock: {who} is no longer running",
                                f"if no other run uses this folder, remove it: rm {self.path}")
        return HySparKError(f"{self.path.parent} is in use by another run ({who})",
                            "wait for it to finish, or choose another output folder (-o/--output)")


def read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_stale(owner: dict) -> bool:
    """True when the owner ran on this host and its pid is gone; unknown hosts are never stale."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False
