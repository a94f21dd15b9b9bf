"""SegVol behind the predictor contract: upstream's CT preprocessing and zoom-out-zoom-in inference.

Steps (BAAI-DCAI/SegVol ``data_process/demo_data_process.py`` and ``inference_demo.py``):

1. The canonical (closest-LPS) array is put in RAS index order and transposed to (z, y, x), as the
   demo's ``Orientationd(RAS)`` + ``DimTranspose`` intend; foreground normalisation, min-max to
   [0, 1], symmetric zero padding to the window size, crop to the foreground (image > 0). The crop
   box and padding are kept to map results back.
2. Zoom-out: the crop resized (nearest-exact) to the window size (32x256x256), encoded ONCE per
   image; every prompt is decoded on that embedding, logits nearest-upsampled to the crop.
3. ROI: bounding box of sigmoid > 0.5, grown to the window size where smaller; zoom-in with MONAI's
   sliding window (overlap 0.5, constant blending) over the ROI; window embeddings are cached by
   window content position, so prompts whose windows coincide reuse them.
4. Window prompts: text as given; a box prompt becomes the box of the zoom-out mask inside the
   window (the mapped user box when there is one window); point prompts are re-sampled from the
   mapped points (seeded generator) together with the zoom-out box.

Boxes and points come in LPS mm (textseg.prompts) and are mapped onto the crop grid here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.transforms.utils import generate_spatial_bounding_box

from ...errors import InputError
from ...prompts import Prompt
from ...volume import canonical_ras_index, canonical_to_ras, ras_to_canonical
from ..base import Decoded, RunContext, VolumeAdapter, weight_file
from ..feature_cache import FeatureCache, cache_budget
from ..options import AdapterOptions
from .network import SegVolConfig, SegVolNet, load_checkpoint

TEMPLATE = "A computerized tomography of a {}."
OVERLAP = 0.5


# ------------------------------------------------------------------------------------------------
# preprocessing (numpy)
def foreground_normalize(arr_xyz: np.ndarray) -> np.ndarray:
    """Upstream ForegroundNormalization (threshold = mean; 0.05/99.95 percentiles above it; z-score)."""
    flat = arr_xyz.flatten()
    fg = flat[flat > np.mean(flat)]
    if fg.size == 0:
        raise InputError("The CT is constant: there is no foreground to segment.")
    hi, lo = np.percentile(fg, 99.95), np.percentile(fg, 0.05)
    mean, std = np.mean(fg), np.std(fg)
    return (np.clip(arr_xyz, lo, hi) - mean) / max(std, 1e-8)


def model_array(canonical: np.ndarray) -> np.ndarray:
    """Canonical [k(S), j(P), i(L)] -> upstream's (z, y, x) of a RAS array (a view: j and i reversed)."""
    return canonical_to_ras(canonical).transpose(2, 1, 0)


