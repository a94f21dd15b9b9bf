"""Corrections measured (issue 17 item 4): textseg.analysis.corrections against MONAI's metrics on real masks with
known edits, against hand-computed values on analytic shapes, and the segment-by-segment comparison of files."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from conftest import shared_file
from scipy import ndimage

from textseg.analysis.corrections import (
    COLUMNS,
    compare_masks,
    compare_segmentations,
    onto_grid,
    pair_segments,
    surface_distances,
    surface_voxels,
    write_rows,
)
from textseg.errors import Cancelled, InputError, OutputExistsError
from textseg.formats.images import read_volume
from textseg.formats.segments import Segment, read_seg_nrrd, write_seg_nrrd
from textseg.volume import Volume

TS = ("totalsegmentator-examples",)
RAD = ("pyradiomics-examples",)


def _monai(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float, float]:
    """Dice, HD95 and symmetric ASD by MONAI on (k, j, i) masks with (i, j, k) spacing."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    # MONAI crops to the union's box itself; cropping here (keeping 2 voxels of margin, or the image border)
    # changes no value and saves converting whole CT grids
    box = tuple(slice(max(0, int(nz[0]) - 2), int(nz[-1]) + 3) for nz in
                (np.flatnonzero((a | b).any(tuple(x for x in range(3) if x != ax))) for ax in range(3)))
    a, b = a[box], b[box]
    ta = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0)))[None, None]
    tb = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 1, 0)))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = metrics.compute_dice(ta.float(), tb.float(), include_background=True).item()
        hd95 = metrics.compute_hausdorff_distance(ta, tb, percentile=95, spacing=list(spacing)).item()
        asd = metrics.compute_average_surface_distance(ta, tb, symmetric=True, spacing=list(spacing)).item()
    return dice, hd95, asd


@pytest.fixture(scope="module")
def lung1():
    v = read_volume(shared_file(*RAD, "lung1_label.nrrd"), isolate=False)
    return v, v.array > 0


def test_lung_lesion_dilated_by_one_voxel(lung1):
    v, a = lung1
    b = ndimage.binary_dilation(a)  # 6-neighbour dilation: every added voxel is outside A
    r = compare_masks(a, b, v.spacing)
    assert (r.voxels_a, r.voxels_b) == (837, int(b.sum()))
    assert r.voxels_removed == 0 and r.voxels_added == int(b.sum()) - 837
    ml = float(np.prod(v.spacing)) / 1000
    assert r.added_ml == pytest.approx(r.voxels_added * ml, rel=1e-12) and r.removed_ml == 0.0
    assert r.dice == pytest.approx(2 * 837 / (837 + b.sum()), rel=1e-12)
    # the lesion spans 3 slices; dilation adds one above and one below: 5 slices changed
    assert np.flatnonzero(a.any((1, 2))).size == 3 and r.slices_touched == 5
    assert r.hd95_mm == pytest.approx(5.0, rel=1e-6)  # the slice spacing: the new top/bottom caps
    dice, hd95, asd = _monai(a, b, v.spacing)
    assert (r.dice, r.hd95_mm, r.asd_mm) == pytest.approx((dice, hd95, asd), rel=1e-6)


def test_lung_lesion_slab_removed_and_shifted_copy(lung1):
    v, a = lung1
    k = np.flatnonzero(a.any((1, 2)))[1]  # the middle slice of the lesion
    b = a.copy()
    b[k] = False
    r = compare_masks(a, b, v.spacing)
    assert r.voxels_removed == int(a[k].sum()) == 347 and r.voxels_added == 0 and r.slices_touched == 1
    assert r.dice == pytest.approx(2 * (837 - 347) / (837 + 490), rel=1e-12)
    assert (r.dice, r.hd95_mm, r.asd_mm) == pytest.approx(_monai(a, b, v.spacing), rel=1e-6)

    shifted = np.roll(a, 2, axis=2)  # 2 voxels along i, far from the image border
    r = compare_masks(a, shifted, v.spacing)
    overlap = int((a & shifted).sum())
    assert r.voxels_added == r.voxels_removed == 837 - overlap and r.slices_touched == 3
    assert r.dice == pytest.approx(overlap / 837, rel=1e-12)
    assert r.hd_mm == pytest.approx(2 * v.spacing[0], rel=1e-6)  # no surface voxel moves further than the shift
    assert (r.dice, r.hd95_mm, r.asd_mm) == pytest.approx(_monai(a, shifted, v.spacing), rel=1e-6)


