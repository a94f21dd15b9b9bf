"""Build the BiomedParse v2 post-processing oracle fixture (NMS, multi-class merge, edge instance split).

Usage (from the repository root; torch, scikit-image and numpy are enough, no model, no weights):

    python Testing/oracles/make_biomedparse_v2_post_fixture.py --upstream /path/to/BiomedParse_v2 \
        [--out Testing/fixtures]

``--upstream`` is a checkout of microsoft/BiomedParse branch v2 (@ f571d5c) or its runnable fork
Lsyyh/BiomedParse_v2 (@ 6168155); it is not part of this repository. The script imports from it:

* ``inference.postprocess`` and ``inference.merge_multiclass_masks`` (``inference.py`` imports hydra, and on
  f571d5c ``inference_utils.distributed``, at module level; empty stand-ins are put in ``sys.modules`` since
  neither is used by these two functions), which call ``utils.slice_nms`` / ``utils.nms_masks_batch_iou``;
* ``utils.process_output`` (identity here: no padding, 32x32 = padded size, axis 0);
* the instance split: the code cell of ``inference_example_3D.ipynb`` that starts with ``# mask interior``,
  executed as it is (``skimage.measure.label``, ``skimage.segmentation.expand_labels``).

Inputs are synthetic, seeded (``SEED``): 4 prompts x 4 slices x 24x24 mask logits built from overlapping discs
plus noise (pairs with IoU > 0.5 and < 0.5, an empty mask, existence below 0.5, distinct scores) with ids
1, 2, 3, 5 (upstream's id map); 1 prompt x 3 slices with existence logits (1.5, 0.0, -1.0) (sigmoid exactly
0.5 on slice 1); 2 prompts x 5 slices x 32x32 of touching blobs with edge logits on their borders for the
instance split (ids 1, 2). Saved: the logits, their float32 sigmoids (``*_prob``, what our code takes), and
upstream's outputs: ``multi_kept`` (postprocess), ``multi_labels`` (merge), ``single_kept``,
``inst_labels``, ``inst_edge_labels``, ``inst_instances`` (the notebook's ``mask_int``).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

SEED = 7


def _stub(name: str, **attrs) -> None:
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules.setdefault(name, mod)


def import_upstream(upstream: Path):
    sys.path.insert(0, str(upstream))
    _stub("hydra", compose=None, initialize=None, initialize_config_dir=None, utils=None)
    _stub("hydra.core")
    _stub("hydra.core.global_hydra", GlobalHydra=None)
    _stub("inference_utils.distributed", inference_worker=None)  # f571d5c only; unused here
    import inference
    import utils

    return inference, utils


def notebook_cell(upstream: Path, marker: str) -> str:
    nb = json.loads((upstream / "inference_example_3D.ipynb").read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and src.lstrip().startswith(marker):
            return src
    raise SystemExit(f"no notebook cell starting with {marker!r}")


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)


def multi_inputs(rng):
    n, d, h, w = 4, 4, 24, 24
    logits = np.full((n, d, h, w), -4.0, np.float32)
    centers = [(8, 8, 5), (8, 9, 5), (12, 12, 6), (17, 16, 4)]  # 0/1: IoU > 0.5, 2 overlaps both a little
    for p, (cy, cx, r) in enumerate(centers):
        for s in range(d):
            shift = s - 1
            logits[p, s] += 8.0 * disc(h, w, cy + shift, cx, r) + 1.5 * (p == 2) * disc(h, w, cy, cx, r + 2)
    logits += rng.normal(0, 1.0, logits.shape).astype(np.float32)
    logits[3, 2] = -6.0  # prompt 3 empty on slice 2
    exist = rng.normal(0.5, 2.0, (n, d)).astype(np.float32)
    exist[1, 0], exist[0, 0] = 3.0, 2.0  # prompt 1 wins slice 0 over 0
    exist[0, 1], exist[1, 1] = 3.0, 2.5
    exist[2, 3] = -0.7  # below 0.5 after sigmoid
    exist[3, 2] = 4.0  # high score, empty mask: skipped
    return logits, exist


def inst_inputs(rng):
    n, d, h, w = 2, 5, 32, 32
    mask = np.full((n, d, h, w), -5.0, np.float32)
    edge = np.full((n, d, h, w), -5.0, np.float32)
    cells = [(0, 8, 8, 5), (0, 8, 17, 5), (0, 20, 10, 4), (1, 22, 24, 6), (1, 12, 26, 4)]  # touching pairs
    for p, cy, cx, r in cells:
        for s in range(d):
            if (p + s) % 5 == 4:
                continue
            inside = disc(h, w, cy, cx, r)
            ring = inside - disc(h, w, cy, cx, r - 1)
            mask[p, s] = np.maximum(mask[p, s], -5.0 + 11.0 * inside)
            edge[p, s] = np.maximum(edge[p, s], -5.0 + 10.0 * ring)
    mask += rng.normal(0, 0.8, mask.shape).astype(np.float32)
    edge += rng.normal(0, 0.8, edge.shape).astype(np.float32)
    exist = np.array([[2.0, 1.0, 3.0, 0.4, 2.2], [1.5, 2.5, -1.0, 3.5, 0.9]], np.float32)
    return mask, edge, exist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path("Testing/fixtures"))
    args = ap.parse_args()
    inference, utils = import_upstream(args.upstream.resolve())
    rng = np.random.default_rng(SEED)
    out = {}

    logits, exist = multi_inputs(rng)
    ids = [1, 2, 3, 5]
    kept = inference.postprocess(torch.from_numpy(logits), torch.from_numpy(exist))
    out.update(multi_logits=logits, multi_exist=exist, multi_ids=np.array(ids),
               multi_prob=torch.from_numpy(logits).sigmoid().numpy(),
               multi_exist_prob=torch.from_numpy(exist).sigmoid().numpy(),
               multi_kept=kept.numpy(), multi_labels=inference.merge_multiclass_masks(kept, ids).numpy())

    single = logits[2:3, :3]
    sexist = np.array([[1.5, 0.0, -1.0]], np.float32)
    skept = inference.postprocess(torch.from_numpy(single), torch.from_numpy(sexist))
    out.update(single_logits=single, single_exist=sexist, single_prob=torch.from_numpy(single).sigmoid().numpy(),
               single_exist_prob=torch.from_numpy(sexist).sigmoid().numpy(), single_kept=skept.numpy())

    mask, edge, iexist = inst_inputs(rng)
    iids = [1, 2]
    ns = {"np": np}
    mask_preds = inference.merge_multiclass_masks(inference.postprocess(torch.from_numpy(mask),
                                                                        torch.from_numpy(iexist)), iids)
    edge_preds = inference.merge_multiclass_masks(inference.postprocess(torch.from_numpy(edge),
                                                                        torch.from_numpy(iexist)), iids)
    pad = [[0, 0], [0, 0], [0, 0]]
    ns["mask_preds"] = utils.process_output(mask_preds, pad, mask.shape[-1], 0)
    ns["edge_preds"] = utils.process_output(edge_preds, pad, mask.shape[-1], 0)
    cell = notebook_cell(args.upstream, "# mask interior")
    exec("from skimage import segmentation\nfrom skimage.measure import label\n" + cell, ns)
    out.update(inst_mask_logits=mask, inst_edge_logits=edge, inst_exist=iexist,
               inst_mask_prob=torch.from_numpy(mask).sigmoid().numpy(),
               inst_edge_prob=torch.from_numpy(edge).sigmoid().numpy(),
               inst_exist_prob=torch.from_numpy(iexist).sigmoid().numpy(),
               inst_labels=np.asarray(mask_preds.numpy()), inst_edge_labels=np.asarray(edge_preds.numpy()),
               inst_instances=np.asarray(ns["mask_int"]), inst_components=np.asarray(ns["mask_preds"]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "biomedparse_v2_post.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path}: kept per slice {(out['multi_kept'].reshape(4, 4, -1).max(-1) > 0).astype(int).tolist()}, "
          f"labels {np.unique(out['multi_labels']).tolist()}, instances {int(out['inst_instances'].max())}")


if __name__ == "__main__":
    main()
