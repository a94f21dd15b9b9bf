"""Slice-wise models over a volume: batches of canonical slices, each encoded once, decoded for every prompt.

A ``SliceAdapter`` sees the canonical (closest-LPS) volume as slices k = 0..n-1 of (H, W) each. The predictor
runs ``first:stop`` (the image's slice range) in batches of ``ctx.batch_size`` consecutive slices; each batch is
encoded once and kept in the slice cache (a ``FeatureCache`` of adapter option ``feature_cache_bytes``), so the
next prompts on the same image only decode. Out-of-memory lowers the batch size and re-plans from the first
slice not done. A cancel keeps the whole slices done so far (``done``) as partial results.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from ..errors import Cancelled
from ..models.base import RunContext, SliceAdapter, SliceDecoded
from ..models.feature_cache import FeatureCache, cache_budget
from ..models.options import AdapterOptions
from ..prompts import Prompt
from .devices import RETRY, run_with_fallback
from .results import PromptResult, mark_partial

# ``pred`` below is the local Predictor (local.py), whose state these functions share: typed Any because
# local.py imports this module (no import back, not even for typing).

class SliceBatches:
    """The slice range of the current image, its cache of encoded batches and how far a run got."""

    def __init__(self) -> None:
        self.cache = FeatureCache()  # batch of canonical slice indices -> encoded (option feature_cache_bytes)
        self.range: Optional[tuple[int, int]] = None  # (first, stop) canonical slices
        self.done = 0  # the first slice not yet yielded by ``decoded`` (what a cancel keeps)

    def decoded(self, pred: Any, plist: Sequence[Prompt], ctx: RunContext,
                stage: str) -> Iterator[tuple[tuple[int, ...], list[SliceDecoded]]]:
        """The range's slices batch by batch: ``(batch, outs)`` with one SliceDecoded per prompt (each
        (len(batch), H, W) on the canonical in-plane grid), prompts decoded in groups of the adapter's
        ``prompts_per_call``. Progress: ``stage`` and the batch's slice numbers, over the range."""
        adapter: SliceAdapter = pred.adapter  # type: ignore[assignment]
        state = pred._state
        assert self.range is not None
        first, stop = self.range
        group = max(1, adapter.prompts_per_call(state))
        self.cache.budget = cache_budget(AdapterOptions.from_mapping(adapter.options).feature_cache_bytes, pred.device)
        idx = self.done = first
        while idx < stop:
            ctx.check_cancel()
            batch = tuple(range(idx, min(stop, idx + ctx.batch_size)))
            ctx.span((idx - first) / (stop - first), (batch[-1] + 1 - first) / (stop - first),
                     f"{stage} {idx}-{batch[-1]}")
            enc = self.cache.get(batch)
            if enc is None:
                enc = run_with_fallback(pred, lambda c: adapter.encode_slices(state, batch, c), ctx,  # noqa: B023 - runs in this iteration
                                        retry_same=False)
                if enc is RETRY:  # batch size or device lowered after out-of-memory: re-plan
                    continue
                self.cache.put(batch, enc)
            outs: list[SliceDecoded] = []
            for s in range(0, len(plist), group):
                ctx.check_cancel()
                got = run_with_fallback(pred, lambda c: adapter.decode_slices(enc, plist[s : s + group], c), ctx,  # noqa: B023 - runs in this iteration
                                        retry_same=False)
                if got is RETRY:
                    break
                outs.extend(got)
            else:
                yield batch, outs
                idx = self.done = batch[-1] + 1


def predict_slices(pred: Any, plist: list[Prompt], thr: float, keep_absent: bool, ctx: RunContext,
                   results: list[PromptResult]) -> None:
    """Every prompt over the slice range, appended to ``results``; per-slice existence drops the slices where
    the target is absent (unless ``keep_absent``). After a cancel with whole slices done, appends partial
    results and re-raises Cancelled."""
    adapter: SliceAdapter = pred.adapter  # type: ignore[assignment]
    batches = pred.slices
    assert pred._canonical is not None and batches.range is not None
    first, stop = batches.range
    h, w = adapter.slice_shape(pred._state)
    n_total = adapter.num_slices(pred._state)
    probs = [np.zeros((n_total, h, w), np.float32) for _ in plist]
    exist = [np.zeros(n_total, np.float32) for _ in plist]
    has_exist = [False] * len(plist)
    t0 = time.perf_counter()
    cancelled: Optional[Cancelled] = None
    try:
        for batch, outs in batches.decoded(pred, plist, ctx, "slices"):
            sl = slice(batch[0], batch[-1] + 1)
            for j, o in enumerate(outs):
                probs[j][sl] = o.probability
                if o.existence is not None:
                    exist[j][sl] = o.existence
                    has_exist[j] = True
    except Cancelled as exc:
        cancelled = exc
    idx = batches.done
    if idx == first:
        raise cancelled or Cancelled("cancelled")
    seconds = (time.perf_counter() - t0) / len(plist)
    make = pred._results()
    for j, p in enumerate(plist):
        e = exist[j] if has_exist[j] else None
        prob = probs[j]
        prob[idx:] = 0.0  # a cancelled batch may be half decoded: keep whole slices only
        existence = float(e[first:idx].max()) if e is not None else None
        extra: dict[str, Any] = {}
        if e is not None and pred.spec.existence_threshold is not None and not keep_absent:
            absent = e < pred.spec.existence_threshold
            absent[:first] = absent[idx:] = False
            prob[absent] = 0.0
            extra["slices_absent"] = int(absent[first:idx].sum())
        if e is not None:
            extra["slice_existence"] = e[first:idx].round(4).tolist()
        r = make.make(p, prob, existence, extra, thr, keep_absent, seconds)
        if cancelled is not None:
            mark_partial(r, first, idx, stop)
        results.append(r)
    if cancelled is not None:
        raise cancelled
