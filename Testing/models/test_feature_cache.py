"""The one feature cache (byte-budget LRU), its option ``feature_cache_bytes`` and the typed adapter options.

The LRU's byte accounting and eviction order are exact; the predictor's slice cache honours the budget with
the synthetic slice-wise model (SAT's window features: test_sat_pipeline.py; SegVol's window embeddings:
test_segvol.py, both through the same option).
"""

from __future__ import annotations

import numpy as np
import pytest

from textseg.errors import UsageError
from textseg.models.feature_cache import DEFAULT_BYTES, FeatureCache, cache_budget, default_budget
from textseg.models.options import AdapterOptions
from textseg.predictor import Predictor
from textseg.volume import Volume


def arr(n_bytes: int) -> np.ndarray:
    return np.zeros(n_bytes, np.uint8)


def test_lru_byte_accounting_and_eviction_order():
    c = FeatureCache(budget=100)
    assert c.put("a", arr(40)) and c.put("b", arr(30)) and c.put("c", arr(20))
    assert c.nbytes == 90 and c.keys() == ["a", "b", "c"]
    assert c.get("a") is not None  # "a" becomes the most recent
    assert c.keys() == ["b", "c", "a"] and (c.hits, c.misses) == (1, 0)
    assert c.put("d", arr(25))  # 115 > 100: the least recently used ("b", 30 bytes) goes
    assert c.keys() == ["c", "a", "d"] and c.nbytes == 85
    assert c.get("b") is None and c.misses == 1
    assert c.put("c", arr(50))  # replacing an entry counts its new size only: 40 + 25 + 50 = 115 -> "a" goes
    assert c.keys() == ["d", "c"] and c.nbytes == 75
    assert not c.put("big", arr(101))  # larger than the whole budget: not kept, nothing dropped for it
    assert c.keys() == ["d", "c"] and c.nbytes == 75 and "big" not in c
    c.budget = 50  # lowering the budget drops the least recently used first
    assert c.keys() == ["c"] and c.nbytes == 50 and len(c) == 1
    assert c.pop("c").nbytes == 50 and c.nbytes == 0
    c.put("e", arr(10))
    c.clear()
    assert len(c) == 0 and c.nbytes == 0
    z = FeatureCache(budget=0)
    assert not z.put("x", arr(1)) and z.put("empty", arr(0))  # a zero budget keeps only what costs nothing


def test_entry_sizes_count_tensors_in_containers():
    torch = pytest.importorskip("torch")
    c = FeatureCache(budget=10_000)
    c.put("t", (torch.zeros(10, dtype=torch.float32), {"x": np.zeros(5, np.float64)}, "label"))
    assert c.nbytes == 10 * 4 + 5 * 8


def test_budget_policy_and_option():
    assert DEFAULT_BYTES == 2 << 30
    assert default_budget("cpu") == DEFAULT_BYTES and default_budget(None) == DEFAULT_BYTES
    assert cache_budget(None, "cpu") == DEFAULT_BYTES
    assert cache_budget(0, "cpu") == 0 and cache_budget(12345, "cpu") == 12345
    assert AdapterOptions.from_mapping({}).feature_cache_bytes is None
    assert AdapterOptions.from_mapping({"feature_cache_bytes": 4096.0, "network": object()}).feature_cache_bytes == 4096


@pytest.mark.parametrize("old", ["window_cache_bytes", "cache_bytes"])
def test_renamed_option_names_say_the_new_one(old):
    with pytest.raises(UsageError, match=f"'{old}' is now 'feature_cache_bytes'"):
        AdapterOptions.from_mapping({old: 1 << 20})
    with pytest.raises(UsageError, match="feature_cache_bytes"):
        Predictor("synthetic-2d", device="cpu", **{old: 1 << 20})


@pytest.mark.parametrize("value", [-1, 1.5, "big", True])
def test_bad_budget_is_one_clear_line(value):
    with pytest.raises(UsageError, match=r"feature_cache_bytes=.*whole number >= 0 \(bytes\)"):
        Predictor("synthetic-2d", device="cpu", feature_cache_bytes=value)


def test_options_dataclass_documents_every_setting():
    doc = AdapterOptions.__doc__
    for f in AdapterOptions.__dataclass_fields__:
        assert f"``{f}``" in doc, f


def slice_predictor(budget):
    p = Predictor("synthetic-2d", device="cpu", batch_size=2, feature_cache_bytes=budget)
    p.set_image(Volume(np.arange(8 * 4 * 4, dtype=np.float32).reshape(8, 4, 4)), modality="CT")
    return p


def test_slice_cache_honours_the_budget():
    """8 slices in batches of 2: 4 encoded batches. The synthetic model's encoded batch holds the image's array
    (8 x 4 x 4 float32 = 512 bytes), so each entry costs 512 bytes."""
    one = 8 * 4 * 4 * 4
    for budget, kept, again in ((4 * one, 4, 0), (2 * one, 2, 4), (one - 1, 0, 4), (0, 0, 4)):
        p = slice_predictor(budget)
        p.predict(["0..100"])
        assert p.adapter.calls["encode"] == 4
        cache = p.slices.cache
        assert len(cache) == kept and cache.nbytes == kept * one <= budget
        if kept:
            assert cache.keys() == [(0, 1), (2, 3), (4, 5), (6, 7)][4 - kept:]  # the most recent batches
        p.predict(["50..200"])  # the same image, a new prompt: cached batches are decoded only
        assert p.adapter.calls["encode"] == 4 + again, budget


def test_slice_cache_default_budget_and_new_image():
    p = slice_predictor(None)
    p.predict(["0..100"])
    assert p.slices.cache.budget == DEFAULT_BYTES and len(p.slices.cache) == 4
    p.set_image(Volume(np.zeros((8, 4, 4), np.float32)), modality="CT")
    assert len(p.slices.cache) == 0  # features of another image are never reused
