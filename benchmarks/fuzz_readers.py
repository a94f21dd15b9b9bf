"""A bigger seeded fuzz run of the image readers than CI's (Testing/engine/test_reader_fuzz.py), with its numbers.

    .venv/bin/python benchmarks/fuzz_readers.py --seeds 101 102 103 --per-format 1000 --seg 200

Same mutations and judging as the test (Testing/fuzzing.py): per format, how many mutated inputs were read
(geometry confirmed by an independent oracle) or refused with one line, and every failure (another
exception, a message of several lines, the reader's safety net: a signal, the time or memory limit; or
geometry the oracle contradicts). It also reports how often the reader child had to be restarted and the
time per case. Exit status 1 when anything failed. Results: docs/input-and-presets.md.

``--checkout PATH`` fuzzes another checkout's read_volume instead (e.g. the commit before the reader checks),
each case in its own process under the same time limit, so that its crashes and hangs are counted too.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
sys.path.insert(0, str(ROOT / "Testing"))


_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from textseg.errors import TextsegError
from textseg.formats.images import read_volume
from textseg.formats.segments import read_segments
try:
    r = (read_volume if sys.argv[2] == "read_volume" else read_segments)(sys.argv[3])
    vol, n = (r[0], len(r[1])) if isinstance(r, tuple) else (r, 0)
    print(json.dumps({"shape": list(vol.array.shape), "spacing": list(vol.spacing), "origin": list(vol.origin),
                      "direction": vol.direction.ravel().tolist(), "metadata": vol.metadata, "segments": n},
                     default=str))
except TextsegError as e:
    print(json.dumps({"error": str(e)}))
except Exception as e:
    print(json.dumps({"other": type(e).__name__ + ": " + str(e)[:300]}))
"""


def _per_process_reader(checkout: Path, timeout: float, what: str):
    """read_volume / read_segments of another checkout, one process per call: a signal or a hang is reported
    with the same words as the reader child's safety net, so that the judge counts it as a failure."""
    import subprocess

    from textseg.errors import InputError
    from textseg.volume import Volume

    def read(path: Path):
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, str(checkout / "BiomedParseSlicer"), what, str(path)],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InputError(f"{path}: reading took longer than {timeout:g} s and was stopped") from None
        if r.returncode < 0:
            raise InputError(f"{path}: the image reader crashed (signal {-r.returncode})")
        lines = r.stdout.strip().splitlines()
        out = json.loads(lines[-1]) if lines else {"other": f"exit code {r.returncode}: {r.stderr[-300:]}"}
        if "error" in out:
            raise InputError(out["error"])
        if "other" in out:
            raise RuntimeError(out["other"])
        vol = Volume(np.broadcast_to(np.zeros((), np.uint8), tuple(out["shape"])), out["spacing"], out["origin"],
                     np.array(out["direction"]).reshape(3, 3), out["metadata"])
        return (vol, []) if what == "read_segments" else vol  # masks are not sent back
    return read


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[101])
    ap.add_argument("--per-format", type=int, default=1000, help="cases per seed for NIfTI, NRRD, MetaImage, DICOM")
    ap.add_argument("--seg", type=int, default=200, help="DICOM SEG cases per seed")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--timeout", type=float, default=20.0, help="time limit per read (s)")
    ap.add_argument("--max-memory-mb", type=float, default=512.0, help="memory a read may declare (MiB)")
    ap.add_argument("--checkout", help="fuzz this checkout's read_volume, one process per case")
    a = ap.parse_args()

    import logging
    import warnings

    logging.getLogger("nibabel").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    os.environ["TEXTSEG_READ_TIMEOUT"] = str(a.timeout)
    os.environ["TEXTSEG_READ_MAX_MEMORY_MB"] = str(a.max_memory_mb)
    import fuzzing

    from textseg.formats import read_isolated
    from textseg.formats.images import read_volume
    from textseg.formats.segment_files import read_segments

    if a.checkout:
        read_volume = _per_process_reader(Path(a.checkout), a.timeout, "read_volume")
        read_segments = _per_process_reader(Path(a.checkout), a.timeout, "read_segments")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="textseg-fuzz-"))
    shared = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    series = shared / "totalsegmentator-examples" / "example_ct_dicom"
    stats: dict = collections.defaultdict(collections.Counter)
    seconds: dict = collections.Counter()
    failures = []
    try:
        seeds = fuzzing.make_image_seeds(work / "seeds")
        seeds.update(fuzzing.make_dicom_seeds(work / "seeds", series if series.exists() else None))
        seeds["seg"] = fuzzing.make_seg_seed(work / "seeds", seeds["dicom_native"])
        counts = {"nifti": a.per_format, "nrrd": a.per_format, "meta": a.per_format, "dicom": a.per_format,
                  "seg": a.seg}
        for seed in a.seeds:
            rng = np.random.default_rng(seed)
            cases = work / f"cases_{seed}"
            cases.mkdir(parents=True, exist_ok=True)
            last = time.perf_counter()
            for case, outcome in fuzzing.run_cases(rng, cases, seeds, counts, read_volume, read_segments):
                now = time.perf_counter()
                seconds[case.fmt] += now - last
                last = now
                stats[case.fmt][outcome.kind] += 1
                if outcome.kind == "FAIL":
                    failures.append({"seed": seed, "case": case.path.name, "mutations": case.mutations,
                                     "detail": outcome.detail})
                if case.path.is_dir():
                    shutil.rmtree(case.path, ignore_errors=True)
                else:
                    case.path.unlink(missing_ok=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(sum(c.values()) for c in stats.values())
    print(f"{'format':8} {'cases':>7} {'read':>7} {'refused':>8} {'failed':>7} {'ms/case':>8}")
    for fmt in fuzzing.FORMATS:
        c = stats.get(fmt)
        if not c:
            continue
        n = sum(c.values())
        print(f"{fmt:8} {n:7d} {c['read']:7d} {c['refused']:8d} {c['FAIL']:7d} {1000 * seconds[fmt] / n:8.1f}")
    print(f"{total} cases, {len(failures)} failed, reader child started {read_isolated.reader_starts()} time(s)")
    for f in failures[:50]:
        print("FAIL", json.dumps(f))
    if a.json:
        Path(a.json).write_text(json.dumps({"seeds": a.seeds, "stats": {k: dict(v) for k, v in stats.items()},
                                            "seconds": dict(seconds), "failures": failures,
                                            "reader_starts": read_isolated.reader_starts()}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
