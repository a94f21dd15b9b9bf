"""DICOM series with damaged or inconsistent slices (issue 14, item 2): each case is built from the real
20-slice CT series by pydicom edits in tmp_path. Either the geometry is exactly what the files say, or
the series is refused with a line that names the files and the problem; never a dropped slice."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file

from textseg.errors import InputError
from textseg.formats.images import read_volume

pydicom = pytest.importorskip("pydicom")

PX = 0.9765625  # the series' pixel spacing
Z0 = -804.5  # lowest slice position


def _src():
    return sorted(shared_file("totalsegmentator-examples", "example_ct_dicom").iterdir())


def _series(tmp_path: Path, edit=None, name: str = "s", files=None) -> Path:
    """A copy of the real series; ``edit(k, ds)`` changes data set k (files in name order, z descending)."""
    out = tmp_path / name
    out.mkdir()
    for k, f in enumerate(files if files is not None else _src()):
        if edit is None:
            shutil.copy(f, out / f.name)
            continue
        ds = pydicom.dcmread(f)
        if edit(k, ds) is not False:
            ds.save_as(out / f.name)
    return out


@pytest.fixture(scope="module")
def reference():
    return read_volume(shared_file("totalsegmentator-examples", "example_ct_dicom"))


def test_the_real_series_reads_as_before(reference):
    v = reference
    assert v.shape == (20, 512, 512) and v.spacing == pytest.approx((PX, PX, 2.0), abs=1e-9)
    assert v.origin == pytest.approx((-249.51171875, -437.51171875, Z0), abs=1e-9)
    np.testing.assert_array_equal(v.direction, np.eye(3))
    assert not v.metadata.get("notes")


def test_junk_bytes_after_one_file_are_refused_naming_the_file(tmp_path):
    """GDCM cannot parse a file with 7 bytes appended and left it out: 19 slices at 2.111 mm."""
    folder = _series(tmp_path)
    victim = sorted(folder.iterdir())[4]
    with open(victim, "ab") as fh:
        fh.write(b"JUNKJNK")
    with pytest.raises(InputError, match=rf"{victim.name}: GDCM cannot decode.*damaged \(7 bytes follow its pixel "
                                         r"data\)\. Remove it"):
        read_volume(folder)


def test_a_copied_file_is_used_once_with_a_note(tmp_path, reference):
    """A second copy of one slice (same SOP instance) gave 21 slices at 0.5 mm."""
    folder = _series(tmp_path)
    f = sorted(folder.iterdir())[7]
    shutil.copy(f, folder / "copy_of_slice.dcm")
    v = read_volume(folder)
    assert v.shape == reference.shape and v.same_grid(reference, tol=1e-9)
    np.testing.assert_array_equal(v.array, reference.array)
    assert "copy_of_slice.dcm" not in [Path(p).name for p in v.metadata["dicom_files"]]
    assert any("1 file(s) are copies" in n and "copy_of_slice.dcm" in n for n in v.metadata["notes"])


def test_two_different_images_at_one_position_are_refused(tmp_path):
    folder = _series(tmp_path)
    src = sorted(folder.iterdir())[7]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "second_echo.dcm")
    with pytest.raises(InputError, match=rf"two different images at the same position .*{src.name} and "
                                         r"second_echo\.dcm.*more than one volume"):
        read_volume(folder)


def _tilt(deg):
    t = math.radians(deg)

    def edit(k, ds):
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(t), 10), round(math.sin(t), 10)]
    return edit


def test_gantry_tilt_is_resampled_onto_exact_geometry(tmp_path, reference):
    """15 degrees of tilt: slice planes (1,0,0)/(0,cos,sin) stacked 2 mm along z. ITK put them on an orthogonal
    grid 10.3 mm off; the reader resamples onto the grid perpendicular to the slices, same planes."""
    t = math.radians(15)
    v = read_volume(_series(tmp_path, _tilt(15)))
    r, c = np.array([1.0, 0, 0]), np.array([0, math.cos(t), math.sin(t)])
    n = np.cross(r, c)
    assert v.shape == (20, 512, 512)
    np.testing.assert_allclose(v.direction, np.stack([r, c, n], axis=1), atol=1e-9)
    assert v.spacing == pytest.approx((PX, PX, 2.0 * math.cos(t)), abs=1e-9)
    assert v.origin == pytest.approx((-249.51171875, -437.51171875, Z0), abs=1e-9)
    shift = 2.0 * math.sin(t)  # slice k's own pixel grid is k * shift mm along c from the new grid
    assert v.metadata["dicom_resampled"]["tilt_degrees"] == pytest.approx(15, abs=1e-6)
    assert any("tilt of 15.00 degrees" in n and "moved 9.8 mm" in n for n in v.metadata["notes"])
    for k in (0, 7, 19):  # every file's position lies in the plane of its slice, at the predicted in-plane shift
        ds = pydicom.dcmread(v.metadata["dicom_files"][k], stop_before_pixels=True)
        ijk = v.physical_to_index([[float(x) for x in ds.ImagePositionPatient]])[0]
        np.testing.assert_allclose(ijk, [0, k * shift / PX, k], atol=1e-6)
    # values: output (k, j, i) is the source slice k at row j - k*shift/PX, linearly interpolated
    src = reference.array.astype(np.float64)  # the untilted read has the same slices in the same order
    for k in (5, 19):
        jj = np.arange(100, 400) - k * shift / PX
        j0 = np.floor(jj).astype(int)
        w = (jj - j0)[:, None]
        expected = (1 - w) * src[k, j0, 100:400] + w * src[k, j0 + 1, 100:400]
        np.testing.assert_allclose(v.array[k, 100:400, 100:400], np.rint(expected), atol=1.0)


def test_a_tilt_past_45_degrees_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"stacked 60\.0 degrees off their normal"):
        read_volume(_series(tmp_path, _tilt(60)))


def test_a_gap_is_refused_with_the_files_and_steps(tmp_path):
    """The upper slices 1 mm higher: a 3 mm step among 2 mm steps (read 1.4 mm off before)."""
    names = [f.name for f in _src()]

    def edit(k, ds):
        if k < 10:  # the upper ten (names sort by descending z)
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(ds.ImagePositionPatient[2]) + 1.0]
    with pytest.raises(InputError, match=rf"not evenly spaced: 3\.000 mm between {names[10]} and {names[9]}, "
                                         r"2\.000 mm between the others"):
        read_volume(_series(tmp_path, edit))


def test_a_missing_slice_is_refused(tmp_path):
    names = [f.name for f in _src()]
    with pytest.raises(InputError, match=rf"4\.000 mm between {names[13]} and {names[11]}, 2\.000 mm between the "
                                         r"others \(1 slice\(s\) missing\?\)"):
        read_volume(_series(tmp_path, lambda k, ds: False if k == 12 else None))


def test_a_slice_without_position_is_refused(tmp_path):
    """It got a spacing of 460 mm."""
    names = [f.name for f in _src()]

    def edit(k, ds):
        if k == 3:
            del ds.ImagePositionPatient
    with pytest.raises(InputError, match=rf"1 of 20 slices have no ImagePositionPatient \({names[3]}\)"):
        read_volume(_series(tmp_path, edit))


@pytest.mark.parametrize("what, edit, shown", [
    ("orientation", lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9950042, 0.0998334]),
     r"\(1, 0, 0, 0, 0\.995, 0\.0998\) in 1 file"),
    ("pixel spacing", lambda ds: setattr(ds, "PixelSpacing", [0.8, 0.8]), r"0\.8 x 0\.8 mm in 1 file"),
    ("frame of reference", lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"), r"1\.2\.3\.4 in 1 file"),
])
def test_mixed_geometry_is_refused(tmp_path, what, edit, shown):
    names = [f.name for f in _src()]
    folder = _series(tmp_path, lambda k, ds: edit(ds) if k == 6 else None)
    with pytest.raises(InputError, match=rf"differ in {what}: .*in 19 file\(s\).*; {shown}\(s\) \({names[6]}\)"):
        read_volume(folder)


def test_a_header_that_disagrees_with_its_compressed_image_is_refused(tmp_path):
    """Rows/Columns decide what GDCM allocates; a damaged header is refused before it does."""
    names = [f.name for f in _src()]
    folder = _series(tmp_path, lambda k, ds: setattr(ds, "Rows", 16384) if k == 6 else None)
    with pytest.raises(InputError, match=rf"{names[6]}: the compressed image is 512x512 pixels but the header says "
                                         r"16384x512"):
        read_volume(folder)


def test_one_slice_takes_its_spacing_from_slice_thickness(tmp_path):
    """A single-slice series got 1 mm although SliceThickness is 3 mm (every volume a third of the truth)."""
    v = read_volume(_series(tmp_path, files=_src()[:1]))
    assert v.shape == (1, 512, 512) and v.spacing == pytest.approx((PX, PX, 3.0))
    assert any("one slice; slice spacing 3 mm from SliceThickness" in n for n in v.metadata["notes"])


def test_rle_label_over_raw_pixels_is_refused_not_a_crash(tmp_path):
    """GDCM dies by SIGFPE on an RLE 'stream' that is raw pixels; the check refuses it first."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(_src()[0])
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = 16
    raw = np.zeros((16, 16), np.uint16)  # raw pixels of a dark image: read as an RLE header, 0 segments
    raw[8:] = 1000
    ds.PixelData = encapsulate([raw.tobytes()])
    folder = tmp_path / "rle"
    folder.mkdir()
    ds.save_as(folder / "slice.dcm")
    with pytest.raises(InputError, match=r"slice\.dcm: the pixel data is not a RLE Lossless stream"):
        read_volume(folder)


