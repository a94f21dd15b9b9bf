"""Real scans of ../shared/data turned through their header only (issue 15 item 2): recipes shared by the oracle
scripts and the tests. numpy (and nibabel to write files) only; no upstream code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Rotations about the RAS world axes, applied in order, about the volume centre. "tilted" is a gantry-tilt-like
# turn about the patient's left-right axis; "oblique" turns about S then R.
ROTATIONS = {"stored": (), "tilted": (("R", 12.0),), "oblique": (("S", 20.0), ("R", 10.0))}


def rotation(steps) -> np.ndarray:
    """3x3 rotation in RAS world coordinates: ("R"|"A"|"S", degrees) steps, the first applied first."""
    m = np.eye(3)
    for axis, deg in steps:
        t = np.deg2rad(deg)
        c, s = np.cos(t), np.sin(t)
        i = "RAS".index(axis)
        r = np.eye(3)
        a, b = [k for k in range(3) if k != i]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        m = r @ m
    return m


def rotated_affine(affine: np.ndarray, shape, steps) -> np.ndarray:
    """The affine of the same array turned by ``rotation(steps)`` about the volume centre."""
    r = rotation(steps)
    centre = affine[:3, :3] @ ((np.array(shape[:3]) - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = r @ affine[:3, :3]
    out[:3, 3] = centre + r @ (affine[:3, 3] - centre)
    return out


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """NIfTI with the same affine in sform and qform (code 1), as scanners' converters write them."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def turned_copy(source: Path, case: str, crop=None):
    """(array as stored [x, y, z], RAS affine) of ``source`` cropped to ``crop`` ((x0, x1), (y0, y1), (z0, z1)) and
    turned through its header by ``ROTATIONS[case]``."""
    import nibabel as nib

    img = nib.load(str(source))
    crop = crop or tuple((0, s) for s in img.shape[:3])
    array = np.asarray(img.dataobj)[tuple(slice(a, b) for a, b in crop)]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [a for a, _ in crop] + img.affine[:3, 3]
    return array, rotated_affine(affine, array.shape, ROTATIONS[case])
