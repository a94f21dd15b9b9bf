"""Segment statistics: analytic shapes, constructed intensities, the real TotalSegmentator labelmap."""

import csv
import json
import math

import numpy as np
import pytest
from conftest import shared_file

from textseg.analysis.segment_stats import COLUMNS, compute_statistics, write_statistics
from textseg.errors import Cancelled, InputError, OutputExistsError
from textseg.formats.segment_files import read_segments
from textseg.formats.segments import Segment
from textseg.runcontrol import CancelToken
from textseg.volume import Volume


def _rot(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def test_box_exact_counts_intensities_centroid_bbox():
    shape = (9, 10, 12)  # (k, j, i)
    direction = _rot(30) @ np.diag([-1.0, 1.0, 1.0])  # oblique and flipped
    img = np.full(shape, -1000, np.int16)
    box = (slice(2, 6), slice(3, 8), slice(4, 10))  # 4 x 5 x 6 = 120 voxels
    rng = np.random.default_rng(0)
    img[box] = rng.permutation(np.arange(1, 121)).reshape(4, 5, 6)
    vol = Volume(img, (0.5, 0.7, 2.0), (10.0, -20.0, 30.0), direction)
    mask = np.zeros(shape, np.uint8)
    mask[box] = 1
    row = compute_statistics(vol, [Segment("box", mask)])[0]
    assert row["voxel_count"] == 120
    assert row["volume_mm3"] == pytest.approx(120 * 0.5 * 0.7 * 2.0, rel=1e-12)
    assert row["volume_cm3"] == pytest.approx(120 * 0.7 / 1000, rel=1e-12)
    # values 1..120: mean = median = 60.5, sample std = sqrt(n (n+1) / 12), p5 = 1 + 0.05 * 119
    assert (row["min"], row["max"], row["mean"], row["median"]) == (1.0, 120.0, 60.5, 60.5)
    assert row["stdev"] == pytest.approx(math.sqrt(120 * 121 / 12), rel=1e-12)
    assert row["percentile_05"] == pytest.approx(6.95) and row["percentile_95"] == pytest.approx(114.05)
    # centroid = physical position of the box's index centre (i 6.5, j 5, k 3.5)
    lps = vol.index_to_physical([[6.5, 5.0, 3.5]])[0]
    assert [row[f"centroid_lps_{a}"] for a in "lps"] == pytest.approx(lps, abs=1e-9)
    assert [row[f"centroid_ras_{a}"] for a in "ras"] == pytest.approx(lps * [-1, -1, 1], abs=1e-9)
    assert [row[f"bbox_index_min_{a}"] for a in "ijk"] == [4, 3, 2]
    assert [row[f"bbox_index_max_{a}"] for a in "ijk"] == [9, 7, 5]
    corners = vol.index_to_physical([[i, j, k] for i in (3.5, 9.5) for j in (2.5, 7.5) for k in (1.5, 5.5)], "RAS")
    assert [row[f"bbox_ras_min_{a}"] for a in "ras"] == pytest.approx(corners.min(axis=0))
    assert [row[f"bbox_ras_max_{a}"] for a in "ras"] == pytest.approx(corners.max(axis=0))


@pytest.mark.parametrize("radius, spacing", [(10.0, (1.0, 1.0, 1.0)), (12.0, (0.6, 0.8, 1.5))])
def test_sphere_volume_area_sphericity(radius, spacing):
    n = [int(2 * radius / s) + 5 for s in spacing]  # (i, j, k) sizes
    centre = [(m - 1) / 2 for m in n]
    k, j, i = np.mgrid[: n[2], : n[1], : n[0]]
    d2 = sum(((idx - c) * s) ** 2 for idx, c, s in zip((i, j, k), centre, spacing))
    mask = (d2 <= radius ** 2).astype(np.uint8)
    vol = Volume(np.zeros(mask.shape, np.int16), spacing)
    row = compute_statistics(vol, [Segment("sphere", mask)])[0]
    assert row["voxel_count"] == int(mask.sum())
    assert row["volume_mm3"] == pytest.approx(mask.sum() * np.prod(spacing), rel=1e-12)
    # digitising a sphere of >= 10 voxels radius: volume within 1 % of 4/3 pi r^3
    assert row["volume_mm3"] == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.01)
    # ITK's perimeter is an intercept-count (Crofton) estimate on the voxel grid: measured within
    # 0.7 % of 4 pi r^2 for radii of 5-20 voxels; 2 % leaves room for digitisation on anisotropic grids.
    assert row["surface_area_mm2"] == pytest.approx(4 * math.pi * radius ** 2, rel=0.02)
    assert row["sphericity"] == pytest.approx(1.0, abs=0.02)
    assert row["roundness"] == pytest.approx(row["sphericity"], rel=1e-9)
    assert [row["centroid_lps_l"], row["centroid_lps_p"], row["centroid_lps_s"]] == pytest.approx(
        [c * s for c, s in zip(centre, spacing)], abs=1e-9)


