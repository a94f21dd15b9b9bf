"""BiomedParse v1 slice preprocessing and its inverse (numpy + scikit-image; torch-free).

Upstream ``inference_utils/processing_utils.py`` (``process_intensity_image`` / ``read_rgb``):
window to 0..255 as float (``textseg.presets.window_to_255``), pad to square with
``(long - short) // 2`` zeros on *both* sides, ``skimage.transform.resize`` to 1024x1024 (order 3,
``mode='constant'``, ``preserve_range``, ``anti_aliasing``), cast to uint8, stack to 3 channels.
RGB images: same padding, per-channel resize.

The odd-difference quirk: when long - short is odd the padded image is one pixel short of square
(e.g. 512x509 gets one column each side: 512x511), and the resize to 1024x1024 stretches that axis by
1/511. ``Padding`` records the padded shape, so the inverse (bilinear resize of the 1024 grid back
to the padded shape, then crop) is exact for that quirk too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ....presets import Preset, window_to_255


@dataclass(frozen=True)
class Padding:
    shape: tuple[int, int]  # original (H, W)
    padded: tuple[int, int]  # (H, W) after padding, before the resize
    offset: tuple[int, int]  # rows, columns added before the image

    def crop(self, arr: np.ndarray) -> np.ndarray:
        r, c = self.offset
        return arr[..., r : r + self.shape[0], c : c + self.shape[1]]


def pad_square(img: np.ndarray) -> tuple[np.ndarray, Padding]:
    h, w = img.shape[:2]
    r = c = 0
    if h > w:
        c = (h - w) // 2
    elif w > h:
        r = (w - h) // 2
    width = ((r, r), (c, c)) + ((0, 0),) * (img.ndim - 2)
    out = np.pad(img, width, "constant", constant_values=0) if (r or c) else img
    return out, Padding((h, w), tuple(out.shape[:2]), (r, c))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (size, size), order=3, mode="constant", preserve_range=True, anti_aliasing=True)


def preprocess_slice(slice_2d: np.ndarray, preset: Preset, size: int = 1024) -> tuple[np.ndarray, Padding]:
    """One canonical slice (H, W) or RGB (H, W, 3|4) -> (size, size, 3) uint8 model input + padding."""
    arr = np.asarray(slice_2d)
    if arr.ndim == 3:
        rgb = arr[..., :3]
        padded, pad = pad_square(rgb)
        out = np.zeros((size, size, 3), np.uint8)
        for ch in range(3):
            out[..., ch] = _resize(padded[..., ch], size)
        return out, pad
    padded, pad = pad_square(window_to_255(arr, preset))
    gray = _resize(padded, size).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2), pad
