"""Load and overhead benchmark of `textseg serve` on loopback (real uvicorn, real worker processes).

    python benchmarks/bench_server.py --clients 4 --seconds 20 --workers 1

1. Overhead: a 512x512x200 int16 CT-like volume (synthetic; HU-like blocks), local Predictor vs
   RemotePredictor through the server, with the test-only synthetic adapter (its "inference" is a
   threshold, so the fixed costs of the server dominate; ``--delay`` adds emulated model time per
   prompt to see the overhead against a model that takes that long). Each step is timed.
2. Load: N concurrent clients, each with its own small image uploaded once (and its own client
   token, as N programs would have), submit jobs in a loop for a bounded time through
   RemotePredictor (which waits out 429 honouring Retry-After). Each result is checked against
   the local Predictor's voxel counts for that client's image. Reports throughput, p50/p95
   latency, 429 rejections, failed, wrong and lost jobs (accepted by the server but never
   returned); failed, wrong and lost must be 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedParseSlicer"))

from textseg.predictor import Predictor  # noqa: E402
from textseg.remote.client import RemotePredictor  # noqa: E402
from textseg.remote.server import Settings, running_server  # noqa: E402
from textseg.volume import Volume  # noqa: E402


class Counting(requests.Session):
    def __init__(self):
        super().__init__()
        self.status = {}
        self.lock = threading.Lock()

    def request(self, method, url, *a, **kw):
        r = super().request(method, url, *a, **kw)
        key = (method, "jobs" if url.rstrip("/").endswith("/v1/jobs") else "other", r.status_code)
        with self.lock:
            self.status[key] = self.status.get(key, 0) + 1
        return r


def ct_like(shape_kji, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    k, j, i = shape_kji
    arr = np.full(shape_kji, -1000, np.int16)  # air
    arr[:, j // 8 : 7 * j // 8, i // 8 : 7 * i // 8] = 40  # soft tissue body
    arr[:, j // 2 - j // 10 : j // 2 + j // 10, i // 2 - i // 16 : i // 2 + i // 16] = 700  # spine-like bone
    arr += rng.integers(-20, 20, size=shape_kji, dtype=np.int16)
    return Volume(arr, (0.8, 0.8, 1.5), (-200.0, -200.0, -150.0), np.eye(3))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def overhead(url, shape, delay, repeats, probabilities="uint8"):
    """Median times of local vs remote set_image + predict; each repeat uses a new image (so the
    remote side uploads it), after one warm-up round on each side."""
    prompts = ["bone", "soft tissue left"]
    lp = Predictor("synthetic-3d", device="cpu", delay=delay)
    rows = []
    for rep in range(repeats + 1):
        vol = ct_like(shape, seed=100 + rep)
        _, t_ls = timed(lambda: lp.set_image(vol, "CT"))  # noqa: B023 - runs in this iteration
        local, t_lp = timed(lambda: lp.predict(prompts))
        rp = RemotePredictor(url, "synthetic-3d", probabilities=probabilities)
        _, t_rs = timed(lambda: rp.set_image(vol, "CT"))  # noqa: B023 - runs in this iteration
        remote, t_rp = timed(lambda: rp.predict(prompts))  # noqa: B023 - runs in this iteration
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(remote, local))
        if rep:  # round 0 warms both sides up (first-touch memory, imports)
            rows.append((t_ls, t_lp, t_rs, t_rp))
    return [statistics.median(c) for c in zip(*rows)]


def load(url, clients, seconds, shape):
    sessions = [Counting() for _ in range(clients)]  # one per client: a RemotePredictor sets its token on its session
    lat, errors, done, wrong = [], [], [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    setup_jobs, setup_errors = [0], []

    def client(n):
        try:
            vol = ct_like(shape, seed=n)
            lp = Predictor("synthetic-3d", device="cpu")
            lp.set_image(vol, "CT")
            want = [r.voxel_count for r in lp.predict(["bone", "air left"])]
            rp = RemotePredictor(url, "synthetic-3d", session=sessions[n],
                                 client_token=f"bench-client-{n:04d}-{os.getpid()}")
            rp.set_image(vol, "CT")
        except Exception as exc:  # noqa: BLE001 - reported
            setup_errors.append(f"set-up: {type(exc).__name__}: {exc}")
            return
        with lock:
            setup_jobs[0] += 1
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                res = rp.predict(["bone", "air left"])
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                lat.append(time.perf_counter() - t0)
                done[0] += 1
                wrong[0] += [r.voxel_count for r in res] != want

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = {}
    for session in sessions:
        for k, v in session.status.items():
            st[k] = st.get(k, 0) + v
    accepted = sum(v for (m, p, s), v in st.items() if m == "POST" and p == "jobs" and s == 202) - setup_jobs[0]
    rejected = sum(v for (m, p, s), v in st.items() if m == "POST" and p == "jobs" and s == 429)
    lost = accepted - done[0] - len(errors)
    return {"jobs": done[0], "wall": wall, "throughput": done[0] / wall,
            "p50": np.percentile(lat, 50) if lat else float("nan"),
            "p95": np.percentile(lat, 95) if lat else float("nan"), "rejected": rejected, "failed": len(errors),
            "lost": lost,
            "wrong": wrong[0], "errors": setup_errors + errors[:3]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--queue-size", type=int, default=2)
    ap.add_argument("--size", default="512,512,200", help="i,j,k size of the overhead volume")
    ap.add_argument("--load-size", default="128,128,40", help="i,j,k size of each load client's volume")
    ap.add_argument("--delay", type=float, default=0.0, help="emulated model seconds per prompt (synthetic adapter)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--probabilities", default="uint8", choices=["uint8", "float32", "none"],
                    help="how the remote side returns probability maps (overhead part)")
    args = ap.parse_args(argv)
    size = tuple(int(x) for x in args.size.split(","))[::-1]
    load_size = tuple(int(x) for x in args.load_size.split(","))[::-1]
    settings = Settings(port=0, devices=("cpu",) * args.workers, show_test_models=True, queue_size=args.queue_size,
                        adapter_options={"synthetic-3d": {"delay": args.delay}}, preload=("synthetic-3d",),
                        log_level="WARNING")
    print(f"# textseg server benchmark: {os.cpu_count()} CPU cores, {args.workers} cpu worker(s), loopback")
    with running_server(settings) as url:
        if not args.skip_overhead:
            ls, lp, rs, rp = overhead(url, size, args.delay, args.repeats, args.probabilities)
            print(f"\n## Overhead, {'x'.join(map(str, size[::-1]))} int16 volume, 2 prompts, delay {args.delay:g} "
                  f"s/prompt (median of {args.repeats}, after a warm-up), probabilities {args.probabilities}\n")
            print("| step | local (s) | remote (s) | overhead (s) | overhead |")
            print("|---|---|---|---|---|")
            print(f"| set_image (remote: upload + prepare) | {ls:.2f} | {rs:.2f} | {rs - ls:.2f} | "
                  f"{100 * (rs - ls) / ls:.0f}% |")
            print(f"| predict (remote: job + masks + probabilities) | {lp:.2f} | {rp:.2f} | {rp - lp:.2f} | "
                  f"{100 * (rp - lp) / lp:.0f}% |")
            print(f"| total | {ls + lp:.2f} | {rs + rp:.2f} | {rs + rp - ls - lp:.2f} | "
                  f"{100 * (rs + rp - ls - lp) / (ls + lp):.0f}% |")
        r = load(url, args.clients, args.seconds, load_size)
        print(f"\n## Load: {args.clients} clients for {args.seconds:g} s, {'x'.join(map(str, load_size[::-1]))} "
              f"volumes, 2 prompts per job, queue size {args.queue_size}\n")
        print("| jobs done | throughput (jobs/s) | p50 latency (s) | p95 latency (s) | rejected (429, retried) | "
              "failed | wrong | lost |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {r['jobs']} | {r['throughput']:.2f} | {r['p50']:.3f} | {r['p95']:.3f} | {r['rejected']} | "
              f"{r['failed']} | {r['wrong']} | {r['lost']} |")
        for e in r["errors"]:
            print("error:", e)
        return 1 if (r["lost"] or r["wrong"] or r["failed"] or r["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
