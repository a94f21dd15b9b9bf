"""Kept model answers (textseg.analysis.confidence): quantization, re-threshold, confidence, hand-edit checks.

The engine's own threshold rule is taken from the real Predictor (maps given to it by a test adapter), never
re-implemented here; the quantization is checked against the wire's.
"""

from __future__ import annotations

import numpy as np
import pytest

from textseg.analysis.confidence import (
    DEFAULT_BAND,
    MAX_QUANTIZATION_ERROR,
    MaskFingerprint,
    ModelAnswer,
    band_levels,
    confidence,
    confidence_row,
    confidence_tags,
    edited_since,
    rethreshold,
    threshold_level,
    to_float,
    to_uint8,
    uncertain_mask,
)
from textseg.catalog import get_model
from textseg.errors import UsageError
from textseg.models.base import Decoded
from textseg.models.synthetic.adapter import Synthetic3D
from textseg.predictor import Predictor
from textseg.remote import wire
from textseg.volume import Volume

LEVELS = np.arange(256, dtype=np.uint8)
FLOAT_SLACK = 1e-6  # float32 rounding on top of the 1/510 quantization bound


class GivenMaps(Synthetic3D):
    """A 3D adapter whose answer to prompt "mapN" is ``maps[N]`` (canonical grid), or, with ``sigmoid`` set,
    a smooth map of the image's values: 1 / (1 + exp(-(v - centre) / width))."""

    maps: list = []
    sigmoid = None
    existence = None

    def decode(self, encoded, prompts, ctx):
        out = []
        for p in prompts:
            if self.sigmoid is not None:
                centre, width = self.sigmoid
                v = encoded["array"].astype(np.float64)
                prob = (1.0 / (1.0 + np.exp(-(v - centre) / width))).astype(np.float32)
            else:
                prob = np.asarray(self.maps[int(p.text[3:])], np.float32)
            out.append(Decoded(prob, existence=self.existence))
        return out


def _predictor(volume, maps=(), sigmoid=None, existence=None):
    adapter = GivenMaps(get_model("synthetic-3d"))
    adapter.maps, adapter.sigmoid, adapter.existence = list(maps), sigmoid, existence
    p = Predictor(adapter, device="cpu")
    p.set_image(volume, "CT")
    return p


def _random_maps(shape, threshold, rng):
    """Uniform values, a share of them crowded within 2/255 of the threshold, and exact edges."""
    p = rng.random(shape, dtype=np.float32)
    near = rng.random(shape) < 0.3
    p[near] = np.clip(threshold + rng.uniform(-2 / 255, 2 / 255, int(near.sum())), 0, 1).astype(np.float32)
    flat = p.reshape(-1)
    flat[:4] = [threshold, 0.0, 1.0, np.nextafter(np.float32(threshold), np.float32(0))]
    return p


# ---- quantization ----------------------------------------------------------------------------------------
def test_quantization_is_the_wires_rule_and_round_trips_within_half_a_step():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(200_000, dtype=np.float32), np.linspace(0, 1, 510 * 40 + 1, dtype=np.float32),
                        np.array([-0.5, 1.5, np.inf, -np.inf], np.float32)])
    q = to_uint8(p)
    np.testing.assert_array_equal(q, wire.quantize(p, "uint8"))
    np.testing.assert_array_equal(to_float(LEVELS), wire.dequantize(LEVELS))
    inside = (p >= 0) & (p <= 1)
    assert np.abs(to_float(q[inside]) - p[inside]).max() <= MAX_QUANTIZATION_ERROR + FLOAT_SLACK
    assert q[-4:].tolist() == [0, 255, 255, 0]
    assert to_uint8(np.array([np.nan, 0.5, 127.5 / 255], np.float32)).tolist() == [0, 128, 128]  # NaN -> 0, half up
    np.testing.assert_array_equal(to_uint8(to_float(LEVELS)), LEVELS)  # the 256 values are fixed points


