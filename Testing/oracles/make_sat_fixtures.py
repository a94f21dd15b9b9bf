"""Generate the SAT pipeline oracle fixtures from the OFFICIAL SAT code (zhaoziheng/SAT).

Run once in a scratch environment with upstream's MONAI (1.1.0); see Testing/fixtures/README.md
for the exact commands. Nothing of upstream is copied into this repository: this script imports
a checkout given on the command line and writes only inputs and outputs to Testing/fixtures/.

1. ``sat_preprocess.npz``: two crops of the real TotalSegmentator example images (CT in HU, MR),
   each given a different voxel spacing and orientation (permuted/flipped axes, one spacing within
   MONAI's 1e-3 tolerance of the target) so that every step does something, written to NIfTI and
   run through upstream ``data/inference_dataset.load_image`` (MONAI Orientationd RAS ->
   Spacingd (1, 1, 3) -> CropForegroundd -> Normalization). A wrapper around upstream's
   ``Normalization`` records its input (the MetaTensor before normalisation, with its affine).
2. ``sat_window_oracle.npz``: upstream ``Inference_Dataset`` + ``evaluate/inference_engine.inference``
   run end to end on the CT case with a deterministic stand-in network (``StandIn``: logits from the
   patch and patch-local coordinates) and stand-in text encoder (``TEXT``: 4 coefficients per label).
   The patch size is reduced (upstream hard-codes 288x288x96 in ``__getitem__`` and
   ``inference``: ``split_3d`` and ``compute_gaussian`` are wrapped to use ``PATCH``) so several
   windows overlap. The soft prediction (``prediction / accumulation``) is captured by a tensor
   subclass returned for upstream's ``torch.zeros``; the thresholded masks upstream saves are
   stored too.

Usage: RANK=0 python Testing/oracles/make_sat_fixtures.py <SAT checkout> [--upstream-commit C]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")) \
    / "totalsegmentator-examples"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# name: (source file, crop (x, y, z) slices, RAS affine columns (i, j, k) as direction * spacing,
#        origin, modality, (padding per axis, value)): the padding is a border of air (CT -1024 HU,
#        MR 0) so that CropForegroundd has something to crop.
CASES = {
    "ct": ("example_ct_sm.nii.gz", (slice(40, 80), slice(30, 66), slice(4, 24)),
           [[-0.85, 0, 0], [0, 0, 2.6], [0, -0.8, 0]], (-20.0, 35.5, 110.25), "CT", (((3, 5), (2, 0), (0, 4)), -1024)),
    "mr": ("example_mr_sm.nii.gz", (slice(30, 70), slice(20, 56), slice(2, 18)),
           [[-1.2, 0, 0], [0, -1.0004, 0], [0, 0, 2.2]], (168.6, 166.4, 29.0), "MRI", (((0, 6), (4, 3), (2, 2)), 0)),
}
# window oracle: labels, stand-in coefficients (a, b, c, e) per label, patch sizes
LABELS = ["liver", "kidney", "spleen"]
TEXT = {"liver": (1.5, 2.0, -1.0, 0.5), "kidney": (-0.7, 0.3, 3.0, -2.0), "spleen": (0.2, -4.0, 0.0, 1.0)}
PATCHES = {"overlap3": (12, 8, 10), "padded": (12, 20, 10)}
MAX_QUERIES = 2
BATCH = 2


def stand_in_logits(image_input, coeffs):
    """logits[b, n] = a_n * (c0 + c1 - c2) + b_n (u - .5) + c_n (v - .5) + e_n (t - .5); u, v, t the
    patch-local coordinates / size (float32). Shared with Testing/models/test_sat_pipeline.py."""
    import torch

    x = image_input.float()
    img = x[:, 0] + x[:, 1] - x[:, 2]
    h, w, d = img.shape[1:]
    u = (torch.arange(h, dtype=torch.float32) / h - 0.5)[:, None, None]
    v = (torch.arange(w, dtype=torch.float32) / w - 0.5)[None, :, None]
    t = (torch.arange(d, dtype=torch.float32) / d - 0.5)[None, None, :]
    out = [a * img + b * u + c * v + e * t for a, b, c, e in coeffs.tolist()]
    return torch.stack(out, dim=1)


def write_case(name, tmp):
    import nibabel as nib

    src, crop, cols, origin, modality, (pad, value) = CASES[name]
    arr = np.asarray(nib.load(str(DATA / src)).dataobj)[crop].astype(np.int16)
    arr = np.pad(arr, pad, constant_values=value)
    aff = np.eye(4)
    aff[:3, :3] = np.array(cols, float).T
    aff[:3, 3] = origin
    path = Path(tmp) / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return arr, aff, path, modality


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("upstream", type=Path)
    ap.add_argument("--upstream-commit", default="")
    a = ap.parse_args()
    os.environ.setdefault("RANK", "0")
    sys.path.insert(0, str(a.upstream))
    import data.inference_dataset as ds
    import evaluate.inference_engine as eng
    import torch

    torch.set_num_threads(1)
    out = {"upstream_commit": np.array(a.upstream_commit)}
    captured = {}
    orig_norm = ds.Normalization

    def recording_normalization(img, image_type):
        captured["pre"] = np.asarray(img.numpy()).copy()
        captured["affine"] = np.asarray(img.affine, dtype=np.float64).copy()
        return orig_norm(img, image_type)

    ds.Normalization = recording_normalization
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in CASES:
            arr, aff, path, modality = write_case(name, tmp)
            paths[name] = path
            img, *_ = ds.load_image({"image": str(path), "modality": modality, "label": []})
            out[f"{name}_input"] = arr
            out[f"{name}_affine"] = aff
            out[f"{name}_modality"] = np.array(modality)
            out[f"{name}_prenorm"] = captured["pre"][0]
            out[f"{name}_output"] = img.numpy()[0]
            out[f"{name}_output_affine"] = captured["affine"]
            print(name, arr.shape, "->", img.shape, img.dtype, captured["pre"].dtype)
        np.savez_compressed(FIXTURES / "sat_preprocess.npz", **out)

        # ---- window oracle -----------------------------------------------------------------
        win = {"upstream_commit": np.array(a.upstream_commit), "labels": np.array(LABELS),
               "coeffs": np.array([TEXT[k] for k in LABELS], np.float32)}
        jsonl = Path(tmp) / "ct.jsonl"
        jsonl.write_text(json.dumps({"image": str(paths["ct"]), "label": LABELS, "modality": "CT",
                                     "dataset": "oracle"}) + "\n")

        class TextEncoder:
            def eval(self):
                return self

            def __call__(self, labels, modality):
                assert modality == "ct"
                return torch.tensor([TEXT[k] for k in labels], dtype=torch.float32)

        class StandIn:
            def eval(self):
                return self

            def __call__(self, queries, image_input):
                return torch.cat([stand_in_logits(image_input, q) for q in queries], dim=1)

        real_split, real_gauss, real_torch = ds.split_3d, eng.compute_gaussian, eng.torch
        soft = []

        class Rec(torch.Tensor):
            def __truediv__(self, other):
                r = torch.Tensor.__truediv__(self, other)
                soft.append(r.as_subclass(torch.Tensor).clone())
                return r

        class TorchProxy:
            def __getattr__(self, k):
                return getattr(real_torch, k)

            @staticmethod
            def zeros(*args, **kw):
                return real_torch.zeros(*args, **kw).as_subclass(Rec)

        eng.torch = TorchProxy()
        for key, patch in PATCHES.items():
            ds.split_3d = lambda img, crop_size=None, p=patch: real_split(img, crop_size=list(p))
            eng.compute_gaussian = lambda size, p=patch, **kw: real_gauss(tuple(p), **kw)
            testset = ds.Inference_Dataset(str(jsonl), max_queries=MAX_QUERIES, batch_size=BATCH,
                                           patch_size=list(patch))
            batch = testset[0]
            soft.clear()
            nib_dir = Path(tmp) / f"out_{key}"
            nib_dir.mkdir()
            eng.inference(StandIn(), TextEncoder(), torch.device("cpu"), testset, [batch], str(nib_dir))
            import nibabel as nib

            masks = np.stack([np.asarray(nib.load(str(nib_dir / "oracle" / "seg_ct" / f"{k}.nii.gz")).dataobj)
                              for k in LABELS])
            prob = soft[0].numpy().astype(np.float32)
            assert prob.shape[0] == len(LABELS) and ((prob > 0.5) == (masks > 0)).all()
            boxes = [b for group in batch["batched_y1y2_x1x2_z1z2"] for b in group]
            win[f"{key}_patch"] = np.array(patch)
            win[f"{key}_boxes"] = np.array(boxes)
            win[f"{key}_probability"] = prob
            win[f"{key}_masks"] = masks.astype(np.uint8)
            win[f"{key}_gaussian"] = real_gauss(tuple(patch))
            win["image"] = batch["image"].numpy()[0]
            print(key, patch, len(boxes), "windows", prob.shape)
        np.savez_compressed(FIXTURES / "sat_window_oracle.npz", **win)
    return 0


if __name__ == "__main__":
    sys.exit(main())
