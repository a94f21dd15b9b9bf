"""Generate the SegVol oracle fixtures from the OFFICIAL SegVol code (reduced size, random weights).

Run once, outside the engine's environment (upstream needs MONAI <= 1.3); see
Testing/fixtures/README.md for the exact commands. Nothing of upstream is copied into this
repository: this script imports a checkout given on the command line and writes only inputs and
outputs (.npz) to Testing/fixtures/.

What it does:

1. Builds upstream's model (MONAI ``ViT``, ``PromptEncoder``, ``MaskDecoder``/``TwoWayTransformer``,
   ``network.model.SegVol``) in a reduced configuration (see ``REDUCED``); the CLIP text tower is
   replaced by a 1-layer ``CLIPTextModel`` (hidden size 512 as upstream's ``dim_align`` needs).
2. Fills every tensor of the state dict from a documented recipe (``recipe_tensor``: numpy PCG64
   seeded by (seed, key index in sorted key order)), so the test rebuilds the identical weights
   without storing ~60 MB of random numbers; the SHA-256 of the weights is stored to prove it.
3. Writes a synthetic CT to NIfTI and runs upstream's own demo path on it: ``process_ct_gt``
   (preprocessing) and ``inference_demo.zoom_in_zoom_out`` twice: text only, and text + box (the
   box comes from a label, as in the demo). Hooks record the zoom-out logits, the ROI from
   ``logits2roi_coor`` and the box given to every sliding window; the stitched logits are the
   function's result.
4. Writes ``segvol_keys.json``: every key and shape of the full-size model (meta device).
5. With ``--shared`` (the shared test data folder), the real-CT cases:

   * ``segvol_oracle_oblique_ct.npz`` (issue 15, item 2): a crop of the real CT
     ``totalsegmentator-examples/example_ct_sm.nii.gz`` (``REAL_CROP``) written as NIfTI three times with
     only the header changed (``ROTATIONS``: as stored, tilted 12 degrees about R like a gantry tilt,
     oblique 20 degrees about S then 10 degrees about R); text + box from the real liver label of
     ``example_seg.nii.gz`` (as the demo derives it). Upstream reads each file with its own loader and
     gives bit-identical results for all three (its orientation step is a no-op, so the header is
     ignored; the script asserts it); they are stored once, with the padding/crop that place upstream's
     crop on the stored array (computed with MONAI's own ``SpatialPad``/``CropForeground``).
   * ``segvol_oracle_subregion.npz`` (item 3): a 64-slice crop of the real CT ``example_ct.nii.gz`` with
     weights from the same recipe plus ``SUBREGION_OVERRIDES`` (``recipe_state_dict``), chosen so that
     the zoom-out mask is a block of 2x1x2 of the 4x4x4 zoom-out tokens: the ROI is a strict
     sub-region of the crop on every axis and is zoomed in with 3 windows. Text + box (from a cuboid
     label). Stored: the zoom-out logits and the stitched logits inside the ROI (outside it they are
     the zoom-out logits, nearest-upsampled).

The only patches are ``.cuda()`` -> no-op (the demo hard-codes CUDA), ``LoadImage(image_only=False)``
(MONAI 0.9's return value, which the demo unpacks), ``Orientationd`` -> pass-through (what MONAI 0.9
does with the affine-less array the demo hands it) and an empty parent package for
``segment_anything_volumetric`` (its ``__init__`` imports the unused SAM predictor, which needs
torchvision).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
from real_scans import ROTATIONS, save_nifti, turned_copy  # noqa: F401  (shared recipes; re-exported)

SEED = 20240607
# Reduced configuration: the decoder width stays 768 because upstream hard-codes
# Linear(768, 96) (text-to-pixel term) and Linear(512, 768) (dim_align).
REDUCED = dict(
    img_size=[16, 64, 64], patch_size=[4, 16, 16], hidden_size=768, mlp_dim=256, num_layers=1, num_heads=12,
    decoder_depth=1, decoder_mlp_dim=256, decoder_heads=8, iou_head_hidden=256, mask_in_chans=16,
    text_config=dict(hidden_size=512, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8),
)
FULL = dict(
    img_size=[32, 256, 256], patch_size=[4, 16, 16], hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12,
    decoder_depth=2, decoder_mlp_dim=2048, decoder_heads=8, iou_head_hidden=256, mask_in_chans=16, text_config={},
)
LN_LIKE = ("mask_decoder.output_upscaling.1.weight",)  # multi-dimensional LayerNorm weight


def recipe_tensor(key: str, shape, index: int, seed: int = SEED) -> np.ndarray:
    """The weight recipe (Testing/models/test_segvol.py imports it from here)."""
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(tuple(shape)).astype(np.float32)
    if key.endswith(".bias"):
        return x * np.float32(0.02)
    if (len(shape) == 1 and key.endswith(".weight")) or key in LN_LIKE:
        return np.float32(1.0) + np.float32(0.1) * x
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    return x / np.float32(np.sqrt(max(fan_in, 1)))


# Item 3: the recipe alone gives zoom-out logits whose positive set covers every zoom-out token (the
# ConvTranspose kernels of ``output_upscaling`` repeat one random pattern in every token). These overrides
# make the zoom-out mask a compact block: the ViT position embedding of every token is ALPHA x row 0 of the
# recipe's, of the BLOCK tokens row 1 (position dominates content); the upscaling kernels and its
# LayerNorm's affine are tied across spatial positions (each token's up-sampled embedding is constant);
# upscaled channel GAIN_CHANNEL (the one separating the two kinds of token most, measured) gets the
# hypernetwork output GAIN and channel CONST_CHANNEL is made the constant GELU(1) with hypernetwork
# output OFFSET / GELU(1) (a constant logit offset putting the threshold between the two levels); the
# text-alignment rows of both channels are zero.
SUBREGION_OVERRIDES = dict(alpha=1000.0, block=[[1, 1, 1], [1, 1, 2], [2, 1, 1], [2, 1, 2]], row_out=0, row_in=1,
                           gain_channel=80, gain=20.0, const_channel=5, offset=6.6)
GELU1 = 0.8413447460685429  # GELU(1), exact erf form


def apply_overrides(sd: dict, o: dict) -> dict:
    """``SUBREGION_OVERRIDES`` applied to a (recipe) state dict of torch tensors under the official names."""

    sd = dict(sd)
    pe_key = "image_encoder.patch_embedding.position_embeddings"
    pe = sd[pe_key]
    n = pe.shape[1]
    grid = round(n ** (1 / 3))
    new = pe[0, o["row_out"]].repeat(n, 1)
    for z, y, x in o["block"]:
        new[(z * grid + y) * grid + x] = pe[0, o["row_in"]]
    sd[pe_key] = (o["alpha"] * new)[None].contiguous()
    for k in ("mask_decoder.output_upscaling.0.weight", "mask_decoder.output_upscaling.3.weight",
              "mask_decoder.output_upscaling.1.weight", "mask_decoder.output_upscaling.1.bias"):
        t = sd[k]
        sd[k] = t[(slice(None),) * (t.dim() - 3) + (slice(0, 1),) * 3].expand_as(t).contiguous()

    def row(key, c, w, b):
        wt, bt = sd[key + ".weight"].clone(), sd[key + ".bias"].clone()
        wt[c], bt[c] = w, b
        sd[key + ".weight"], sd[key + ".bias"] = wt, bt

    up_w = sd["mask_decoder.output_upscaling.3.weight"].clone()
    up_b = sd["mask_decoder.output_upscaling.3.bias"].clone()
    up_w[:, o["const_channel"]], up_b[o["const_channel"]] = 0.0, 1.0
    sd["mask_decoder.output_upscaling.3.weight"], sd["mask_decoder.output_upscaling.3.bias"] = up_w, up_b
    hyper, text = "mask_decoder.output_hypernetworks_mlps.0.layers.2", "mask_decoder.txt_align_upscaled_embedding"
    row(hyper, o["const_channel"], 0.0, o["offset"] / GELU1)
    row(text, o["const_channel"], 0.0, 0.0)
    row(hyper, o["gain_channel"], 0.0, o["gain"])
    row(text, o["gain_channel"], 0.0, 0.0)
    return sd


def recipe_state_dict(shapes: dict, seed: int = SEED, overrides=None) -> dict:
    """The weights of a fixture: ``recipe_tensor`` over the sorted keys, then the overrides (if any)."""
    import torch

    sd = {k: torch.from_numpy(recipe_tensor(k, shapes[k], i, seed)) for i, k in enumerate(sorted(shapes))}
    return apply_overrides(sd, overrides) if overrides else sd


def weights_digest(sd) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(np.ascontiguousarray(sd[k].detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def synthetic_ct(shape_xyz=(84, 76, 22), seed=SEED):
    """A body-like cylinder (soft tissue, an 'organ' and 'bone') in air, HU values, array [x, y, z]."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape_xyz], indexing="ij")
    cx, cy = shape_xyz[0] / 2, shape_xyz[1] / 2
    body = ((x - cx) / 34) ** 2 + ((y - cy) / 28) ** 2 < 1
    organ = ((x - cx - 10) / 12) ** 2 + ((y - cy + 4) / 9) ** 2 + ((z - shape_xyz[2] / 2) / 7) ** 2 < 1
    bone = ((x - cx) / 5) ** 2 + ((y - cy - 18) / 5) ** 2 < 1
    ct = np.full(shape_xyz, -1000.0, np.float32)
    ct[body] = 40.0
    ct[organ] = 120.0
    ct[bone & body] = 700.0
    ct += rng.normal(0, 15, shape_xyz).astype(np.float32)
    return ct.astype(np.float32), organ.astype(np.uint8)


