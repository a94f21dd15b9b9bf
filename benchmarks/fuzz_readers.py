"""A bigger seeded fuzz run of the image readers than CI's (Testing/test_reader_fuzz.py), with its numbers.

    .venv/bin/python benchmarks/fuzz_readers.py --seeds 101 102 103 --per-format 1000 --seg 200

Same mutations and judging as the test (Testing/fuzzing.py): per format, how many mutated inputs were read
(geometry confirmed by an independent oracle) or refused with one line, and every failure (another
exception, a message of several lines, the reader's safety net: a signal, the time or memory limit; or
geometry the oracle contradicts). It also reports how often the reader child had to be restarted and the
time per case. Exit status 1 when anything failed. Results: docs/input-and-presets.md.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[101])
    ap.add_argument("--per-format", type=int, default=1000, help="cases per seed for NIfTI, NRRD, MetaImage, DICOM")
    ap.add_argument("--seg", type=int, default=200, help="DICOM SEG cases per seed")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--timeout", type=float, default=20.0, help="time limit per read (s)")
    ap.add_argument("--max-memory-mb", type=float, default=512.0, help="memory a read may declare (MiB)")
    a = ap.parse_args()

    import logging
    import warnings

    logging.getLogger("nibabel").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    os.environ["TEXTSEG_READ_TIMEOUT"] = str(a.timeout)
    os.environ["TEXTSEG_READ_MAX_MEMORY_MB"] = str(a.max_memory_mb)
    import fuzzing
    from textseg import read_isolated
    from textseg.io import read_volume
    from textseg.writers import read_segments

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