def test_real_totalsegmentator_labelmap_liver():
    import SimpleITK as sitk

    from textseg.formats.images import read_volume

    ct = read_volume(shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz"))
    seg_path = shared_file("totalsegmentator-examples", "example_seg.nii.gz")
    labels = shared_file("totalsegmentator-examples", "example_seg_labels.json")
    ref, segs = read_segments(seg_path, labels)
    assert ref.same_grid(ct)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    liver = [s for s in segs if s.name == "liver"]
    row = compute_statistics(ct, liver)[0]
    hu = ct.array[arr == 5].astype(np.float64)
    assert row["voxel_count"] == int((arr == 5).sum()) > 1000
    assert row["volume_mm3"] == pytest.approx(row["voxel_count"] * 27.0, rel=1e-12)  # 3 mm isotropic
    assert row["mean"] == pytest.approx(hu.mean(), rel=1e-12)
    assert row["stdev"] == pytest.approx(hu.std(ddof=1), rel=1e-12)
    assert row["median"] == float(np.median(hu))
    assert 20 < row["mean"] < 200  # soft-tissue HU: the mask sits on the liver, not air or bone
    ijk = np.argwhere(arr == 5)[:, ::-1].mean(axis=0)
    assert [row[f"centroid_lps_{a}"] for a in "lps"] == pytest.approx(ct.index_to_physical([ijk])[0], abs=1e-6)
    rows = compute_statistics(ct, segs)
    assert len(rows) == len(segs) and sum(r["voxel_count"] for r in rows) == int((arr > 0).sum())


def test_segments_on_another_grid_are_resampled_onto_the_image():
    img = np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    vol = Volume(img, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    crop = Volume(np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 2.0), (2.0, 3.0, 4.0))  # offset (i2, j3, k2)
    small = np.zeros(crop.shape, np.uint8)
    small[1:3, 1:4, 2:5] = 1
    full = np.zeros(vol.shape, np.uint8)
    full[3:5, 4:7, 4:7] = 1
    a = compute_statistics(vol, [Segment("s", small)], reference=crop)[0]
    b = compute_statistics(vol, [Segment("s", full)])[0]
    assert a == b and a["voxel_count"] == 18


def test_empty_segment_rgb_progress_and_cancel():
    vol = Volume(np.zeros((3, 4, 5, 3), np.uint8))
    m = np.zeros((3, 4, 5), np.uint8)
    m[1, 1:3, 1:3] = 1
    seen = []
    rows = compute_statistics(vol, [Segment("empty", np.zeros_like(m)), Segment("rgb", m)],
                              progress=lambda f, s: seen.append(f))
    assert rows[0]["voxel_count"] == 0 and rows[0]["mean"] is None and rows[0]["surface_area_mm2"] is None
    assert rows[1]["voxel_count"] == 4 and rows[1]["mean"] is None and rows[1]["centroid_lps_l"] == 1.5
    assert seen == [0.5, 1.0]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        compute_statistics(vol, [Segment("rgb", m)], cancel=token)
    with pytest.raises(InputError, match="shape"):
        compute_statistics(vol, [Segment("bad", np.zeros((2, 2, 2), np.uint8))])


def test_write_csv_and_json(tmp_path):
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), (1.0, 2.0, 3.0))
    m = np.zeros(vol.shape, np.uint8)
    m[1, 1:3, 1:4] = 1
    rows = compute_statistics(vol, [Segment("liver", m), Segment("empty", np.zeros_like(m))])
    p = write_statistics(rows, tmp_path / "s.csv")
    with open(p, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0].keys()) == list(COLUMNS)
    assert back[0]["segment"] == "liver" and int(back[0]["voxel_count"]) == 6
    assert float(back[0]["mean"]) == rows[0]["mean"] and back[1]["mean"] == ""
    j = json.loads(write_statistics(rows, tmp_path / "s.json").read_text())
    assert j["segments"] == rows and j["columns"]["volume_mm3"]["unit"] == "mm3"
    with pytest.raises(OutputExistsError):
        write_statistics(rows, tmp_path / "s.csv")
    with pytest.raises(InputError, match=".csv or .json"):
        write_statistics(rows, tmp_path / "s.xlsx")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.csv", "s.json"]


def test_statistics_for_files_labelmap_and_seg_nrrd(tmp_path):
    from textseg.analysis.segment_stats import statistics_for_files
    from textseg.formats.images import read_volume
    from textseg.formats.segments import write_seg_nrrd

    ct_path = shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")
    seg_path = shared_file("totalsegmentator-examples", "example_seg.nii.gz")
    labels = shared_file("totalsegmentator-examples", "example_seg_labels.json")
    rows = statistics_for_files(ct_path, seg_path, labels)
    ct = read_volume(ct_path)
    _, segs = read_segments(seg_path, labels)  # eager: every mask at once
    assert rows == compute_statistics(ct, segs)
    liver = [s for s in segs if s.name == "liver"]
    write_seg_nrrd(tmp_path / "liver.seg.nrrd", ct, liver)
    assert statistics_for_files(ct_path, tmp_path / "liver.seg.nrrd") == [r for r in rows if r["segment"] == "liver"]
