"""Where crops come from: the train/val split, crop positions by the recipe's sampler, cropping / padding,
random streams.

Every random choice draws from a stream derived with ``np.random.SeedSequence`` from the seed and a fixed
stream key, so the split, the validation crops and the training crops never share randomness, and one seed
reproduces every batch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.pretraining.data.config import PretrainDataConfig

_PROBES_PER_ROUND = 512  # random voxels probed per round when looking for body voxels
_PROBE_ROUNDS = 16
_PERCENTILE_PROBES = 4096
#: Stream keys for SeedSequence, so split / val / train never share randomness.
SPLIT_STREAM = 0x5EED_5917
VAL_STREAM = 0x5EED_7A11


class RNGStream:
    """Private states for the global numpy / torch generators (which batchgeneratorsv2 draws from).

    ``with stream:`` swaps them in and restores the caller's states on exit.
    """

    def __init__(self, seed_seq: np.random.SeedSequence):
        s = seed_seq.generate_state(2)
        self._np_state = np.random.RandomState(int(s[0])).get_state()
        g = torch.Generator()
        g.manual_seed(int(s[1]))
        self._torch_state = g.get_state()
        self._saved = None

    def __enter__(self):
        self._saved = (np.random.get_state(), torch.get_rng_state())
        np.random.set_state(self._np_state)
        torch.set_rng_state(self._torch_state)
        return self

    def __exit__(self, *exc):
        self._np_state = np.random.get_state()
        self._torch_state = torch.get_rng_state()
        np.random.set_state(self._saved[0])
        torch.set_rng_state(self._saved[1])
        self._saved = None
        return False


def crop_pad(vol, lbs: Sequence[int], size: Sequence[int], pad_values: np.ndarray | None) -> np.ndarray:
    """Crop ``vol[:, lbs:lbs+size]`` (numpy or lazy blosc2 array), padding outside with ``pad_values`` per channel.

    ``pad_values`` may be None when the crop lies inside the volume.
    """
    shape = vol.shape[1:]
    src, dst, inside = [], [], True
    for d in range(3):
        s0, s1 = max(lbs[d], 0), min(lbs[d] + size[d], shape[d])
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lbs[d], s1 - lbs[d]))
        inside &= s0 == lbs[d] and s1 == lbs[d] + size[d]
    region = vol[(slice(None), *src)]
    if inside:
        return np.array(region, dtype=np.float32, copy=True, order="C")
    out = np.empty((vol.shape[0], *size), dtype=np.float32)
    out[:] = np.asarray(pad_values, dtype=np.float32).reshape(-1, 1, 1, 1)
    out[(slice(None), *dst)] = region
    return out


#: kinds of crop positions: centred in the body ("body"), in the foreground / background of a fg:bg split
#: ("fg" / "bg"), uniformly random by the recipe ("uniform"), or uniformly random because no voxel of the
#: wanted kind was found ("fallback")
CROP_KINDS = ("body", "fg", "bg", "uniform", "fallback")


class CropSampler:
    """Loads volumes with nnU-Net's dataset classes and picks crop positions by the recipe's sampler. Picklable.

    ``sampler`` is a :data:`~nnunet_hyspark.methods.data_recipe.SAMPLERS` name; ``fg_bg_ratio`` splits the
    crops of one volume for ``fg_bg``. Without a body rule (``body_mode`` None) every crop is uniform.
    """

    def __init__(self, datasets: list, body_mode: str | None, body_value: float | None, sampler: str = "body",
                 fg_bg_ratio: tuple[int, int] = (1, 1)):
        self.datasets = datasets
        self.body_mode = body_mode  # None (uniform), "fixed" (normalised threshold), "percentile"
        self.body_value = body_value
        self.sampler = sampler
        self.fg_bg_ratio = tuple(int(r) for r in fg_bg_ratio)

    def open(self, di: int, ident: str):
        return self.datasets[di].load_case(ident)[0]  # data only; seg / properties are never used

    def load(self, di: int, ident: str) -> np.ndarray:
        data = self.open(di, ident)
        vol = np.ascontiguousarray(data[:], dtype=np.float32)
        if vol.ndim != 4:
            raise HySparKError(f"case {ident} has data of shape {vol.shape}; expected (C, X, Y, Z)",
                               "pre-training needs a 3D configuration (e.g. 3d_fullres)")
        return vol

    def _threshold(self, flat: np.ndarray, rng: np.random.Generator) -> float:
        if self.body_mode == "percentile":
            return float(np.percentile(flat[rng.integers(0, flat.size, _PERCENTILE_PROBES)], self.body_value))
        return self.body_value

    @staticmethod
    def _probe(flat: np.ndarray, n: int, thr: float, body: bool, rng: np.random.Generator) -> np.ndarray | None:
        """Flat indices of probed voxels in the body (``body``) or outside it; None if no probe found one.

        A few hundred random voxels per round instead of an ``argwhere`` over the whole volume."""
        found, total = [], 0
        for _ in range(_PROBE_ROUNDS):
            idx = rng.integers(0, flat.size, _PROBES_PER_ROUND)
            inside = idx[(flat[idx] > thr) == body]
            if inside.size:
                found.append(inside)
                total += inside.size
                if total >= 4 * n:
                    break
        return np.concatenate(found) if found else None

    @staticmethod
    def _pick(pool: np.ndarray, n: int, shape, rng: np.random.Generator) -> list[tuple[int, ...]]:
        chosen = rng.choice(pool, size=n, replace=pool.size < n)
        return list(zip(*(c.tolist() for c in np.unravel_index(chosen, shape))))

    def body_centres(self, vol: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[int, ...]] | None:
        """``n`` crop centres among probed body voxels of channel 0, or None (-> uniform crops)."""
        if self.body_mode is None:
            return None
        flat = vol[0].reshape(-1)
        pool = self._probe(flat, n, self._threshold(flat, rng), True, rng)
        return None if pool is None else self._pick(pool, n, vol.shape[1:], rng)

    def fg_bg_centres(self, vol: np.ndarray, n: int, rng: np.random.Generator
                      ) -> list[tuple[tuple[int, ...] | None, str]]:
        """``n`` (centre, kind) pairs split foreground:background by the ratio, in random order; a kind without
        any probed voxel gets uniform positions (centre None, kind "fallback")."""
        n_fg = int(round(n * self.fg_bg_ratio[0] / sum(self.fg_bg_ratio)))
        flat = vol[0].reshape(-1)
        thr = self._threshold(flat, rng)
        out: list[tuple[tuple[int, ...] | None, str]] = []
        for kind, k, body in (("fg", n_fg, True), ("bg", n - n_fg, False)):
            pool = self._probe(flat, k, thr, body, rng) if k else None
            out += [(c, kind) for c in self._pick(pool, k, vol.shape[1:], rng)] if pool is not None else \
                [(None, "fallback")] * k
        return [out[i] for i in rng.permutation(n)]  # mixed, so one batch is not all foreground

    def centres(self, vol: np.ndarray, n: int, rng: np.random.Generator
                ) -> list[tuple[tuple[int, ...] | None, str]]:
        """``n`` (centre, kind) pairs by the sampler (kinds: :data:`CROP_KINDS`); centre None = uniform position."""
        if self.sampler == "uniform" or self.body_mode is None:
            return [(None, "uniform")] * n
        if self.sampler == "fg_bg":
            return self.fg_bg_centres(vol, n, rng)
        found = self.body_centres(vol, n, rng)
        return [(None, "fallback")] * n if found is None else [(c, "body") for c in found]

    @staticmethod
    def lbs_from_centre(shape, centre, size) -> list[int]:
        return [min(max(int(c) - s // 2, 0), sh - s) if sh >= s else -((s - sh) // 2)
                for sh, c, s in zip(shape, centre, size)]

    @staticmethod
    def uniform_lbs(shape, size, rng: np.random.Generator) -> list[int]:
        return [int(rng.integers(0, sh - s + 1)) if sh >= s else -((s - sh) // 2) for sh, s in zip(shape, size)]

    def positions(self, vol: np.ndarray, n: int, size, rng: np.random.Generator) -> list[tuple[list[int], str]]:
        """``n`` crops of ``size``: (lower bounds, kind) each; centres are clamped so crops stay inside."""
        shape = vol.shape[1:]
        return [(self.uniform_lbs(shape, size, rng) if c is None else self.lbs_from_centre(shape, c, size), kind)
                for c, kind in self.centres(vol, n, rng)]


def pad_values(vol: np.ndarray) -> np.ndarray:
    """Per-channel minimum of a volume (the normalised air value for CT): what crops are padded with."""
    return vol.reshape(vol.shape[0], -1).min(axis=1)


def needs_padding(shape, lbs_list, size) -> bool:
    return any(lb < 0 or lb + s > sh for lbs in lbs_list for lb, s, sh in zip(lbs, size, shape))


def split_cases(n: int, cfg: PretrainDataConfig) -> np.ndarray:
    """Indices of the held-out cases (sorted), deterministic by seed, independent of rank."""
    if cfg.num_val_cases is not None:
        n_val = int(cfg.num_val_cases)
        if n_val < 0 or (n_val > 0 and n_val >= n):
            raise HySparKError(f"num_val_cases={n_val} leaves no training case ({n} cases in total)",
                               "use fewer validation cases")
    else:
        n_val = int(round(cfg.val_fraction * n))
        if n >= 2 and cfg.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_STREAM])).permutation(n)
    return np.sort(perm[:n_val])
