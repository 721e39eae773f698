"""Non-finite voxels (NaN, inf) in raw images: refused before preprocessing, or replaced on request.

NaN passes nnU-Net's preprocessing unchecked (cropping counts it as non-zero, resampling spreads it to
its neighbours, normalisation keeps it) and later shows up as a NaN loss; SimpleITK's NIfTI reader even
turns NaN/inf into 0 without a word, so NIfTI files are checked with nibabel, which keeps them. Every image is therefore
checked before anything is written; integer images cannot hold NaN, so only floating-point images
(read from the header first) are read in full. With ``--replace-non-finite VALUE``,
:class:`ReplacingPreprocessor` (nnU-Net's ``DefaultPreprocessor`` with one step added after reading)
replaces them by VALUE on both paths, labelled and ``--plans-from``; for the labelled path's fingerprint
(CT intensity statistics) :func:`replacing_reader` wraps nnU-Net's image reader the same way.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from nnunet_hyspark.errors import HySparKError

#: ITK pixel component types that cannot hold NaN (header only, no voxel read)
_INTEGER_TYPES = ("int", "char", "short", "long")


def _needs_full_read(path: str) -> bool:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return True  # not ITK-readable: let nnU-Net's reader decide below
    kind = sitk.GetPixelIDValueAsString(reader.GetPixelID()).lower()
    return not any(t in kind for t in _INTEGER_TYPES) or "float" in kind


def _is_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def _nifti_non_finite(path: str) -> np.ndarray | None:
    """Non-finite mask of a NIfTI file in nibabel's (x, y, z) order; None for integer images."""
    import nibabel as nib

    img = nib.load(path)
    if np.issubdtype(img.get_data_dtype(), np.integer) and img.dataobj.slope in (None, 1.0):
        return None
    return ~np.isfinite(np.asanyarray(img.dataobj))


def count_non_finite(path: str) -> int:
    """Number of NaN / inf voxels of one image file (0 for integer images, read from the header)."""
    if _is_nifti(path):
        mask = _nifti_non_finite(path)
        return 0 if mask is None else int(mask.sum())
    if not _needs_full_read(path):
        return 0
    import SimpleITK as sitk

    try:
        array = sitk.GetArrayViewFromImage(sitk.ReadImage(path))
    except RuntimeError:
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

        ending = "." + os.path.basename(path).split(".", 1)[-1]
        array = determine_reader_writer_from_file_ending(ending, path)().read_images([path])[0]
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(name: str, cases: dict, num_processes: int, replace_value: float | None) -> list[str]:
    """Refuse the first image with NaN/inf (naming case and file); with ``replace_value`` report them instead.

    Returns one note per affected image (empty when every image is finite)."""
    files = [(case, f) for case, c in sorted(cases.items()) for f in c["images"]]
    with ThreadPoolExecutor(max_workers=max(1, num_processes)) as ex:  # ITK releases the GIL while reading
        counts = list(ex.map(lambda cf: count_non_finite(cf[1]), files))
    bad = [(case, f, n) for (case, f), n in zip(files, counts) if n]
    if bad and replace_value is None:
        case, f, n = bad[0]
        more = f" ({len(bad) - 1} more image(s) too)" if len(bad) > 1 else ""
        raise HySparKError(f"{name}: case {case} has {n} non-finite voxel(s) (NaN/inf) in {f}{more}",
                           "fix or remove the image, or pass --replace-non-finite VALUE (e.g. -1000, air in CT) "
                           "to replace them during preprocessing")
    return [f"{name}: case {case}: {n} non-finite voxel(s) in {os.path.basename(f)} replaced by {replace_value:g}"
            for case, f, n in bad]


class ReplacingPreprocessor(DefaultPreprocessor):
    """nnU-Net's DefaultPreprocessor, with NaN/inf of the images replaced right after reading.

    Picklable (a module-level class with plain attributes), so nnU-Net's spawned workers run it too."""

    def __init__(self, replace_value: float, verbose: bool = False):
        super().__init__(verbose=verbose)
        self.replace_value = float(replace_value)

    def run_case(self, image_files, seg_file, plans_manager, configuration_manager, dataset_json):
        from batchgenerators.utilities.file_and_folder_operations import load_json

        if isinstance(dataset_json, str):
            dataset_json = load_json(dataset_json)
        rw = replacing_reader(plans_manager.image_reader_writer_class, self.replace_value)()
        data, properties = rw.read_images(image_files)
        seg = rw.read_seg(seg_file)[0] if seg_file is not None else None
        return self.run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)


def preprocessor_for(configuration_manager, replace_value: float | None, verbose: bool = False):
    """The configuration's preprocessor, or :class:`ReplacingPreprocessor` when values are replaced."""
    if replace_value is None:
        return configuration_manager.preprocessor_class(verbose=verbose)
    if configuration_manager.preprocessor_class is not DefaultPreprocessor:
        raise HySparKError(f"--replace-non-finite works with nnU-Net's DefaultPreprocessor, the plans name "
                           f"{configuration_manager.preprocessor_class.__name__}",
                           "fix the images instead (replace NaN/inf in the raw files)")
    return ReplacingPreprocessor(replace_value, verbose=verbose)


#: the replacement value for :func:`replacing_reader`'s classes; an environment variable because nnU-Net's
#: fingerprint workers are spawned processes that import the class afresh (they inherit the environment)
REPLACE_ENV = "HYSPARK_REPLACE_NON_FINITE"


class _Replacing:
    def read_images(self, image_fnames, *args, **kwargs):
        data, properties = super().read_images(image_fnames, *args, **kwargs)
        value = float(os.environ[REPLACE_ENV])
        data[~np.isfinite(data)] = value
        return data, properties


class ReplacingSimpleITKIO(_Replacing, SimpleITKIO):
    """SimpleITK reads NaN/inf of NIfTI files as 0: those voxels are found with nibabel (same grid,
    transposed: SimpleITK's arrays are (z, y, x)) and set to the value too."""

    def read_images(self, image_fnames, *args, **kwargs):
        data, properties = super().read_images(image_fnames, *args, **kwargs)
        value = float(os.environ[REPLACE_ENV])
        for channel, path in enumerate(image_fnames):
            mask = _nifti_non_finite(path) if _is_nifti(path) else None
            if mask is not None and mask.ndim == 3 and mask.T.shape == data.shape[1:]:
                data[channel][mask.T] = value
        return data, properties


class ReplacingNibabelIO(_Replacing, NibabelIO):
    pass


class ReplacingNibabelIOWithReorient(_Replacing, NibabelIOWithReorient):
    pass


_REPLACING = {SimpleITKIO: ReplacingSimpleITKIO, NibabelIO: ReplacingNibabelIO,
              NibabelIOWithReorient: ReplacingNibabelIOWithReorient}


def replacing_reader(reader: type, replace_value: float) -> type:
    """nnU-Net's reader class ``reader`` with NaN/inf replaced by ``replace_value`` after reading."""
    if reader not in _REPLACING:
        raise HySparKError(f"--replace-non-finite does not support nnU-Net's {reader.__name__} images",
                           "fix the images instead (replace NaN/inf in the raw files)")
    os.environ[REPLACE_ENV] = repr(float(replace_value))
    return _REPLACING[reader]
