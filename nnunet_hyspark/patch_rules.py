"""The one patch-size rule: every axis a positive multiple of what the network divides it by.

Each method's spec carries its ``patch_multiple`` (HySparK 16: the hybrid encoder downsamples by 16
before the ViT; MiM 32; Hi-End-MAE its ViT patch). Planners, the pre-training data loader and the
model builders call :func:`check_patch_multiple`, so a wrong patch reads the same everywhere:

    patch size [32, 40, 32] (--patch-size): axis 1 (y) = 40 is not a multiple of 16 (why) -> hint
"""
from __future__ import annotations

from typing import Sequence

from nnunet_hyspark.errors import HySparKError

AXES = ("x", "y", "z")


class PatchSizeError(HySparKError, ValueError):
    """A patch that breaks the rule: a HySparKError for commands, a ValueError for callers of a network."""


def nearest_multiples(n: int, multiple: int) -> tuple[int, int]:
    """The positive multiples of ``multiple`` just below (at least ``multiple``) and just above ``n``."""
    lo = max(multiple, n // multiple * multiple)
    return lo, max(lo + multiple, (n // multiple + 1) * multiple)


def check_patch_multiple(patch: Sequence[int], multiple: int, origin: str, hint: str | None = None,
                         why: str | None = None, dims: int | None = 3) -> tuple[int, ...]:
    """Return ``patch`` as ints, or raise one HySparKError naming the first axis that breaks the rule.

    ``origin`` says where the patch came from (an option, a plans file); ``why`` why the multiple;
    ``hint`` what to do (default: the nearest valid sizes of that axis; it may use the fields ``{axis}``,
    ``{lo}`` and ``{hi}``: the axis and its nearest valid sizes); ``dims``: the required number of axes
    (None: any).
    """
    ps = tuple(int(p) for p in patch)
    if dims is not None and len(ps) != dims:
        raise PatchSizeError(f"patch size {list(ps)} ({origin}) has {len(ps)} axes, not {dims}",
                           hint or f"give {dims} sizes (x y z)")
    for axis, n in enumerate(ps):
        if n <= 0 or n % multiple:
            name = AXES[axis] if axis < len(AXES) and len(ps) == 3 else str(axis)
            lo, hi = nearest_multiples(n, multiple)
            positive = " positive" if n <= 0 else ""
            raise PatchSizeError(
                f"patch size {list(ps)} ({origin}): axis {axis} ({name}) = {n} is not a{positive} multiple of "
                f"{multiple}" + (f" ({why})" if why else ""),
                hint.format(axis=axis, lo=lo, hi=hi) if hint else f"use e.g. {lo} or {hi} on axis {axis}")
    return ps
