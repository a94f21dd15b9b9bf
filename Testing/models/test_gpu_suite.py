"""The GPU suite's bookkeeping (benchmarks/gpu_suite.py, gpu_prepare.py, gpu_standins.py): it has one call on a lent
GPU to work, so what can go wrong without a GPU is checked here. No timings are asserted (the suite is a benchmark)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def rec(**kw):
    base = {"part": f"{kw['model']}/{kw['impl']}", "peak_mib": 2048.0, "base_mib": 1024.0, "voxels": [10, 20, 30]}
    return {**base, **kw}


def test_report_reads_targets_from_partial_results():
    suite = load("gpu_suite")
    records = [
        {"kind": "env", "part": "env", "device": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0", "torch": "2.11.0"},
        rec(kind="interactive", model="segvol", impl="ours", precision="fp32", prompts=1, first_s=10.0, set_image_s=6.0,
            further_s=[0.5, 0.7, 0.6]),
        rec(kind="e2e", model="segvol", impl="ours", precision="fp32", prompts=10, seconds=16.0),
        rec(kind="interactive", model="segvol", impl="ours", precision="bf16", prompts=1, first_s=5.0, further_s=[1.0]),
        rec(kind="e2e", model="segvol", impl="ours", precision="bf16", prompts=10, seconds=8.0,
            dice_vs_fp32=[0.99, 0.97] + [1.0] * 8),
        rec(kind="e2e", model="segvol", impl="upstream", precision="fp32", prompts=1, seconds=20.0, peak_mib=4096.0),
        rec(kind="e2e", model="segvol", impl="upstream", precision="fp32", prompts=10, seconds=80.0, peak_mib=4096.0),
        # v1 measured on 16 of 200 slices: the table extrapolates
        rec(kind="e2e", model="biomedparse-v1", impl="upstream", precision="fp32", prompts=1, seconds=2.0,
            slices=[92, 108], total_slices=200),
        # a model whose upstream part failed and whose bf16 run hit an error
        rec(kind="interactive", model="sat-pro", impl="ours", precision="fp32", prompts=1, first_s=4.0, further_s=[]),
        {"kind": "error", "part": "sat-pro/ours", "model": "sat-pro", "what": "interactive bf16",
         "error": "OutOfMemoryError: x"},
        {"kind": "server", "part": "server", "step": "set_image", "local_s": 1.0, "remote_s": 1.5, "overhead_s": 0.5,
         "overhead_pct": 50.0},
        {"kind": "server", "part": "server", "step": "first prompt", "local_s": 2.0, "remote_s": 2.1, "overhead_s": 0.1,
         "overhead_pct": 5.0},
    ]
    parts = {"sat-pro/upstream": {"status": "stopped at its budget", "seconds": 75.0, "budget_s": 75,
                                  "error": "Killed"}}
    md = suite.report({"meta": {"started": "now", "elapsed_s": 1.0}, "parts": parts, "records": records})
    line = next(ln for ln in md.splitlines() if ln.startswith("| segvol |"))
    assert "fp32 6.0 % ✓" in line and "bf16 20.0 % ✗" in line  # median further / first
    assert "20.00 / 10.00 (2.00x ✓)" in line and "80.00 / 16.00 (5.00x ✓)" in line
    assert "4.00 / 2.00 ✓" in line and "| 0.9700 |" in line
    assert "2.00 (≈25.00 all slices)" in md
    assert "OutOfMemoryError" in md and "stopped at its budget" in md
    assert "| set_image + first prompt | 3.00 | 3.60 | 0.600 | 20 % |" in md
    assert "NVIDIA H200" in md
    # nothing measured yet: still a report
    assert "## Targets" in suite.report({"meta": {}, "parts": {}, "records": []})


def test_a_part_over_its_budget_is_stopped_and_the_suite_goes_on(tmp_path):
    """--budget-scale makes every budget tiny: each part is stopped and recorded, the parts that need the input are not
    started, and the results are still written."""
    prepared = tmp_path / "prep"
    (prepared / "home").mkdir(parents=True)
    (prepared / "manifest.json").write_text(f'{{"python": "{sys.version_info[0]}.{sys.version_info[1]}"}}')
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--prepared", str(prepared), "--out",
                        str(out), "--work", str(tmp_path / "work"), "--dry-run", "--only", "deepbet/ours",
                        "--budget-scale", "0.0001", "--deadline", "120"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    data = json.loads((out / "results.json").read_text())
    assert data["parts"]["install"]["status"] == "ok"
    for part in ("env", "input"):
        assert data["parts"][part]["status"] == "stopped at its budget", (part, data["parts"][part])
    assert data["parts"]["deepbet/ours"] == {"status": "not started", "note": "no input images"}
    md = (out / "results.md").read_text()
    assert "| input | stopped at its budget |" in md and "| deepbet/ours | not started |" in md


def test_prepare_selects_pinned_files_and_checks_wheel_requirements(tmp_path):
    prep = load("gpu_prepare")
    sat = next(p for p in prep.PINS if p.key == "sat")
    assert prep.selected("model/dynamic-network-architectures-main/x/y.py", sat)
    assert not prep.selected("model/__pycache__/a.py", sat) and not prep.selected("demo/x.nii.gz", sat)
    v2 = next(p for p in prep.PINS if p.key == "biomedparse-v2")
    assert not prep.selected("src/model/pixel_decoder/ops/setup.py", v2)  # no build recipe travels

    def wheel(folder, name, requires):
        (tmp_path / folder).mkdir(exist_ok=True)
        with zipfile.ZipFile(tmp_path / folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}-1.0.dist-info/METADATA",
                       f"Name: {name}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))

    wheel("whl", "fastapi", ["starlette>=1", "pydantic", "anyio", "email-validator; extra == 'all'"])
    wheel("whl", "nibabel", ["numpy", "importlib-resources>=5; python_version < '3.12'"])
    assert prep.check_requirements(tmp_path, "3.12") == []
    wheel("whl", "odd", ["not-on-the-machine>=1"])
    assert prep.check_requirements(tmp_path, "3.12") == [
        "odd-1.0-py3-none-any.whl needs not-on-the-machine>=1, which is neither carried nor on the GPU machine"]


def test_standins_import_and_fail_loudly_when_used(tmp_path):
    standins = load("gpu_standins")
    standins.write(tmp_path)
    code = (
        "import torch; from detectron2.layers import Conv2d, get_norm; from detectron2.structures import ImageList\nc "
        "= Conv2d(3, 64, 3, padding=1, norm=get_norm('GN', 64), activation=torch.relu)\nassert c(torch.zeros(1, 3, 8, "
        "8)).shape == (1, 64, 8, 8)\nil = ImageList.from_tensors([torch.zeros(3, 5, 7), torch.zeros(3, 6, 4)], "
        "4)\nassert tuple(il.tensor.shape) == (2, 3, 8, 8) and il.image_sizes == [(5, 7), (6, 4)]\nfrom "
        "nltk.stem.lancaster import LancasterStemmer\nst = LancasterStemmer()  # built at import time upstream: must "
        "not fail\ntry:\n    st.stem('x') + 'y'\nexcept RuntimeError as e:\n    assert 'stand-in' in str(e)\nelse:\n   "
        " raise SystemExit(1)\nfrom mpi4py import MPI; assert MPI.COMM_WORLD.Get_rank() == 0\nprint('OK')\n")
    env = {"PYTHONPATH": str(tmp_path / "always"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.stdout.strip() == "OK", p.stderr[-2000:]


@pytest.mark.parametrize("shape,spacing",
                         [((8, 6, 4), (2.0, 3.0, 1.5)), ((4, 4, 4), (1.0, 1.0, 1.0))])  # even: whole-voxel offset
def test_input_resampling_keeps_the_centre_and_fills_outside(shape, spacing):
    import numpy as np

    models = load("gpu_models")
    rng = np.random.default_rng(0)
    src = rng.normal(size=shape).astype(np.float32)
    same = models.resample_centred(src, spacing, shape, spacing, -1024.0)
    assert np.allclose(same, src, atol=1e-5)  # the identity grid reproduces the image
    big = models.resample_centred(src, spacing, tuple(2 * s for s in shape), spacing, -1024.0)
    assert (big[0] == -1024).all() and (big[:, :, -1] == -1024).all()  # outside the source: the fill value
    half = tuple(s // 2 for s in shape)
    assert np.allclose(big[half[0]:half[0] + shape[0], half[1]:half[1] + shape[1], half[2]:half[2] + shape[2]], src,
                       atol=1e-5)
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = (5.0, -3.0, 2.0)
    a2 = models.centred_affine(aff, shape, tuple(2 * s for s in shape), spacing)
    centre = lambda a, n: a[:3, :3] @ ((np.asarray(n) - 1) / 2) + a[:3, 3]  # noqa: E731
    assert np.allclose(centre(aff, shape), centre(a2, tuple(2 * s for s in shape)))
