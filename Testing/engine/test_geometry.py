"""Geometry users can't see and must be able to trust.

Flipped, axis-permuted and oblique copies of the same real CT, written to NIfTI/NRRD and read back,
give the same mask in physical space, voxel for voxel. The test-only adapter's side prompts
("bone left" = the patient-left half of the canonical grid) make the masks orientation-dependent,
so a wrong canonical orientation fails these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_file

from textseg.formats.images import read_volume, to_sitk
from textseg.predictor import Predictor
from textseg.volume import Orientation, Volume

PROMPTS = ["bone left", "bone superior", "air posterior", "soft tissue right"]


@pytest.fixture(scope="module")
def ct():
    return read_volume(shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz"))


@pytest.fixture(scope="module")
def reference_masks(ct):
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(ct, "CT")
    return [r.mask for r in p.predict(PROMPTS)]


def _copy(ct: Volume, perm=(0, 1, 2), flip=(False, False, False)) -> Volume:
    """The same physical image stored with index axes permuted/flipped (array and geometry)."""
    arr = ct.array
    m = ct.ijk_to_lps
    size = np.array(ct.size)
    origin = m[:3, 3].copy()
    for a in range(3):
        if flip[a]:
            arr = np.flip(arr, axis=2 - a)
            origin = origin + m[:3, a] * (size[a] - 1)
    cols = [ct.direction[:, a] * (-1 if flip[a] else 1) for a in range(3)]
    new_dir = np.stack([cols[perm[d]] for d in range(3)], axis=1)
    new_spacing = tuple(ct.spacing[perm[d]] for d in range(3))
    arr = np.transpose(arr, [2 - perm[d] for d in (2, 1, 0)])
    return Volume(np.ascontiguousarray(arr), new_spacing, tuple(origin), new_dir)


def _back(mask: np.ndarray, perm, flip) -> np.ndarray:
    """Undo _copy on a mask computed on the copy's grid."""
    inv = np.argsort([2 - perm[d] for d in (2, 1, 0)])
    out = np.transpose(mask, inv)
    for a in range(3):
        if flip[a]:
            out = np.flip(out, axis=2 - a)
    return out


CASES = [
    ((0, 1, 2), (True, False, False)),
    ((0, 1, 2), (True, True, True)),
    ((1, 0, 2), (False, False, False)),
    ((2, 0, 1), (False, True, False)),
    ((2, 1, 0), (True, False, True)),
]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("perm,flip", CASES)
def test_permuted_and_flipped_copies_give_the_same_physical_mask(tmp_path, ct, reference_masks, perm, flip, suffix):
    copy = _copy(ct, perm, flip)
    # physical position of every voxel is unchanged
    probe = np.array([[3, 5, 7]])
    idx_copy = np.array([[probe[0, perm[d]] if not flip[perm[d]] else ct.size[perm[d]] - 1 - probe[0, perm[d]]
                          for d in range(3)]])
    np.testing.assert_allclose(copy.index_to_physical(idx_copy), ct.index_to_physical(probe), atol=1e-6)
    sitk.WriteImage(to_sitk(copy), str(tmp_path / f"copy{suffix}"))
    back = read_volume(tmp_path / f"copy{suffix}")
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(back, "CT")
    for ref, r in zip(reference_masks, p.predict(PROMPTS)):
        assert r.mask.shape == back.shape
        np.testing.assert_array_equal(_back(r.mask, perm, flip), ref)


@pytest.mark.parametrize("axis,degrees", [("z", 20.0), ("x", -25.0), ("y", 30.0)])
def test_oblique_copy_gives_the_same_voxels(tmp_path, ct, reference_masks, axis, degrees):
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    rot = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
           "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]]}[axis]
    oblique = Volume(ct.array, ct.spacing, ct.origin, np.array(rot) @ ct.direction)
    sitk.WriteImage(to_sitk(oblique), str(tmp_path / "oblique.nrrd"))
    back = read_volume(tmp_path / "oblique.nrrd")
    assert back.orientation == ct.orientation  # < 45 degrees: same closest orientation
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(back, "CT")
    for ref, r in zip(reference_masks, p.predict(PROMPTS)):
        np.testing.assert_array_equal(r.mask, ref)


def test_matrices_agree_with_simpleitk(tmp_path, ct):
    t = np.deg2rad(17.0)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    for vol in (ct, _copy(ct, (2, 0, 1), (True, False, True)),
                Volume(ct.array, ct.spacing, ct.origin, rot @ ct.direction)):
        img = to_sitk(vol)
        pts = np.array([[0, 0, 0], [1.5, 2.25, 3.0], [vol.size[0] - 1, vol.size[1] - 1, vol.size[2] - 1]], float)
        expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in pts])
        np.testing.assert_allclose(vol.index_to_physical(pts), expected, atol=1e-9)
        np.testing.assert_allclose(vol.index_to_physical(pts, "RAS"), expected * [-1, -1, 1], atol=1e-9)
        np.testing.assert_allclose(vol.physical_to_index(expected), pts, atol=1e-9)
        np.testing.assert_allclose(vol.physical_to_index(expected * [-1, -1, 1], "RAS"), pts, atol=1e-9)


@pytest.mark.parametrize("perm,flip", CASES)
def test_canonical_round_trip_is_exact(ct, perm, flip):
    copy = _copy(ct, perm, flip)
    can = copy.canonical()
    assert can.orientation.is_identity
    # the canonical grid of every copy is the same physical grid as the original's
    np.testing.assert_allclose(can.ijk_to_lps, ct.canonical().ijk_to_lps, atol=1e-6)
    np.testing.assert_array_equal(copy.to_input_grid(can.array), copy.array)
    np.testing.assert_array_equal(can.array, ct.canonical().array)


def test_orientation_of_a_nearly_degenerate_oblique_direction():
    d = np.array([[0.70, -0.71, 0.0], [0.71, 0.70, 0.0], [0.0, 0.0, 1.0]])
    o = Orientation.from_direction(d)
    assert sorted(o.perm) == [0, 1, 2]  # always a permutation, even near 45 degrees


def test_slice_wise_path_on_a_permuted_copy(ct):
    """The 2D path slices the canonical (axial) axis whatever the storage order."""
    perm, flip = (2, 0, 1), (False, True, False)
    p = Predictor("synthetic-2d", device="cpu", batch_size=8)
    p.set_image(ct, "CT")
    ref = [r.mask for r in p.predict(PROMPTS)]
    copy = _copy(ct, perm, flip)
    p.set_image(copy, "CT")
    for want, r in zip(ref, p.predict(PROMPTS)):
        np.testing.assert_array_equal(_back(r.mask, perm, flip), want)
