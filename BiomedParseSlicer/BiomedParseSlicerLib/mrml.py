"""MRML glue: volume nodes -> engine Volumes, engine masks -> segments on the exact volume grid.

Geometry: the engine gets the volume in *world* coordinates (the node's IJK-to-RAS composed with
its linear parent transforms, which is what hardening the transform on a copy would give,
without resampling); non-linear transforms are refused with a message. Segments are written
with the node's own IJK-to-RAS, in a segmentation node under the same parent transform, so the
segment voxels are exactly the volume's voxels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import slicer
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR
from vtkmodules.vtkCommonCore import reference as vtk_reference
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from textseg.errors import InputError, UsageError
from textseg.formats.segments import TAG_PREFIX, Segment
from textseg.volume import Volume
from textseg.volume import ras_to_lps as _ras_to_lps

PROMPT_TAG = TAG_PREFIX + "prompt"
MODEL_TAG = TAG_PREFIX + "model"
# Every textseg.* tag a run may write (formats.segments.segments_from_results: the predictor's provenance, some keys
# only sometimes, then terminology_match, objects, complete): a replaced segment drops them all before the new run's
# tags are set, so no tag of the earlier run (a "partial" mark, detection boxes of another mask) survives.
RUN_TAGS = tuple(TAG_PREFIX + k for k in (
    "model", "model_version", "weights_revision", "weights", "engine", "prompt", "modality", "site", "threshold",
    "existence",
    "device", "seconds", "time", "seed", "recognition", "terminology_match", "objects", "complete"))

# Distinct, readable colours for segments nobody gave a colour to (Slicer's GenericAnatomy-like).
PALETTE = (
    (0.50, 0.68, 0.50), (0.94, 0.84, 0.57), (0.69, 0.48, 0.40), (0.43, 0.72, 0.84), (0.85, 0.40, 0.45),
    (0.56, 0.49, 0.77), (0.86, 0.60, 0.30), (0.35, 0.55, 0.75), (0.76, 0.76, 0.40), (0.60, 0.35, 0.55),
)


# ---- matrices ------------------------------------------------------------------------------------
def matrix_to_numpy(m: vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(a: np.ndarray) -> vtkMatrix4x4:
    m = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(node) -> np.ndarray:
    """The node's own IJK-to-RAS (parent transforms not applied)."""
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


def world_ijk_to_ras(node) -> np.ndarray:
    """IJK to world RAS, with the node's parent transforms applied (linear ones only)."""
    m = ijk_to_ras(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return m
    if not parent.IsTransformToWorldLinear():
        raise UsageError(
            f"'{node.GetName()}' is under a non-linear transform ('{parent.GetName()}'). Harden it first "
            "(Data module: right-click the volume > Harden transform), then segment the hardened volume."
        )
    to_world = vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return matrix_to_numpy(to_world) @ m


# ---- scene ---------------------------------------------------------------------------------------
def nodes_by_class(scene, class_name: str) -> list:
    """The scene's nodes of a class (subclasses too), as a list. vtkMRMLScene::GetNodesByClass returns a new
    collection the caller must delete ('You are responsible for deleting the returned collection'), and its Python
    wrapper keeps that reference: a collection left over keeps every node in it alive, removed or not. Dropped here
    as slicer.util.getNodesByClass drops it."""
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


# ---- volume node -> engine Volume -------------------------------------------------------------------
def array_from_node(node) -> np.ndarray:
    """Voxels as array[k, j, i] (or [k, j, i, c] for RGB), a copy."""
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "(none)"
        raise InputError(f"Volume '{name}' has no voxels. Load an image (File > Add Data) and select it.")
    dims = image.GetDimensions()[::-1]
    ncomp = image.GetNumberOfScalarComponents()
    arr = vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(arr.reshape(dims + ((ncomp,) if ncomp > 1 else ())))


def volume_from_node(node) -> Volume:
    """The engine Volume of a scalar/vector volume node with its full world geometry."""
    if node is None or not node.IsA("vtkMRMLVolumeNode"):
        raise UsageError("Select an input volume first.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise UsageError(f"'{node.GetName()}' is a label map; select the grey-level image to segment.")
    arr = array_from_node(node)
    meta = {"source": node.GetName(), "node_id": node.GetID() or ""}
    return Volume.from_matrix(arr, world_ijk_to_ras(node), meta, space="RAS")


def volume_node_from_volume(scene, volume: Volume, name: str = "volume"):
    """A scalar volume node holding an engine Volume (array and geometry), e.g. a phantom."""
    from vtkmodules.util.numpy_support import get_vtk_array_type
    from vtkmodules.vtkCommonDataModel import vtkImageData

    image = vtkImageData()
    image.SetDimensions(volume.size)
    arr = np.ascontiguousarray(volume.array)
    image.GetPointData().SetScalars(numpy_to_vtk(arr.ravel(), deep=True, array_type=get_vtk_array_type(arr.dtype)))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


# ---- masks <-> segments --------------------------------------------------------------------------
def oriented_image(mask: np.ndarray, ijk_to_ras_matrix: np.ndarray):
    img = slicer.vtkOrientedImageData()
    img.SetDimensions(mask.shape[::-1])
    img.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras_matrix))
    flat = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    img.GetPointData().SetScalars(numpy_to_vtk(flat, deep=True, array_type=VTK_UNSIGNED_CHAR))
    return img


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, volume_node) -> None:
    """Replace a segment's voxels by ``mask`` (k, j, i) on ``volume_node``'s grid."""
    image = oriented_image(mask, ijk_to_ras(volume_node))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            image.GetExtent()):
        raise RuntimeError(f"Slicer could not store the mask of segment '{segment_id}'.")


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment's voxels as a uint8 (k, j, i) array on ``volume_node``'s grid (nearest neighbour)."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volume_node.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras(volume_node)))
    out = slicer.vtkOrientedImageData()
    shape = tuple(volume_node.GetImageData().GetDimensions()[::-1])
    if labelmap.IsEmpty() or not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, out, False, False
    ):
        return np.zeros(shape, np.uint8)
    return (vtk_to_numpy(out.GetPointData().GetScalars()).reshape(shape) > 0).astype(np.uint8)


