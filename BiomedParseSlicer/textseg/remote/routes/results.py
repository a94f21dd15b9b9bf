"""A finished job's results: ``result.json`` (per-prompt records), ``result`` (the .seg.nrrd), ``arrays`` (masks
and probability maps as .npz) and ``rethreshold`` (new masks from the kept maps, without running the model)."""

from __future__ import annotations

import gzip
import json

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from ...analysis.confidence import DEFAULT_BAND, check_band, check_threshold
from ...errors import UsageError
from ..api_errors import ApiError
from ..results import gzipped, rethreshold, seg_nrrd_path
from ..wire import RETHRESHOLD_FIELDS
from .common import finished, owned_job, read_json

router = APIRouter()
MAX_RETHRESHOLD_JSON = 64 << 10  # a re-threshold request: a threshold, a band and up to ~1000 segment names


@router.get("/v1/jobs/{job_id}/result.json")
async def result_json(job_id: str, request: Request):
    job = owned_job(request, job_id)
    return {**finished(job), "job": job.to_dict()}


@router.get("/v1/jobs/{job_id}/result")
async def result_seg(job_id: str, request: Request):
    job = owned_job(request, job_id)
    if not finished(job)["results"]:
        raise ApiError(404, "no_result",
                       "This job produced no segments (no prompts, or cancelled before the first).")
    path = await run_in_threadpool(seg_nrrd_path, job)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{job.id}.seg.nrrd")


@router.get("/v1/jobs/{job_id}/arrays")
async def result_arrays(job_id: str, request: Request):
    job = owned_job(request, job_id)
    finished(job)
    if "gzip" in request.headers.get("accept-encoding", ""):
        try:
            path = await run_in_threadpool(gzipped, job.dir / "arrays.npz")
            return FileResponse(path, media_type="application/octet-stream", headers={"Content-Encoding": "gzip"})
        except ApiError as exc:
            if exc.code != "disk_full":
                raise  # no room for the compressed copy: the result goes out as it is
    return FileResponse(job.dir / "arrays.npz", media_type="application/octet-stream")


@router.post("/v1/jobs/{job_id}/rethreshold")
async def rethreshold_job(job_id: str, request: Request):
    """``{"threshold": t, "segments": [index or name, ...], "keep_absent": bool, "band": b}`` -> per segment its
    new mask (base64 of the bit-packed voxels) and the model's confidence in it; the job is not changed."""
    job = owned_job(request, job_id)
    body = await read_json(request, MAX_RETHRESHOLD_JSON, "re-threshold request")
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The re-threshold request must be a JSON object.")
    unknown = set(body) - set(RETHRESHOLD_FIELDS)
    if unknown:
        raise ApiError(400, "invalid_request",
                       f"Unknown re-threshold field(s) {sorted(unknown)[:10]}; allowed: {list(RETHRESHOLD_FIELDS)}.")
    if "threshold" not in body:
        raise ApiError(400, "invalid_request", "A re-threshold needs 'threshold' (a probability between 0 and 1).")
    threshold = _fraction(body["threshold"], "Threshold", check_threshold)
    band = DEFAULT_BAND if body.get("band") is None else _fraction(body["band"], "Band", check_band)
    segments = body.get("segments")
    if segments is not None and not (isinstance(segments, list) and len(segments) <= 10000):
        raise ApiError(400, "invalid_request", "'segments' must be a list of result indices or names.")
    keep_absent = body.get("keep_absent")
    if keep_absent is not None and not isinstance(keep_absent, bool):
        raise ApiError(400, "invalid_request", "'keep_absent' must be true or false.")
    finished(job)
    out = await run_in_threadpool(rethreshold, job, threshold, segments, keep_absent, band)
    data = json.dumps(out).encode()
    if "gzip" in request.headers.get("accept-encoding", "") and len(data) > 1024:  # masks compress well
        data = await run_in_threadpool(gzip.compress, data, 1)
        return Response(data, media_type="application/json", headers={"Content-Encoding": "gzip"})
    return Response(data, media_type="application/json")


def _fraction(value, what: str, check) -> float:
    """A JSON number in 0..1 (``check``: its rule and message), checked here whatever the job holds: a string,
    true or an integer too large for a float is a 400, never a value taken as it comes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, "invalid_request",
                       f"{what} '{str(value)[:40]}' is not a number; give a JSON number between 0 and 1.")
    try:
        return check(value)
    except UsageError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
