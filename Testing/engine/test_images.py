"""Reading images: formats, DICOM series, 2D/RGB, and a specific error for every bad input."""

from __future__ import annotations

import gzip
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_file

from textseg.errors import InputError
from textseg.formats.images import read_volume, write_image
from textseg.volume import Volume

CT = ("totalsegmentator-examples", "example_ct_sm.nii.gz")


def test_nifti_keeps_geometry_exactly():
    path = shared_file(*CT)
    img = sitk.ReadImage(str(path))
    v = read_volume(path)
    assert v.size == img.GetSize() and v.spacing == img.GetSpacing() and v.origin == img.GetOrigin()
    np.testing.assert_array_equal(v.direction.ravel(), img.GetDirection())
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(img))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_other_formats_round_trip(tmp_path, suffix):
    v = read_volume(shared_file(*CT))
    out = tmp_path / f"ct{suffix}"
    write_image(v, out)
    w = read_volume(out)
    assert w.same_grid(v, tol=1e-6)
    np.testing.assert_array_equal(w.array, v.array)


def test_dicom_series_folder_in_hounsfield_units_with_tags():
    folder = shared_file("totalsegmentator-examples", "example_ct_dicom")
    v = read_volume(folder)
    assert v.size == (512, 512, 20)
    assert v.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert v.origin == pytest.approx((-249.51171875, -437.51171875, -804.5))
    assert v.metadata["dicom"]["Modality"] == "CT" and v.metadata["modality"] == "CT"
    files = v.metadata["dicom_files"]
    assert len(files) == 20
    import pydicom

    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z) and z[0] == pytest.approx(v.origin[2])  # files in k order
    assert v.array.min() == -1024  # rescale intercept applied


def test_dicom_folder_with_two_series_uses_the_largest(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    src = sorted(shared_file("totalsegmentator-examples", "example_ct_dicom").iterdir())
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    uid = generate_uid()
    for f in src[:3]:  # a 3-slice second series
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / ("b_" + f.name))
    v = read_volume(tmp_path)
    assert v.size[2] == 20 and "2 DICOM series" in v.metadata["notes"][0]


def test_png_rgb_and_rgba(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "a.png"))
    v = read_volume(tmp_path / "a.png")
    assert v.is_rgb and v.is_2d and v.array.shape == (1, 20, 30, 3)
    np.testing.assert_array_equal(v.array[0], rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "b.png"))
    np.testing.assert_array_equal(read_volume(tmp_path / "b.png").array[0], rgb)


def test_16_bit_grey_tiff(tmp_path):
    grey = np.arange(600, dtype=np.uint16).reshape(20, 30) * 100
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "g.tif"))
    v = read_volume(tmp_path / "g.tif")
    assert not v.is_rgb and v.array.dtype == np.uint16 and v.array.shape == (1, 20, 30)
    np.testing.assert_array_equal(v.array[0], grey)


# ---- bad inputs: a specific message naming the file, never a traceback ---------------------------
def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"nope\.nii\.gz: no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_4d_image(tmp_path):
    img = sitk.JoinSeries([sitk.Image(4, 4, 4, sitk.sitkFloat32)] * 3)
    sitk.WriteImage(img, str(tmp_path / "t.nii.gz"))
    with pytest.raises(InputError, match=r"t\.nii\.gz is a 4D image.*one 3D volume"):
        read_volume(tmp_path / "t.nii.gz")


def test_empty_file(tmp_path):
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"e\.nii\.gz: the file is empty"):
        read_volume(tmp_path / "e.nii.gz")


@pytest.mark.parametrize("name", ["n.nrrd", "n.nii.gz", "n.nii"])
def test_nan_only_image(tmp_path, name):
    write_image(Volume(np.full((3, 4, 5), np.nan, np.float32)), tmp_path / name)
    with pytest.raises(InputError, match=re.escape(name) + " contains only NaN"):
        read_volume(tmp_path / name)


