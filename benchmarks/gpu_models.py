"""The GPU suite's parts (benchmarks/gpu_suite.py runs each one as its own process).

A part prints one ``RESULT {json}`` line per finished measurement, so a part stopped at its time budget keeps
what it measured. Parts: ``env`` (device, versions), ``input`` (the images, made once), ``<model>/ours``,
``<model>/upstream`` and ``server``. docs/benchmarks.md says what each number means.

Same weights: the first part of a model that needs them writes seeded random weights of the full-size model
(``--tiny``: the oracle's reduced configuration) in the official checkpoint layout into the work folder; ours loads
them through the engine's real loader (``Predictor(..., weights_dir=...)``), upstream through its own model's
``load_state_dict``/loader. deepbet's weights ship in its wheel: both sides use those.

Same input: ``input`` resamples the real CT carried by gpu_prepare.py (example_ct, 3 mm) onto a 512x512x200 grid of
0.8x0.8x1.5 mm centred on it (linear, -1024 HU outside), and the MNI152 T1 (carried at 2 mm) onto 1 mm; ours reads the
arrays as Volumes, upstream reads uncompressed NIfTI files of the same arrays (its pipelines start from files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ORACLES = ROOT / "Testing" / "oracles"

ORGANS = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "stomach", "aorta", "gallbladder",
          "esophagus", "urinary bladder"]  # SAT's class names (vocabulary models), also used by SegVol
BP_TARGETS = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "aorta", "postcava", "stomach",
              "gallbladder", "duodenum"]  # BiomedParse CT-Abdomen targets


@dataclasses.dataclass(frozen=True)
class Model:
    catalog: str
    image: str  # "ct" or "t1"
    modality: str
    site: Optional[str]
    prompts: tuple[str, ...]
    warmup_prompt: str  # not among the measured prompts (text caches start cold)
    further: int  # further prompts timed one by one after the first
    slices: Optional[tuple[int, int]] = None  # 2D models: slice range measured (full size); None = all
    tiny_slices: Optional[tuple[int, int]] = None
    further_cached: int = 0  # 2D models: further prompts timed with a slice cache that holds the whole range


MODELS: dict[str, Model] = {
    "deepbet": Model("deepbet", "t1", "MRI", None, ("brain",), "brain", 0),
    "segvol": Model("segvol", "ct", "CT", None, tuple(ORGANS), "heart", 4),
    "sat-nano": Model("sat-nano", "ct", "CT", None, tuple(ORGANS), "heart", 4),
    "sat-pro": Model("sat-pro", "ct", "CT", None, tuple(ORGANS), "heart", 4),
    # 2D models: with the default 2 GiB slice cache a further prompt re-encodes every slice (~45 MB of features a
    # slice for v2, ~130 MB for v1): one further prompt (fp32) shows it; the cached variant times four.
    "biomedparse-v2": Model("biomedparse-v2", "ct", "CT", "abdomen", tuple(BP_TARGETS), "left adrenal gland", 1,
                            None, (8, 16), further_cached=4),
    # v1: every slice is encoded at 1024x1024 (and upstream runs once per slice AND prompt): a slice range, the
    # figures are also given extrapolated to the whole CT (both sides are linear in slices).
    "biomedparse-v1": Model("biomedparse-v1", "ct", "CT", "abdomen", tuple(BP_TARGETS), "left adrenal gland", 1,
                            (92, 108), (11, 12), further_cached=4),
}
FULL_CT = ((512, 512, 200), (0.8, 0.8, 1.5))
TINY_CT = ((64, 64, 24), (0.8, 0.8, 1.5))


# ---- the part's context -------------------------------------------------------------------------
@dataclasses.dataclass
class Ctx:
    part: str
    device: str
    tiny: bool
    work: Path
    prepared: Path

    @property
    def model_key(self) -> str:
        return self.part.split("/")[0]

    @property
    def model(self) -> Model:
        return MODELS[self.model_key]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def n_prompts(self) -> int:
        return len(self.model.prompts)

    @property
    def slices(self) -> Optional[tuple[int, int]]:
        return self.model.tiny_slices if self.tiny else self.model.slices

    @property
    def n_further(self) -> int:
        return min(self.model.further, 2) if self.tiny else self.model.further

    @property
    def n_further_cached(self) -> int:
        return min(self.model.further_cached, 2) if self.tiny else self.model.further_cached


_STDOUT = sys.stdout  # the suite reads RESULT lines here; upstream's prints are sent to stderr


def emit(**record: Any) -> None:
    print("RESULT " + json.dumps(record, default=_jsonable), file=_STDOUT, flush=True)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- measuring ----------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Measure:
    """Wall seconds (CUDA synchronised at both ends) and peak memory of a section: on CUDA
    ``torch.cuda.max_memory_allocated`` after a reset (weights included), on a CPU the peak resident set size
    sampled every 5 ms (benchmarks/peak.py)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0
        self.peak_mib = 0.0
        self.base_mib = 0.0

    def __enter__(self) -> Measure:
        if str(ROOT / "benchmarks") not in sys.path:
            sys.path.insert(0, str(ROOT / "benchmarks"))
        from peak import Peak

        sync(self.device)
        if self.device.startswith("cuda"):
            import torch

            self.base_mib = torch.cuda.memory_allocated() / 2**20
        self._peak = Peak(self.device).__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        self._peak.__exit__(*exc)
        self.peak_mib = self._peak.mb
        if not self.device.startswith("cuda"):
            self.base_mib = self._peak.base / 2**20


