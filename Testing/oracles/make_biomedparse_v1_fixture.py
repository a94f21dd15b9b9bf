"""Build the BiomedParse v1 oracle fixtures from the official upstream code.

Usage (from the repository root, with an upstream checkout of microsoft/BiomedParse @ 750eb40):

    PYTHONPATH=<import stand-ins> python Testing/oracles/make_biomedparse_v1_fixture.py \
        --upstream /path/to/BiomedParse [--out Testing/fixtures]

Upstream imports detectron2 (a fork), timm, fvcore, kornia, nltk, pycocotools, cv2, torchvision,
mpi4py at module level and calls ``.cuda()``; install those, or put CPU stand-ins for them on
PYTHONPATH (none of their code runs on the text-grounding path except detectron2's ``Conv2d``,
``get_norm``, ``ShapeSpec``, ``ImageList`` and timm's ``DropPath``/``trunc_normal_``). Neither the
upstream code nor such stand-ins belong in this repository.

Writes:

* ``biomedparse_v1_oracle.npz``: a reduced configuration (FocalNet embed 8, depths [1,1,1,1];
  hidden 32; 3 decoder layers; 1 pixel-decoder encoder layer; 1-layer text transformer of width 32)
  with seeded random weights, a 128x128 uint8 RGB input, and upstream's outputs for three calls of
  ``evaluate_demo`` + the query selection of ``interactive_infer_image``: ``["liver"]``,
  ``["left kidney"]`` and ``["liver", "left kidney"]`` (one call: upstream concatenates the tokens).
  Saved per call: pred_masks (not for the second call, to stay small), pred_captions, grounding class embeddings,
  selected query and the final probability map; plus the image features (mask features and the three decoder scales)
  of the image.
  The state dict is stored flat as ``sd/<key>``; the 49408-row token embedding is stored sparsely
  (``sd_rows/...``: only the rows of the prompts' tokens; the others are never read and are zero).
* ``biomedparse_v1_preprocess.npz`` (with ``--shared``, the shared test data folder): upstream
  ``process_intensity_image`` on canonical slices of real scans (``PREPROCESS_CASES``: a CT slice
  with an odd size difference, abdomen window; an MR slice, percentile window), first channel.
* ``biomedparse_v1_keys.json``: every key, shape and dtype of the full-size official state dict
  (``configs/biomedparse_inference.yaml``), built on the CPU (about 1.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

PREPROCESS_CASES = {  # name: (file under the shared data folder, canonical slice, is_CT, site)
    "ct": ("totalsegmentator-examples/example_ct_sm.nii.gz", 15, True, "abdomen"),
    "mr": ("totalsegmentator-examples/example_mr_sm.nii.gz", 10, False, None),
}
PROMPT_SETS = {"a": ["liver"], "b": ["left kidney"], "ab": ["liver", "left kidney"]}
SIZE = 128
REDUCED = {
    ("MODEL", "DIM_PROJ"): 32,
    ("MODEL", "TEXT", "WIDTH"): 32,
    ("MODEL", "TEXT", "HEADS"): 4,
    ("MODEL", "TEXT", "LAYERS"): 1,
    ("MODEL", "BACKBONE", "FOCAL", "EMBED_DIM"): 8,
    ("MODEL", "BACKBONE", "FOCAL", "DEPTHS"): [1, 1, 1, 1],
    ("MODEL", "BACKBONE", "FOCAL", "FOCAL_LEVELS"): [2, 2, 2, 2],
    ("MODEL", "ENCODER", "CONVS_DIM"): 32,
    ("MODEL", "ENCODER", "MASK_DIM"): 32,
    ("MODEL", "ENCODER", "TRANSFORMER_ENC_LAYERS"): 1,
    ("MODEL", "DECODER", "HIDDEN_DIM"): 32,
    ("MODEL", "DECODER", "NHEADS"): 4,
    ("MODEL", "DECODER", "DIM_FEEDFORWARD"): 64,
    ("MODEL", "DECODER", "DEC_LAYERS"): 4,  # 3 layers + the initial head: one round over the 3 scales
}


def load_config(upstream: Path, tokenizer_dir: str, reduced: bool) -> dict:
    opt = yaml.safe_load((upstream / "configs" / "biomedparse_inference.yaml").read_text())
    opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = tokenizer_dir
    if reduced:
        for path, value in REDUCED.items():
            d = opt
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value
    return opt


def build(upstream: Path, opt: dict):
    sys.path.insert(0, str(upstream))
    from modeling.architectures.build import build_model  # noqa: E402  (upstream)

    return build_model(opt)


def seed_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights with sane scales (fan-in normal; norms near 1; layer scales 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.endswith("dilation_kernel"):
                continue
            r = torch.randn(t.shape, generator=g)
            if t.dim() >= 2:
                t.copy_(r / max(1.0, float(np.sqrt(t[0].numel()))))
            elif name.endswith("logit_scale"):
                t.fill_(2.0)
            elif "gamma" in name:
                t.copy_(0.5 + 0.1 * r)
            elif name.endswith("weight"):
                t.copy_(1.0 + 0.1 * r)
            else:
                t.copy_(0.1 * r)


def test_image() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = 40 + 0.5 * xx + 0.3 * yy
    img = np.where((yy - 50) ** 2 + (xx - 60) ** 2 < 30 ** 2, 200.0, img)
    img = np.where((yy - 95) ** 2 + (xx - 30) ** 2 < 12 ** 2, 120.0, img)
    rng = np.random.default_rng(0)
    img = img + rng.normal(0, 8, img.shape)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def run_prompts(model, image: np.ndarray, prompts):
    """upstream evaluate_demo + the selection of inference_utils.inference.interactive_infer_image."""
    from modeling.language.loss import vl_similarity  # upstream

    for k in ("spatial", "visual", "audio"):
        model.task_switch[k] = False
    model.task_switch["grounding"] = True
    data = {"image": torch.from_numpy(image.copy()).permute(2, 0, 1), "text": prompts, "height": SIZE, "width": SIZE}
    results, _, extra = model.evaluate_demo([data])
    pred_masks = results["pred_masks"][0]
    v_emb = results["pred_captions"][0]
    t_emb = extra["grounding_class"]
    t_n = t_emb / (t_emb.norm(dim=-1, keepdim=True) + 1e-7)
    v_n = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
    out_prob = vl_similarity(v_n, t_n, temperature=model.sem_seg_head.predictor.lang_encoder.logit_scale)
    matched = out_prob.max(0)[1]
    prob = F.interpolate(pred_masks[matched, :, :][None], (SIZE, SIZE), mode="bilinear")[0].sigmoid()
    tokens = model.sem_seg_head.predictor.lang_encoder.grounding_token_embeddings["tokens"]
    return {
        "pred_masks": pred_masks.numpy(),
        "pred_captions": v_emb.numpy(),
        "grounding_class": t_emb.numpy(),
        "grounding_tokens": extra["grounding_tokens"][:, 0].numpy(),
        "input_ids": tokens["input_ids"].numpy(),
        "attention_mask": tokens["attention_mask"].numpy(),
        "similarity": out_prob.numpy(),
        "matched": matched.numpy(),
        "prob": prob.numpy(),
    }


def image_features(model, image: np.ndarray):
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    x = (x - model.pixel_mean) / model.pixel_std
    feats = model.backbone(x)
    mask_features, _, ms = model.sem_seg_head.pixel_decoder.forward_features(feats)
    out = {f"feat_{k}": v[0].numpy() for k, v in feats.items()}
    out["mask_features"] = mask_features[0].numpy()
    out.update({f"scale{i}": m[0].numpy() for i, m in enumerate(ms)})
    return out


def preprocess_oracle(shared: Path, out: Path) -> None:
    from inference_utils.processing_utils import process_intensity_image  # upstream

    from textseg.formats.images import read_volume

    data = {}
    for name, (rel, k, is_ct, site) in PREPROCESS_CASES.items():
        sl = read_volume(shared / rel).canonical().array[k].astype(np.float64)
        img = process_intensity_image(sl, is_ct, site)
        assert img.shape == (1024, 1024, 3) and (img == img[..., :1]).all()
        data[name] = img[..., 0]
    np.savez_compressed(out / "biomedparse_v1_preprocess.npz", **data)


# ---- real scans turned through their header (issue 15 item 2) -------------------------------------------
# (file under totalsegmentator-examples, is_CT, site, slices checked)
GEOMETRY_SCANS = {"mr": ("example_mr_sm.nii.gz", False, None, (0, 10, 19)),  # stored LPS
                  "ct": ("example_ct_sm.nii.gz", True, "abdomen", (0, 15, 29))}  # stored RAS


def geometry_oracle(shared: Path, out: Path) -> None:
    """biomedparse_v1_geometry.npz: upstream's own NIfTI reader ``read_nifti`` (nibabel ``get_fdata``, slice
    ``[:, :, k]`` after moving ``HW_index`` to the front, then ``process_intensity_image``) on the real MR and CT,
    each written as stored, tilted and oblique (header only; ``Testing/oracles/real_scans.py``), with the default
    ``HW_index=(0, 1)`` (rows = the file's first axis) and ``(1, 0)`` (rows = its second axis, as in DICOM). The
    header changes nothing for upstream (asserted), so one SHA-256 per (scan, HW_index, slice) of the 1024x1024
    uint8 model input (first channel; the three are equal) is stored, with its sum."""
    import hashlib

    from inference_utils.processing_utils import read_nifti  # upstream

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the cwd is upstream's root by now
    from real_scans import ROTATIONS, save_nifti, turned_copy

    data = {}
    tmp = Path(tempfile.mkdtemp(prefix="v1-geometry-"))
    for scan, (name, is_ct, site, slices) in GEOMETRY_SCANS.items():
        for hw in ((0, 1), (1, 0)):
            tag = f"{scan}/hw{hw[0]}{hw[1]}"
            ref = None
            for case in ROTATIONS:
                array, affine = turned_copy(shared / "totalsegmentator-examples" / name, case)
                path = tmp / f"{scan}_{case}.nii.gz"
                save_nifti(array, affine, path)
                imgs = [read_nifti(str(path), is_ct, k, site, HW_index=hw) for k in slices]
                assert all(im.shape == (1024, 1024, 3) and (im == im[..., :1]).all() for im in imgs)
                if ref is None:
                    ref = imgs
                assert all(np.array_equal(a, b) for a, b in zip(imgs, ref)), (scan, hw, case)
            data[tag + "/sha256"] = np.array([hashlib.sha256(np.ascontiguousarray(im[..., 0]).tobytes()).hexdigest()
                                              for im in ref])
            data[tag + "/sum"] = np.array([int(im[..., 0].sum()) for im in ref])
        data[scan + "/slices"] = np.array(slices)
    np.savez_compressed(out / "biomedparse_v1_geometry.npz", **data)
    print(f"wrote {out}/biomedparse_v1_geometry.npz", {k: v.tolist() for k, v in data.items() if k.endswith("sum")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, type=Path, help="checkout of microsoft/BiomedParse (main @ 750eb40)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures")
    ap.add_argument("--shared", type=Path, help="shared test data folder (for the preprocessing oracle)")
    ap.add_argument("--only", choices=["geometry"], help="write only this fixture (needs --shared; upstream's"
                    " inference_utils/processing_utils.py imports pydicom, PIL, nibabel, SimpleITK, skimage only)")
    args = ap.parse_args()
    upstream = args.upstream.resolve()
    os.chdir(upstream)  # upstream reads some files relative to its root
    if args.only == "geometry":
        sys.path.insert(0, str(upstream))
        args.out.mkdir(parents=True, exist_ok=True)
        return geometry_oracle(args.shared.resolve(), args.out.resolve())

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "BiomedParseSlicer"))
    from textseg.models.clip_tokenizer import build_vocab_files

    tok_dir = tempfile.mkdtemp(prefix="clip-tok-")
    build_vocab_files(Path(tok_dir))

    # ---- reduced configuration, random weights, outputs ---------------------------------------------
    torch.manual_seed(0)
    model = build(upstream, load_config(upstream, tok_dir, reduced=True)).eval()
    seed_weights(model)
    from utilities.constants import BIOMED_CLASSES

    lang = model.sem_seg_head.predictor.lang_encoder
    with torch.no_grad():
        lang.get_text_embeddings(BIOMED_CLASSES + ["background"], is_eval=True)
        image = test_image()
        data = {"image": image, **{f"img_{k}": v for k, v in image_features(model, image).items()}}
        used_ids = set()
        for name, prompts in PROMPT_SETS.items():
            r = run_prompts(model, image, prompts)
            used_ids |= set(r["input_ids"].ravel().tolist())
            data["prompts_" + name] = np.array(prompts)
            if name == "b":  # keep the fixture small: b's selected mask is in b_prob
                del r["pred_masks"]
            data.update({f"{name}_{k}": v for k, v in r.items()})
    sd = {k: v for k, v in model.state_dict().items()}
    emb_key = "sem_seg_head.predictor.lang_encoder.lang_encoder.token_embedding.weight"
    rows = np.array(sorted(used_ids), dtype=np.int64)
    data["sd_rows/" + emb_key] = rows
    data["sd_rows_values/" + emb_key] = sd[emb_key][rows].numpy()
    data["sd_shape/" + emb_key] = np.array(sd[emb_key].shape)
    for k, v in sd.items():
        if k != emb_key:
            data["sd/" + k] = v.numpy()
    data["config"] = np.array(json.dumps({"/".join(p): v for p, v in REDUCED.items()} | {"SIZE": SIZE}))
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "biomedparse_v1_oracle.npz", **data)

    # ---- full-size key contract -----------------------------------------------------------------------
    full = build(upstream, load_config(upstream, tok_dir, reduced=False))  # CPU: upstream calls .item() at init
    keys = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            for k, v in full.state_dict().items()}
    (args.out / "biomedparse_v1_keys.json").write_text(json.dumps(keys, indent=0, sort_keys=True) + "\n")
    if args.shared:
        preprocess_oracle(args.shared.resolve(), args.out)
        geometry_oracle(args.shared.resolve(), args.out)
    print(f"wrote {args.out}/biomedparse_v1_oracle.npz and biomedparse_v1_keys.json ({len(keys)} keys)")


if __name__ == "__main__":
    main()
