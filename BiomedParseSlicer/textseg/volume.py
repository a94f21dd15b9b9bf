"""The engine's one image type: an array with its geometry.

Axis order, written down once
-----------------------------
``Volume.array`` is indexed ``array[k, j, i]`` (slice, row, column), exactly what SimpleITK's
``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` return. RGB images carry a trailing
channel axis: ``array[k, j, i, c]``. Everything geometric (``spacing``, index vectors, the
columns of ``direction``) is in (i, j, k) order, as in ITK.

Physical space is LPS (ITK/DICOM). ``ijk_to_lps`` and ``ijk_to_ras`` give the 4x4 matrices
mapping a continuous index (i, j, k, 1) to millimetres; RAS is what Slicer uses.

Canonical orientation
---------------------
Models see every image in one orientation: the axis permutation and flips (no resampling,
so it is exact and reversible) that bring the image closest to LPS, i.e. ``i`` runs towards the
patient's left, ``j`` towards posterior and ``k`` towards superior. An axial slice
``array[k]`` then looks like a DICOM axial image in radiological convention (rows anterior to
posterior, columns patient right to left). Oblique images keep their residual rotation in the
direction matrix: an image rotated by less than 45 degrees gives the model the same array as
the unrotated one, so the masks agree voxel for voxel. ``Orientation.to_canonical`` and
``Orientation.from_canonical`` move arrays between the two; every mask the predictor returns is
on exactly the input grid.

Geometry conversions, each written once here
--------------------------------------------
* LPS <-> RAS: ``lps_to_ras`` / ``ras_to_lps`` (points), ``LPS_TO_RAS`` (4x4, its own inverse).
* 4x4 matrix <-> Volume: ``Volume.ijk_to_lps`` / ``Volume.ijk_to_ras`` one way, ``Volume.from_matrix``
  (``split_matrix``: spacing, origin, unit direction) the other, from LPS or RAS.
* geometry dict (JSON: ``spacing``, ``origin``, ``direction`` as a nested 3x3 list) <-> Volume:
  ``Volume.geometry`` / ``Volume.from_geometry``.
* canonical <-> RAS index order, what upstream models built on nibabel/MONAI's ``Orientation("RAS")``
  see: ``canonical_to_ras`` / ``ras_to_canonical`` (arrays), ``canonical_ras_index`` (indices).
* mask bounding boxes: ``mask_bounds`` (index space, inclusive) and ``Volume.box_to_physical``
  (the axis-aligned LPS/RAS box around an index box).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse: also RAS -> LPS
_LPS_RAS_SIGNS = LPS_TO_RAS.diagonal()[:3]
SPACES = ("LPS", "RAS")


def lps_to_ras(points: Any) -> np.ndarray:
    """LPS points (mm; shape (3,) or (N, 3)) as RAS: the first two coordinates change sign."""
    return np.asarray(points, dtype=float) * _LPS_RAS_SIGNS


def ras_to_lps(points: Any) -> np.ndarray:
    """RAS points (mm; shape (3,) or (N, 3)) as LPS: the same sign flip as ``lps_to_ras``."""
    return np.asarray(points, dtype=float) * _LPS_RAS_SIGNS


def _space(space: str) -> str:
    s = str(space).upper()
    if s not in SPACES:
        raise ValueError(f"space must be 'LPS' or 'RAS', not {space!r}")
    return s


def split_matrix(ijk_to_physical: Any, space: str = "LPS") -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """``(spacing, origin, direction)`` in LPS of a 4x4 (or 3x4) index-to-physical matrix in ``space``
    (LPS or RAS): spacing = the lengths of the i, j, k columns, direction = those columns made unit (a zero
    column stays zero; ``Volume`` refuses its spacing), origin = the translation."""
    m = np.asarray(ijk_to_physical, dtype=float)
    if m.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"an index-to-physical matrix is 4x4 (or 3x4); got shape {m.shape}")
    if _space(space) == "RAS":
        m = LPS_TO_RAS[:3, :3] @ m[:3]
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    with np.errstate(invalid="ignore"):  # a non-finite column: callers check the spacing
        direction = axes / np.where(spacing > 0, spacing, 1.0)
    return tuple(float(s) for s in spacing), tuple(float(o) for o in m[:3, 3]), direction


def canonical_to_ras(canonical: np.ndarray) -> np.ndarray:
    """A canonical array ``[k(S), j(P), i(L)]`` in RAS index order ``(x(R), y(A), z(S))``: transposed, x and y
    reversed (a view; upstream models that reorient with nibabel/MONAI to RAS see this array)."""
    return canonical.transpose(2, 1, 0)[::-1, ::-1, :]


def ras_to_canonical(ras: np.ndarray) -> np.ndarray:
    """The inverse of ``canonical_to_ras``: an ``(x, y, z)`` RAS-ordered array as canonical ``[k, j, i]``
    (contiguous)."""
    return np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 1, 0))


def canonical_ras_index(size_ijk: Sequence[int]) -> np.ndarray:
    """4x4 integer map of continuous indices between a canonical grid of ``size_ijk`` (i, j, k) and its
    RAS-ordered array (``canonical_to_ras``): ``x = n_i - 1 - i, y = n_j - 1 - j, z = k``. Its own inverse."""
    m = np.diag([-1.0, -1.0, 1.0, 1.0])
    m[0, 3], m[1, 3] = size_ijk[0] - 1, size_ijk[1] - 1
    return m


def mask_bounds(mask: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Inclusive index bounds ``(lo, hi)`` of a mask's nonzero voxels, one entry per array axis (``(k, j, i)``
    for a volume's mask), or None for an empty mask. The first axis is found over the whole mask, the others
    only in its slab (an organ's box is a small part of a CT)."""
    mask = np.asarray(mask)
    if mask.ndim == 0 or mask.size == 0:
        return None
    rest = tuple(range(1, mask.ndim))
    on0 = np.flatnonzero(mask.any(axis=rest) if rest else mask)
    if not len(on0):
        return None
    slab = mask[on0[0]:on0[-1] + 1]
    lo, hi = [int(on0[0])], [int(on0[-1])]
    for axis in rest:
        on = np.flatnonzero(slab.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(int(on[0]))
        hi.append(int(on[-1]))
    return np.array(lo), np.array(hi)


@dataclass(frozen=True)
class Orientation:
    """An axis permutation + flips taking an array to canonical (closest-LPS) order.

    ``perm[d]`` is the input (i, j, k) axis that becomes canonical axis ``d``; ``flip[d]`` says
    whether that axis is reversed. Identity for an image already stored in LPS order.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @staticmethod
    def from_direction(direction: np.ndarray) -> Orientation:
        """Closest axis-aligned orientation of a direction matrix (columns = i, j, k axes in LPS)."""
        d = np.asarray(direction, dtype=float)
        # Assign each physical axis (L, P, S) the index axis most aligned with it, greedily by
        # largest absolute cosine, so that oblique images pick a consistent permutation.
        perm = [-1, -1, -1]
        used_index, used_phys = set(), set()
        order = np.dstack(np.unravel_index(np.argsort(-np.abs(d), axis=None), d.shape))[0]
        for phys, idx in order:
            if phys in used_phys or idx in used_index:
                continue
            perm[phys] = int(idx)
            used_phys.add(phys)
            used_index.add(idx)
        flip = tuple(bool(d[phys, perm[phys]] < 0) for phys in range(3))
        return Orientation(tuple(perm), flip)  # type: ignore[arg-type]

    # Arrays are stored [k, j, i, (c)]: numpy axis of index axis a is 2 - a.
    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return array
        np_axes = [2 - self.perm[d] for d in (2, 1, 0)]  # canonical array is [k', j', i']
        out = np.transpose(array, np_axes + list(range(3, array.ndim)))
        flips = [2 - d for d in range(3) if self.flip[d]]
        return np.flip(out, axis=flips) if flips else out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return array
        flips = [2 - d for d in range(3) if self.flip[d]]
        out = np.flip(array, axis=flips) if flips else array
        np_axes = [2 - self.perm[d] for d in (2, 1, 0)]
        inverse = list(np.argsort(np_axes)) + list(range(3, array.ndim))
        return np.transpose(out, inverse)

    def onto_grid(self, canonical_array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``from_canonical`` as a contiguous array, checked against the target grid's (k, j, i) ``shape``."""
        out = self.from_canonical(canonical_array)
        if out.shape[:3] != tuple(shape):
            raise ValueError(f"canonical array of shape {canonical_array.shape} does not fit {tuple(shape)}")
        return np.ascontiguousarray(out)


@dataclass
class Volume:
    """An image with geometry. See the module docstring for the axis conventions."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim not in (3, 4):
            raise InputError(
                f"A Volume array must be [k, j, i] or [k, j, i, channel]; got {self.array.ndim} dimensions "
                f"with shape {self.array.shape}."
            )
        if self.array.ndim == 4 and self.array.shape[3] not in (3, 4):
            raise InputError(
                f"Only RGB(A) images may have a channel axis; got {self.array.shape[3]} channels. "
                "4D series (time, diffusion) are not supported: extract one 3D volume first."
            )
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(self.spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise InputError(f"Voxel spacing must be three positive numbers; got {self.spacing}.")

    # ---- shape -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape in array order (k, j, i)."""
        return tuple(self.array.shape[:3])  # type: ignore[return-value]

    @property
    def size(self) -> tuple[int, int, int]:
        """Spatial size in index order (i, j, k), as ITK reports it."""
        return tuple(self.array.shape[:3][::-1])  # type: ignore[return-value]

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def is_2d(self) -> bool:
        return self.array.shape[0] == 1

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    # ---- geometry --------------------------------------------------------------------------
    @property
    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps

    @property
    def lps_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_lps)

    def index_to_physical(self, ijk: Sequence[Sequence[float]], space: str = "LPS") -> np.ndarray:
        """Continuous (i, j, k) indices, shape (N, 3), to physical points (N, 3) in LPS or RAS."""
        pts = np.atleast_2d(np.asarray(ijk, dtype=float))
        m = self.ijk_to_lps if _space(space) == "LPS" else self.ijk_to_ras
        return pts @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, points: Sequence[Sequence[float]], space: str = "LPS") -> np.ndarray:
        """Physical points (N, 3) in LPS or RAS to continuous (i, j, k) indices (N, 3)."""
        pts = np.atleast_2d(np.asarray(points, dtype=float))
        if _space(space) == "RAS":
            pts = ras_to_lps(pts)
        inv = self.lps_to_ijk
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def box_to_physical(self, lo_ijk: Sequence[float], hi_ijk: Sequence[float], space: str = "LPS",
                        margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """The axis-aligned physical box (min corner, max corner; mm in LPS or RAS) around the index box
        ``lo_ijk``..``hi_ijk`` (inclusive, (i, j, k)) grown by ``margin`` voxels on every side: 0 = the box of
        the voxel centres, 0.5 = of the voxels' outer corners. Exact for any direction matrix: the extremes of
        a box's image lie at its corners."""
        lo, hi = np.asarray(lo_ijk, dtype=float) - margin, np.asarray(hi_ijk, dtype=float) + margin
        corners = np.array([[(lo, hi)[b >> c & 1][c] for c in range(3)] for b in range(8)])
        pts = self.index_to_physical(corners, space)
        return pts.min(0), pts.max(0)

    # ---- conversions (see the module docstring) ---------------------------------------------
    @classmethod
    def from_matrix(cls, array: Any, ijk_to_physical: Any, metadata: Optional[dict[str, Any]] = None,
                    space: str = "LPS") -> Volume:
        """A Volume of ``array`` (k, j, i) whose index-to-physical 4x4 matrix in ``space`` (LPS or RAS) is
        ``ijk_to_physical`` (``split_matrix``); ``ijk_to_lps``/``ijk_to_ras`` give it back."""
        spacing, origin, direction = split_matrix(ijk_to_physical, space)
        return cls(array, spacing, origin, direction, dict(metadata or {}))

    def geometry(self) -> dict[str, list]:
        """The grid as JSON-able lists: ``spacing`` (i, j, k mm), ``origin`` (LPS mm), ``direction`` (3x3, rows
        L, P, S; columns the i, j, k axes). ``Volume.from_geometry`` reads it back exactly."""
        return {"spacing": [float(s) for s in self.spacing], "origin": [float(o) for o in self.origin],
                "direction": self.direction.tolist()}

    @classmethod
    def from_geometry(cls, array: Any, geometry: dict[str, Any], metadata: Optional[dict[str, Any]] = None) -> Volume:
        """A Volume of ``array`` on the grid ``geometry`` (``Volume.geometry``; a flat 9-list direction is read
        row by row)."""
        return cls(array, tuple(geometry["spacing"]), tuple(geometry["origin"]),
                   np.asarray(geometry["direction"], dtype=float).reshape(3, 3), dict(metadata or {}))

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.ijk_to_lps, other.ijk_to_lps, atol=tol)

    def with_array(self, array: np.ndarray, **metadata: Any) -> Volume:
        """A volume on the same grid holding another array (a mask, a probability map)."""
        if array.shape[:3] != self.shape:
            raise ValueError(f"array shape {array.shape[:3]} does not match the grid {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), {**self.metadata, **metadata})

    # ---- canonical orientation -------------------------------------------------------------
    @property
    def orientation(self) -> Orientation:
        return Orientation.from_direction(self.direction)

    def canonical(self) -> Volume:
        """The same image in canonical (closest-LPS) array order, with matching geometry."""
        o = self.orientation
        if o.is_identity:
            return self
        arr = np.ascontiguousarray(o.to_canonical(self.array))
        size = self.size
        m = self.ijk_to_lps
        new_dir = np.zeros((3, 3))
        new_spacing = [0.0, 0.0, 0.0]
        new_origin = np.array(self.origin, dtype=float)
        for d in range(3):
            src = o.perm[d]
            col = self.direction[:, src].copy()
            if o.flip[d]:
                new_origin = new_origin + m[:3, src] * (size[src] - 1)
                col = -col
            new_dir[:, d] = col
            new_spacing[d] = self.spacing[src]
        # the input's own geometry: SAT reproduces upstream's float32 NIfTI affine in the input's axis order
        meta = {**self.metadata, "input_ijk_to_ras": self.ijk_to_ras}
        return Volume(arr, tuple(new_spacing), tuple(new_origin), new_dir, meta)

    def to_input_grid(self, canonical_array: np.ndarray) -> np.ndarray:
        """Map an array on this volume's canonical grid back onto this volume's grid."""
        return self.orientation.onto_grid(canonical_array, self.shape)

    # ---- checks ----------------------------------------------------------------------------
    def check_usable(self, source: str = "image") -> None:
        """Raise InputError for images no model can use (empty, NaN-only, constant)."""
        if self.array.size == 0 or 0 in self.array.shape:
            raise InputError(f"{source} is empty (shape {self.array.shape}).")
        if np.issubdtype(self.array.dtype, np.floating):
            finite = np.isfinite(self.array)
            if not finite.any():
                raise InputError(f"{source} contains only NaN/infinite values: nothing to segment.")

    def describe(self) -> str:
        return (
            f"{'x'.join(map(str, self.size))} voxels, spacing {', '.join(f'{s:g}' for s in self.spacing)} mm"
            f"{', RGB' if self.is_rgb else ''}"
        )
