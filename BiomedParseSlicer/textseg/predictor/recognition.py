"""Recognition ("segment everything") for slice-wise models: every target of the model's vocabulary for the
image decoded slice batch by slice batch, the family's ``Recognizer`` keeping one target (or none) per pixel.

The whole run shares two canonical arrays (the label map and the winning probability); each target found
becomes a ``PromptResult`` whose mask is where it won and whose probability map is computed on first read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..detection import detect_objects
from ..errors import Cancelled
from ..models.base import DeferredMap, Recognizer, RunContext, SliceAdapter
from .results import PromptResult, mark_partial

# ``pred`` below is the local Predictor (local.py), whose state these functions share: typed Any because
# local.py imports this module (no import back, not even for typing).

@dataclass(frozen=True, eq=False)
class Recognized(DeferredMap):
    """A recognised target: its mask is where it won (the label map), its probability the winning probability
    there, 0 elsewhere, computed on first read; every target of a run shares the two canonical arrays (no
    float32 map per target)."""

    labels: np.ndarray  # int32 canonical label map (0 = none, n = target n)
    probability: np.ndarray  # float32 canonical: the winning target's probability
    label: int

    def array(self) -> np.ndarray:
        return np.where(self.labels == self.label, self.probability, np.float32(0))

    def mask(self, threshold: float) -> np.ndarray:
        return (self.labels == self.label).astype(np.uint8)


def recognize_slices(pred: Any, rec: Recognizer, ctx: RunContext, results: list[PromptResult]) -> None:
    """Run ``rec`` over the image's slice range and append one result per target found. A cancel after some
    slice batches keeps the targets found there (results marked incomplete); before any, Cancelled."""
    adapter: SliceAdapter = pred.adapter  # type: ignore[assignment]
    batches = pred.slices
    assert pred._volume is not None and batches.range is not None
    volume = pred._volume
    first, stop = batches.range
    n_total, (h, w) = adapter.num_slices(pred._state), adapter.slice_shape(pred._state)
    n = len(rec.prompts)
    labels = np.zeros((n_total, h, w), np.int32)
    win = np.zeros((n_total, h, w), np.float32)
    edges = np.zeros((n_total, h, w), bool) if rec.edges else None
    scores = np.full((n, n_total), np.nan)
    t0 = time.perf_counter()
    cancelled: Optional[Cancelled] = None
    try:
        for batch, outs in batches.decoded(pred, rec.prompts, ctx, "recognizing slices"):
            probs = np.zeros((n, len(batch), h, w), np.float32)
            exist = np.full((n, len(batch)), np.nan)
            edge = np.zeros((n, len(batch), h, w), np.float32) if rec.edges else None
            for j, o in enumerate(outs):
                probs[j] = o.probability
                if o.existence is not None:
                    exist[j] = o.existence
                if edge is not None and o.edges is not None:
                    edge[j] = o.edges
            out = rec.slices(probs, exist, edge)
            sl = slice(batch[0], batch[-1] + 1)
            labels[sl], win[sl], scores[:, sl] = out.labels, out.probability, out.scores
            if edges is not None and out.edges is not None:
                edges[sl] = out.edges
    except Cancelled as exc:
        if batches.done == first:
            raise
        cancelled = exc
    idx = batches.done
    seconds = (time.perf_counter() - t0) / max(1, n)
    split = rec.instances(labels, edges)
    held = np.stack([np.bincount(s.ravel(), minlength=n + 1) > 0 for s in labels])  # (slice, label): present
    make = pred._results()
    for t in range(n):
        on_slice = held[:, t + 1]
        if not on_slice.any():
            continue
        sc = scores[t][on_slice]
        existence = float(np.nanmax(sc)) if np.isfinite(sc).any() else None
        extra: dict[str, Any] = {"name": rec.names[t], "recognition": dict(rec.info)}
        r = make.make(rec.prompts[t], Recognized(labels, win, t + 1), None, extra, pred.spec.threshold, True,
                      seconds, detect=False)
        r.existence = existence
        r.provenance["existence"] = None if existence is None else round(existence, 4)
        r.provenance["recognition"] = rec.info.get("rules", "")
        r.present, r.message = True, ""
        if t in split:
            r.instances = volume.to_input_grid(split[t].astype(np.int32))
            r.extra["instance_count"] = int(np.unique(split[t]).size - (split[t] == 0).any())
        r.objects = detect_objects(volume, r.mask, r.name, r.instances)
        if cancelled is not None:
            mark_partial(r, first, idx, stop)
        results.append(r)
    pred._log(f"Recognition: {len(results)} of {n} targets found"
              + (f" (cancelled after slices {first}:{idx})." if cancelled is not None else "."))