def test_surfaces_and_distances_agree_with_simpleitk_filters(lung1):
    """The same sets and distances from another implementation: SimpleITK's BinaryErode (cross kernel) and its
    Maurer distance map (float32), on the lesion and a copy shifted by (1, 2, 3) voxels."""
    import SimpleITK as sitk

    v, a = lung1
    box = (slice(30, 38), slice(340, 380), slice(200, 236))
    a = a[box]
    b = np.roll(a, (1, 2, 3), axis=(0, 1, 2))
    for m in (a, b):
        eroded = sitk.BinaryErode(sitk.GetImageFromArray(m.astype(np.uint8)), [1, 1, 1], sitk.sitkCross, 0, 1, False)
        assert np.array_equal(surface_voxels(m), m & ~sitk.GetArrayFromImage(eroded).astype(bool))
    edges_b = sitk.GetImageFromArray(surface_voxels(b).astype(np.uint8))
    edges_b.SetSpacing(v.spacing)
    maurer = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(edges_b, insideIsPositive=False,
                                                                 squaredDistance=False, useImageSpacing=True))
    d_ab, _ = surface_distances(a, b, v.spacing)
    expected = np.where(surface_voxels(b), 0.0, maurer)[surface_voxels(a)]
    assert d_ab.shape == expected.shape and np.allclose(d_ab, expected, rtol=1e-6, atol=1e-5)


def test_117_class_labelmap_against_monai_segment_by_segment():
    """TotalSegmentator's normal and fast labelmaps of one CT: a real 'AI output' and 'another answer' pair."""
    seg = shared_file(*TS, "example_seg.nii.gz")
    fast = shared_file(*TS, "example_seg_fast.nii.gz")
    labels = shared_file(*TS, "example_seg_labels.json")
    rows = compare_segmentations(seg, fast, labels_a=labels, labels_b=labels)
    a = read_volume(seg, isolate=False)
    b = read_volume(fast, isolate=False)
    names = {int(k): v for k, v in json.loads(labels.read_text()).items()}
    in_a = {names[int(x)] for x in np.unique(a.array) if x}
    in_b = {names[int(x)] for x in np.unique(b.array) if x}
    assert {r["segment_a"] for r in rows if r["matched_by"] == "name"} == in_a & in_b
    assert {r["segment_a"] for r in rows if r["matched_by"] == "only in A"} == in_a - in_b
    assert {r["segment_b"] for r in rows if r["matched_by"] == "only in B"} == in_b - in_a
    value = {v: k for k, v in names.items()}
    checked = 0
    for r in rows:
        if r["matched_by"] != "name":
            continue
        ma, mb = a.array == value[r["segment_a"]], b.array == value[r["segment_b"]]
        assert r["voxels_a"] == int(ma.sum()) and r["voxels_b"] == int(mb.sum())
        assert r["voxels_added"] == int((mb & ~ma).sum()) and r["voxels_removed"] == int((ma & ~mb).sum())
        assert r["volume_a_ml"] == pytest.approx(ma.sum() * 27 / 1000, rel=1e-12)  # 3 mm isotropic voxels
        assert r["slices_touched"] == int((ma ^ mb).any((1, 2)).sum())
        checked += 1
        dice, hd95, asd = _monai(ma, mb, a.spacing)
        assert r["dice"] == pytest.approx(dice, rel=1e-6), r["segment_a"]
        assert r["hd95_mm"] == pytest.approx(hd95, rel=1e-6, abs=1e-6), r["segment_a"]
        assert r["asd_mm"] == pytest.approx(asd, rel=1e-6, abs=1e-6), r["segment_a"]
    assert checked == len(in_a & in_b) >= 35


