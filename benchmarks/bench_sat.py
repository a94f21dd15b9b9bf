"""SAT-Nano: our engine vs the official code (zhaoziheng/SAT) - seconds and peak memory, same input,
same (random, full-size) weights, same device, float32.

    python benchmarks/bench_sat.py --upstream <SAT checkout: data/ evaluate/ model/ train/> \\
        --upstream-python /tmp/satbench/bin/python [--work DIR] [--json run.json] \\
        [--prompts 1 10] [--device cpu|cuda] [--amp] [--batch 2] [--mode patch full] [--crop 96 96 96] \\
        [--stand-in organs|empty|full]
    python benchmarks/bench_sat.py ... --net [--net-size 128 128 64] [--reps 3]   # the two networks only
    python benchmarks/bench_sat.py ... --report run1.json run2.json               # tables of earlier runs

Results and method: docs/sat.md, "Speed and memory".

Weights: a full-size SAT-Nano (``Maskformer('UNET')``, PyTorch's default random init, seed 0) and a
full-size BioLORD-2023-C-shaped MPNet text tower (random init), written once as upstream-layout
checkpoints (``{"model_state_dict": {"module." + key: tensor}}``, as ``nano.pth`` /
``nano_text_encoder.pth``) plus a BioLORD-like tokenizer folder (MPNet WordPiece over the prompt words:
one token per word, like BioLORD's vocabulary for these names) and BioLORD's MPNet ``config.json``.
Ours loads them through the catalog/loader (``Predictor("sat-nano", weights_dir=...)``); upstream
through its own ``build_maskformer`` / ``load_checkpoint`` / ``Text_Encoder``.

Two measurements per side, each in a fresh process (upstream needs MONAI 1.1: give its Python):

* ``patch``: the real network on a crop of the real CT ``example_ct.nii.gz`` (TotalSegmentator test
  data, 3 mm) of ``--crop`` voxels (default 96^3 = 288 mm: one 288x288x96 window after SAT's
  1x1x3 mm resampling and foreground crop). Gives the network's seconds per patch (timed around
  ``encode``+``decode`` / upstream ``Maskformer.forward``) and the text-encoding seconds.
* ``full``: the whole pipeline on a "typical" 512x512x200 CT (the same real CT resampled, linear, onto
  a 512x512x200 grid of 0.8x0.8x1.5 mm, -1024 HU outside) with a stand-in network (``--stand-in``, see
  ``StandIn``: real organ masks by default, or nothing / everything): preprocessing, text encoding, window
  bookkeeping, Gaussian blending and (ours) masks on the input grid / (upstream) thresholding and writing
  on its grid. Ours also reports, apart, the time a caller pays to read every probability map.

Extrapolated full-size time = ``full`` seconds + (patches of the 512x512x200 CT) x (network seconds per
patch from ``patch``). Upstream runs ``evaluate/inference_engine.inference`` (text for all queries in
one pass, chunks of 256, patch batches of ``batchsize_3d`` = 2, Gaussian blending) after
``data/inference_dataset.Inference_Dataset`` (MONAI loading), as ``inference.py`` does, with these
bypasses (no CUDA/torchrun on a CPU): no process group, ``DistributedDataParallel`` replaced by a
wrapper holding ``.module`` (same state-dict keys), no ``DistributedSampler``, ``DataLoader`` with
``num_workers=0`` (its loading is timed in the same process), ``RANK=0``, ``torch.cuda.current_device``
-> the device on a CPU, ``AutoModel``/``AutoTokenizer.from_pretrained('FremyCompany/BioLORD-2023-C')``
-> the local folder (``AutoModel.from_config``: the BioLORD weights it would download are replaced by the
text checkpoint's anyway), and float32 (``autocast`` disabled unless ``--amp``; on a CPU it is a no-op anyway).
Its NIfTI writing (per-class masks, label map and image) is timed separately and NOT counted in
"seconds" (ours returns arrays). Peak memory: resident set size sampled every 5 ms during the timed
section (CPU) or ``torch.cuda.max_memory_allocated`` (GPU); "maxrss" = the worker's
``getrusage`` peak (incl. loading).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak import Peak  # benchmarks/peak.py

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "totalsegmentator-examples"
NAMES = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "stomach", "aorta", "gallbladder",
         "esophagus", "urinary bladder"]
PATCH = (288, 288, 96)
FULL_SIZE, FULL_SPACING = (512, 512, 200), (0.8, 0.8, 1.5)


# ---- measuring ----------------------------------------------------------------------------------
class Clock:
    """Accumulated seconds of wrapped calls (synchronising CUDA around each)."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds, self.calls = device, 0.0, 0

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def wrap(self, fn):
        def timed(*args, **kw):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            self.sync()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        return timed