def precision_context(precision: str, device: str):
    """fp32: nothing; bf16/fp16: torch.autocast around the whole call (SAT's own fp16 autocast is an option)."""
    import torch

    if precision in ("fp32", "fp16-engine"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


# ---- inputs ---------------------------------------------------------------------------------------
def resample_centred(arr: np.ndarray, src_spacing, shape, spacing, fill: float) -> np.ndarray:
    """Linear resampling (separable, axis by axis) onto a grid of ``shape`` x ``spacing`` mm with the same axes and
    centre as the source; outside the source: ``fill``. Arrays in NIfTI (i, j, k) order."""
    out = arr.astype(np.float32)
    for ax in range(3):
        n_src = out.shape[ax]
        t = np.arange(shape[ax], dtype=np.float64)
        s = (n_src - 1) / 2 + (t - (shape[ax] - 1) / 2) * spacing[ax] / src_spacing[ax]
        inside = (s >= 0) & (s <= n_src - 1)
        s = np.clip(s, 0, n_src - 1)
        lo = np.floor(s).astype(np.int64)
        hi = np.minimum(lo + 1, n_src - 1)
        w = (s - lo).astype(np.float32)
        a, b = np.take(out, lo, axis=ax), np.take(out, hi, axis=ax)
        view = [None, None, None]
        view[ax] = slice(None)
        w, inside = w[tuple(view)], inside[tuple(view)]
        out = np.where(inside, a * (1 - w) + b * w, np.float32(fill)).astype(np.float32)
    return out


def centred_affine(affine: np.ndarray, src_shape, shape, spacing) -> np.ndarray:
    src_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3] / src_spacing * np.asarray(spacing)
    centre = affine[:3, :3] @ ((np.asarray(src_shape) - 1) / 2) + affine[:3, 3]
    out[:3, 3] = centre - out[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return out


def save_image(folder: Path, name: str, arr_ijk: np.ndarray, affine_ras: np.ndarray) -> None:
    """``name``.npz (the engine's Volume: array [k, j, i] and LPS geometry) and ``name``.nii (NIfTI, RAS)."""
    import nibabel as nib

    m = np.diag([-1.0, -1.0, 1.0]) @ affine_ras[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    np.savez(folder / f"{name}.npz", array=np.ascontiguousarray(arr_ijk.transpose(2, 1, 0)), spacing=spacing,
             origin=np.diag([-1.0, -1.0, 1.0]) @ affine_ras[:3, 3], direction=m / spacing)
    nib.save(nib.Nifti1Image(arr_ijk, affine_ras), str(folder / f"{name}.nii"))


def run_input(ctx: Ctx) -> None:
    """The images of the run, from the carried compact arrays (deterministic)."""
    import nibabel as nib

    folder = ctx.work / "input"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = np.load(ctx.prepared / "data" / "ct.npz")
    arr, aff = src["array"], src["affine"]
    src_spacing = np.linalg.norm(aff[:3, :3], axis=0)
    shape, spacing = TINY_CT if ctx.tiny else FULL_CT
    ct = np.rint(resample_centred(arr, src_spacing, shape, spacing, -1024.0)).astype(np.int16)
    ct_aff = centred_affine(aff, arr.shape, shape, spacing)
    save_image(folder, "ct", ct, ct_aff)
    # upstream SegVol runs a category only where its label has voxels: one block per category
    label = np.zeros(shape, np.uint8)
    n = len(ORGANS)
    x0, x1, z0, z1 = shape[0] // 4, 3 * shape[0] // 4, shape[2] // 4, 3 * shape[2] // 4
    for i in range(n):
        y0 = shape[1] // 4 + i * (shape[1] // 2) // n
        y1 = shape[1] // 4 + (i + 1) * (shape[1] // 2) // n
        label[x0:x1, y0:max(y1, y0 + 1), z0:z1] = i + 1
    nib.save(nib.Nifti1Image(label, ct_aff), str(folder / "ct_label.nii"))
    # a small crop (warm-ups)
    c = [s // 2 for s in shape]
    h = [s // 4 for s in shape]
    small = ct[c[0] - h[0]:c[0] + h[0], c[1] - h[1]:c[1] + h[1], c[2] - h[2]:c[2] + h[2]]
    sm_aff = ct_aff.copy()
    sm_aff[:3, 3] = ct_aff[:3, :3] @ np.array([c[0] - h[0], c[1] - h[1], c[2] - h[2]]) + ct_aff[:3, 3]
    save_image(folder, "ct_small", small, sm_aff)
    nib.save(nib.Nifti1Image(label[c[0] - h[0]:c[0] + h[0], c[1] - h[1]:c[1] + h[1], c[2] - h[2]:c[2] + h[2]].copy(),
                             sm_aff), str(folder / "ct_small_label.nii"))
    t1 = np.load(ctx.prepared / "data" / "t1.npz")
    t1_arr, t1_aff = t1["array"], t1["affine"]
    if ctx.tiny:
        t1_1mm, t1_1mm_aff = t1_arr, t1_aff
    else:
        t1_spacing = np.linalg.norm(t1_aff[:3, :3], axis=0)
        shape1 = tuple(int(round(n * s)) for n, s in zip(t1_arr.shape, t1_spacing))
        t1_1mm = np.rint(resample_centred(t1_arr, t1_spacing, shape1, (1.0, 1.0, 1.0), 0.0)).astype(np.int16)
        t1_1mm_aff = centred_affine(t1_aff, t1_arr.shape, shape1, (1.0, 1.0, 1.0))
    save_image(folder, "t1", t1_1mm, t1_1mm_aff)
    save_image(folder, "t1_small", t1_1mm, t1_1mm_aff)  # deepbet resizes every input to 128^3 / 256^3 anyway
    emit(kind="info", part=ctx.part, seconds=time.perf_counter() - t0, ct_shape=list(ct.shape),
         ct_spacing=list(spacing), ct_hu=[int(ct.min()), int(ct.max())], ct_body_fraction=float((ct > -500).mean()),
         t1_shape=list(t1_1mm.shape), source_ct=str(src["source"]), source_t1=str(t1["source"]))


def load_volume(ctx: Ctx, name: str):
    from textseg.volume import Volume

    d = np.load(ctx.work / "input" / f"{name}.npz")
    return Volume(d["array"], tuple(d["spacing"]), tuple(d["origin"]), d["direction"])


# ---- weights -------------------------------------------------------------------------------------
def seed_parameters(module, seed: int) -> None:
    """Seeded random values for every parameter, with sane scales (the BiomedParse oracle's rule): matrices
    N(0, 1/fan_in), 1-D weights 1 + 0.1 N, layer scales ('gamma') 0.5 + 0.1 N, logit scales 2, biases 0.1 N.
    Buffers keep their built values (pixel mean/std, position ids)."""
    import torch

    with torch.no_grad():
        params = sorted(module.named_parameters(), key=lambda kv: kv[0])
        dev = params[0][1].device
        g = torch.Generator(device=dev).manual_seed(seed)
        for name, p in params:
            r = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)
            last = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                p.copy_(r / math.sqrt(max(1, p[0].numel())))
            elif last == "logit_scale":
                p.fill_(2.0)
            elif "gamma" in last:
                p.copy_(0.5 + 0.1 * r)
            elif last.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def _cpu_state(module) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _segvol_config(tiny: bool):
    sys.path.insert(0, str(ORACLES))
    import make_segvol_fixture as oracle

    from textseg.models.segvol.network import SegVolConfig

    cfg = oracle.REDUCED if tiny else oracle.FULL
    return cfg, SegVolConfig(**dict(cfg, img_size=tuple(cfg["img_size"]), patch_size=tuple(cfg["patch_size"])))


def _sat_config(ctx: Ctx):
    from textseg.models.sat.network import PRESETS

    cfg = PRESETS["pro" if ctx.model_key == "sat-pro" else "nano"]
    return dataclasses.replace(cfg, patch_size=tiny_sat_patch()) if ctx.tiny else cfg


def tiny_sat_patch() -> tuple[int, int, int]:
    return (64, 64, 32)


TINY_MPNET = dict(vocab_size=64, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64,
                  hidden_act="gelu", max_position_embeddings=514, layer_norm_eps=1e-5,
                  relative_attention_num_buckets=32,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2)


def ensure_weights(ctx: Ctx) -> Optional[Path]:
    """The model's weights folder, written once per run by the first part that needs it."""
    key = ctx.model_key
    if key == "deepbet":
        return None
    wdir = ctx.work / "weights" / f"{key}-{'tiny' if ctx.tiny else 'full'}-{'cuda' if ctx.cuda else 'cpu'}"
    done = wdir / ".complete"
    if done.exists():
        return wdir
    import torch

    wdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = ctx.device
    if key == "segvol":
        from textseg.models.segvol.network import CLIP_FLAT, CLIP_OFFICIAL, SegVolNet

        _, sc = _segvol_config(ctx.tiny)
        with torch.device(dev):
            net = SegVolNet(sc).eval()
        seed_parameters(net, 1)
        sd = {(CLIP_OFFICIAL + k[len(CLIP_FLAT):] if k.startswith(CLIP_FLAT) and not k.startswith(CLIP_OFFICIAL)
               else k): v
              for k, v in _cpu_state(net).items()}
        torch.save({"model." + k: v for k, v in sd.items()}, wdir / "pytorch_model.bin")  # HF BAAI/SegVol layout
    elif key in ("sat-nano", "sat-pro"):
        from transformers import MPNetConfig, MPNetTokenizerFast

        from textseg.models.sat import BIOLORD_FILES, BIOLORD_PREFIX
        from textseg.models.sat.adapter import CHECKPOINTS
        from textseg.models.sat.network import SATNetwork
        from textseg.models.sat.text import BIOLORD_CONFIG, SATTextEncoder

        ckpt, text_ckpt, _ = CHECKPOINTS[key]
        with torch.device(dev):
            net = SATNetwork(_sat_config(ctx)).eval()
        seed_parameters(net, 2)
        torch.save({"model_state_dict": {"module." + k: v for k, v in _cpu_state(net).items()}}, wdir / ckpt)
        del net
        text_cfg = TINY_MPNET if ctx.tiny else BIOLORD_CONFIG
        with torch.device(dev):
            text = SATTextEncoder(MPNetConfig(**text_cfg)).eval()
        seed_parameters(text, 3)
        torch.save({"model_state_dict": {"module." + k: v for k, v in _cpu_state(text).items()}}, wdir / text_ckpt)
        # a BioLORD-like tokenizer (MPNet WordPiece, one token per word of the prompts), BioLORD's MPNet config
        words = ["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[CLS]", "[SEP]", "[UNK]", "<mask>"]
        words += sorted({w for n in list(ctx.model.prompts) + [ctx.model.warmup_prompt] for w in n.split()})
        bio = wdir / "biolord-src"
        bio.mkdir(exist_ok=True)
        (bio / "vocab.txt").write_text("\n".join(words) + "\n")
        MPNetTokenizerFast(vocab={t: i for i, t in enumerate(words)}, do_lower_case=True).save_pretrained(str(bio))
        MPNetConfig(**text_cfg).to_json_file(str(bio / "config.json"))
        for name in BIOLORD_FILES:
            if not (bio / name).exists():
                (bio / name).write_text("{}\n")
            (wdir / (BIOLORD_PREFIX + name)).write_bytes((bio / name).read_bytes())
    elif key == "biomedparse-v2":
        from textseg.models.biomedparse.v2.model import REDUCED, V2Config, build_v2

        model = build_v2(REDUCED if ctx.tiny else V2Config(), device=dev)
        seed_parameters(model, 4)
        torch.save({"state_dict": {"model." + k: v for k, v in _cpu_state(model).items()}, "epoch": 0},
                   wdir / "biomedparse_v2.ckpt")  # the official Lightning layout
    elif key == "biomedparse-v1":
        from textseg.models.biomedparse.v1.model import REDUCED, V1Config, build_v1

        model = build_v1(REDUCED if ctx.tiny else V1Config(), device=dev)
        seed_parameters(model, 5)
        torch.save(_cpu_state(model), wdir / "biomedparse_v1.pt")  # the official layout: a plain state dict
        # existence test parameters for the prompts (Beta(2, 2) per statistic: the test runs, nothing special)
        (wdir / "target_dist.json").write_text(json.dumps(
            {"CT-Abdomen": {t: [[2.0, 2.0]] * 4 for t in list(ctx.model.prompts) + [ctx.model.warmup_prompt]}}))
    else:
        raise ValueError(key)
    if ctx.cuda:
        torch.cuda.empty_cache()
    done.write_text("ok\n")
    files = {p.name: p.stat().st_size for p in wdir.iterdir() if p.is_file()}
    emit(kind="weights", part=ctx.part, model=key, seconds=time.perf_counter() - t0, bytes=sum(files.values()),
         files=files)
    return wdir


# ---- ours -----------------------------------------------------------------------------------------
def clear_text_caches(adapter) -> None:
    for name in ("text_cache", "_text_cache"):
        cache = getattr(adapter, name, None)
        if isinstance(cache, dict):
            cache.clear()


def ours_options(ctx: Ctx) -> dict[str, Any]:
    key = ctx.model_key
    if key == "segvol":
        return {"config": _segvol_config(ctx.tiny)[1]}
    if key in ("sat-nano", "sat-pro"):
        return {"config": _sat_config(ctx), **({"patch": tiny_sat_patch()} if ctx.tiny else {})}
    if key == "biomedparse-v2":
        from textseg.models.biomedparse.v2.model import REDUCED

        return {"config": REDUCED} if ctx.tiny else {}
    if key == "biomedparse-v1":
        from textseg.models.biomedparse.v1.model import REDUCED

        return {"config": REDUCED} if ctx.tiny else {}
    return {}


def ours_precisions(ctx: Ctx) -> list[str]:
    if ctx.model_key in ("sat-nano", "sat-pro") and ctx.cuda:
        return ["fp32", "fp16-engine"]  # the engine's default for SAT on CUDA: upstream's own float16 autocast
    return ["fp32", "bf16"]


def attempt(ctx: Ctx, what: str, fn) -> bool:
    """Run one measurement; a failure (out of memory, an op autocast cannot do) is recorded and the part goes on."""
    try:
        fn()
        return True
    except Exception as exc:  # noqa: BLE001 - reported in the results
        import traceback

        traceback.print_exc()
        emit(kind="error", part=ctx.part, model=ctx.model_key, what=what,
             error=f"{type(exc).__name__}: {str(exc)[:300]}")
        if ctx.cuda:
            import torch

            torch.cuda.empty_cache()
        return False


def run_ours(ctx: Ctx) -> None:
    import logging

    import torch

    from textseg.predictor import Predictor

    logging.getLogger("textseg").setLevel(logging.WARNING)
    m = ctx.model
    wdir = ensure_weights(ctx)
    t0 = time.perf_counter()
    pred = Predictor(m.catalog, device=ctx.device, weights_dir=wdir, seed=0, **ours_options(ctx))
    pred._ensure_loaded()  # model loading is not timed on either side (reported apart)
    sync(ctx.device)
    weights_mib = torch.cuda.memory_allocated() / 2**20 if ctx.cuda else None
    emit(kind="load", part=ctx.part, seconds=time.perf_counter() - t0, weights_mib=weights_mib)
    vol, small = load_volume(ctx, m.image), load_volume(ctx, m.image + "_small")
    kw: dict[str, Any] = {"modality": m.modality, "site": m.site}
    n_slices = vol.array.shape[0]
    rng = (ctx.slices or (0, n_slices)) if pred.spec.dims == 2 else None
    common = dict(part=ctx.part, model=ctx.model_key, impl="ours", slices=list(rng) if rng else None,
                  total_slices=n_slices)

    def set_image(v, r=None):
        pred.set_image(v, **kw, **({"slices": r} if pred.spec.dims == 2 else {}))

    def use(prec: str) -> None:
        if ctx.model_key.startswith("sat"):  # SAT's own float16 autocast is an adapter option
            pred.adapter.options["autocast"] = prec == "fp16-engine"
        clear_text_caches(pred.adapter)

    def warm(prec: str) -> None:  # kernels, cuDNN/cuBLAS handles, allocator: small input, a prompt of its own
        use(prec)
        t = time.perf_counter()
        with precision_context(prec, ctx.device):
            set_image(vol, (rng[0], min(rng[0] + 2, rng[1]))) if rng else set_image(small)
            pred.predict([m.warmup_prompt])
        sync(ctx.device)
        log(f"{ctx.part} warm-up {prec}: {time.perf_counter() - t:.1f} s")

    reference: dict[str, list[np.ndarray]] = {}

    def agreement(prec: str, masks: list[np.ndarray]) -> dict[str, Any]:
        if prec == "fp32":
            reference["masks"] = masks
            return {}
        ref = reference.get("masks")
        if not ref:
            return {}
        return {"dice_vs_fp32": [dice(a, b) for a, b in zip(ref, masks)],
                "voxel_change_vs_fp32": [int(b.sum()) - int(a.sum()) for a, b in zip(ref, masks)]}

    def interactive(prec: str, n_further: int, variant: str = "") -> None:
        """set_image + the first prompt, then each further prompt on the same image, one call each."""
        use(prec)
        with precision_context(prec, ctx.device):
            with Measure(ctx.device) as first:
                with Measure(ctx.device) as si:
                    set_image(vol, rng)
                r0 = pred.predict([m.prompts[0]])
            further = []
            for p in m.prompts[1:1 + n_further]:
                with Measure(ctx.device) as f:
                    pred.predict([p])
                further.append(f.seconds)
        rec = dict(kind="interactive", precision=prec, prompts=1, first_s=first.seconds, set_image_s=si.seconds,
                   further_s=further, peak_mib=first.peak_mib, base_mib=first.base_mib, voxels=[r0[0].voxel_count],
                   **common)
        if variant:
            rec["variant"] = variant
        elif len(m.prompts) == 1:  # one prompt (deepbet): the first prompt is the end-to-end run
            rec.update(agreement(prec, [r0[0].mask]))
        emit(**rec)

    def all_prompts(prec: str) -> None:
        """set_image + every prompt in one predict call."""
        use(prec)
        with precision_context(prec, ctx.device), Measure(ctx.device) as e:
            set_image(vol, rng)
            res = pred.predict(list(m.prompts))
        masks = [r.mask for r in res]
        emit(kind="e2e", precision=prec, prompts=len(res), seconds=e.seconds, peak_mib=e.peak_mib, base_mib=e.base_mib,
             voxels=[int(x.sum()) for x in masks], **agreement(prec, masks), **common)

    for prec in ours_precisions(ctx):
        if not attempt(ctx, f"warm-up {prec}", lambda: warm(prec)):  # noqa: B023 - runs in this iteration
            continue
        # 2D models re-encode every slice for a further prompt (default cache): timed once, in fp32
        further = 0 if pred.spec.dims == 2 and prec != "fp32" else ctx.n_further
        attempt(ctx, f"interactive {prec}", lambda: interactive(prec, further))  # noqa: B023 - runs in this iteration
        if len(m.prompts) > 1:
            attempt(ctx, f"{len(m.prompts)} prompts {prec}", lambda: all_prompts(prec))  # noqa: B023 - runs in this iteration
    if ctx.n_further_cached:  # a slice cache that holds the whole range: further prompts skip the encoder
        pred.adapter.options["feature_cache_bytes"] = 96 << 30  # read at the start of each run
        attempt(ctx, "interactive, slice cache",
                lambda: interactive("fp32", ctx.n_further_cached, "slice cache 96 GiB"))


# ---- upstream: shared set-up -----------------------------------------------------------------------
def verify_loaded(ctx: Ctx, what: str, module, file_sd: dict[str, Any], ignore: Sequence[str] = ()) -> None:
    """Upstream loads the same tensors ours does: every tensor of its model equals the file's (upstream loaders
    skip mismatching keys silently; a mismatch here would compare different networks)."""
    import torch

    own = module.state_dict()
    skip = lambda k: any(k.endswith(i) for i in ignore)  # noqa: E731
    missing = sorted(k for k in own if k not in file_sd and not skip(k))
    unexpected = sorted(k for k in file_sd if k not in own and not skip(k))
    different = sorted(k for k in own if k in file_sd and not skip(k)
                       and not torch.equal(own[k].detach().cpu(), file_sd[k].detach().cpu().to(own[k].dtype)))
    emit(kind="weights_check", part=ctx.part, what=what, tensors=len(own), missing=missing[:5],
         unexpected=unexpected[:5],
         different=different[:5])
    if missing or unexpected or different:
        raise RuntimeError(f"upstream {what} did not load the suite's weights: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected, {len(different)} different tensors")



def upstream_dir(ctx: Ctx, name: str) -> Path:
    return ctx.prepared / "upstream" / name


PROBES = {"timm": ("timm.models.layers", "timm.loss"),
          "torchvision": ("torchvision.transforms", "torchvision.ops.boxes")}


def fallback_standins(ctx: Ctx, *packages: str) -> None:
    """The real timm/torchvision where they import with what upstream uses (the GPU machine has both), else the
    stand-ins (the CPU dry run; or a timm that dropped ``timm.models.layers``). Recorded in the results."""
    import importlib

    used = {}
    for name in packages:
        try:
            for mod in PROBES[name]:
                importlib.import_module(mod)
            used[name] = "installed " + getattr(sys.modules[name], "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - any failure: use the stand-in
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            sys.path.insert(0, str(ctx.prepared / "standins" / "fallback" / name))
            used[name] = f"stand-in ({type(exc).__name__}: {str(exc)[:80]})"
    emit(kind="info", part=ctx.part, packages=used)


def upstream_precisions(ctx: Ctx) -> list[str]:
    return ["fp32", "fp16-upstream"] if ctx.model_key.startswith("sat") and ctx.cuda else ["fp32"]


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def upstream_run(ctx: Ctx, run, warm, precisions: Sequence[str], extra=None) -> None:
    """Warm up, then time ``run(n_prompts, precision) -> dict`` with 1 and all prompts."""

    def warm_up(prec: str) -> None:
        t = time.perf_counter()
        warm(prec)
        sync(ctx.device)
        log(f"{ctx.part} warm-up {prec}: {time.perf_counter() - t:.1f} s")

    def measure(prec: str, n: int) -> None:
        with Measure(ctx.device) as mm:
            out = run(n, prec) or {}
        seconds = mm.seconds - float(out.pop("excluded_s", 0.0))
        emit(kind="e2e", part=ctx.part, model=ctx.model_key, impl="upstream", precision=prec, prompts=n,
             seconds=seconds, peak_mib=mm.peak_mib, base_mib=mm.base_mib, **out, **(extra or {}))

    for prec in precisions:
        if not attempt(ctx, f"warm-up {prec}", lambda: warm_up(prec)):  # noqa: B023 - runs in this iteration
            continue
        for n in (1, ctx.n_prompts) if ctx.n_prompts > 1 else (1,):
            attempt(ctx, f"{n} prompt(s) {prec}", lambda: measure(prec, n))  # noqa: B023 - runs in this iteration


# ---- upstream SegVol ---------------------------------------------------------------------------------
def run_upstream_segvol(ctx: Ctx) -> None:
    import argparse

    import torch

    sys.path.insert(0, str(ORACLES))
    import make_segvol_fixture as oracle

    up = upstream_dir(ctx, "segvol")
    wdir = ensure_weights(ctx)
    cfg, _ = _segvol_config(ctx.tiny)
    t0 = time.perf_counter()
    real_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    oracle.setup_upstream(up)  # MONAI 0.9 behaviours the demo relies on; .cuda() made a no-op (CPU runs)
    if ctx.cuda:  # on the GPU the demo's .cuda() calls are meant
        torch.Tensor.cuda, torch.nn.Module.cuda = real_cuda
    import inference_demo as demo
    from data_process.demo_data_process import process_ct_gt
    from monai.networks.nets import ViT
    from network.model import SegVol
    from segment_anything_volumetric.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from transformers import CLIPTextConfig, CLIPTextModel

    c = cfg
    img, patch = np.array(c["img_size"]), np.array(c["patch_size"])
    vit = ViT(in_channels=1, img_size=c["img_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
              mlp_dim=c["mlp_dim"], num_layers=c["num_layers"], num_heads=c["num_heads"], pos_embed="perceptron",
              classification=False, dropout_rate=0.0)
    pe = PromptEncoder(embed_dim=768, image_embedding_size=[int(v) for v in img / patch],
                       input_image_size=c["img_size"],
                       mask_in_chans=c["mask_in_chans"])
    md = MaskDecoder(image_encoder_type="vit", num_multimask_outputs=3,
                     transformer=TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=768,
                                                   mlp_dim=c["decoder_mlp_dim"],
                                                   num_heads=c["decoder_heads"]),
                     transformer_dim=768, iou_head_depth=3, iou_head_hidden_dim=c["iou_head_hidden"], image_size=img,
                     patch_size=patch)
    model = SegVol(image_encoder=vit, mask_decoder=md, prompt_encoder=pe, clip_ckpt=str(up / "config" / "clip"),
                   roi_size=c["img_size"], patch_size=c["patch_size"], test_mode=True)
    if c["text_config"]:
        model.text_encoder.clip_text_model = CLIPTextModel(CLIPTextConfig(**c["text_config"]))
    own = model.state_dict()
    flat = not any(k.startswith("text_encoder.clip_text_model.text_model.") for k in own)
    sd = {}
    for k, v in torch.load(wdir / "pytorch_model.bin", map_location="cpu", weights_only=True).items():
        k = k[len("model."):]
        if flat and k.startswith("text_encoder.clip_text_model.text_model."):  # transformers 5: no text_model level
            k = "text_encoder.clip_text_model." + k[len("text_encoder.clip_text_model.text_model."):]
        sd[k] = v
    model.load_state_dict(sd, strict=False)
    verify_loaded(ctx, "SegVol", model, sd, ignore=("position_ids",))
    model = model.to(ctx.device).eval()
    sync(ctx.device)
    emit(kind="load", part=ctx.part, seconds=time.perf_counter() - t0,
         weights_mib=torch.cuda.memory_allocated() / 2**20 if ctx.cuda else None)
    calls = {"n": 0}
    forward = model.forward

    def counted(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    model.forward = counted
    args = argparse.Namespace(spatial_size=tuple(c["img_size"]), patch_size=tuple(c["patch_size"]), infer_overlap=0.5,
                              use_zoom_in=True, use_text_prompt=True, use_box_prompt=False, use_point_prompt=False)
    inp = ctx.work / "input"

    def pipeline(name: str, names: Sequence[str], prec: str) -> dict[str, Any]:
        calls["n"] = 0
        with precision_context(prec, ctx.device):
            item = process_ct_gt(str(inp / f"{name}.nii"), str(inp / f"{name}_label.nii"), list(names),
                                 args.spatial_size)
            item = {k: torch.as_tensor(np.ascontiguousarray(np.asarray(v))) for k, v in item.items()}
            out = demo.zoom_in_zoom_out(args, model, item["image"].float().unsqueeze(0),
                                        item["zoom_out_image"].float().unsqueeze(0),
                                        item["label"].unsqueeze(0), item["zoom_out_label"].unsqueeze(0),
                                        categories=list(names))
        return {"voxels": [int((torch.sigmoid(v[4].float()) > 0.5).sum()) for v in out.values()],
                "forward_calls": calls["n"], "grid": "upstream's foreground crop"}

    with contextlib.redirect_stdout(sys.stderr):  # the demo prints per category
        upstream_run(ctx, lambda n, prec: pipeline("ct", ctx.model.prompts[:n], prec),
                     lambda prec: pipeline("ct_small", [ctx.model.warmup_prompt], prec), upstream_precisions(ctx))


# ---- upstream SAT -------------------------------------------------------------------------------------
def run_upstream_sat(ctx: Ctx) -> None:
    import argparse

    import torch

    os.environ.setdefault("RANK", "0")
    up = upstream_dir(ctx, "sat")
    sys.path[:0] = [str(up), str(up / "model" / "dynamic-network-architectures-main")]
    wdir = ensure_weights(ctx)
    from textseg.models.sat.adapter import CHECKPOINTS

    ckpt, text_ckpt, _ = CHECKPOINTS[ctx.model_key]
    bio = str(wdir / "biolord-src")
    t0 = time.perf_counter()

    class DDP(torch.nn.Module):  # DistributedDataParallel without a process group: same 'module.' keys
        def __init__(self, module, device_ids=None, **kw):
            super().__init__()
            self.module = module

        def forward(self, *a, **kw):
            return self.module(*a, **kw)

    torch.nn.parallel.DistributedDataParallel = DDP
    if not ctx.cuda:
        torch.cuda.current_device = lambda: ctx.device  # the text tower moves tokens there
    import model.text_tower as tt
    import model.tokenizer as tk
    from transformers import AutoConfig

    auto_tok = tk.AutoTokenizer.from_pretrained  # no hub: BioLORD's config and tokenizer from the weights folder
    tt.AutoModel.from_pretrained = lambda name, **kw: tt.AutoModel.from_config(AutoConfig.from_pretrained(bio))
    tk.AutoTokenizer.from_pretrained = lambda name, **kw: auto_tok(bio, **kw)
    import data.inference_dataset as ds
    import evaluate.inference_engine as eng
    from data.inference_dataset import Inference_Dataset, collate_fn
    from model.build_model import build_maskformer, load_checkpoint
    from model.text_encoder import Text_Encoder
    from torch.utils.data import DataLoader

    patch = list(tiny_sat_patch() if ctx.tiny else (288, 288, 96))
    if ctx.tiny:  # upstream hard-codes the 288x288x96 window in two places
        real_split, real_gauss = ds.split_3d, eng.compute_gaussian
        ds.split_3d = lambda img, crop_size=None: real_split(img, crop_size=patch)
        eng.compute_gaussian = lambda tile, **kw: real_gauss(tuple(patch), **kw)
    device = torch.device(ctx.device)
    args = argparse.Namespace(vision_backbone="UNET-L" if ctx.model_key == "sat-pro" else "UNET", crop_size=patch,
                              patch_size=[32, 32, 32], deep_supervision=False, partial_load=True, text_encoder="ours",
                              text_encoder_partial_load=True, max_queries=256, batchsize_3d=2)
    with contextlib.redirect_stdout(sys.stderr):
        model = build_maskformer(args, device, None)
        model, _, _ = load_checkpoint(checkpoint=str(wdir / ckpt), resume=False, partial_load=True, model=model,
                                      device=device)
        text_encoder = Text_Encoder(text_encoder="ours", checkpoint=str(wdir / text_ckpt), partial_load=True,
                                    open_bert_layer=12, open_modality_embed=False, gpu_id=None, device=device)
    for what, module, path in (("SAT network", model, wdir / ckpt),
                               ("SAT text encoder", text_encoder.model, wdir / text_ckpt)):
        verify_loaded(ctx, what, module, torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"],
                      ignore=("position_ids",))
    sync(ctx.device)
    emit(kind="load", part=ctx.part, seconds=time.perf_counter() - t0,
         weights_mib=torch.cuda.memory_allocated() / 2**20 if ctx.cuda else None)
    write_s = {"s": 0.0}
    real_save = eng.nib.save

    def timed_save(*a, **k):  # upstream writes every mask as NIfTI: timed apart, not counted
        t = time.perf_counter()
        real_save(*a, **k)
        write_s["s"] += time.perf_counter() - t

    eng.nib.save = timed_save
    patches = {"n": 0}
    real_forward = model.forward

    def counted(*a, **k):
        patches["n"] += 1
        return real_forward(*a, **k)

    model.forward = counted
    real_autocast = eng.autocast
    outdir = ctx.work / f"sat-upstream-{ctx.model_key}"

    def pipeline(name: str, names: Sequence[str], prec: str) -> dict[str, Any]:
        eng.autocast = real_autocast if prec == "fp16-upstream" else (lambda: torch.autocast("cuda", enabled=False))
        write_s["s"], patches["n"] = 0.0, 0
        jsonl = ctx.work / f"sat-{name}.jsonl"
        jsonl.write_text(json.dumps({"image": str(ctx.work / "input" / f"{name}.nii"), "label": list(names),
                                     "modality": "CT", "dataset": "bench"}) + "\n")
        outdir.mkdir(exist_ok=True)
        with contextlib.redirect_stdout(sys.stderr):
            testset = Inference_Dataset(str(jsonl), args.max_queries, args.batchsize_3d, patch_size=patch)
            loader = DataLoader(testset, batch_size=1, num_workers=0, collate_fn=collate_fn)
            eng.inference(model=model, text_encoder=text_encoder, device=device, testset=testset, testloader=loader,
                          nib_dir=str(outdir))
        import nibabel as nib

        folder = outdir / "bench" / f"seg_{name}.nii"  # upstream's sample id strips '.nii.gz' only
        vox = [int(np.asarray(nib.load(str(folder / f"{n}.nii.gz")).dataobj).sum()) for n in names]
        return {"excluded_s": write_s["s"], "write_s": write_s["s"], "voxels": vox, "patch_batches": patches["n"],
                "grid": "upstream's 1x1x3 mm foreground crop"}

    upstream_run(ctx, lambda n, prec: pipeline("ct", ctx.model.prompts[:n], prec),
                 lambda prec: pipeline("ct_small", [ctx.model.warmup_prompt], prec), upstream_precisions(ctx))


# ---- upstream BiomedParse v2 --------------------------------------------------------------------------
def run_upstream_v2(ctx: Ctx) -> None:
    import torch
    import torch.nn.functional as F

    fallback_standins(ctx, "timm")
    up = upstream_dir(ctx, "biomedparse-v2")
    sys.path[:0] = [str(up), str(ORACLES)]
    wdir = ensure_weights(ctx)
    import make_biomedparse_v2_fixture as oracle

    t0 = time.perf_counter()
    tok_dir = Path(os.environ["TEXTSEG_HOME"]) / "tokenizers" / "clip"
    with torch.device("cpu"):
        model = oracle.build_model(up, ctx.tiny, tok_dir)
    sd = torch.load(wdir / "biomedparse_v2.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd = {k[len("model."):]: v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    verify_loaded(ctx, "BiomedParse v2", model, sd)
    model = model.to(ctx.device).eval()
    del sd
    sync(ctx.device)
    emit(kind="load", part=ctx.part, seconds=time.perf_counter() - t0,
         weights_mib=torch.cuda.memory_allocated() / 2**20 if ctx.cuda else None)
    import inference as up_inf  # upstream inference.py: postprocess, merge_multiclass_masks (hydra stand-in)
    from utils import process_input, process_output

    from textseg.presets import get_preset, window_to_uint8

    preset = get_preset("CT", "abdomen")
    vol = load_volume(ctx, "ct")
    rng = ctx.slices or (0, vol.array.shape[0])

    def pipeline(rng, names: Sequence[str], prec: str) -> dict[str, Any]:
        # upstream's input: the CT windowed to 0..255 slice by slice (its challenge .npz files are stored so)
        imgs = np.stack([window_to_uint8(s, preset) for s in vol.canonical().array[rng[0]:rng[1]]])
        ids = list(range(1, len(names) + 1))
        text = "[SEP]".join(f"Visualization of the {t} in abdominal CT imaging" for t in names)
        with torch.no_grad(), precision_context(prec, ctx.device):
            x, pad_width, padded_size, valid_axis = process_input(imgs, 512)
            x = x.to(ctx.device).int()
            out = model({"image": x.unsqueeze(0), "text": [text]}, mode="eval", slice_batch_size=4)
            masks = F.interpolate(out["predictions"]["pred_gmasks"].float(), size=(512, 512), mode="bicubic",
                                  align_corners=False, antialias=True)
            masks = up_inf.postprocess(masks, out["predictions"]["object_existence"].float())
            labels = up_inf.merge_multiclass_masks(masks, ids)
            labels = process_output(labels, pad_width, padded_size, valid_axis)
        labels = np.asarray(labels)
        return {"voxels": [int((labels == i).sum()) for i in ids]}

    upstream_run(ctx, lambda n, prec: pipeline(rng, ctx.model.prompts[:n], prec),
                 lambda prec: pipeline((rng[0], rng[0] + 2), [ctx.model.warmup_prompt], prec), upstream_precisions(ctx),
                 extra={"slices": list(rng), "total_slices": int(vol.array.shape[0])})


# ---- upstream BiomedParse v1 --------------------------------------------------------------------------
def run_upstream_v1(ctx: Ctx) -> None:
    import importlib.util

    import torch
    import torch.nn.functional as F
    import transformers

    fallback_standins(ctx, "timm", "torchvision")
    up = upstream_dir(ctx, "biomedparse-v1")
    sys.path.insert(0, str(up))
    wdir = ensure_weights(ctx)
    # vlpencoder builds an unused BiomedBERT from the hub at init; the text path uses the CLIP tokenizer
    transformers.AutoModel.from_pretrained = staticmethod(lambda *a, **k: torch.nn.Identity())
    spec = importlib.util.spec_from_file_location("bpv1_oracle", ORACLES / "make_biomedparse_v1_fixture.py")
    orc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orc)
    t0 = time.perf_counter()
    tok_dir = str(Path(os.environ["TEXTSEG_HOME"]) / "tokenizers" / "clip")
    if not ctx.cuda:  # upstream's .cuda() calls and torch.cuda.current_device(): CPU stand-ins (dry run)
        torch.cuda.current_device = lambda: "cpu"
        torch.Tensor.cuda = lambda self, *a, **k: self
    with chdir(up), contextlib.redirect_stdout(sys.stderr):
        model = orc.build(up, orc.load_config(up, tok_dir, reduced=ctx.tiny)).eval()
    sd = torch.load(wdir / "biomedparse_v1.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=False)
    verify_loaded(ctx, "BiomedParse v1", model, sd)
    model = model.to(ctx.device).eval()
    from modeling.language.loss import vl_similarity
    from utilities.constants import BIOMED_CLASSES

    with torch.no_grad():  # needed once before the first call (feeds pred_logits only)
        model.sem_seg_head.predictor.lang_encoder.get_text_embeddings(BIOMED_CLASSES + ["background"], is_eval=True)
    for k in ("spatial", "visual", "audio"):
        model.task_switch[k] = False
    model.task_switch["grounding"] = True
    sync(ctx.device)
    emit(kind="load", part=ctx.part, seconds=time.perf_counter() - t0,
         weights_mib=torch.cuda.memory_allocated() / 2**20 if ctx.cuda else None)
    from inference_utils.processing_utils import process_intensity_image

    vol = load_volume(ctx, "ct").canonical().array
    rng = ctx.slices or (0, vol.shape[0])

    def one(image: np.ndarray, prompt: str) -> np.ndarray:
        """upstream evaluate_demo + interactive_infer_image's query selection (the notebooks' per-prompt call)."""
        data = {"image": torch.from_numpy(image.copy()).permute(2, 0, 1).to(ctx.device), "text": [prompt],
                "height": image.shape[0], "width": image.shape[1]}
        results, _, extra = model.evaluate_demo([data])
        pred_masks, v_emb, t_emb = results["pred_masks"][0], results["pred_captions"][0], extra["grounding_class"]
        t_n = t_emb / (t_emb.norm(dim=-1, keepdim=True) + 1e-7)
        v_n = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
        matched = vl_similarity(v_n, t_n, temperature=model.sem_seg_head.predictor.lang_encoder.logit_scale).max(0)[1]
        prob = F.interpolate(pred_masks[matched, :, :][None].float(), image.shape[:2], mode="bilinear")[0].sigmoid()
        return (prob > 0.5).cpu().numpy()

    def pipeline(rng, names: Sequence[str], prec: str) -> dict[str, Any]:
        vox = [0] * len(names)
        with torch.no_grad(), precision_context(prec, ctx.device):
            for k in range(*rng):
                image = process_intensity_image(vol[k].astype(np.float64), True, "abdomen")
                for j, p in enumerate(names):
                    vox[j] += int(one(image, p).sum())
        return {"voxels": vox, "grid": "1024x1024 per slice"}

    upstream_run(ctx, lambda n, prec: pipeline(rng, ctx.model.prompts[:n], prec),
                 lambda prec: pipeline((rng[0], rng[0] + 1), [ctx.model.warmup_prompt], prec), upstream_precisions(ctx),
                 extra={"slices": list(rng), "total_slices": int(vol.shape[0])})


# ---- upstream deepbet ---------------------------------------------------------------------------------
def run_upstream_deepbet(ctx: Ctx) -> None:
    import nibabel as nib
    import torch
    from deepbet import BrainExtraction

    t0 = time.perf_counter()
    bet = BrainExtraction(no_gpu=not ctx.cuda)
    sync(ctx.device)
    emit(kind="load", part=ctx.part, seconds=time.perf_counter() - t0,
         weights_mib=torch.cuda.memory_allocated() / 2**20 if ctx.cuda else None)

    def pipeline(name: str, prec: str) -> dict[str, Any]:
        with precision_context(prec, ctx.device):
            _, mask, _ = bet.run(nib.load(str(ctx.work / "input" / f"{name}.nii")))
        return {"voxels": [int(np.asarray(mask.dataobj).sum())]}

    upstream_run(ctx, lambda n, prec: pipeline("t1", prec), lambda prec: pipeline("t1_small", prec),
                 upstream_precisions(ctx))


UPSTREAM = {"segvol": run_upstream_segvol, "sat-nano": run_upstream_sat, "sat-pro": run_upstream_sat,
            "biomedparse-v2": run_upstream_v2, "biomedparse-v1": run_upstream_v1, "deepbet": run_upstream_deepbet}


# ---- the server on loopback ---------------------------------------------------------------------------
def run_server(ctx: Ctx) -> None:
    """SegVol through ``textseg serve`` on 127.0.0.1 vs the same Predictor in this process. A warm-up round on the
    small crop, then two rounds, each on a new image (the CT shifted by 1 HU per round, so the server cannot reuse an
    upload or an encoding); each step's median. Remote set_image = NRRD upload + preprocessing + encoding on the
    server; a remote prompt = job + masks and probabilities (uint8) back."""
    import logging
    import statistics

    from textseg.predictor import Predictor
    from textseg.remote.client import RemotePredictor
    from textseg.remote.server import Settings, running_server

    logging.getLogger("textseg").setLevel(logging.WARNING)
    sctx = dataclasses.replace(ctx, part="segvol/server")
    wdir = ensure_weights(sctx)
    opts = ours_options(sctx)
    prompts = list(MODELS["segvol"].prompts)
    base = load_volume(ctx, "ct")
    local = Predictor("segvol", device=ctx.device, weights_dir=wdir, seed=0, **opts)
    settings = Settings(port=0, devices=(ctx.device,), preload=("segvol",), weights_dir=str(wdir),
                        adapter_options={"segvol": opts}, log_level="WARNING", queue_size=4)
    steps = ("set_image", "first prompt", "each further prompt (mean of 2)")
    small = load_volume(ctx, "ct_small")
    t0 = time.perf_counter()
    with running_server(settings) as url:
        emit(kind="info", part=ctx.part, server_start_s=time.perf_counter() - t0, url=url)
        rows: dict[str, list[float]] = {}
        for rnd in range(3):  # round 0: a warm-up on the small crop
            vol = small if rnd == 0 else base.with_array(base.array + np.int16(rnd))
            for side in ("local", "remote"):
                p = local if side == "local" else RemotePredictor(url, "segvol")
                with Measure(ctx.device) as a:
                    p.set_image(vol, "CT")
                with Measure(ctx.device) as b:
                    r1 = p.predict(prompts[:1])
                with Measure(ctx.device) as c:
                    more = p.predict(prompts[1:2]) + p.predict(prompts[2:3])
                if rnd:
                    for step, sec in zip(steps, (a.seconds, b.seconds, c.seconds / 2)):
                        rows.setdefault(f"{side}/{step}", []).append(sec)
                counts = [r.voxel_count for r in r1 + more]
                if side == "local":
                    want = counts
                elif counts != want:
                    raise RuntimeError(f"remote masks differ from local: {counts} vs {want}")
        for step in steps:
            lo, re = statistics.median(rows[f"local/{step}"]), statistics.median(rows[f"remote/{step}"])
            emit(kind="server", part=ctx.part, step=step, local_s=lo, remote_s=re, overhead_s=re - lo,
                 overhead_pct=100.0 * (re - lo) / lo if lo > 0 else None, rounds=len(rows[f"local/{step}"]))


# ---- the environment ----------------------------------------------------------------------------------
def run_env(ctx: Ctx) -> None:
    import platform
    import subprocess
    from importlib import metadata

    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                                 "temperature.gpu,power.draw", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:  # noqa: BLE001 - informative only
            info["nvidia_smi"] = f"not available: {exc}"
    else:
        info["device"] = f"CPU ({torch.get_num_threads()} torch threads)"
    versions = {}
    for name in ("numpy", "scipy", "scikit-image", "transformers", "huggingface-hub", "safetensors", "einops", "monai",
                 "nibabel", "fastapi", "uvicorn", "pydantic", "deepbet", "timm", "torchvision",
                 "opencv-python-headless"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    import textseg

    info["textseg"] = textseg.__version__
    emit(kind="env", part=ctx.part, **info)


def main(part: str, device: str, tiny: bool, work: Path, prepared: Path) -> None:
    ctx = Ctx(part, device, tiny, work, prepared)
    if part == "env":
        return run_env(ctx)
    if part == "input":
        return run_input(ctx)
    if part == "server":
        return run_server(ctx)
    model, _, impl = part.partition("/")
    if impl == "ours":
        return run_ours(ctx)
    return UPSTREAM[model](ctx)
