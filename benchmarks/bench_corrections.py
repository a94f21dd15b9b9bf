"""Time the corrections metrics and the training-set export; prints a table (no asserts).

Compares textseg's surface distances (numpy surfaces + scipy KD-tree) with SimpleITK's dense Maurer distance
map and, if installed, MONAI's compute_hausdorff_distance on a liver-sized ellipsoid shifted by 3 voxels.

Usage: TEXTSEG_SHARED_DATA=../shared/data python benchmarks/bench_corrections.py [--size 512 512 300]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedParseSlicer"))

from textseg.analysis.corrections import compare_masks, compare_segmentations, surface_voxels  # noqa: E402
from textseg.formats.segments import Segment  # noqa: E402
from textseg.formats.training_sets import TrainingCase, export_nnunet  # noqa: E402
from textseg.volume import Volume  # noqa: E402

SHARED = Path(os.environ.get("TEXTSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def timed(label, fn, rows):
    t = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return out


def maurer_hd95(a, b, spacing):
    """The dense alternative: SimpleITK's Maurer distance map of each surface over the union's box."""
    import SimpleITK as sitk

    box = tuple(slice(int(nz[0]), int(nz[-1]) + 1) for nz in
                (np.flatnonzero((a | b).any(tuple(x for x in range(3) if x != ax))) for ax in range(3)))
    ea, eb = surface_voxels(a[box]), surface_voxels(b[box])

    def dist(edges):
        img = sitk.GetImageFromArray(edges.astype(np.uint8))
        img.SetSpacing(spacing)
        d = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False,
                                                                useImageSpacing=True))
        d[edges] = 0
        return d

    return max(np.percentile(dist(eb)[ea], 95), np.percentile(dist(ea)[eb], 95))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], help="synthetic grid i j k")
    ap.add_argument("--cases", type=int, default=4, help="cases in the export timing")
    args = ap.parse_args()
    i, j, k = args.size
    spacing = (0.8, 0.8, 1.5)
    kk, jj, ii = np.ogrid[:k, :j, :i]
    a = ((kk - k / 2) / (0.37 * k)) ** 2 + ((jj - j / 2) / (0.35 * j)) ** 2 + ((ii - i / 2) / (0.39 * i)) ** 2 <= 1
    b = np.roll(a, 3, axis=2)
    rows = []
    r = timed(f"compare_masks, ellipsoid of {int(a.sum())} voxels shifted 3 voxels ({i}x{j}x{k})",
              lambda: compare_masks(a, b, spacing), rows)
    print(f"textseg: hd95 {r.hd95_mm:.4f} mm, asd {r.asd_mm:.4f} mm")
    hd = timed("  same HD95 with SimpleITK Maurer distance maps", lambda: maurer_hd95(a, b, spacing), rows)
    print(f"Maurer: hd95 {hd:.4f} mm")
    try:
        import torch
        from monai.metrics import compute_hausdorff_distance

        ta, tb = (torch.from_numpy(np.ascontiguousarray(m.transpose(2, 1, 0)))[None, None] for m in (a, b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = timed("  same HD95 with MONAI compute_hausdorff_distance",
                       lambda: compute_hausdorff_distance(ta, tb, percentile=95, spacing=list(spacing)).item(), rows)
        print(f"MONAI: hd95 {hd:.4f} mm")
    except ImportError:
        print("MONAI not installed: its timing is skipped")
    ts = SHARED / "totalsegmentator-examples"
    if (ts / "example_seg.nii.gz").exists():
        out = timed("compare_segmentations, TotalSegmentator normal vs fast 117-class maps",
                    lambda: compare_segmentations(ts / "example_seg.nii.gz", ts / "example_seg_fast.nii.gz",
                                                  labels_a=ts / "example_seg_labels.json",
                                                  labels_b=ts / "example_seg_labels.json"), rows)
        rows[-1] = (rows[-1][0] + f" ({len(out)} rows)", *rows[-1][1:])
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(40, 20, (k, j, i)).astype(np.int16), spacing)
    grid = Volume(np.zeros((k, j, i), np.uint8), spacing)
    cases = [TrainingCase(vol, (grid, [Segment("organ", a.astype(np.uint8))]), f"case{n:03d}")
             for n in range(args.cases)]
    with tempfile.TemporaryDirectory() as d:
        timed(f"export_nnunet, {args.cases} cases of {i}x{j}x{k} int16", lambda: export_nnunet(
            cases, d, 500, "Bench", ["organ"], "CT"), rows)
        timed(f"export_nnunet again: {args.cases} cases verified and skipped", lambda: export_nnunet(
            cases, d, 500, "Bench", ["organ"], "CT"), rows)
    print(f"{'step':<90} {'seconds':>8} {'peak RSS MiB':>13}")
    for label, sec, rss in rows:
        print(f"{label:<90} {sec:8.2f} {rss:13.0f}")


if __name__ == "__main__":
    main()
