"""Synthetic abdomen-like CT phantoms, written as nnU-Net v2 raw datasets.

The phantoms are meant for smoke tests, demos and tiny pre-training runs, not for
science. Each case is a small "abdomen" in Hounsfield units:

* air outside the body (-1000), a body outline (an ellipse-ish cylinder, slightly
  deformed, its size varying a little along z) with subcutaneous fat (~-100), a
  thin muscular wall (~45) and an abdominal cavity filled with soft tissue (~35)
  with fat blobs, a few bowel-gas bubbles and a stomach with a fluid level;
* liver (~60), spleen (~50), two kidneys (medulla ~30, brighter cortex),
  contrast-filled aorta (~150) and inferior vena cava, psoas and paraspinal muscles;
* bone: a segmented spine (cancellous ~250, cortex ~800, discs, spinal canal,
  posterior arch, spinous process) and ribs around the upper abdomen;
* lungs (~-850) above a domed diaphragm at the top of the volume, with a heart;
* slight Gaussian smoothing (partial volume) and lightly correlated Gaussian
  noise (sigma 10-20 HU), clipped to the usual CT range [-1024, 3071].

All anatomy is defined in physical millimetres around the centre of the field of
view, so the voxel spacing (also anisotropic, e.g. 1 x 1 x 3 mm) only changes the
sampling, never the size of an organ. The anatomy has a fixed physical size: the
body cross-section is at most about ``PHANTOM_EXTENT_MM`` (x, y); the default
64 x 64 x 48 voxels at 1.5 mm (a 96 x 96 x 72 mm field of view) contains it with
air around it, smaller fields of view cut the body at the image border.

Randomness: every anatomical parameter of a case is drawn from a per-case
generator derived from ``(seed, case index)`` (see :func:`case_rng`), before any
grid-dependent draw (the noise), so case *k* is the same whatever the number of
cases, and the same seed at another spacing gives the same anatomy.

Arrays are indexed ``(x, y, z)``, x = patient right -> left, y = anterior ->
posterior, z = inferior -> superior (LPS, identity direction, like DICOM/ITK).
Labels: :data:`LABELS`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunet_hyspark.errors import HySparKError, require_nnunet_env

__all__ = [
    "LABELS",
    "PHANTOM_EXTENT_MM",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "DEFAULT_NAME",
    "DEFAULT_NAME_UNLABELED",
    "MIN_SHAPE",
    "case_rng",
    "make_phantom",
    "make_case",
    "write_dataset",
    "dataset_folder_name",
]

#: Organ labels of the segmentation maps (nnU-Net v2 ``dataset.json`` format).
LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}

#: Largest body cross-section (x, y) in mm a phantom can have; a field of view at
#: least this large (plus a margin) shows air all around the body.
PHANTOM_EXTENT_MM: tuple[float, float] = (90.0, 68.0)

DEFAULT_SHAPE: tuple[int, int, int] = (64, 64, 48)
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 1.5)
DEFAULT_NAME = "SyntheticCT"
DEFAULT_NAME_UNLABELED = "SyntheticCTUnlabeled"
#: Smallest number of voxels allowed along any axis.
MIN_SHAPE = 16

HU_MIN, HU_MAX = -1024.0, 3071.0
_HU_AIR = -1000.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


# ----------------------------------------------------------------------------- geometry


class _Grid:
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
class _Waves:
    """A smooth random field: sum of a few plane sine waves in physical space."""

    k: tuple[tuple[float, float, float], ...]  # wave vectors, rad/mm
    phase: tuple[float, ...]
    amp: tuple[float, ...]

    @staticmethod
    def sample(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float], amp_total: float,
               z_weight: float = 1.0) -> "_Waves":
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
        return _Waves(tuple(k), tuple(phase), tuple(amp))

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


def _rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    cz, sz = math.cos(yaw), math.sin(yaw)
    cy, sy = math.cos(pitch), math.sin(pitch)
    cx, sx = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    ry = np.array([[cy, 0, sy], [0, 1.0, 0], [-sy, 0, cy]])
    rx = np.array([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Ellipsoid:
    """Deformed ellipsoid ``|R^T (p - c) / r|^2 + waves(p - c) < 1`` (mm)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: tuple[tuple[float, ...], ...]  # columns are the local axes in world coordinates
    waves: _Waves

    @staticmethod
    def make(center, radii, yaw=0.0, pitch=0.0, roll=0.0, waves: _Waves | None = None) -> "_Ellipsoid":
        r = _rotation(yaw, pitch, roll)
        return _Ellipsoid(tuple(float(v) for v in center), tuple(float(v) for v in radii),
                          tuple(tuple(float(v) for v in row) for row in r),
                          waves if waves is not None else _Waves((), (), ()))

    def field(self, g: _Grid):
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