def test_concentric_boxes_exact_by_hand():
    """Box A and box B = A grown by 1 voxel on each face, anisotropic spacing: distances by closed formulas."""
    spacing = (0.8, 1.1, 2.5)  # (i, j, k) mm
    shape = (20, 24, 28)  # (k, j, i)
    lo, hi = np.array([5, 6, 7]), np.array([14, 17, 20])  # A = [lo, hi] inclusive, (k, j, i)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    b[lo[0] - 1:hi[0] + 2, lo[1] - 1:hi[1] + 2, lo[2] - 1:hi[2] + 2] = True
    r = compare_masks(a, b, spacing)
    na, nb = int(np.prod(hi - lo + 1)), int(np.prod(hi - lo + 3))
    assert (r.voxels_a, r.voxels_b, r.voxels_added, r.voxels_removed) == (na, nb, nb - na, 0)
    assert r.dice == 2 * na / (na + nb)
    assert r.volume_b_ml == pytest.approx(nb * 0.8 * 1.1 * 2.5 / 1000, rel=1e-12)
    assert r.slices_touched == hi[0] - lo[0] + 3
    s = np.array(spacing[::-1])  # (k, j, i) mm
    # A's surface voxels lie inside B: the nearest B surface voxel is the nearest of B's six face planes
    pa = np.argwhere(surface_voxels(a))
    blo, bhi = lo - 1, hi + 1
    d_ab = np.minimum((pa - blo) * s, (bhi - pa) * s).min(axis=1)
    # B's surface voxels lie outside A: the nearest A voxel (on A's border) is the clamped point
    pb = np.argwhere(surface_voxels(b))
    d_ba = np.linalg.norm((pb - np.clip(pb, lo, hi)) * s, axis=1)
    assert len(pa) == na - int(np.prod(hi - lo - 1)) and len(pb) == nb - na
    assert r.hd95_mm == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-6)
    assert r.hd_mm == pytest.approx(math.sqrt(sum(x * x for x in spacing)), rel=1e-6)  # B's corners
    assert r.asd_mm == pytest.approx(np.concatenate([d_ab, d_ba]).mean(), rel=1e-6)
    assert (r.dice, r.hd95_mm, r.asd_mm) == pytest.approx(_monai(a, b, spacing), rel=1e-6)


def test_concentric_spheres_within_half_a_voxel():
    spacing = (1.0, 1.0, 1.0)
    k, j, i = np.ogrid[:48, :48, :48]
    r2 = (k - 23.5) ** 2 + (j - 23.5) ** 2 + (i - 23.5) ** 2
    a, b = r2 <= 10.0**2, r2 <= 14.0**2
    r = compare_masks(a, b, spacing)
    assert r.dice == 2 * a.sum() / (a.sum() + b.sum())
    assert r.volume_a_ml == pytest.approx(4 / 3 * math.pi * 10**3 / 1000, rel=0.02)
    assert r.asd_mm == pytest.approx(4.0, abs=0.5)  # radii 10 and 14 mm: 4 mm apart, up to voxelisation
    assert r.hd95_mm == pytest.approx(4.0, abs=0.9)


def test_empty_masks_stated_rules():
    z = np.zeros((3, 8, 8), bool)
    one = z.copy()
    one[1, 2:5, 2:5] = True
    both = compare_masks(z, z, (1, 1, 1))
    assert (both.dice, both.hd95_mm, both.asd_mm, both.empty, both.slices_touched) == (1.0, 0.0, 0.0, "both", 0)
    gone = compare_masks(one, z, (1, 1, 2))
    assert (gone.dice, gone.hd95_mm, gone.asd_mm, gone.empty) == (0.0, math.inf, math.inf, "b")
    assert gone.voxels_removed == 9 and gone.removed_ml == pytest.approx(9 * 2 / 1000) and gone.slices_touched == 1
    row = compare_masks(z, one, (1, 1, 1)).as_row()
    assert row["empty"] == "a" and row["hd95_mm"] is None and row["asd_mm"] is None and row["dice"] == 0.0
    with pytest.raises(InputError, match="one shape"):
        compare_masks(one, one[:2], (1, 1, 1))


