"""Reading speed of textseg.formats.images.read_volume against plain SimpleITK, on the real CT, the real DICOM series
and a 512x512x200 CT-sized volume (NIfTI .nii.gz and .nii).

    .venv/bin/python benchmarks/bench_readers.py --repeat 5

Modes: ``baseline`` is read_volume of another checkout given with ``--baseline`` (e.g. the commit before the
reader checks; it runs in a subprocess), ``sitk`` is SimpleITK alone (what the reader did before the checks; the DICOM
series with ImageSeriesReader), ``in-process`` is read_volume(isolate=False) (header checks + ITK), ``child`` is the
default read_volume (the same in the reader child, the array sent back through a pipe; the child already
running), ``child-cold`` includes starting the child (the first read of a process). Median seconds over the
repeats, wall clock and CPU (this process and the reader child; less sensitive to a busy machine).
Results: docs/input-and-presets.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))


def _sitk(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        r = sitk.ImageSeriesReader()
        r.SetFileNames(r.GetGDCMSeriesFileNames(str(path)))
        return sitk.GetArrayFromImage(r.Execute())
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _baseline(checkout: str, path: Path, repeat: int) -> float:
    code = (f"import sys, time, statistics; sys.path.insert(0, {str(Path(checkout) / 'BiomedParseSlicer')!r})\n"
            "from textseg.formats.images import read_volume\n"
            f"p = {str(path)!r}; read_volume(p); ts = []; cs = []\n"
            f"for _ in range({repeat}):\n"
            "    t, c = time.perf_counter(), time.process_time(); read_volume(p)\n"
            "    ts.append(time.perf_counter() - t); cs.append(time.process_time() - c)\n"
            "print(statistics.median(ts), statistics.median(cs))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall, cpu = out.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def _cpu() -> float:
    """CPU seconds of this process and of the reader child (if running)."""
    from textseg.formats import read_isolated

    total = time.process_time()
    proc = read_isolated._READER._proc
    if proc is not None and proc.poll() is None:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", help="a checkout whose read_volume is timed too (its BiomedParseSlicer/ is imported)")
    a = ap.parse_args()
    import SimpleITK as sitk

    from textseg.formats import read_isolated
    from textseg.formats.images import read_volume

    shared = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "totalsegmentator-examples"
    tmp = Path(tempfile.mkdtemp(prefix="textseg-bench-"))
    big = (np.random.default_rng(0).normal(0, 300, (200, 512, 512))).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(tmp / "ct512.nii.gz"), useCompression=True)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(tmp / "ct512.nii"))
    inputs = [shared / "example_ct.nii.gz", shared / "example_ct_dicom", tmp / "ct512.nii.gz", tmp / "ct512.nii"]
    rows = {}
    for path in inputs:
        row = {"baseline": _baseline(a.baseline, path, a.repeat) if a.baseline else (float("nan"), float("nan"))}
        for mode, fn in (("sitk", lambda p: _sitk(p)), ("in-process", lambda p: read_volume(p, isolate=False)),
                         ("child", lambda p: read_volume(p))):
            fn(path)  # warm the page cache and the child
            walls, cpus = [], []
            for _ in range(a.repeat):
                t, c = time.perf_counter(), _cpu()
                fn(path)
                walls.append(time.perf_counter() - t)
                cpus.append(_cpu() - c)
            row[mode] = (statistics.median(walls), statistics.median(cpus))
        cold = []
        for _ in range(a.repeat):
            read_isolated._READER.close()
            t = time.perf_counter()
            read_volume(path)
            cold.append(time.perf_counter() - t)
        row["child-cold"] = (statistics.median(cold), float("nan"))
        rows[path.name] = row
    for i, what in ((0, "wall clock"), (1, "CPU")):
        print(f"\n{what} (median s of {a.repeat})")
        print(f"{'input':22} {'baseline':>9} {'sitk':>7} {'in-process':>11} {'child':>7} {'child-cold':>11}")
        for name, row in rows.items():
            print(f"{name:22} {row['baseline'][i]:9.3f} {row['sitk'][i]:7.3f} {row['in-process'][i]:11.3f} "
                  f"{row['child'][i]:7.3f} {row['child-cold'][i]:11.3f}")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
