"""DICOM SEG (highdicom) for a real CT series: frames on the right source images, SNOMED codes."""

import numpy as np
import pytest
from conftest import shared_file

from textseg.errors import OutputExistsError, UsageError
from textseg.formats.dicomseg import write_dicom_seg
from textseg.formats.segment_files import read_segments
from textseg.formats.segments import Segment
from textseg.volume import Volume

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def ct_series():
    """The shared 20-slice CT series as a Volume with its files in k order (as the DICOM reader sets)."""
    import SimpleITK as sitk

    from textseg.formats.images import _from_sitk

    folder = shared_file("totalsegmentator-examples", "example_ct_dicom")
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    vol = _from_sitk(reader.Execute(), str(folder))
    vol.metadata["dicom_files"] = list(files)
    return vol


def _masks(vol):
    a = np.zeros(vol.shape, np.uint8)
    a[3:9, 100:220, 150:300] = 1
    a[4, 100, 150] = 0
    b = np.zeros(vol.shape, np.uint8)
    b[5:15, 150:250, 200:260] = 1  # overlaps a
    return a, b


def test_dicom_seg_frames_and_codes(tmp_path, ct_series):
    vol = ct_series
    a, b = _masks(vol)
    tags = {"textseg.model": "synthetic", "textseg.model_version": "1", "textseg.engine": "textseg 0.1.0"}
    path = write_dicom_seg(tmp_path / "seg.dcm", vol,
                           [Segment("left kidney tumor", a, tags=tags), Segment("liver", b, tags=tags)])
    ds = pydicom.dcmread(str(path))
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    sop_to_k = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID: k
                for k, f in enumerate(vol.metadata["dicom_files"])}
    frames = ds.pixel_array.reshape(-1, *vol.shape[1:])
    seen = {1: set(), 2: set()}
    for n, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = sop_to_k[fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        expected = (a if seg_no == 1 else b)[k]
        np.testing.assert_array_equal(frames[n], expected)
        pos = [float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, vol.index_to_physical([[0, 0, k]])[0], atol=1e-3)
        seen[seg_no].add(k)
    assert seen[1] == set(range(3, 9)) and seen[2] == set(range(5, 15))  # empty frames omitted
    d1, d2 = ds.SegmentSequence
    assert d1.SegmentLabel == "left kidney tumor"
    assert (d1.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            d1.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
        "49755003", "108369006")
    assert d1.AnatomicRegionSequence[0].CodeValue == "64033007"
    assert d1.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "7771000"
    assert d2.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert d2.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert d1.SegmentAlgorithmType == "AUTOMATIC" and d1.SegmentAlgorithmName == "synthetic"
    alg = d1.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "synthetic" and alg.AlgorithmVersion == "textseg 0.1.0 1"
    assert alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    src = pydicom.dcmread(vol.metadata["dicom_files"][0], stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert src.StudyInstanceUID == "" and ds.StudyInstanceUID  # anonymised source: see test_anonymised_source_uids
    # read back through read_segments (its own frame grid) and onto the CT grid
    from textseg.formats.dicomseg import read_dicom_seg

    _, segs = read_segments(path)
    assert [s.name for s in segs] == ["left kidney tumor", "liver"]
    assert segs[1].terminology.startswith("Segmentation category and type - DICOM master list~SCT^123037004")
    assert tuple(round(c * 255) for c in segs[1].color) == (221, 130, 101)
    ref, on_ct = read_dicom_seg(path, reference=vol)
    assert ref.same_grid(vol)
    np.testing.assert_array_equal(on_ct[0].mask, a)
    np.testing.assert_array_equal(on_ct[1].mask, b)


def test_dicom_seg_needs_a_dicom_volume_and_keeps_existing_files(tmp_path, ct_series):
    a, _ = _masks(ct_series)
    with pytest.raises(UsageError, match="DICOM series"):
        write_dicom_seg(tmp_path / "x.dcm", Volume(np.zeros(ct_series.shape, np.int16)), [Segment("liver", a)])
    target = tmp_path / "x.dcm"
    target.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        write_dicom_seg(target, ct_series, [Segment("liver", a)])
    assert target.read_bytes() == b"keep"
    shuffled = ct_series.with_array(ct_series.array)
    shuffled.metadata["dicom_files"] = list(reversed(ct_series.metadata["dicom_files"]))
    from textseg.errors import InputError

    with pytest.raises(InputError, match="k order"):
        write_dicom_seg(tmp_path / "y.dcm", shuffled, [Segment("liver", a)])


# ---- issue 14: hostile and anonymised series (items 2, 9, 12) ------------------------------------------------------
def _copy_series(tmp_path, edit=None, name="s"):
    import shutil

    out = tmp_path / name
    out.mkdir()
    for k, f in enumerate(sorted(shared_file("totalsegmentator-examples", "example_ct_dicom").iterdir())):
        if edit is None:
            shutil.copy(f, out / f.name)
        else:
            ds = pydicom.dcmread(f)
            edit(k, ds)
            ds.save_as(out / f.name)
    return out


def _roundtrip(tmp_path, vol, name="seg.dcm"):
    from textseg.formats.dicomseg import read_dicom_seg

    a, b = _masks(vol)
    path = write_dicom_seg(tmp_path / name, vol, [Segment("liver", a), Segment("spleen", b)])
    ref, segs = read_dicom_seg(path, reference=vol)
    np.testing.assert_array_equal(segs[0].mask, a)
    np.testing.assert_array_equal(segs[1].mask, b)
    return path


def test_anonymised_source_uids_get_generated_ones_and_a_note(tmp_path, caplog):
    """The real series has empty StudyInstanceUID and SeriesInstanceUID; the SEG copied them (Type 1 errors)."""
    import highdicom as hd
    from pydicom.uid import UID

    from textseg.formats.images import read_volume

    vol = read_volume(shared_file("totalsegmentator-examples", "example_ct_dicom"))
    src = pydicom.dcmread(vol.metadata["dicom_files"][0], stop_before_pixels=True)
    assert src.StudyInstanceUID == "" and src.SeriesInstanceUID == ""
    with caplog.at_level("WARNING", logger="textseg"):
        path = _roundtrip(tmp_path, vol)
    ds = pydicom.dcmread(path)
    study, series = ds.StudyInstanceUID, ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert UID(study).is_valid and UID(series).is_valid and study != series
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID  # present in the source: kept
    assert hd.seg.segread(str(path)).StudyInstanceUID == study
    note = [r.getMessage() for r in caplog.records if "anonymised" in r.getMessage()]
    assert len(note) == 1 and "no StudyInstanceUID / SeriesInstanceUID" in note[0] and study in note[0]
    again = pydicom.dcmread(_roundtrip(tmp_path, vol, "again.dcm"))  # the same study for every SEG of the series
    assert again.StudyInstanceUID == study and again.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert again.SeriesInstanceUID != ds.SeriesInstanceUID  # each SEG is its own series


def test_series_without_slice_thickness(tmp_path):
    """highdicom raised AttributeError for sources without SliceThickness."""
    from textseg.formats.images import read_volume

    def edit(k, ds):
        del ds.SliceThickness
    vol = read_volume(_copy_series(tmp_path, edit))
    ds = pydicom.dcmread(_roundtrip(tmp_path, vol))
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.0)


def test_series_with_a_copied_slice(tmp_path):
    """The copy gave 21 slices, then highdicom's ValueError for a duplicate."""
    import shutil

    from textseg.formats.images import read_volume

    folder = _copy_series(tmp_path)
    shutil.copy(sorted(folder.iterdir())[5], folder / "copy.dcm")
    vol = read_volume(folder)
    ds = pydicom.dcmread(_roundtrip(tmp_path, vol))
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20


def test_tilted_series_seg_agrees_with_the_volume(tmp_path):
    """The SEG is placed by the (resampled) volume's own grid, so it agrees with the .seg.nrrd: every frame lies at
    the origin of a slice of the volume and references the source image of that slice."""
    import math

    from textseg.formats.images import read_volume

    t = math.radians(15)
    vol = read_volume(_copy_series(tmp_path, lambda k, ds: setattr(
        ds, "ImageOrientationPatient", [1, 0, 0, 0, round(math.cos(t), 10), round(math.sin(t), 10)])))
    assert vol.metadata["dicom_resampled"]
    ds = pydicom.dcmread(_roundtrip(tmp_path, vol))
    sop_to_k = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID: k
                for k, f in enumerate(vol.metadata["dicom_files"])}
    a, b = _masks(vol)
    frames = ds.pixel_array.reshape(-1, *vol.shape[1:])
    for n, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        k = sop_to_k[fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        pos = [float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, vol.index_to_physical([[0, 0, k]])[0], atol=1e-4)
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frames[n], (a if seg_no == 1 else b)[k])


