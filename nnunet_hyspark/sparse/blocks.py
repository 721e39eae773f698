"""The ``blocks`` backend: the masked CNN encoder executed on kept cells only.

HySparK's mask is block-structured: at scale ``s`` every kept cell of the 1/16
grid is a cube of ``c = 16 >> s`` voxels, and the same cells are kept at every
scale. So instead of running each operator on the whole volume and multiplying
by the mask (the ``dense`` reference), this backend keeps the features as a
batch of kept cells, channels last: a tensor ``(N, c, c, c, C)`` where ``N`` is
the number of kept cells in the whole batch.

* Pointwise ops (LayerNorm, the 1x1 convs as matrix products, GELU, residual
  add) run directly on the cell batch: no work is spent on masked voxels.
* A k^3 convolution (stem, depthwise ``conv1``, ``expend``) first builds each
  cell's halo of ``k // 2`` voxels from its neighbouring cells, with one row
  gather through a precomputed index table (masked neighbours and voxels
  outside the volume read a zero row), then runs the dense conv with
  ``padding=0`` on ``(N, C, c+2h, c+2h, c+2h)``. This is exactly the
  submanifold semantics: kept outputs see kept inputs, masked inputs are zeros.
* Max-pooling with window 2 never straddles a cell, so it is done per cell.
* Every scale's output is scattered back into a dense zero map.

At the smallest cells the halo costs as much as it saves (a 1^3 cell is read
as 3^3), so from ``dense_from_scale`` on (default: scale 4) the backend converts
to a dense map and continues with the reference dense-then-mask operators.

All steps are differentiable tensor ops (index_select / index_copy / conv /
pool), so autograd gives the backward pass, and the modules' own parameters are
used. Two backwards are hand-written: a transposition (``TransposeSamples``),
and the depthwise convs', which use ``layers/depthwise.py`` (oneDNN's bf16
depthwise backward on the cells took 1.9-3.6x as long; same gradients).

Outputs are dense maps in channels-last-3d memory, which the HySparK decoder
reads (it converts every skip to channels-last for oneDNN's convolutions), so no
transposition is made only to be undone; ``channels_last=False`` gives contiguous
channels-first maps like the dense backend's. Under
autocast they keep the autocast dtype, where the dense backend's mask multiply
promotes them to float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.masking import ENCODER_STRIDE, upsample_mask
from nnunet_hyspark.layers.blocks import MedNeXtBlock
from nnunet_hyspark.layers.depthwise import depthwise_conv3d

#: First scale (0 = full resolution ... 4 = 1/16) run dense-then-mask by default. Measured per
#: stage (forward + backward, default widths, 96^3, mask 0.75, 2 CPU threads): cells win by about
#: 2.5x at scale 2 (4^3 cells) and 1.6x at scale 3 (2^3 cells: the halo only adds reads, the convs'
#: FLOPs still scale with the kept voxels); at scale 4 (1^3 cells, a 3^3 read per voxel) the two
#: are even or dense is ahead, and that stage is tiny anyway.
DEFAULT_DENSE_FROM_SCALE = 4


# ----------------------------------------------------------------------------- cell layout


@dataclass(eq=False)
class CellLayout:
    """Which cells of the (B, gx, gy, gz) grid are kept, and lookup tables derived from that.

    ``kept`` are the flat indices (batch-major, row-major) of the N kept cells: the order of
    the cell batch. ``cell_id`` maps every grid cell to its row in the cell batch, or to N
    (the "zero cell") when it is masked.
    """

    batch: int
    grid: tuple[int, int, int]
    kept: torch.Tensor  # (N,) int64
    cell_id: torch.Tensor  # (B, gx, gy, gz) int64, N where masked
    _tables: dict = field(default_factory=dict, repr=False)
    scratch: dict = field(default_factory=dict, repr=False)  # per-forward state of a backend (spconv rulebooks)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "CellLayout":
        if mask.dim() != 4:
            raise ValueError(f"mask must have shape (B, gx, gy, gz), got {tuple(mask.shape)}")
        flat = mask.reshape(-1).bool()
        kept = flat.nonzero().squeeze(1)
        cell_id = torch.full((flat.numel(),), kept.numel(), dtype=torch.long, device=mask.device)
        cell_id[kept] = torch.arange(kept.numel(), device=mask.device)
        return cls(int(mask.shape[0]), tuple(int(g) for g in mask.shape[1:]), kept, cell_id.view(mask.shape))

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    def neighbours(self, reach: int) -> torch.Tensor:
        """Cached :func:`neighbour_table`."""
        return self._cached(("neighbours", reach), neighbour_table, reach)

    def halo_index(self, cell: int, halo: int) -> torch.Tensor:
        """Cached :func:`halo_index_table`."""
        return self._cached(("halo", cell, halo), halo_index_table, cell, halo)

    def run_index(self, cell: int) -> torch.Tensor:
        """Cached :func:`run_index_table` for cells of ``cell`` voxels."""
        return self._cached(("run", cell), run_index_table, cell)

    def _cached(self, key, build, *args) -> torch.Tensor:
        if key not in self._tables:
            self._tables[key] = build(self, *args)
        return self._tables[key]


def neighbour_table(layout: CellLayout, reach: int) -> torch.Tensor:
    """(N, (2*reach+1)^3) row of each neighbouring cell at offsets in [-reach, reach]^3 (row-major).

    Masked neighbours and neighbours outside the volume get the zero-cell row N.
    """
    n = layout.num_kept
    padded = F.pad(layout.cell_id, (reach,) * 6, value=n)  # pads the three grid axes
    b, i, j, k = torch.unravel_index(layout.kept, (layout.batch, *layout.grid))
    r = torch.arange(-reach, reach + 1, device=layout.kept.device)
    ox, oy, oz = (o.reshape(-1) for o in torch.meshgrid(r, r, r, indexing="ij"))
    return padded[b[:, None], (i[:, None] + reach + ox), (j[:, None] + reach + oy), (k[:, None] + reach + oz)]


def halo_index_table(layout: CellLayout, cell: int, halo: int) -> torch.Tensor:
    """(N * (cell + 2*halo)^3,) row to read for every voxel of every halo-padded cell.

    Rows index the cell batch flattened to ``(N * cell^3, C)`` with one zero row appended
    (row ``N * cell^3``), which voxels of masked or out-of-volume neighbours read. Along each
    axis, padded coordinate ``u`` lies in the neighbour at offset ``floor((u - halo) / cell)``,
    at its voxel ``(u - halo) mod cell``.
    """
    reach = math.ceil(halo / cell)
    neighbours = layout.neighbours(reach)  # (N, (2R+1)^3)
    u = torch.arange(cell + 2 * halo, device=layout.kept.device) - halo
    offset = torch.div(u, cell, rounding_mode="floor") + reach  # in [0, 2R]
    local = u - (offset - reach) * cell
    side = 2 * reach + 1
    slot = (offset[:, None, None] * side + offset[None, :, None]) * side + offset[None, None, :]
    voxel = (local[:, None, None] * cell + local[None, :, None]) * cell + local[None, None, :]
    source_cell = neighbours[:, slot.reshape(-1)]  # (N, P^3)
    rows = source_cell * cell ** 3 + voxel.reshape(1, -1)
    return torch.where(source_cell == layout.num_kept, layout.num_kept * cell ** 3, rows).reshape(-1)


# ----------------------------------------------------------------------------- layouts


def run_index_table(layout: CellLayout, cell: int) -> torch.Tensor:
    """(N * cell^2,) row of every z-run of every kept cell in a channels-last dense map seen as rows.

    A channels-last map (B, X, Y, Z, C) viewed as ``(B*X*Y*gz, cell*C)`` rows has one row per
    z-run of ``cell`` voxels inside one cell; a cell batch (N, c, c, c, C) viewed as
    ``(N*c*c, c*C)`` has the same rows, in (cell, x, y) order. Converting between the two
    layouts is one row gather / row copy with this table (long contiguous rows: fast).
    """
    gx, gy, gz = layout.grid
    b, i, j, k = torch.unravel_index(layout.kept, (layout.batch, gx, gy, gz))
    u = torch.arange(cell, device=layout.kept.device)
    x = (i * cell)[:, None, None] + u[None, :, None]  # (N, c, 1) dense x coordinate
    y = (j * cell)[:, None, None] + u[None, None, :]  # (N, 1, c) dense y coordinate
    return (((b[:, None, None] * gx * cell + x) * gy * cell + y) * gz + k[:, None, None]).reshape(-1)


def dense_to_cells(x: torch.Tensor, layout: CellLayout, cell: int) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (N, c, c, c, C): the kept cells, channels last."""
    ch = x.shape[1]
    rows = x.permute(0, 2, 3, 4, 1).reshape(-1, cell * ch)  # a view when x is channels-last (or C == 1)
    return rows.index_select(0, layout.run_index(cell)).view(-1, cell, cell, cell, ch)


