"""Time the three feature caches on CPU stand-ins: the predictor's slice cache (slice-wise models), SegVol's
window embeddings and SAT's window features. Prints one row per case: the first call on an image (cache
cold), the same prompts again (cache warm) and the network encodes counted in each.

Stand-ins (the test suite's own, so nothing is downloaded): the synthetic slice-wise model on a
64x256x256 volume; SegVol as ``Testing/models/test_segvol.py`` builds it (reduced random network
saved in the GitHub layout, loaded through the real loader) on the oracle CT; a tiny random SAT
(``Testing/models/test_sat_pipeline.tiny_sat``) on a 24x120x160 CT-like volume. Each step is run
``--repeat`` times; the best and median CPU seconds of the process are printed (torch on one thread).

Usage: python benchmarks/bench_feature_cache.py [--repeat 3] [--only slice segvol sat]

The budget is set with the adapter option ``feature_cache_bytes`` (one option for all three caches);
on a checkout older than that option the script passes the names of that time (``window_cache_bytes``
for SegVol, the predictor's ``cache_bytes``) so the same cases can be compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in ("Testing", "Testing/oracles", "Testing/models", "BiomedParseSlicer"):
    sys.path.insert(0, str(ROOT / p))

BUDGET = 1 << 30
try:
    import textseg.models.feature_cache  # noqa: F401

    NEW_OPTIONS = True
except ImportError:
    NEW_OPTIONS = False


def timed(fn, repeat):
    """Best and median CPU seconds of the process (one torch thread: robust to other load on the machine)."""
    out = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return min(out), statistics.median(out)


def bench_slice(repeat):
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    arr = (np.arange(64 * 256 * 256, dtype=np.float32).reshape(64, 256, 256) % 200) - 100
    vol = Volume(arr, (0.8, 0.8, 2.0))
    prompts = ["0..50", "20..100 left", "-100..0"]

    def cold():
        kw = {"feature_cache_bytes": BUDGET} if NEW_OPTIONS else {"cache_bytes": BUDGET}
        p = Predictor("synthetic-2d", device="cpu", batch_size=4, **kw)
        p.set_image(vol, modality="CT")
        p.predict(prompts)
        return p

    p = cold()
    n0 = p.adapter.calls["encode"]
    p.predict(prompts)
    warm_encodes = p.adapter.calls["encode"] - n0
    return {"cold": timed(cold, repeat), "warm": timed(lambda: p.predict(prompts), repeat),
            "encodes cold/warm": f"{n0}/{warm_encodes}"}


def bench_segvol(repeat):
    import torch
    from test_segvol import adapter_for, fixture_volume

    from textseg.prompts import Prompt

    fx = np.load(ROOT / "Testing/fixtures/segvol_oracle_zoom.npz")

    class Factory:
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    ad = adapter_for(fx, Factory())
    ad.options["feature_cache_bytes" if NEW_OPTIONS else "window_cache_bytes"] = BUDGET
    from textseg.models.base import RunContext

    ctx = RunContext(device=torch.device("cpu"))
    calls = []
    orig = ad.net.encode_image
    ad.net.encode_image = lambda x: (calls.append(1), orig(x))[1]
    vol = fixture_volume(fx).canonical()

    def cold():
        st = ad.encode(ad.prepare(vol, None, ctx), ctx)
        ad.decode(st, [Prompt("liver")], ctx)
        return st

    state = cold()
    n0 = len(calls)
    ad.decode(state, [Prompt("liver")], ctx)
    warm = len(calls) - n0
    return {"cold": timed(cold, repeat), "warm": timed(lambda: ad.decode(state, [Prompt("liver")], ctx), repeat),
            "encodes cold/warm": f"{n0}/{warm}"}


def bench_sat(repeat):
    from test_sat_pipeline import PATCH, tiny_sat

    from textseg.catalog import get_model
    from textseg.models.sat.adapter import SATAdapter
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    net, text = tiny_sat(Path(tempfile.mkdtemp(prefix="bench-sat")))
    arr = np.full((24, 120, 160), -900.0, np.float32)
    arr[2:22, 10:110, 8:150] = 60.0
    arr[6:16, 30:80, 30:90] = 400.0
    vol = Volume(arr, (1.6, 1.3, 4.0), (5.0, -3.0, 12.0), np.diag([-1.0, 1.0, -1.0]))
    calls = []
    real = net.encode
    net.encode = lambda x: calls.append(1) or real(x)

    def make():
        p = Predictor(SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=PATCH,
                                 feature_cache_bytes=BUDGET), device="cpu")
        p.set_image(vol, modality="CT")
        return p

    def cold():
        make().predict(["liver", "spleen"])

    p = make()
    calls.clear()
    p.predict(["liver", "spleen"])
    n0 = len(calls)
    p.predict(["liver", "spleen"])
    warm = len(calls) - n0
    return {"cold": timed(cold, repeat), "warm": timed(lambda: p.predict(["liver", "spleen"]), repeat),
            "encodes cold/warm": f"{n0}/{warm}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=["slice", "segvol", "sat"], choices=["slice", "segvol", "sat"])
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"options: {'feature_cache_bytes' if NEW_OPTIONS else 'per-cache names'}; budget {BUDGET >> 20} MiB")
    print(f"{'case':8} {'cold best/median CPU s':>22} {'warm best/median CPU s':>22} {'encodes cold/warm':>18}")
    for name in args.only:
        r = {"slice": bench_slice, "segvol": bench_segvol, "sat": bench_sat}[name](args.repeat)
        print(f"{name:8} {r['cold'][0]:9.3f}/{r['cold'][1]:<9.3f} {r['warm'][0]:9.3f}/{r['warm'][1]:<9.3f} "
              f"{r['encodes cold/warm']:>18}")


if __name__ == "__main__":
    main()
