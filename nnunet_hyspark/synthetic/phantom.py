"""One synthetic abdomen-like CT phantom: the random anatomy of a case and its rendering in HU.

The anatomy of a case is drawn first, from a generator derived from ``(seed, case index)``
(:func:`case_rng`) and independently of the grid; then it is rendered on the grid and the noise is drawn.
So case *k* is the same whatever the number of cases, and the same seed at another spacing gives the same
anatomy. Arrays are indexed ``(x, y, z)`` (LPS). What the phantom contains: :mod:`nnunet_hyspark.synthetic`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.synthetic.geometry import Ellipsoid, Grid, Waves

#: Organ labels of the segmentation maps (nnU-Net v2 ``dataset.json`` format).
LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}

#: Largest body cross-section (x, y) in mm a phantom can have; a field of view at
#: least this large (plus a margin) shows air all around the body.
PHANTOM_EXTENT_MM: tuple[float, float] = (90.0, 68.0)

DEFAULT_SHAPE: tuple[int, int, int] = (64, 64, 48)
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 1.5)
#: The demo's (and the study's) geometry: a field of view of 72 x 48 x 72 mm cropped to the organs (the
#: body outline is cut at the borders) at 1.5 mm, as many voxels as 48 x 48 x 32 at 2 x 2 x 2.25 mm, so
#: that CPUs train in minutes while spleen and kidneys are ~1000 voxels and >= 7 voxels across each axis.
#: (The organs span about x -37..33, y -21..22, z -29..31 mm around the centre of the field of view.)
DEMO_SHAPE: tuple[int, int, int] = (48, 32, 48)
DEMO_SPACING: tuple[float, float, float] = (1.5, 1.5, 1.5)
#: Smallest number of voxels allowed along any axis.
MIN_SHAPE = 16

HU_MIN, HU_MAX = -1024.0, 3071.0
_HU_AIR = -1000.0


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
    a["body_waves"] = Waves.sample(rng, 3, (40, 90), _u(rng, 0.03, 0.07), z_weight=0.3)
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
    a["heart"] = Ellipsoid.make((cx + _u(rng, 0, 4), cy - 0.35 * rcy, a["dia_z"] + _u(rng, 12, 16)),
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
    a["hu_aorta"] = _u(rng, 320, 380)  # arterial contrast, brighter than any organ (see the spleen below)
    a["hu_ivc"] = _u(rng, 80, 120)
    # bowel: fat blobs, gas bubbles, stomach with air-fluid level
    a["fat_blobs"] = [
        Ellipsoid.make((cx + _u(rng, -0.6, 0.6) * rcx, cy + _u(rng, -0.8, 0.2) * rcy, _u(rng, -36, 12)),
                        (_u(rng, 2.5, 5.5), _u(rng, 2.5, 5.5), _u(rng, 2.5, 6.0)),
                        yaw=_u(rng, -90, 90) * deg, waves=Waves.sample(rng, 2, (8, 20), 0.15))
        for _ in range(int(rng.integers(6, 11)))
    ]
    a["gas"] = [
        Ellipsoid.make((cx + _u(rng, -0.5, 0.5) * rcx, cy + _u(rng, -0.8, -0.2) * rcy, _u(rng, -36, 5)),
                        (_u(rng, 1.5, 3.0), _u(rng, 1.5, 3.0), _u(rng, 1.5, 3.5)))
        for _ in range(int(rng.integers(1, 4)))
    ]
    a["hu_gas"] = _u(rng, -950, -850)
    a["stomach"] = Ellipsoid.make((cx + _u(rng, 0.15, 0.3) * rcx, cy - _u(rng, 0.3, 0.45) * rcy,
                                    a["dia_z"] - _u(rng, 6, 10)),
                                   (_u(rng, 5.5, 7.5), _u(rng, 4.5, 6.0), _u(rng, 7, 10)),
                                   yaw=_u(rng, -30, 0) * deg, waves=Waves.sample(rng, 2, (10, 25), 0.12))
    a["stomach_gas"] = _u(rng, 0.2, 0.5)  # fraction of the AP radius holding gas
    a["hu_stomach"] = _u(rng, 5, 25)
    # organs
    a["liver"] = Ellipsoid.make(
        (cx - _u(rng, 0.38, 0.48) * rcx, cy - _u(rng, 0.0, 0.15) * rcy, a["dia_z"] - _u(rng, 12, 17)),
        (_u(rng, 0.45, 0.55) * rcx, _u(rng, 0.72, 0.85) * rcy, _u(rng, 18, 23)),
        yaw=_u(rng, -15, 15) * deg, pitch=_u(rng, -8, 8) * deg, roll=_u(rng, -8, 8) * deg,
        waves=Waves.sample(rng, 4, (15, 40), _u(rng, 0.1, 0.2)))
    a["hu_liver"] = _u(rng, 55, 65)
    a["liver_texture"] = Waves.sample(rng, 3, (6, 15), _u(rng, 2, 5))
    a["spleen"] = Ellipsoid.make(
        (cx + _u(rng, 0.55, 0.65) * rcx, cy + _u(rng, 0.25, 0.4) * rcy, a["dia_z"] - _u(rng, 8, 13)),
        (_u(rng, 6.0, 7.5), _u(rng, 10.0, 12.0), _u(rng, 11, 14)),
        yaw=_u(rng, -45, -20) * deg, pitch=_u(rng, -8, 8) * deg,
        waves=Waves.sample(rng, 3, (12, 30), _u(rng, 0.08, 0.15)))
    # A contrast phase simplified so that each organ has an HU band of its own: liver ~60 (little enhanced),
    # spleen ~115, kidneys ~185 (cortex ~215 around medulla ~160), aorta ~350. Why: the demo's tiny network
    # first gives one class to every organ brighter than the liver and parts them later, or never within a
    # short schedule. Measured there: unenhanced spleen (45-55 HU, between muscle and liver) missed in
    # 2 of 4 runs; unenhanced kidneys (mean ~ the liver's) in 3 of 3; spleen ~115 with kidneys ~150 merged
    # into one class in 4 of 6 runs (lr 2e-3 to 1e-2); kidneys ~235 took in the cancellous bone (200-320).
    a["hu_spleen"] = _u(rng, 105, 125)
    z_kidney = a["dia_z"] - _u(rng, 26, 32)
    kidneys = []
    for side in (-1.0, 1.0):  # patient right (-x, a little lower), patient left (+x)
        kidneys.append(Ellipsoid.make(
            (xs + side * _u(rng, 12.5, 14.5), ys + _u(rng, -1.5, 1.5),
             z_kidney + (-_u(rng, 1.5, 4.0) if side < 0 else 0.0)),
            (_u(rng, 4.5, 5.5), _u(rng, 5.5, 6.5), _u(rng, 11, 13.5)),
            yaw=side * _u(rng, 15, 30) * deg, roll=_u(rng, -10, 10) * deg,
            waves=Waves.sample(rng, 2, (12, 30), _u(rng, 0.04, 0.1))))
    a["kidneys"] = kidneys
    a["kidney_cortex"] = _u(rng, 0.55, 0.7)  # implicit-function level where the cortex starts
    a["hu_medulla"] = _u(rng, 150, 175)  # contrast phase: see the spleen above
    a["hu_cortex_kidney"] = _u(rng, 200, 230)
    # image formation
    a["blur_mm"] = _u(rng, 0.4, 0.7)
    a["noise_hu"] = _u(rng, 10, 20)
    return a


def _render(a: dict, g: Grid) -> tuple[np.ndarray, np.ndarray]:
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

    def paint(shape: Ellipsoid, hu, label: int = 0, within: np.ndarray | None = None, level: float = 1.0):
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
    shape, spacing = check_geometry(shape, spacing)
    anatomy = _sample_anatomy(rng)
    g = Grid(shape, spacing)
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


def check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
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
