"""Segment statistics with the definitions and units of 3D Slicer's Segment Statistics module.

Shape measures use SimpleITK's LabelShapeStatisticsImageFilter, the same ITK filter behind Slicer's
``vtkITKLabelShapeStatistics``; intensity measures are exact numpy reductions over the segment's
voxels. Column names are Slicer's statistic keys where Slicer has the measure (``voxel_count``,
``volume_mm3``, ``volume_cm3``, ``min``, ``max``, ``mean``, ``stdev``, ``median``,
``percentile_05``, ``percentile_95``, ``surface_area_mm2``, ``roundness``, ``centroid_ras``);
vectors are split into one column per component. ``COLUMNS`` lists every column with its unit
and definition (docs/outputs-and-statistics.md explains them and the differences from Slicer).

When the model's probability map of a segment is available (kept with ``--probabilities``), the row also has
the confidence columns ``CONFIDENCE_COLUMNS`` (``textseg.analysis.confidence.COLUMNS``: existence, threshold,
mean probability inside the segment, fraction near the threshold, band); they are written only when some row
has them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError
from ..formats.atomic import atomic_output
from ..formats.segments import Segment, resample_segments
from ..runcontrol import ProgressFn
from ..volume import Volume, lps_to_ras, mask_bounds
from .confidence import COLUMNS as CONFIDENCE_COLUMNS
from .confidence import DEFAULT_BAND, confidence, confidence_row

PathLike = Union[str, Path]

# column -> (unit, definition)
COLUMNS: dict[str, tuple[str, str]] = {
    "segment": ("", "Segment name (the prompt)."),
    "voxel_count": ("voxels", "Number of voxels of the segment on the image grid."),
    "volume_mm3": ("mm3", "voxel_count x voxel volume (product of the image spacing)."),
    "volume_cm3": ("cm3", "volume_mm3 / 1000."),
    "min": ("image units", "Minimum image value inside the segment."),
    "max": ("image units", "Maximum image value inside the segment."),
    "mean": ("image units", "Mean image value inside the segment."),
    "stdev": ("image units", "Sample standard deviation (divisor N-1) of the image values inside the segment."),
    "median": ("image units", "Median image value (exact, numpy.median)."),
    "percentile_05": ("image units", "5th percentile of the image values (exact, linear interpolation)."),
    "percentile_95": ("image units", "95th percentile of the image values (exact, linear interpolation)."),
    "surface_area_mm2": ("mm2", "Surface area of the binary segment: ITK LabelShapeStatistics perimeter."),
    "roundness": ("", "ITK roundness: area of the sphere with the segment's volume / surface area."),
    "sphericity": ("", "pi^(1/3) (6 V)^(2/3) / A (Wadell) from volume_mm3 and surface_area_mm2; equals roundness."),
    "centroid_ras_r": ("mm", "Centroid (mean voxel-centre position), RAS R coordinate."),
    "centroid_ras_a": ("mm", "Centroid, RAS A coordinate."),
    "centroid_ras_s": ("mm", "Centroid, RAS S coordinate."),
    "centroid_lps_l": ("mm", "Centroid, LPS L coordinate (= -R)."),
    "centroid_lps_p": ("mm", "Centroid, LPS P coordinate (= -A)."),
    "centroid_lps_s": ("mm", "Centroid, LPS S coordinate."),
    "bbox_index_min_i": ("voxel index", "Smallest i (column) index of the segment, 0-based."),
    "bbox_index_min_j": ("voxel index", "Smallest j (row) index."),
    "bbox_index_min_k": ("voxel index", "Smallest k (slice) index."),
    "bbox_index_max_i": ("voxel index", "Largest i index (inclusive)."),
    "bbox_index_max_j": ("voxel index", "Largest j index (inclusive)."),
    "bbox_index_max_k": ("voxel index", "Largest k index (inclusive)."),
    "bbox_ras_min_r": ("mm", "Axis-aligned RAS box around the index box's voxel corners: minimum R."),
    "bbox_ras_min_a": ("mm", "Minimum A of that box."),
    "bbox_ras_min_s": ("mm", "Minimum S of that box."),
    "bbox_ras_max_r": ("mm", "Maximum R of that box."),
    "bbox_ras_max_a": ("mm", "Maximum A of that box."),
    "bbox_ras_max_s": ("mm", "Maximum S of that box."),
}


def compute_statistics(volume: Volume, segments: Sequence[Segment], reference: Optional[Volume] = None,
                       progress: Optional[ProgressFn] = None, cancel: Any = None,
                       confidences: Optional[Sequence[Optional[dict[str, Any]]]] = None,
                       maps: Optional[Callable[[int, Segment], Optional[np.ndarray]]] = None,
                       band: float = DEFAULT_BAND) -> list[dict[str, Any]]:
    """One row (dict keyed by ``COLUMNS``) per segment.

    ``reference`` is the grid of the segments' masks when it differs from ``volume``'s (a
    .seg.nrrd or DICOM SEG of another extent): the masks are then resampled onto the image grid
    (nearest neighbour), as Slicer does. Empty segments get voxel_count 0 and None elsewhere.
    Intensity columns are None for RGB images.

    Confidence columns: ``confidences[n]`` (a ``confidence.confidence`` dict) for segment n, or ``maps(n,
    segment)`` returning its uint8 probability map on the segment's own grid (None: no map), from which the
    confidence of the segment's current mask is computed at its ``textseg.threshold`` tag with ``band``."""
    rows = []
    for n in range(len(segments)):
        if cancel is not None:
            cancel.check()
        s = segments[n]
        conf = confidences[n] if confidences is not None else None
        if conf is None and maps is not None:
            q = maps(n, s)
            if q is not None:
                conf = confidence(q, np.asarray(s.mask) > 0, _tag_number(s, "threshold", 0.5),
                                  _tag_number(s, "existence", None), band)
        if reference is not None:
            s = resample_segments(reference, [s], volume)[0]
        if s.mask.shape != volume.shape:
            raise InputError(f"segment '{s.name}' has shape {s.mask.shape} but the image has {volume.shape}; "
                             "give the image the segmentation was made on.")
        row = _segment_row(volume, s)
        if conf is not None:
            row.update(confidence_row(conf))
        rows.append(row)
        if progress is not None:
            progress((n + 1) / len(segments), f"statistics: {s.name}")
    return rows