@pytest.mark.parametrize("name", ["f.nii.gz", "f.nrrd", "f.mha"])
def test_non_finite_voxels_survive_reading(tmp_path, name):
    """SimpleITK 2.5 reads NaN/Inf of float NIfTI as 0; the reader restores them at the right voxels."""
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    arr[0, 0, 0], arr[1, 2, 3], arr[2, 3, 1] = np.nan, np.inf, -np.inf
    write_image(Volume(arr, spacing=(0.5, 0.7, 2.0), origin=(1, 2, 3)), tmp_path / name)
    v = read_volume(tmp_path / name)
    np.testing.assert_array_equal(v.array, arr)  # NaN == NaN here
    assert v.spacing == pytest.approx((0.5, 0.7, 2.0))
    assert "3 NaN/infinite voxels" in v.metadata["notes"][0]


def test_non_finite_voxels_of_a_2d_float_nifti(tmp_path):
    import nibabel as nib

    data = np.ones((5, 4), np.float32)  # nibabel order (i, j)
    data[3, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "s.nii.gz"))
    v = read_volume(tmp_path / "s.nii.gz")
    assert v.array.shape == (1, 4, 5) and np.isnan(v.array[0, 1, 3]) and np.isfinite(v.array).sum() == 19


def test_some_nans_are_reported_and_sanitised_for_the_model(tmp_path):
    from textseg.predictor import Predictor

    arr = np.full((3, 4, 5), -1000, np.float32)
    arr[1, 1:3, 1:4] = 500
    arr[0, 0, 0] = np.nan
    write_image(Volume(arr), tmp_path / "n.nrrd")
    v = read_volume(tmp_path / "n.nrrd")
    assert "1 NaN/infinite voxels" in v.metadata["notes"][0]
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(v, "CT")
    assert p.predict(["bone"])[0].voxel_count == 6
    assert any("NaN" in m for m in p.messages)


def test_non_image_file(tmp_path):
    (tmp_path / "x.nii.gz").write_text("patient list, not an image\n" * 50)
    with pytest.raises(InputError, match=r"x\.nii\.gz: cannot be read as an image"):
        read_volume(tmp_path / "x.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image file"):
        read_volume(tmp_path / "notes.txt")


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nrrd"])
def test_truncated_file(tmp_path, name):
    v = read_volume(shared_file(*CT))
    full = tmp_path / ("full" + name[3:])
    write_image(v, full)
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"{name.replace('.', chr(92) + '.')}: cannot be read.*truncated"):
        read_volume(tmp_path / name)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no DICOM image series"):
        read_volume(tmp_path)


def test_uncompressed_nifti_truncated_header(tmp_path):
    v = read_volume(shared_file(*CT))
    write_image(v, tmp_path / "a.nii")
    raw = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "b.nii").write_bytes(raw[:200])  # header cut short
    with pytest.raises(InputError, match=r"b\.nii: cannot be read"):
        read_volume(tmp_path / "b.nii")
    with gzip.open(tmp_path / "c.nii.gz", "wb") as fh:
        fh.write(raw[: len(raw) // 3])  # valid gzip, short payload
    with pytest.raises(InputError, match=r"c\.nii\.gz: cannot be read"):
        read_volume(tmp_path / "c.nii.gz")


@pytest.mark.parametrize("rel", [("totalsegmentator-examples", "example_ct.nii.gz"),
                                 ("totalsegmentator-examples", "example_ct_dicom")])
def test_the_reader_child_returns_what_reading_in_process_gives(rel):
    """Array, geometry and metadata (numpy arrays such as nifti_affine included) cross the pipe unchanged."""
    path = shared_file(*rel)
    here, there = read_volume(path, isolate=False), read_volume(path)
    assert there.array.dtype == here.array.dtype
    np.testing.assert_array_equal(there.array, here.array)
    assert there.spacing == here.spacing and there.origin == here.origin
    np.testing.assert_array_equal(there.direction, here.direction)
    assert there.metadata.keys() == here.metadata.keys()
    for key, value in here.metadata.items():
        if isinstance(value, np.ndarray):
            assert isinstance(there.metadata[key], np.ndarray) and there.metadata[key].dtype == value.dtype
            np.testing.assert_array_equal(there.metadata[key], value)
        else:
            assert there.metadata[key] == value
