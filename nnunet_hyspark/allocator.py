"""Keep freed memory in the process for reuse (glibc's malloc, Linux): a CPU speed-up with the same numbers.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
gives the pages back to the kernel on ``free``. A 3D training step on the CPU allocates and frees maps of
hundreds of MiB dozens of times, so every one of them is page-faulted in and zeroed by the kernel again,
step after step (in a virtual machine each fault costs more still): 1.15 million faults in one fine-tuning
step of HySparKUNet at 64^3. With mmap off and trimming off, freed blocks stay in the heap and the next
step reuses them: none in the steady state. Measured in one run each (``hyspark_benchmark speed --what
finetune --batch 2 --patch 64 --steps 3 --threads 2``, 2-core AMD EPYC, AVX2, no AMX, the setting given
through the environment): HySparKUNet 30.1 s -> 13.7 s per step, nnU-Net's PlainConvUNet 7.8 s -> 6.3 s;
peak resident memory 6.7 -> 8.5 GB (freed memory is kept, not returned). PyTorch's CPU performance guide
recommends the same for the same reason (there: by preloading jemalloc or tcmalloc).

Two ways to the same setting: :func:`reuse_environment` for processes we start (glibc reads ``MALLOC_*``
when a process starts), :func:`keep_freed_memory` for the running process (``mallopt``, for allocations
from then on). ``system`` leaves glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping

MALLOC_MODES = ("reuse", "system")
DEFAULT_MALLOC = "reuse"
#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: the largest trim threshold mallopt takes (an int); the environment takes a size_t, same effect here
_NEVER_TRIM = 2 ** 31 - 1
#: what glibc reads at process start-up for the ``reuse`` mode
REUSE_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)}


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (which has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # musl and others lack it
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Turn glibc's mmap for large blocks and heap trimming off in this process; False where there is no
    glibc (nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def apply_malloc_mode(mode: str) -> str:
    """Apply ``mode`` (one of :data:`MALLOC_MODES`) to this process; returns a line for the log."""
    if mode not in MALLOC_MODES:
        raise ValueError(f"unknown malloc mode {mode!r}; use one of {MALLOC_MODES}")
    if mode == "system":
        return "memory allocator: the C library's defaults (--malloc system)"
    if keep_freed_memory():
        return ("memory allocator: freed memory kept for reuse (glibc mmap and trimming off; faster CPU steps, "
                "more resident memory; --malloc system to turn off)")
    return "memory allocator: the C library's defaults (--malloc reuse needs glibc, not found)"


def reuse_environment(mode: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the ``MALLOC_*`` variables of ``mode`` for a
    child process; variables the user set already are kept."""
    env = dict(os.environ if base is None else base)
    if mode == "reuse":
        for key, value in REUSE_ENVIRONMENT.items():
            env.setdefault(key, value)
    return env
