"""SAT's preprocessing (zhaoziheng/SAT ``data/inference_dataset.py`` ``load_image`` + ``Normalization``)
on a canonical Volume, and its exact inverse for probability maps. Numpy (+ nibabel's orientation helpers,
scipy for the compatibility setting's sampling).

Upstream runs MONAI 1.1 ``Orientationd("RAS")`` -> ``Spacingd(pixdim=(1, 1, 3), bilinear)`` ->
``CropForegroundd(image > 0)`` -> CT: clip [-500, 1000], MR/PET: clip to the 0.5/99.5th
percentiles; then z-score over the whole cropped volume. Here:

1. The grid (``upstream_grid``, header only): MONAI 1.1's own float path on the NIfTI affine, reproduced
   operation by operation: nibabel's ``io_orientation`` to RAS, the reoriented affine stored as float32
   (MONAI's ``Orientation`` does), ``zoom_affine`` (rotation kept, by a Cholesky factorisation), and
   ``compute_shape_offset``: shape ``round(extent + 1)`` of the input's corners in the output frame
   (half-voxel ties are decided by float noise, e.g. 100 or 101 slices for 200 x 1.5 mm), and the first
   input corner that is the output's minimum within 1e-8 mm as voxel 0 -- or, when no corner passes
   that test (float32 headers of tilted / oblique images), the output centred on the input (voxel 0 at
   input index ``(n - m t / s) / 2``, up to half an output voxel away from the corner). An axis whose
   spacing is within 1e-3 mm of the target keeps it; a grid within 1e-3 of the input is not resampled.
   The affine is the file's own header when the Volume was read from a NIfTI file
   (``metadata['nifti_affine']``), else the float32 affine ITK would write for the Volume.
2. Resampling onto that grid (trilinear, border clamping, float64, result float32): the default samples
   each input axis on its own (``x = offset + o * scale`` per axis: the grid's spacing, shape and voxel 0
   are upstream's; the residual rotation of upstream's output frame, <= 1e-7 rad from the float32 header,
   is dropped, so the grid is exactly the input's axes scaled and ``SATGeometry.to_canonical`` is its
   exact inverse); ``compat=True`` samples at upstream's exact positions (its 3x4 sampling matrix, scipy's
   ``affine_transform``, order 1, edge clamping): the image is upstream's bit for bit.
3. Crop to the bounding box of ``image > 0``; 4. normalisation, both as upstream.

``SATGeometry`` records the scales, offsets, shapes and crop box, so that ``to_canonical`` maps a map on
the SAT grid back onto the canonical grid: un-crop (zeros outside the box), linear resampling to the
input grid, orientation back. Upstream stops at the SAT grid (issue #26).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from ...errors import InputError
from ...volume import canonical_ras_index, canonical_to_ras, mask_bounds
from ...volume import ras_to_canonical as ras_to_canonical  # this module's API: the way back from RAS order

TARGET_SPACING = (1.0, 1.0, 3.0)  # (x, y, z) mm, upstream Spacingd pixdim
CT_WINDOW = (-500.0, 1000.0)
PERCENTILES = (0.5, 99.5)
AFFINE_TOL = 1e-3  # MONAI: keep the original spacing when it is this close to the target; skip resampling


def as_stored(affine) -> np.ndarray:
    """The affine as a NIfTI header (or MONAI's ``Orientation``) stores it: float32 values, as float64."""
    return np.asarray(affine, np.float64).astype(np.float32).astype(np.float64)


@dataclass(frozen=True, eq=False)
class SATGrid:
    """Upstream's SAT grid of an image: what MONAI 1.1's ``Orientationd("RAS")`` + ``Spacingd((1, 1, 3))``
    compute from the affine and shape alone. Indices are of upstream's RAS-ordered array (x, y, z)."""

    ras_shape: tuple[int, int, int]  # the RAS-ordered input's shape
    ras_affine: np.ndarray  # 4x4: its affine after the orientation step (float32 values)
    spacing: tuple[float, float, float]  # the output spacing (target, or the input's within 1e-3 mm)
    shape: tuple[int, int, int]  # the resampled shape (before the foreground crop)
    affine: np.ndarray  # 4x4: resampled voxel -> RAS mm (upstream's output affine)
    matrix: np.ndarray  # 3x4: resampled voxel -> RAS-ordered input index (upstream's sampling transform)
    centred: bool  # no input corner passed upstream's corner test: the output is centred on the input
    resampled: bool  # False: within 1e-3 of the input grid, upstream keeps the image as it is
    ornt: np.ndarray  # nibabel orientation transform: input axis -> (RAS axis, +1 / -1)
    source: str = ""  # where the affine came from: "NIfTI header" or "volume geometry"

    @property
    def scale(self) -> tuple[float, float, float]:
        """Input (RAS-ordered) index per resampled index along each axis (the sampling matrix's diagonal)."""
        return tuple(float(self.matrix[a, a]) for a in range(3)) if self.resampled else (1.0, 1.0, 1.0)  # type: ignore

    @property
    def offset(self) -> tuple[float, float, float]:
        """Input (RAS-ordered) index of resampled voxel 0 along each axis: 0 when upstream anchors a corner."""
        return tuple(float(x) for x in self.matrix[:, 3]) if self.resampled else (0.0, 0.0, 0.0)  # type: ignore


def upstream_grid(affine, shape, target=TARGET_SPACING) -> SATGrid:
    """Upstream's grid for a NIfTI ``affine`` (RAS, as nibabel reads the header) and ``shape`` (i, j, k), by
    MONAI 1.1's float operations in their order (``Orientation``, ``Spacing``, ``zoom_affine``,
    ``compute_shape_offset``, ``SpatialResample``'s identity test); the result is bit-equal to MONAI's."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    a0 = np.asarray(affine, np.float64)
    shape = tuple(int(n) for n in shape)
    ornt = ornt_transform(io_orientation(a0), axcodes2ornt("RAS"))
    a1 = as_stored(a0 @ inv_ornt_aff(ornt, shape))  # Orientation stores its affine as float32
    ras_shape = [0, 0, 0]
    for i, (ax, _) in enumerate(ornt):
        ras_shape[int(ax)] = shape[i]
    return _spacing_grid(a1, tuple(ras_shape), target, ornt)  # type: ignore[arg-type]


def _spacing_grid(a1: np.ndarray, ras_shape: tuple[int, int, int], target, ornt, source: str = "") -> SATGrid:
    """MONAI 1.1 ``Spacing`` on an already RAS-ordered image with affine ``a1``."""
    orig = np.sqrt(np.sum(a1[:3, :3] * a1[:3, :3], axis=0))
    orig[orig == 0] = 1.0
    out_d = np.array(target, np.float64)
    out_d = np.where((out_d - AFFINE_TOL <= orig) & (orig <= out_d + AFFINE_TOL), orig, out_d)
    try:  # zoom_affine(a1, out_d, diagonal=False): the rotation is kept, shears are dropped
        rzs = a1[:3, :3]
        zs = np.linalg.cholesky(rzs.T @ rzs).T
        rotation = rzs @ np.linalg.inv(zs)
    except np.linalg.LinAlgError:
        raise InputError("The image's direction matrix is degenerate (its axes are not independent): fix the image "
                         "header.") from None
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(out_d))
    # compute_shape_offset(shape, a1, out, scale_extent=False)
    sh = np.array(ras_shape, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in sh], indexing="ij")).reshape((3, -1))
    corners = a1 @ np.concatenate((corners, np.ones_like(corners[:1])))
    inv_mat = np.linalg.inv(out)
    corners_out = inv_mat @ corners
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)  # ties: half to even, decided by float noise
    all_dist = inv_mat[:-1, :-1] @ corners[:-1, :]
    offset = None
    for i in range(corners.shape[1]):  # the input corner that maps to the output's minimum (atol 1e-8)
        if np.allclose(np.min(all_dist - all_dist[:, i:i + 1], 1), 0.0, rtol=AFFINE_TOL):
            offset = corners[:-1, i]
            break
    centred = offset is None
    if centred:
        offset = a1[:-1, :-1] @ (sh / 2.0) + a1[:-1, -1] - out[:-1, :-1] @ (out_shape / 2.0)
    out[:3, 3] = offset
    shape = tuple(int(n) for n in out_shape)
    matrix = np.linalg.solve(a1, out)
    # SpatialResample returns the image unchanged when the grid is the input's within 1e-3
    resampled = not (shape == tuple(ras_shape) and (np.allclose(a1, out, atol=AFFINE_TOL)
                                                    or np.allclose(matrix, np.eye(4), atol=AFFINE_TOL)))
    if not resampled:
        out, matrix = a1.copy(), np.eye(4)
    return SATGrid(tuple(ras_shape), a1, tuple(float(x) for x in out_d), shape, out, matrix[:3],
                   centred,  # type: ignore
                   resampled, np.asarray(ornt), source)


def _index_map(affine: np.ndarray, canonical: np.ndarray, shape_ijk) -> Optional[np.ndarray]:
    """4x4 integer map canonical index -> index of the grid ``affine`` describes, when that grid is the canonical
    one with its axes permuted / reversed (within 1e-4 in direction and 1e-3 voxel in position); else None."""
    try:
        m = np.linalg.solve(affine, canonical)
    except np.linalg.LinAlgError:
        return None
    r = np.rint(m)
    rot = r[:3, :3]
    if (np.abs(m[:3, :3] - rot).max() > 1e-4 or np.abs(m[:3, 3] - r[:3, 3]).max() > 1e-3
            or not (np.abs(rot).sum(0) == 1).all() or not (np.abs(rot).sum(1) == 1).all()):
        return None
    for e in range(3):  # an axis runs over the same voxels: from 0 (kept) or from n - 1 (reversed)
        d = int(np.nonzero(rot[e])[0][0])
        if r[e, 3] != (0 if rot[e, d] > 0 else shape_ijk[d] - 1):
            return None
    r[3] = (0, 0, 0, 1)
    return r


def sat_grid(volume: Any, target=TARGET_SPACING) -> SATGrid:
    """Upstream's grid of a canonical Volume (what ``Predictor`` hands adapters): from the NIfTI header the
    image was read from (``metadata['nifti_affine']``, kept by ``textseg.formats.images``) when it describes this
    volume,
    else from the float32 rounding of the geometry of the volume the canonical one was made from (the header
    nibabel would write for it; ``metadata['input_ijk_to_ras']``, kept by ``Volume.canonical``; the volume
    itself when absent). The input's axis order matters: upstream reorients, then rounds to float32."""
    from nibabel.orientations import inv_ornt_aff

    c, size = volume.ijk_to_ras, tuple(int(n) for n in volume.size)
    standard = canonical_ras_index(size)  # RAS-ordered index -> canonical index
    candidates = [(volume.metadata.get("nifti_affine"), "NIfTI header", False),
                  (volume.metadata.get("input_ijk_to_ras"), "volume geometry", True), (c, "volume geometry", True)]
    for aff, source, rounded in candidates:
        if aff is None:
            continue
        aff = as_stored(aff) if rounded else np.asarray(aff, np.float64)
        m = _index_map(aff, c, size)
        if m is None:
            continue
        in_shape = tuple(size[int(np.nonzero(m[e, :3])[0][0])] for e in range(3))
        grid = upstream_grid(aff, in_shape, target)
        if np.array_equal(np.linalg.inv(m) @ inv_ornt_aff(grid.ornt, in_shape), standard):
            return replace(grid, source=source)
    # upstream's orientation (nibabel's, input axis by input axis) would order this image's axes otherwise than
    # our closest-LPS one (possible only for rotations of about 45 degrees; none found in 20000 random ones):
    # keep ours, with the float32 affine of the RAS-ordered array
    ras_shape = (size[0], size[1], size[2])
    return _spacing_grid(as_stored(c @ standard), ras_shape, target, np.array([[0, 1], [1, 1], [2, 1]]),
                         "volume geometry (closest-LPS axis order)")


def axis_weights(n_in: int, n_out: int, scale: float, offset: float = 0.0):
    """``(i0, i1, w)`` of linear interpolation at ``x = o * scale + offset`` (o = 0..n_out-1), coordinates
    clamped to [0, n_in - 1] (grid_sample's border padding); w float64."""
    x = np.clip(np.arange(n_out, dtype=np.float64) * scale + offset, 0.0, n_in - 1)
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


def resample_axis(a: np.ndarray, axis: int, n_out: int, scale: float, offset: float = 0.0) -> np.ndarray:
    """Linear interpolation along one axis at ``x = o * scale + offset`` (o = 0..n_out-1), coordinates
    clamped to [0, n-1] (grid_sample's border padding). Applied to every axis in turn this is
    exactly trilinear interpolation on a grid whose axes are the input's."""
    n_in = a.shape[axis]
    if n_out == n_in and scale == 1.0 and offset == 0.0:
        return a
    return lerp_axis(a, axis, *axis_weights(n_in, n_out, scale, offset))


def support(i0: np.ndarray, i1: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Output range ``[a, b)`` outside which both source indices fall outside ``[lo, hi)`` (a map that is
    zero outside [lo, hi) interpolates to exactly zero there); (0, 0) when empty."""
    inside = np.nonzero(((i0 >= lo) & (i0 < hi)) | ((i1 >= lo) & (i1 < hi)))[0]
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)


@dataclass(frozen=True)
class SATGeometry:
    """Where the SAT grid lies relative to the canonical grid."""

    ras_shape: tuple[int, int, int]  # RAS-ordered input (x, y, z) = canonical (i, j, k) sizes
    spacing: tuple[float, float, float]  # the SAT grid's spacing (target, or original when within 1e-3)
    resampled_shape: tuple[int, int, int]
    start: tuple[int, int, int]  # crop box in the resampled grid
    stop: tuple[int, int, int]
    scale: tuple[float, float, float]  # input (RAS-ordered) index per resampled index, per axis
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # input index of resampled voxel 0, per axis

    @classmethod
    def from_grid(cls, grid: SATGrid, canonical_shape, start=(0, 0, 0), stop=None) -> SATGeometry:
        """The geometry of ``grid`` on a canonical array of ``canonical_shape`` ([k, j, i]); crop box
        ``[start, stop)`` (default: none)."""
        return cls(tuple(int(n) for n in canonical_shape[::-1]), grid.spacing, grid.shape, tuple(start),  # type: ignore
                   tuple(grid.shape if stop is None else stop), grid.scale, grid.offset)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the SAT grid (the cropped, resampled RAS array), (x, y, z)."""
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def sat_to_canonical_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous SAT-grid indices (N, 3) in (x, y, z) -> canonical continuous (i, j, k)."""
        p = np.array(self.offset) + (np.asarray(xyz, float) + np.array(self.start)) * np.array(self.scale)
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
            i0, i1, w = axis_weights(self.resampled_shape[ax], n_out, 1.0 / self.scale[ax],
                                     -self.offset[ax] / self.scale[ax])
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


def preprocess(volume: Any, modality: str, compat: bool = False, target=TARGET_SPACING) -> tuple[np.ndarray,
                                                                                                 SATGeometry]:
    """Canonical Volume -> (SAT image (x, y, z) float32, geometry) on upstream's grid (``sat_grid``).

    Default: each axis resampled on its own, and only the part of the resampled grid that can be > 0 is
    computed (a linear interpolation of values <= 0 is <= 0, so the foreground box lies where the
    interpolation reads the box of input voxels > 0); the values there are those of resampling the whole
    image (``resample_axis``, the most shrinking axis first). ``compat``: sampled at upstream's exact
    positions (``SATGrid.matrix``), the whole grid, as MONAI does."""
    grid = sat_grid(volume, target)
    ras = canonical_to_ras(np.asarray(volume.array))
    shape = grid.shape
    positive = ras > 0
    if not positive.any():
        raise InputError("The image has no voxel above 0: SAT crops to the foreground (image > 0) and found none.")
    lo, hi = _box(positive)
    del positive
    # LoadImage gives float32; MONAI resamples in float64 (float32 -> float64 is exact)
    if compat and grid.resampled:
        from scipy.ndimage import affine_transform

        part = affine_transform(ras.astype(np.float32), grid.matrix[:, :3], offset=grid.matrix[:, 3],
                                output_shape=shape,
                                output=np.float64, order=1, mode="nearest", prefilter=False).astype(np.float32)
        out0 = [0, 0, 0]
    else:
        part, out0 = _resample_separable(ras, grid, lo, hi)
    fg = part > 0
    if not fg.any():
        raise InputError("The image has no voxel above 0: SAT crops to the foreground (image > 0) and found none.")
    a, b = _box(fg)
    start = tuple(o + x for o, x in zip(out0, a))
    stop = tuple(o + x for o, x in zip(out0, b))
    geo = SATGeometry.from_grid(grid, np.asarray(volume.array).shape, start, stop)
    crop = np.ascontiguousarray(part[tuple(slice(x, y) for x, y in zip(a, b))])
    return normalize(crop, modality), geo


def _resample_separable(ras: np.ndarray, grid: SATGrid, lo, hi):
    """The part of the separably resampled image that reads the input box ``[lo, hi)`` (float32) and where it
    starts in the resampled grid."""
    shape, scale, offset = grid.shape, grid.scale, grid.offset
    plan, src, out0 = [], [], []
    for ax in range(3):
        if shape[ax] == ras.shape[ax] and scale[ax] == 1.0 and offset[ax] == 0.0:  # resample_axis: unchanged
            plan.append(None)
            src.append(slice(lo[ax], hi[ax]))
            out0.append(lo[ax])
            continue
        i0, i1, w = axis_weights(ras.shape[ax], shape[ax], scale[ax], offset[ax])
        o0, o1 = support(i0, i1, lo[ax], hi[ax])
        if o1 == o0:
            raise InputError("The image has no voxel above 0 on SAT's grid: SAT crops to the foreground (image > 0).")
        i0, i1, w = i0[o0:o1], i1[o0:o1], w[o0:o1]
        s0 = int(i0.min())
        plan.append((i0 - s0, i1 - s0, w))
        src.append(slice(s0, int(i1.max()) + 1))
        out0.append(o0)
    part = ras[tuple(src)]
    exact = part.dtype == np.float32 or (part.dtype.kind in "iub" and part.dtype.itemsize <= 2)  # float32 is a no-op
    part = part.astype(np.float64) if exact else part.astype(np.float32).astype(np.float64)
    # interpolate in the array's memory order ([z, y, x] for the usual slice-by-slice storage): each take then
    # writes in that order too, instead of gathering into (x, y, z) order (a transposing copy: 5-10x slower)
    mem = part.transpose(2, 1, 0)
    for ax in sorted(range(3), key=lambda x: shape[x] / ras.shape[x]):  # the most shrinking axis first (faster)
        if plan[ax] is not None:
            mem = lerp_axis(mem, 2 - ax, *plan[ax])
    return mem.transpose(2, 1, 0).astype(np.float32), out0  # upstream's resampled MetaTensor is float32


def _box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box ``[start, stop)`` per axis of a non-empty boolean array."""
    lo, hi = mask_bounds(mask)
    return tuple(int(v) for v in lo), tuple(int(v) + 1 for v in hi)
