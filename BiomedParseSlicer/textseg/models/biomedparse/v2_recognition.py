"""BiomedParse v2 recognition ("segment everything") and edge-query instance split. Numpy + scipy, no torch.

Upstream rules (microsoft/BiomedParse branch v2, ``inference.py`` / ``utils.py`` / ``inference_example_3D.ipynb``):

* ``postprocess``: with more than one prompt, per slice NMS over prompts (``slice_nms`` /
  ``nms_masks_batch_iou``): prompts in descending existence order, stop at the first below the existence
  threshold 0.5 (>=), skip empty masks (p > 0.5), keep one and drop every later prompt whose mask IoU with it
  is > 0.5; dropped prompts' probabilities are zeroed on that slice. With one prompt: probability zeroed where
  existence <= 0.5 (strict).
* ``merge_multiclass_masks``: background 0.5 stacked first, argmax over [background, prompts] (ties to the
  earlier entry): one label per voxel, label n = prompt n (or ``ids``).
* Instance split (notebook "Instance Segmentation"): the edge queries' mean logits go through the same
  postprocess + merge; then ``interior = labels * (edge_labels == 0)``, 6-connected components of the interior
  (``skimage.measure.label(connectivity=1)``; components of different labels stay apart),
  ``expand_labels(distance=1)``, times ``labels > 0``.

Differences by default (``compat=True`` reproduces upstream exactly; docs/biomedparse-v2.md):

* ties in existence order: stable (earlier prompt first); upstream's ``torch.argsort`` leaves them unspecified;
* one prompt: the same >= 0.5 rule as NMS (upstream: > 0.5 with one prompt, >= 0.5 with several);
* edges: a target's edge voxels are its own edge probability > 0.5 inside its own merged region (upstream NMSes
  and merges the edge maps separately, so a target's split can use another target's edges);
* expansion: each instance grows only into voxels of its own target (upstream grows across targets).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from ...errors import UsageError
from ...prompts import Prompt
from ..base import Recognizer, SliceLabels

BACKGROUND = 0.5


def nms_keep(masks: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5,
             score_threshold: float = 0.5) -> List[int]:
    """Upstream ``nms_masks_batch_iou`` on one slice: masks (N, H, W) bool, scores (N,) -> kept indices in order."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    flat = masks.reshape(len(masks), -1)
    areas = flat.sum(1)
    keep: List[int] = []
    while len(order):
        i = int(order[0])
        if scores[i] < score_threshold:
            break
        if areas[i] == 0:
            order = order[1:]
            continue
        keep.append(i)
        rest = order[1:]
        inter = (flat[rest] & flat[i]).sum(1)
        union = areas[rest] + areas[i] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        order = rest[iou <= iou_threshold]  # NaN (both empty) is dropped, as upstream
    return keep


def slice_nms_keep(probs: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5,
                   score_threshold: float = 0.5) -> np.ndarray:
    """Upstream ``slice_nms``: probs (N, D, H, W), scores (N, D) -> keep (N, D) bool."""
    keep = np.zeros(scores.shape, bool)
    for d in range(probs.shape[1]):
        keep[nms_keep(probs[:, d] > 0.5, scores[:, d], iou_threshold, score_threshold), d] = True
    return keep


def postprocess(probs: np.ndarray, scores: np.ndarray, threshold: float = 0.5, iou_threshold: float = 0.5,
                compat: bool = False) -> np.ndarray:
    """Upstream ``postprocess`` on probabilities (N, D, H, W) and existence probabilities (N, D)."""
    if compat and probs.shape[0] == 1:
        keep = scores > threshold
    else:
        keep = slice_nms_keep(probs, scores, iou_threshold, threshold)
    return probs * keep[:, :, None, None]


def merge_multiclass(probs: np.ndarray, ids: Optional[Sequence[int]] = None) -> np.ndarray:
    """Upstream ``merge_multiclass_masks``: (N, ...) probabilities -> int64 labels (0 = background)."""
    stacked = np.concatenate([np.full_like(probs[:1], BACKGROUND), probs])
    labels = np.argmax(stacked, axis=0)
    if ids is None:
        return labels
    return np.concatenate([[0], np.asarray(ids, np.int64)])[labels]


def connected_components(labels: np.ndarray) -> np.ndarray:
    """``skimage.measure.label(labels, connectivity=1)``: 6-connected components of equal non-zero values,
    numbered 1.. in raster order of their first voxel."""
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    values = np.unique(labels)
    values = values[values != 0]
    if len(values) == 1:  # scipy numbers one value's components in raster order already
        return ndimage.label(labels == values[0], structure)[0].astype(np.int64)
    out = np.zeros(labels.shape, np.int64)
    offset = 0
    for v in values:
        comp, n = ndimage.label(labels == v, structure)
        out[comp > 0] = comp[comp > 0] + offset
        offset += n
    if offset == 0:
        return out
    flat = out.ravel()
    nz = np.flatnonzero(flat)
    firsts = np.full(offset + 1, flat.size, np.int64)
    np.minimum.at(firsts, flat[nz], nz)
    rank = np.zeros(offset + 1, np.int64)
    rank[np.argsort(firsts[1:], kind="stable") + 1] = np.arange(1, offset + 1)
    return rank[out]