# ---- real-CT cases (recipes shared with Testing/models/test_segvol.py) ---------------------------------------
REAL_DIR = "totalsegmentator-examples"
# (x, y, z) index ranges of the stored (RAS-ordered) NIfTI arrays: around the liver of example_ct_sm
REAL_CROP = ((36, 108), (22, 86), (0, 30))
LIVER = 5  # example_seg_labels.json
# item 3: slices 24..87 of example_ct (its 112 slices; example_ct_sm is slices 82..111), the whole plane
SUBREGION_SLICES = (24, 88)
SUBREGION_LABEL = ((40, 90), (30, 60), (20, 44))  # cuboid "label" for the demo's box prompt, (x, y, z)


def real_ct_case(shared: Path, case: str):
    """(CT int16 [x, y, z], liver label uint8, RAS affine) of the item-2 real-CT case ``case``."""
    ct, affine = turned_copy(shared / REAL_DIR / "example_ct_sm.nii.gz", case, REAL_CROP)
    label, _ = turned_copy(shared / REAL_DIR / "example_seg.nii.gz", case, REAL_CROP)
    return ct.astype(np.int16), (label == LIVER).astype(np.uint8), affine


def subregion_case(shared: Path):
    """(CT int16 [x, y, z], cuboid label, RAS affine) of the item-3 case."""
    import nibabel as nib

    img = nib.load(str(shared / REAL_DIR / "example_ct.nii.gz"))
    a, b = SUBREGION_SLICES
    ct = np.asarray(img.dataobj)[:, :, a:b].astype(np.int16)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [0, 0, a] + img.affine[:3, 3]
    label = np.zeros(ct.shape, np.uint8)
    label[tuple(slice(lo, hi) for lo, hi in SUBREGION_LABEL)] = 1
    return ct, label, affine


