"""SAT preprocessing / back-mapping fast paths (restricted to where values can be non-zero) give
exactly the numbers of the plain computation: resample the whole image axis by axis (the most
shrinking axis first), crop; and un-crop, resample the whole grid, re-orient."""

from __future__ import annotations

import numpy as np
import pytest

# (canonical shape [k, j, i], spacing (i, j, k), foreground box in canonical [k, j, i] or None = all)
CASES = [
    ((20, 33, 41), (0.8, 0.7, 1.5), ((3, 15), (5, 30), (7, 36))),  # all axes resampled, box inside
    ((12, 25, 30), (1.0004, 1.3, 2.0), ((0, 12), (2, 25), (0, 9))),  # x kept (within 1e-3), box on borders
    ((9, 16, 18), (2.2, 0.9, 4.5), None),  # everything foreground
    ((10, 14, 11), (1.0, 1.0, 3.0), ((4, 6), (6, 7), (2, 3))),  # nothing resampled, two voxels
]


def reference_preprocess(canonical, spacing, modality):
    from textseg.models.sat.preprocess import (TARGET_SPACING, SATGeometry, canonical_to_ras, normalize,
                                               resample_axis, sat_spacing)

    ras = canonical_to_ras(canonical).astype(np.float32).astype(np.float64)
    sp = tuple(float(s) for s in spacing)
    new = sat_spacing(sp, TARGET_SPACING)
    shape = tuple(int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(ras.shape, sp, new))
    for ax in sorted(range(3), key=lambda a: shape[a] / ras.shape[a]):  # the most shrinking axis first
        ras = resample_axis(ras, ax, shape[ax], new[ax] / sp[ax])
    ras = ras.astype(np.float32)
    fg = ras > 0
    start = tuple(int(np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0][0]) for ax in range(3))
    stop = tuple(int(np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0][-1]) + 1 for ax in range(3))
    geo = SATGeometry(canonical.shape[::-1], sp, new, shape, start, stop)
    return normalize(ras[tuple(slice(a, b) for a, b in zip(start, stop))], modality), geo


def reference_to_canonical(geo, sat_map):
    from textseg.models.sat.preprocess import ras_to_canonical, resample_axis

    full = np.zeros(geo.resampled_shape, np.float32)
    full[tuple(slice(a, b) for a, b in zip(geo.start, geo.stop))] = sat_map
    for ax in sorted(range(3), key=lambda a: geo.ras_shape[a] / geo.resampled_shape[a]):
        full = resample_axis(full, ax, geo.ras_shape[ax], 1.0 / geo.scale[ax])
    return ras_to_canonical(full.astype(np.float32, copy=False))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_preprocess_and_back_mapping_equal_plain_computation(case):
    from textseg.models.sat.preprocess import preprocess

    shape, spacing, box = CASES[case]
    rng = np.random.default_rng(case)
    img = np.full(shape, -1000.0, np.float32)
    sl = tuple(slice(*b) for b in box) if box else (slice(None),) * 3
    img[sl] = rng.uniform(-200, 900, img[sl].shape).astype(np.float32)
    img[sl][(0,) * 3], img[sl][(-1,) * 3] = 500.0, 100.0  # corners foreground: the box is the input's box
    out, geo = preprocess(img, spacing, "CT")
    ref, ref_geo = reference_preprocess(img, spacing, "CT")
    assert geo == ref_geo
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

    shape, spacing, box = CASES[case]
    rng = np.random.default_rng(100 + case)
    img = np.full(shape, -1000.0, np.float32)
    sl = tuple(slice(*b) for b in box) if box else (slice(None),) * 3
    img[sl] = rng.uniform(-200, 900, img[sl].shape).astype(np.float32)
    img[sl][(0,) * 3], img[sl][(-1,) * 3] = 500.0, 100.0
    _, geo = preprocess(img, spacing, "CT")
    spot = np.zeros(geo.shape, np.float32)
    centre = tuple(n // 2 for n in geo.shape)
    spot[centre] = 0.9
    spot[tuple(max(c - 1, 0) for c in centre)] = np.nextafter(np.float32(0.5), np.float32(0))
    edge = np.zeros(geo.shape, np.float32)
    edge[(0,) * 3] = edge[tuple(n - 1 for n in geo.shape)] = 0.5
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in geo.shape], indexing="ij"))
    ball = (1 / (1 + np.exp((np.sqrt((grid ** 2).sum(0)) - min(geo.shape) / 3)))).astype(np.float32)  # smooth organ
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
