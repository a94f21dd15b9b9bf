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

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import __version__
from .errors import InputError, UsageError
from .volume import Volume
from .writers import TAG_PREFIX, Segment, atomic_output, segment_terminology

PathLike = Union[str, Path]


def write_dicom_seg(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False,
                    series_description: str = "textseg segmentation", series_number: int = 300) -> Path:
    import highdicom as hd

    sources = _source_datasets(reference)
    if not segments:
        raise UsageError("No segments to write: a DICOM SEG needs at least one segment.")
    masks = np.stack([_mask(s, reference) for s in segments], axis=-1)  # (frames=k, rows=j, cols=i, segments)
    descriptions = [_description(n, s) for n, s in enumerate(segments, start=1)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
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
    with atomic_output(path, overwrite) as tmp:
        seg.save_as(str(tmp))
    return Path(path)


def _source_datasets(reference: Volume) -> List[Any]:
    import pydicom

    files = reference.metadata.get("dicom_files")
    if not files:
        raise UsageError("DICOM SEG needs a volume read from a DICOM series (its file list is missing). "
                         "Write .seg.nrrd or a .nii.gz label map for other inputs.")
    if len(files) != reference.shape[0]:
        raise InputError(f"The volume has {reference.shape[0]} slices but {len(files)} DICOM files; "
                         "read the series again with textseg so that every slice has its file.")
    datasets = [_with_sop_uids(pydicom.dcmread(str(f), stop_before_pixels=True), f) for f in files]
    for k in (0, len(datasets) - 1):  # the files must be in the volume's k order and geometry
        ds = datasets[k]
        expected = reference.index_to_physical([[0, 0, k]])[0]
        if (int(ds.Rows), int(ds.Columns)) != reference.shape[1:] or not np.allclose(
                [float(v) for v in ds.ImagePositionPatient], expected, atol=1e-2):
            raise InputError(f"{files[k]} does not match slice {k} of the volume (position or size differ); "
                             "the file list must be in k order of an unmodified DICOM series.")
    return datasets


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


def read_dicom_seg(path: PathLike, reference: Optional[Volume] = None) -> Tuple[Volume, List[Segment]]:
    """Segments of a DICOM SEG on the grid of its stored frames (empty frames are usually omitted,
    so that grid may cover fewer slices than the source series), or, with ``reference``, resampled
    (nearest neighbour) onto the reference grid."""
    import highdicom as hd
    from slicerio.segmentation import terminology_entry_to_string

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many kinds
        raise InputError(f"{path}: not a readable DICOM SEG ({exc}).") from None
    vol = seg.get_volume(combine_segments=False)
    arr = np.asarray(vol.array)  # (k, j, i, segments)
    affine = np.asarray(vol.affine, dtype=float)  # ijk (frame, row, col) -> LPS
    m = affine[:3, :3][:, ::-1]  # columns for (i=col, j=row, k=frame)
    spacing = np.linalg.norm(m, axis=0)
    ref = Volume(np.zeros(arr.shape[:3], np.uint8), tuple(spacing), tuple(affine[:3, 3]), m / spacing)
    segments = []
    for n, number in enumerate(seg.segment_numbers):
        d = seg.get_segment_description(number)
        term = _terminology_from_description(d)
        lab = d.get("RecommendedDisplayCIELabValue")
        color = tuple(c / 255.0 for c in hd.color.CIELabColor.from_dicom_value(lab).to_rgb(clip=True)) if lab else None
        segments.append(Segment(d.SegmentLabel, (arr[..., n] > 0).astype(np.uint8), color,
                                terminology_entry_to_string(term), {}))
    if reference is not None:
        from .writers import resample_segments

        return reference.with_array(np.zeros(reference.shape, np.uint8)), resample_segments(ref, segments, reference)
    return ref, segments


def _terminology_from_description(d: Any) -> dict:
    from .terminology import ANATOMIC_CONTEXT, CATEGORY_CONTEXT

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