def test_single_slice_images_use_in_plane_surfaces():
    a = np.zeros((1, 20, 20), bool)
    a[0, 5:15, 5:15] = True
    b = np.zeros_like(a)
    b[0, 4:16, 4:16] = True
    r = compare_masks(a, b, (0.5, 0.5, 1.0))
    assert r.hd_mm == pytest.approx(math.sqrt(2) * 0.5, rel=1e-6) and r.slices_touched == 1
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    ta, tb = (torch.from_numpy(np.ascontiguousarray(m[0].T))[None, None] for m in (a, b))
    assert r.hd95_mm == pytest.approx(metrics.compute_hausdorff_distance(ta, tb, percentile=95,
                                                                         spacing=[0.5, 0.5]).item(), rel=1e-6)
    assert r.asd_mm == pytest.approx(metrics.compute_average_surface_distance(ta, tb, symmetric=True,
                                                                              spacing=[0.5, 0.5]).item(), rel=1e-6)


def _seg(name, mask, prompt=None, **tags):
    t = {"textseg.prompt": json.dumps({"text": prompt})} if prompt else {}
    t.update(tags)
    return Segment(name, mask.astype(np.uint8), tags=t)


def test_seg_nrrd_pairs_by_name_prompt_and_reports_unmatched(tmp_path, lung1):
    v, lesion = lung1
    ref = Volume(np.zeros(v.shape, np.uint8), v.spacing, v.origin, v.direction)
    grown = ndimage.binary_dilation(lesion)
    other = np.zeros(v.shape, bool)
    other[10, 100:110, 100:110] = True
    ai = write_seg_nrrd(tmp_path / "ai.seg.nrrd", ref, [_seg("lung tumor", lesion, "lung tumor"),
                                                         _seg("nodule", other, "nodule"), _seg("liver", other)])
    # the annotator renamed the tumour segment, kept 'nodule' untouched, deleted 'liver' and added a segment
    fixed = write_seg_nrrd(tmp_path / "fixed.seg.nrrd", ref, [_seg("tumour (corrected)", grown, "lung tumor"),
                                                              _seg("nodule", other, "nodule"), _seg("vessel", other)])
    seen = []
    rows = compare_segmentations(ai, fixed, progress=lambda f, s: seen.append(f))
    by = {(r["segment_a"], r["segment_b"]): r for r in rows}
    assert [r["matched_by"] for r in rows] == ["prompt", "name", "only in A", "only in B"]
    tumour = by[("lung tumor", "tumour (corrected)")]
    assert tumour["voxels_removed"] == 0 and tumour["voxels_added"] == int(grown.sum()) - 837
    assert tumour["dice"] == pytest.approx(_monai(lesion, grown, v.spacing)[0], rel=1e-6)
    same = by[("nodule", "nodule")]
    assert (same["dice"], same["hd95_mm"], same["asd_mm"], same["slices_touched"]) == (1.0, 0.0, 0.0, 0)
    assert by[("liver", None)]["voxels_a"] == 100 and by[(None, "vessel")]["voxels_b"] == 100
    assert seen[-1] == 1.0 and len(seen) == 4
    assert set(rows[0]) == set(COLUMNS)

    out = write_rows(tmp_path / "cmp.json", rows)
    assert json.loads(out.read_text())[0]["segment_b"] == "tumour (corrected)"
    csv_path = write_rows(tmp_path / "cmp.csv", rows)
    assert csv_path.read_text().splitlines()[0].split(",") == list(COLUMNS)
    with pytest.raises(OutputExistsError):
        write_rows(tmp_path / "cmp.csv", rows)

    class Token:
        cancelled = True

    with pytest.raises(Cancelled):
        compare_segmentations(ai, fixed, cancel=Token())