def setup_upstream(up: Path):
    import torch

    sys.path.insert(0, str(up))
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU run of the CUDA-only demo code
    torch.nn.Module.cuda = lambda self, *a, **k: self
    import monai.transforms as mt

    load_image = mt.LoadImage  # the demo expects MONAI 0.9's (image, meta) return value
    mt.LoadImage = lambda *a, **k: load_image(*a, image_only=False, **k)
    # process_ct_gt strips the affine (np.array) before Orientationd, so with MONAI 0.9 that step
    # leaves the array untouched; MONAI 1.3 instead turns it into a MetaTensor the next step rejects.
    mt.Orientationd = lambda keys, axcodes: (lambda d: d)
    pkg = types.ModuleType("segment_anything_volumetric")
    pkg.__path__ = [str(up / "segment_anything_volumetric")]
    sys.modules["segment_anything_volumetric"] = pkg
    from segment_anything_volumetric import build_sam

    pkg.sam_model_registry = build_sam.sam_model_registry


def build_upstream(up: Path, c: dict = REDUCED):
    import torch
    from monai.networks.nets import ViT
    from network.model import SegVol
    from segment_anything_volumetric.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from transformers import CLIPTextConfig, CLIPTextModel

    img, patch = np.array(c["img_size"]), np.array(c["patch_size"])
    vit = ViT(in_channels=1, img_size=c["img_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
              mlp_dim=c["mlp_dim"], num_layers=c["num_layers"], num_heads=c["num_heads"], pos_embed="perceptron",
              classification=False, dropout_rate=0.0)
    pe = PromptEncoder(embed_dim=768, image_embedding_size=[int(v) for v in img / patch],
                       input_image_size=c["img_size"], mask_in_chans=c["mask_in_chans"])
    md = MaskDecoder(image_encoder_type="vit", num_multimask_outputs=3,
                     transformer=TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=768,
                                                   mlp_dim=c["decoder_mlp_dim"], num_heads=c["decoder_heads"]),
                     transformer_dim=768, iou_head_depth=3, iou_head_hidden_dim=c["iou_head_hidden"],
                     image_size=img, patch_size=patch)
    model = SegVol(image_encoder=vit, mask_decoder=md, prompt_encoder=pe, clip_ckpt=str(up / "config" / "clip"),
                   roi_size=c["img_size"], patch_size=c["patch_size"], test_mode=True)
    if c["text_config"]:
        model.text_encoder.clip_text_model = CLIPTextModel(CLIPTextConfig(**c["text_config"]))
    sd = model.state_dict()
    keys = sorted(sd)
    new = {k: torch.from_numpy(recipe_tensor(k, sd[k].shape, i)) if sd[k].is_floating_point() else sd[k]
           for i, k in enumerate(keys)}
    model.load_state_dict(new, strict=True)
    return model.eval(), keys