class StandIn:
    """Logits of the right shape instead of the network (the ``full`` mode).

    ``organs`` (the default stand-in): query n answers with the TotalSegmentator mask of NAMES[n] (+10 inside,
    -10 outside), read from ``organs_sat.npy`` (the reference label map of example_ct_sm, 30 slices, on the
    SAT grid; see ``write_organs``) in the windows' order (``windows.json``: both implementations visit the
    same windows in the same order, oracle-tested), so the masks have real organs' sizes and shapes, absent
    ones included (esophagus, urinary bladder: not in those slices). ``empty``: -10 everywhere (no mask);
    ``full``: +10 everywhere (every prompt covers the whole crop: the worst case for mapping masks back)."""

    def __init__(self, device: str, kind: str = "organs", work: Path | None = None) -> None:
        self.device, self.kind, self.next = device, kind, 0
        if kind == "organs":
            self.organs = np.load(str(Path(work) / "organs_sat.npy"))
            meta = json.loads((Path(work) / "windows.json").read_text())
            self.windows, self.ids = meta["windows"], meta["ids"]

    def eval(self):
        return self

    def encode(self, patches):
        first, self.next = self.next, self.next + patches.shape[0]
        return first, patches.shape[0]

    def decode(self, feats, queries):
        import torch

        first, b = feats
        n = queries.shape[-2]
        if self.kind != "organs":
            return torch.full((b, n) + PATCH, 10.0 if self.kind == "full" else -10.0, device=self.device)
        out = np.full((b, n) + PATCH, -10.0, np.float32)
        for k in range(b):
            x0, x1, y0, y1, z0, z1 = self.windows[first + k]
            lab = self.organs[x0:x1, y0:y1, z0:z1]
            for q in range(n):
                out[k, q, :x1 - x0, :y1 - y0, :z1 - z0][lab == self.ids[q]] = 10.0
        return torch.from_numpy(out).to(self.device)

    def __call__(self, queries, image_input):  # upstream Maskformer.forward(queries=list, image_input)
        q = queries[0] if len(queries) == 1 else __import__("torch").cat(queries)
        return self.decode(self.encode(image_input), q)


# ---- inputs and weights (engine's Python) -------------------------------------------------------
def write_inputs(work: Path, crop) -> None:
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(DATA / "example_ct.nii.gz"), sitk.sitkFloat32)
    size = ct.GetSize()
    lo = [(s - c) // 2 for s, c in zip(size, crop)]
    sitk.WriteImage(sitk.Cast(ct[lo[0]:lo[0] + crop[0], lo[1]:lo[1] + crop[1], lo[2]:lo[2] + crop[2]], sitk.sitkInt16),
                    str(work / "crop.nii.gz"))
    # the same anatomy on a 512x512x200 grid of 0.8x0.8x1.5 mm, centred on the CT's centre
    ref = sitk.Image(FULL_SIZE, sitk.sitkFloat32)
    ref.SetSpacing(FULL_SPACING)
    ref.SetDirection(ct.GetDirection())
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
    d = np.array(ct.GetDirection()).reshape(3, 3)
    half = np.array([(n - 1) * s / 2 for n, s in zip(FULL_SIZE, FULL_SPACING)])
    ref.SetOrigin(tuple(np.array(centre) - d @ half))
    full = sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024.0)
    sitk.WriteImage(sitk.Cast(full, sitk.sitkInt16), str(work / "full.nii.gz"))