def cells_to_dense(cells: torch.Tensor, layout: CellLayout, channels_last: bool = False) -> torch.Tensor:
    """(N, c, c, c, C) -> (B, C, X, Y, Z), zeros in masked cells.

    Contiguous channels-first (the dense backend's layout) unless ``channels_last``: then a
    channels-last-3d tensor, which skips one transposition of the whole map.
    """
    cell, ch = cells.shape[1], cells.shape[-1]
    size = [g * cell for g in layout.grid]
    rows = cells.new_zeros(layout.batch * size[0] * size[1] * layout.grid[2], cell * ch)
    rows.index_copy_(0, layout.run_index(cell), cells.reshape(-1, cell * ch))  # in place: no clone of the zeros
    if channels_last:
        return rows.view(layout.batch, *size, ch).permute(0, 4, 1, 2, 3)
    return TransposeSamples.apply(rows.view(layout.batch, -1, ch)).view(layout.batch, ch, *size)


class TransposeSamples(torch.autograd.Function):
    """(B, M, C) -> contiguous (B, C, M), one 2-D transposed copy per sample, in both directions.

    ``x.transpose(1, 2).contiguous()`` takes a generic strided-copy path that is several times
    slower on CPU than copying each sample as a 2-D transpose (a blocked kernel).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _transpose_samples(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _transpose_samples(grad)


def _transpose_samples(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for sample, target in zip(x, out):
        target.copy_(sample.t())
    return out


# ----------------------------------------------------------------------------- sparse operators


def gather_halo(cells: torch.Tensor, layout: CellLayout, halo: int) -> torch.Tensor:
    """(N, c, c, c, C) -> (N, c+2h, c+2h, c+2h, C): every cell with its halo from kept neighbours.

    One row gather (its backward, an index_add, is done by autograd).
    """
    n, cell, ch = cells.shape[0], cells.shape[1], cells.shape[-1]
    rows = torch.cat([cells.reshape(-1, ch), cells.new_zeros(1, ch)])
    size = cell + 2 * halo
    return rows.index_select(0, layout.halo_index(cell, halo)).view(n, size, size, size, ch)


def sparse_conv3d(cells: torch.Tensor, layout: CellLayout, conv: nn.Conv3d) -> torch.Tensor:
    """Submanifold ``conv`` (k^3, stride 1, 'same' padding) on the cell batch, channels last."""
    k = conv.kernel_size[0]
    if (conv.kernel_size != (k, k, k) or k % 2 != 1 or conv.stride != (1, 1, 1)
            or conv.dilation != (1, 1, 1) or conv.padding != (k // 2,) * 3):
        raise ValueError(f"blocks backend supports odd cubic stride-1 'same' convs only, got {conv}")
    padded = (gather_halo(cells, layout, k // 2) if k > 1 else cells).permute(0, 4, 1, 2, 3)
    if conv.groups > 1:
        out = depthwise_conv3d(padded, conv, pre_padded=True)
    else:
        out = F.conv3d(padded, conv.weight, conv.bias)
    return out.permute(0, 2, 3, 4, 1).contiguous()  # already channels-last in memory: a view


def pointwise_conv(cells: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A 1x1x1 conv as a matrix product over the channels-last rows."""
    return F.linear(cells, conv.weight.flatten(1), conv.bias)


