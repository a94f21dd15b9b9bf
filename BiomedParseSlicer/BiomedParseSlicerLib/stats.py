"""Segment statistics into a table node and CSV: Slicer's SegmentStatistics when present (inside
Slicer), the engine's ``textseg.analysis.segment_stats`` otherwise. Same columns and units either way;
segments with a kept model output add the confidence columns (``CONFIDENCE_COLUMNS``).

Rows are dicts keyed by SegmentStatistics' short keys (``voxel_count``, ``volume_mm3``, ...);
``textseg.analysis.segment_stats.compute_statistics(volume, segments)`` returns the same keys.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Optional

from textseg.formats.atomic import atomic_output
from textseg.formats.segments import Segment

from . import mrml

# The table Slicer's SegmentStatistics makes (SegmentStatisticsLogic.exportToTable) when the Labelmap
# plugin's voxel_count/volume_mm3/volume_cm3 and the Scalar Volume plugin's min/max/mean/stdev/median
# are enabled: column names, titles, units and order as in Slicer 5.8 .. 5.10 (Modules/Scripted/
# SegmentStatistics/SegmentStatisticsPlugins/*.py, getMeasurementInfo). Unit None = the volume's intensity
# unit, the code meaning of its VoxelValueUnits (e.g. "Hounsfield unit" for DICOM CT), as Slicer sets it.
# (key, Slicer long key, column name, column title, unit, column type)
COLUMNS = (
    ("segment", "Segment", "Segment", "Segment", "", "string"),
    ("voxel_count", "LabelmapSegmentStatisticsPlugin.voxel_count", "Voxel count", "Voxel count", "", "int"),
    ("volume_mm3", "LabelmapSegmentStatisticsPlugin.volume_mm3", "Volume mm3", "Volume", "mm3", "float"),
    ("volume_cm3", "LabelmapSegmentStatisticsPlugin.volume_cm3", "Volume cm3", "Volume", "cm3", "float"),
    ("min", "ScalarVolumeSegmentStatisticsPlugin.min", "Minimum", "Minimum", None, "float"),
    ("max", "ScalarVolumeSegmentStatisticsPlugin.max", "Maximum", "Maximum", None, "float"),
    ("mean", "ScalarVolumeSegmentStatisticsPlugin.mean", "Mean", "Mean", None, "float"),
    ("stdev", "ScalarVolumeSegmentStatisticsPlugin.stdev", "Standard deviation", "Standard Deviation", None, "float"),
    ("median", "ScalarVolumeSegmentStatisticsPlugin.median", "Median", "Median", None, "float"),
)
_SLICER_KEYS = {key: long_key for key, long_key, *_rest in COLUMNS[1:]}
# The model's confidence (textseg.analysis.confidence.COLUMNS / confidence_row), for segments whose model output
# is kept; empty cells for the others. (key, -, column name, column title, unit, column type)
CONFIDENCE_COLUMNS = (
    ("existence", "", "Existence", "Existence score", "", "float"),
    ("threshold", "", "Threshold", "Threshold", "", "float"),
    ("confidence_mean", "", "Mean probability", "Mean probability", "", "float"),
    ("confidence_near_threshold", "", "Near-threshold fraction", "Near-threshold fraction", "", "float"),
    ("confidence_band", "", "Band", "Band", "", "float"),
)
# "Compare with AI output" (textseg.analysis.corrections.MaskComparison.as_row): the AI's mask A, the segment now B.
COMPARISON_COLUMNS = (
    ("segment", "", "Segment", "Segment", "", "string"),
    ("dice", "", "Dice", "Dice", "", "float"),
    ("hd95_mm", "", "HD95 mm", "95% Hausdorff distance", "mm", "float"),
    ("hd_mm", "", "HD mm", "Hausdorff distance", "mm", "float"),
    ("asd_mm", "", "ASD mm", "Average surface distance", "mm", "float"),
    ("volume_a_ml", "", "AI volume mL", "AI volume", "mL", "float"),
    ("volume_b_ml", "", "Volume now mL", "Volume now", "mL", "float"),
    ("added_ml", "", "Added mL", "Added", "mL", "float"),
    ("removed_ml", "", "Removed mL", "Removed", "mL", "float"),
    ("voxels_added", "", "Voxels added", "Voxels added", "", "int"),
    ("voxels_removed", "", "Voxels removed", "Voxels removed", "", "int"),
    ("slices_touched", "", "Slices touched", "Slices touched", "", "int"),
)


def intensity_unit(volume_node) -> str:
    """The volume's intensity unit as SegmentStatistics labels it (code meaning, "" when unset)."""
    units = volume_node.GetVoxelValueUnits() if hasattr(volume_node, "GetVoxelValueUnits") else None
    return (units.GetCodeMeaning() or "") if units is not None else ""


def headers(columns=COLUMNS) -> list[str]:
    """Column names (Slicer's, which already carry mm3/cm3), as in the table and the CSV header."""
    return [name for _k, _l, name, *_rest in columns]