# ----------------------------------------------------------------------------- anatomy


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sample_anatomy(rng: np.random.Generator) -> dict:
    """Draw every random parameter of one phantom (grid independent, fixed draw order)."""
    a: dict = {}
    deg = math.pi / 180.0
    # body outline
    a["body_c"] = (_u(rng, -2, 2), _u(rng, -2, 2))
    a["body_r"] = (_u(rng, 37, 42), _u(rng, 27, 31))
    a["body_waves"] = _Waves.sample(rng, 3, (40, 90), _u(rng, 0.03, 0.07), z_weight=0.3)
    a["body_z"] = (_u(rng, 0.01, 0.04), 2 * math.pi / _u(rng, 80, 160), _u(rng, 0, 2 * math.pi))
    a["t_fat"] = _u(rng, 3.0, 6.0)
    a["t_muscle"] = _u(rng, 1.8, 3.0)
    a["hu_fat"] = _u(rng, -115, -85)
    a["hu_muscle"] = _u(rng, 40, 55)
    a["hu_soft"] = _u(rng, 30, 42)
    cx, cy = a["body_c"]
    rx, ry = a["body_r"]
    rcx, rcy = rx - a["t_fat"] - a["t_muscle"], ry - a["t_fat"] - a["t_muscle"]  # cavity radii
    # diaphragm domes (right side higher, under it the liver), lungs, heart
    a["dia_z"] = _u(rng, 17, 24)
    a["dia_dome"] = (_u(rng, 4, 7) + _u(rng, 1, 3), _u(rng, 4, 7))  # right, left
    a["hu_lung"] = _u(rng, -870, -830)
    a["heart"] = _Ellipsoid.make((cx + _u(rng, 0, 4), cy - 0.35 * rcy, a["dia_z"] + _u(rng, 12, 16)),
                                 (0.33 * rcx, 0.5 * rcy, _u(rng, 12, 15)), yaw=_u(rng, -20, 20) * deg)
    a["hu_heart"] = _u(rng, 35, 50)
    # spine (fixed physical size), posterior in the body
    xs = cx + _u(rng, -1, 1)
    ys = cy + ry - _u(rng, 16, 17.5)
    a["spine_c"] = (xs, ys)
    a["vert_r"] = (_u(rng, 5.2, 6.2), _u(rng, 4.3, 5.0))
    a["vert_period"] = _u(rng, 7.0, 8.5)
    a["vert_phase"] = _u(rng, 0, 1)
    a["disc_frac"] = _u(rng, 0.18, 0.25)
    a["hu_cancellous"] = _u(rng, 200, 320)
    a["hu_cortex"] = _u(rng, 700, 1000)
    a["hu_disc"] = _u(rng, 70, 100)
    a["canal_r"] = _u(rng, 2.0, 2.5)
    a["arch_t"] = _u(rng, 1.3, 1.8)
    a["hu_arch"] = _u(rng, 450, 700)
    a["spinous"] = (_u(rng, 1.1, 1.5), _u(rng, 2.6, 3.2))
    # ribs around the upper abdomen / lower thorax
    a["rib_period"] = _u(rng, 7.0, 8.5)
    a["rib_phase"] = _u(rng, 0, 1)
    a["rib_width"] = _u(rng, 2.0, 2.8)
    a["rib_slope"] = _u(rng, 0.1, 0.25)
    a["rib_below"] = _u(rng, 12, 18)
    a["hu_rib"] = _u(rng, 450, 700)
    # muscles around the spine
    a["paraspinal"] = (_u(rng, 6.5, 8.0), _u(rng, 4.0, 5.0), _u(rng, 3.5, 4.5))  # dx, rx, ry
    a["psoas"] = (_u(rng, 8.0, 9.5), _u(rng, 2.8, 3.6), a["dia_z"] - _u(rng, 12, 18))  # dx, r, top z
    # vessels (contrast enhanced)
    a["aorta"] = (xs + _u(rng, 1.5, 3.0), ys - a["vert_r"][1] - _u(rng, 3.0, 3.8), _u(rng, 2.2, 2.8))
    a["ivc"] = (xs - _u(rng, 4.5, 6.0), ys - a["vert_r"][1] - _u(rng, 2.5, 3.5), _u(rng, 2.6, 3.4),
                _u(rng, 1.8, 2.4))
    a["vessel_tilt"] = (_u(rng, -0.05, 0.05), _u(rng, -0.05, 0.05))
    a["hu_aorta"] = _u(rng, 130, 180)
    a["hu_ivc"] = _u(rng, 80, 120)
    # bowel: fat blobs, gas bubbles, stomach with air-fluid level
    a["fat_blobs"] = [
        _Ellipsoid.make((cx + _u(rng, -0.6, 0.6) * rcx, cy + _u(rng, -0.8, 0.2) * rcy, _u(rng, -36, 12)),
                        (_u(rng, 2.5, 5.5), _u(rng, 2.5, 5.5), _u(rng, 2.5, 6.0)),
                        yaw=_u(rng, -90, 90) * deg, waves=_Waves.sample(rng, 2, (8, 20), 0.15))
        for _ in range(int(rng.integers(6, 11)))
    ]
    a["gas"] = [
        _Ellipsoid.make((cx + _u(rng, -0.5, 0.5) * rcx, cy + _u(rng, -0.8, -0.2) * rcy, _u(rng, -36, 5)),
                        (_u(rng, 1.5, 3.0), _u(rng, 1.5, 3.0), _u(rng, 1.5, 3.5)))
        for _ in range(int(rng.integers(1, 4)))
    ]
    a["hu_gas"] = _u(rng, -950, -850)
    a["stomach"] = _Ellipsoid.make((cx + _u(rng, 0.15, 0.3) * rcx, cy - _u(rng, 0.3, 0.45) * rcy,
                                    a["dia_z"] - _u(rng, 6, 10)),
                                   (_u(rng, 5.5, 7.5), _u(rng, 4.5, 6.0), _u(rng, 7, 10)),
                                   yaw=_u(rng, -30, 0) * deg, waves=_Waves.sample(rng, 2, (10, 25), 0.12))
    a["stomach_gas"] = _u(rng, 0.2, 0.5)  # fraction of the AP radius holding gas
    a["hu_stomach"] = _u(rng, 5, 25)
    # organs
    a["liver"] = _Ellipsoid.make(
        (cx - _u(rng, 0.38, 0.48) * rcx, cy - _u(rng, 0.0, 0.15) * rcy, a["dia_z"] - _u(rng, 12, 17)),
        (_u(rng, 0.45, 0.55) * rcx, _u(rng, 0.72, 0.85) * rcy, _u(rng, 18, 23)),
        yaw=_u(rng, -15, 15) * deg, pitch=_u(rng, -8, 8) * deg, roll=_u(rng, -8, 8) * deg,
        waves=_Waves.sample(rng, 4, (15, 40), _u(rng, 0.1, 0.2)))
    a["hu_liver"] = _u(rng, 55, 65)
    a["liver_texture"] = _Waves.sample(rng, 3, (6, 15), _u(rng, 2, 5))
    a["spleen"] = _Ellipsoid.make(
        (cx + _u(rng, 0.55, 0.65) * rcx, cy + _u(rng, 0.25, 0.4) * rcy, a["dia_z"] - _u(rng, 8, 13)),
        (_u(rng, 6.0, 7.5), _u(rng, 10.0, 12.0), _u(rng, 11, 14)),
        yaw=_u(rng, -45, -20) * deg, pitch=_u(rng, -8, 8) * deg,
        waves=_Waves.sample(rng, 3, (12, 30), _u(rng, 0.08, 0.15)))
    a["hu_spleen"] = _u(rng, 45, 55)
    z_kidney = a["dia_z"] - _u(rng, 26, 32)
    kidneys = []
    for side in (-1.0, 1.0):  # patient right (-x, a little lower), patient left (+x)
        kidneys.append(_Ellipsoid.make(
            (xs + side * _u(rng, 12.5, 14.5), ys + _u(rng, -1.5, 1.5),
             z_kidney + (-_u(rng, 1.5, 4.0) if side < 0 else 0.0)),
            (_u(rng, 4.5, 5.5), _u(rng, 5.5, 6.5), _u(rng, 11, 13.5)),
            yaw=side * _u(rng, 15, 30) * deg, roll=_u(rng, -10, 10) * deg,
            waves=_Waves.sample(rng, 2, (12, 30), _u(rng, 0.04, 0.1))))
    a["kidneys"] = kidneys
    a["kidney_cortex"] = _u(rng, 0.55, 0.7)  # implicit-function level where the cortex starts
    a["hu_medulla"] = _u(rng, 25, 35)
    a["hu_cortex_kidney"] = _u(rng, 80, 120)
    # image formation
    a["blur_mm"] = _u(rng, 0.4, 0.7)
    a["noise_hu"] = _u(rng, 10, 20)
    return a


