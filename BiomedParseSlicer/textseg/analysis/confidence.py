"""The model's own answer, kept: uint8 probability maps, re-thresholding without re-running, confidence.

The rules below are the engine's; they are stated once, here (docs/confidence.md explains them).

Quantization (the rule ``textseg.remote.wire.quantize`` already uses on the wire, plus NaN -> 0)
    ``q = floor(min(max(float32(p) * 255, 0), 255) + 0.5)`` in float32 arithmetic: round half up, values
    below 0 give 0, above 1 give 255, NaN gives 0. Back: ``float32(q) / 255``. For p in [0, 1] the round
    trip is off by at most 1/510 (plus float32 rounding, < 1e-7).
Threshold (the engine's rule: ``Predictor._finish``, ``DeferredMap.mask``)
    ``mask = p >= t`` for t > 0, ``p > 0`` for t = 0. Thresholds are numbers in [0, 1].
Re-threshold
    ``rethreshold(q, t)`` is exactly the threshold rule applied to the dequantized map, ``rule(q / 255, t)``
    (computed once for the 256 values; as q / 255 grows with q, it is ``q >= c(t)``, one integer comparison
    per voxel). It decides every voxel as the float rule on the model's own map does unless the voxel's
    probability p lies within 1/510 of t: the quantized value is within 1/510 of p, so it falls on the same
    side of t. At t = 0.5 (the catalog's default) it never differs: 255 t = 127.5 is a rounding edge.
Band ("near the threshold")
    A voxel is near the threshold when ``|q / 255 - t| <= band``, edges included, evaluated in quantization
    steps as ``|q - 255 t| <= 255 band + 1e-6`` (the 1e-6 step makes decimal edges exact: t = 0.5,
    band = 0.1 is q in 102..153, 0.4 and 0.6 included). Default band 0.1: 25.5 quantization steps
    (far above quantization noise), and the mask voxels in the band are those a threshold move of at most
    0.1 (the range a review slider explores, 0.4..0.6 around the default) would remove.
Fingerprint of a mask (to refuse overwriting a hand edit)
    ``sha256`` of ``numpy.packbits(mask.ravel() != 0)`` (C order of the (k, j, i) array on the input grid,
    numpy's big-endian bit order) and the voxel count: 64 hex digits + an integer, kept in segment tags.

Segment tags (``textseg.`` + key; values are strings, numbers as JSON, like every provenance tag):
    ``textseg.threshold``            (existing, provenance) threshold of the segment's current mask
    ``textseg.existence``            (existing, provenance) the model's existence score, 0..1, or null
    ``textseg.original_threshold``   threshold of the model's run (the original mask's)
    ``textseg.mask_sha256``          fingerprint of the mask the engine last wrote (run or re-threshold)
    ``textseg.mask_voxels``          its voxel count
    ``textseg.confidence.mean``      mean probability inside the mask, 0..1 (6 decimals), null if empty
    ``textseg.confidence.near_threshold``  fraction of the mask's voxels in the band, 0..1, null if empty
    ``textseg.confidence.band``      the band's half-width used

What is kept, and its memory (``ModelAnswer``): per AI segment of the current run, and only when asked,
the uint8 map (1 byte per voxel: 50 MiB for 512x512x200, a quarter of the float32 map), the run's
threshold and existence score (and whether the existence test dropped the mask), the original mask's
fingerprint, and the original mask as the voxels where it differs from ``rethreshold(map, threshold)``
(none for a plain threshold at t = 0.5; a few in the 1/510 band otherwise; a recognition or
existence-dropped mask may differ more, then the mask is kept bit-packed, 1/8 byte per voxel, whichever is
smaller). ``pack``/``unpack`` turn it into plain arrays (npz without pickle) and back.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError
from ..formats.segments import TAG_PREFIX

DEFAULT_BAND = 0.1
MAX_QUANTIZATION_ERROR = 1.0 / 510.0
BAND_EDGE_TOLERANCE = 1e-6  # in quantization steps: decimal edges (0.4 = 102/255) count as on the edge
_LEVELS = np.arange(256, dtype=np.uint8)

TAGS: dict[str, str] = {
    "threshold": "threshold of the segment's current mask (provenance; updated by a re-threshold)",
    "existence": "the model's existence score 0..1, or null when the model has none (provenance)",
    "original_threshold": "threshold of the model's run, which made the original mask",
    "mask_sha256": "sha256 of numpy.packbits(mask.ravel() != 0) of the mask the engine last wrote",
    "mask_voxels": "voxel count of that mask",
    "confidence.mean": "mean probability inside the mask, 0..1; null for an empty mask",
    "confidence.near_threshold": "fraction of the mask's voxels with |p - threshold| <= band; null if empty",
    "confidence.band": "half-width of the band around the threshold",
}

# Statistics columns (name -> (unit, definition)), in the style of textseg.analysis.segment_stats.COLUMNS.
COLUMNS: dict[str, tuple[str, str]] = {
    "existence": ("", "The model's existence score for the target (0..1); empty when the model has none."),
    "threshold": ("", "Probability threshold of the segment's current mask."),
    "confidence_mean": ("", "Mean model probability inside the segment (uint8 map, q/255)."),
    "confidence_near_threshold": ("", "Fraction of the segment's voxels whose probability is within the band "
                                      "around the threshold (|q/255 - threshold| <= band)."),
    "confidence_band": ("", "Half-width of that band."),
}


# ---- the rules -----------------------------------------------------------------------------------
def check_threshold(threshold: Any) -> float:
    """The threshold as a float in [0, 1], or UsageError saying so."""
    try:
        t = float(threshold)
    except OverflowError:  # an integer too large for a float (JSON allows any): far outside 0..1
        t = math.inf
    except (TypeError, ValueError):
        raise UsageError(f"Threshold '{str(threshold)[:40]}' is not a number; give a probability between 0 and "
                         "1.") from None
    if not (0.0 <= t <= 1.0):
        raise UsageError(f"Threshold {_short(threshold)} is outside 0..1; give a probability between 0 and 1.")
    return t


def threshold_mask(probability: np.ndarray, threshold: float) -> np.ndarray:
    """The engine's threshold rule on a float map: ``p >= t`` (``p > 0`` for t <= 0), as bool."""
    thr = float(threshold)
    p = np.asarray(probability)
    return p >= thr if thr > 0 else p > 0


