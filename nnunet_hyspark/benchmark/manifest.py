"""The benchmark's state file ``benchmark.json``: what the benchmark is, and what happened to each fold."""
from __future__ import annotations

import datetime as _dt
import threading
from pathlib import Path

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save

MANIFEST_NAME = "benchmark.json"
MANIFEST_FORMAT = 1


def now() -> str:
    """The time stamps of the manifest and the logs."""
    return _dt.datetime.now().isoformat(timespec="seconds")


class Manifest:
    """The benchmark's state file, rewritten atomically after every change (safe to interrupt)."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def load(cls, output_dir: Path) -> "Manifest":
        import json

        path = Path(output_dir) / MANIFEST_NAME
        if not path.is_file():
            return cls(path, {"format": MANIFEST_FORMAT})
        try:
            return cls(path, json.loads(path.read_text()))
        except ValueError as e:
            raise HySparKError(f"benchmark manifest {path} is corrupt ({e})",
                               "delete it or pass --force to start a new manifest")

    def save(self) -> None:
        with self._lock:
            self.data["updated"] = now()
            atomic_json_save(self.data, self.path)

    def set_fold(self, arm: str, fold: int, **fields: object) -> None:
        with self._lock:
            entry = self.data.setdefault("folds", {}).setdefault(arm, {}).setdefault(str(fold), {})
            entry.update(fields)
        self.save()