# ---- the threshold rule on uint8 values --------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 1e-9, 1 / 3, 0.2, 0.35, 0.5, 0.5 + 1e-9, 0.8, 254.5 / 255, 1.0])
def test_rethreshold_is_q_over_255_at_or_above_t(t):
    got = rethreshold(LEVELS, t)
    expected = to_float(LEVELS) >= t if t > 0 else LEVELS > 0
    np.testing.assert_array_equal(got, expected)
    c = threshold_level(t)
    assert got.sum() == 256 - c and (c == 256 or got[c:].all())


def test_rethreshold_levels_of_common_thresholds():
    assert threshold_level(0.5) == 128  # 127.5 is a rounding edge: no voxel can change side at 0.5
    assert threshold_level(0.0) == 1  # the engine's rule at 0 is p > 0
    assert threshold_level(1.0) == 255
    out = np.empty((2, 3), bool)
    assert rethreshold(np.full((2, 3), 200, np.uint8), 0.9, out=out) is out and not out.any()


@pytest.mark.parametrize("t", [0.5, 0.35, 0.123, 0.0, 0.9, 1.0])
def test_rethreshold_agrees_with_the_predictors_rule_outside_the_half_step_band(t):
    """Random float maps through the real Predictor: re-thresholding their uint8 copies reproduces the engine's
    masks except for voxels whose probability lies within 1/510 of the threshold."""
    rng = np.random.default_rng(int(t * 1000))
    shape = (12, 40, 48)
    maps = [_random_maps(shape, t, rng) for _ in range(2)]
    flipped = Volume(np.zeros(shape, np.int16), (0.8, 0.8, 2.5), (0, 0, 0), np.diag([-1.0, 1.0, 1.0]))
    results = _predictor(flipped, maps).predict(["map0", "map1"], threshold=t)
    disagree_total = 0
    for r in results:
        prob = r.probability  # the engine's float map on the input grid
        engine = r.mask.astype(bool)
        ours = rethreshold(to_uint8(prob), t)
        disagree = ours != engine
        assert (np.abs(prob[disagree].astype(np.float64) - t) <= MAX_QUANTIZATION_ERROR + FLOAT_SLACK).all()
        disagree_total += int(disagree.sum())
        assert np.abs(prob.astype(np.float64) - t).min() <= MAX_QUANTIZATION_ERROR  # the band is populated
    if t in (0.5, 0.9):  # 255 t = 127.5, 229.5: rounding edges, no voxel can round across the threshold
        assert disagree_total == 0
    else:  # 255 t is not a half-integer: some band voxels round across
        assert disagree_total > 0


# ---- band and confidence -----------------------------------------------------------------------------------
def test_band_levels_are_exact():
    assert band_levels(0.5, 0.1) == (102, 153)  # 0.4 and 0.6 are exactly q/255 for q = 102, 153: included
    assert band_levels(0.3, 0.05) == (64, 89)  # 63.75..89.25 steps
    assert band_levels(0.5, 0.0) == (1, 0)  # no q/255 equals 0.5
    assert band_levels(0.2, 0.0) == (51, 51)  # 0.2 = 51/255
    assert band_levels(0.0, 0.1) == (0, 25)
    assert band_levels(0.37, 0.1) == (69, 119)  # 68.85..119.85 steps
    assert band_levels(0.5, 0.25) == (64, 191)  # 63.75..191.25
    assert band_levels(0.99, 0.05) == (240, 255)  # 239.7..265.2 steps, capped at 255


def _constructed():
    """A map with known counts: in the mask 10 x 200, 5 x 128, 3 x 153 (band edge), 2 x 154 (just out);
    outside it 4 x 102 (band edge), 7 x 101 (just out); 0 elsewhere."""
    q = np.zeros((3, 10, 10), np.uint8)
    mask = np.zeros(q.shape, bool)
    flat_q, flat_m = q.reshape(-1), mask.reshape(-1)
    start = 0
    for value, count, inside in [(200, 10, True), (128, 5, True), (153, 3, True), (154, 2, True),
                                 (102, 4, False), (101, 7, False)]:
        flat_q[start:start + count] = value
        flat_m[start:start + count] = inside
        start += count
    return q, mask


