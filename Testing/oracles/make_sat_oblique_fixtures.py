"""Generate SAT's tilted / oblique oracle fixtures from the OFFICIAL SAT code (zhaoziheng/SAT) and MONAI 1.1.

Run once in a scratch environment with upstream's MONAI (1.1.0), nibabel, SimpleITK, torch, transformers,
einops and positional-encodings; see Testing/fixtures/README.md for the exact commands. Nothing of upstream is
copied into this repository: this script imports a checkout given on the command line and writes only inputs
(as recipes) and outputs to Testing/fixtures/.

1. ``sat_grid_oracle.npz`` (header only, no voxels): for each case of ``GRID_CASES`` (an input NIfTI affine
   as stored, i.e. float32 values, and an input shape) upstream's own ``Orientationd("RAS")`` +
   ``Spacingd(pixdim=(1, 1, 3), bilinear)`` (the transforms of ``data/inference_dataset.load_image``, built
   from that file) run on a MetaTensor of the case's shape; ``SpatialResample`` is replaced by a recorder
   that keeps the output shape and affine Spacing asks for (the grid is decided before resampling; no case is
   at 1 x 1 x 3 mm already, where SpatialResample would return the input unchanged: asserted). Cases: the
   512x512x200 CT of 0.8x0.8x1.5 mm tilted 0 / 0.001 / 0.05 / 0.5 / 1 / 5 / 20 degrees about R; 512x512x60
   of 0.7x0.7x5 mm rotated 0.5 / 5 / 20 degrees about S; axis-aligned half-voxel ties at several origins;
   LPS- and sagittally-stored versions; a spacing within MONAI's 1e-3 mm of the target; rotations of 44 and
   46 degrees; and ``niivsitk``: a small oblique file written by nibabel whose float32 header and the
   geometry SimpleITK reads from it (float32 again, as ITK would write it) lead upstream to different grids
   (the first of seeded random geometries; both upstream answers are stored: ``niivsitk_*`` for the file,
   ``niivsitk_itk_*`` for the affine ITK would write).
2. ``sat_oblique_oracle.npz``: a crop of the real chest CT ``pyradiomics-examples/lung1_image.nrrd``
   (``CROP``) rotated through its header only (``ROTATIONS``: ``tilt`` 15 degrees about R, ``oblique`` 20
   degrees about S then 10 about R, about the crop's centre; voxels unchanged), written as NIfTI with
   SimpleITK (as ITK / Slicer write it), then run through upstream end to end: ``load_image`` (the
   preprocessed image and its affine) and ``Inference_Dataset`` + ``evaluate/inference_engine.inference``
   with upstream's reduced ``Maskformer`` (``make_sat_fixture.REDUCED``; weights from
   that script's recipe, seed ``SEED``, at a 64x64x32 patch) and its ``Knowledge_Encoder`` over the same tiny MPNet
   (seed + 1),
   called through upstream's ``Text_Encoder.forward``; ``PROMPTS`` on modality CT. Upstream hard-codes the
   288x288x96 patch in ``__getitem__`` and ``inference``: ``split_3d`` and ``compute_gaussian`` are wrapped
   to use ``PATCH``; the soft prediction (``prediction / accumulation``) is captured by a tensor subclass
   returned for upstream's ``torch.zeros`` (as in make_sat_fixtures.py).

Patches (scratch only): ``torch.cuda.current_device`` -> 'cpu'; ``DistributedDataParallel`` -> a wrapper
holding ``.module``; CUDA ``autocast`` is a no-op on a CPU (upstream's float32 path).

Usage: RANK=0 python Testing/oracles/make_sat_oblique_fixtures.py <SAT checkout> --upstream-commit C
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# ---- recipes (numpy only: the tests import them) -------------------------------------------------
SOURCE = ("pyradiomics-examples", "lung1_image.nrrd")  # 512x512x48 chest CT, 0.5703125 x 0.5703125 x 5 mm, LPS
CROP = (slice(14, 36), slice(120, 240), slice(160, 353))  # [k, j, i] of the source array: chest wall, sternum, lungs
# (193 columns: 192 x 0.5703125 / 1 + 1 = 110.5, a half-voxel tie that upstream rounds by float noise)
# rotations in degrees about the patient's R, A or S axis, applied in this order, about the crop's centre
ROTATIONS = {"tilt": (("R", 15.0),), "oblique": (("S", 20.0), ("R", 10.0))}
PROMPTS = ["lung", "aorta", "heart"]
PATCH = (64, 64, 32)  # the smallest patch whose bottleneck has more than one voxel per channel (instance norm)
MAX_QUERIES = 2  # two query chunks for three prompts
BATCH = 2

F_LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about the RAS axis R, A or S."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = {"R": (1, 2), "A": (2, 0), "S": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def rotated(steps) -> np.ndarray:
    r = np.eye(3)
    for axis, deg in steps:
        r = rotation(axis, deg) @ r
    return r


def rotate_geometry(spacing, origin, direction, size, steps):
    """(origin, direction) in LPS of a grid rotated about its centre by ``steps`` (RAS axes); spacing and
    size unchanged."""
    d = np.asarray(direction, float).reshape(3, 3)
    o = np.asarray(origin, float)
    centre = o + d @ (np.asarray(spacing, float) * (np.asarray(size, float) - 1) / 2)
    r = F_LPS @ rotated(steps) @ F_LPS
    return tuple(centre + r @ (o - centre)), r @ d


def crop_geometry(spacing, origin, direction, crop=CROP):
    """Origin of the crop (``crop`` slices [k, j, i]) and its size (i, j, k)."""
    d = np.asarray(direction, float).reshape(3, 3)
    start = np.array([crop[2].start, crop[1].start, crop[0].start], float)
    size = tuple(s.stop - s.start for s in crop[::-1])
    return tuple(np.asarray(origin, float) + d @ (np.asarray(spacing, float) * start)), size


def ras_affine(spacing, origin, direction) -> np.ndarray:
    """4x4 RAS affine (float64) of an LPS geometry."""
    a = np.eye(4)
    a[:3, :3] = F_LPS @ np.asarray(direction, float).reshape(3, 3) @ np.diag(spacing)
    a[:3, 3] = F_LPS @ np.asarray(origin, float)
    return a


def as_stored(affine) -> np.ndarray:
    """The affine as a NIfTI sform holds it (float32 values)."""
    return np.asarray(affine, np.float64).astype(np.float32).astype(np.float64)


def _case(rot_steps, spacing, shape, centre_ras, storage=((0, 1), (1, 1), (2, 1))):
    """A stored affine for ``shape`` (i, j, k) with ``spacing``: RAS axes rotated by ``rot_steps`` and the grid
    centred on ``centre_ras``; ``storage``: for i, j, k the RAS axis (0, 1, 2) and direction (+1/-1)."""
    cols = np.zeros((3, 3))
    for idx, (ax, sign) in enumerate(storage):
        cols[ax, idx] = sign * spacing[idx]
    m = rotated(rot_steps) @ cols
    a = np.eye(4)
    a[:3, :3] = m
    a[:3, 3] = np.asarray(centre_ras, float) - m @ ((np.asarray(shape, float) - 1) / 2)
    return as_stored(a), tuple(int(n) for n in shape)


def grid_cases():
    """name -> (stored affine, shape (i, j, k)) of the header-only cases."""
    cases = {}
    for deg in (0.0, 0.001, 0.05, 0.5, 1.0, 5.0, 20.0):
        cases[f"ct512_tilt{deg:g}"] = _case((("R", deg),), (0.8, 0.8, 1.5), (512, 512, 200), (0.3, -20.6, -150.25))
    for deg in (0.5, 5.0, 20.0):
        cases[f"ct512x60_rotS{deg:g}"] = _case((("S", deg),), (0.7, 0.7, 5.0), (512, 512, 60), (1.5, 10.25, 80.0))
    for oz in (-301.3, -0.7, 12.25, 407.9):  # (200 - 1) x 1.5 / 3 + 1 = 100.5: a tie on every axis-aligned file
        cases[f"tie_axial_z{oz:g}"] = _case((), (0.8, 0.8, 1.5), (512, 512, 200), (-3.1, 17.4, oz))
    lps = ((0, -1), (1, -1), (2, 1))  # as DICOM / ITK store axial slices
    cases["lps_oblique"] = _case((("S", 20.0), ("R", 10.0)), (0.7, 0.7, 1.5), (256, 256, 120), (10, -40, 60), lps)
    sag = ((1, -1), (2, -1), (0, 1))  # sagittal acquisition: i -> P, j -> I, k -> R
    cases["sagittal_tilt"] = _case((("R", 7.0),), (0.9, 0.9, 3.3), (256, 320, 40), (5, 5, 5), sag)
    cases["kept_spacing_oblique"] = _case((("A", 12.0), ("S", 3.0)), (1.0004, 1.0004, 2.5), (200, 180, 64), (0, 0, 0))
    for deg in (44.0, 46.0):
        cases[f"rot{deg:g}_S_R"] = _case((("S", deg), ("R", 30.0)), (0.75, 0.75, 2.0), (300, 280, 90), (-8, 20, -30))
    cases["small_oblique"] = _case((("S", 20.0), ("R", 10.0)), (0.5703125, 0.5703125, 5.0), (100, 100, 12), (3, 5, 7))
    return cases


SEARCH_SEED = 7  # the niivsitk search's random oblique geometries


def digest(a: np.ndarray) -> str:
    """SHA-256 of a float32 array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def recipe_volume_array(arr_kji: np.ndarray) -> np.ndarray:
    """The crop of the source CT (array [k, j, i])."""
    return np.ascontiguousarray(arr_kji[CROP])


