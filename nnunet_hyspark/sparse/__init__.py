"""Execution backends for the masked (submanifold-sparse) CNN part of HySparK's hybrid encoder.

A backend is a callable object ``backend(embeddings, x, mask) -> [x1, x2, x3, x4, h5]`` with a
``name``, taking the ``CNNEmbeddings`` module, the input ``(B, C, X, Y, Z)`` and the cell mask
``(B, gx, gy, gz)`` (True = kept). It returns DENSE maps with the same shapes and, within float
tolerance, the same values and gradients as the ``dense`` reference (dense operator, then
multiply by the mask, in ``CNNEmbeddings.forward``).

Backends:

* ``dense``  - the reference (:class:`DenseBackend`).
* ``blocks`` - this project's block-sparse execution on the kept cells (any device; see
  ``blocks.py``). Options: ``dense_from_scale`` (default 4), ``channels_last`` (default True).
* ``spconv`` - ``blocks`` with its full convs (stem, expend) run as spconv submanifold
  convolutions; CUDA only, needs the optional ``spconv`` package, imported only when requested.
  UNTESTED here (no GPU, no spconv): run tests/test_sparse_backends.py on a CUDA machine first.

A backend is resolved once, from its name, by :func:`resolve_backend` (or :func:`get_backend` with
options) and handed to the model: ``HybridEncoder.forward(x, mask, backend=obj)``.
"""
from __future__ import annotations

from typing import Protocol

import torch

BACKENDS = ("dense", "blocks", "spconv")
AUTO = "auto"


class SparseBackend(Protocol):
    """What the hybrid encoder calls to run its CNN on a mask (see the module docstring)."""

    name: str

    def __call__(self, embeddings: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]: ...


class DenseBackend:
    """The reference: every operator on the whole volume, then multiplied by the mask."""

    name = "dense"

    def __call__(self, embeddings: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        from nnunet_hyspark.masking import masks_per_scale

        return embeddings(x, masks_per_scale(mask.to(x.device)))

    def __repr__(self) -> str:
        return "DenseBackend()"


DENSE = DenseBackend()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on ``device`` (default: CUDA when available, else CPU), ``dense`` first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ["dense", "blocks"]
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        from nnunet_hyspark.sparse.spconv_backend import spconv_available

        if spconv_available():
            names.append("spconv")
    return names


def get_backend(name: str, **options) -> SparseBackend:
    """The backend object for ``name``; ``options`` go to its constructor (e.g. ``dense_from_scale``).

    Raises ValueError for an unknown name (listing the choices) and RuntimeError when ``spconv``
    cannot run here (no CUDA device, or the package is missing).
    """
    if name == "dense":
        if options:
            raise ValueError(f"the dense backend takes no options, got {sorted(options)}")
        return DENSE
    if name == "blocks":
        from nnunet_hyspark.sparse.blocks import BlockSparseBackend

        return BlockSparseBackend(**options)
    if name == "spconv":
        if not torch.cuda.is_available():
            raise RuntimeError("the spconv backend needs a CUDA GPU (spconv has no CPU kernels for training); "
                               "on CPU use backend 'blocks' (same numbers) or 'dense'")
        from nnunet_hyspark.sparse.spconv_backend import SpconvBackend

        return SpconvBackend(**options)
    raise ValueError(f"unknown sparse backend {name!r}; choose one of {', '.join(BACKENDS)} (or {AUTO})")


def auto_backend_name(device: torch.device | str) -> str:
    """What ``auto`` means on ``device``: ``blocks`` on CPU (measured faster there), ``dense`` on CUDA
    (``blocks`` is not yet measured on GPUs)."""
    return "blocks" if torch.device(device).type == "cpu" else "dense"


def resolve_backend(name: str, device: torch.device | str) -> SparseBackend:
    """The backend object for ``name`` on ``device`` (``auto``: :func:`auto_backend_name`), resolved once
    for a whole run. ValueError / RuntimeError as :func:`get_backend`."""
    return get_backend(auto_backend_name(device) if name == AUTO else name)