def test_confidence_exact_on_a_constructed_map():
    q, mask = _constructed()
    c = confidence(q, mask, 0.5, existence=0.87, band=0.1)
    assert c["voxel_count"] == 20 and c["near_threshold_voxels"] == 8
    assert c["near_threshold"] == 8 / 20
    assert c["mean"] == (10 * 200 + 5 * 128 + 3 * 153 + 2 * 154) / (20 * 255)
    assert c["existence"] == 0.87 and c["threshold"] == 0.5 and c["band"] == 0.1
    assert int(uncertain_mask(q, 0.5, 0.1).sum()) == 5 + 3 + 4  # inside and outside the mask, edges included
    u = uncertain_mask(q, 0.5, 0.1)
    assert (q[u] >= 102).all() and (q[u] <= 153).all()
    narrow = confidence(q, mask, 0.5, band=0.05)  # 0.45..0.55 -> q 115..140: the five 128s
    assert narrow["near_threshold_voxels"] == 5 and narrow["existence"] is None
    empty = confidence(q, np.zeros_like(mask), 0.5)
    assert empty["voxel_count"] == 0 and empty["mean"] is None and empty["near_threshold"] is None
    assert DEFAULT_BAND == 0.1 and confidence(q, mask, 0.5)["near_threshold_voxels"] == 8


def test_confidence_tags_and_columns():
    q, mask = _constructed()
    c = confidence(q, mask, 0.5, existence=0.87654)
    tags = confidence_tags(c)
    assert tags == {"textseg.threshold": "0.5", "textseg.confidence.mean": str(round(c["mean"], 6)),
                    "textseg.confidence.near_threshold": "0.4", "textseg.confidence.band": "0.1",
                    "textseg.existence": "0.8765"}
    assert confidence_tags(confidence(q, np.zeros_like(mask), 0.5))["textseg.confidence.mean"] == "null"
    assert confidence_row(c) == {"existence": 0.87654, "threshold": 0.5, "confidence_mean": c["mean"],
                                 "confidence_near_threshold": 0.4, "confidence_band": 0.1}


# ---- hand edits --------------------------------------------------------------------------------------------
def test_one_voxel_edit_is_detected_and_no_edit_is_not():
    rng = np.random.default_rng(3)
    mask = (rng.random((20, 30, 40)) > 0.7).astype(np.uint8)
    fp = MaskFingerprint.of(mask)
    assert not edited_since(fp, mask.copy()) and not edited_since(fp, mask.astype(bool))
    added, removed, moved = mask.copy(), mask.copy(), mask.copy()
    added.flat[np.flatnonzero(mask == 0)[5]] = 1
    removed.flat[np.flatnonzero(mask)[5]] = 0
    moved.flat[np.flatnonzero(mask == 0)[7]] = 1
    moved.flat[np.flatnonzero(mask)[9]] = 0  # same voxel count: only the hash tells
    assert edited_since(fp, added) and edited_since(fp, removed) and edited_since(fp, moved)
    assert MaskFingerprint.of(moved).voxels == fp.voxels
    assert MaskFingerprint.from_tags(fp.tags()) == fp
    assert MaskFingerprint.from_tags({}) is None and MaskFingerprint.from_tags({"textseg.mask_sha256": "x"}) is None