def _tag_number(s: Segment, key: str, default: Optional[float]) -> Optional[float]:
    """A number kept as a ``textseg.<key>`` tag (JSON), or ``default``."""
    text = s.tags.get("textseg." + key)
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        value = None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _segment_row(volume: Volume, s: Segment) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row["segment"] = s.name
    mask = np.asarray(s.mask) > 0
    count = int(np.count_nonzero(mask))
    row.update(voxel_count=count, volume_mm3=count * volume.voxel_volume_mm3,
               volume_cm3=count * volume.voxel_volume_mm3 * 0.001)
    if count == 0:
        return row
    lo, hi = _bbox(mask)
    if not volume.is_rgb:
        row.update(_intensity(volume.array[mask]))
    row.update(_shape(volume, mask, lo, hi))
    return row


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (k, j, i) index bounds of the nonzero voxels (a non-empty mask)."""
    return mask_bounds(mask)


def _intensity(values: np.ndarray) -> dict[str, float]:
    v = values.astype(np.float64)
    p05, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "stdev": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(p50), "percentile_05": float(p05), "percentile_95": float(p95)}


def _shape(volume: Volume, mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict[str, float]:
    """ITK label shape statistics on the segment's bounding box (plus a one-voxel margin so the
    surface is closed at the crop; ITK's perimeter is unaffected by background padding)."""
    import SimpleITK as sitk

    a = np.maximum(lo - 1, 0)
    b = np.minimum(hi + 2, mask.shape)
    crop = np.ascontiguousarray(mask[a[0]:b[0], a[1]:b[1], a[2]:b[2]], dtype=np.uint8)
    img = sitk.GetImageFromArray(crop)
    img.SetSpacing(volume.spacing)
    img.SetDirection(tuple(volume.direction.ravel()))
    img.SetOrigin(tuple(volume.index_to_physical([a[::-1]])[0]))  # LPS of the crop's first voxel
    f = sitk.LabelShapeStatisticsImageFilter()
    f.SetComputePerimeter(True)
    f.SetComputeFeretDiameter(False)
    f.Execute(img)
    lps = np.array(f.GetCentroid(1))
    ras = lps_to_ras(lps)
    area = f.GetPerimeter(1)
    vol_mm3 = int(mask[a[0]:b[0], a[1]:b[1], a[2]:b[2]].sum()) * volume.voxel_volume_mm3
    out = {"surface_area_mm2": area, "roundness": f.GetRoundness(1),
           "sphericity": math.pi ** (1 / 3) * (6 * vol_mm3) ** (2 / 3) / area if area > 0 else None,
           "centroid_lps_l": lps[0], "centroid_lps_p": lps[1], "centroid_lps_s": lps[2],
           "centroid_ras_r": ras[0], "centroid_ras_a": ras[1], "centroid_ras_s": ras[2]}
    for axis, name in zip((2, 1, 0), "ijk"):
        out[f"bbox_index_min_{name}"] = int(lo[axis])
        out[f"bbox_index_max_{name}"] = int(hi[axis])
    ras_lo, ras_hi = volume.box_to_physical(lo[::-1], hi[::-1], "RAS", margin=0.5)  # around the voxels' corners
    for d, name in enumerate("ras"):
        out[f"bbox_ras_min_{name}"] = float(ras_lo[d])
        out[f"bbox_ras_max_{name}"] = float(ras_hi[d])
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}


