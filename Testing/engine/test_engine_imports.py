"""The predictor path needs no file-format or MONAI packages: a GPU machine for benchmarks (benchmarks/gpu_suite.py)
has none of SimpleITK, nibabel, pynrrd, slicerio or MONAI, and only the models that use one may need it (SegVol:
MONAI; SAT: nibabel's orientation helpers, for upstream's grid; deepbet: nibabel, through its own package;
benchmarks/gpu_prepare.py carries those wheels). Checked in a fresh interpreter that refuses to import them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("SimpleITK", "nibabel", "nrrd", "slicerio", "monai")

CHILD = r'''
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is refused by the test", name=name)

sys.meta_path.insert(0, Refuse())
import numpy as np

from textseg.predictor import Predictor
from textseg.volume import Volume
import textseg.remote.client, textseg.catalog, textseg.weights, textseg.presets
import textseg.models.sat.adapter, textseg.models.biomedparse.v1.adapter, textseg.models.biomedparse.v2.adapter
import textseg.models.deepbet.adapter  # deepbet itself is imported when the model runs

# the whole predictor contract on a test model, masks back on a tilted input grid
arr = np.full((12, 20, 24), -1000, np.int16)
arr[3:9, 5:15, 4:20] = 400
direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
vol = Volume(arr, (0.8, 0.9, 2.0), (10.0, -20.0, 5.0), direction)
p = Predictor("synthetic-3d", device="cpu")
p.set_image(vol, "CT")
(bone,) = p.predict(["bone"])
assert bone.voxel_count == 6 * 10 * 16, bone.voxel_count

# the models' own preprocessing (BiomedParse v2 and v1 slices; SAT below)
import torch
from textseg.models.biomedparse.v2 import preprocess as v2_preprocess
from textseg.models.biomedparse.v1.preprocess import preprocess_slice
from textseg.presets import get_preset
v2_preprocess.square_pad_resize(np.zeros((2, 20, 24), np.uint8))
img, pad = preprocess_slice(vol.canonical().array[4], get_preset("CT", "abdomen"), 64)
assert img.shape == (64, 64, 3)

loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded

# SAT's grid is upstream's, computed with nibabel's orientation helpers: the one file-format package it needs
BLOCKED.discard("nibabel")
from textseg.models.sat.preprocess import preprocess
from textseg.models.sat.window import split_3d
image, geo = preprocess(vol.canonical(), "CT")
assert image.ndim == 3 and len(split_3d(geo.shape)) >= 1
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
try:  # SegVol is built on MONAI: the refusal is real, and only that model needs it
    import textseg.models.segvol.adapter
except ImportError as exc:
    assert exc.name.split(".")[0] == "monai", exc
else:
    raise AssertionError("textseg.models.segvol.adapter imported without MONAI: the refusal does not work")
print("OK")
'''


def test_predictor_path_runs_without_file_format_and_monai_packages():
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT / "BiomedParseSlicer"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", CHILD, ",".join(BLOCKED)], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=240)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-2000:] + p.stderr[-4000:]