def segment_ids(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def prompt_key(value: str) -> Optional[str]:
    """Normalised prompt (text, box, points) of a ``textseg.prompt`` tag value, for matching re-runs."""
    try:
        d = json.loads(value) if value.startswith("{") else {"text": value}
    except ValueError:
        return None
    d["text"] = " ".join(str(d.get("text", "")).lower().split())
    return json.dumps(d, sort_keys=True)


def find_segment_for_prompt(segmentation_node, tag_value: str) -> Optional[str]:
    """The segment an earlier run made for the same prompt (matched by its textseg.prompt tag only:
    segments a user drew, even with the same name, are never matched)."""
    wanted = prompt_key(tag_value)
    for sid in segment_ids(segmentation_node):
        segment = segmentation_node.GetSegmentation().GetSegment(sid)
        value = get_tag(segment, PROMPT_TAG)
        if value and prompt_key(value) == wanted:
            return sid
    return None


def get_tag(segment, key: str) -> str:
    """A segment tag's value, or "" when the segment has no such tag."""
    value = vtk_reference("")
    return str(value) if segment.GetTag(key, value) else ""


# ---- appearance --------------------------------------------------------------------------------
def terminology_string(terminology) -> Optional[str]:
    """A Slicer terminology string from the engine's value (slicerio dict or string)."""
    if terminology is None or isinstance(terminology, str):
        return terminology
    from slicerio.segmentation import terminology_entry_to_string

    return terminology_entry_to_string(terminology)


def slicer_terminology(name: str, terminology_logic) -> tuple[Optional[str], Optional[tuple[float, float, float]]]:
    """(terminology string, recommended colour) from Slicer's terminology module, when it has one
    for this label (inside Slicer; the slicer-core wheel ships no terminology files)."""
    if terminology_logic is None:
        return None, None
    context = "Segmentation category and type - 3D Slicer General Anatomy list"
    try:
        entry = slicer.vtkSlicerTerminologyEntry()
        if not any(terminology_logic.FindTypeInTerminologyBy3dSlicerLabel(context, label, entry)
                   for label in dict.fromkeys((name, name.lower()))):
            return None, None
        coded = entry.GetTypeModifierObject()  # e.g. 'left kidney': the colour is on the modifier
        if coded is None or not coded.GetCodeValue():
            coded = entry.GetTypeObject()
        rgb = coded.GetRecommendedDisplayRGBValue()
        return terminology_logic.SerializeTerminologyEntry(entry), tuple(c / 255.0 for c in rgb[:3])
    except (AttributeError, TypeError):  # another terminology API: keep the engine's values
        return None, None


def appearance(segment: Segment, index: int, terminology_logic=None):
    """Colour (0..1) and terminology string of a new segment: the engine's (textseg.terminology
    via formats.segments.segments_from_results) first, then Slicer's terminology, then a palette colour."""
    term = terminology_string(segment.terminology)
    color = segment.color
    if term is None or color is None:
        slicer_term, slicer_color = slicer_terminology(segment.name, terminology_logic)
        term = term or slicer_term
        color = color or slicer_color
    return tuple(color or PALETTE[index % len(PALETTE)]), term


def add_segment(segmentation_node, segment: Segment, volume_node, index: int, replace_id: Optional[str] = None,
                terminology_logic=None) -> str:
    """Write one engine Segment into the node; returns its segment ID."""
    color, term = appearance(segment, index, terminology_logic)
    seg = segmentation_node.GetSegmentation()
    sid = replace_id or seg.AddEmptySegment("", segment.name, color)
    set_segment_mask(segmentation_node, sid, segment.mask, volume_node)
    s = seg.GetSegment(sid)
    s.SetName(segment.name)
    s.SetColor(*color)
    s.SetNameAutoGenerated(False)
    s.SetColorAutoGenerated(False)
    if replace_id:
        for key in RUN_TAGS:
            s.RemoveTag(key)
    if term:
        s.SetTerminology(term)
    for key, value in segment.tags.items():
        s.SetTag(key, str(value))
    return sid


def prepare_segmentation_node(scene, volume_node, segmentation_node=None, name: Optional[str] = None):
    """The output node: a new one named after the volume (also when the given one was removed from the
    scene), or the given one after checking that it lives in the same coordinate frame as the volume."""
    parent = volume_node.GetParentTransformNode()
    if segmentation_node is not None and segmentation_node.GetScene() is None:
        segmentation_node = None  # removed from the scene meanwhile (a long run): results go to a new node
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                    name or f"{volume_node.GetName()} segmentation")
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
    elif segmentation_node.GetParentTransformNode() is not parent:
        raise UsageError(
            f"Segmentation '{segmentation_node.GetName()}' and volume '{volume_node.GetName()}' are under "
            "different transforms. Put both under the same transform (Data module), or choose a new segmentation."
        )
    reference = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if reference is None or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    return segmentation_node


