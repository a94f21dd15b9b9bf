"""The model's answer kept with the segmentation, in the scene: saved and reloaded with it.

Per AI segment (``textseg.analysis.confidence.ModelAnswer``):

- its uint8 probability map (0..255 = 0..1) is a ``vtkMRMLScalarVolumeNode`` on the input volume's grid (its
  IJK-to-RAS and parent transform), hidden from editors (no node selector and no Data-module item shows it; the
  user never manages it) and saved with the scene as a compressed ``.nrrd``. Slicer writes hidden storable nodes
  itself: into a scene bundle (.mrb); beside a scene saved as files, 5.12+ on every scene write
  (vtkMRMLScene::Commit, ``<scene>_Private/``) and 5.10 only from the Save Data dialog (``Private/``). A
  scene 5.10 writes as a bare ``.mrml`` (``slicer.util.saveScene``) lacks the maps, and Review says so;
- the segmentation node references it with the role ``ROLE`` (one reference per kept segment; MRML remaps the
  IDs when a scene is imported), and the map node names its segment in the attribute ``SEGMENT_ATTRIBUTE``;
- the rest of the answer (run threshold, existence score, dropped flag, the original mask's fingerprint and the
  original mask itself as the few voxels where it differs from re-thresholding the map, or bit-packed) is the
  JSON attribute ``ANSWER_ATTRIBUTE`` of the map node: small arrays zlib-compressed and base64-encoded, so the
  scene file holds it exactly;
- the segment carries the answer's tags (``ModelAnswer.tags()``: original threshold, fingerprint, confidence).

A map node goes with its segment: ``prune`` removes maps whose segment (or segmentation) is gone; the Logic
calls it when a segment or a segmentation is removed and before every review operation.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable
from typing import Optional

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk
from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR

from textseg.analysis.confidence import ModelAnswer
from textseg.errors import UsageError

from . import mrml

ROLE = "textsegModelAnswer"
SEGMENT_ATTRIBUTE = "textseg.answer.segmentId"
ANSWER_ATTRIBUTE = "textseg.answer"
_ARRAYS = ("exceptions", "original_packed")


# ---- ModelAnswer <-> a text attribute (everything but the map) -----------------------------------------
def answer_to_text(answer: ModelAnswer) -> str:
    packed = answer.pack()
    doc = {"format": "textseg-model-answer/1", "threshold": float(packed["threshold"]),
           "existence": None if answer.existence is None else float(answer.existence),
           "dropped": bool(packed["dropped"]), "mask_sha256": str(packed["mask_sha256"]),
           "mask_voxels": int(packed["mask_voxels"])}
    for key in _ARRAYS:
        if key in packed:
            a = np.ascontiguousarray(packed[key])
            doc[key] = {"dtype": a.dtype.str, "size": int(a.size),
                        "zlib_base64": base64.b64encode(zlib.compress(a.tobytes(), 6)).decode("ascii")}
    return json.dumps(doc, separators=(",", ":"))


def answer_from_text(text: str, probability: np.ndarray) -> ModelAnswer:
    try:
        doc = json.loads(text)
        arrays = {"probability": probability, "threshold": np.float64(doc["threshold"]),
                  "existence": np.float64(np.nan if doc["existence"] is None else doc["existence"]),
                  "mask_sha256": np.array(doc["mask_sha256"]), "mask_voxels": np.int64(doc["mask_voxels"]),
                  "dropped": np.bool_(doc["dropped"])}
        for key in _ARRAYS:
            if key in doc:
                raw = zlib.decompress(base64.b64decode(doc[key]["zlib_base64"]))
                arrays[key] = np.frombuffer(raw, np.dtype(doc[key]["dtype"]))[: doc[key]["size"]].copy()
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise UsageError(f"The kept model output is damaged ({exc}); re-run the model for this segment.") from None
    return ModelAnswer.unpack(arrays)


# ---- the map node ----------------------------------------------------------------------------------
def add_answer_node(segmentation_node, segment_id: str, answer: ModelAnswer, volume_node):
    """Keep ``answer`` for the segment: a hidden uint8 volume on ``volume_node``'s grid, referenced from the
    segmentation node; replaces an answer kept earlier for the same segment."""
    scene = segmentation_node.GetScene()
    remove_answer(segmentation_node, segment_id)
    dims = volume_node.GetImageData().GetDimensions()
    if tuple(answer.shape) != tuple(dims[::-1]):
        raise UsageError(f"The model output has shape {answer.shape}, the volume {tuple(dims[::-1])}: not kept.")
    from vtkmodules.vtkCommonDataModel import vtkImageData

    image = vtkImageData()
    image.SetDimensions(dims)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(answer.probability).ravel(), deep=True,
                                                 array_type=VTK_UNSIGNED_CHAR))
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    name = f"{segmentation_node.GetName()} - {segment.GetName() if segment else segment_id} - model output"
    node = scene.CreateNodeByClass("vtkMRMLScalarVolumeNode")
    node.UnRegister(None)  # owned by the Python variable, as Slicer's ScriptedLoadableModule does it
    node.SetName(scene.GenerateUniqueName(name))
    # Hidden before the scene announces it: Subject Hierarchy adds every node that is not hidden at NodeAddedEvent
    # to the Data module's tree and does not look at the flag again.
    node.SetHideFromEditors(True)
    node = scene.AddNode(node)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml.numpy_to_matrix(mrml.ijk_to_ras(volume_node)))
    parent = volume_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
    node.SetAttribute(SEGMENT_ATTRIBUTE, segment_id)
    node.SetAttribute(ANSWER_ATTRIBUTE, answer_to_text(answer))
    storage = node.CreateDefaultStorageNode()  # a compressed .nrrd beside the scene, like any saved volume
    storage.SetUseCompression(True)
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.UnRegister(None)
    segmentation_node.AddNodeReferenceID(ROLE, node.GetID())
    return node


def answer_nodes(segmentation_node) -> dict[str, object]:
    """segment ID -> its map node, for the answers the segmentation references."""
    out = {}
    for n in range(segmentation_node.GetNumberOfNodeReferences(ROLE)):
        node = segmentation_node.GetNthNodeReference(ROLE, n)
        if node is not None and node.GetAttribute(SEGMENT_ATTRIBUTE):
            out[node.GetAttribute(SEGMENT_ATTRIBUTE)] = node
    return out


def answer_node(segmentation_node, segment_id: str):
    return answer_nodes(segmentation_node).get(segment_id)


def load_answer(segmentation_node, segment_id: str) -> Optional[ModelAnswer]:
    """The kept answer of a segment (None when none is kept)."""
    node = answer_node(segmentation_node, segment_id)
    if node is None:
        return None
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        name = segment.GetName() if segment is not None else segment_id
        raise UsageError(f"The model output of segment '{name}' is missing from this scene (Slicer 5.10 leaves it "
                         "out of a scene written as .mrml by a script; scene bundles, .mrb, and the Save Data dialog "
                         "keep it). Run the model again for this segment to review it.")
    return answer_from_text(node.GetAttribute(ANSWER_ATTRIBUTE) or "", mrml.array_from_node(node).astype(np.uint8,
                                                                                                         copy=False))


def remove_answer(segmentation_node, segment_id: str) -> None:
    node = answer_node(segmentation_node, segment_id)
    if node is not None:
        _remove(segmentation_node, node)


def _remove(segmentation_node, node) -> bool:
    for n in reversed(range(segmentation_node.GetNumberOfNodeReferences(ROLE))):
        if segmentation_node.GetNthNodeReferenceID(ROLE, n) == node.GetID():
            segmentation_node.RemoveNthNodeReferenceID(ROLE, n)
    return _remove_node(node.GetScene(), node)


def _remove_node(scene, node) -> bool:
    """Remove a map node and its storage node, each only while it is still in ``scene``: removing a node raises
    NodeRemovedEvent, on which the Logic prunes again, and MRML would remove (and announce) a removed node twice."""
    if scene is None or node.GetScene() is not scene:
        return False
    storage = node.GetStorageNode()
    scene.RemoveNode(node)
    if storage is not None and storage.GetScene() is scene:
        scene.RemoveNode(storage)
    return True


def prune(scene, segmentation_nodes: Optional[Iterable] = None) -> int:
    """Remove the maps whose segment no longer exists, and maps no segmentation references (their segmentation
    was removed). Returns how many were removed."""
    removed = 0
    segs = list(segmentation_nodes) if segmentation_nodes is not None else mrml.nodes_by_class(
        scene, "vtkMRMLSegmentationNode")
    referenced = set()
    for seg in segs:
        ids = set(mrml.segment_ids(seg))
        for sid, node in answer_nodes(seg).items():
            if sid in ids:
                referenced.add(node.GetID())
            else:
                removed += _remove(seg, node)
    if segmentation_nodes is None:  # a full sweep: maps of segmentations that are gone
        all_refs = {seg.GetNthNodeReferenceID(ROLE, n) for seg in segs
                    for n in range(seg.GetNumberOfNodeReferences(ROLE))}
        for node in mrml.nodes_by_class(scene, "vtkMRMLScalarVolumeNode"):
            if node.GetScene() is scene and node.GetAttribute(ANSWER_ATTRIBUTE) is not None \
                    and node.GetID() not in all_refs:
                removed += _remove_node(scene, node)
    return removed