# ---- the run (upstream imports only here) ---------------------------------------------------------------
def upstream_grid_run(shape, affine):
    """Upstream's Orientationd + Spacingd grid of a (shape, affine) file: (RAS affine after Orientation,
    output shape, output affine)."""
    import monai.transforms.spatial.array as sa
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    rec = {}
    real = sa.SpatialResample.__call__

    def record(self, img, dst_affine=None, spatial_size=None, **kw):
        rec["src"] = np.asarray(img.affine, np.float64).copy()
        rec["dst"] = np.asarray(dst_affine, np.float64).copy()
        rec["shape"] = [int(x) for x in spatial_size]
        assert rec["shape"] != list(img.shape[1:]) or not np.allclose(rec["src"], rec["dst"], atol=1e-3)
        return img

    sa.SpatialResample.__call__ = record
    try:
        img = MetaTensor(torch.zeros((1,) + tuple(shape), dtype=torch.uint8), affine=torch.as_tensor(affine))
        Spacing(pixdim=(1, 1, 3), mode="bilinear")(Orientation(axcodes="RAS")(img))
    finally:
        sa.SpatialResample.__call__ = real
    return rec["src"], tuple(rec["shape"]), rec["dst"]


def check_load_image_transforms() -> None:
    """load_image's transforms are the ones the grid recorder runs (same arguments)."""
    import inspect

    import data.inference_dataset as ds

    src = inspect.getsource(ds.load_image)
    assert 'Orientationd(axcodes=orientation_code' in src and "pixdim=(1, 1, 3)" in src and 'mode=("bilinear")' in src


