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
from typing import Tuple

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


def resample_axis(a: np.ndarray, axis: int, n_out: int, scale: float) -> np.ndarray:
    """Linear interpolation along one axis at ``x = o * scale`` (o = 0..n_out-1), coordinates
    clamped to [0, n-1] (grid_sample's border padding). Applied to every axis in turn this is
    exactly trilinear interpolation on an axis-aligned grid."""
    n_in = a.shape[axis]
    if n_out == n_in and scale == 1.0:
        return a
    x = np.clip(np.arange(n_out, dtype=np.float64) * scale, 0.0, n_in - 1)
    i0 = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (x - i0).astype(a.dtype if a.dtype.kind == "f" else np.float64)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w


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
        the crop, linear interpolation back to the input spacing, orientation undone."""
        if tuple(sat_map.shape) != self.shape:
            raise ValueError(f"map of shape {sat_map.shape} is not on the SAT grid {self.shape}")
        full = np.zeros(self.resampled_shape, np.float32)
        full[tuple(slice(a, b) for a, b in zip(self.start, self.stop))] = sat_map
        # canonical index x of the input sits at x * spacing_in / spacing_sat on the resampled grid
        for ax in range(3):
            full = resample_axis(full, ax, self.ras_shape[ax], 1.0 / self.scale[ax])
        return ras_to_canonical(full.astype(np.float32, copy=False))


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
    """Canonical array ``[k, j, i]`` with spacing (i, j, k) -> (SAT image (x, y, z) float32, geometry)."""
    ras = canonical_to_ras(np.asarray(canonical)).astype(np.float32).astype(np.float64)  # LoadImage: float32
    ras_spacing = tuple(float(s) for s in spacing_ijk)
    new_spacing = sat_spacing(ras_spacing, target)
    shape = tuple(int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(ras.shape, ras_spacing, new_spacing))
    for ax in range(3):
        ras = resample_axis(ras, ax, shape[ax], new_spacing[ax] / ras_spacing[ax])
    ras = ras.astype(np.float32)  # upstream's resampled MetaTensor keeps the input's float32
    fg = ras > 0
    if not fg.any():
        raise InputError("The image has no voxel above 0: SAT crops to the foreground (image > 0) and found none.")
    start, stop = [], []
    for ax in range(3):
        idx = np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        start.append(int(idx[0]))
        stop.append(int(idx[-1]) + 1)
    geo = SATGeometry(tuple(int(n) for n in np.asarray(canonical).shape[::-1]), ras_spacing, new_spacing,  # type: ignore[arg-type]
                      shape, tuple(start), tuple(stop))  # type: ignore[arg-type]
    crop = np.ascontiguousarray(ras[tuple(slice(a, b) for a, b in zip(start, stop))])
    return normalize(crop, modality), geo
