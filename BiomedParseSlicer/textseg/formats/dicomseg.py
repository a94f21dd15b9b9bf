"""DICOM SEG output (highdicom) for volumes read from a DICOM series, and reading it back.

The reference Volume must carry its source files in ``volume.metadata["dicom_files"]``, in k
order (``array[k]`` is the image of ``dicom_files[k]``), as the DICOM reader stores them. One
BINARY segmentation instance holds every segment (overlaps allowed: each segment has its own
frames); each segment description carries the SNOMED CT category, type (+ modifier), anatomic
region (+ modifier) of ``terminology.lookup``, the recommended display colour (CIELab), and the
algorithm identification (family Artificial Intelligence, name = model id, version = engine and
model version) from the segment's provenance tags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .. import __version__
from ..errors import InputError, UsageError
from ..volume import Volume
from .atomic import atomic_output
from .segments import TAG_PREFIX, Segment, segment_terminology

PathLike = Union[str, Path]
log = logging.getLogger("textseg")


def write_dicom_seg(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False,
                    series_description: str = "textseg segmentation", series_number: int = 300) -> Path:
    """Build the SEG in memory (every check and highdicom's own run first), then write it atomically."""
    seg = build_dicom_seg(reference, segments, series_description, series_number)
    save_dicom_seg(seg, path, overwrite)
    return Path(path)


def save_dicom_seg(seg: Any, path: PathLike, overwrite: bool = False) -> Path:
    with atomic_output(path, overwrite) as tmp:
        seg.save_as(str(tmp))
    return Path(path)


def build_dicom_seg(reference: Volume, segments: Sequence[Segment], series_description: str = "textseg segmentation",
                    series_number: int = 300) -> Any:
    """The DICOM SEG data set (not yet written) of ``segments`` on ``reference``'s grid.

    The frames are placed by the volume's own geometry (a highdicom Volume), so the SEG and the
    .seg.nrrd written from the same volume agree voxel for voxel, also for a tilted series that the
    reader resampled; highdicom links each frame to the source image in its plane."""
    import highdicom as hd

    if not segments:
        raise UsageError("No segments to write: a DICOM SEG needs at least one segment.")
    sources = check_dicom_seg_reference(reference)
    masks = np.stack([_mask(s, reference) for s in segments], axis=-1).astype(np.uint8)  # (k, j, i, segments)
    descriptions = [_description(n, s) for n, s in enumerate(segments, start=1)]
    volume = hd.Volume(masks, _swap_ik(reference.ijk_to_lps), coordinate_system="PATIENT",
                       frame_of_reference_uid=str(sources[0].FrameOfReferenceUID),
                       channels={"SegmentNumber": list(range(1, len(segments) + 1))})
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=volume,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="BiomedParseSlicer",
            manufacturer_model_name="textseg",
            software_versions=f"textseg {__version__}",
            device_serial_number="none",
            series_description=series_description,
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise InputError(f"A DICOM SEG cannot be made for this series ({type(exc).__name__}: "
                         f"{(lines[-1] if lines else '')[:200]}). Write .seg.nrrd or a label map instead.") from None


def check_dicom_seg_reference(reference: Volume) -> list[Any]:
    """The source data sets of a volume read from a DICOM series, checked against its grid (InputError /
    UsageError when a SEG cannot be written): call it before a long run that ends in a DICOM SEG."""
    sources = _source_datasets(reference)
    _fill_missing_uids(sources)
    missing = [ds for ds in sources if str(ds.get("SliceThickness", "") or "").strip() == ""]
    if missing:  # highdicom's pixel measures need it (Type 1 in the SEG's Pixel Measures)
        for ds in missing:
            ds.SliceThickness = f"{reference.spacing[2]:.6g}"
        log.warning("note: %d source DICOM file(s) have no SliceThickness; the DICOM SEG gives its frames the slice "
                    "spacing (%g mm) as their thickness.", len(missing), reference.spacing[2])
    return sources


def _source_datasets(reference: Volume) -> list[Any]:
    import warnings

    import pydicom

    files = reference.metadata.get("dicom_files")
    if not files:
        raise UsageError("DICOM SEG needs a volume read from a DICOM series (its file list is missing). "
                         "Write .seg.nrrd or a .nii.gz label map for other inputs.")
    if len(files) != reference.shape[0]:
        raise InputError(f"The volume has {reference.shape[0]} slices but {len(files)} DICOM files; "
                         "read the series again with textseg so that every slice has its file.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            datasets = [_with_sop_uids(pydicom.dcmread(str(f), stop_before_pixels=True), f) for f in files]
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"A source file of the DICOM series cannot be read again ({exc}).") from None
    resampled = bool(reference.metadata.get("dicom_resampled"))
    normal = reference.direction[:, 2]
    for k, (f, ds) in enumerate(zip(files, datasets)):  # the files must be the volume's slices, in k order
        expected = reference.index_to_physical([[0, 0, k]])[0]
        try:
            pos = np.array([float(v) for v in ds.ImagePositionPatient])
            size_ok = (int(ds.Rows), int(ds.Columns)) == reference.shape[1:]
        except (AttributeError, TypeError, ValueError):
            pos, size_ok = None, False
        # a tilted series resampled by the reader keeps each slice's plane, not its in-plane origin
        if pos is None:
            off = np.inf
        elif resampled:
            off = abs(float((pos - expected) @ normal))
        else:
            off = float(np.linalg.norm(pos - expected))
        if not size_ok or off > 1e-2:
            raise InputError(f"{f} does not match slice {k} of the volume (position or size differ); "
                             "the file list must be in k order of an unmodified DICOM series.")
    return datasets


def _fill_missing_uids(datasets: list[Any]) -> None:
    """Anonymisers often blank StudyInstanceUID, SeriesInstanceUID or FrameOfReferenceUID; a SEG copies them
    (Type 1: must not be empty). Give each missing one a UID derived from the series' SOP Instance UIDs (the
    same for every SEG of that series), in memory only, and say so."""
    from pydicom.uid import generate_uid

    sops = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    filled = []
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(key, "") or "").strip() for ds in datasets}
        if "" not in values:
            continue
        if len(values - {""}) > 1:
            raise InputError(f"The DICOM series has several {key}s; a SEG references one.")
        uid = (values - {""}).pop() if values - {""} else generate_uid(entropy_srcs=[key] + sops)
        for ds in datasets:
            setattr(ds, key, uid)
        filled.append((key, uid))
    if filled:
        log.warning("note: the source DICOM series has no %s (anonymised?); the DICOM SEG uses %s, so a PACS will "
                    "not file it with the source images.", " / ".join(k for k, _ in filled),
                    "; ".join(f"{k} {u}" for k, u in filled))