def write_organs(work: Path) -> None:
    """``organs_sat.npy``: the reference label map of example_ct_sm (TotalSegmentator output; the first 30 slices
    of example_ct, same origin) put on the full-size CT's grid (nearest) and then on its SAT grid (nearest to
    each SAT voxel's position, by our oracle-tested geometry); ``windows.json``: the SAT windows in visiting
    order and the label value of each of NAMES (0: not in the map)."""
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
    from textseg.formats.images import read_volume
    from textseg.models.sat.preprocess import preprocess
    from textseg.models.sat.window import split_3d

    seg = sitk.ReadImage(str(DATA / "example_seg.nii.gz"))
    full_img = sitk.ReadImage(str(work / "full.nii.gz"))
    on_full = sitk.Resample(seg, full_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ref = read_volume(work / "full.nii.gz")
    labels = ref.with_array(sitk.GetArrayFromImage(on_full)).canonical().array  # [k, j, i]
    vol = ref.canonical()
    _, geo = preprocess(vol, "CT")
    idx = [np.arange(n, dtype=float) for n in geo.shape]  # SAT (x, y, z) -> canonical (i, j, k), axis by axis
    i = geo.sat_to_canonical_index(np.stack([idx[0], np.zeros_like(idx[0]), np.zeros_like(idx[0])], 1))[:, 0]
    j = geo.sat_to_canonical_index(np.stack([np.zeros_like(idx[1]), idx[1], np.zeros_like(idx[1])], 1))[:, 1]
    k = geo.sat_to_canonical_index(np.stack([np.zeros_like(idx[2]), np.zeros_like(idx[2]), idx[2]], 1))[:, 2]
    ii, jj, kk = (np.clip(np.rint(v).astype(int), 0, n - 1) for v, n in zip((i, j, k), labels.shape[::-1]))
    organs = labels[np.ix_(kk, jj, ii)].transpose(2, 1, 0)  # (x, y, z)
    np.save(str(work / "organs_sat.npy"), np.ascontiguousarray(organs))
    names = json.loads((DATA / "example_seg_labels.json").read_text())
    by_name = {v.replace("_", " "): int(key) for key, v in names.items()}
    ids = [by_name.get(n, by_name.get(" ".join(n.split()[::-1]), 0)) for n in NAMES]  # "left kidney" = "kidney left"
    (work / "windows.json").write_text(json.dumps({"windows": [list(map(int, b)) for b in split_3d(geo.shape)],
                                                   "ids": ids}))


def write_weights(work: Path) -> None:
    import torch
    from transformers import MPNetConfig, MPNetTokenizerFast

    sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
    from textseg.models.sat import BIOLORD_FILES, BIOLORD_PREFIX
    from textseg.models.sat.network import NANO, SATNetwork
    from textseg.models.sat.text import BIOLORD_CONFIG, SATTextEncoder

    wdir = work / "weights"
    wdir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    net = SATNetwork(NANO)
    torch.save({"model_state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, wdir / "nano.pth")
    del net
    text = SATTextEncoder(MPNetConfig(**BIOLORD_CONFIG))
    torch.save({"model_state_dict": {"module." + k: v for k, v in text.state_dict().items()}},
               wdir / "nano_text_encoder.pth")
    words = ["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[CLS]", "[SEP]", "[UNK]", "<mask>"]
    words += sorted({w for n in NAMES for w in n.split()})
    bio = work / "biolord"
    bio.mkdir(exist_ok=True)
    (bio / "vocab.txt").write_text("\n".join(words) + "\n")
    MPNetTokenizerFast(vocab={t: i for i, t in enumerate(words)}, do_lower_case=True).save_pretrained(str(bio))
    MPNetConfig(**BIOLORD_CONFIG).to_json_file(str(bio / "config.json"))
    for name in BIOLORD_FILES:
        if not (bio / name).exists():
            (bio / name).write_text("{}\n")
        (wdir / (BIOLORD_PREFIX + name)).write_bytes((bio / name).read_bytes())


# ---- workers ------------------------------------------------------------------------------------
def worker_ours(a) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
    from textseg.formats.images import read_volume
    from textseg.predictor import Predictor

    work = Path(a.work)
    opts = {"network": StandIn(a.device, a.stand_in, work)} if a.mode == "full" else {}
    pred = Predictor("sat-nano", device=a.device, weights_dir=work / "weights", batch_size=a.batch, seed=0,
                     autocast=a.amp, **opts)
    pred._ensure_loaded()  # model loading is not timed on either side
    net, text = Clock(a.device), Clock(a.device)
    ad = pred.adapter
    ad.network.encode, ad.network.decode = net.wrap(ad.network.encode), net.wrap(ad.network.decode)
    ad.text_tower.embed = text.wrap(ad.text_tower.embed)
    encodes = Clock(a.device)
    ad.network.encode = encodes.wrap(ad.network.encode)
    import textseg.models.sat.adapter as sat_adapter

    sat_ml, window = [], sat_adapter.sliding_window

    def recording_window(*args, **kw):  # mask volumes on the SAT grid, comparable with upstream's
        probs = window(*args, **kw)
        sat_ml.extend(round(float((p > 0.5).sum()) * 3.0 / 1000, 1) for p in probs)
        return probs

    sat_adapter.sliding_window = recording_window
    vol = None
    with torch.no_grad(), Peak(a.device) as peak:
        t0 = time.perf_counter()
        vol = read_volume(work / ("full.nii.gz" if a.mode == "full" else "crop.nii.gz"))
        pred.set_image(vol, "CT")
        res = pred.predict(NAMES[: a.n])
        net.sync()
        seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # not counted: what a caller that also wants the probability maps pays on top
    for r in res:
        r.probability  # noqa: B018 - the property computes the map: that is what is timed
    prob_s = time.perf_counter() - t0
    ml = float(np.prod(vol.spacing)) / 1000
    return dict(peak.result(), seconds=seconds, network_s=net.seconds, text_s=text.seconds, write_s=0.0, prob_s=prob_s,
                encode_calls=encodes.calls, sat_grid=list(getattr(getattr(pred, "_state", None), "geo", None).shape)
                if hasattr(getattr(pred, "_state", None), "geo") else None,
                mask_ml=[round(float(r.mask.sum()) * ml, 1) for r in res], sat_mask_ml=sat_ml)


def worker_upstream(a) -> dict:
    import torch

    os.environ.setdefault("RANK", "0")
    up = Path(a.upstream).resolve()
    sys.path[:0] = [str(up), str(up / "model" / "dynamic-network-architectures-main")]
    work, bio = Path(a.work), str(Path(a.work) / "biolord")

    class DDP(torch.nn.Module):  # stands for DistributedDataParallel: same '.module.' keys, no process group
        def __init__(self, module, device_ids=None, **kw):
            super().__init__()
            self.module = module

        def forward(self, *args, **kw):
            return self.module(*args, **kw)

    torch.nn.parallel.DistributedDataParallel = DDP
    if not a.device.startswith("cuda"):
        torch.cuda.current_device = lambda: a.device  # Text_Tower.forward moves the tokens there
    import model.text_tower as tt
    import model.tokenizer as tk
    from transformers import AutoConfig

    auto_tok = tk.AutoTokenizer.from_pretrained  # BioLORD's weights are overwritten by the text checkpoint anyway
    tt.AutoModel.from_pretrained = lambda name, **kw: tt.AutoModel.from_config(AutoConfig.from_pretrained(bio))
    tk.AutoTokenizer.from_pretrained = lambda name, **kw: auto_tok(bio, **kw)
    import data.inference_dataset as ds
    import evaluate.inference_engine as eng
    from data.inference_dataset import Inference_Dataset, collate_fn
    from model.build_model import build_maskformer, load_checkpoint
    from model.text_encoder import Text_Encoder
    from torch.utils.data import DataLoader

    if not a.amp:
        eng.autocast = lambda: torch.autocast("cuda", enabled=False)
    device = torch.device(a.device)
    args = argparse.Namespace(vision_backbone="UNET", crop_size=list(PATCH), patch_size=[32, 32, 32],
                              deep_supervision=False, partial_load=True, text_encoder="ours",
                              text_encoder_partial_load=True, max_queries=256, batchsize_3d=a.batch)
    if a.mode == "full":
        model = StandIn(a.device, a.stand_in, work)
    else:
        model = build_maskformer(args, device, None)
        model, _, _ = load_checkpoint(checkpoint=str(work / "weights" / "nano.pth"), resume=False,
                                      partial_load=args.partial_load, model=model, device=device)
    text_encoder = Text_Encoder(text_encoder=args.text_encoder,
                                checkpoint=str(work / "weights" / "nano_text_encoder.pth"),
                                partial_load=args.text_encoder_partial_load, open_bert_layer=12,
                                open_modality_embed=False, gpu_id=None, device=device)
    net, text, write = Clock(a.device), Clock(a.device), Clock("cpu")
    if a.mode == "full":
        model = _Callable(net.wrap(model.__call__))
    else:
        model.forward = net.wrap(model.forward)
    text_encoder.forward = text.wrap(text_encoder.forward)
    eng.nib.save = write.wrap(eng.nib.save)
    boxes = []
    real_split = ds.split_3d

    def split(img, crop_size=None):
        p, idx = real_split(img, crop_size=crop_size)
        boxes.extend(idx)
        return p, idx

    ds.split_3d = split
    src = work / ("full.nii.gz" if a.mode == "full" else "crop.nii.gz")
    jsonl = work / f"upstream-{a.mode}-{a.n}.jsonl"
    jsonl.write_text(json.dumps({"image": str(src), "label": NAMES[: a.n], "modality": "CT",
                                 "dataset": "bench"}) + "\n")
    out = work / f"upstream-out-{a.mode}-{a.n}"
    out.mkdir(exist_ok=True)
    grid = []
    with torch.no_grad(), Peak(a.device) as peak:
        t0 = time.perf_counter()
        testset = Inference_Dataset(str(jsonl), args.max_queries, args.batchsize_3d)
        loader = DataLoader(testset, batch_size=1, num_workers=0, collate_fn=collate_fn)
        eng.inference(model=model, text_encoder=text_encoder, device=device, testset=testset,
                      testloader=_Recording(loader, grid), nib_dir=str(out))
        net.sync()
        seconds = time.perf_counter() - t0
    import nibabel as nib

    ml = 3.0 / 1000  # upstream's masks are on its 1x1x3 mm grid
    masks = [float(np.asarray(nib.load(str(out / "bench" / f"seg_{src.name[:-7]}" / f"{n}.nii.gz")).dataobj).sum())
             for n in NAMES[: a.n]]
    return dict(peak.result(), seconds=seconds - write.seconds, network_s=net.seconds, text_s=text.seconds,
                write_s=write.seconds, patches=len(boxes), encode_calls=net.calls, sat_grid=grid[0] if grid else None,
                mask_ml=[round(m * ml, 1) for m in masks], sat_mask_ml=[round(m * ml, 1) for m in masks])


def worker_net(a) -> dict:
    """Both networks in ONE process (upstream's Python), same weights, alternating runs on the same
    random input of ``--net-size`` (multiple of 32): the fairest comparison on a shared machine.
    Also checks the logits agree (max abs difference)."""
    import dataclasses

    import torch

    up = Path(a.upstream).resolve()
    sys.path[:0] = [str(up), str(up / "model" / "dynamic-network-architectures-main"), str(ROOT / "BiomedParseSlicer")]
    from model.maskformer import Maskformer

    from textseg.models.sat.loader import load_sat_network
    from textseg.models.sat.network import NANO

    size = tuple(a.net_size)
    wfile = Path(a.work) / "weights" / "nano.pth"
    ours = load_sat_network(wfile, dataclasses.replace(NANO, patch_size=size), a.device)
    theirs = Maskformer("UNET", list(size), [32, 32, 32], False)
    sd = torch.load(wfile, map_location="cpu", weights_only=True)["model_state_dict"]
    theirs.load_state_dict({k[len("module."):]: v for k, v in sd.items()})
    theirs = theirs.to(a.device).eval()
    del sd
    g = torch.Generator().manual_seed(0)
    image = torch.randn((1, 3) + size, generator=g).to(a.device)
    queries = torch.randn((a.n, 768), generator=g).to(a.device)
    clock = Clock(a.device)
    times = {"ours": [], "upstream": []}
    outs = {}
    with torch.no_grad():
        for rep in range(a.reps):
            for name in ("upstream", "ours") if rep % 2 == 0 else ("ours", "upstream"):
                c0 = Peak.cpu()
                t0 = time.perf_counter()
                out = theirs(queries=[queries], image_input=image) if name == "upstream" else ours(image, queries)
                clock.sync()
                times[name].append((time.perf_counter() - t0, Peak.cpu() - c0))
                outs[name] = out.float().cpu()
                del out
    diff = float((outs["ours"] - outs["upstream"]).abs().max())
    return {"size": list(size), "n": a.n, "times": times, "max_abs_diff": diff,
            "logit_scale": float(outs["upstream"].abs().max())}


class _Callable:
    def __init__(self, fn) -> None:
        self.fn = fn

    def eval(self):
        return self

    def __call__(self, **kw):
        return self.fn(**kw)


class _Recording:
    """Iterates the DataLoader and records each sample's SAT grid (c, h, w, d) -> (h, w, d)."""

    def __init__(self, loader, grid) -> None:
        self.loader, self.grid = loader, grid

    def __iter__(self):
        for batch in self.loader:
            self.grid.append([int(v) for v in batch["chwd"][1:]])
            yield batch

    def __len__(self):
        return len(self.loader)


# ---- the driver ---------------------------------------------------------------------------------
def sat_patches(path: Path) -> tuple:
    """SAT grid (after resampling and foreground crop) and its window count, by our (oracle-tested) code."""
    sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
    from textseg.formats.images import read_volume
    from textseg.models.sat.preprocess import preprocess
    from textseg.models.sat.window import split_3d

    vol = read_volume(path).canonical()
    _, geo = preprocess(vol, "CT")
    return tuple(geo.shape), len(split_3d(geo.shape)), tuple(geo.resampled_shape)


def report(rows, m) -> None:
    """Print the markdown tables (rows of the workers, m: the run's description)."""
    print(f"\nSAT-Nano, device: {m['device']}, {m['precision']}, patch batch {m['batch']}")
    print(f"patch mode: example_ct crop {'x'.join(map(str, m['crop']))} voxels (3 mm) -> SAT grid "
          f"{'x'.join(map(str, m['crop_grid']))} = {m['crop_patches']} window(s)")
    print(f"full mode: {'x'.join(map(str, FULL_SIZE))} CT at {'x'.join(map(str, FULL_SPACING))} mm -> resampled "
          f"{'x'.join(map(str, m['full_resampled']))} -> SAT grid {'x'.join(map(str, m['full_grid']))} = "
          f"{m['full_patches']} windows (stand-in network: {m.get('stand_in', 'empty')})\n")
    print("| mode | prompts | impl | seconds | CPU s | network s | network s/patch | text s | upstream writing s | "
          "ours reading probabilities s | peak MB | +MB | mask mL (SAT grid) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    per_patch = {}
    for r in rows:
        spp = "-"
        if r["mode"] == "patch":
            per_patch.setdefault((r["impl"], r["n"]), []).append((r["network_s"] / m["crop_patches"], r["added_mb"]))
            spp = f"{r['network_s'] / m['crop_patches']:.1f}"
        sat_ml = r.get("sat_mask_ml") or (r["mask_ml"] if r["impl"] == "upstream" else ["?"])  # upstream: SAT grid
        ml = sat_ml[:2] + (["..."] if r["n"] > 2 else [])
        ps = f"{r['prob_s']:.1f}" if "prob_s" in r else "-"
        print(f"| {r['mode']} | {r['n']} | {r['impl']} | {r['seconds']:.1f} | {r.get('cpu_s', float('nan')):.1f} | "
              f"{r['network_s']:.1f} | {spp} | {r['text_s']:.2f} | {r['write_s']:.1f} | {ps} | {r['peak_mb']:.0f} | "
              f"{r['added_mb']:.0f} | {', '.join(map(str, ml))} |")
    full: dict = {}
    for r in rows:
        if r["mode"] == "full":
            full.setdefault((r["impl"], r["n"]), []).append(r)
    k = m["full_patches"]
    if per_patch and full:
        print(f"\nExtrapolated to the 512x512x200 CT ({k} windows): full-mode seconds + {k} x network s/patch "
              "(means over the runs given); memory: full-mode peak + the patch run's growth (an upper estimate)\n")
        print("| prompts | impl | seconds (extrapolated) | peak MB (estimate) |")
        print("| ---: | --- | ---: | ---: |")
        for (impl, n), vals in sorted(per_patch.items(), key=lambda t: (t[0][1], t[0][0])):
            if (impl, n) in full:
                fs, fp = (float(np.mean([f[key] for f in full[(impl, n)]])) for key in ("seconds", "peak_mb"))
                spp, add = (float(np.mean([v[i] for v in vals])) for i in (0, 1))
                print(f"| {n} | {impl} | {fs + k * spp:.0f} | {fp + add:.0f} |")


def net_compare(a) -> None:
    work = Path(a.work or tempfile.mkdtemp(prefix="sat-bench-"))
    if not (work / "weights" / "nano.pth").exists():
        write_weights(work)
    for n in a.prompts:
        cmd = [a.upstream_python, __file__, "--worker", "net", "--n", str(n), "--work", str(work), "--upstream",
               a.upstream,
               "--upstream-python", a.upstream_python, "--device", a.device, "--threads", str(a.threads),
               "--reps", str(a.reps), "--net-size"] + [str(v) for v in a.net_size]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"net n={n} failed:\n{p.stderr[-4000:]}")
        r = json.loads(line[0][7:])
        print(f"\nSAT-Nano network only, input {'x'.join(map(str, r['size']))}, {n} queries, device {a.device}: "
              f"max |ours - upstream| = {r['max_abs_diff']:.2e} (logits up to {r['logit_scale']:.2e})")
        print("| impl | wall s (each run) | CPU s (each run) | median wall s |")
        print("| --- | --- | --- | ---: |")
        for impl, ts in r["times"].items():
            print(f"| {impl} | {', '.join(f'{t:.1f}' for t, _ in ts)} | {', '.join(f'{c:.1f}' for _, c in ts)} | "
                  f"{float(np.median([t for t, _ in ts])):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", help="checkout of github.com/zhaoziheng/SAT (required unless --report)")
    ap.add_argument("--upstream-python",
                    help="Python with upstream's deps (MONAI 1.1, transformers, einops; required unless --report)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--mode", nargs="+", choices=["patch", "full"], default=["patch", "full"])
    ap.add_argument("--crop", type=int, nargs=3, default=[96, 96, 96], help="voxels of example_ct (3 mm) for 'patch'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="CUDA autocast float16 on both sides (default float32)")
    ap.add_argument("--batch", type=int, default=2, help="patches per batch, both sides (upstream's batchsize_3d: 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--stand-in", default="organs", choices=["organs", "empty", "full"],
                    help="full mode's stand-in network: real organ masks (default), nothing, or everything")
    ap.add_argument("--impl", nargs="+", choices=["upstream", "ours"], default=["upstream", "ours"])
    ap.add_argument("--work", help="keep inputs/weights here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--report", nargs="+", help="only print the tables of earlier --json files (rows joined)")
    ap.add_argument("--net", action="store_true",
                    help="only the network comparison: both networks in one upstream process, alternating")
    ap.add_argument("--net-size", type=int, nargs=3, default=[128, 128, 64], help="input of --net (multiples of 32)")
    ap.add_argument("--reps", type=int, default=4, help="runs per network for --net")
    ap.add_argument("--worker", choices=["ours", "upstream", "net"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        a.mode = a.mode[0]
        r = {"ours": worker_ours, "upstream": worker_upstream, "net": worker_net}[a.worker](a)
        print("RESULT " + json.dumps(r))
        return
    if a.report:
        runs = [json.loads(Path(f).read_text()) for f in a.report]
        report([r for run in runs for r in run["rows"]], runs[-1])
        return
    if not (a.upstream and a.upstream_python):
        ap.error("--upstream and --upstream-python are required (except with --report)")
    if a.net:
        return net_compare(a)
    import torch

    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"CPU {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="sat-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "full.nii.gz").exists():
        write_inputs(work, a.crop)
    if not (work / "weights" / "nano.pth").exists():
        write_weights(work)
    if not (work / "organs_sat.npy").exists():
        write_organs(work)
    crop_grid, crop_patches, _ = sat_patches(work / "crop.nii.gz")
    full_grid, full_patches, full_resampled = sat_patches(work / "full.nii.gz")
    rows = []
    for mode in a.mode:
        for n in a.prompts:
            for impl in a.impl:
                py = a.upstream_python if impl == "upstream" else sys.executable
                cmd = [py, __file__, "--worker", impl, "--n", str(n), "--work", str(work), "--mode", mode,
                       "--upstream", a.upstream, "--upstream-python", a.upstream_python, "--device", a.device,
                       "--batch", str(a.batch), "--threads", str(a.threads), "--stand-in", a.stand_in] + \
                    (["--amp"] if a.amp else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not line:
                    sys.exit(f"{impl} {mode} n={n} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
                r = json.loads(line[0][7:])
                rows.append(dict(r, impl=impl, mode=mode, n=n))
                print(f"{mode} n={n} {impl}: {json.dumps(r)}", file=sys.stderr, flush=True)
    meta = dict(device=dev_name, precision="float16 autocast" if a.amp else "float32", batch=a.batch, crop=a.crop,
                crop_grid=crop_grid, crop_patches=crop_patches, full_grid=full_grid, full_resampled=full_resampled,
                full_patches=full_patches, stand_in=a.stand_in)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    report(rows, meta)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