# ---- what is kept ------------------------------------------------------------------------------------------
def test_model_answer_keeps_the_original_mask_exactly():
    rng = np.random.default_rng(5)
    shape = (10, 32, 32)
    p = rng.random(shape, dtype=np.float32)
    flat_mask = p >= 0.35  # a plain threshold mask: few exceptions (1/4 of the voxels in one step), in the band
    a = ModelAnswer.from_arrays(p, flat_mask, 0.35, existence=0.9)
    exceptions = np.flatnonzero(rethreshold(to_uint8(p), 0.35) != flat_mask)
    assert a.original_packed is None and 0 < a.exceptions.size == exceptions.size < 60
    np.testing.assert_array_equal(a.exceptions, exceptions)
    assert (np.abs(p.ravel()[exceptions] - 0.35) <= MAX_QUANTIZATION_ERROR + FLOAT_SLACK).all()
    np.testing.assert_array_equal(a.original_mask(), flat_mask)
    assert a.nbytes == p.size + a.exceptions.nbytes
    assert not edited_since(a.fingerprint, a.original_mask())
    np.testing.assert_array_equal(a.mask_at(0.6), rethreshold(to_uint8(p), 0.6))
    dropped = ModelAnswer.from_arrays(p, np.zeros(shape, bool), 0.35)  # existence-dropped: empty mask, full map
    assert dropped.original_packed is not None and not dropped.original_mask().any()
    assert dropped.nbytes == p.size + -(-p.size // 8)
    tags = a.tags()
    assert tags["textseg.original_threshold"] == "0.35" and tags["textseg.mask_voxels"] == str(int(flat_mask.sum()))
    assert tags["textseg.existence"] == "0.9" and tags["textseg.mask_sha256"] == a.fingerprint.sha256


def test_model_answer_packs_to_plain_arrays_and_back(tmp_path):
    rng = np.random.default_rng(6)
    p = rng.random((6, 20, 24), dtype=np.float32)
    for mask, existence in [(p >= 0.35, 0.75), (np.zeros(p.shape, bool), None)]:
        a = ModelAnswer.from_arrays(p, mask, 0.35, existence)
        np.savez(tmp_path / "answer.npz", **a.pack())
        with np.load(tmp_path / "answer.npz", allow_pickle=False) as z:
            b = ModelAnswer.unpack({k: z[k] for k in z.files})
        np.testing.assert_array_equal(b.probability, a.probability)
        np.testing.assert_array_equal(b.original_mask(), mask)
        assert (b.threshold, b.existence, b.fingerprint, b.dropped) == (0.35, existence, a.fingerprint, False)
    with pytest.raises(UsageError, match="Not a kept model answer"):
        ModelAnswer.unpack({"probability": a.probability})


def test_a_0_1_uint8_map_means_probabilities_0_and_1():
    """A remote result fetched without probabilities carries its mask (uint8 0/1) as the map: kept as 0 and 255,
    never misread as quantized values 0 and 1."""
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 1:5] = 1
    a = ModelAnswer.from_arrays(mask, mask, 0.5)
    assert set(np.unique(a.probability).tolist()) == {0, 255} and a.exceptions.size == 0
    np.testing.assert_array_equal(a.mask_at(0.9), mask.astype(bool))
    q = to_uint8(np.where(mask, np.float32(0.7), np.float32(0.2)))
    b = ModelAnswer.from_uint8(q, mask, 0.5)
    np.testing.assert_array_equal(b.probability, q)
    assert not b.mask_at(0.8).any() and b.mask_at(0.1).all()
    with pytest.raises(UsageError, match="uint8"):
        ModelAnswer.from_uint8(q.astype(np.float32), mask, 0.5)


