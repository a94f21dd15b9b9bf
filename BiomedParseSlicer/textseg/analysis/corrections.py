"""Corrections measured: how far a corrected segment is from the model's output (or any two segmentations).

Two binary masks on one voxel grid are compared with the definitions of MONAI's metrics, computed with numpy
and scipy (core dependencies; MONAI is only in the ``models`` extra):

- **Dice**: 2 |A and B| / (|A| + |B|), from voxel counts (exact).
- **Surface voxels** (MONAI's ``get_mask_edges``): the voxels of a mask that have at least one of their 6 face
  neighbours outside the mask or outside the image (``mask XOR erode(mask)``, cross-shaped structuring element,
  the image border counted as background). Images with one slice (2D) use the 4 in-plane neighbours.
- **Surface distances**: for every surface voxel of A, the Euclidean distance in millimetres (voxel spacing
  applied) from its centre to the nearest surface-voxel centre of B, and the same from B to A (exact, float64,
  by scipy's KD-tree as MONAI computes them on the CPU; checked against MONAI and SimpleITK's Maurer maps in
  the tests).
- **HD95** (``hd95_mm``): max(P95(A->B), P95(B->A)), percentiles with linear interpolation (numpy's default,
  ``torch.quantile``), = MONAI ``compute_hausdorff_distance(percentile=95)``. ``hd_mm``: the same with the maximum.
- **ASD** (``asd_mm``): the mean of all distances of both directions together (not the mean of the two means),
  = MONAI ``compute_average_surface_distance(symmetric=True)``.
- **Volumes** (mL = cm3): voxel count x product of the spacing / 1000. ``added_ml``: voxels in B and not in A
  (what the person painted); ``removed_ml``: voxels in A and not in B (what the person erased).
- **Slices touched**: the number of distinct slice indices along the image's slice axis (by default ``k``, the
  third index axis of the stored grid, numpy axis 0 of ``array[k, j, i]``; for DICOM series and most CT/MR
  files this is the acquisition slice direction, for a sagittally stored image it is the sagittal direction)
  on which at least one voxel differs between A and B.

Empty masks, stated: both empty -> Dice 1, distances 0 (identical masks: nothing was corrected; MONAI gives
NaN); one empty -> Dice 0, distances ``inf`` (as MONAI: no surface to measure to); ``empty`` says which.
In rows for CSV/JSON, non-finite values become ``None`` (an empty CSV cell, JSON null).

Grids: the two masks must be on the same voxel grid. Segmentations read from files may store a different
*extent* of the same lattice (Slicer can save a .seg.nrrd cropped to its segments): those are placed onto the
first one's grid exactly (no interpolation), as are the same voxels stored with the index axes in another order or
direction (re-indexed). Different lattices (spacing, direction, or a sub-voxel shift) are
refused with one line; nothing is resampled, because resampling would change the very voxels being measured.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import Cancelled, InputError
from ..formats.atomic import atomic_output
from ..formats.segment_files import read_segments
from ..formats.segments import TAG_PREFIX, Segment, segment_terminology
from ..runcontrol import CancelToken, ProgressFn
from ..volume import Volume, mask_bounds

PathLike = Union[str, Path]
SegmentationLike = Union[PathLike, tuple[Volume, Sequence[Segment]]]

SLICE_AXES = {"i": 2, "j": 1, "k": 0}  # index axis -> numpy axis of array[k, j, i]

# column -> (unit, definition); the order is the order of rows' keys
COLUMNS: dict[str, tuple[str, str]] = {
    "segment_a": ("", "Segment name in A (the model's output, or the first segmentation)."),
    "segment_b": ("", "Segment name in B (the corrected segmentation)."),
    "matched_by": ("", "How the pair was found: name, prompt (textseg.prompt tag), terminology, or 'only in A/B'."),
    "dice": ("", "2|A and B| / (|A| + |B|); 1 when both are empty, 0 when one is."),
    "hd95_mm": ("mm", "Symmetric 95th-percentile Hausdorff distance between the surface voxels (MONAI's)."),
    "hd_mm": ("mm", "Symmetric Hausdorff distance (maximum) between the surface voxels."),
    "asd_mm": ("mm", "Mean of the surface distances of both directions together (MONAI's symmetric ASD)."),
    "volume_a_ml": ("mL", "Volume of A."),
    "volume_b_ml": ("mL", "Volume of B."),
    "added_ml": ("mL", "Volume in B and not in A (painted by the person)."),
    "removed_ml": ("mL", "Volume in A and not in B (erased by the person)."),
    "voxels_a": ("voxels", "Voxel count of A."),
    "voxels_b": ("voxels", "Voxel count of B."),
    "voxels_added": ("voxels", "Voxels in B and not in A."),
    "voxels_removed": ("voxels", "Voxels in A and not in B."),
    "slices_touched": ("slices", "Slices along the slice axis with at least one changed voxel."),
    "empty": ("", "'', 'a', 'b' or 'both': which mask is empty (distances are then inf, or 0 for both)."),
}


@dataclass(frozen=True)
class MaskComparison:
    """The comparison of mask A (model output) with mask B (corrected). See the module docstring."""

    dice: float
    hd95_mm: float
    hd_mm: float
    asd_mm: float
    volume_a_ml: float
    volume_b_ml: float
    added_ml: float
    removed_ml: float
    voxels_a: int
    voxels_b: int
    voxels_added: int
    voxels_removed: int
    slices_touched: int
    empty: str  # "", "a", "b", "both"

    def as_row(self) -> dict[str, Any]:
        """The values for CSV/JSON: non-finite floats become None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def compare_masks(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], slice_axis: str = "k") -> MaskComparison:
    """Compare two binary masks ``array[k, j, i]`` on one grid; ``spacing`` is (i, j, k) in mm, as
    ``Volume.spacing``. The direction matrix does not change any of these values (it is a rotation)."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"the two masks must be 3D arrays of one shape (k, j, i); got {a.shape} and {b.shape}.")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be three positive numbers (i, j, k) in mm; got {spacing}.")
    if slice_axis not in SLICE_AXES:
        raise InputError(f"slice_axis must be one of i, j, k; got {slice_axis!r}.")
    ml = float(np.prod(spacing)) / 1000.0
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    both = int(np.count_nonzero(a & b))
    added, removed = nb - both, na - both
    changed = a ^ b
    axis = SLICE_AXES[slice_axis]
    touched = int(np.count_nonzero(changed.any(axis=tuple(x for x in range(3) if x != axis))))
    if na == 0 and nb == 0:
        dice, hd95, hd, asd, empty = 1.0, 0.0, 0.0, 0.0, "both"
    elif na == 0 or nb == 0:
        dice, hd95, hd, asd, empty = 0.0, math.inf, math.inf, math.inf, "a" if na == 0 else "b"
    else:
        dice = 2.0 * both / (na + nb)
        d_ab, d_ba = surface_distances(a, b, spacing)
        hd95 = max(float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95)))
        hd = max(float(d_ab.max()), float(d_ba.max()))
        asd = float(np.concatenate([d_ab, d_ba]).mean())
        empty = ""
    return MaskComparison(dice, hd95, hd, asd, na * ml, nb * ml, added * ml, removed * ml, na, nb, added, removed,
                          touched, empty)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """MONAI's edges of a binary mask (see the module docstring), same shape, bool: ``mask`` minus its erosion
    by the 6-neighbour cross with the image border as background (scipy's ``binary_erosion`` defaults, which
    MONAI uses; SimpleITK's ``BinaryErode`` with a cross kernel gives the same set, 5-10x slower)."""
    mask = np.asarray(mask) > 0
    flat = mask.shape[0] == 1  # one slice: in-plane neighbours only, as MONAI on a 2D array
    arr = mask[0] if flat else mask
    padded = np.pad(arr, 1)
    inner = padded[(slice(1, -1),) * arr.ndim].copy()
    for axis in range(arr.ndim):
        for shift in (0, 2):
            index = [slice(1, -1)] * arr.ndim
            index[axis] = slice(shift, shift + arr.shape[axis])
            inner &= padded[tuple(index)]
    edges = arr & ~inner
    return edges[None] if flat else edges


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel centre of A to the nearest surface voxel centre of B, and from B
    to A (both masks non-empty).

    Nearest neighbours by scipy's ``cKDTree`` over the surface voxels' physical offsets (exact Euclidean, float64;
    what MONAI does on the CPU). SimpleITK's Maurer distance map gives the same values to float32 precision but
    needs a dense transform of the whole bounding box: 4x slower on a liver-sized mask (benchmarks/
    bench_corrections.py)."""
    from scipy.spatial import cKDTree

    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    box = _bounding_box(a | b)  # surfaces lie inside the union's box; the cut-off voxels are background
    a, b = a[box], b[box]  # a voxel on the box's side has background beyond it, as the cut array's border
    ea, eb = surface_voxels(a), surface_voxels(b)
    scale = np.asarray(tuple(spacing)[::-1], np.float64)  # (k, j, i) mm
    pa, pb = np.argwhere(ea) * scale, np.argwhere(eb) * scale
    d_ab = cKDTree(pb).query(pa)[0]
    d_ba = cKDTree(pa).query(pb)[0]
    return d_ab, d_ba


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    lo, hi = mask_bounds(mask)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


# ---- grids ---------------------------------------------------------------------------------------------------
def onto_grid(reference: Volume, source: Volume, segments: Sequence[Segment], what: str = "B") -> list[Segment]:
    """``segments`` (on ``source``'s grid) on ``reference``'s grid, exactly: the same grid as is; the same
    lattice with another extent (an integer voxel offset) by cropping/padding with background. InputError when
    the lattices differ, or when a segment has voxels outside the reference grid."""
    if source.same_grid(reference):
        return list(segments)
    source, turn = _reference_axes(reference, source)
    offset = _lattice_offset(reference, source)
    if offset is None:
        raise InputError(
            f"{what} is on another voxel grid ({source.describe()}, origin {_fmt(source.origin)}) than the reference "
            f"({reference.describe()}, origin {_fmt(reference.origin)}); compare segmentations of the same image, "
            "or resample one onto the other's image first (in Slicer: Segmentations > Export to a labelmap with the "
            "image as reference)."
        )
    out = []
    for s in segments:
        mask = turn(np.asarray(s.mask) > 0)
        placed = _placed(reference.shape, offset, mask)
        lost = int(np.count_nonzero(mask)) - int(np.count_nonzero(placed))
        if lost:
            raise InputError(f"{what}: {lost} voxels of segment '{s.name}' lie outside the reference grid "
                             f"({reference.describe()}); compare segmentations of the same image.")
        out.append(replace(s, mask=placed.astype(np.uint8)))
    return out


def same_lattice(reference: Volume, source: Volume) -> bool:
    """Whether ``source``'s voxels are voxels of ``reference``'s lattice (another extent or axis order at most)."""
    return _lattice_offset(reference, _reference_axes(reference, source)[0]) is not None


def place_array(reference: Volume, source: Volume, array: np.ndarray) -> np.ndarray | None:
    """``array`` (on ``source``'s grid) on ``reference``'s grid when both share one lattice (``onto_grid``'s
    rule), exactly: voxels outside the reference grid are cut off, the rest of it is 0. None for another
    lattice."""
    source, turn = _reference_axes(reference, source)
    offset = _lattice_offset(reference, source)
    return None if offset is None else _placed(reference.shape, offset, turn(np.asarray(array)))


def _reference_axes(reference: Volume, source: Volume):
    """``source``'s grid with its index axes reordered and flipped to run as ``reference``'s do (the same voxels:
    a DICOM SEG read back can list its frames in the opposite slice order), and the function that does the same
    to an array ``[k, j, i]`` on it. Unchanged when the axes already agree or are not a signed permutation."""
    turn = np.asarray(reference.direction, float).T @ np.asarray(source.direction, float)  # [ref axis, src axis]
    perm = [int(np.argmax(np.abs(turn[:, a]))) for a in range(3)]  # source index axis a runs along perm[a]
    if sorted(perm) != [0, 1, 2] or not np.allclose(np.abs(turn[perm, [0, 1, 2]]), 1, atol=1e-5) \
            or np.allclose(turn, np.eye(3), atol=1e-5):
        return source, lambda array: array
    flips = [a for a in range(3) if turn[perm[a], a] < 0]
    order = [0, 0, 0]
    for a in range(3):
        order[2 - perm[a]] = 2 - a  # numpy axis 2 - a holds index axis a

    def apply(array: np.ndarray) -> np.ndarray:
        return np.transpose(np.flip(array, axis=tuple(2 - a for a in flips)), order)

    spacing, direction = np.asarray(source.spacing, float), np.asarray(source.direction, float)
    origin = np.asarray(source.origin, float) + sum(direction[:, a] * spacing[a] * (source.size[a] - 1)
                                                    for a in flips)
    new_spacing = [0.0, 0.0, 0.0]
    for a in range(3):
        new_spacing[perm[a]] = spacing[a]
    shape = apply(np.empty(source.array.shape[:3], bool)).shape
    new_direction = np.stack([direction[:, a] * (-1 if a in flips else 1) for a in np.argsort(perm)], axis=1)
    return Volume(np.zeros(shape, np.uint8), tuple(new_spacing), tuple(origin), new_direction), apply


def _placed(shape: Sequence[int], offset: Sequence[int], array: np.ndarray) -> np.ndarray:
    placed = np.zeros(tuple(shape), array.dtype)
    # source voxel (k, j, i) sits at reference voxel (k, j, i) + offset (offset in array order)
    src, dst = [], []
    for n, off in enumerate(offset):
        lo, hi = max(0, -off), min(array.shape[n], shape[n] - off)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo + off, max(lo, hi) + off))
    placed[tuple(dst)] = array[tuple(src)]
    return placed


def _lattice_offset(reference: Volume, source: Volume, tol: float = 1e-3) -> tuple[int, int, int] | None:
    """(dk, dj, di) such that source voxel index + offset = reference voxel index, if both share one lattice."""
    if not (np.allclose(reference.spacing, source.spacing, rtol=1e-5, atol=1e-6)
            and np.allclose(reference.direction, source.direction, atol=1e-5)):
        return None
    ijk = reference.physical_to_index([source.origin])[0]
    rounded = np.round(ijk)
    if np.abs(ijk - rounded).max() > tol:
        return None
    di, dj, dk = (int(v) for v in rounded)
    return dk, dj, di


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# ---- segmentations -------------------------------------------------------------------------------------------
def load_segmentation(seg: SegmentationLike, labels: PathLike | None = None) -> tuple[Volume, Sequence[Segment]]:
    """A segmentation from a file textseg reads (``.seg.nrrd``, DICOM SEG, label map + labels JSON) or an
    in-memory (grid, segments) pair."""
    if isinstance(seg, (str, Path)):
        return read_segments(seg, labels, lazy=True)
    grid, segments = seg
    return grid, segments


def pair_segments(a: Sequence[Segment], b: Sequence[Segment]) -> list[tuple[int | None, int | None, str]]:
    """Pairs (index in A, index in B, how) in A's order, then B's unmatched; unmatched sides are None.

    In turn: the same name (duplicates in order of appearance); the same ``textseg.prompt`` tag (the prompt the
    model was given, kept however the segment was renamed); the same terminology (category, type, modifier,
    region codes), each only where it is unique on both sides. Everything else is reported as 'only in A/B'."""
    names_a = [_name(s) for s in a]
    names_b = [_name(s) for s in b]
    free_a, free_b = list(range(len(a))), list(range(len(b)))
    pairs: list[tuple[int | None, int | None, str]] = []
    for ia in list(free_a):
        for ib in free_b:
            if names_a[ia] == names_b[ib]:
                pairs.append((ia, ib, "name"))
                free_a.remove(ia)
                free_b.remove(ib)
                break
    for how, key in (("prompt", _prompt_key), ("terminology", _terminology_key)):
        keys_a = {ia: key(a[ia]) for ia in free_a}
        keys_b = {ib: key(b[ib]) for ib in free_b}
        for ia in list(free_a):
            k = keys_a[ia]
            if k is None or list(keys_a.values()).count(k) != 1:
                continue
            match = [ib for ib in free_b if keys_b[ib] == k]
            if len(match) == 1:
                pairs.append((ia, match[0], how))
                free_a.remove(ia)
                free_b.remove(match[0])
    pairs += [(ia, None, "only in A") for ia in free_a]
    pairs.sort(key=lambda p: p[0] if p[0] is not None else len(a))
    pairs += [(None, ib, "only in B") for ib in free_b]
    return pairs


def _name(s: Segment) -> str:
    return s.name


def _prompt_key(s: Segment) -> str | None:
    raw = (s.tags or {}).get(TAG_PREFIX + "prompt")
    if not raw:
        return None
    try:
        return json.dumps(json.loads(raw), sort_keys=True)
    except ValueError:
        return raw


def _terminology_key(s: Segment) -> tuple | None:
    if s.terminology is None:
        return None  # a name-derived terminology would pair unrelated unnamed segments
    try:
        t = segment_terminology(s)
    except Exception:  # noqa: BLE001 - a terminology we cannot parse pairs nothing
        return None
    return tuple(None if c is None else tuple(c.as_list()) for c in
                 (t.category, t.type, t.type_modifier, t.region, t.region_modifier))


def compare_segmentations(a: SegmentationLike, b: SegmentationLike, *, labels_a: PathLike | None = None,
                          labels_b: PathLike | None = None, slice_axis: str = "k",
                          progress: ProgressFn | None = None, cancel: Any = None) -> list[dict[str, Any]]:
    """Segment-by-segment comparison of A (the model's output) with B (the corrected segmentation): one row
    per pair (keys: ``COLUMNS``), unmatched segments as rows 'only in A' / 'only in B' with their own volume.

    ``a``/``b``: paths (``.seg.nrrd``, DICOM SEG, label map with ``labels_a``/``labels_b``) or (grid, segments).
    B is placed onto A's grid (see ``onto_grid``). ``progress(fraction, stage)`` after each pair;
    ``cancel`` (a CancelToken, threading.Event or callable returning True) is checked between pairs and raises
    Cancelled."""
    grid_a, segs_a = load_segmentation(a, labels_a)
    grid_b, segs_b = load_segmentation(b, labels_b)
    pairs = pair_segments(segs_a, segs_b)
    same = grid_b.same_grid(grid_a)
    if not same:
        onto_grid(grid_a, grid_b, [], "B")  # refuses another lattice before any work
    rows = []
    ml = grid_a.voxel_volume_mm3 / 1000.0
    for n, (ia, ib, how) in enumerate(pairs):
        if CancelToken.of(cancel).cancelled:
            raise Cancelled(f"comparison cancelled after {n} of {len(pairs)} segment pairs.")
        sa = segs_a[ia] if ia is not None else None
        sb = segs_b[ib] if ib is not None else None
        if sb is not None and not same:
            sb = onto_grid(grid_a, grid_b, [sb], "B")[0]
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row.update(segment_a=sa.name if sa else None, segment_b=sb.name if sb else None, matched_by=how)
        if sa is not None and sb is not None:
            row.update(compare_masks(sa.mask, sb.mask, grid_a.spacing, slice_axis).as_row())
        else:
            mask = np.asarray((sa or sb).mask) > 0
            side = "a" if sa is not None else "b"
            row[f"voxels_{side}"] = int(np.count_nonzero(mask))
            row[f"volume_{side}_ml"] = row[f"voxels_{side}"] * ml
        rows.append(row)
        if progress:
            progress((n + 1) / len(pairs), f"compared {row['segment_a'] or row['segment_b']}")
    return rows


def write_rows(path: PathLike, rows: Sequence[dict[str, Any]], overwrite: bool = False) -> Path:
    """Rows as CSV (``.csv``, None as an empty cell) or JSON (``.json``, a list of objects), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(list(rows), indent=1, allow_nan=False)
    elif suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
        text = buf.getvalue()
    else:
        raise InputError(f"{path}: write the comparison as .csv or .json.")
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return path
