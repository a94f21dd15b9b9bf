"""Kept probability maps as files: one uint8 image per AI segment (0..255 = probability 0..1, the quantization
of ``textseg.analysis.confidence.to_uint8``) on the input image's grid, NRRD or NIfTI by the file's suffix.

A segment written with its map carries the tag ``textseg.probability_file``: the map's path relative to the
folder of the segmentation file (``/`` separators), so a segmentation and its maps can be moved together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .atomic import atomic_output, windows_reserved
from .segments import TAG_PREFIX, Segment

PathLike = Union[str, Path]
SUFFIXES = (".nrrd", ".nii.gz", ".nii")
DEFAULT_SUFFIX = ".nrrd"
FILE_TAG = TAG_PREFIX + "probability_file"


def check_suffix(suffix: str) -> str:
    s = suffix if suffix.startswith(".") else "." + suffix
    if s.lower() not in SUFFIXES:
        raise InputError(f"probability maps are written as {', '.join(SUFFIXES)}; got '{suffix}'. Choose one of those.")
    return s.lower()


def file_stem(name: str) -> str:
    """A file name stem for a segment name: letters, digits, '-', '_' and '.' kept, the rest '_'; a Windows device
    name ('con', 'aux', ...) gets '_' appended."""
    stem = (re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._") or "segment")[:120]
    if windows_reserved(stem):  # 'con' -> 'con_': Windows cannot hold a file named con.nrrd
        head, dot, rest = stem.partition(".")
        stem = head + "_" + dot + rest
    return stem


def map_paths(names: Iterable[str], folder: PathLike, suffix: str = DEFAULT_SUFFIX) -> list[Path]:
    """One file per segment name in ``folder``; names that give the same stem get ``_2``, ``_3``, ..."""
    used: set[str] = set()
    out = []
    for name in names:
        base = stem = file_stem(name)
        n = 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}_{n}"
        used.add(stem.lower())
        out.append(Path(folder) / (stem + suffix))
    return out


def write_probability_map(path: PathLike, reference: Volume, prob_u8: np.ndarray, overwrite: bool = False) -> Path:
    """The uint8 map on ``reference``'s grid, atomically; never overwrites unless asked."""
    q = np.asarray(prob_u8)
    if q.dtype != np.uint8 or q.shape != reference.shape:
        raise ValueError(f"a kept map is uint8 on the grid {reference.shape}; got {q.dtype} {q.shape}")
    from .images import write_image

    path = Path(path)
    check_suffix("".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix)
    with atomic_output(path, overwrite) as tmp:
        write_image(reference, tmp, q)
    return path


def read_probability_map(path: PathLike) -> Volume:
    """A kept map: uint8 (k, j, i) with its geometry; InputError when the file is not one."""
    from .images import read_volume

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such probability map. Give the folder holding it with --probabilities DIR.")
    vol = read_volume(p)
    if vol.array.dtype != np.uint8 or vol.is_rgb:
        raise InputError(f"{p}: not a kept probability map (uint8, 0..255 = 0..1), but {vol.array.dtype}; "
                         "give the map textseg wrote with --probabilities.")
    return vol


def reference_tag(map_path: PathLike, segmentation_path: PathLike) -> dict[str, str]:
    """``textseg.probability_file``: the map relative to the segmentation's folder."""
    rel = os.path.relpath(Path(map_path).resolve(), Path(segmentation_path).resolve().parent)
    return {FILE_TAG: rel.replace(os.sep, "/")}


def moved_references(segments: Iterable[Segment], old_path: PathLike, new_path: PathLike,
                     folder: Optional[PathLike] = None) -> list[Segment]:
    """The segments of ``old_path`` as written to ``new_path``: each ``textseg.probability_file`` tag made relative to
    the new file's folder (the tag is relative to the segmentation, so a copy elsewhere would lose its maps), pointing
    at the map ``find_map`` finds (``folder`` first), or where the old tag pointed when none is found."""
    from dataclasses import replace

    out = []
    for s in segments:
        ref = s.tags.get(FILE_TAG)
        if not ref:
            out.append(s)
            continue
        target = find_map(s, old_path, folder) or find_map(s, old_path) or Path(old_path).parent / ref
        out.append(replace(s, tags={**s.tags, **reference_tag(target, new_path)}))
    return out


def find_map(segment: Segment, segmentation_path: PathLike, folder: Optional[PathLike] = None) -> Optional[Path]:
    """The map file of ``segment``: its ``textseg.probability_file`` tag relative to the segmentation's folder,
    or, with ``folder``, the file of that name in ``folder`` (then also ``<segment name><suffix>``).
    None when the segment names no map and ``folder`` holds none."""
    ref = segment.tags.get(FILE_TAG)
    candidates = []
    if folder is not None:
        if ref:
            candidates.append(Path(folder) / Path(ref).name)
        candidates += [Path(folder) / (file_stem(segment.name) + s) for s in SUFFIXES]
    elif ref:
        candidates.append(Path(segmentation_path).parent / ref)
    return next((c for c in candidates if c.is_file()), None)
