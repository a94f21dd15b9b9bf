"""The predictor's own cost: slice batching, the slice cache, results and provenance, on the weight-free models.

Usage:

    python benchmarks/bench_predictor.py [--size 256,256,120] [--prompts 8] [--repeats 3] [--root CHECKOUT]

The synthetic adapters threshold the image (microseconds per slice), so what is timed is the predictor's
machinery around a model: ``set_image`` (canonical volume, preprocessing), ``predict`` (slice batches
encoded once and decoded per prompt group, probability maps put back on the input grid, masks, detection,
provenance) for the slice-wise (synthetic-2d) and volumetric (synthetic-3d) paths, and a second ``predict``
that reuses the slice cache. ``--root`` times another checkout's engine (e.g. before a refactor) with the
same script. Prints the best of ``--repeats`` runs, in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256,256,120", help="i,j,k size of the CT-like volume")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to time")
    args = ap.parse_args()
    sys.path.insert(0, str(args.root / "BiomedParseSlicer"))
    import textseg
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    i, j, k = (int(x) for x in args.size.split(","))
    rng = np.random.default_rng(0)
    arr = rng.integers(-1100, 1500, size=(k, j, i)).astype(np.int16)
    # a tilted, flipped grid: the canonical <-> input mapping is not the identity
    direction = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    vol = Volume(arr, (0.8, 0.8, 2.5), (10.0, -20.0, 30.0), direction)
    texts = ["bone", "air", "fat", "soft tissue", "bone left", "air right", "fat superior", "soft tissue inferior"]
    prompts = (texts * (args.prompts // len(texts) + 1))[: args.prompts]
    print(f"engine: {Path(textseg.__file__).parent}  volume {i}x{j}x{k} int16  {len(prompts)} prompts  "
          f"best of {args.repeats}")
    for model in ("synthetic-2d", "synthetic-3d"):
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            p = Predictor(model, device="cpu", batch_size=4)
            t0 = time.perf_counter()
            p.set_image(vol, "CT")
            t1 = time.perf_counter()
            results = p.predict(prompts)
            t2 = time.perf_counter()
            again = p.predict(prompts)
            t3 = time.perf_counter()
            assert [r.voxel_count for r in results] == [r.voxel_count for r in again]
            for name, s in (("set_image", t1 - t0), ("predict", t2 - t1), ("predict again", t3 - t2)):
                best[name] = min(best.get(name, np.inf), s)
        print(f"{model:14s} " + "  ".join(f"{n} {s:7.3f} s" for n, s in best.items()))


if __name__ == "__main__":
    main()
