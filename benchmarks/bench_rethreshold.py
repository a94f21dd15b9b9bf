"""Time the kept-answer operations of textseg.analysis.confidence on a 512x512x200 map; prints a table.

The map is a smooth blob (a probability that falls off with the distance from the centre, so that a large
share of the voxels lies around any threshold, the costly case for masks); each step is timed ``--repeat``
times and the best and median are printed, with the peak resident memory of the process. One sanity check
only: the moved voxel of the edit check must be found.

``--cli`` also times ``textseg rethreshold`` end to end (in process: read the .seg.nrrd and the kept .nrrd map,
check the edit, re-threshold, write the .seg.nrrd atomically), the files written once by the engine's writers
into a temporary folder.

Usage: python benchmarks/bench_rethreshold.py [--size 512 512 200] [--repeat 5] [--cli]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedParseSlicer"))

from textseg.analysis.confidence import (  # noqa: E402
    MaskFingerprint,
    ModelAnswer,
    confidence,
    edited_since,
    rethreshold,
    to_uint8,
    uncertain_mask,
)


def smooth_map(i: int, j: int, k: int) -> np.ndarray:
    """float32 (k, j, i): 1 at the centre falling to 0 at the borders (a sphere-like object)."""
    z, y, x = np.ogrid[-1 : 1 : k * 1j, -1 : 1 : j * 1j, -1 : 1 : i * 1j]
    r2 = (x * x).astype(np.float32) + (y * y).astype(np.float32) + (z * z).astype(np.float32)
    return np.clip(np.float32(1.2) - r2, 0, 1, out=r2)


def timed(label: str, fn, repeat: int, rows: list):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append((label, min(times), statistics.median(times), rss))
    return fn()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 200], help="map size i j k")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cli", action="store_true", help="also time `textseg rethreshold` end to end")
    args = ap.parse_args()
    i, j, k = args.size
    rows: list = []
    prob = smooth_map(i, j, k)
    q = timed("to_uint8 (float32 -> uint8)", lambda: to_uint8(prob), args.repeat, rows)
    mask = prob >= 0.5
    out = np.empty(q.shape, bool)
    timed("rethreshold t=0.35 (new array)", lambda: rethreshold(q, 0.35), args.repeat, rows)
    timed("rethreshold t=0.62 (into out=)", lambda: rethreshold(q, 0.62, out=out), args.repeat, rows)
    timed("uncertain_mask band 0.1", lambda: uncertain_mask(q, 0.5, 0.1), args.repeat, rows)
    timed("confidence (mean, near threshold)", lambda: confidence(q, mask, 0.5, 0.9), args.repeat, rows)
    fp = timed("MaskFingerprint.of", lambda: MaskFingerprint.of(mask), args.repeat, rows)
    edited = mask.copy()
    edited.flat[np.flatnonzero(mask.flat[: mask.size // 2])[-1]] = False
    edited.flat[np.flatnonzero(~mask.flat[mask.size // 2 :])[0] + mask.size // 2] = True  # same count: hash decides
    assert timed("edited_since (one voxel moved)", lambda: edited_since(fp, edited), args.repeat, rows)
    answer = timed("ModelAnswer.from_uint8", lambda: ModelAnswer.from_uint8(q, mask, 0.5), args.repeat, rows)
    timed("ModelAnswer.original_mask", answer.original_mask, args.repeat, rows)
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            cli_rows(Path(tmp), q, mask, args.repeat, rows)
    n = q.size
    print(f"map {i}x{j}x{k} = {n / 1e6:.1f} M voxels; uint8 map {q.nbytes / 2**20:.1f} MiB "
          f"(float32 {4 * n / 2**20:.1f} MiB); kept answer {answer.nbytes / 2**20:.1f} MiB; "
          f"{int(mask.sum()) / n:.1%} of the voxels in the mask")
    print(f"{'step':40s} {'best s':>8s} {'median s':>9s} {'peak RSS MiB':>13s}")
    for label, best, median, rss in rows:
        print(f"{label:40s} {best:8.3f} {median:9.3f} {rss:13.0f}")


def cli_rows(folder: Path, q: np.ndarray, mask: np.ndarray, repeat: int, rows: list) -> None:
    """Files as `textseg segment --probabilities` writes them, then the command itself, timed."""
    from textseg.cli import main as cli
    from textseg.formats.probability_maps import reference_tag, write_probability_map
    from textseg.formats.segments import Segment, write_seg_nrrd
    from textseg.volume import Volume

    grid = Volume(np.zeros(q.shape, np.uint8), (0.7, 0.7, 1.5))
    seg, prob = folder / "ct.seg.nrrd", folder / "maps" / "liver.nrrd"
    t = time.perf_counter()
    write_probability_map(prob, grid, q)
    answer = ModelAnswer.from_uint8(q, mask, 0.5)
    write_seg_nrrd(seg, grid, [Segment("liver", mask.astype(np.uint8), tags={**answer.tags(),
                                                                              **reference_tag(prob, seg)})])
    print(f"(files written in {time.perf_counter() - t:.1f} s)")
    argv = ["-q", "rethreshold", str(seg), "--segment", "liver", "--threshold", "0.5", "--out",
            str(folder / "out.seg.nrrd"), "--overwrite"]
    timed("textseg rethreshold (CLI, files)", lambda: cli(argv), repeat, rows)


if __name__ == "__main__":
    main()
