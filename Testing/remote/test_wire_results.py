"""What both ends of textseg's HTTP API share (textseg.remote.wire): probability maps quantized by
textseg.analysis.confidence's one rule and decoded as float32 or kept as uint8, result records, masks in JSON."""

from __future__ import annotations

import numpy as np

from textseg.analysis.confidence import to_uint8
from textseg.remote import wire


def test_wire_quantizes_by_the_confidence_rule_and_can_keep_uint8():
    p = np.array([[[0.0, 0.2, 0.5, 1.0, np.nan, -0.5, 1.5, 127.5 / 255]]], np.float32)
    np.testing.assert_array_equal(wire.quantize(p, wire.UINT8), to_uint8(p))
    assert wire.quantize(p, wire.UINT8)[0, 0, 4] == 0  # NaN: 0, as the confidence rule says
    for mode in (wire.UINT8, wire.FLOAT32):
        arrays = wire.encode_probability(p, mode, 3)
        kept = wire.decode_probability(arrays, 3, p.shape, keep_uint8=True)
        assert kept.dtype == np.uint8
        np.testing.assert_array_equal(kept, to_uint8(p))
    back = wire.decode_probability(wire.encode_probability(p, wire.UINT8, 0), 0, p.shape)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, to_uint8(p).astype(np.float32) / np.float32(255))


def test_result_records_have_the_wire_keys_and_round_trip():
    from textseg.predictor import PromptResult
    from textseg.prompts import Prompt

    mask = np.zeros((2, 3, 4), np.uint8)
    mask[1, 1:, 2:] = 1
    r = PromptResult(Prompt.from_any("bone"), None, mask, 0.75, True, {"threshold": 0.5}, "", {"name": "Bone"},
                     complete=False)
    record = wire.result_record(4, r, wire.UINT8)
    assert tuple(record) == wire.RECORD_KEYS
    arrays = wire.encode_mask(r.mask, 4)
    back = wire.result_from_record(record, wire.decode_mask(arrays, 4, mask.shape), None)
    np.testing.assert_array_equal(back.mask, mask)
    assert (back.name, back.existence, back.complete, back.voxel_count) == ("Bone", 0.75, False, 4)
    np.testing.assert_array_equal(wire.mask_from_text(wire.mask_to_text(mask), mask.shape), mask.astype(bool))