def make_grid_fixture(out_path: Path, commit: str) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    out = {"upstream_commit": np.array(commit)}
    names = []
    for name, (aff, shape) in grid_cases().items():
        a1, oshape, oaff = upstream_grid_run(shape, aff)
        out[f"{name}_affine"], out[f"{name}_shape"] = aff, np.array(shape)
        out[f"{name}_ras_affine"], out[f"{name}_out_shape"], out[f"{name}_out_affine"] = a1, np.array(oshape), oaff
        names.append(name)
        print(name, shape, "->", oshape)
    # a small oblique file (nibabel) whose header and the geometry SimpleITK reads from it give different grids
    rng = np.random.default_rng(SEARCH_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.nii.gz"
        for _ in range(5000):
            steps = (("S", float(rng.uniform(-40, 40))), ("R", float(rng.uniform(-40, 40))))
            shape = tuple(int(x) for x in rng.choice([20, 21, 40, 41], 3))
            aff, _ = _case(steps, tuple(float(x) for x in rng.choice([0.5, 0.7, 0.8, 1.5, 2.5, 5.0], 3)), shape,
                           rng.uniform(-100, 100, 3))
            nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), aff), str(path))
            assert np.array_equal(nib.load(str(path)).affine, aff)
            img = sitk.ReadImage(str(path))
            itk = as_stored(ras_affine(img.GetSpacing(), img.GetOrigin(), np.array(img.GetDirection()).reshape(3, 3)))
            if np.array_equal(itk, aff):
                continue
            got, got_itk = upstream_grid_run(shape, aff), upstream_grid_run(shape, itk)
            if got[1] != got_itk[1] or np.abs(got[2] - got_itk[2]).max() > 1e-3:
                out["niivsitk_affine"], out["niivsitk_shape"] = aff, np.array(shape)
                out["niivsitk_ras_affine"], out["niivsitk_out_shape"], out["niivsitk_out_affine"] = \
                    got[0], np.array(got[1]), got[2]
                out["niivsitk_itk_affine"] = itk
                out["niivsitk_itk_ras_affine"], out["niivsitk_itk_out_shape"], out["niivsitk_itk_out_affine"] = \
                    got_itk[0], np.array(got_itk[1]), got_itk[2]
                print("niivsitk", shape, got[1], got[2][:3, 3], "vs ITK's", got_itk[1], got_itk[2][:3, 3])
                break
        else:
            raise SystemExit("no discriminating nibabel/ITK case found")
    out["names"] = np.array(names)
    np.savez_compressed(out_path, **out)