def test_existence_dropped_target_stays_dropped_unless_kept_absent():
    """The real Predictor drops a target whose existence is below the model's test (synthetic: 0.5); the kept
    answer re-thresholds it to an empty mask, as the engine would, unless keep_absent."""
    rng = np.random.default_rng(7)
    shape = (8, 16, 20)
    prob = rng.random(shape, dtype=np.float32)
    v = Volume(np.zeros(shape, np.int16), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    predictor = _predictor(v, [prob], existence=0.2)
    dropped = predictor.predict(["map0"])[0]
    kept = predictor.predict(["map0"], keep_absent=True)[0]
    assert not dropped.present and dropped.voxel_count == 0 and not kept.present and kept.voxel_count > 0
    a, b = ModelAnswer.from_result(dropped), ModelAnswer.from_result(kept)
    assert a.dropped and not b.dropped and a.existence == b.existence == 0.2
    assert not a.original_mask().any() and not a.mask_at(0.3).any()
    np.testing.assert_array_equal(a.mask_at(0.3, keep_absent=True), rethreshold(to_uint8(prob), 0.3))
    np.testing.assert_array_equal(b.original_mask(), kept.mask.astype(bool))
    np.testing.assert_array_equal(b.mask_at(0.3), rethreshold(to_uint8(prob), 0.3))


def test_bad_inputs_say_what_to_do():
    q = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(UsageError, match="uint8"):
        rethreshold(q.astype(np.float32), 0.5)
    with pytest.raises(UsageError, match="outside 0..1"):
        rethreshold(q, 1.5)
    with pytest.raises(UsageError, match="not a number"):
        rethreshold(q, "high")
    with pytest.raises(UsageError, match="same grid"):
        confidence(q, np.zeros((2, 2, 3), bool), 0.5)
    with pytest.raises(UsageError, match="Band"):
        uncertain_mask(q, 0.5, -0.1)


# ---- real data through the real Predictor ------------------------------------------------------------------
def test_real_ct_synthetic_model_masks_are_reproduced_from_the_kept_maps():
    from conftest import shared_file

    from textseg.formats.images import read_volume

    ct = read_volume(shared_file("totalsegmentator-examples", "example_ct.nii.gz"))
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(ct, "CT")
    for r in p.predict(["bone", "soft tissue left"]):
        thr = r.provenance["threshold"]
        a = ModelAnswer.from_result(r)
        assert r.voxel_count > 10_000
        np.testing.assert_array_equal(rethreshold(a.probability, thr), r.mask.astype(bool))
        assert a.exceptions.size == 0 and not edited_since(a.fingerprint, r.mask)
        c = a.confidence()
        assert c["voxel_count"] == r.voxel_count and c["mean"] == 1.0 and c["near_threshold"] == 0.0


@pytest.mark.parametrize("t", [0.5, 0.37])
def test_real_ct_smooth_map_rethreshold_differs_only_in_the_band(t):
    """A smooth map of the real CT (sigmoid around 300 HU, scale 400 HU) through the real Predictor: the engine's
    mask is reproduced from the uint8 map except voxels within 1/510 of the threshold, counted."""
    from conftest import shared_file

    from textseg.formats.images import read_volume

    ct = read_volume(shared_file("totalsegmentator-examples", "example_ct.nii.gz"))
    r = _predictor(ct, sigmoid=(300.0, 400.0)).predict(["map0"], threshold=t)[0]
    prob = r.probability
    a = ModelAnswer.from_result(r)
    disagree = rethreshold(a.probability, t) != r.mask.astype(bool)
    in_band = np.abs(prob.astype(np.float64) - t) <= MAX_QUANTIZATION_ERROR + FLOAT_SLACK
    assert not (disagree & ~in_band).any()
    assert int(in_band.sum()) > 100  # a smooth map does populate the band
    if t == 0.5:
        assert int(disagree.sum()) == 0
    else:
        assert 0 < int(disagree.sum()) <= int(in_band.sum())
    assert a.exceptions.size == int(disagree.sum())
    np.testing.assert_array_equal(a.original_mask(), r.mask.astype(bool))
    c = a.confidence()
    assert c["voxel_count"] == r.voxel_count and t <= c["mean"] <= 1.0
    lo, hi = band_levels(t, DEFAULT_BAND)
    near = (a.probability >= lo) & (a.probability <= hi) & r.mask.astype(bool)
    assert c["near_threshold_voxels"] == int(near.sum())


def test_map_file_names_are_usable_on_windows():
    """A prompt such as 'con' or 'aux' gave the map file con.nrrd, a name Windows reserves for a device."""
    from textseg.formats.probability_maps import file_stem, map_paths

    assert [file_stem(n) for n in ("con", "AUX", "nul.x", "com1", "Lpt9 ", "console", "liver")] == [
        "con_", "AUX_", "nul_.x", "com1_", "Lpt9_", "console", "liver"]
    assert [p.name for p in map_paths(["con", "con_", "CON"], "maps")] == ["con_.nrrd", "con__2.nrrd", "CON__3.nrrd"]