def _render(a: dict, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Paint the noiseless phantom (HU, float32) and its labels (uint8) on the grid."""
    img = np.full(g.shape, _HU_AIR, np.float32)
    lab = np.zeros(g.shape, np.uint8)
    X, Y, Z = g.X, g.Y, g.Z
    f32 = np.float32

    cx, cy = a["body_c"]
    rx, ry = a["body_r"]
    bx, by = X - f32(cx), Y - f32(cy)
    zamp, zfreq, zph = a["body_z"]
    scale = f32(1.0) + f32(zamp) * np.sin(f32(zfreq) * Z + f32(zph))  # (1, 1, nz)
    deform = a["body_waves"](bx, by, Z)

    def ellipse(erx: float, ery: float) -> np.ndarray:
        return (bx / (f32(erx) * scale)) ** 2 + (by / (f32(ery) * scale)) ** 2 + deform

    tf, tm = a["t_fat"], a["t_muscle"]
    body = ellipse(rx, ry) < 1
    inner = ellipse(rx - tf, ry - tf) < 1
    f_wall_mid = ellipse(rx - tf - 0.5 * tm, ry - tf - 0.5 * tm)
    cavity = ellipse(rx - tf - tm, ry - tf - tm) < 1
    img[body] = a["hu_fat"]
    img[inner] = a["hu_muscle"]
    img[cavity] = a["hu_soft"]

    # diaphragm: one dome per side, peaking over the middle of each hemithorax
    rcx, rcy = rx - tf - tm, ry - tf - tm
    dome_r, dome_l = a["dia_dome"]
    u_r = ((X - f32(cx - 0.5 * rcx)) / f32(0.55 * rcx)) ** 2 + ((Y - f32(cy)) / f32(0.9 * rcy)) ** 2
    u_l = ((X - f32(cx + 0.5 * rcx)) / f32(0.55 * rcx)) ** 2 + ((Y - f32(cy)) / f32(0.9 * rcy)) ** 2
    dia = np.where(X < f32(cx), f32(a["dia_z"]) + f32(dome_r) * (1 - u_r),
                   f32(a["dia_z"]) + f32(dome_l) * (1 - u_l))  # (nx, ny, 1)
    above = Z > dia  # thorax side of the diaphragm
    below_cavity = cavity & ~above

    def paint(shape: _Ellipsoid, hu, label: int = 0, within: np.ndarray | None = None, level: float = 1.0):
        res = shape.field(g)
        if res is None:
            return None
        sl, f = res
        m = f < level
        if within is not None:
            m &= within[sl]
        if np.ndim(hu):
            img[sl][m] = np.broadcast_to(hu, m.shape)[m]
        else:
            img[sl][m] = hu
        lab[sl][m] = label
        return sl, f, m

    # bowel contents
    for blob in a["fat_blobs"]:
        paint(blob, a["hu_fat"], within=below_cavity)
    for bubble in a["gas"]:
        paint(bubble, a["hu_gas"], within=below_cavity)
    res = paint(a["stomach"], a["hu_stomach"], within=below_cavity)
    if res is not None:  # gas cap on the anterior (non-dependent, small y) side
        sl, f, m = res
        st = a["stomach"]
        py = g.Y[:, sl[1]] - f32(st.center[1])
        gas = m & (py < f32(-(1.0 - 2.0 * a["stomach_gas"]) * st.radii[1]))
        img[sl][gas] = a["hu_gas"]

    # thorax: lungs around the heart
    thorax = cavity & above
    img[thorax] = a["hu_lung"]
    paint(a["heart"], a["hu_heart"], within=thorax)

    # muscles around the spine
    xs, ys = a["spine_c"]
    pdx, prx, pry = a["paraspinal"]
    para_y = ys + a["vert_r"][1] + a["canal_r"] + 2.5
    for side in (-1.0, 1.0):
        m = ((X - f32(xs + side * pdx)) / f32(prx)) ** 2 + ((Y - f32(para_y)) / f32(pry)) ** 2 < 1
        img[np.broadcast_to(m, g.shape) & body] = a["hu_muscle"]
    sdx, sr, stop = a["psoas"]
    for side in (-1.0, 1.0):
        m = ((X - f32(xs + side * sdx)) ** 2 + (Y - f32(ys)) ** 2 < f32(sr * sr)) & (Z < f32(stop))
        img[m & cavity] = a["hu_muscle"]

    # organs (labelled), below the diaphragm and inside the abdominal cavity
    tex = a["liver_texture"]
    res = a["liver"].field(g)
    if res is not None:
        sl, f = res
        m = (f < 1) & below_cavity[sl]
        px, py, pz = g.local(sl, (0.0, 0.0, 0.0))
        hu = f32(a["hu_liver"]) + tex(px, py, pz)
        img[sl][m] = np.broadcast_to(hu, m.shape)[m]
        lab[sl][m] = LABELS["liver"]
    paint(a["spleen"], a["hu_spleen"], LABELS["spleen"], within=below_cavity)
    for kidney in a["kidneys"]:
        res = paint(kidney, a["hu_cortex_kidney"], LABELS["kidneys"], within=below_cavity)
        if res is not None:
            sl, f, m = res
            img[sl][m & (f < a["kidney_cortex"])] = a["hu_medulla"]

    # vessels (unlabelled), along z with a slight tilt
    tx, ty = a["vessel_tilt"]
    ax_, ay_, ar = a["aorta"]
    aorta = ((X - f32(ax_) - f32(tx) * Z) ** 2 + (Y - f32(ay_) - f32(ty) * Z) ** 2) < f32(ar * ar)
    img[aorta & cavity] = a["hu_aorta"]
    lab[aorta & cavity] = 0
    ix, iy, irx, iry = a["ivc"]
    ivc = (((X - f32(ix) - f32(tx) * Z) / f32(irx)) ** 2 + ((Y - f32(iy) - f32(ty) * Z) / f32(iry)) ** 2 < 1) & ~above
    img[ivc & cavity] = a["hu_ivc"]
    lab[ivc & cavity] = 0

    # spine: vertebral bodies with cortex and discs, canal, posterior arch, spinous process
    vrx, vry = a["vert_r"]
    fv = ((X - f32(xs)) / f32(vrx)) ** 2 + ((Y - f32(ys)) / f32(vry)) ** 2  # (nx, ny, 1)
    phase = np.mod(Z / f32(a["vert_period"]) + f32(a["vert_phase"]), f32(1.0))  # (1, 1, nz)
    disc = phase < f32(a["disc_frac"])
    vb = fv < 1
    cortex_level = (1.0 - 1.2 / min(vrx, vry)) ** 2
    bone_img = np.where(fv < f32(cortex_level), f32(a["hu_cancellous"]), f32(a["hu_cortex"]))
    spine_hu = np.where(disc, f32(a["hu_disc"]), bone_img)
    canal_y = ys + vry + a["canal_r"] + 0.3
    rc2 = (X - f32(xs)) ** 2 + (Y - f32(canal_y)) ** 2
    canal = rc2 < f32(a["canal_r"] ** 2)
    arch = (rc2 < f32((a["canal_r"] + a["arch_t"]) ** 2)) & ~canal
    spx, spy = a["spinous"]
    spinous = ((X - f32(xs)) / f32(spx)) ** 2 + ((Y - f32(canal_y + a["canal_r"] + spy)) / f32(spy)) ** 2 < 1
    vb3 = np.broadcast_to(vb, g.shape)
    img[vb3] = np.broadcast_to(spine_hu, g.shape)[vb3]
    post = (arch | spinous) & ~disc
    img[post] = a["hu_arch"]
    img[np.broadcast_to(canal, g.shape)] = 15.0
    spine = vb3 | post | canal
    lab[spine] = 0

    # ribs in the muscular wall, above the lower costal margin, sloping down anteriorly
    rmean = 0.5 * ((rx - tf - 0.5 * tm) + (ry - tf - 0.5 * tm))
    ring = np.abs(f_wall_mid - 1) < f32(2.0 * 0.5 * a["rib_width"] * 0.8 / rmean)
    zr = (Z + f32(a["rib_slope"]) * by) / f32(a["rib_period"]) + f32(a["rib_phase"])
    band = np.mod(zr, f32(1.0)) < f32(a["rib_width"] / a["rib_period"])
    gaps = ((np.abs(bx) < f32(0.3 * rx)) & (by < 0)) | ((np.abs(X - f32(xs)) < f32(8.0)) & (by > 0))
    ribs = ring & band & ~gaps & (Z > f32(a["dia_z"] - a["rib_below"]))
    img[ribs] = a["hu_rib"]
    lab[ribs] = 0
    return img, lab


def make_phantom(shape: Sequence[int], spacing: Sequence[float],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Generate one random abdomen-like CT phantom.

    Args:
        shape: number of voxels (x, y, z).
        spacing: voxel size in mm (x, y, z); anisotropic is fine, the anatomy is
            defined in mm.
        rng: random generator; the anatomy is drawn first (independently of shape
            and spacing), then the noise.

    Returns:
        ``(image_hu, labels)``: float32 HU image and uint8 label map (see
        :data:`LABELS`), both of shape ``shape`` indexed (x, y, z).
    """
    shape, spacing = _check_geometry(shape, spacing)
    anatomy = _sample_anatomy(rng)
    g = _Grid(shape, spacing)
    img, lab = _render(anatomy, g)
    # partial volume: slight blur in physical units
    sigma = [anatomy["blur_mm"] / s for s in spacing]
    img = gaussian_filter(img, sigma=sigma, mode="nearest", truncate=3.0)
    # lightly in-plane correlated noise scaled to the drawn standard deviation
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = gaussian_filter(noise, sigma=(0.6, 0.6, 0.0), mode="wrap", truncate=3.0)
    noise *= np.float32(anatomy["noise_hu"] / max(float(noise.std()), 1e-6))
    img += noise
    np.clip(img, HU_MIN, HU_MAX, out=img)
    return img.astype(np.float32, copy=False), lab


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index`` for ``seed``, independent of the number of cases.

    Equal to ``np.random.default_rng(np.random.SeedSequence(seed).spawn(n)[index])``.
    """
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def make_case(seed: int, index: int, shape: Sequence[int] = DEFAULT_SHAPE,
              spacing: Sequence[float] = DEFAULT_SPACING) -> tuple[np.ndarray, np.ndarray]:
    """Case ``index`` of a dataset generated with ``seed``: ``make_phantom`` with :func:`case_rng`."""
    return make_phantom(shape, spacing, case_rng(seed, index))


# ----------------------------------------------------------------------------- validation


def _check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    try:
        shape_t = tuple(int(v) for v in shape)
        if any(int(v) != v for v in shape):
            raise ValueError
    except (TypeError, ValueError):
        raise HySparKError(f"shape must be 3 integers, got {shape!r}", "e.g. --shape 64 64 48") from None
    if len(shape_t) != 3:
        raise HySparKError(f"shape must have 3 values (x y z), got {len(shape_t)}", "e.g. --shape 64 64 48")
    if any(v <= 0 for v in shape_t):
        raise HySparKError(f"shape must be positive, got {shape_t}", "e.g. --shape 64 64 48")
    if any(v < MIN_SHAPE for v in shape_t):
        raise HySparKError(f"shape {shape_t} is too small: every axis needs at least {MIN_SHAPE} voxels",
                           "e.g. --shape 64 64 48")
    try:
        spacing_t = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise HySparKError(f"spacing must be 3 numbers in mm, got {spacing!r}", "e.g. --spacing 1.5 1.5 1.5") from None
    if len(spacing_t) != 3:
        raise HySparKError(f"spacing must have 3 values (x y z), got {len(spacing_t)}",
                           "e.g. --spacing 1.5 1.5 1.5")
    if not all(math.isfinite(v) and v > 0 for v in spacing_t):
        raise HySparKError(f"spacing must be positive (mm), got {spacing_t}", "e.g. --spacing 1.5 1.5 1.5")
    return shape_t, spacing_t


def _check_int(value, what: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HySparKError(f"{what} must be an integer, got {value!r}", hint)
    return int(value)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net folder name ``DatasetXXX_Name``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


# ----------------------------------------------------------------------------- writing


def _write_nifti(arr_xyz: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    import SimpleITK as sitk

    # SimpleITK wants numpy arrays in (z, y, x) order; spacing/origin are (x, y, z)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(-(n - 1) / 2.0 * s) for n, s in zip(arr_xyz.shape, spacing)))
    sitk.WriteImage(img, str(path), True)


def write_dataset(root: str | os.PathLike | None, dataset_id: int, name: str | None = None,
                  num_cases: int = 8, shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] = DEFAULT_SPACING, seed: int = 0, unlabeled: bool = False,
                  force: bool = False, progress: bool = True) -> Path:
    """Write a synthetic CT dataset in nnU-Net v2 raw format and return its folder.

    Layout: ``root/DatasetXXX_Name/imagesTr/<case>_0000.nii.gz`` (int16 HU),
    ``labelsTr/<case>.nii.gz`` (uint8, :data:`LABELS`; not written when
    ``unlabeled``) and ``dataset.json``. An unlabeled dataset (labels
    ``{"background": 0}`` only) is meant for self-supervised pre-training
    collections, not for supervised nnU-Net training.

    Args:
        root: the nnU-Net raw folder; None -> ``$nnUNet_raw``.
        dataset_id: 1..999.
        name: dataset name; None -> ``SyntheticCT`` (``SyntheticCTUnlabeled``).
        num_cases: number of cases (>= 1).
        shape: voxels (x, y, z), each >= 16.
        spacing: voxel size in mm (x, y, z), positive.
        seed: non-negative; case k uses :func:`case_rng` ``(seed, k)``.
        unlabeled: write images only.
        force: replace any existing ``DatasetXXX_*`` folder with this id.
        progress: show a tqdm progress bar on stderr.

    The dataset is built in a hidden temporary sibling folder and renamed into
    place at the end; on any error the temporary folder is removed and an
    existing dataset is left untouched.

    Raises:
        HySparKError: bad arguments, missing ``nnUNet_raw``, or the dataset id
        already exists and ``force`` is False.
    """
    dataset_id = _check_int(dataset_id, "dataset id", "use an id between 1 and 999, e.g. -d 901")
    if not 1 <= dataset_id <= 999:
        raise HySparKError(f"dataset id must be between 1 and 999, got {dataset_id}",
                           "nnU-Net dataset ids have 3 digits, e.g. -d 901")
    num_cases = _check_int(num_cases, "number of cases", "e.g. --num-cases 8")
    if num_cases < 1:
        raise HySparKError(f"number of cases must be at least 1, got {num_cases}", "e.g. --num-cases 8")
    seed = _check_int(seed, "seed", "e.g. --seed 0")
    if seed < 0:
        raise HySparKError(f"seed must be non-negative, got {seed}", "e.g. --seed 0")
    shape, spacing = _check_geometry(shape, spacing)
    if name is None:
        name = DEFAULT_NAME_UNLABELED if unlabeled else DEFAULT_NAME
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise HySparKError(f"invalid dataset name {name!r}",
                           "use letters, digits, '_' and '-' only, starting with a letter or digit")

    if root is None:
        root = require_nnunet_env(["nnUNet_raw"])["nnUNet_raw"]
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise HySparKError(f"output root {root} is not a folder", "point --output-root/$nnUNet_raw to a folder")
    root.mkdir(parents=True, exist_ok=True)

    existing = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*"))
    if existing and not force:
        raise HySparKError(
            f"dataset id {dataset_id} already exists in {root}: {', '.join(p.name for p in existing)}",
            "pass --force (force=True) to replace it, or choose another dataset id")

    folder_name = dataset_folder_name(dataset_id, name)
    final = root / folder_name
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".{folder_name}.tmp-{tag}"
    width = max(3, len(str(num_cases - 1)))
    done = False
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        if not unlabeled:
            (tmp / "labelsTr").mkdir()
        from tqdm import tqdm

        for k in tqdm(range(num_cases), desc=f"synthesizing {folder_name}", unit="case", disable=not progress):
            image, labels = make_case(seed, k, shape, spacing)
            case = f"{name}_{k:0{width}d}"
            _write_nifti(np.rint(image).astype(np.int16), spacing, tmp / "imagesTr" / f"{case}_0000.nii.gz")
            if not unlabeled:
                _write_nifti(labels, spacing, tmp / "labelsTr" / f"{case}.nii.gz")
        fov = [round(n * s, 2) for n, s in zip(shape, spacing)]
        meta = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0} if unlabeled else dict(LABELS),
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
            "name": name,
            "description": (
                "Synthetic abdomen-like CT phantoms (HU) generated by hyspark_synthesize"
                + (" (images only, for self-supervised pre-training collections)" if unlabeled else "")
                + f"; shape {list(shape)}, spacing {list(spacing)} mm, field of view {fov} mm, seed {seed}"
            ),
            "reference": "nnunet-hyspark synthetic data, no real patients",
            "licence": "CC0",
            "release": "1.0",
            "overwrite_image_reader_writer": "SimpleITKIO",
            "hyspark_synthetic": {"seed": seed, "shape": list(shape), "spacing": list(spacing),
                                  "unlabeled": bool(unlabeled)},
        }
        with open(tmp / "dataset.json", "w") as fh:
            json.dump(meta, fh, indent=4)
            fh.write("\n")

        # swap into place: park old datasets with this id, rename, then delete the old ones
        parked: list[tuple[Path, Path]] = []
        try:
            for p in existing:
                if p.exists() or p.is_symlink():
                    trash = root / f".{p.name}.old-{tag}"
                    os.replace(p, trash)
                    parked.append((p, trash))
            os.replace(tmp, final)
        except BaseException:
            for p, trash in reversed(parked):
                if not p.exists():
                    os.replace(trash, p)
            raise
        done = True
        for _, trash in parked:
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
    finally:
        if not done and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
