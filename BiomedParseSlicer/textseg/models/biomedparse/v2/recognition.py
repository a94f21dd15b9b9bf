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

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from scipy import ndimage

from ....errors import UsageError
from ....prompts import Prompt
from ...base import Recognizer, SliceLabels

BACKGROUND = 0.5


def nms_keep(masks: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5,
             score_threshold: float = 0.5) -> list[int]:
    """Upstream ``nms_masks_batch_iou`` on one slice: masks (N, H, W) bool, scores (N,) -> kept indices in order.
    Intersections are counted on the overlap of the two masks' bounding boxes only (same counts, faster)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    rows, cols = masks.any(2), masks.any(1)
    areas = rows.any(1).astype(np.int64)
    box = np.zeros((len(masks), 4), np.int64)
    for n in np.flatnonzero(areas):
        r, c = np.flatnonzero(rows[n]), np.flatnonzero(cols[n])
        box[n] = (r[0], r[-1] + 1, c[0], c[-1] + 1)
        areas[n] = int(np.count_nonzero(masks[n, box[n, 0]:box[n, 1], box[n, 2]:box[n, 3]]))
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        if scores[i] < score_threshold:
            break
        if areas[i] == 0:
            order = order[1:]
            continue
        keep.append(i)
        rest = order[1:]
        inter = np.zeros(len(rest), np.int64)
        for n, j in enumerate(rest):
            y0, y1 = max(box[i, 0], box[j, 0]), min(box[i, 1], box[j, 1])
            x0, x1 = max(box[i, 2], box[j, 2]), min(box[i, 3], box[j, 3])
            if areas[j] and y0 < y1 and x0 < x1:
                inter[n] = np.count_nonzero(masks[i, y0:y1, x0:x1] & masks[j, y0:y1, x0:x1])
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


def merge(probs: np.ndarray, keep: Optional[np.ndarray] = None):
    """Upstream's merge as a running maximum: (labels int64, winning probability or 0.5 where background).
    ``keep`` (N, D) zeroes a prompt on the slices where it is not kept (probs (N, D, H, W)). Equal to
    ``argmax([0.5, p_1, ..., p_N])`` with its first-maximum rule (a later prompt wins only if strictly higher)."""
    best = np.full(probs.shape[1:], BACKGROUND, np.result_type(probs.dtype, np.float32))
    labels = np.zeros(probs.shape[1:], np.int64)
    for n in range(len(probs)):
        p = probs[n] if keep is None else np.where(keep[n].reshape(keep[n].shape + (1,) * (probs.ndim - 2)), probs[n],
                                                   0)
        better = p > best
        best[better] = p[better]
        labels[better] = n + 1
    return labels, best


def merge_multiclass(probs: np.ndarray, ids: Optional[Sequence[int]] = None) -> np.ndarray:
    """Upstream ``merge_multiclass_masks``: (N, ...) probabilities -> int64 labels (0 = background)."""
    labels = merge(probs)[0]
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


def _names(value: Any) -> list[str]:
    """A recognition option naming targets: a list of names, or one name as a string (not its letters)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


class V2Recognizer(Recognizer):
    """Per slice batch: NMS over all targets, merge to one label per voxel; instance split at the end."""

    OPTIONS = ("targets", "instances", "iou_threshold", "existence_threshold", "compat_upstream",
               "expand_distance", "sentences")

    def __init__(self, modality: str, site: Optional[str], default_threshold: float, compat_default: bool,
                 **options: Any) -> None:
        from .spec import TARGETS, prompt_sentence

        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise UsageError(f"Unknown recognition option(s) {unknown} for BiomedParse v2; it takes "
                             f"{', '.join(self.OPTIONS)}.")
        names = _names(options.get("targets")) or list(TARGETS.get(modality, ()))
        if not names or not all(isinstance(t, str) and t.strip() for t in names):
            raise UsageError(f"BiomedParse v2 has no targets for {modality}; pass targets=[...] (target names).")
        names = [" ".join(t.split()) for t in names]
        inst = options.get("instances", False)
        self.instance_targets = set(names) if inst is True else set(_names(inst))
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
        labels, best = merge(probs, keep)
        win = np.where(labels > 0, best, 0)
        edge = None
        if edges is not None:
            if self.compat:
                edge = merge_multiclass(postprocess(edges, existence, self.threshold, self.iou, compat=True)) > 0
            else:
                edge = np.zeros(labels.shape, bool)
                for n in range(len(edges)):
                    edge |= (labels == n + 1) & (edges[n] > 0.5)
        scores = np.where(keep, existence, np.nan)
        return SliceLabels(labels.astype(np.int32), win.astype(np.float32), scores, edge)

    def instances(self, labels: np.ndarray, edges: Optional[np.ndarray]) -> dict[int, np.ndarray]:
        if not self.instance_targets or edges is None:
            return {}
        idx = [n for n, t in enumerate(self.names) if t in self.instance_targets]
        if self.compat:
            everything = split_instances_upstream(labels, edges.astype(np.int64), self.distance)
            return {n: np.where(labels == n + 1, everything, 0).astype(np.int32) for n in idx}
        return {n: split_instances(labels == n + 1, edges, self.distance) for n in idx}
