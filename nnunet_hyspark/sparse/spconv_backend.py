"""The ``spconv`` backend: the ``blocks`` backend with its full k^3 convs run by spconv (CUDA only).

UNTESTED IN THIS REPOSITORY: spconv is an optional dependency (``pip install spconv-cu120``,
matching your CUDA) and CI has neither spconv nor a GPU. Before relying on it, run
``tests/test_sparse_backends.py`` on a CUDA machine with spconv installed: the tests compare
every available backend (``available_backends()`` lists ``spconv`` there) with the dense
reference, forward and gradients.

What spconv does here: the stem and the ``expend`` convs (groups == 1) become submanifold
``SubMConv3d`` convolutions over the voxels of the kept cells, with the module's own weight and
bias passed in functionally (spconv 2.x keeps weights as ``(out, kx, ky, kz, in)``, so the
torch weight ``(out, in, kx, ky, kz)`` is permuted, differentiably, at each call). spconv has no
grouped convolution, so the depthwise convs inside MedNeXt blocks, and everything else
(pointwise ops, pooling, the dense fallback at small scales), come from ``blocks``.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from nnunet_hyspark.sparse.blocks import DEFAULT_DENSE_FROM_SCALE, BlockSparseBackend, CellLayout, sparse_conv3d


def spconv_available() -> bool:
    """True when the optional ``spconv`` package can be imported (it still needs CUDA to run)."""
    return importlib.util.find_spec("spconv") is not None


def _import_spconv():
    try:
        import spconv.pytorch as spconv
    except ImportError as exc:  # pragma: no cover - depends on the optional package
        raise RuntimeError("the spconv backend needs the optional spconv package built for your CUDA "
                           "(e.g. pip install spconv-cu120); backend 'blocks' gives the same numbers "
                           "without it") from exc
    return spconv


def voxel_indices(layout: CellLayout, cell: int, device: torch.device) -> torch.Tensor:
    """(N * cell^3, 4) int32 [batch, x, y, z] of every voxel of the kept cells, in cell-batch row order."""
    b, i, j, k = torch.unravel_index(layout.kept, (layout.batch, *layout.grid))
    u = torch.arange(cell, device=layout.kept.device)
    ux, uy, uz = torch.meshgrid(u, u, u, indexing="ij")
    coords = [b[:, None].expand(-1, cell ** 3),
              (i * cell)[:, None] + ux.reshape(1, -1),
              (j * cell)[:, None] + uy.reshape(1, -1),
              (k * cell)[:, None] + uz.reshape(1, -1)]
    return torch.stack(coords, dim=-1).reshape(-1, 4).to(device=device, dtype=torch.int32)


class SpconvBackend(BlockSparseBackend):
    """``blocks`` with stem/expend convs through spconv ``SubMConv3d`` (one rulebook per scale)."""

    name = "spconv"

    def __init__(self, dense_from_scale: int = DEFAULT_DENSE_FROM_SCALE, channels_last: bool = True):
        super().__init__(dense_from_scale, channels_last)
        self._spconv = _import_spconv()
        self._executors: dict[tuple, nn.Module] = {}

    def __repr__(self) -> str:
        return f"SpconvBackend(dense_from_scale={self.dense_from_scale}, channels_last={self.channels_last})"

    def conv3d(self, cells: torch.Tensor, layout: CellLayout, conv: nn.Conv3d) -> torch.Tensor:
        if conv.groups != 1 or not cells.is_cuda:
            return sparse_conv3d(cells, layout, conv)
        spconv = self._spconv
        n, cell, ch = cells.shape[0], cells.shape[1], cells.shape[-1]
        key = ("spconv", cell)
        template = layout.scratch.get(key)  # carries spconv's rulebook (indice_dict) for this scale
        features = cells.reshape(-1, ch)
        if template is None:
            template = spconv.SparseConvTensor(features, voxel_indices(layout, cell, cells.device),
                                               [g * cell for g in layout.grid], layout.batch)
        sparse_in = template.replace_feature(features)
        out = torch.func.functional_call(
            self._executor(conv, cell, cells.device),
            {"weight": conv.weight.permute(0, 2, 3, 4, 1).contiguous(), "bias": conv.bias}, (sparse_in,))
        layout.scratch[key] = out  # same indices (submanifold), now with the rulebook cached
        return out.features.view(n, cell, cell, cell, -1)

    def _executor(self, conv: nn.Conv3d, cell: int, device: torch.device) -> nn.Module:
        """A SubMConv3d used only as a function (its own parameters are replaced at each call)."""
        k = conv.kernel_size[0]
        key = (conv.in_channels, conv.out_channels, k, cell, device)
        if key not in self._executors:
            self._executors[key] = self._spconv.SubMConv3d(
                conv.in_channels, conv.out_channels, k, padding=k // 2, bias=conv.bias is not None,
                indice_key=f"subm_cell{cell}_k{k}").to(device)
        return self._executors[key]