def run_demo(model, ct_path, gt_path, use_box: bool):
    """Upstream's demo path on a CT/label NIfTI pair (process_ct_gt + zoom_in_zoom_out), with records."""
    import inference_demo as demo
    import torch
    from data_process.demo_data_process import process_ct_gt

    rec = {"windows": [], "calls": 0}
    orig_forward, orig_roi = model.forward, demo.logits2roi_coor

    def forward(image, text=None, boxes=None, points=None, **kw):
        out = orig_forward(image, text=text, boxes=boxes, points=points, **kw)
        if rec["calls"] == 0:
            rec["zoom_out_logits"] = out[0, 0].detach().numpy().copy()
            rec["zoom_out_box"] = None if boxes is None else boxes.reshape(-1).numpy().copy()
        else:
            rec["windows"].append(np.full(6, -2.0) if boxes is None else boxes.reshape(-1).numpy().copy())
        rec["calls"] += 1
        return out

    def roi(*a):
        r = orig_roi(*a)
        rec["roi"] = np.array([int(v) for v in r])
        return r

    model.forward, demo.logits2roi_coor = forward, roi
    args = argparse.Namespace(spatial_size=tuple(REDUCED["img_size"]), patch_size=tuple(REDUCED["patch_size"]),
                              infer_overlap=0.5, use_zoom_in=True, use_text_prompt=True, use_box_prompt=use_box,
                              use_point_prompt=False)
    item = process_ct_gt(str(ct_path), str(gt_path), ["liver"], args.spatial_size)
    item = {k: torch.as_tensor(np.ascontiguousarray(np.asarray(v))) for k, v in item.items()}  # plain tensors
    out = demo.zoom_in_zoom_out(args, model, item["image"].float().unsqueeze(0),
                                item["zoom_out_image"].float().unsqueeze(0),
                                item["label"].unsqueeze(0), item["zoom_out_label"].unsqueeze(0), categories=["liver"])
    model.forward, demo.logits2roi_coor = orig_forward, orig_roi
    rec["logits"] = out["liver"][4].numpy().astype(np.float32)
    rec["preprocessed"] = item["image"][0].numpy().astype(np.float32)
    rec["zoom_out_image"] = item["zoom_out_image"][0].numpy().astype(np.float32)
    return rec


def crop_placement(ct_path, spatial_size):
    """Where upstream's crop lies on the stored array (z, y, x): SpatialPad's leading padding and
    CropForeground's box on the padded image, from MONAI's own transforms, upstream's classes in
    process_ct_gt's order."""
    import monai.transforms as mt
    from data_process.demo_data_process import DimTranspose, ForegroundNormalization, MinMaxNormalization

    ct, _ = mt.LoadImage()(str(ct_path))
    d = {"image": np.expand_dims(np.array(ct).squeeze(), 0)}
    for t in (ForegroundNormalization(keys=["image"]), DimTranspose(keys=["image"]), MinMaxNormalization()):
        d = t(d)
    shape = d["image"].shape[1:]
    pad = mt.SpatialPad(spatial_size=spatial_size).compute_pad_width(shape)[1:]
    padded = mt.SpatialPad(spatial_size=spatial_size)(d["image"])
    start, stop = mt.CropForeground().compute_bounding_box(padded)
    return np.array([p[0] for p in pad]), np.asarray(start), np.asarray(stop)


