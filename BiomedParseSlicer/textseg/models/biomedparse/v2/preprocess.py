"""BiomedParse v2 input/output geometry (upstream ``utils.py`` and ``forward_eval``, v2 @ f571d5c).

* ``upstream_axis``: upstream picks the slicing axis from the array shape only (``get_axis``); we slice
  along the canonical k axis (closest-LPS, from the image geometry) and keep this for ``compat_upstream``.
* ``square_pad_resize``: zero-pad the two in-plane axes to a square (smaller half first), bicubic
  (align_corners False) to 512, ``.int()``. Torch's bicubic kernel for uint8 input saturates and rounds,
  its float kernel overshoots and ``.int()`` truncates: the two differ in 15-23 % of the pixels. Upstream
  feeds the challenge's uint8 volumes, so the uint8 path is what the released model saw and is our default;
  ``resize_path="float"`` is the path upstream takes on float arrays.
* ``pack_neighbours``: channels [current, previous, next]; slice 0's previous is slice 1 and the last
  slice's next is slice D-2 (reflection); one slice is repeated three times.
* ``upsample_logits`` (bicubic, antialias) and ``restore_grid`` (nearest back to the padded square, crop).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 512
PIXEL_MEAN = (123.675 + 116.280 + 103.530) / 3  # gray_scale=True: mean of the RGB statistics = 114.495
PIXEL_STD = (58.395 + 57.120 + 57.375) / 3  # 57.63
PadWidth = list[list[int]]


def upstream_axis(shape: Sequence[int]) -> int:
    """Upstream ``get_axis``: axis 0 if the other two are within 50 % of each other, else the shortest."""
    s = shape
    if 2 * abs(s[1] - s[2]) / (s[1] + s[2]) < 0.5:
        return 0
    return int(np.argmin(s))


def padding(h: int, w: int) -> tuple[PadWidth, int]:
    """Upstream ``get_padding`` for slices of h x w: pad widths ([[0,0],[a,b],[c,d]]) and the square size."""
    d = abs(h - w)
    first, second = d // 2, d - d // 2
    pad = [[0, 0], [0, 0], [first, second]] if h > w else [[0, 0], [first, second], [0, 0]]
    return pad, max(h, w)


def square_pad_resize(vol: np.ndarray, size: int = SIZE, resize_path: str = "uint8") -> tuple[Tensor, PadWidth, int]:
    """(D, H, W) 0..255 slices -> (D, size, size) int32, pad widths, padded size."""
    if resize_path not in ("uint8", "float"):
        raise ValueError("resize_path must be 'uint8' or 'float'")
    pad, padded = padding(*vol.shape[1:])
    dtype = np.uint8 if resize_path == "uint8" else np.float32
    vol = np.pad(np.asarray(vol).astype(dtype, copy=False), pad, mode="constant", constant_values=0)
    out = F.interpolate(torch.from_numpy(vol).unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False)
    return out.squeeze(0).int(), pad, padded


def neighbours(k: int, d: int) -> tuple[int, int, int]:
    """(current, previous, next) of slice k of d: reflection at the ends, one slice repeated."""
    if d == 1:
        return k, k, k
    return k, (k - 1 if k > 0 else 1), (k + 1 if k < d - 1 else d - 2)


def pack_neighbours(vol: Tensor, index: Sequence[int]) -> Tensor:
    """(D, H, W) -> (len(index), 3, H, W): [current, previous, next] with upstream's edge rule."""
    return torch.stack([torch.stack([vol[j] for j in neighbours(k, vol.shape[0])]) for k in index])


def normalise(x: Tensor, mean: float = PIXEL_MEAN, std: float = PIXEL_STD) -> Tensor:
    return (x.float() - mean) / std


def upsample_logits(logits: Tensor, size: int = SIZE) -> Tensor:
    """(N, C, h, w) -> (N, C, size, size), bicubic antialias (upstream inference.py)."""
    return F.interpolate(logits, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def restore_grid(vol: Tensor, pad: PadWidth, padded: int) -> Tensor:
    """(D, size, size) labels -> (D, H, W): nearest to the padded square, padding removed (process_output)."""
    if vol.shape[-1] != padded or vol.shape[-2] != padded:
        vol = F.interpolate(vol.unsqueeze(0).float(), size=(padded, padded), mode="nearest").squeeze(0).int()
    (_, _), (a, b), (c, d) = pad
    return vol[:, a:vol.shape[1] - b, c:vol.shape[2] - d]