def _multiframe(path: Path, zs, per_frame=True) -> Path:
    """A small enhanced CT multi-frame file: frame k filled with 100 * k, per-frame positions (0, 0, zs[k])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "CT", generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 8
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = len(zs), 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    orientation, measures, shared = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if per_frame:
        frames = []
        for z in zs:
            item, position = Dataset(), Dataset()
            position.ImagePositionPatient = [10, 20, z]
            item.PlanePositionSequence = Sequence([position])
            frames.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([np.full((8, 8), 100 * k, np.int16) for k in range(len(zs))]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("zs", [(0, 2, 4), (4, 2, 0)])
def test_a_multiframe_file_is_placed_by_its_frame_positions(tmp_path, zs):
    v = read_volume(_multiframe(tmp_path / "mf.dcm", zs))
    assert v.shape == (3, 8, 8) and v.spacing == pytest.approx((0.5, 0.5, 2.0))
    for k in range(3):  # frame k (value 100 k) lies at z = zs[k]
        z = v.index_to_physical([[0, 0, k]])[0][2]
        assert v.array[k, 0, 0] == 100 * zs.index(round(z))


def test_a_multiframe_file_with_uneven_or_missing_frame_positions_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"frames of this multi-frame file are not on a regular grid"):
        read_volume(_multiframe(tmp_path / "uneven.dcm", (0, 2, 5)))
    with pytest.raises(InputError, match=r"GDCM reads a pixel spacing of 1 x 1 mm where the header says 0\.5 x 0\.5"):
        read_volume(_multiframe(tmp_path / "nopos.dcm", (0, 2, 4), per_frame=False))
