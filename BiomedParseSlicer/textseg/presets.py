"""Modality presets: which modality (and CT body site) an image is, and how intensities are mapped.

Modalities are BiomedParse's nine plus PET. CT sites carry HU windows with the exact numbers
upstream models use (BiomedParse ``inference_utils/processing_utils.py`` CT_WINDOWS); MRI/PET and
the photographic modalities use upstream's per-slice 0.5/99.5 percentile window over positive
pixels. Each model adapter declares the modalities and sites it accepts (ModelSpec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import UsageError

MODALITIES: tuple[str, ...] = (
    "CT",
    "MRI",
    "X-Ray",
    "Pathology",
    "Ultrasound",
    "Fundus",
    "Endoscopy",
    "Dermoscopy",
    "OCT",
    "PET",
)

_ALIASES = {
    "MR": "MRI",
    "XRAY": "X-Ray",
    "X-RAY": "X-Ray",
    "CR": "X-Ray",
    "DX": "X-Ray",
    "US": "Ultrasound",
    "PT": "PET",
    "SM": "Pathology",
    "HISTOLOGY": "Pathology",
    "ES": "Endoscopy",
    "XC": "Dermoscopy",
    "OP": "Fundus",
}

# HU windows (lower, upper). The first six are BiomedParse v1's CT_WINDOWS verbatim
# (microsoft/BiomedParse inference_utils/processing_utils.py); the models were trained with them.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-150.0, 250.0),
    "lung": (-1000.0, 1000.0),
    "pelvis": (-55.0, 200.0),
    "liver": (-25.0, 230.0),
    "colon": (-68.0, 187.0),
    "pancreas": (-100.0, 200.0),
    # Standard radiology window/level values (no upstream model uses these sites; W/L given):
    "brain": (0.0, 80.0),  # W80 L40
    "bone": (-500.0, 1300.0),  # W1800 L400
    "soft tissue": (-150.0, 250.0),  # W400 L50
    "mediastinum": (-125.0, 225.0),  # W350 L50
}
CT_WINDOW_SOURCES: dict[str, str] = {
    **{k: "BiomedParse v1 CT_WINDOWS" for k in ("abdomen", "lung", "pelvis", "liver", "colon", "pancreas")},
    **{k: "standard radiology window/level" for k in ("brain", "bone", "soft tissue", "mediastinum")},
}
# DICOM BodyPartExamined -> CT site
_BODY_PARTS = {
    "ABDOMEN": "abdomen", "CHEST": "lung", "THORAX": "lung", "LUNG": "lung", "PELVIS": "pelvis",
    "LIVER": "liver", "COLON": "colon", "PANCREAS": "pancreas", "HEAD": "brain", "BRAIN": "brain",
    "SKULL": "brain", "ABDOMENPELVIS": "abdomen", "CHESTABDOMEN": "abdomen",
}
_PHOTO = ("Pathology", "Fundus", "Endoscopy", "Dermoscopy")


@dataclass(frozen=True)
class Preset:
    modality: str
    site: Optional[str] = None
    window: Optional[tuple[float, float]] = None  # fixed intensity window (CT)
    percentiles: tuple[float, float] = (0.5, 99.5)  # used when window is None

    @property
    def key(self) -> str:
        return f"{self.modality}:{self.site}" if self.site else self.modality


def normalize_modality(modality: str) -> str:
    m = str(modality).strip()
    for canonical in MODALITIES:
        if m.lower() == canonical.lower():
            return canonical
    alias = _ALIASES.get(m.upper().replace(" ", ""))
    if alias:
        return alias
    raise UsageError(f"Unknown modality '{modality}'. Choose one of: {', '.join(MODALITIES)}.")


def get_preset(modality: str, site: Optional[str] = None) -> Preset:
    mod = normalize_modality(modality)
    if mod == "CT":
        site = (site or "abdomen").strip().lower()
        if site not in CT_WINDOWS:
            raise UsageError(f"Unknown CT site '{site}'. Choose one of: {', '.join(CT_WINDOWS)}.")
        return Preset("CT", site, CT_WINDOWS[site])
    if site:
        return Preset(mod, site.strip().lower())
    return Preset(mod)


def guess_modality(volume) -> tuple[Optional[str], Optional[str], str]:
    """(modality, CT site or None, reason) from DICOM tags when present, else from intensities.

    A guess for pre-filling the Slicer panel: the user confirms or changes it."""
    tags = volume.metadata.get("dicom") or {}
    code = (tags.get("Modality") or volume.metadata.get("modality") or "").strip()
    if code:
        try:
            mod = normalize_modality(code)
        except UsageError:
            mod = None
        if mod:
            site = None
            if mod == "CT":
                part = (tags.get("BodyPartExamined") or "").upper().replace(" ", "").replace("_", "")
                site = _BODY_PARTS.get(part)
            return mod, site, f"DICOM Modality {code}" + (f", BodyPartExamined {tags.get('BodyPartExamined')}" if site
                                                          else "")
    arr = np.asarray(volume.array)
    if volume.is_rgb:
        return "Pathology", None, "RGB image: a photographic modality (pathology, fundus, endoscopy, dermoscopy); check"
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr.ravel()
    if finite.size == 0:
        return None, None, "no finite intensities"
    lo, hi = np.percentile(finite, [1, 99])
    if volume.is_2d:
        return "X-Ray", None, "single grey 2D image"
    if lo <= -500 and hi >= 100:
        return "CT", None, f"intensities look like Hounsfield units (1st percentile {lo:.0f})"
    return "MRI", None, "non-negative intensities without a Hounsfield air value (MRI or PET: check)"


def window_to_uint8(image: np.ndarray, preset: Preset) -> np.ndarray:
    """Upstream BiomedParse intensity mapping of one 2D slice (or RGB image) to 0..255.

    CT: clip to the site's HU window. Others: clip to the 0.5/99.5 percentiles of the pixels > 0.
    Then rescale with the clipped slice's own min/max to 0..255 (per slice, as upstream).
    RGB images are returned unchanged (they are already 8-bit colour).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        return np.clip(image[..., :3], 0, 255).astype(np.uint8)
    return window_to_255(img, preset).astype(np.uint8)


def window_to_255(image: np.ndarray, preset: Preset) -> np.ndarray:
    """``window_to_uint8`` of a 2D slice before the cast: float64 in 0..255 (BiomedParse v1 resizes
    this float image and casts only after the resize)."""
    img = np.asarray(image, dtype=np.float64)
    if preset.window is not None:
        lo, hi = preset.window
    else:
        positive = img[img > 0]
        if positive.size == 0:
            return np.zeros(img.shape, np.float64)
        lo, hi = np.percentile(positive, preset.percentiles)
    clipped = np.clip(img, lo, hi)
    cmin, cmax = clipped.min(), clipped.max()
    if cmax <= cmin:
        return np.zeros(img.shape, np.float64)
    return (clipped - cmin) / (cmax - cmin) * 255.0
