"""The geometry conversions of textseg.volume, each written once: exact values on known geometry.

Each function replaced copies elsewhere (Slicer Lib, formats, remote, detection, statistics, model adapters);
these tests pin what they compute, with an oblique (tilted) direction matrix where a rotation matters.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from textseg.volume import (
    LPS_TO_RAS,
    Volume,
    canonical_ras_index,
    canonical_to_ras,
    lps_to_ras,
    mask_bounds,
    ras_to_canonical,
    ras_to_lps,
    split_matrix,
)


def tilted() -> Volume:
    """30 degrees about S, then 20 about the rotated i axis; anisotropic spacing; an offset origin."""
    a, b = math.radians(30), math.radians(20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return Volume(np.zeros((5, 6, 7), np.int16), (0.7, 0.9, 2.5), (-12.5, 40.25, 3.0), rz @ rx)


# ---- LPS <-> RAS --------------------------------------------------------------------------------------------
def test_lps_ras_of_known_points():
    np.testing.assert_array_equal(lps_to_ras([10.0, -20.0, 30.0]), [-10.0, 20.0, 30.0])
    np.testing.assert_array_equal(ras_to_lps([[1.5, 2.0, -3.0], [0.0, -4.0, 5.0]]),
                                  [[-1.5, -2.0, -3.0], [0.0, 4.0, 5.0]])
    p = np.array([[3.25, -7.5, 11.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras(p)), p)
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


def test_physical_points_in_both_spaces():
    v = tilted()
    ijk = np.array([[0.0, 0.0, 0.0], [6.0, 5.0, 4.0], [2.5, 1.0, 3.0]])
    lps = v.index_to_physical(ijk)
    np.testing.assert_array_equal(lps[0], [-12.5, 40.25, 3.0])  # index 0 is the origin
    np.testing.assert_allclose(v.index_to_physical(ijk, "RAS"), lps_to_ras(lps), rtol=0, atol=1e-12)
    np.testing.assert_allclose(v.physical_to_index(lps_to_ras(lps), "RAS"), ijk, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="LPS' or 'RAS"):
        v.index_to_physical(ijk, "XYZ")


# ---- matrix <-> Volume -----------------------------------------------------------------------------------
def test_oblique_matrix_round_trip_lps_and_ras():
    v = tilted()
    m = v.ijk_to_lps
    np.testing.assert_allclose(np.linalg.norm(m[:3, :3], axis=0), [0.7, 0.9, 2.5], rtol=0, atol=1e-15)
    for space, matrix in (("LPS", m), ("RAS", v.ijk_to_ras)):
        w = Volume.from_matrix(v.array, matrix, {"source": "x"}, space=space)
        np.testing.assert_allclose(w.spacing, v.spacing, rtol=0, atol=1e-14)
        np.testing.assert_allclose(w.origin, v.origin, rtol=0, atol=0)
        np.testing.assert_allclose(w.direction, v.direction, rtol=0, atol=1e-15)
        np.testing.assert_allclose(w.ijk_to_lps, m, rtol=0, atol=1e-14)
        assert w.metadata == {"source": "x"} and w.same_grid(v)


def test_split_matrix_known_values():
    m = np.array([[0.0, 0.0, -3.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.5, 0.0, 7.0], [0, 0, 0, 1]])
    spacing, origin, direction = split_matrix(m)
    assert spacing == (2.0, 0.5, 3.0) and origin == (10.0, -5.0, 7.0)
    np.testing.assert_array_equal(direction, [[0, 0, -1], [1, 0, 0], [0, 1, 0]])
    spacing, origin, direction = split_matrix(m, "RAS")  # the same numbers read as RAS: L and P change sign
    assert spacing == (2.0, 0.5, 3.0) and origin == (-10.0, 5.0, 7.0)
    np.testing.assert_array_equal(direction, [[0, 0, 1], [-1, 0, 0], [0, 1, 0]])
    assert split_matrix(m[:3])[0] == (2.0, 0.5, 3.0)  # 3x4 too
    with pytest.raises(ValueError, match="4x4"):
        split_matrix(np.eye(3))


# ---- geometry dict <-> Volume ------------------------------------------------------------------------------
def test_geometry_dict_round_trip_through_json():
    v = tilted()
    g = json.loads(json.dumps(v.geometry()))
    assert set(g) == {"spacing", "origin", "direction"}
    assert g["spacing"] == [0.7, 0.9, 2.5] and g["origin"] == [-12.5, 40.25, 3.0]
    assert np.shape(g["direction"]) == (3, 3)
    w = Volume.from_geometry(v.array, g)
    np.testing.assert_array_equal(w.ijk_to_lps, v.ijk_to_lps)  # exact: JSON keeps every float64 digit
    flat = dict(g, direction=np.ravel(g["direction"]).tolist())  # a flat 9-list is read row by row
    np.testing.assert_array_equal(Volume.from_geometry(v.array, flat).direction, v.direction)


# ---- canonical <-> RAS index order -------------------------------------------------------------------------
def test_canonical_ras_arrays_and_indices():
    canonical = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [k, j, i]: n_i = 4, n_j = 3, n_k = 2
    ras = canonical_to_ras(canonical)
    assert ras.shape == (4, 3, 2) and np.shares_memory(ras, canonical)  # a view
    # voxel (i, j, k) = (0, 0, 1) lies at RAS index (3, 2, 1): x = n_i - 1 - i, y = n_j - 1 - j, z = k
    assert ras[3, 2, 1] == canonical[1, 0, 0] == 12
    back = ras_to_canonical(ras)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, canonical)
    m = canonical_ras_index((4, 3, 2))
    np.testing.assert_array_equal(m @ [0, 0, 1, 1], [3, 2, 1, 1])
    np.testing.assert_array_equal(m @ m, np.eye(4))  # its own inverse
    for i, j, k in [(0, 0, 0), (3, 1, 1), (2, 2, 0)]:
        x, y, z, _ = (m @ [i, j, k, 1]).astype(int)
        assert ras[x, y, z] == canonical[k, j, i]


# ---- mask bounding boxes ---------------------------------------------------------------------------------------
def test_mask_bounds_in_index_space():
    mask = np.zeros((6, 7, 8), bool)
    mask[2, 1, 5] = mask[4, 3, 2] = True
    lo, hi = mask_bounds(mask)
    assert lo.tolist() == [2, 1, 2] and hi.tolist() == [4, 3, 5]  # (k, j, i), inclusive
    assert mask_bounds(np.zeros((3, 3, 3), np.uint8)) is None
    assert mask_bounds(np.zeros((0, 3, 3), bool)) is None
    lo, hi = mask_bounds(np.array([0, 0, 7, 0, 1, 0]))  # any number of axes, any dtype
    assert (lo.tolist(), hi.tolist()) == ([2], [4])


def test_box_to_physical_of_a_known_mask():
    mask = np.zeros((6, 7, 8), bool)
    mask[2, 1, 5] = mask[4, 3, 2] = True
    lo, hi = mask_bounds(mask)
    v = Volume(mask, (0.5, 2.0, 3.0), (100.0, -50.0, 20.0), np.diag([-1.0, 1.0, 1.0]))  # i runs to the right
    plo, phi = v.box_to_physical(lo[::-1], hi[::-1])  # voxel centres, LPS
    np.testing.assert_array_equal(plo, [100.0 - 0.5 * 5, -50.0 + 2.0 * 1, 20.0 + 3.0 * 2])
    np.testing.assert_array_equal(phi, [100.0 - 0.5 * 2, -50.0 + 2.0 * 3, 20.0 + 3.0 * 4])
    rlo, rhi = v.box_to_physical(lo[::-1], hi[::-1], "RAS", margin=0.5)  # outer voxel corners, RAS
    np.testing.assert_array_equal(rlo, [-(100.0 - 0.5 * 1.5), 50.0 - 2.0 * 3.5, 20.0 + 3.0 * 1.5])
    np.testing.assert_array_equal(rhi, [-(100.0 - 0.5 * 5.5), 50.0 - 2.0 * 0.5, 20.0 + 3.0 * 4.5])


def test_box_to_physical_oblique_is_the_box_of_its_corners():
    v = tilted()
    lo, hi = np.array([1, 2, 0]), np.array([4, 5, 3])
    corners = np.array([[x, y, z] for x in (1, 4) for y in (2, 5) for z in (0, 3)], float)
    pts = v.index_to_physical(corners)
    plo, phi = v.box_to_physical(lo, hi)
    np.testing.assert_array_equal(plo, pts.min(0))
    np.testing.assert_array_equal(phi, pts.max(0))
    # every voxel centre in the index box lies inside, and each face of the physical box touches a corner
    inner = v.index_to_physical(np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)],
                                                     indexing="ij"), -1).reshape(-1, 3))
    assert (inner >= plo - 1e-12).all() and (inner <= phi + 1e-12).all()
