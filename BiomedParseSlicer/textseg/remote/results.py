"""A finished job's files: its ``.seg.nrrd`` (written on first request), gzipped copies, and re-thresholds
computed from the probability maps it kept."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any, Optional

from ..analysis.confidence import DEFAULT_BAND
from .api_errors import ApiError, disk_full_error
from .backend import disk_full
from .jobs import Job

_SEG_LOCK = threading.Lock()


def gzipped(path: Path) -> Path:
    """``path`` + .gz (gzip level 1), written once, atomically."""
    import gzip

    gz = path.with_name(path.name + ".gz")
    with _SEG_LOCK:
        if not gz.exists():
            tmp = gz.with_name(gz.name + ".tmp")
            try:
                with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, gz)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                if disk_full(exc):
                    raise disk_full_error("the compressed result") from None
                raise
    return gz


def seg_nrrd_path(job: Job) -> Path:
    """The job's .seg.nrrd, written (once, atomically) with textseg.formats.segments from its arrays."""
    import numpy as np

    from ..formats.segments import segments_from_results, write_seg_nrrd
    from ..volume import Volume
    from .wire import decode_mask, load_npz, result_from_record

    path = job.dir / "result.seg.nrrd"
    with _SEG_LOCK:
        if not path.exists():
            meta = job.meta or {}
            shape = meta["shape"]
            arrays = load_npz((job.dir / "arrays.npz").read_bytes())
            results = [result_from_record(r, decode_mask(arrays, r["index"], shape), None) for r in meta["results"]]
            reference = Volume.from_geometry(np.zeros(shape, np.uint8), job.volume.geometry)
            try:
                write_seg_nrrd(path, reference, segments_from_results(results))  # atomic: no partial file stays
            except OSError as exc:
                if disk_full(exc):
                    raise disk_full_error("the job's .seg.nrrd") from None
                raise
    return path



def rethreshold(job: Job, threshold: float, segments: Optional[list] = None, keep_absent: Optional[bool] = None,
                band: float = DEFAULT_BAND) -> dict[str, Any]:
    """New masks of a finished job's segments at ``threshold``, from the probability maps it kept, without
    running the model: textseg.analysis.confidence's rule (``ModelAnswer.mask_at``: the run's own mask at the
    run's threshold, a target the existence test dropped stays empty unless ``keep_absent``; default: the job's
    ``keep_absent``), with the model's confidence in each. ``segments``: result indices or names (default all).
    ApiError 409 when the job kept no maps (it ran with probabilities "none"), 400 for an unknown segment."""
    import numpy as np

    from ..analysis.confidence import ModelAnswer, check_threshold
    from .wire import NO_MAPS, decode_mask, decode_probability, has_probability, rethreshold_record

    t = check_threshold(threshold)
    meta = job.meta or {}
    records = meta["results"]
    if not records:
        raise ApiError(404, "no_result", "This job produced no segments (no prompts, or cancelled before the first).")
    chosen = _chosen(records, segments)
    if keep_absent is None:
        keep_absent = bool(job.request.get("keep_absent"))
    shape = meta["shape"]
    out = []
    with np.load(job.dir / "arrays.npz", allow_pickle=False) as arrays:
        if not all(r["probability"] and has_probability(arrays, r["index"]) for r in chosen):
            raise ApiError(409, NO_MAPS,
                           f"Job {job.id} kept no probability maps (it ran with probabilities "
                           f"'{job.request.get('probabilities')}'), so it cannot be re-thresholded without running "
                           "the model again. Run it with probabilities 'uint8' (the default) to re-threshold later.")
        for r in chosen:
            n = r["index"]
            mask = decode_mask(arrays, n, shape)
            answer = ModelAnswer.from_uint8(decode_probability(arrays, n, shape, keep_uint8=True), mask,
                                            r["provenance"]["threshold"], r["existence"],
                                            dropped=not r["present"] and not mask.any())
            new = answer.mask_at(t, keep_absent)
            out.append(rethreshold_record(r, new, t, answer.confidence(new, t, band)))
    return {"job": job.id, "threshold": t, "band": band, "keep_absent": keep_absent, "shape": list(shape),
            "results": out}


def _chosen(records: list[dict[str, Any]], segments: Optional[list]) -> list[dict[str, Any]]:
    """The records ``segments`` names (indices or result names), in that order; all by default."""
    from ..prompts import Prompt

    if segments is None:
        return list(records)
    names = {}
    for r in records:
        names.setdefault((r.get("extra") or {}).get("name") or Prompt.from_any(r["prompt"]).label, r)
    chosen, seen = [], set()
    for s in segments:
        r = records[s] if isinstance(s, int) and not isinstance(s, bool) and 0 <= s < len(records) else (
            names.get(s) if isinstance(s, str) else None)
        if r is None:
            shown = ", ".join(repr(n) for n in list(names)[:20])
            raise ApiError(400, "unknown_segment",
                           f"This job has no segment {str(s)[:80]!r}: give result indices 0..{len(records) - 1} "
                           f"or names ({shown}).")
        # each segment once: a list naming one segment thousands of times would cost a full mask each
        if r["index"] in seen:
            shown = s if isinstance(s, int) else repr(s[:80])
            raise ApiError(400, "invalid_request",
                           f"Segment {shown} is asked for twice (by index or name): ask for each segment once.")
        seen.add(r["index"])
        chosen.append(r)
    return chosen
