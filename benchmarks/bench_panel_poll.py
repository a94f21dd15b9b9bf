"""How fast the panel's run finishes while Slicer's GUI thread keeps the GIL, for several poll settings.

    python benchmarks/bench_panel_poll.py --repeats 3

Inside Slicer the GUI thread holds Python's GIL even while Qt's event loop is idle (PythonQt's thread support
is off; neither CTK nor Slicer releases it), so the panel's worker thread, which talks to the local server,
advances only while the GUI thread runs Python: during the panel timer's poll. This runs the panel's own
path (BiomedParseSlicerLib.controller.PanelController.apply on a slicer-core scene, the real local server
process `textseg serve`, the worker thread, results into a segmentation node) on a real CT resampled to
512x512x200 (../shared/data/pyradiomics-examples/lung1_image.nrrd, 512x512x48), one prompt with the test-only
synthetic model (a threshold: the panel's own overhead dominates), and times Apply -> the poll that finds the
run done (the part the GIL starves) and that last poll (adding the segment and its 3D surface, on the GUI
thread), with a main loop that between two polls either
- keeps the GIL (ctypes.PyDLL's usleep does not release it), as Slicer's event loop does, or
- releases it (time.sleep): the GIL-free ideal,
for poll interval / GIL slice pairs (the slice is how long each poll waits on the task, releasing the GIL).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
os.environ["TEXTSEG_SHOW_TEST_MODELS"] = "1"  # the synthetic model, in this process and the server's

from BiomedParseSlicerLib import controller, headless, mrml, runner  # noqa: E402
from BiomedParseSlicerLib.controller import Inputs, PanelController  # noqa: E402
from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic  # noqa: E402

SHARED = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
LIBC = ctypes.PyDLL(None)
LIBC.usleep.argtypes = [ctypes.c_uint]
# (main loop, poll interval ms, GIL slice s); the first held row is the panel before the fix (100 ms, no slice)
SETTINGS = [("free", 100, 0.0), ("held", 100, 0.0), ("held", 20, 0.0), ("held", 100, 0.01), ("held", 50, 0.01),
            ("held", 50, 0.02), ("held", 30, 0.015)]


def ct_512x512x200(folder: Path) -> Path:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(SHARED / "pyradiomics-examples" / "lung1_image.nrrd"))
    size, spacing = list(img.GetSize()), list(img.GetSpacing())
    out = sitk.Resample(img, size[:2] + [200], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        spacing[:2] + [spacing[2] * size[2] / 200], img.GetDirection(), -1024, img.GetPixelID())
    path = folder / "ct_512x512x200.nrrd"
    sitk.WriteImage(out, str(path))
    return path


def run_once(ctl: PanelController, inputs: Inputs, loop: str, interval_ms: int) -> tuple:
    """(seconds from Apply to the poll that finds the run done, seconds that poll takes to add the segment, ticks)"""
    start = time.monotonic()
    view = ctl.apply(inputs)
    assert view.error is None, view.error
    ticks = 0
    while view.polling:
        if loop == "held":
            LIBC.usleep(interval_ms * 1000)  # Qt's event loop between timer ticks, GIL held
        else:
            time.sleep(interval_ms / 1000)
        before = time.monotonic()
        view = ctl.poll(inputs)
        ticks += 1
    done = time.monotonic()
    assert view.error is None and view.output_segmentation is not None, view.error
    inputs.volume.GetScene().RemoveNode(view.output_segmentation)
    return before - start, done - before, ticks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = headless.create()
        node = app.load_volume(ct_512x512x200(Path(tmp)))
        print(f"volume {node.GetImageData().GetDimensions()} ({mrml.array_from_node(node).nbytes / 2**20:.0f} MiB)")
        server = runner.LocalServer(device="cpu", log_path=Path(tmp) / "server.log")
        server.start()
        ctl = PanelController(BiomedParseSlicerLogic(scene=app.scene), server_factory=lambda device: server)
        # "bone left": a smaller segment than "bone", so adding it (and its 3D surface) does not dwarf the run
        inputs = Inputs(volume=node, model="synthetic-3d", modality="CT", site="lung", prompts="bone left",
                        device="cpu")
        try:
            run_once(ctl, inputs, "free", 100)  # warm up (imports, first job)
            runs = {setting: [] for setting in SETTINGS}
            for _ in range(args.repeats):  # round robin: load changes on a shared machine hit every setting alike
                for setting in SETTINGS:
                    loop, interval_ms, slice_s = setting
                    controller.GIL_SLICE_S = slice_s
                    runs[setting].append(run_once(ctl, inputs, loop, interval_ms))
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {args.repeats} runs each")
            print("| main loop between polls | poll interval | GIL slice per poll | Apply -> run done (median, "
                  "min-max) | adding the segment (median) | timer ticks |")
            print("|---|---|---|---|---|---|")
            for (loop, interval_ms, slice_s), done in runs.items():
                seconds = [r[0] for r in done]
                print(f"| {'GIL held (Slicer)' if loop == 'held' else 'GIL free'} | {interval_ms} ms | "
                      f"{slice_s * 1000:.0f} ms | {statistics.median(seconds):.2f} s "
                      f"({min(seconds):.2f}-{max(seconds):.2f}) | {statistics.median(r[1] for r in done):.2f} s | "
                      f"{statistics.median(r[2] for r in done):.0f} |")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
