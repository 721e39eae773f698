"""Loading files that users hand us, without running code that may be inside them.

A ``.pth`` file is a pickle, and unpickling can execute arbitrary code. Every file a
user passes (weights, checkpoints, published checkpoints) is therefore read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python
containers. Published checkpoints sometimes pickle a little more (the training
script's ``argparse.Namespace``): :data:`SAFE_EXTRA_GLOBALS` allows exactly those
harmless classes. Anything else is refused with a one-line error; the converter
offers ``--trust-checkpoint`` for a file the user vouches for, which unpickles it fully.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnunet_hyspark.errors import HySparKError

#: classes published checkpoints pickle besides tensors; none of them runs code when rebuilt
SAFE_EXTRA_GLOBALS = (argparse.Namespace,)


def load_user_file(path: str | os.PathLike, what: str = "file", trust: bool = False,
                   trust_flag: str | None = None) -> Any:
    """``torch.load`` on the CPU, refusing pickled code unless ``trust`` is set.

    ``what`` names the file in messages ("weights file", "checkpoint"); ``trust_flag`` is the
    command-line flag that allows full unpickling, named in the refusal when there is one.
    """
    path = Path(path)
    if not path.is_file():
        raise HySparKError(f"{what} not found: {path}", "check the path")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_EXTRA_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a refused class: the bytes are no valid pickle at all
            raise HySparKError(f"cannot read {what} {path}: {_first_line(e)}",
                               "the file is truncated, corrupt or not a torch file") from None
        blocked = _blocked_global(str(e))
        hint = (f"if you trust where it comes from, pass {trust_flag} (it unpickles the file fully, "
                "which can run code stored in it)" if trust_flag else
                "only tensors and plain Python values are accepted; re-export the file with torch.save of a "
                "state dict")
        raise HySparKError(f"refused to load {what} {path}: it contains pickled objects other than tensors"
                           + (f" ({blocked})" if blocked else ""), hint) from None
    # torch's legacy (non-zip) reader fails on arbitrary bytes with whatever its parser hits first
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError,
            struct.error) as e:
        if isinstance(e, PermissionError):
            raise HySparKError(f"cannot read {what} {path}: permission denied", "check the file's permissions") from None
        raise HySparKError(f"cannot read {what} {path}: {type(e).__name__}: {_first_line(e)}",
                           "the file is truncated, corrupt or not a torch file") from None


def _blocked_global(message: str) -> str | None:
    """The class torch refused, e.g. 'GLOBAL os.system', from its long error message."""
    for line in message.splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported global" in line:
            return line[:160]
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


# ---------------------------------------------------------------- RNG states as plain values
def rng_state() -> dict[str, Any]:
    """The process's RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(mt_state), "gauss": gauss},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