def sparse_block(cells: torch.Tensor, layout: CellLayout, block: MedNeXtBlock) -> torch.Tensor:
    """MedNeXt block on the cell batch: sparse depthwise conv, then pointwise ops, plus residual."""
    h = sparse_conv3d(cells, layout, block.conv1)
    h = F.layer_norm(h, h.shape[-1:], block.norm.weight, block.norm.bias, block.norm.eps)
    h = pointwise_conv(block.act(pointwise_conv(h, block.conv2)), block.conv3)
    return cells + h


def pool_cells(cells: torch.Tensor) -> torch.Tensor:
    """2x max-pool inside every cell (windows never straddle cells): (N, c, ...) -> (N, c/2, ...)."""
    return F.max_pool3d(cells.permute(0, 4, 1, 2, 3), 2).permute(0, 2, 3, 4, 1).contiguous()


# ----------------------------------------------------------------------------- the backend


class BlockSparseBackend:
    """Callable ``(embeddings, x, mask) -> [x1, x2, x3, x4, h5]`` (dense maps, same numbers as ``dense``).

    ``dense_from_scale``: first scale (0..4) executed dense-then-mask; 5 = cells everywhere,
    0 = the dense reference throughout. ``channels_last`` (default): return the maps in channels-last-3d
    memory (saves a transposition per map, and HySparK's decoder's transposition back: 1.01x on a 96^3
    step, fp32, 2 threads, Xeon with AMX); False: contiguous channels-first like the dense backend's.
    """

    name = "blocks"

    def __init__(self, dense_from_scale: int = DEFAULT_DENSE_FROM_SCALE, channels_last: bool = True):
        if not 0 <= dense_from_scale <= 5:
            raise ValueError(f"dense_from_scale must be in 0..5, got {dense_from_scale}")
        self.dense_from_scale = dense_from_scale
        self.channels_last = channels_last

    def __repr__(self) -> str:
        return f"BlockSparseBackend(dense_from_scale={self.dense_from_scale}, channels_last={self.channels_last})"

    def __call__(self, embeddings: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        layout = CellLayout.from_mask(mask.to(x.device))
        as_cells = self.dense_from_scale > 0
        h = dense_to_cells(x, layout, ENCODER_STRIDE) if as_cells else x
        feats: list[torch.Tensor] = []
        for s in range(5):
            if s > 0:
                h = pool_cells(h) if as_cells else embeddings.down(h)
            if as_cells and s >= self.dense_from_scale:  # small cells: switch to the dense reference
                h = cells_to_dense(h, layout, self.channels_last)
                as_cells = False
            if as_cells:
                h = self.cells_stage(embeddings, s, h, layout)
                feats.append(cells_to_dense(h, layout, self.channels_last))
            else:
                h = dense_stage(embeddings, s, h, upsample_mask(mask, ENCODER_STRIDE >> s).to(x.device))
                feats.append(h)
        return feats

    def cells_stage(self, embeddings: nn.Module, s: int, cells: torch.Tensor, layout: CellLayout) -> torch.Tensor:
        """Scale ``s`` on the cell batch: (stem,) MedNeXt blocks, (expend)."""
        if s == 0:
            cells = self.conv3d(cells, layout, embeddings.stem)
        for block in embeddings.layers()[s]:
            cells = sparse_block(cells, layout, block)
        if s < 4:
            cells = self.conv3d(cells, layout, embeddings.expends()[s])
        return cells

    def conv3d(self, cells: torch.Tensor, layout: CellLayout, conv: nn.Conv3d) -> torch.Tensor:
        """The full k^3 convs (stem, expend); a subclass may run them elsewhere (see spconv_backend)."""
        return sparse_conv3d(cells, layout, conv)


def dense_stage(embeddings: nn.Module, s: int, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale ``s`` as the dense reference does it: every op dense, its output multiplied by ``mask``."""
    if s == 0:
        h = embeddings.stem(h * mask) * mask
    for block in embeddings.layers()[s]:
        h = block(h) * mask
    if s < 4:
        h = embeddings.expends()[s](h) * mask
    return h
