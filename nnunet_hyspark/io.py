"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint, plot or JSON."""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from nnunet_hyspark.errors import HySparKError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling name (same file system, so os.replace is atomic) created with the usual umask
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_json_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)


def remove_atomic_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.<hex>.tmp`` files :func:`atomic_path` leaves when a run is killed mid-write.

    Call it only where no other process writes into ``folder`` (under a run lock, or before a
    command's own writes start): a live writer's temporary file would be deleted too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [f for f in folder.glob(".*.tmp") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any work starts.

    Permission, read-only and full-disk problems would otherwise surface only at the first
    write, after minutes of loading data or training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hyspark-write-test.{uuid.uuid4().hex}.tmp"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise HySparKError(f"cannot write into the {what} {folder}: {e.strerror or type(e).__name__}",
                           "check its permissions and free space, or choose another folder") from None
    return folder
