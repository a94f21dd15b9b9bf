"""Segment statistics into a table node and CSV: Slicer's SegmentStatistics when present (inside
Slicer), the engine's ``textseg.statistics`` otherwise. Same columns and units either way.

Rows are dicts keyed by SegmentStatistics' short keys (``voxel_count``, ``volume_mm3``, ...);
``textseg.statistics.compute_statistics(volume, segments)`` returns the same keys.
"""

from __future__ import annotations

import csv
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from textseg.writers import Segment, atomic_output

from . import mrml

# (key, header, unit, column type); unit None = the volume's intensity unit (HU for DICOM CT).
COLUMNS = (
    ("segment", "Segment", "", "string"),
    ("voxel_count", "Number of voxels", "voxels", "int"),
    ("volume_mm3", "Volume", "mm3", "float"),
    ("volume_cm3", "Volume", "cm3", "float"),
    ("min", "Minimum", None, "float"),
    ("max", "Maximum", None, "float"),
    ("mean", "Mean", None, "float"),
    ("median", "Median", None, "float"),
    ("stdev", "Standard deviation", None, "float"),
)
_SLICER_KEYS = {
    "voxel_count": "LabelmapSegmentStatisticsPlugin.voxel_count",
    "volume_mm3": "LabelmapSegmentStatisticsPlugin.volume_mm3",
    "volume_cm3": "LabelmapSegmentStatisticsPlugin.volume_cm3",
    "min": "ScalarVolumeSegmentStatisticsPlugin.min",
    "max": "ScalarVolumeSegmentStatisticsPlugin.max",
    "mean": "ScalarVolumeSegmentStatisticsPlugin.mean",
    "median": "ScalarVolumeSegmentStatisticsPlugin.median",
    "stdev": "ScalarVolumeSegmentStatisticsPlugin.stdev",
}


def intensity_unit(volume_node) -> str:
    units = volume_node.GetVoxelValueUnits() if hasattr(volume_node, "GetVoxelValueUnits") else None
    return (units.GetCodeValue() or units.GetCodeMeaning() or "") if units is not None else ""


def headers(unit: str) -> List[str]:
    out = []
    for _key, name, col_unit, _kind in COLUMNS:
        u = unit if col_unit is None else col_unit
        out.append(f"{name} [{u}]" if u else name)
    return out


# ---- the two back ends ---------------------------------------------------------------------------
def slicer_statistics(segmentation_node, volume_node) -> Optional[List[Dict]]:
    """Rows from Slicer's SegmentStatistics module; None where it is not available (slicer-core)."""
    try:
        from SegmentStatistics import SegmentStatisticsLogic
    except ImportError:
        return None
    logic = SegmentStatisticsLogic()
    params = logic.getParameterNode()
    try:
        params.SetParameter("Segmentation", segmentation_node.GetID())
        params.SetParameter("ScalarVolume", volume_node.GetID())
        params.SetParameter("visibleSegmentsOnly", "False")
        params.SetParameter("ClosedSurfaceSegmentStatisticsPlugin.enabled", "False")
        for long_key in _SLICER_KEYS.values():
            plugin = long_key.split(".")[0]
            params.SetParameter(plugin + ".enabled", "True")
            params.SetParameter(long_key + ".enabled", "True")
        logic.computeStatistics()
        stats = logic.getStatistics()
        return [
            {"segment": stats[sid, "Segment"], **{k: stats.get((sid, lk)) for k, lk in _SLICER_KEYS.items()}}
            for sid in stats["SegmentIDs"]
        ]
    finally:
        if params.GetScene() is not None:
            params.GetScene().RemoveNode(params)


def basic_statistics(volume, segments: Sequence[Segment]) -> List[Dict]:
    """The SegmentStatistics labelmap + scalar numbers with numpy (until textseg.statistics lands)."""
    rows = []
    for s in segments:
        values = np.asarray(volume.array)[np.asarray(s.mask) > 0].astype(np.float64)
        n = int(values.size)
        row = {"segment": s.name, "voxel_count": n, "volume_mm3": n * volume.voxel_volume_mm3,
               "volume_cm3": n * volume.voxel_volume_mm3 / 1000.0}
        if n:
            row.update(min=values.min(), max=values.max(), mean=values.mean(), median=float(np.median(values)),
                       stdev=values.std(ddof=1) if n > 1 else 0.0)  # vtkImageAccumulate: sample std
        rows.append(row)
    return rows


def engine_statistics(segmentation_node, volume_node) -> List[Dict]:
    try:
        from textseg.statistics import compute_statistics
    except ImportError:
        compute_statistics = basic_statistics
    volume = mrml.volume_from_node(volume_node)
    seg = segmentation_node.GetSegmentation()
    segments = [Segment(seg.GetSegment(sid).GetName(), mrml.segment_mask(segmentation_node, sid, volume_node))
                for sid in mrml.segment_ids(segmentation_node)]
    return compute_statistics(volume, segments)


# ---- outputs -------------------------------------------------------------------------------------
def _value(row: Dict, key: str, kind: str):
    v = row.get(key)
    if kind == "string":
        return "" if v is None else str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan") if kind == "float" else -1
    return int(v) if kind == "int" else float(v)


def fill_table(table_node, rows: Sequence[Dict], unit: str) -> None:
    from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkLongArray, vtkStringArray

    was_modifying = table_node.StartModify()
    table_node.RemoveAllColumns()
    for (key, _n, _u, kind), header in zip(COLUMNS, headers(unit)):
        array = {"string": vtkStringArray, "int": vtkLongArray, "float": vtkDoubleArray}[kind]()
        array.SetName(header)
        for row in rows:
            array.InsertNextValue(_value(row, key, kind))
        table_node.AddColumn(array)
        col_unit = unit if _u is None else _u
        if col_unit:
            table_node.SetColumnUnitLabel(header, col_unit)
    table_node.Modified()
    table_node.EndModify(was_modifying)


def write_csv(path, rows: Sequence[Dict], unit: str, overwrite: bool = False) -> None:
    """CSV with the table's headers; atomic, never replaces a file unless ``overwrite``."""
    with atomic_output(path, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(headers(unit))
            for row in rows:
                w.writerow([_csv_value(row.get(key)) for key, _n, _u, _k in COLUMNS])


def _csv_value(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