def preprocessed_summary(rec) -> dict:
    """Upstream's cropped image and zoom-out image, too large to store whole: every 2nd voxel per axis, shape
    and moments of the crop; SHA-256 of the zoom-out image's float32 bytes (ours is bit-equal)."""
    p = rec["preprocessed"]
    p64 = p.astype(np.float64)
    zo = np.ascontiguousarray(rec["zoom_out_image"], dtype=np.float32)
    return {"preprocessed_sub": p[::2, ::2, ::2], "preprocessed_shape": np.array(p.shape),
            "preprocessed_moments": np.array([p64.sum(), (p64 ** 2).sum(), p64.min(), p64.max()]),
            "zoom_out_image_sha256": hashlib.sha256(zo.tobytes()).hexdigest()}


def real_fixtures(model, keys, up_commit: str, shared: Path, out: Path, tmp: Path) -> None:
    """segvol_oracle_oblique_ct.npz (item 2) and segvol_oracle_subregion.npz (item 3)."""
    import torch

    spatial = tuple(REDUCED["img_size"])
    common = dict(seed=np.int64(SEED), config=json.dumps(REDUCED), keys=np.array(keys), prompt="liver",
                  upstream_commit=up_commit)
    recs = {}
    for case in ROTATIONS:
        ct, label, affine = real_ct_case(shared, case)
        save_nifti(ct, affine, tmp / f"{case}.nii.gz")
        save_nifti(label, affine, tmp / f"{case}_label.nii.gz")
        recs[case] = run_demo(model, tmp / f"{case}.nii.gz", tmp / f"{case}_label.nii.gz", True)
    ref = recs["stored"]
    for case, rec in recs.items():  # upstream ignores the header: bit-identical results
        for k in ("zoom_out_logits", "zoom_out_box", "roi", "logits", "preprocessed", "zoom_out_image"):
            assert np.array_equal(rec[k], ref[k]), (case, k)
        assert all(np.array_equal(a, b) for a, b in zip(rec["windows"], ref["windows"])), case
    pad, start, stop = crop_placement(tmp / "oblique.nii.gz", spatial)
    name = "segvol_oracle_oblique_ct.npz"
    np.savez_compressed(out / name, **common, weights_sha256=weights_digest(model.state_dict()),
                        cases=np.array(list(ROTATIONS)), zoom_out_box=ref["zoom_out_box"],
                        zoom_out_logits=ref["zoom_out_logits"], roi=ref["roi"], window_boxes=np.array(ref["windows"]),
                        logits=ref["logits"], **preprocessed_summary(ref),
                        pad_before=pad, crop_start=start, crop_stop=stop)
    print(name, "roi", ref["roi"], "windows", len(ref["windows"]), "logits", ref["logits"].shape,
          "size", (out / name).stat().st_size)

    # item 3: same model with the sub-region overrides
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(recipe_state_dict(shapes, SEED, SUBREGION_OVERRIDES), strict=True)
    ct, label, affine = subregion_case(shared)
    save_nifti(ct, affine, tmp / "sub.nii.gz")
    save_nifti(label, affine, tmp / "sub_label.nii.gz")
    rec = run_demo(model, tmp / "sub.nii.gz", tmp / "sub_label.nii.gz", True)
    roi = rec["roi"]
    crop = rec["logits"].shape
    assert all(roi[d] > 0 and roi[d + 3] < crop[d] - 1 for d in range(3)), ("ROI not strictly inside", roi, crop)
    sl = tuple(slice(roi[d], roi[d + 3] + 1) for d in range(3))
    outside = rec["logits"].copy()
    outside[sl] = np.nan
    zo_up = torch.nn.functional.interpolate(torch.from_numpy(rec["zoom_out_logits"])[None, None], size=crop,
                                            mode="nearest")[0, 0].numpy()
    keep = ~np.isnan(outside)
    assert np.array_equal(outside[keep], zo_up[keep])  # outside the ROI: the zoom-out logits
    name = "segvol_oracle_subregion.npz"
    np.savez_compressed(out / name, **common, overrides=json.dumps(SUBREGION_OVERRIDES),
                        weights_sha256=weights_digest(model.state_dict()), zoom_out_box=rec["zoom_out_box"],
                        zoom_out_logits=rec["zoom_out_logits"], roi=roi, window_boxes=np.array(rec["windows"]),
                        crop_shape=np.array(crop), roi_logits=rec["logits"][sl], **preprocessed_summary(rec))
    print(name, "crop", crop, "roi", roi, "windows", len(rec["windows"]), "size", (out / name).stat().st_size)
    model.load_state_dict(orig, strict=True)


