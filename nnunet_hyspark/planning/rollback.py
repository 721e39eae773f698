"""All-or-nothing preprocessing: put a dataset's preprocessed folder back as it was if a run fails.

A configuration folder being rewritten is first moved to ``<folder>.hyspark-previous`` and deleted only
after the new run succeeded. If a run is killed, that backup is the last good copy: the next run keeps
it (and puts it back if it fails too) instead of replacing it with the killed run's half-written folder.
"""
from __future__ import annotations

import os
import shutil

from nnunet_hyspark.planning.completeness import is_marked

BACKUP_SUFFIX = ".hyspark-previous"


class Rollback:
    """Put a dataset's preprocessed folder back as it was if the run fails (top-level granularity)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.existed = os.path.isdir(folder)
        self.before = set(os.listdir(folder)) if self.existed else set()
        self.saved: dict[str, bytes] = {}
        self.moved: list[tuple[str, str]] = []

    def keep_file(self, path: str) -> None:
        if path not in self.saved and os.path.isfile(path):
            with open(path, "rb") as fh:
                self.saved[path] = fh.read()

    def move_aside(self, path: str) -> None:
        """Move an existing output folder out of the way (restored on failure, deleted on success)."""
        if any(p == path for p, _ in self.moved):
            return
        backup = path + BACKUP_SUFFIX
        if os.path.isdir(backup):  # left by a killed run
            if os.path.isdir(path) and not is_marked(path):
                shutil.rmtree(path)  # the killed run's half-written folder; the backup is the good copy
            elif os.path.isdir(path):
                shutil.rmtree(backup)  # killed while deleting a replaced copy: ``path`` is complete
            if os.path.isdir(backup):
                self.moved.append((path, backup))
                return
        if os.path.isdir(path):
            os.replace(path, backup)
            self.moved.append((path, backup))

    def rollback(self) -> None:
        if not self.existed:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        backups = {os.path.basename(b) for _, b in self.moved}
        for entry in os.listdir(self.folder):
            if entry not in self.before and entry not in backups:
                path = os.path.join(self.folder, entry)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        for path, data in self.saved.items():
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    if fh.read() == data:
                        continue
            with open(path, "wb") as fh:
                fh.write(data)
        for path, backup in reversed(self.moved):
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(backup, path)

    def commit(self) -> None:
        for _, backup in self.moved:
            shutil.rmtree(backup, ignore_errors=True)