def to_uint8(probability: np.ndarray) -> np.ndarray:
    """A probability map (any real dtype, 0..1) as uint8 0..255, by the quantization rule above."""
    tmp = np.multiply(probability, np.float32(255.0), dtype=np.float32)  # in place from here: no temporaries
    np.fmax(tmp, np.float32(0.0), out=tmp)  # fmax/fmin, unlike clip, turn NaN into the bound: NaN -> 0
    np.fmin(tmp, np.float32(255.0), out=tmp)
    tmp += np.float32(0.5)
    return tmp.astype(np.uint8)


def to_float(prob_u8: np.ndarray) -> np.ndarray:
    """A uint8 map back as float32 probabilities ``q / 255``."""
    return _checked_u8(prob_u8).astype(np.float32) / np.float32(255.0)


def threshold_level(threshold: float) -> int:
    """c(t): the smallest uint8 value whose probability passes the engine's rule at ``threshold`` (256: none)."""
    passes = threshold_mask(to_float(_LEVELS), check_threshold(threshold))
    return int(np.argmax(passes)) if passes.any() else 256  # monotone in q, so "q >= c" is the whole rule


def rethreshold(prob_u8: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
    """The mask at ``threshold`` from a kept uint8 map: ``rule(q / 255, threshold)`` exactly, as bool."""
    q = _checked_u8(prob_u8)
    c = threshold_level(threshold)
    if c > 255:
        if out is None:
            return np.zeros(q.shape, bool)
        out[...] = False
        return out
    return np.greater_equal(q, np.uint8(c), out=out)


def band_levels(threshold: float, band: float = DEFAULT_BAND) -> tuple[int, int]:
    """Inclusive uint8 range (lo, hi) of the voxels near ``threshold``: ``|q - 255 t| <= 255 band`` (+1e-6
    step for decimal edges); (1, 0) when no value qualifies."""
    t, b = check_threshold(threshold), check_band(band)
    inside = np.flatnonzero(np.abs(np.arange(256) - 255.0 * t) <= 255.0 * b + BAND_EDGE_TOLERANCE)
    return (int(inside[0]), int(inside[-1])) if inside.size else (1, 0)


def uncertain_mask(prob_u8: np.ndarray, threshold: float, band: float = DEFAULT_BAND) -> np.ndarray:
    """Voxels whose probability is near ``threshold`` (in the band), inside or outside the mask: bool."""
    q = _checked_u8(prob_u8)
    lo, hi = band_levels(threshold, band)
    if lo > hi:
        return np.zeros(q.shape, bool)
    # (q - lo) as uint8 wraps below lo: one subtraction and one comparison for lo <= q <= hi
    return np.less_equal(q - np.uint8(lo), np.uint8(hi - lo))


# ---- confidence --------------------------------------------------------------------------------------
def confidence(prob_u8: np.ndarray, mask: np.ndarray, threshold: float, existence: float | None = None,
               band: float = DEFAULT_BAND) -> dict[str, Any]:
    """How sure the model was about one segment (its current ``mask``, edited or not).

    Returns {"existence", "threshold", "band", "voxel_count", "mean", "near_threshold",
    "near_threshold_voxels"}: ``mean`` is the mean of q/255 inside the mask, ``near_threshold`` the fraction
    of the mask's voxels in the band (both None for an empty mask); exact (integer histogram)."""
    q = _checked_u8(prob_u8)
    m = np.asarray(mask)
    if m.shape != q.shape:
        raise UsageError(f"The mask has shape {m.shape} but the probability map {q.shape}; both must be on the "
                         "same grid (the image the segment was made on).")
    t = check_threshold(threshold)
    hist = np.bincount(q[m.astype(bool, copy=False)], minlength=256)
    n = int(hist.sum())
    lo, hi = band_levels(t, band)
    near = int(hist[lo : hi + 1].sum()) if lo <= hi else 0
    total = int(np.dot(hist, np.arange(256, dtype=np.int64)))
    return {
        "existence": None if existence is None else float(existence),
        "threshold": t,
        "band": float(band),
        "voxel_count": n,
        "mean": total / (255 * n) if n else None,
        "near_threshold": near / n if n else None,
        "near_threshold_voxels": near,
    }


def confidence_tags(conf: Mapping[str, Any]) -> dict[str, str]:
    """``textseg.*`` segment tags (strings) for a ``confidence`` dict."""

    def num(v: Any) -> str:
        return json.dumps(None if v is None else round(float(v), 6))

    tags = {
        "threshold": json.dumps(conf["threshold"]),
        "confidence.mean": num(conf["mean"]),
        "confidence.near_threshold": num(conf["near_threshold"]),
        "confidence.band": json.dumps(conf["band"]),
    }
    if "existence" in conf:
        e = conf["existence"]
        tags["existence"] = json.dumps(None if e is None else round(float(e), 4))  # as the provenance rounds it
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def confidence_row(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The statistics columns (``COLUMNS``) of a ``confidence`` dict."""
    return {"existence": conf.get("existence"), "threshold": conf["threshold"], "confidence_mean": conf["mean"],
            "confidence_near_threshold": conf["near_threshold"], "confidence_band": conf["band"]}


# ---- hand edits ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskFingerprint:
    """What identifies a mask without keeping it: sha256 of its packed bits and its voxel count."""

    sha256: str
    voxels: int

    @classmethod
    def of(cls, mask: np.ndarray) -> MaskFingerprint:
        bits = np.asarray(mask).ravel() != 0
        return cls(hashlib.sha256(np.packbits(bits).tobytes()).hexdigest(), int(np.count_nonzero(bits)))

    def tags(self) -> dict[str, str]:
        return {TAG_PREFIX + "mask_sha256": self.sha256, TAG_PREFIX + "mask_voxels": str(self.voxels)}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> MaskFingerprint | None:
        """From a segment's tags; None when it has none (a segment from before fingerprints, or not an AI one)."""
        sha, voxels = tags.get(TAG_PREFIX + "mask_sha256"), tags.get(TAG_PREFIX + "mask_voxels")
        if not sha or voxels is None:
            return None
        try:
            return cls(str(sha), int(voxels))
        except ValueError:
            return None


def edited_since(fingerprint: MaskFingerprint, current_mask: np.ndarray) -> bool:
    """Whether ``current_mask`` differs from the mask ``fingerprint`` was taken of (a hand edit)."""
    current = np.asarray(current_mask)
    if int(np.count_nonzero(current)) != fingerprint.voxels:  # cheap first: most edits change the count
        return True
    return MaskFingerprint.of(current).sha256 != fingerprint.sha256


# ---- what is kept ------------------------------------------------------------------------------------------
@dataclass
class ModelAnswer:
    """The model's answer for one segment, kept for re-thresholding and review (see the module docstring).

    ``exceptions`` (flat int64 indices, C order) are where the original mask differs from
    ``rethreshold(probability, threshold)``; when that list would be larger than the bit-packed mask,
    ``original_packed`` holds the whole original mask instead."""

    probability: np.ndarray  # uint8 (k, j, i) on the input grid
    threshold: float  # the run's threshold
    existence: float | None
    fingerprint: MaskFingerprint  # of the original mask
    dropped: bool = False  # the existence test said absent and the engine dropped the mask (no keep_absent)
    exceptions: np.ndarray | None = None
    original_packed: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, probability: np.ndarray, mask: np.ndarray, threshold: float,
                    existence: float | None = None, dropped: bool = False) -> ModelAnswer:
        """From the model's map (probabilities 0..1 of any real dtype: a 0/1 uint8 array, as a remote result
        without probabilities carries, means 0 and 1) and the mask the engine made from it."""
        return cls.from_uint8(to_uint8(probability), mask, threshold, existence, dropped)

    @classmethod
    def from_uint8(cls, prob_u8: np.ndarray, mask: np.ndarray, threshold: float,
                   existence: float | None = None, dropped: bool = False) -> ModelAnswer:
        """From a map already quantized (``to_uint8``, a kept file) and the mask the engine made from it."""
        q = _checked_u8(prob_u8)
        m = np.asarray(mask) != 0
        if m.shape != q.shape:
            raise UsageError(f"The mask has shape {m.shape} but the probability map {q.shape}; both must be on the "
                             "same grid.")
        t = check_threshold(threshold)
        differs = np.flatnonzero(rethreshold(q, t) != m)
        answer = cls(q, t, None if existence is None else float(existence), MaskFingerprint.of(m), bool(dropped))
        if differs.size * differs.itemsize <= math.ceil(m.size / 8):
            answer.exceptions = differs
        else:
            answer.original_packed = np.packbits(m.ravel())
        return answer

    @classmethod
    def from_result(cls, result: Any) -> ModelAnswer:
        """From a ``textseg.predictor.PromptResult`` (reads its probability map, computing it if deferred)."""
        dropped = not result.present and not result.mask.any()
        return cls.from_arrays(result.probability, result.mask, result.provenance["threshold"], result.existence,
                               dropped)

    def pack(self) -> dict[str, np.ndarray]:
        """Plain arrays (``numpy.savez`` without pickle, the wire's npz, an HDF5 group): see ``unpack``."""
        out = {"probability": self.probability, "threshold": np.float64(self.threshold),
               "existence": np.float64(np.nan if self.existence is None else self.existence),
               "mask_sha256": np.array(self.fingerprint.sha256), "mask_voxels": np.int64(self.fingerprint.voxels),
               "dropped": np.bool_(self.dropped)}
        if self.exceptions is not None:
            out["exceptions"] = self.exceptions
        if self.original_packed is not None:
            out["original_packed"] = self.original_packed
        return {k: np.asarray(v) for k, v in out.items()}

    @classmethod
    def unpack(cls, arrays: Mapping[str, np.ndarray]) -> ModelAnswer:
        """The inverse of ``pack``; UsageError when the arrays are not a kept answer."""
        try:
            q = _checked_u8(arrays["probability"])
            existence = float(arrays["existence"])
            answer = cls(q, check_threshold(float(arrays["threshold"])), None if math.isnan(existence) else existence,
                         MaskFingerprint(str(arrays["mask_sha256"]), int(arrays["mask_voxels"])),
                         bool(arrays["dropped"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"Not a kept model answer ({exc}); it was not written by textseg.") from None
        if "original_packed" in arrays:
            answer.original_packed = np.asarray(arrays["original_packed"], np.uint8)
        else:
            answer.exceptions = np.asarray(arrays.get("exceptions", np.zeros(0, np.int64)), np.int64)
            if answer.exceptions.size and not (0 <= answer.exceptions.min() and answer.exceptions.max() < q.size):
                raise UsageError("Not a kept model answer (exception indices outside the map).")
        return answer

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.probability.shape)

    @property
    def nbytes(self) -> int:
        """Memory held: the uint8 map plus the original mask's exceptions or packed bits."""
        held = self.exceptions if self.exceptions is not None else self.original_packed
        return int(self.probability.nbytes + (0 if held is None else held.nbytes))

    def original_mask(self) -> np.ndarray:
        """The mask the engine made in the run, exactly (bool)."""
        if self.original_packed is not None:
            n = int(np.prod(self.shape))
            return np.unpackbits(self.original_packed, count=n).reshape(self.shape).astype(bool)
        m = rethreshold(self.probability, self.threshold)
        if self.exceptions is not None and self.exceptions.size:
            flat = m.reshape(-1)
            flat[self.exceptions] = ~flat[self.exceptions]
        return m

    def mask_at(self, threshold: float, keep_absent: bool = False) -> np.ndarray:
        """The mask at ``threshold`` (the run's threshold gives ``original_mask()``); empty, as the engine makes
        it, for a target its existence test dropped, unless ``keep_absent``."""
        t = check_threshold(threshold)
        if self.dropped and not keep_absent:
            return np.zeros(self.shape, bool)
        return self.original_mask() if t == self.threshold and not self.dropped else rethreshold(self.probability, t)

    def confidence(self, mask: np.ndarray | None = None, threshold: float | None = None,
                   band: float = DEFAULT_BAND) -> dict[str, Any]:
        """``confidence`` of ``mask`` (default: the original mask) at ``threshold`` (default: the run's)."""
        m = self.original_mask() if mask is None else mask
        return confidence(self.probability, m, self.threshold if threshold is None else threshold,
                          self.existence, band)

    def tags(self, band: float = DEFAULT_BAND) -> dict[str, str]:
        """The tags of the original segment: threshold, existence, fingerprint, confidence."""
        tags = confidence_tags(self.confidence(band=band))
        tags.update(self.fingerprint.tags())
        tags[TAG_PREFIX + "original_threshold"] = json.dumps(self.threshold)
        return tags


# ---- helpers -----------------------------------------------------------------------------------------------
def _checked_u8(prob_u8: np.ndarray) -> np.ndarray:
    q = np.asarray(prob_u8)
    if q.dtype != np.uint8:
        raise UsageError(f"A kept probability map is uint8 (0..255 = 0..1), not {q.dtype}; convert it with "
                         "textseg.analysis.confidence.to_uint8.")
    return q


def check_band(band: Any) -> float:
    """The band's half-width as a float in [0, 1], or UsageError saying so."""
    try:
        b = float(band)
    except OverflowError:
        b = math.inf
    except (TypeError, ValueError):
        raise UsageError(f"Band '{str(band)[:40]}' is not a number; give a half-width between 0 and 1.") from None
    if not (0.0 <= b <= 1.0):
        raise UsageError(f"Band {_short(band)} is outside 0..1; give a half-width between 0 and 1 (default 0.1).")
    return b


def _short(value: Any) -> str:
    """A number as a message shows it: a 400-digit integer someone sent is not repeated in full."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