def _with_sop_uids(ds: Any, f: Any) -> Any:
    """Some anonymisers blank SOP Class/Instance UID in the data set but keep them in the file meta
    header; the SEG's references need them, so take them from there (in memory only)."""
    meta = getattr(ds, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(ds.get(key, "") or "") and meta is not None and meta.get(meta_key):
            setattr(ds, key, meta.get(meta_key))
        if not str(ds.get(key, "") or ""):
            raise InputError(f"{f}: the DICOM file has no {key}; a DICOM SEG cannot reference it.")
    return ds


def _mask(s: Segment, reference: Volume) -> np.ndarray:
    if s.mask.shape != reference.shape:
        raise ValueError(f"segment '{s.name}' has shape {s.mask.shape}, reference grid is {reference.shape}")
    return np.asarray(s.mask) > 0


def _coded(code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _description(number: int, s: Segment) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    term = segment_terminology(s)
    model = s.tags.get(TAG_PREFIX + "model", "unknown model")
    version = " ".join(v for v in (s.tags.get(TAG_PREFIX + "engine", f"textseg {__version__}"),
                                   s.tags.get(TAG_PREFIX + "model_version", "")) if v)
    algorithm = hd.AlgorithmIdentificationSequence(name=model, family=codes.cid7162.ArtificialIntelligence,
                                                   version=version[:64])
    rgb = [int(round(c * 255)) for c in term.color]
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=s.name[:64] or f"segment {number}",
        segmented_property_category=_coded(term.category),
        segmented_property_type=_coded(term.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_coded(term.region)] if term.region else None,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    if term.type_modifier:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(term.type_modifier)]
    if term.region and term.region_modifier:
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_coded(term.region_modifier)]
    return desc