def test_pairing_by_terminology_only_when_unique():
    m = np.zeros((1, 2, 2), np.uint8)
    liver_term = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
                  "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    a = [Segment("Segment_1", m, terminology=liver_term), Segment("x", m)]
    b = [Segment("liver edited", m, terminology=liver_term), Segment("y", m)]
    assert pair_segments(a, b) == [(0, 0, "terminology"), (1, None, "only in A"), (None, 1, "only in B")]


def test_grids_same_lattice_other_extent_placed_exactly_else_refused(tmp_path, lung1):
    v, lesion = lung1
    ref = Volume(np.zeros(v.shape, np.uint8), v.spacing, v.origin, v.direction)
    box = (slice(30, 38), slice(330, 400), slice(190, 250))  # a crop that holds the lesion, as Slicer may save it
    assert lesion[box].sum() == 837
    origin = ref.index_to_physical([[190, 330, 30]])[0]
    crop = Volume(np.zeros(lesion[box].shape, np.uint8), v.spacing, origin, v.direction)
    placed = onto_grid(ref, crop, [Segment("l", lesion[box].astype(np.uint8))])[0]
    assert np.array_equal(placed.mask > 0, lesion)
    write_seg_nrrd(tmp_path / "a.seg.nrrd", ref, [Segment("lesion", lesion.astype(np.uint8))])
    write_seg_nrrd(tmp_path / "b.seg.nrrd", crop, [Segment("lesion", lesion[box].astype(np.uint8))])
    assert not read_seg_nrrd(tmp_path / "b.seg.nrrd")[0].same_grid(ref)
    (row,) = compare_segmentations(tmp_path / "a.seg.nrrd", tmp_path / "b.seg.nrrd")
    assert (row["dice"], row["voxels_added"], row["voxels_removed"]) == (1.0, 0, 0)

    half = Volume(np.zeros(v.shape, np.uint8), v.spacing, tuple(np.add(v.origin, (0.2, 0, 0))), v.direction)
    with pytest.raises(InputError, match="another voxel grid") as e:
        onto_grid(ref, half, [Segment("l", lesion)])
    assert "\n" not in str(e.value)
    small = Volume(np.zeros((5, 5, 5), np.uint8), v.spacing, v.origin, v.direction)
    with pytest.raises(InputError, match="837 voxels of segment 'l' lie outside"):
        onto_grid(small, ref, [Segment("l", lesion)])


def test_onto_grid_reindexes_flipped_and_permuted_axes_exactly():
    """The same voxels stored with the axes in another order or direction (a DICOM SEG's reversed frames, an
    image stored i/j swapped) are placed exactly: each voxel keeps its physical centre."""
    from textseg.analysis.corrections import onto_grid, same_lattice

    rng = np.random.default_rng(3)
    ref = Volume(np.zeros((4, 5, 6), np.uint8), (0.5, 0.7, 2.0), (10.0, -3.0, 7.0))
    mask = (rng.random(ref.shape) > 0.6).astype(np.uint8)
    # source index axes: i runs along the reference's j, j along -k, k along i; origin at the reference's last k
    d = np.column_stack([ref.direction[:, 1], -ref.direction[:, 2], ref.direction[:, 0]])
    origin = tuple(np.asarray(ref.origin) + ref.direction[:, 2] * 2.0 * (ref.shape[0] - 1))
    src_mask = np.transpose(mask[::-1], (2, 0, 1))  # source [k_s, j_s, i_s] = reference [k, j, i] re-indexed
    source = Volume(np.zeros(src_mask.shape, np.uint8), (0.7, 2.0, 0.5), origin, d)
    points = lambda vol, m: np.round(sorted(map(tuple, vol.index_to_physical(np.argwhere(m)[:, ::-1]))), 6)  # noqa: E731
    assert np.array_equal(points(source, src_mask), points(ref, mask))  # the test's source is right: same voxels
    assert same_lattice(ref, source)
    assert np.array_equal(onto_grid(ref, source, [Segment("x", src_mask)])[0].mask, mask)
