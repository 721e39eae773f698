"""How a method's pre-training crops are cut and augmented: :class:`DataRecipe`, one per method spec.

The pre-training loader (``nnunet_hyspark.pretraining.data``) implements it; ``hyspark_pretrain``
shows each method's recipe in ``--help``, lets single fields be overridden by flags and writes
the resolved values into ``pretrain_config.json``. Intensity normalisation is not part of a
recipe: every method reads nnU-Net's preprocessed data, normalised as the plans say, so that
fine-tuning sees what pre-training saw (``docs/methods.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nnunet_hyspark.errors import HySparKError

Sampler = Literal["body", "uniform", "fg_bg"]
#: ``body``: crop centres among body voxels (HySparK); ``uniform``: uniformly random crop positions (MiM);
#: ``fg_bg``: per loaded volume a fixed split of centres in the body (foreground) and outside it (background)
SAMPLERS: tuple[str, ...] = ("body", "uniform", "fg_bg")


@dataclass(frozen=True)
class DataRecipe:
    """Crop sampling and augmentation of one method's pre-training (the defaults are HySparK's)."""

    crops_per_volume: int = 4  # crops cut from every loaded volume before the next one is loaded
    sampler: Sampler = "body"
    #: ``fg_bg`` only: foreground : background crops per volume (split of ``crops_per_volume`` nearest to it)
    fg_bg_ratio: tuple[int, int] = (1, 1)
    flip_probs: tuple[float, float, float] = (0.2, 0.2, 0.1)  # per axis of the data arrays
    rot90_probability: float = 0.0  # a turn by 90, 180 or 270 degrees in the plane of rot90_axes
    #: the last two axes: the axial plane of CT read by nnU-Net's SimpleITK reader (arrays ordered z, y, x)
    rot90_axes: tuple[int, int] = (1, 2)
    #: probability of an intensity scale by U(1 - r, 1 + r), and independently of a shift by U(-r, r)
    intensity_probability: float = 0.0
    intensity_range: float = 0.1  # r, in the normalised units of the plans

    def fg_bg_counts(self, n: int | None = None) -> tuple[int, int]:
        """(foreground, background) counts of ``n`` crops (default: one volume's) for the ``fg_bg`` sampler:
        the split nearest to the ratio."""
        n = self.crops_per_volume if n is None else int(n)
        fg, bg = self.fg_bg_ratio
        n_fg = int(round(n * fg / (fg + bg)))
        return n_fg, n - n_fg

    def check(self) -> None:
        """Refuse values no loader can work with (HySparKError naming the flag)."""
        if self.crops_per_volume < 1:
            raise HySparKError(f"crops per volume must be >= 1 (got {self.crops_per_volume})", "--crops-per-volume")
        if self.sampler not in SAMPLERS:
            raise HySparKError(f"unknown sampler {self.sampler!r}", f"--sampler one of {', '.join(SAMPLERS)}")
        if len(self.fg_bg_ratio) != 2 or min(self.fg_bg_ratio) < 0 or sum(self.fg_bg_ratio) <= 0:
            raise HySparKError(f"foreground:background ratio {self.fg_bg_ratio} needs two counts >= 0, not both 0",
                               "e.g. --fg-bg-ratio 6 2")
        if len(self.flip_probs) != 3 or any(not 0.0 <= float(p) <= 1.0 for p in self.flip_probs):
            raise HySparKError(f"flip probabilities must be three values in [0, 1] (got {self.flip_probs})",
                               "--flip-probabilities X Y Z")
        for name, p in (("rot90", self.rot90_probability), ("intensity", self.intensity_probability)):
            if not 0.0 <= p <= 1.0:
                raise HySparKError(f"{name} probability {p} is outside [0, 1]", f"--{name}-probability")
        if len(set(self.rot90_axes)) != 2 or not set(self.rot90_axes) <= {0, 1, 2}:
            raise HySparKError(f"rot90 axes {self.rot90_axes} must be two different axes of 0, 1, 2")
        if not 0.0 <= self.intensity_range < 1.0:
            raise HySparKError(f"intensity range {self.intensity_range} is outside [0, 1)", "--intensity-range")

    def summary(self) -> str:
        """One line for ``--help`` and logs, e.g. ``8 crops/volume fg:bg 6:2, flips 0.5/0.5/0.5, rot90 p 0.3``."""
        if self.sampler == "fg_bg":
            where = "foreground:background {}:{}".format(*self.fg_bg_counts())
        else:
            where = {"body": "body-biased", "uniform": "uniform"}[self.sampler]
        parts = [f"{self.crops_per_volume} {where} crop{'s' if self.crops_per_volume > 1 else ''} per volume"]
        parts.append("flips " + "/".join(f"{p:g}" for p in self.flip_probs) if any(self.flip_probs) else "no flips")
        if self.rot90_probability:
            parts.append(f"rot90 p {self.rot90_probability:g}")
        if self.intensity_probability:
            r = self.intensity_range
            parts.append(f"intensity scale and shift p {self.intensity_probability:g} each (+-{r:g})")
        return ", ".join(parts)
