"""SegVol: our engine vs the official code - seconds and peak memory, same input, device and weights.

Both sides read the same synthetic CT (NIfTI), use the same weights (the seeded recipe of
Testing/oracles/make_segvol_fixture.py, full size or the reduced oracle configuration) and run
text prompts with zoom-out-zoom-in. Upstream runs its own demo path (``process_ct_gt`` +
``inference_demo.zoom_in_zoom_out``, one category after the other); ours runs
``Predictor.set_image`` + ``predict`` (zoom-out embedding computed once, window embeddings cached).
Each measurement runs in a fresh process (upstream needs MONAI <= 1.3: give its Python).

    python benchmarks/bench_segvol.py --upstream /tmp/segvol-up --upstream-python /tmp/segvol-oracle/bin/python \\
        [--size 512 512 200] [--prompts 1 10] [--config full|reduced] [--device cpu|cuda]

Peak memory of the timed section: resident set size sampled every 5 ms (CPU) or torch.cuda.max_memory_allocated (GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak import Peak  # benchmarks/peak.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing" / "oracles"))
import make_segvol_fixture as oracle  # noqa: E402  (weight recipe, upstream setup; our own script)

NAMES = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "stomach", "aorta", "gallbladder",
         "esophagus", "bladder"]


def make_inputs(size, n, out: Path):
    import SimpleITK as sitk

    x, y, z = size
    ct, _ = oracle.synthetic_ct((x, y, z))
    label = np.zeros(size, np.uint8)  # upstream skips categories without a label: one stripe each
    for i in range(n):
        label[x // 4 : 3 * x // 4, y // 4 + i * (y // 2) // n : y // 4 + (i + 1) * (y // 2) // n,
              z // 4 : 3 * z // 4] = i + 1
    for arr, name in ((ct, "ct.nii.gz"), (label, "label.nii.gz")):
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        img.SetSpacing((0.8, 0.8, 2.0))
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # stored in RAS order: upstream (as stored) = ours (RAS)
        sitk.WriteImage(img, str(out / name))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def our_config(cfg: dict):
    sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
    from textseg.models.segvol.network import SegVolConfig

    return SegVolConfig(**dict(cfg, img_size=tuple(cfg["img_size"]), patch_size=tuple(cfg["patch_size"])))


def worker_weights(a, cfg: dict) -> dict:
    """Write the recipe weights as an HF-layout checkpoint (own process: keeps the timed ones lean)."""
    import torch

    sc = our_config(cfg)
    from textseg.models.segvol.network import CLIP_FLAT, CLIP_OFFICIAL, SegVolNet

    own = SegVolNet(sc).state_dict()
    official = {(CLIP_OFFICIAL + k[len(CLIP_FLAT):] if k.startswith(CLIP_FLAT) and not k.startswith(CLIP_OFFICIAL)
                 else k): v
                for k, v in own.items()}
    sd = {k: torch.from_numpy(oracle.recipe_tensor(k, official[k].shape, i)) for i, k in enumerate(sorted(official))}
    wdir = Path(a.work) / "weights"
    wdir.mkdir(exist_ok=True)
    torch.save({"model." + k: v for k, v in sd.items()}, wdir / "pytorch_model.bin")
    return {}


def worker_ours(a, cfg: dict) -> dict:
    sc, wdir = our_config(cfg), Path(a.work) / "weights"
    from textseg.catalog import get_model
    from textseg.formats.images import read_volume
    from textseg.models.segvol.adapter import SegVolAdapter
    from textseg.predictor import Predictor

    pred = Predictor(SegVolAdapter(get_model("segvol"), weights_dir=wdir, config=sc), device=a.device, seed=0)
    pred._ensure_loaded()  # model load is not timed on either side
    sync(a.device)
    with Peak(a.device) as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        pred.set_image(read_volume(Path(a.work) / "ct.nii.gz"), "CT")
        res = pred.predict(NAMES[: a.n])
        sync(a.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak.mb, "added_mb": peak.added_mb,
            "voxels": [int(r.mask.sum()) for r in res]}


def worker_upstream(a, cfg: dict) -> dict:
    import torch

    oracle.setup_upstream(Path(a.upstream).resolve())
    import inference_demo as demo
    from data_process.demo_data_process import process_ct_gt

    model, _ = oracle.build_upstream(Path(a.upstream).resolve(), cfg)
    model.to(a.device)
    if a.device.startswith("cuda"):  # the demo moves tensors with .cuda(); the oracle set-up made that a no-op
        del torch.Tensor.cuda
    args = argparse.Namespace(spatial_size=tuple(cfg["img_size"]), patch_size=tuple(cfg["patch_size"]),
                              infer_overlap=0.5,
                              use_zoom_in=True, use_text_prompt=True, use_box_prompt=False, use_point_prompt=False)
    sync(a.device)
    with Peak(a.device) as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        item = process_ct_gt(str(Path(a.work) / "ct.nii.gz"), str(Path(a.work) / "label.nii.gz"), NAMES[: a.n],
                             args.spatial_size)
        item = {k: torch.as_tensor(np.ascontiguousarray(np.asarray(v))) for k, v in item.items()}
        out = demo.zoom_in_zoom_out(args, model, item["image"].float().unsqueeze(0),
                                    item["zoom_out_image"].float().unsqueeze(0),
                                    item["label"].unsqueeze(0), item["zoom_out_label"].unsqueeze(0),
                                    categories=NAMES[: a.n])
        sync(a.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak.mb, "added_mb": peak.added_mb,
            "voxels": [int((torch.sigmoid(v[4]) > 0.5).sum()) for v in out.values()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="checkout of github.com/BAAI-DCAI/SegVol")
    ap.add_argument("--upstream-python", required=True, help="Python of an environment with MONAI <= 1.3")
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 200], help="x y z voxels")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--config", choices=["full", "reduced"], default="full")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--impl", nargs="+", choices=["upstream", "ours"], default=["upstream", "ours"],
                    help="which sides to run (upstream's time is linear in the prompts: it re-runs everything per "
                         "prompt)")
    ap.add_argument("--worker", choices=["ours", "upstream", "weights"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cfg = oracle.FULL if a.config == "full" else oracle.REDUCED
    if a.worker:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        r = {"ours": worker_ours, "upstream": worker_upstream, "weights": worker_weights}[a.worker](a, cfg)
        print("RESULT " + json.dumps(r))
        return
    import torch

    cpu = f"CPU ({torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else cpu
    rows = []
    with tempfile.TemporaryDirectory(prefix="segvol-bench-") as work:
        make_inputs(tuple(a.size), max(a.prompts), Path(work))
        jobs = [(0, "weights", sys.executable)]
        jobs += [(n, impl, py)
                 for n in a.prompts for impl, py in (("upstream", a.upstream_python), ("ours", sys.executable))
                 if impl in a.impl]
        for n, impl, py in jobs:
            cmd = [py, __file__, "--worker", impl, "--n", str(n), "--work", work, "--upstream", a.upstream,
                   "--upstream-python", a.upstream_python, "--config", a.config, "--device", a.device,
                   "--threads", str(a.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{impl} failed:\n{p.stderr[-3000:]}")
            if impl != "weights":
                rows.append((n, impl, json.loads(line[0][7:])))
    print(f"\nSegVol ({a.config} config), CT {'x'.join(map(str, a.size))}, device: {device_name}, text prompts, "
          f"zoom-out-zoom-in")
    print("peak MB: whole process during the run (CPU: RSS incl. libraries and weights); +MB: above its start")
    print(f"{'prompts':>7} | {'impl':<8} | {'seconds':>8} | {'CPU s':>8} | {'s/prompt':>8} | {'peak MB':>8} | "
          f"{'+MB':>6} | mask voxels")
    for n, impl, r in rows:
        print(f"{n:>7} | {impl:<8} | {r['seconds']:8.2f} | {r['cpu_s']:8.1f} | {r['seconds'] / n:8.2f} | "
              f"{r['peak_mb']:8.0f} | {r['added_mb']:6.0f} | {r['voxels'][:3]}{'...' if n > 3 else ''}")


if __name__ == "__main__":
    main()