def units(unit: str, columns=COLUMNS) -> list[str]:
    """Each column's unit label; ``unit`` is the volume's intensity unit."""
    return [unit if col_unit is None else col_unit for *_rest, col_unit, _kind in columns]


# ---- the two back ends ---------------------------------------------------------------------------
def slicer_statistics(segmentation_node, volume_node) -> Optional[list[dict]]:
    """Rows from Slicer's SegmentStatistics module; None where it is not available (slicer-core)."""
    try:
        from SegmentStatistics import SegmentStatisticsLogic
    except ImportError:
        return None
    logic = private_segment_statistics_logic(SegmentStatisticsLogic, segmentation_node.GetScene())
    configure_segment_statistics(logic, segmentation_node, volume_node)
    logic.computeStatistics()
    stats = logic.getStatistics()
    return [
        {"segment": stats[sid, "Segment"], **{k: stats.get((sid, lk)) for k, lk in _SLICER_KEYS.items()}}
        for sid in stats["SegmentIDs"]
    ]


def private_segment_statistics_logic(logic_class, scene):
    """A SegmentStatisticsLogic computing on a private parameter node outside the scene. Its constructor finds
    the Segment Statistics module's own parameter node (the user's measurement choices) or adds one to the
    scene; that node is never changed here, and one the constructor added is removed, so the scene is left as
    it was."""
    existing = {n.GetID() for n in module_parameter_nodes(scene, "SegmentStatistics")}
    logic = logic_class()
    for node in module_parameter_nodes(scene, "SegmentStatistics"):
        if node.GetID() not in existing:
            scene.RemoveNode(node)
    logic.setParameterNode(mrml.slicer.vtkMRMLScriptedModuleNode())
    return logic


def module_parameter_nodes(scene, module_name: str) -> list:
    """The scene's parameter nodes of a scripted module (vtkMRMLScriptedModuleNode with that ModuleName)."""
    return [n for n in mrml.nodes_by_class(scene, "vtkMRMLScriptedModuleNode")
            if n.GetAttribute("ModuleName") == module_name]


def configure_segment_statistics(logic, segmentation_node, volume_node) -> None:
    """Enable exactly the measurements of ``COLUMNS`` in a SegmentStatisticsLogic (all segments)."""
    params = logic.getParameterNode()
    params.SetParameter("Segmentation", segmentation_node.GetID())
    params.SetParameter("ScalarVolume", volume_node.GetID())
    params.SetParameter("visibleSegmentsOnly", "False")
    wanted = set(_SLICER_KEYS.values())
    for plugin in logic.plugins:
        keys = [plugin.toLongKey(k) for k in plugin.keys]
        params.SetParameter(plugin.__class__.__name__ + ".enabled", str(any(k in wanted for k in keys)))
        for k in keys:
            params.SetParameter(k + ".enabled", str(k in wanted))


def engine_statistics(segmentation_node, volume_node) -> list[dict]:
    """Rows from the engine (textseg.analysis.segment_stats) where Slicer's SegmentStatistics is not available."""
    from textseg.analysis.segment_stats import compute_statistics

    volume = mrml.volume_from_node(volume_node)
    seg = segmentation_node.GetSegmentation()
    segments = [Segment(seg.GetSegment(sid).GetName(), mrml.segment_mask(segmentation_node, sid, volume_node))
                for sid in mrml.segment_ids(segmentation_node)]
    return compute_statistics(volume, segments)


# ---- outputs -------------------------------------------------------------------------------------
def _value(row: dict, key: str, kind: str):
    v = row.get(key)
    if kind == "string":
        return "" if v is None else str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan") if kind == "float" else -1
    return int(v) if kind == "int" else float(v)


def fill_table(table_node, rows: Sequence[dict], unit: str, columns=COLUMNS) -> None:
    """Columns named, titled and unit-labelled as SegmentStatistics' exportToTable does."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkLongArray, vtkStringArray

    was_modifying = table_node.StartModify()
    table_node.RemoveAllColumns()
    for (key, _long, name, title, _u, kind), col_unit in zip(columns, units(unit, columns)):
        array = {"string": vtkStringArray, "int": vtkLongArray, "float": vtkDoubleArray}[kind]()
        array.SetName(name)
        for row in rows:
            array.InsertNextValue(_value(row, key, kind))
        table_node.AddColumn(array)
        table_node.SetColumnTitle(name, title)
        if col_unit:
            table_node.SetColumnUnitLabel(name, col_unit)
    table_node.Modified()
    table_node.EndModify(was_modifying)


def write_csv(path, rows: Sequence[dict], overwrite: bool = False, columns=COLUMNS) -> None:
    """CSV with the table's column names (what Slicer's Tables module writes for the table);
    atomic, never replaces a file unless ``overwrite``."""
    with atomic_output(path, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(headers(columns))
            for row in rows:
                w.writerow([_csv_value(row.get(key)) for key, *_rest in columns])


def _csv_value(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
