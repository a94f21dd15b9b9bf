"""DICOM SEG (highdicom) for a real CT series: frames on the right source images, SNOMED codes."""

import numpy as np
import pytest

from conftest import shared_file
from textseg.errors import OutputExistsError, UsageError
from textseg.volume import Volume
from textseg.writers import Segment, read_segments, write_dicom_seg

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def ct_series():
    """The shared 20-slice CT series as a Volume with its files in k order (as the DICOM reader sets)."""
    import SimpleITK as sitk

    from textseg.io import _from_sitk

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
    path = write_dicom_seg(tmp_path / "seg.dcm", vol, [Segment("left kidney tumor", a, tags=tags), Segment("liver", b, tags=tags)])
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
    assert (d1.SegmentedPropertyCategoryCodeSequence[0].CodeValue, d1.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
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
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    # read back through read_segments (its own frame grid) and onto the CT grid
    from textseg.dicomseg import read_dicom_seg

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
