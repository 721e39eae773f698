"""Synthetic abdomen-like CT phantoms, written as nnU-Net v2 raw datasets.

The phantoms are meant for smoke tests, demos and tiny pre-training runs, not for
science. Each case is a small "abdomen" in Hounsfield units:

* air outside the body (-1000), a body outline (an ellipse-ish cylinder, slightly
  deformed, its size varying a little along z) with subcutaneous fat (~-100), a
  thin muscular wall (~45) and an abdominal cavity filled with soft tissue (~35)
  with fat blobs, a few bowel-gas bubbles and a stomach with a fluid level;
* in a contrast phase simplified so that each organ has an HU band of its own: liver
  (~60), spleen (~115), two kidneys (medulla ~160, cortex ~215), contrast-filled aorta
  (~350) and inferior vena cava (~100); psoas and paraspinal muscles;
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

from nnunet_hyspark.synthetic.dataset import (
    DEFAULT_NAME,
    DEFAULT_NAME_UNLABELED,
    dataset_folder_name,
    write_dataset,
)
from nnunet_hyspark.synthetic.phantom import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    DEMO_SHAPE,
    DEMO_SPACING,
    HU_MAX,
    HU_MIN,
    LABELS,
    MIN_SHAPE,
    PHANTOM_EXTENT_MM,
    case_rng,
    make_case,
    make_phantom,
)

__all__ = [
    "LABELS",
    "PHANTOM_EXTENT_MM",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "DEMO_SHAPE",
    "DEMO_SPACING",
    "DEFAULT_NAME",
    "DEFAULT_NAME_UNLABELED",
    "MIN_SHAPE",
    "case_rng",
    "make_phantom",
    "make_case",
    "write_dataset",
    "dataset_folder_name",
]
