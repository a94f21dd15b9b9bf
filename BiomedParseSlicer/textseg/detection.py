"""Detection: a 3D bounding box and centroid per object, in physical (LPS, mm) coordinates.

``detect_objects(volume, mask, label)`` describes a result's mask as one object; with an instance label map
(``instances``: 0 = background, n = instance n, e.g. BiomedParse v2's edge-query split) one object per
instance. Each object is a JSON-able dict:

* ``label``: the result's name (instances: "<name> <n>"), ``instance``: n (instances only);
* ``voxel_count``;
* ``bbox_min`` / ``bbox_max``: the axis-aligned LPS box (mm) of the object's voxel *centres*, exact for any
  direction matrix (flipped, permuted or oblique): the extremes are taken over the voxels themselves;
* ``centroid``: the mean LPS position (mm) of the voxel centres;
* ``index_min`` / ``index_max``: the (i, j, k) index box on the input grid (inclusive).

The volume gives the geometry (``Volume.ijk_to_lps``); the mask is on its grid (array order k, j, i).
Work is done in slabs of slices, so memory stays small for large masks.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .volume import Volume, mask_bounds

SLAB = 8  # slices per pass


def detect_objects(volume: Volume, mask: np.ndarray, label: str,
                   instances: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
    """One dict per object (see the module docstring); an empty mask gives []."""
    labels = np.asarray(instances if instances is not None else mask)
    if labels.shape != tuple(volume.shape[:3]):
        raise ValueError(f"mask shape {labels.shape} is not the volume's grid {tuple(volume.shape[:3])}")
    m = volume.ijk_to_lps
    a, origin = m[:3, :3], m[:3, 3]
    if instances is None:
        return _whole(volume, labels != 0, label)
    n = int(labels.max()) if labels.size else 0
    if n <= 0:
        return []
    count = np.zeros(n + 1, np.int64)
    sums = np.zeros((n + 1, 3))
    lo, hi = np.full((n + 1, 3), np.inf), np.full((n + 1, 3), -np.inf)
    ilo, ihi = np.full((n + 1, 3), np.iinfo(np.int64).max), np.full((n + 1, 3), -1)
    for k0 in range(0, labels.shape[0], SLAB):
        slab = labels[k0:k0 + SLAB]
        kk, jj, ii = np.nonzero(slab)
        if not len(kk):
            continue
        ids = slab[kk, jj, ii].astype(np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        ijk = np.stack([ii[order], jj[order], kk[order] + k0], 1)
        uniq, start = np.unique(ids, return_index=True)
        pts = ijk @ a.T  # origin added at the end: exact extremes, fewer rounding steps
        count[uniq] += np.diff(np.append(start, len(ids)))
        sums[uniq] += np.add.reduceat(ijk.astype(np.float64), start, axis=0)
        lo[uniq] = np.minimum(lo[uniq], np.minimum.reduceat(pts, start, axis=0))
        hi[uniq] = np.maximum(hi[uniq], np.maximum.reduceat(pts, start, axis=0))
        ilo[uniq] = np.minimum(ilo[uniq], np.minimum.reduceat(ijk, start, axis=0))
        ihi[uniq] = np.maximum(ihi[uniq], np.maximum.reduceat(ijk, start, axis=0))
    return [_object(f"{label} {i}", i, count[i], lo[i] + origin, hi[i] + origin, sums[i], ilo[i], ihi[i], a, origin)
            for i in range(1, n + 1) if count[i]]


def _object(label, instance, count, lo, hi, sums, ilo, ihi, a, origin) -> dict[str, Any]:
    """``lo``/``hi``: the LPS box (mm); ``sums``: index sums (mean position = a @ sums / count + origin)."""
    obj: dict[str, Any] = {"label": label}
    if instance is not None:
        obj["instance"] = int(instance)
    obj.update({
        "voxel_count": int(count),
        "bbox_min": [float(v) for v in lo],
        "bbox_max": [float(v) for v in hi],
        "centroid": [float(v) for v in a @ (sums / count) + origin],
        "index_min": [int(v) for v in ilo],
        "index_max": [int(v) for v in ihi],
    })
    return obj


def _whole(volume: Volume, mask: np.ndarray, label: str) -> list[dict[str, Any]]:
    """One object: counts and index sums from the three projections of the mask's index box
    (``volume.mask_bounds``); the physical box from the index box's corners when every LPS axis depends on one
    index axis (any flip/permutation), else from the voxels."""
    bounds = mask_bounds(mask)
    if bounds is None:
        return []
    m = volume.ijk_to_lps
    a, origin = m[:3, :3], m[:3, 3]
    ilo, ihi = bounds[0][::-1], bounds[1][::-1]  # (i, j, k)
    box = mask[ilo[2]:ihi[2] + 1, ilo[1]:ihi[1] + 1, ilo[0]:ihi[0] + 1]
    proj = [box.sum(axis=(0, 1), dtype=np.int64), box.sum(axis=(0, 2), dtype=np.int64),
            box.sum(axis=(1, 2), dtype=np.int64)]  # along i, j, k
    count = int(proj[0].sum())
    sums = np.array([float(np.dot(np.arange(o, o + len(p), dtype=np.int64), p)) for o, p in zip(ilo, proj)])
    if (np.count_nonzero(a, axis=1) <= 1).all():
        lo, hi = volume.box_to_physical(ilo, ihi)
    else:
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for k0 in range(ilo[2], ihi[2] + 1, SLAB):
            kk, jj, ii = np.nonzero(mask[k0:k0 + SLAB])
            if len(kk):
                pts = np.stack([ii, jj, kk + k0], 1) @ a.T
                lo, hi = np.minimum(lo, pts.min(0)), np.maximum(hi, pts.max(0))
        lo, hi = lo + origin, hi + origin  # added once: exact extremes, fewer rounding steps
    return [_object(label, None, count, lo, hi, sums, ilo, ihi, a, origin)]
