"""Geometry of the synthetic phantoms: a millimetre grid, smooth random fields, deformed ellipsoids.

Everything is in physical millimetres around the centre of the field of view, so the voxel spacing only
changes the sampling (see :mod:`nnunet_hyspark.synthetic`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class Grid:
    """Voxel-centre coordinates in mm, centred on the middle of the field of view."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        # float64 1-D axes (exact), float32 open grids for the 3-D arithmetic
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]
        self.X = self.axes[0].astype(np.float32)[:, None, None]
        self.Y = self.axes[1].astype(np.float32)[None, :, None]
        self.Z = self.axes[2].astype(np.float32)[None, None, :]

    def box(self, center: Sequence[float], half: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels within ``center +- half`` (None if empty)."""
        sl = []
        for ax, c, h in zip(self.axes, center, half):
            lo = int(np.searchsorted(ax, c - h, "left"))
            hi = int(np.searchsorted(ax, c + h, "right"))
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)  # type: ignore[return-value]

    def local(self, sl: tuple[slice, slice, slice], center: Sequence[float]):
        """Open-grid float32 coordinates relative to ``center`` inside the box ``sl``."""
        return (
            self.X[sl[0]] - np.float32(center[0]),
            self.Y[:, sl[1]] - np.float32(center[1]),
            self.Z[:, :, sl[2]] - np.float32(center[2]),
        )


@dataclass(frozen=True)
class Waves:
    """A smooth random field: sum of a few plane sine waves in physical space."""

    k: tuple[tuple[float, float, float], ...]  # wave vectors, rad/mm
    phase: tuple[float, ...]
    amp: tuple[float, ...]

    @staticmethod
    def sample(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float], amp_total: float,
               z_weight: float = 1.0) -> "Waves":
        k, phase, amp = [], [], []
        for _ in range(n):
            d = rng.normal(size=3)
            d[2] *= z_weight
            d /= np.linalg.norm(d) + 1e-12
            lam = rng.uniform(*wavelength_mm)
            k.append(tuple(float(v) for v in d * (2.0 * math.pi / lam)))
            phase.append(float(rng.uniform(0.0, 2.0 * math.pi)))
            amp.append(float(rng.uniform(0.4, 1.0)))
        s = sum(amp)
        amp = [a * amp_total / s for a in amp]
        return Waves(tuple(k), tuple(phase), tuple(amp))

    @property
    def bound(self) -> float:
        return float(sum(abs(a) for a in self.amp))

    def __call__(self, px, py, pz):
        out = None
        for (kx, ky, kz), ph, a in zip(self.k, self.phase, self.amp):
            t = np.float32(a) * np.sin(np.float32(kx) * px + np.float32(ky) * py + np.float32(kz) * pz
                                       + np.float32(ph))
            out = t if out is None else out + t
        return np.float32(0.0) if out is None else out


def rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    cz, sz = math.cos(yaw), math.sin(yaw)
    cy, sy = math.cos(pitch), math.sin(pitch)
    cx, sx = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    ry = np.array([[cy, 0, sy], [0, 1.0, 0], [-sy, 0, cy]])
    rx = np.array([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Ellipsoid:
    """Deformed ellipsoid ``|R^T (p - c) / r|^2 + waves(p - c) < 1`` (mm)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: tuple[tuple[float, ...], ...]  # columns are the local axes in world coordinates
    waves: Waves

    @staticmethod
    def make(center, radii, yaw=0.0, pitch=0.0, roll=0.0, waves: Waves | None = None) -> "Ellipsoid":
        r = rotation(yaw, pitch, roll)
        return Ellipsoid(tuple(float(v) for v in center), tuple(float(v) for v in radii),
                          tuple(tuple(float(v) for v in row) for row in r),
                          waves if waves is not None else Waves((), (), ()))

    def field(self, g: Grid):
        """Return ``(slices, f)`` with the implicit function on the bounding box, or None."""
        R = np.asarray(self.rot)
        r = np.asarray(self.radii)
        half = np.sqrt(((R * r[None, :]) ** 2).sum(1)) * math.sqrt(1.0 + self.waves.bound)
        sl = g.box(self.center, half)
        if sl is None:
            return None
        px, py, pz = g.local(sl, self.center)
        f = None
        for j in range(3):
            q = (np.float32(R[0, j] / r[j]) * px + np.float32(R[1, j] / r[j]) * py
                 + np.float32(R[2, j] / r[j]) * pz)
            f = q * q if f is None else f + q * q
        f = f + self.waves(px, py, pz)
        return sl, np.broadcast_to(f, tuple(s.stop - s.start for s in sl))
