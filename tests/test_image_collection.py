"""Folders of CT (NIfTI, NRRD, MHA, DICOM series) become an nnU-Net raw dataset for pre-training."""
from __future__ import annotations

import json
import locale
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.planning.image_collection import (Collection, collect_images, remove_stale_temporaries,
                                                      write_raw_dataset)


def ct_volume(shape=(12, 16, 20), seed=0) -> sitk.Image:
    arr = np.random.default_rng(seed).integers(-1000, 400, size=shape).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    return img


def write_dicom_series(image: sitk.Image, folder) -> None:
    """One file per slice, with the tags GDCM needs to group and order a series. GDCM's writer switches the
    process to the C locale (subprocess output would then decode as ASCII): the locale is restored."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(image, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(image: sitk.Image, folder) -> None:
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(int(time.time() * 1000))
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        sl.SetMetaData("0020|000e", series_uid)  # series instance UID
        sl.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0013", str(z))  # instance number
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0028|0030", "\\".join(map(str, image.GetSpacing()[:2])))
        sl.SetMetaData("0018|0050", str(image.GetSpacing()[2]))
        writer.SetFileName(os.path.join(folder, f"slice{z:03d}.dcm"))
        writer.Execute(sl)


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    (root / "site_a" / "nested").mkdir(parents=True)
    sitk.WriteImage(ct_volume(seed=1), str(root / "site_a" / "img0001.nii.gz"))
    sitk.WriteImage(ct_volume(seed=2), str(root / "site_a" / "nested" / "img0002.nrrd"))
    sitk.WriteImage(ct_volume(seed=3), str(root / "site_a" / "img0003.mha"))
    write_dicom_series(ct_volume(seed=4), root / "site_b" / "patient7")
    return root


def test_folder_of_mixed_formats_and_a_dicom_series_becomes_a_raw_dataset(archive, tmp_path):
    collection = collect_images([archive])
    assert sorted(i.case for i in collection.images) == ["img0001", "img0002", "img0003", "patient7"]
    assert collection.problems == []
    folder = write_raw_dataset(collection, 777, "Archive", tmp_path / "raw", progress=False)
    files = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert files == ["img0001_0000.nii.gz", "img0002_0000.nii.gz", "img0003_0000.nii.gz", "patient7_0000.nii.gz"]
    assert (folder / "imagesTr" / "img0001_0000.nii.gz").is_symlink()  # NIfTI is linked, not copied
    assert not (folder / "imagesTr" / "img0002_0000.nii.gz").is_symlink()  # NRRD converted
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["unlabeled"] is True and meta["labels"] == {"background": 0} and meta["numTraining"] == 4
    assert meta["channel_names"] == {"0": "CT"}
    dicom = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / "patient7_0000.nii.gz")))
    assert np.array_equal(dicom, sitk.GetArrayFromImage(ct_volume(seed=4)))
    nrrd = sitk.ReadImage(str(folder / "imagesTr" / "img0002_0000.nii.gz"))
    assert nrrd.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))


def test_copy_forces_copies(archive, tmp_path):
    folder = write_raw_dataset(collect_images([archive]), 778, "Copies", tmp_path / "raw", copy=True, progress=False)
    assert not (folder / "imagesTr" / "img0001_0000.nii.gz").is_symlink()


def test_json_list_of_paths(archive, tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([str(archive / "site_a" / "img0001.nii.gz"), "archive/site_b/patient7"]))
    collection = collect_images([listing])
    assert sorted(i.case for i in collection.images) == ["img0001", "patient7"]


def test_unreadable_2d_and_duplicate_inputs_are_listed_and_refused_or_skipped(archive, tmp_path):
    (archive / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(archive / "flat.nii.gz"))
    (archive / "other").mkdir()
    sitk.WriteImage(ct_volume(seed=5), str(archive / "other" / "img0001.nii.gz"))  # a second 'img0001'
    collection = collect_images([archive])
    text = "\n".join(collection.problems)
    assert "broken.nii.gz: unreadable" in text and "flat.nii.gz: a 2D image" in text
    assert text.count("case name 'img0001' is not unique") == 2
    raw = tmp_path / "raw"
    with pytest.raises(HySparKError, match="4 input\\(s\\) cannot be used.*--skip-unreadable"):
        write_raw_dataset(collection, 779, "Bad", raw, progress=False)
    assert not raw.exists() or not any(raw.iterdir())  # nothing half-written
    folder = write_raw_dataset(collection, 779, "Bad", raw, skip_unreadable=True, progress=False)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "img0002_0000.nii.gz", "img0003_0000.nii.gz", "patient7_0000.nii.gz"]
    assert len(json.loads((folder / "dataset.json").read_text())["hyspark_skipped"]) == 4


def test_empty_folder_and_taken_id_are_refused(tmp_path, archive):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HySparKError, match="empty: no images found"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(HySparKError, match="no readable 3D images"):
        write_raw_dataset(Collection([], []), 780, "Empty", tmp_path / "raw", progress=False)
    (tmp_path / "raw" / "Dataset781_Other").mkdir(parents=True)
    with pytest.raises(HySparKError, match="dataset id 781 is taken"):
        write_raw_dataset(collect_images([archive]), 781, "New", tmp_path / "raw", progress=False)
    with pytest.raises(HySparKError, match="no such folder"):
        collect_images([tmp_path / "missing"])


def test_stale_temporaries_of_dead_imports_are_removed_running_ones_kept(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".tmp-Dataset900_A-{dead.pid}-abcd1234").mkdir()
    (tmp_path / f".tmp-Dataset901_B-{os.getpid()}-abcd1234").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f".tmp-Dataset900_A-{dead.pid}-abcd1234"]
    assert (tmp_path / f".tmp-Dataset901_B-{os.getpid()}-abcd1234").is_dir()