def read_dicom_seg(path: PathLike, reference: Optional[Volume] = None) -> tuple[Volume, list[Segment]]:
    """Segments of a DICOM SEG on the grid of its stored frames (empty frames are usually omitted,
    so that grid may cover fewer slices than the source series), or, with ``reference``, resampled
    (nearest neighbour) onto the reference grid."""
    import highdicom as hd
    from slicerio.segmentation import terminology_entry_to_string

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many kinds
        raise InputError(f"{path}: not a readable DICOM SEG ({exc}).") from None
    try:
        vol = seg.get_volume(combine_segments=False)
    except Exception as exc:  # noqa: BLE001 - highdicom raises RuntimeError/ValueError for irregular frames
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise InputError(f"{path}: the DICOM SEG's frames do not lie on one evenly spaced grid "
                         f"({(lines[-1] if lines else type(exc).__name__)[:160]}); textseg reads SEGs of regular "
                         "volumes only.") from None
    if vol is None:
        raise InputError(f"{path}: the DICOM SEG has no frames on a volume grid; textseg reads SEGs of volumes.")
    arr = np.asarray(vol.array)  # (k, j, i, segments)
    ref = Volume.from_matrix(np.zeros(arr.shape[:3], np.uint8), _swap_ik(vol.affine))
    segments = []
    for n, number in enumerate(seg.segment_numbers):
        d = seg.get_segment_description(number)
        term = _terminology_from_description(d)
        lab = d.get("RecommendedDisplayCIELabValue")
        color = tuple(c / 255.0 for c in hd.color.CIELabColor.from_dicom_value(lab).to_rgb(clip=True)) if lab else None
        segments.append(Segment(d.SegmentLabel, (arr[..., n] > 0).astype(np.uint8), color,
                                terminology_entry_to_string(term), {}))
    if reference is not None:
        from .segments import resample_segments

        return reference.with_array(np.zeros(reference.shape, np.uint8)), resample_segments(ref, segments, reference)
    return ref, segments


def _swap_ik(affine: Any) -> np.ndarray:
    """A 4x4 index-to-LPS matrix with its i and k columns swapped: ours takes (i, j, k) = (column, row, frame),
    highdicom's volume (frame, row, column). The same swap goes both ways."""
    m = np.array(affine, dtype=float)
    m[:3, :3] = m[:3, :3][:, ::-1]
    return m


def _terminology_from_description(d: Any) -> dict:
    from ..terminology import ANATOMIC_CONTEXT, CATEGORY_CONTEXT

    def code(item):
        return [item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning]

    t = {"contextName": CATEGORY_CONTEXT, "category": code(d.SegmentedPropertyCategoryCodeSequence[0]),
         "type": code(d.SegmentedPropertyTypeCodeSequence[0]), "anatomicContextName": ANATOMIC_CONTEXT}
    mods = d.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
    if mods:
        t["typeModifier"] = code(mods[0])
    regions = d.get("AnatomicRegionSequence")
    if regions:
        t["anatomicRegion"] = code(regions[0])
        rmods = regions[0].get("AnatomicRegionModifierSequence")
        if rmods:
            t["anatomicRegionModifier"] = code(rmods[0])
    return t