def test_read_dicom_seg_of_uneven_frames_is_one_line(tmp_path, ct_series):
    """A SEG whose frames are not evenly spaced: a bare RuntimeError from highdicom."""
    from textseg.errors import InputError

    a, b = _masks(ct_series)
    path = write_dicom_seg(tmp_path / "seg.dcm", ct_series, [Segment("liver", a)])
    ds = pydicom.dcmread(path)
    pos = ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
    pos.ImagePositionPatient = [pos.ImagePositionPatient[0], pos.ImagePositionPatient[1],
                                float(pos.ImagePositionPatient[2]) + 0.7]
    ds.save_as(tmp_path / "uneven.dcm")
    with pytest.raises(InputError, match=r"uneven\.dcm: the DICOM SEG's frames do not lie on one evenly spaced grid"):
        read_segments(tmp_path / "uneven.dcm")


def test_cli_checks_the_dicom_seg_before_writing_anything(tmp_path, monkeypatch, capfd):
    """A DICOM SEG that cannot be made failed after the .seg.nrrd was written (and after inference)."""
    from textseg.cli import main

    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")

    def edit(k, ds):
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
    folder = _copy_series(tmp_path, edit)
    out = tmp_path / "ct.seg.nrrd"
    rc = main(["-q", "segment", str(folder), "-m", "synthetic-3d", "--modality", "CT", "-p", "bone", "--out", str(out),
               "--dicom-seg", str(tmp_path / "ct.dcm")])
    err = capfd.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "has no SOPInstanceUID; a DICOM SEG cannot reference it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_cli_dicom_seg_of_a_series_without_slice_thickness(tmp_path, monkeypatch, capfd):
    from textseg.cli import main
    from textseg.formats.dicomseg import read_dicom_seg
    from textseg.formats.segments import read_seg_nrrd

    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")

    def edit(k, ds):
        del ds.SliceThickness
    folder = _copy_series(tmp_path, edit)
    out = tmp_path / "ct.seg.nrrd"
    rc = main(["-q", "segment", str(folder), "-m", "synthetic-3d", "--modality", "CT", "-p", "bone", "--out", str(out),
               "--dicom-seg", str(tmp_path / "ct.dcm")])
    assert rc == 0, capfd.readouterr().err
    ref, segs = read_seg_nrrd(out)
    _, on_ref = read_dicom_seg(tmp_path / "ct.dcm", reference=ref)
    assert segs[0].mask.sum() > 1000
    np.testing.assert_array_equal(on_ref[0].mask, segs[0].mask)
