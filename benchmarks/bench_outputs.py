"""Time the writers and segment statistics; prints a table (no asserts).

Usage: TEXTSEG_SHARED_DATA=../shared/data python benchmarks/bench_outputs.py [--size 512 512 200]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedParseSlicer"))

from textseg.analysis.segment_stats import compute_statistics, statistics_for_files  # noqa: E402
from textseg.formats.segments import Segment, write_labelmap, write_seg_nrrd  # noqa: E402
from textseg.volume import Volume  # noqa: E402

SHARED = Path(os.environ.get("TEXTSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def timed(label, fn, rows):
    t = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 200], help="synthetic volume i j k")
    ap.add_argument("--segments", type=int, default=5)
    args = ap.parse_args()
    rows = []
    i, j, k = args.size
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(40, 20, (k, j, i)).astype(np.int16), (0.8, 0.8, 1.5))
    zz, yy, xx = np.ogrid[:k, :j, :i]
    segs = []
    for n in range(args.segments):
        c = rng.uniform(0.3, 0.7, 3) * (k, j, i)
        r = min(k, j, i) * 0.15
        segs.append(Segment(f"organ {n}",
                            (((zz - c[0]) / 1.0) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r).astype(np.uint8)))
    with tempfile.TemporaryDirectory() as d:
        timed(f"write .seg.nrrd ({args.segments} spheres, {i}x{j}x{k})",
              lambda: write_seg_nrrd(Path(d) / "a.seg.nrrd", vol, segs), rows)
        timed("write label map .nii.gz + labels.json", lambda: write_labelmap(Path(d) / "a.nii.gz", vol, segs), rows)
        timed(f"compute_statistics ({args.segments} segments)", lambda: compute_statistics(vol, segs), rows)
    ct, seg, labels = (SHARED / "totalsegmentator-examples" / n for n in ("example_ct_sm.nii.gz", "example_seg.nii.gz",
                                                                          "example_seg_labels.json"))
    if ct.exists():
        out = timed("statistics_for_files (TotalSegmentator 117-class map)",
                    lambda: statistics_for_files(ct, seg, labels), rows)
        rows[-1] = (rows[-1][0] + f", {len(out)} labels present", *rows[-1][1:])
    print(f"{'step':<72} {'seconds':>8} {'peak RSS MiB':>13}")
    for label, sec, rss in rows:
        print(f"{label:<72} {sec:8.2f} {rss:13.0f}")


if __name__ == "__main__":
    main()