def write_statistics(rows: Sequence[dict[str, Any]], path: PathLike, overwrite: bool = False) -> Path:
    """CSV (``.csv``, one row per segment, columns in ``COLUMNS`` order) or JSON (``.json``:
    {"columns": {name: {"unit", "definition"}}, "segments": rows}); atomic, never overwrites unless
    asked."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".csv", ".json"):
        raise InputError(f"{path}: statistics are written as .csv or .json; choose one of those extensions.")
    known = {**COLUMNS, **CONFIDENCE_COLUMNS} if any("confidence_mean" in r for r in rows) else COLUMNS
    columns = list(known) + sorted({k for r in rows for k in r if k not in known})
    if ext == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})
        text = buf.getvalue()
    else:
        meta = {k: {"unit": known[k][0], "definition": known[k][1]} for k in known}
        text = json.dumps({"columns": meta, "segments": [{k: r.get(k) for k in columns} for r in rows]}, indent=1)
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return path


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def statistics_for_files(image: PathLike, segmentation: PathLike, labels: Optional[PathLike] = None,
                         progress: Optional[ProgressFn] = None, cancel: Any = None,
                         probabilities: Optional[PathLike] = None, band: float = DEFAULT_BAND
                         ) -> list[dict[str, Any]]:
    """``textseg stats IMAGE SEGMENTATION``: read both (a .seg.nrrd, DICOM SEG or label map + labels
    JSON), bring the segments onto the image grid and compute one row per segment. Label maps are
    read lazily (one mask in memory at a time).

    A segment whose probability map is found (its ``textseg.probability_file`` tag, relative to the
    segmentation's folder, or the file of that name in ``probabilities``) gets the confidence columns; the map
    must be on the segmentation's grid. One map is read at a time."""
    from ..formats.images import read_volume
    from ..formats.probability_maps import find_map, read_probability_map
    from ..formats.segment_files import read_segments
    from .corrections import place_array

    if probabilities is not None and not Path(probabilities).is_dir():
        raise InputError(f"--probabilities {probabilities}: no such folder; give the folder the maps were kept in "
                         "(`textseg segment --probabilities DIR`), or leave it out to use the segments' map tags.")
    volume = read_volume(image)
    ref, segments = read_segments(segmentation, labels, lazy=True)
    if probabilities is not None and segments and not any(find_map(s, segmentation, probabilities)
                                                          for s in segments):  # asked for, so never left out silently
        raise InputError(f"{probabilities} holds no probability map of any segment of {segmentation} (<segment "
                         "name>.nrrd, .nii.gz or .nii); give the folder of this segmentation's maps.")

    def maps(n: int, s: Segment) -> Optional[np.ndarray]:
        path = find_map(s, segmentation, probabilities)
        if path is None:
            return None
        prob = read_probability_map(path)
        if not prob.same_grid(ref):  # a .seg.nrrd cropped to its segments (Slicer can save one): the same lattice
            placed = place_array(ref, prob, prob.array)  # the mask is empty outside its extent: the cut is exact
            if placed is not None:
                return placed
            raise InputError(f"{path}: the probability map of '{s.name}' is on another grid ({prob.describe()}) "
                             f"than {segmentation}; give the map written with this segmentation.")
        return prob.array

    return compute_statistics(volume, segments, reference=ref, progress=progress, cancel=cancel, maps=maps,
                              band=band)