def make_oblique_fixture(up: Path, out_path: Path, commit: str) -> None:
    import nibabel as nib
    import SimpleITK as sitk
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_sat_fixture as msf

    class DDP(torch.nn.Module):  # stands for DistributedDataParallel: holds .module, no process group
        def __init__(self, module, device_ids=None, **kw):
            super().__init__()
            self.module = module

        def forward(self, *args, **kw):
            return self.module(*args, **kw)

    torch.nn.parallel.DistributedDataParallel = DDP
    mods = msf.import_upstream(up)
    msf.PATCH = list(PATCH)  # reduced Maskformer at this patch size (the weights do not depend on it)
    import data.inference_dataset as ds
    import evaluate.inference_engine as eng
    from model.text_encoder import Text_Encoder

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = msf.reduced_maskformer(mods)
    net_keys = msf.fill(net, msf.SEED)
    src = sitk.ReadImage(str(DATA.joinpath(*SOURCE)))
    arr = recipe_volume_array(sitk.GetArrayFromImage(src))
    spacing = tuple(src.GetSpacing())
    o, size = crop_geometry(spacing, src.GetOrigin(), src.GetDirection())
    out = {"upstream_commit": np.array(commit), "seed": np.int64(msf.SEED), "config": json.dumps(dict(msf.REDUCED,
           patch_size=list(PATCH))), "net_keys": np.array(net_keys), "net_sha256": msf.digest(net.state_dict()),
           "text_config": json.dumps(msf.TEXT_CONFIG), "vocab": np.array(msf.VOCAB), "prompts": np.array(PROMPTS),
           "patch": np.array(PATCH), "input_sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
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
    ds.split_3d = lambda img, crop_size=None: real_split(img, crop_size=list(PATCH))
    eng.compute_gaussian = lambda size, **kw: real_gauss(tuple(PATCH), **kw)
    captured = {}
    orig_norm = ds.Normalization

    def recording_normalization(img, image_type):
        captured["affine"] = np.asarray(img.affine, np.float64).copy()
        captured["prenorm"] = np.asarray(img.numpy()[0], np.float32).copy()
        return orig_norm(img, image_type)

    ds.Normalization = recording_normalization
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ke = msf.tiny_text_encoder(mods, tmp)
        text_keys = msf.fill(ke, msf.SEED + 1)
        out["text_keys"], out["text_sha256"] = np.array(text_keys), msf.digest(ke.state_dict())
        text = Text_Encoder.__new__(Text_Encoder)
        torch.nn.Module.__init__(text)
        text.model = DDP(ke)
        for case, steps in ROTATIONS.items():
            origin, direction = rotate_geometry(spacing, o, src.GetDirection(), size, steps)
            path = tmp / f"{case}.nii.gz"
            affine = ras_affine(spacing, origin, direction)
            nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), affine), str(path))
            out[f"{case}_origin"], out[f"{case}_direction"] = np.array(origin), direction
            out[f"{case}_nifti_affine"] = np.asarray(nib.load(str(path)).affine, np.float64)
            assert np.array_equal(out[f"{case}_nifti_affine"], as_stored(affine))
            image, *_ = ds.load_image({"image": str(path), "modality": "CT", "label": []})
            image = image.numpy()[0]
            out[f"{case}_output_shape"], out[f"{case}_output_sha256"] = np.array(image.shape), digest(image)
            out[f"{case}_output_sub"] = image[::2, ::2, ::2]
            out[f"{case}_output_sums"] = np.array([image.astype(np.float64).sum(),
                                                   (image.astype(np.float64) ** 2).sum()])
            out[f"{case}_output_affine"] = captured["affine"]
            out[f"{case}_prenorm_sha256"] = digest(captured["prenorm"])  # resampled + cropped, before normalisation
            jsonl = tmp / f"{case}.jsonl"
            jsonl.write_text(json.dumps({"image": str(path), "label": PROMPTS, "modality": "CT",
                                         "dataset": "oracle"}) + "\n")
            testset = ds.Inference_Dataset(str(jsonl), max_queries=MAX_QUERIES, batch_size=BATCH,
                                           patch_size=list(PATCH))
            batch = testset[0]
            assert np.array_equal(batch["image"].numpy()[0], image)
            soft.clear()
            nib_dir = tmp / f"out_{case}"
            nib_dir.mkdir()
            eng.inference(net, text, torch.device("cpu"), testset, [batch], str(nib_dir))
            masks = np.stack([np.asarray(nib.load(str(nib_dir / "oracle" / f"seg_{case}" / f"{p}.nii.gz")).dataobj)
                              for p in PROMPTS])
            prob = soft[0].numpy().astype(np.float32)
            assert ((prob > 0.5) == (masks > 0)).all()
            out[f"{case}_probability_sub"] = prob[:, ::2, ::2, ::2]
            out[f"{case}_probability_sums"] = prob.astype(np.float64).sum((1, 2, 3))
            out[f"{case}_masks"] = np.packbits(masks > 0, axis=None)
            out[f"{case}_boxes"] = np.array([b for group in batch["batched_y1y2_x1x2_z1z2"] for b in group])
            print(case, arr.shape, "->", prob.shape, len(out[f"{case}_boxes"]), "windows; mask voxels",
                  masks.reshape(len(PROMPTS), -1).sum(1))
    np.savez_compressed(out_path, **out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("upstream", type=Path)
    ap.add_argument("--upstream-commit", default="")
    ap.add_argument("--only", choices=("grid", "oblique"))
    a = ap.parse_args()
    os.environ.setdefault("RANK", "0")
    up = a.upstream.resolve()
    sys.path.insert(0, str(up))
    check_load_image_transforms()
    if a.only in (None, "grid"):
        make_grid_fixture(FIXTURES / "sat_grid_oracle.npz", a.upstream_commit)
    if a.only in (None, "oblique"):
        make_oblique_fixture(up, FIXTURES / "sat_oblique_oracle.npz", a.upstream_commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