def expand_labels(labels: np.ndarray, distance: float = 1) -> np.ndarray:
    """``skimage.segmentation.expand_labels``: background voxels within ``distance`` (voxels) take the
    label of the nearest labelled voxel (Euclidean distance transform, its tie rule)."""
    dist, nearest = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    out = np.zeros_like(labels)
    grow = dist <= distance
    out[grow] = labels[tuple(ix[grow] for ix in nearest)]
    return out


def split_instances_upstream(labels: np.ndarray, edge_labels: np.ndarray, distance: float = 1) -> np.ndarray:
    """The notebook's instance split, exactly: one instance map over all labels."""
    interior = labels * (edge_labels == 0)
    return expand_labels(connected_components(interior), distance) * (labels > 0)


def split_instances(region: np.ndarray, edges: np.ndarray, distance: float = 1) -> np.ndarray:
    """One target: instances = 6-connected components of region minus edges, grown by ``distance`` within
    the region (computed on the region's bounding box). Returns int32 labels 1..n (raster order), 0 elsewhere."""
    out = np.zeros(region.shape, np.int32)
    if not region.any():
        return out
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    reg = region[box].astype(bool)
    inst = connected_components((reg & ~edges[box]).astype(np.uint8))
    out[box] = expand_labels(inst, distance) * reg
    return out


class V2Recognizer(Recognizer):
    """Per slice batch: NMS over all targets, merge to one label per voxel; instance split at the end."""

    OPTIONS = ("targets", "instances", "iou_threshold", "existence_threshold", "compat_upstream",
               "expand_distance", "sentences")

    def __init__(self, modality: str, site: Optional[str], default_threshold: float, compat_default: bool,
                 **options: Any) -> None:
        from .v2_spec import TARGETS, prompt_sentence

        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise UsageError(f"Unknown recognition option(s) {unknown} for BiomedParse v2; it takes "
                             f"{', '.join(self.OPTIONS)}.")
        names = list(options.get("targets") or TARGETS.get(modality, ()))
        if not names or not all(isinstance(t, str) and t.strip() for t in names):
            raise UsageError(f"BiomedParse v2 has no targets for {modality}; pass targets=[...] (target names).")
        names = [" ".join(t.split()) for t in names]
        inst = options.get("instances", False)
        self.instance_targets = set(names) if inst is True else set(inst or ())
        missing = self.instance_targets - set(names)
        if missing:
            raise UsageError(f"instances names {sorted(missing)} that are not among the targets.")
        self.names = names
        sentences = options.get("sentences", True)
        self.prompts = [Prompt(prompt_sentence(t, modality, site) if sentences else t) for t in names]
        self.iou = float(options.get("iou_threshold", 0.5))
        th = options.get("existence_threshold")
        self.threshold = float(default_threshold if th is None else th)
        comp = options.get("compat_upstream")
        self.compat = bool(compat_default if comp is None else comp)
        self.distance = float(options.get("expand_distance", 1))
        self.edges = bool(self.instance_targets)
        self.info = {"rules": "biomedparse-v2", "existence_threshold": self.threshold, "iou_threshold": self.iou,
                     "compat_upstream": self.compat, "instances": sorted(self.instance_targets)}

    def slices(self, probs: np.ndarray, existence: Optional[np.ndarray],
               edges: Optional[np.ndarray] = None) -> SliceLabels:
        if existence is None or np.isnan(existence).any():
            raise UsageError("BiomedParse v2 recognition needs the model's existence scores.")
        if self.compat and len(probs) == 1:
            keep = existence > self.threshold
        else:
            keep = slice_nms_keep(probs, existence, self.iou, self.threshold)
        kept = probs * keep[:, :, None, None]
        labels = merge_multiclass(kept)
        win = np.take_along_axis(kept, np.maximum(labels - 1, 0)[None], 0)[0] * (labels > 0)
        edge = None
        if edges is not None:
            if self.compat:
                edge = merge_multiclass(postprocess(edges, existence, self.threshold, self.iou, compat=True)) > 0
            else:
                edge = (np.take_along_axis(edges, np.maximum(labels - 1, 0)[None], 0)[0] > 0.5) & (labels > 0)
        scores = np.where(keep, existence, np.nan)
        return SliceLabels(labels.astype(np.int32), win.astype(np.float32), scores, edge)

    def instances(self, labels: np.ndarray, edges: Optional[np.ndarray]) -> Dict[int, np.ndarray]:
        if not self.instance_targets or edges is None:
            return {}
        idx = [n for n, t in enumerate(self.names) if t in self.instance_targets]
        if self.compat:
            everything = split_instances_upstream(labels, edges.astype(np.int64), self.distance)
            return {n: np.where(labels == n + 1, everything, 0).astype(np.int32) for n in idx}
        return {n: split_instances(labels == n + 1, edges, self.distance) for n in idx}
