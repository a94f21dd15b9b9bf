"""SAT's preprocessing (zhaoziheng/SAT ``data/inference_dataset.py`` ``load_image`` + ``Normalization``)
on a canonical Volume, and its exact inverse for probability maps. Numpy only.

Upstream runs MONAI ``Orientationd("RAS")`` -> ``Spacingd(pixdim=(1, 1, 3), bilinear)`` ->
``CropForegroundd(image > 0)`` -> CT: clip [-500, 1000], MR/PET: clip to the 0.5/99.5th
percentiles; then z-score over the whole cropped volume. Here:

1. Orientation: the canonical array (closest LPS, ``[k, j, i]``) is put in RAS index order
   ``(x, y, z)`` = (i reversed, j reversed, k): a permutation and flips, no resampling.
2. Spacing: MONAI keeps the origin and rotation and resamples every axis independently
   (``x_in = o * new_spacing / spacing``, shape ``round((n - 1) * spacing / new_spacing + 1)``,
   bilinear, border padding, in float64, result cast to float32); an axis whose spacing is within 1e-3 mm of the target keeps
   it. A separable linear interpolation is the same trilinear interpolation (see ``resample_axis``).
3. Crop to the bounding box of ``image > 0``; 4. normalisation, both as upstream.

``SATGeometry`` records the shapes, scales and crop box, so that ``to_canonical`` maps a map on
the SAT grid back onto the canonical grid: un-crop (zeros outside the box), linear resampling to
the original spacing, orientation back. Upstream stops at the SAT grid (issue #26).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ...errors import InputError

TARGET_SPACING = (1.0, 1.0, 3.0)  # (x, y, z) mm, upstream Spacingd pixdim
CT_WINDOW = (-500.0, 1000.0)
PERCENTILES = (0.5, 99.5)
AFFINE_TOL = 1e-3  # MONAI: keep the original spacing when it is this close to the target


def canonical_to_ras(canonical: np.ndarray) -> np.ndarray:
    """Canonical ``[k(S), j(P), i(L)]`` -> RAS index order ``(x(R), y(A), z(S))`` (a view)."""
    return canonical.transpose(2, 1, 0)[::-1, ::-1, :]


def ras_to_canonical(ras: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 1, 0))


def axis_weights(n_in: int, n_out: int, scale: float):
    """``(i0, i1, w)`` of linear interpolation at ``x = o * scale`` (o = 0..n_out-1), coordinates
    clamped to [0, n_in - 1] (grid_sample's border padding); w float64."""
    x = np.clip(np.arange(n_out, dtype=np.float64) * scale, 0.0, n_in - 1)
    i0 = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
    return i0, np.minimum(i0 + 1, n_in - 1), x - i0


def lerp_axis(a: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, w: np.ndarray,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """``a[i0] * (1 - w) + a[i1] * w`` along ``axis`` (w cast to a's float dtype), computed in place
    (in ``out``, a float array or view of the result's shape, when given)."""
    w = w.astype(a.dtype if a.dtype.kind == "f" else np.float64)
    shape = [1] * a.ndim
    shape[axis] = len(w)
    w = w.reshape(shape)
    if out is None:
        out = np.take(a, i0, axis=axis)
    else:
        np.take(a, i0, axis=axis, out=out, mode="clip")  # indices are in range; "clip" avoids a buffered copy
    out *= 1 - w
    hi = np.take(a, i1, axis=axis)
    hi *= w
    out += hi
    return out


def resample_axis(a: np.ndarray, axis: int, n_out: int, scale: float) -> np.ndarray:
    """Linear interpolation along one axis at ``x = o * scale`` (o = 0..n_out-1), coordinates
    clamped to [0, n-1] (grid_sample's border padding). Applied to every axis in turn this is
    exactly trilinear interpolation on an axis-aligned grid."""
    n_in = a.shape[axis]
    if n_out == n_in and scale == 1.0:
        return a
    return lerp_axis(a, axis, *axis_weights(n_in, n_out, scale))


def support(i0: np.ndarray, i1: np.ndarray, lo: int, hi: int) -> Tuple[int, int]:
    """Output range ``[a, b)`` outside which both source indices fall outside ``[lo, hi)`` (a map that is
    zero outside [lo, hi) interpolates to exactly zero there); (0, 0) when empty."""
    inside = np.nonzero(((i0 >= lo) & (i0 < hi)) | ((i1 >= lo) & (i1 < hi)))[0]
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)


@dataclass(frozen=True)
class SATGeometry:
    """Where the SAT grid lies relative to the canonical grid."""

    ras_shape: Tuple[int, int, int]  # RAS-ordered input (x, y, z) = canonical (i, j, k) sizes
    ras_spacing: Tuple[float, float, float]
    spacing: Tuple[float, float, float]  # the SAT grid's spacing (target, or original when within 1e-3)
    resampled_shape: Tuple[int, int, int]
    start: Tuple[int, int, int]  # crop box in the resampled grid
    stop: Tuple[int, int, int]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Shape of the SAT grid (the cropped, resampled RAS array), (x, y, z)."""
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def scale(self) -> Tuple[float, ...]:
        """Input (RAS) index per resampled index, per axis."""
        return tuple(n / s for n, s in zip(self.spacing, self.ras_spacing))

    def sat_to_canonical_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous SAT-grid indices (N, 3) in (x, y, z) -> canonical continuous (i, j, k)."""
        p = (np.asarray(xyz, float) + np.array(self.start)) * np.array(self.scale)
        i = self.ras_shape[0] - 1 - p[:, 0]
        j = self.ras_shape[1] - 1 - p[:, 1]
        return np.stack([i, j, p[:, 2]], axis=1)

    def to_canonical(self, sat_map: np.ndarray) -> np.ndarray:
        """A float map on the SAT grid -> the canonical grid ``[k, j, i]`` (float32): zeros outside
        the crop, linear interpolation back to the input spacing, orientation undone.

        Only the part of the canonical grid whose interpolation reads the crop box is computed (the
        rest is exactly 0), and the (small) cropped map is put in canonical order first, so the
        output needs no transposed copy; the arithmetic is that of ``resample_axis`` on the
        un-cropped map (the most shrinking axis first)."""
        self._check(sat_map)
        out = np.zeros(self.ras_shape[::-1], np.float32)
        plan = self._plan((0, 0, 0), self.shape)
        if plan is not None:
            self._render(sat_map, plan, out[plan[2]])
        return out

    def mask_to_canonical(self, sat_map: np.ndarray, threshold: float) -> np.ndarray:
        """``to_canonical(sat_map) >= threshold`` (``> 0`` for a threshold <= 0) as uint8, computed only
        where the interpolation reads a SAT voxel that can reach the threshold: the box of voxels
        ``>= threshold * (1 - 1e-5)`` (a linear interpolation of float32 values below that bound stays
        below the threshold: its rounding error is < 1e-6 relative). Inside that part the values are
        computed exactly as ``to_canonical`` does, so the mask is the same, bit for bit."""
        self._check(sat_map)
        out = np.zeros(self.ras_shape[::-1], np.uint8)
        hot = sat_map > 0 if threshold <= 0 else sat_map >= np.float32(threshold * (1 - 1e-5))
        plan = self._plan(*_box(hot)) if hot.any() else None
        if plan is not None:
            values = self._render(sat_map, plan)
            out[plan[2]] = values >= threshold if threshold > 0 else values > 0
        return out

    def _check(self, sat_map: np.ndarray) -> None:
        if tuple(sat_map.shape) != self.shape:
            raise ValueError(f"map of shape {sat_map.shape} is not on the SAT grid {self.shape}")

    def _plan(self, lo, hi):
        """The interpolation restricted to the canonical voxels that read SAT voxels in the box ``[lo, hi)``
        (SAT-grid (x, y, z) indices): per RAS axis ``(i0, i1, w, source slice)`` into the crop padded with one
        0 either side (reads further outside the crop read that 0), the axis order (the most shrinking first)
        and the canonical ``[k, j, i]`` output region; None when no canonical voxel reads the box."""
        axes, region = [], [slice(0, 0)] * 3
        for ax in range(3):  # RAS axis x, y, z = canonical axis 2, 1, 0 (x and y reversed)
            n_out = self.ras_shape[ax]
            i0, i1, w = axis_weights(self.resampled_shape[ax], n_out, 1.0 / self.scale[ax])
            o0, o1 = support(i0, i1, self.start[ax] + lo[ax], self.start[ax] + hi[ax])
            if o1 == o0:
                return None
            n_src = self.stop[ax] - self.start[ax] + 2
            i0, i1, w = i0[o0:o1] - self.start[ax] + 1, i1[o0:o1] - self.start[ax] + 1, w[o0:o1]
            i0, i1 = np.clip(i0, 0, n_src - 1), np.clip(i1, 0, n_src - 1)
            s0, s1 = int(min(i0.min(), i1.min())), int(max(i0.max(), i1.max())) + 1
            i0, i1 = i0 - s0, i1 - s0
            if ax < 2:  # canonical index = n - 1 - RAS index
                i0, i1, w, (o0, o1) = i0[::-1], i1[::-1], w[::-1], (n_out - o1, n_out - o0)
            axes.append((i0, i1, w, slice(s0, s1)))
            region[2 - ax] = slice(o0, o1)
        order = sorted(range(3), key=lambda x: self.ras_shape[x] / self.resampled_shape[x])  # shrinking first
        return axes, order, tuple(region)

    def _source(self, sat_map: np.ndarray, plan) -> np.ndarray:
        """The plan's slice of the padded crop, in canonical memory order ``[z, y, x]`` (one transposing copy of
        the small SAT map: every take then writes in memory order; gathering into another order is several
        times slower)."""
        src = [a[3] for a in plan[0]]  # slices of the padded crop, per RAS axis
        a = np.zeros([s.stop - s.start for s in src][::-1], sat_map.dtype)
        inner = tuple(slice(max(s.start, 1), min(s.stop, n + 1)) for s, n in zip(src, self.shape))
        a[tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inner, src))[::-1]] = \
            sat_map[tuple(slice(i.start - 1, i.stop - 1) for i in inner)].transpose(2, 1, 0)
        return a

    def _render(self, sat_map: np.ndarray, plan, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The planned region's values (float32, canonical order), written into ``out`` when given."""
        axes, order, _ = plan
        a = self._source(np.asarray(sat_map, np.float32), plan)
        for ax in order:  # the last axis is interpolated straight into the output
            a = lerp_axis(a, 2 - ax, *axes[ax][:3], out=out if ax == order[-1] else None)
        return a


def sat_spacing(ras_spacing, target=TARGET_SPACING) -> Tuple[float, float, float]:
    return tuple(s if abs(s - t) <= AFFINE_TOL else float(t) for s, t in zip(ras_spacing, target))  # type: ignore


def normalize(arr: np.ndarray, modality: str) -> np.ndarray:
    """Upstream ``Normalization``: CT clip [-500, 1000], other modalities clip to the 0.5/99.5th
    percentiles; then (x - mean) / std over the whole array."""
    if modality.upper() == "CT":
        lo, hi = CT_WINDOW
    else:
        lo, hi = np.percentile(arr, PERCENTILES[0]), np.percentile(arr, PERCENTILES[1])
    arr = np.clip(arr, lo, hi)
    std = np.std(arr)
    if not std > 0:
        raise InputError("The image is constant inside its foreground: nothing to segment.")
    return (arr - np.mean(arr)) / std


def preprocess(canonical: np.ndarray, spacing_ijk, modality: str, target=TARGET_SPACING) -> Tuple[np.ndarray, SATGeometry]:
    """Canonical array ``[k, j, i]`` with spacing (i, j, k) -> (SAT image (x, y, z) float32, geometry).

    Only the part of the resampled grid that can be > 0 is computed (a linear interpolation of
    values <= 0 is <= 0, so the foreground box lies where the interpolation reads the box of input
    voxels > 0); the values there are those of resampling the whole image (``resample_axis``, the most
    shrinking axis first)."""
    ras = canonical_to_ras(np.asarray(canonical))
    ras_spacing = tuple(float(s) for s in spacing_ijk)
    new_spacing = sat_spacing(ras_spacing, target)
    shape = tuple(int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(ras.shape, ras_spacing, new_spacing))
    positive = ras > 0
    if not positive.any():
        raise InputError("The image has no voxel above 0: SAT crops to the foreground (image > 0) and found none.")
    lo, hi = _box(positive)
    del positive
    plan, src, out0 = [], [], []
    for ax in range(3):
        if shape[ax] == ras.shape[ax] and new_spacing[ax] == ras_spacing[ax]:  # resample_axis: unchanged
            plan.append(None)
            src.append(slice(lo[ax], hi[ax]))
            out0.append(lo[ax])
            continue
        i0, i1, w = axis_weights(ras.shape[ax], shape[ax], new_spacing[ax] / ras_spacing[ax])
        o0, o1 = support(i0, i1, lo[ax], hi[ax])
        i0, i1, w = i0[o0:o1], i1[o0:o1], w[o0:o1]
        s0 = int(i0.min())
        plan.append((i0 - s0, i1 - s0, w))
        src.append(slice(s0, int(i1.max()) + 1))
        out0.append(o0)
    part = ras[tuple(src)]  # LoadImage: float32; MONAI resamples in float64
    exact = part.dtype == np.float32 or (part.dtype.kind in "iub" and part.dtype.itemsize <= 2)  # float32 is a no-op
    part = part.astype(np.float64) if exact else part.astype(np.float32).astype(np.float64)
    # interpolate in the array's memory order ([z, y, x] for the usual slice-by-slice storage): each take then
    # writes in that order too, instead of gathering into (x, y, z) order (a transposing copy: 5-10x slower)
    mem = part.transpose(2, 1, 0)
    for ax in sorted(range(3), key=lambda x: shape[x] / ras.shape[x]):  # the most shrinking axis first (faster)
        if plan[ax] is not None:
            mem = lerp_axis(mem, 2 - ax, *plan[ax])
    part = mem.transpose(2, 1, 0).astype(np.float32)  # upstream's resampled MetaTensor keeps the input's float32
    fg = part > 0
    if not fg.any():
        raise InputError("The image has no voxel above 0: SAT crops to the foreground (image > 0) and found none.")
    a, b = _box(fg)
    start = tuple(o + x for o, x in zip(out0, a))
    stop = tuple(o + x for o, x in zip(out0, b))
    geo = SATGeometry(tuple(int(n) for n in np.asarray(canonical).shape[::-1]), ras_spacing, new_spacing,  # type: ignore[arg-type]
                      shape, start, stop)  # type: ignore[arg-type]
    crop = np.ascontiguousarray(part[tuple(slice(x, y) for x, y in zip(a, b))])
    return normalize(crop, modality), geo


def _box(mask: np.ndarray) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Bounding box ``[start, stop)`` per axis of a non-empty boolean array."""
    start, stop = [], []
    for ax in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0]
        start.append(int(idx[0]))
        stop.append(int(idx[-1]) + 1)
    return tuple(start), tuple(stop)
