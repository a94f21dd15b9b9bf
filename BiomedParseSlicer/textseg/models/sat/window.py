"""SAT's sliding-window inference (zhaoziheng/SAT ``data/inference_dataset.py`` ``split_3d`` and
``_pad_if_necessary``; ``evaluate/inference_engine.py`` ``compute_gaussian`` and ``inference``).

Patches of 288x288x96 at a stride of half the patch (144/144/48); along each axis
``max(ceil(n / stride) - 1, 1)`` patches, the last one moved flush to the end (or to 0 when the
volume is smaller than a patch, then zero-padded at the far end). Each patch is encoded ONCE and
decoded for every query (chunks of at most 256, upstream ``max_queries``); per-pixel sigmoid
probabilities x a Gaussian importance map (sigma = patch/8, peak scaled to 10, float16, zeros
replaced by the smallest non-zero value) are accumulated and divided by the accumulated weights.
Upstream keeps one weight volume per query; they are all the same, so one is kept here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch

PATCH = (288, 288, 96)
MAX_QUERIES = 256


def split_3d(shape: Sequence[int], patch: Sequence[int] = PATCH) -> list[tuple[int, int, int, int, int, int]]:
    """Upstream ``split_3d`` patch boxes ``(h_s, h_e, w_s, w_e, d_s, d_e)`` for a (h, w, d) volume,
    in upstream's order (h outermost, d innermost)."""

    def starts(n: int, p: int) -> list[tuple[int, int]]:
        step = p // 2
        out = []
        for i in range(max(math.ceil(n / step) - 1, 1)):
            s, e = i * step, i * step + p
            if e > n:
                s, e = max(n - p, 0), n
            out.append((s, e))
        return out

    return [(a, b, c, d, e, f) for a, b in starts(shape[0], patch[0]) for c, d in starts(shape[1], patch[1])
            for e, f in starts(shape[2], patch[2])]


def compute_gaussian(tile_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10,
                     dtype=np.float16) -> np.ndarray:
    """Upstream ``compute_gaussian`` (nnU-Net's importance map), same numbers and dtype.

    Upstream filters a 3D delta with ``scipy.ndimage.gaussian_filter`` (three 1D passes over the whole tile,
    about 2 s at 288x288x96). Filtering a delta axis by axis only ever multiplies the one non-zero value by a
    kernel tap and adds zeros, so the result is the outer product of the three 1D kernels, multiplied in
    the order of the passes: bit-equal (Testing/models/test_sat_pipeline.py), 7x faster."""
    from scipy.ndimage import gaussian_filter1d

    kernels = []
    for n in tile_size:  # each 1D kernel exactly as gaussian_filter's pass computes it (truncate 4, constant 0)
        delta = np.zeros(int(n))
        delta[int(n) // 2] = 1
        kernels.append(gaussian_filter1d(delta, n * sigma_scale, 0, mode="constant", cval=0))
    k0, k1, k2 = kernels
    g = k2[None, None, :] * (k1[None, :, None] * k0[:, None, None])
    g = (g / np.max(g) * value_scaling_factor).astype(dtype)
    g[g == 0] = np.min(g[g != 0])
    return g


@functools.lru_cache(maxsize=4)
def gaussian_weights(patch: tuple[int, int, int]) -> torch.Tensor:
    """``compute_gaussian(patch)`` as float32, computed once per patch size (callers must not modify it)."""
    return torch.from_numpy(compute_gaussian(patch).astype(np.float32))


def pad_patch(patch: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad a (..., h, w, d) patch at the far end to ``size`` (upstream ``_pad_if_necessary``)."""
    pad: list[int] = []
    for n, t in zip(reversed(patch.shape[-3:]), reversed(list(size))):
        pad += [0, max(t - n, 0)]
    return torch.nn.functional.pad(patch, pad) if any(pad) else patch


def sliding_window(
    image: np.ndarray,
    queries: torch.Tensor,
    encode: Callable[[torch.Tensor], Any],
    decode: Callable[[Any, torch.Tensor], torch.Tensor],
    patch: Sequence[int] = PATCH,
    device: Any = "cpu",
    batch_size: int = 1,
    max_queries: int = MAX_QUERIES,
    dtype: torch.dtype = torch.float32,
    progress: Optional[Callable[[float], None]] = None,
    check_cancel: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Probabilities ``(N, h, w, d)`` float32 (cpu) of N queries on a preprocessed (h, w, d) image.

    ``encode(patches (B, 3, *patch))`` returns image features, ``decode(features, queries (n, C))``
    returns logits ``(B, n, *patch)`` (SATNetwork.encode / decode)."""
    img = torch.as_tensor(np.ascontiguousarray(image))
    h, w, d = img.shape
    n = int(queries.shape[0])
    gauss = gaussian_weights(tuple(int(p) for p in patch))
    boxes = split_3d((h, w, d), patch)
    prediction = torch.zeros((n, h, w, d), dtype=torch.float32)
    accumulation = torch.zeros((h, w, d), dtype=torch.float32)
    chunks = [queries[i : i + max_queries].to(device) for i in range(0, n, max_queries)]
    for first in range(0, len(boxes), max(1, batch_size)):
        if check_cancel is not None:
            check_cancel()
        batch = boxes[first : first + max(1, batch_size)]
        patches = torch.stack([pad_patch(img[a:b, c:e, f:g], patch) for a, b, c, e, f, g in batch])
        patches = patches[:, None].repeat(1, 3, 1, 1, 1).to(device=device, dtype=dtype)
        with torch.no_grad():
            features = encode(patches)
            del patches
            probs = [torch.sigmoid(decode(features, q).float()) for q in chunks]
            probs = (probs[0] if len(probs) == 1 else torch.cat(probs, dim=1)).cpu()
            del features
        for k, (a, b, c, e, f, g) in enumerate(batch):
            wgt = gauss[: b - a, : e - c, : g - f]
            prediction[:, a:b, c:e, f:g] += probs[k, :, : b - a, : e - c, : g - f] * wgt
            accumulation[a:b, c:e, f:g] += wgt
        if progress is not None:
            progress(min(first + len(batch), len(boxes)) / len(boxes))
    return prediction.div_(accumulation)