@dataclass
class Geometry:
    """Where the model's crop lies: model array = canonical flipped; padded; cropped."""

    shape: tuple[int, int, int]  # model array (= canonical) shape
    pad: tuple[tuple[int, int], ...]  # symmetric padding per axis
    start: tuple[int, int, int]  # crop start in the padded array
    stop: tuple[int, int, int]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def canonical_to_crop(self, kji: np.ndarray) -> np.ndarray:
        """Continuous canonical indices (N, 3) in (k, j, i) order -> crop indices (z, y, x)."""
        m = canonical_ras_index(self.shape[::-1])
        zyx = (np.asarray(kji, float)[:, ::-1] @ m[:3, :3].T + m[:3, 3])[:, ::-1]
        return zyx + np.array([p[0] for p in self.pad]) - np.array(self.start)

    def to_canonical(self, crop_values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        padded_shape = [s + a + b for s, (a, b) in zip(self.shape, self.pad)]
        out = np.full(padded_shape, fill, np.float32)
        out[tuple(slice(a, b) for a, b in zip(self.start, self.stop))] = crop_values
        out = out[tuple(slice(a, a + s) for s, (a, _) in zip(self.shape, self.pad))]
        return ras_to_canonical(out.transpose(2, 1, 0))


def preprocess(canonical: np.ndarray, window: Sequence[int]) -> tuple[np.ndarray, Geometry]:
    """Upstream's CT preprocessing on a canonical array; returns the cropped image and its geometry."""
    zyx = model_array(np.asarray(canonical, dtype=np.float32))
    # Flatten in upstream's (x, y, z) memory order so the float32 statistics match bit for bit.
    arr = foreground_normalize(np.ascontiguousarray(zyx.transpose(2, 1, 0))).transpose(2, 1, 0).astype(np.float32)
    arr = arr - arr.min()
    arr = arr / np.clip(arr.max(), 1e-8, None)
    pad = tuple(((max(w - s, 0)) // 2, max(w - s, 0) - (max(w - s, 0)) // 2) for s, w in zip(arr.shape, window))
    arr = np.pad(arr, pad, mode="constant")
    start, stop = generate_spatial_bounding_box(arr[None], lambda x: x > 0)
    if any(b <= a for a, b in zip(start, stop)):
        raise InputError("The CT has no foreground after normalisation (constant image?): nothing to segment.")
    geo = Geometry(tuple(zyx.shape), pad, tuple(int(v) for v in start),
                   tuple(int(v) for v in stop))  # type: ignore[arg-type]
    crop = np.ascontiguousarray(arr[tuple(slice(a, b) for a, b in zip(geo.start, geo.stop))])
    return crop, geo


# ------------------------------------------------------------------------------------------------
# prompt helpers (torch, upstream semantics)
def generate_box(mask: torch.Tensor) -> torch.Tensor:
    """Inclusive (z0, y0, x0, z1, y1, x1) box of mask > 0, or -1s when empty (upstream generate_box)."""
    idx = torch.nonzero(mask > 0)
    if idx.shape[0] == 0:
        return torch.full((6,), -1.0)
    return torch.cat([idx.min(0).values, idx.max(0).values]).float()


def binary_cube(box: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    lo, hi = box[:3].int().tolist(), box[3:].int().tolist()
    cube = torch.zeros(tuple(shape))
    cube[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
    return cube


def box_map(box_zo: torch.Tensor, zoom_out_shape, crop_shape) -> torch.Tensor:
    """Upstream's crop-space reflection of a zoom-out box (binary cube, nearest upsampling)."""
    return F.interpolate(binary_cube(box_zo, zoom_out_shape)[None, None], size=tuple(crop_shape), mode="nearest")[0, 0]


def select_points(prob_map: torch.Tensor, generator: torch.Generator, n_extra: int = 4) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Upstream select_points(map) with its defaults (1 + 4 positive points, -1 padding), seeded."""
    pos = torch.nonzero(prob_map > 0.9)
    if pos.shape[0] == 0:
        return torch.full((n_extra + 1, 3), -1.0), torch.full((n_extra + 1,), -1.0)
    first = pos[torch.randint(pos.shape[0], (1,), generator=generator)]
    extra = pos[torch.randperm(pos.shape[0], generator=generator)[:n_extra]]
    pts = torch.cat([first, extra]).float()
    labels = torch.ones(pts.shape[0])
    pad = n_extra + 1 - pts.shape[0]
    if pad > 0:
        pts = torch.cat([pts, torch.full((pad, 3), -1.0)])
        labels = torch.cat([labels, torch.full((pad,), -1.0)])
    return pts, labels


def roi_from_logits(logits: torch.Tensor, window: Sequence[int]) -> Optional[tuple[int, ...]]:
    """Upstream logits2roi_coor: (min_d, min_h, min_w, max_d, max_h, max_w), inclusive, or None."""
    idx = torch.nonzero(torch.sigmoid(logits) > 0.5)
    if idx.shape[0] == 0:
        return None
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    out_lo, out_hi = [], []
    for a, b, w, size in zip(lo, hi, window, logits.shape):
        grow = max(0, w - (b - a + 1)) // 2
        out_lo.append(max(0, a - grow))
        out_hi.append(min(size, b + grow))
    return tuple(out_lo + out_hi)


def sw_pad(shape: Sequence[int], window: Sequence[int]) -> list[int]:
    """MONAI sliding_window_inference's F.pad list (last axis first)."""
    pad: list[int] = []
    for s, w in zip(reversed(list(shape)), reversed(list(window))):
        diff = max(w - s, 0)
        pad += [diff // 2, diff - diff // 2]
    return pad


@dataclass
class PromptGrid:
    """One prompt on the model grids: zoom-out box/points and their crop-space maps."""

    box_zo: Optional[torch.Tensor] = None  # (6,)
    points_zo: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (N, 3), (N,)
    box_map: Optional[torch.Tensor] = None  # crop-space binary cube
    point_map: Optional[torch.Tensor] = None  # crop-space binary points


@dataclass
class SegVolState:
    volume: Any
    crop: torch.Tensor  # (1, 1, *crop_shape), cpu
    geo: Geometry
    zoom_out: torch.Tensor  # (1, 1, *window)
    zo_embedding: Optional[torch.Tensor] = None
    window_cache: FeatureCache = field(default_factory=FeatureCache)  # window key -> embedding

    @property
    def cache_bytes(self) -> int:
        return self.window_cache.nbytes


class SegVolAdapter(VolumeAdapter):
    """Options (``models.options.AdapterOptions``): ``zoom_in``, ``seed`` and ``feature_cache_bytes``: the
    window embeddings an image keeps in the feature cache (``models.feature_cache``: least recently used
    dropped first; ~6 MB a window at full size, so with the default 2 GiB the ~100 windows of a 512x512x200
    CT are each encoded once for all prompts whose windows coincide); tests inject ``config`` (SegVolConfig)
    and ``tokenizer_dir``."""

    max_prompts_per_call = 16

    # ---- lifecycle --------------------------------------------------------------------------
    def load(self, device: Any) -> None:
        AdapterOptions.from_mapping(self.options)  # a bad setting fails here
        self.cfg: SegVolConfig = self.options.get("config") or SegVolConfig()
        self.net = SegVolNet(self.cfg).eval()
        load_checkpoint(self.net, weight_file(self, "pytorch_model.bin"))
        self.to(device)
        from ..clip_tokenizer import get_clip_tokenizer

        self.tokenizer = get_clip_tokenizer(self.options.get("tokenizer_dir"))  # fails early if unavailable

    def to(self, device: Any) -> None:
        self.device = torch.device(device)
        self.net.to(self.device)
        self.text_cache = {}

    @property
    def window(self) -> tuple[int, int, int]:
        return tuple(self.cfg.img_size)  # type: ignore[return-value]

    # ---- image ------------------------------------------------------------------------------
    def prepare(self, volume, preset, ctx: RunContext) -> SegVolState:
        ctx.report(0.0, "SegVol: preprocessing")
        crop, geo = preprocess(volume.array, self.window)
        t = torch.from_numpy(crop)[None, None]
        zoom_out = F.interpolate(t, size=self.window, mode="nearest-exact")
        return SegVolState(volume, t, geo, zoom_out)

    @torch.no_grad()
    def encode(self, state: SegVolState, ctx: RunContext) -> SegVolState:
        ctx.report(0.1, "SegVol: encoding the zoom-out image")
        state.zo_embedding = self.net.encode_image(state.zoom_out.to(self.device))
        self.free_memory(state)
        return state

    def _window_embedding(self, state: SegVolState, window: torch.Tensor, key: Any) -> torch.Tensor:
        emb = state.window_cache.get(key)
        if emb is None:
            emb = self.net.encode_image(window.to(self.device))
            state.window_cache.put(key, emb)
        return emb

    def free_memory(self, encoded: Any) -> None:
        if isinstance(encoded, SegVolState):
            encoded.window_cache.clear()

    # ---- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        if text not in self.text_cache:
            enc = self.tokenizer([TEMPLATE.format(text)], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
            self.text_cache[text] = self.net.encode_text(enc["input_ids"].to(self.device),
                                                         enc["attention_mask"].to(self.device))
        return self.text_cache[text]

    @staticmethod
    def crop_box(state: SegVolState, box) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive crop-grid (z, y, x) index box around an axis-aligned LPS box given by two opposite corners.

        All 8 corners are mapped: on an oblique image the box spanned by two of them misses part of the region
        (the box of the liver on a CT turned 20 degrees about S and 10 about R held 41 % of the liver)."""
        (x0, y0, z0), (x1, y1, z1) = box
        corners = np.array([(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)], float)
        kji = state.volume.physical_to_index(corners)[:, ::-1]
        c = state.geo.canonical_to_crop(kji)
        last = np.array(state.geo.crop_shape) - 1
        lo = np.clip(np.floor(c.min(0) + 0.5), 0, last).astype(int)
        hi = np.clip(np.floor(c.max(0) + 0.5), 0, last).astype(int)
        return lo, hi

    def map_prompt(self, state: SegVolState, prompt: Prompt) -> PromptGrid:
        """Physical (LPS mm) box/points -> crop grid -> zoom-out grid, as upstream builds them."""
        g = PromptGrid()
        crop_shape, zo = state.geo.crop_shape, self.window
        scale = np.array(crop_shape, float) / np.array(zo, float)
        if prompt.box is not None:
            lo, hi = self.crop_box(state, prompt.box)
            cube = torch.zeros(crop_shape)
            cube[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
            g.box_zo = generate_box(F.interpolate(cube[None, None], size=zo, mode="nearest-exact")[0, 0])
            g.box_map = box_map(g.box_zo, zo, crop_shape)
        if prompt.points:
            kji = state.volume.physical_to_index(np.array(prompt.points))[:, ::-1]
            c = state.geo.canonical_to_crop(kji)
            o = np.clip(np.floor((np.floor(c + 0.5) + 0.5) / scale), 0, np.array(zo) - 1)
            pts, labels = torch.tensor(o, dtype=torch.float32), torch.tensor(prompt.point_labels, dtype=torch.float32)
            g.points_zo = (pts, labels)
            pmap = torch.zeros(zo, dtype=torch.int16)
            pos = pts[labels == 1].long()
            pmap[pos[:, 0], pos[:, 1], pos[:, 2]] = 1
            g.point_map = F.interpolate(pmap[None, None].float(), size=crop_shape, mode="nearest")[0, 0]
        return g

    # ---- zoom-out-zoom-in -------------------------------------------------------------------
    @torch.no_grad()
    def zoom_out_logits(self, state: SegVolState, text_emb, grid: PromptGrid) -> torch.Tensor:
        """Zoom-out logits on the window grid (1, 1, *window)."""
        boxes = None if grid.box_zo is None else grid.box_zo[None].to(self.device)
        points = None if grid.points_zo is None else tuple(t[None].to(self.device) for t in grid.points_zo)
        return self.net.decode(state.zo_embedding, text_emb, boxes, points)

    @torch.no_grad()
    def run(self, state: SegVolState, text_emb, grid: PromptGrid, ctx: RunContext, zoom_in: bool = True,
            generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """Upstream's zoom_in_zoom_out for one prompt; crop-space logits plus what was decided."""
        zo = self.zoom_out_logits(state, text_emb, grid).float().cpu()
        logits = F.interpolate(zo, size=state.geo.crop_shape, mode="nearest")[0, 0]
        out: dict[str, Any] = {"zoom_out_logits": zo[0, 0], "roi": None, "window_boxes": []}
        roi = roi_from_logits(logits, self.window) if zoom_in else None
        if roi is None:
            out["logits"] = logits
            return out
        out["roi"] = roi
        sl = tuple(slice(roi[d], roi[d + 3] + 1) for d in range(3))
        image = state.crop[(0, 0) + sl][None, None]
        preds = (torch.sigmoid(logits[sl]) > 0.5).float()[None, None]
        pad = sw_pad(image.shape[2:], self.window)
        preds = F.pad(preds, pad)
        prompt_map = grid.point_map if grid.point_map is not None else grid.box_map
        prompt_map = None if prompt_map is None else prompt_map[sl][None, None]
        # Number of windows, as MONAI/upstream compute it (needed for the one-window box rule).
        padded = [max(s, w) for s, w in zip(image.shape[2:], self.window)]
        n_win = len(dense_patch_slices(padded, self.window, _get_scan_interval(padded, self.window, 3, (OVERLAP,) * 3)))
        pad_before = [pad[2 * (2 - d)] for d in range(3)]
        gen = generator or torch.Generator().manual_seed(0)
        done = [0]

        def predictor(window: torch.Tensor, coords) -> torch.Tensor:
            ctx.check_cancel()
            wsl = tuple(coords[0][2:])
            key = self._window_key(roi, wsl, pad_before, image.shape[2:])
            emb = self._window_embedding(state, window, key)
            boxes = points = None
            # Upstream slices the UNPADDED prompt map with the padded window coordinates (only
            # matters where the ROI is smaller than the window); kept for equality with it.
            if grid.points_zo is not None:
                wmap = prompt_map[(0, 0) + wsl]
                p, labels = select_points(wmap, gen)
                points = (p[None].to(self.device), labels[None].to(self.device))
                boxes = generate_box(preds[(0, 0) + wsl])[None].to(self.device)
            elif grid.box_zo is not None:
                src = prompt_map if n_win == 1 else preds
                boxes = generate_box(src[(0, 0) + wsl])[None].to(self.device)
            out["window_boxes"].append(None if boxes is None else boxes[0].cpu().numpy())
            done[0] += 1
            ctx.report(min(done[0] / max(n_win, 1), 1.0))
            return self.net.decode(emb, text_emb, boxes, points).float().cpu()

        stitched = sliding_window_inference(
            image, self.window, 1, predictor, overlap=OVERLAP, mode="constant", padding_mode="constant", cval=0.0,
            with_coord=True,
        )
        logits[sl] = stitched[0, 0]
        out["logits"] = logits
        return out

    @staticmethod
    def _window_key(roi, wsl, pad_before, roi_shape) -> tuple:
        """Window content = crop[start:stop] clipped to the ROI, zeros elsewhere: key by both."""
        key = []
        for d in range(3):
            a = roi[d] + wsl[d].start - pad_before[d]
            b = roi[d] + wsl[d].stop - pad_before[d]
            key.append((a, b, max(a, roi[d]), min(b, roi[d] + roi_shape[d])))
        return tuple(key)

    def decode(self, encoded: SegVolState, prompts: Sequence[Prompt], ctx: RunContext) -> list[Decoded]:
        results = []
        opts = AdapterOptions.from_mapping(self.options)
        encoded.window_cache.budget = cache_budget(opts.feature_cache_bytes, self.device)
        seed = ctx.seed if ctx.seed is not None else int(opts.seed)
        for p in prompts:
            ctx.check_cancel()
            text_emb = self.text_embedding(p.text) if p.text else None
            grid = self.map_prompt(encoded, p)
            r = self.run(encoded, text_emb, grid, ctx, zoom_in=bool(opts.zoom_in),
                         generator=torch.Generator().manual_seed(seed))
            prob = encoded.geo.to_canonical(torch.sigmoid(r["logits"]).numpy())
            extra = {"roi": None if r["roi"] is None else list(r["roi"]), "windows": len(r["window_boxes"]),
                     "cached_windows": len(encoded.window_cache)}
            results.append(Decoded(prob, None, extra))
        return results
