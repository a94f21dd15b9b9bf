"""SAT preprocessing / back-mapping fast paths (restricted to where values can be non-zero) give
exactly the numbers of the plain computation: resample the whole image axis by axis (the most
shrinking axis first), crop; and un-crop, resample the whole grid, re-orient."""

from __future__ import annotations

import numpy as np
import pytest

from textseg.volume import Volume

# (canonical shape [k, j, i], spacing (i, j, k), foreground box in canonical [k, j, i] or None = all, degrees of
# rotation about S: an oblique header, whose grid upstream centres instead of anchoring it at a corner)
CASES = [
    ((20, 33, 41), (0.8, 0.7, 1.5), ((3, 15), (5, 30), (7, 36)), 0),  # all axes resampled, box inside
    ((12, 25, 30), (1.0004, 1.3, 2.0), ((0, 12), (2, 25), (0, 9)), 0),  # x kept (within 1e-3), box on borders
    ((9, 16, 18), (2.2, 0.9, 4.5), None, 0),  # everything foreground
    ((10, 14, 11), (1.0, 1.0, 3.0), ((4, 6), (6, 7), (2, 3)), 0),  # nothing resampled, two voxels
    ((20, 33, 41), (0.8, 0.7, 1.5), ((3, 15), (5, 30), (7, 36)), 20),  # oblique: centred grid, box inside
    ((12, 25, 30), (1.25, 1.0004, 2.2), ((0, 12), (0, 25), (20, 30)), 7),  # oblique, box on borders
]


def volume(case, array):
    shape, spacing, _, deg = CASES[case]
    t = np.deg2rad(deg)
    d = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return Volume(array, spacing, (-7.25, 3.5, 11.0), d)


def reference_preprocess(vol, modality):
    from textseg.models.sat.preprocess import SATGeometry, canonical_to_ras, normalize, resample_axis, sat_grid

    grid = sat_grid(vol)
    ras = canonical_to_ras(vol.array).astype(np.float32).astype(np.float64)
    shape = grid.shape
    for ax in sorted(range(3), key=lambda a: shape[a] / ras.shape[a]):  # the most shrinking axis first
        ras = resample_axis(ras, ax, shape[ax], grid.scale[ax], grid.offset[ax])
    ras = ras.astype(np.float32)
    fg = ras > 0
    start = tuple(int(np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0][0]) for ax in range(3))
    stop = tuple(int(np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0][-1]) + 1 for ax in range(3))
    geo = SATGeometry.from_grid(grid, vol.array.shape, start, stop)
    return normalize(ras[tuple(slice(a, b) for a, b in zip(start, stop))], modality), geo


def reference_to_canonical(geo, sat_map):
    from textseg.models.sat.preprocess import ras_to_canonical, resample_axis

    full = np.zeros(geo.resampled_shape, np.float32)
    full[tuple(slice(a, b) for a, b in zip(geo.start, geo.stop))] = sat_map
    for ax in sorted(range(3), key=lambda a: geo.ras_shape[a] / geo.resampled_shape[a]):
        full = resample_axis(full, ax, geo.ras_shape[ax], 1.0 / geo.scale[ax], -geo.offset[ax] / geo.scale[ax])
    return ras_to_canonical(full.astype(np.float32, copy=False))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_preprocess_and_back_mapping_equal_plain_computation(case):
    from textseg.models.sat.preprocess import preprocess

    shape, spacing, box, deg = CASES[case]
    rng = np.random.default_rng(case)
    img = np.full(shape, -1000.0, np.float32)
    sl = tuple(slice(*b) for b in box) if box else (slice(None),) * 3
    img[sl] = rng.uniform(-200, 900, img[sl].shape).astype(np.float32)
    img[sl][(0,) * 3], img[sl][(-1,) * 3] = 500.0, 100.0  # corners foreground: the box is the input's box
    vol = volume(case, img)
    out, geo = preprocess(vol, "CT")
    ref, ref_geo = reference_preprocess(vol, "CT")
    assert geo == ref_geo and (max(abs(o) for o in geo.offset) > 0.01) == (deg != 0)
    np.testing.assert_array_equal(out, ref)
    sat_map = rng.random(geo.shape).astype(np.float32)
    back = geo.to_canonical(sat_map)
    assert back.shape == shape and back.dtype == np.float32 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, reference_to_canonical(geo, sat_map))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_mask_of_the_back_mapping_is_computed_where_it_can_be_set(case):
    """``mask_to_canonical`` interpolates only the surface of what can reach the threshold, yet equals
    thresholding the whole back-mapped map, bit for bit: random maps (surface everywhere), a small hot spot,
    values just below and at the threshold, a smooth ball (inside, surface, outside), everything above the
    threshold, threshold 0 (``> 0``), nothing above the threshold."""
    from textseg.models.sat.preprocess import preprocess

    shape, spacing, box, _ = CASES[case]
    rng = np.random.default_rng(100 + case)
    img = np.full(shape, -1000.0, np.float32)
    sl = tuple(slice(*b) for b in box) if box else (slice(None),) * 3
    img[sl] = rng.uniform(-200, 900, img[sl].shape).astype(np.float32)
    img[sl][(0,) * 3], img[sl][(-1,) * 3] = 500.0, 100.0
    _, geo = preprocess(volume(case, img), "CT")
    spot = np.zeros(geo.shape, np.float32)
    centre = tuple(n // 2 for n in geo.shape)
    spot[centre] = 0.9
    spot[tuple(max(c - 1, 0) for c in centre)] = np.nextafter(np.float32(0.5), np.float32(0))
    edge = np.zeros(geo.shape, np.float32)
    edge[(0,) * 3] = edge[tuple(n - 1 for n in geo.shape)] = 0.5
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in geo.shape], indexing="ij"))
    ball = (1 / (1 + np.exp(np.sqrt((grid ** 2).sum(0)) - min(geo.shape) / 3))).astype(np.float32)  # smooth organ
    plateau = np.where(rng.random(geo.shape) < 0.5, np.float32(0.5), np.float32(0.75))  # values at the threshold
    maps = (rng.random(geo.shape).astype(np.float32), spot, edge, np.full(geo.shape, 0.25, np.float32), ball, plateau,
            np.full(geo.shape, 0.9, np.float32))
    for sat_map in maps:
        full = geo.to_canonical(sat_map)
        for thr in (0.5, 0.3, 0.0):
            mask = geo.mask_to_canonical(sat_map, thr)
            assert mask.dtype == np.uint8 and mask.shape == shape
            np.testing.assert_array_equal(mask, (full >= thr) if thr > 0 else (full > 0))
    assert not geo.mask_to_canonical(np.full(geo.shape, 0.25, np.float32), 0.5).any()