def key_contract(up: Path, commit: str) -> dict:
    """Every key and shape of the released SegVol (full size), built on the meta device."""
    import torch
    import transformers
    from network.model import SegVol
    from segment_anything_volumetric.build_sam import sam_model_registry

    args = argparse.Namespace(spatial_size=(32, 256, 256), patch_size=(4, 16, 16))
    with torch.device("meta"):
        sam = sam_model_registry["vit"](args=args)
        model = SegVol(image_encoder=sam.image_encoder, mask_decoder=sam.mask_decoder,
                       prompt_encoder=sam.prompt_encoder,
                       clip_ckpt=str(up / "config" / "clip"), roi_size=args.spatial_size, patch_size=args.patch_size,
                       test_mode=True)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"source": f"BAAI-DCAI/SegVol@{commit} inference_demo.py model (sam_model_registry['vit'] + SegVol), "
                      f"transformers {transformers.__version__}; checkpoint keys carry a 'module.' (GitHub) or "
                      "'model.' (HF) prefix and, from transformers 4.18, "
                      "text_encoder.clip_text_model.text_model.embeddings.position_ids",
            "n_parameters": int(sum(np.prod(s) for s in keys.values())), "keys": keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("upstream", type=Path, help="checkout of github.com/BAAI-DCAI/SegVol")
    ap.add_argument("--upstream-commit", default="5768c97", help="recorded in the fixtures")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures")
    ap.add_argument("--shared", type=Path, help="shared test data folder: also the real-CT fixtures")
    a = ap.parse_args()
    import nibabel as nib
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    up = a.upstream.resolve()
    setup_upstream(up)
    model, keys = build_upstream(up)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])  # RAS, as MONAI's LoadImage reads NIfTI
    affine[:3, 3] = (-30.0, -25.0, 100.0)
    tmp = Path("/tmp/segvol-fixture")
    tmp.mkdir(exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    contract = key_contract(up, a.upstream_commit)
    (a.out / "segvol_keys.json").write_text(json.dumps(contract, indent=0) + "\n")
    print("segvol_keys.json", len(contract["keys"]), "keys", contract["n_parameters"], "parameters")
    # (file, CT shape [x, y, z], box prompt): a 4-window run without and with a box, and a thin CT
    # whose ROI is smaller than the window (one padded window: the box comes from the user's box).
    runs = (("segvol_oracle_zoom.npz", (84, 76, 22), False), ("segvol_oracle_box_text.npz", (84, 76, 22), True),
            ("segvol_oracle_box_text_thin.npz", (60, 56, 10), True))
    for name, shape, use_box in runs:
        ct, label = synthetic_ct(shape)
        nib.save(nib.Nifti1Image(ct, affine), tmp / "ct.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp / "label.nii.gz")
        common = dict(ct_xyz=ct, affine_ras=affine, seed=np.int64(SEED), config=json.dumps(REDUCED),
                      keys=np.array(keys), weights_sha256=weights_digest(model.state_dict()), prompt="liver",
                      upstream_commit=a.upstream_commit)
        rec = run_demo(model, tmp / "ct.nii.gz", tmp / "label.nii.gz", use_box)
        extra = {} if rec["zoom_out_box"] is None else {"zoom_out_box": rec["zoom_out_box"]}
        np.savez_compressed(a.out / name, **common, **extra, zoom_out_logits=rec["zoom_out_logits"], roi=rec["roi"],
                            window_boxes=np.array(rec["windows"]), logits=rec["logits"],
                            preprocessed=rec["preprocessed"], zoom_out_image=rec["zoom_out_image"])
        print(name, "roi", rec["roi"], "windows", len(rec["windows"]), "logits", rec["logits"].shape,
              "size", (a.out / name).stat().st_size)
    if a.shared:
        real_fixtures(model, keys, a.upstream_commit, a.shared.resolve(), a.out, tmp)


if __name__ == "__main__":
    main()