def add_segments(segmentation_node, segments: Sequence[Segment], volume_node, replace: bool = False,
                 terminology_logic=None) -> list[str]:
    """Add one segment per engine Segment. With ``replace`` a segment an earlier run made for the
    same prompt is overwritten in place; nothing else in the node is touched."""
    ids = []
    start = segmentation_node.GetSegmentation().GetNumberOfSegments()
    for n, segment in enumerate(segments):
        old = find_segment_for_prompt(segmentation_node,
                                      segment.tags.get(PROMPT_TAG, segment.name)) if replace else None
        ids.append(add_segment(segmentation_node, segment, volume_node, start + n, old, terminology_logic))
    return ids


def segments_for_prompts(segmentation_node, tag_values: Iterable[str]) -> list[str]:
    """IDs of segments an earlier run made for any of these prompts (the GUI asks before replacing)."""
    found = [find_segment_for_prompt(segmentation_node, v) for v in tag_values]
    return [f for f in found if f]


# ---- markups -> prompt geometry (LPS mm, what textseg.prompts expects) --------------------------------
def ras_to_lps(points) -> np.ndarray:
    return _ras_to_lps(np.atleast_2d(np.asarray(points, dtype=float)))


def _require_linear(node, what: str) -> None:
    parent = node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise UsageError(
            f"{what} '{node.GetName()}' is under a non-linear transform ('{parent.GetName()}'). Harden it first "
            "(Data module: right-click it > Harden transform), or place it outside that transform."
        )


def roi_box_lps(roi_node) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Two opposite corners (LPS mm) of an ROI's axis-aligned bounding box in world coordinates
    (its parent transforms applied; a rotated ROI gives the box around it), or None without an ROI."""
    if roi_node is None:
        return None
    _require_linear(roi_node, "ROI")
    b = [0.0] * 6
    roi_node.GetRASBounds(b)
    if roi_node.GetNumberOfControlPoints() == 0 or not np.isfinite(b).all() or b[0] > b[1]:
        raise UsageError(f"ROI '{roi_node.GetName()}' has no extent: place it in a view first.")
    lo, hi = ras_to_lps([[b[0], b[2], b[4]], [b[1], b[3], b[5]]])
    return tuple(map(float, np.minimum(lo, hi))), tuple(map(float, np.maximum(lo, hi)))


def fiducial_points_lps(fiducial_node) -> tuple[tuple[float, ...], ...]:
    """World positions (LPS mm) of a point list's control points (parent transforms applied)."""
    if fiducial_node is None:
        return ()
    _require_linear(fiducial_node, "Point list")
    pts = []
    for i in range(fiducial_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        fiducial_node.GetNthControlPointPositionWorld(i, p)
        pts.append(p)
    return tuple(tuple(map(float, p)) for p in ras_to_lps(pts)) if pts else ()
