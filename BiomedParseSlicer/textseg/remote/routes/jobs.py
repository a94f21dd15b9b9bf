"""Jobs: ``POST /v1/jobs`` (checked here, run by a worker), ``GET /v1/jobs`` (this client's), ``GET
/v1/jobs/{id}`` (state and progress, long poll) and ``DELETE /v1/jobs/{id}`` (cancel)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from ...errors import UsageError
from ..api_errors import ApiError
from ..settings import Settings
from ..wire import (
    FINAL_STATES,
    JOB_FIELDS,
    PROBABILITY_MODES,
    UINT8,
    VOLUME_NOT_FOUND,
    WEIGHTS_MISSING,
    prompt_limits_error,
)
from .common import NOT_HELD, caller, check_sha, manager, owned_job, read_json

router = APIRouter()


@router.post("/v1/jobs", status_code=202)
async def create_job(request: Request):
    m, who = manager(request), caller(request)
    body = await read_json(request, m.settings.max_json_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The job must be a JSON object.")
    req = check_request(body, m.settings)
    volume = m.get_volume(check_sha(str(req["volume"] or "")), who.owner)
    job = None if volume is None else m.submit(volume, req, who.owner)  # submit checks again, under the lock
    if job is None:
        raise ApiError(404, VOLUME_NOT_FOUND, NOT_HELD)
    return job.to_dict(who.admin)


@router.get("/v1/jobs")
async def list_jobs(request: Request):
    m, who = manager(request), caller(request)
    with m.lock:
        jobs = [j for j in m.jobs.values() if who.admin or j.owner == who.owner]
    return {"jobs": [j.to_dict(who.admin) for j in sorted(jobs, key=lambda j: j.created)]}


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, wait: float = 0.0, version: int = -1):
    job = owned_job(request, job_id, manage=True)
    deadline = time.monotonic() + min(max(wait, 0.0), 30.0)
    while job.version == version and job.state not in FINAL_STATES and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return job.to_dict(caller(request).admin)


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    job = owned_job(request, job_id, manage=True)
    manager(request).cancel(job)
    return job.to_dict(caller(request).admin)


def check_request(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Validate a job request; returns the normalized request sent to a worker."""
    from ...catalog import get_model
    from ...prompts import parse_prompts
    from ...weights import is_ready

    allowed = set(JOB_FIELDS)
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, "invalid_request", f"Unknown job field(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "invalid_request", "A job needs 'model' (see GET /v1/models).")
    try:
        spec = get_model(model)
    except UsageError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    if spec.hidden and not (settings.show_test_models or os.environ.get("TEXTSEG_SHOW_TEST_MODELS") == "1"):
        raise ApiError(404, "unknown_model", f"Unknown model '{model}'. See GET /v1/models.")
    if not is_ready(spec, Path(settings.weights_dir) if settings.weights_dir else None):
        raise ApiError(409, WEIGHTS_MISSING,
                       f"The server does not have the weights of model '{model}'; its administrator "
                       f"must run `textseg models download {model}` on the server.")
    prompts = body.get("prompts") or []
    if not isinstance(prompts, list):
        raise ApiError(400, "invalid_request", "'prompts' must be a list of text or {text, box, points, point_labels}.")
    too_many = prompt_limits_error(prompts)
    if too_many:
        raise ApiError(400, "too_many_prompts", too_many)
    if prompts:
        prompts = [p.to_dict() for p in parse_prompts(prompts)]
    recognize = body.get("recognize", False)
    if not isinstance(recognize, (bool, dict)):
        raise ApiError(400, "invalid_request", "'recognize' must be true, false or an object of recognition options.")
    if recognize == {}:  # an object with no options: recognition with the defaults (not false)
        recognize = True
    if recognize and prompts:
        raise ApiError(400, "invalid_request", "A recognition job finds the model's targets itself: send no 'prompts'.")
    if recognize and not spec.recognition:
        raise ApiError(400, "no_recognition",
                       f"Model '{model}' has no recognition ('segment everything'); send prompts.")
    probs = body.get("probabilities", UINT8)
    if probs not in PROBABILITY_MODES:
        raise ApiError(400, "invalid_request", f"'probabilities' must be one of {', '.join(PROBABILITY_MODES)}.")
    slices = body.get("slices")
    if slices is not None and not (isinstance(slices, list) and len(slices) == 2
                                   and all(isinstance(s, int) and not isinstance(s, bool) for s in slices)):
        raise ApiError(400, "invalid_request", "'slices' must be [first, stop] (two integers).")
    for key in ("modality", "site"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ApiError(400, "invalid_request", f"'{key}' must be a string.")
    thr = body.get("threshold")
    # a JSON number in 0..1: NaN (which Python's JSON reads) would mask every voxel above 0, true would be 1.0
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1):
        raise ApiError(400, "invalid_request",
                       "'threshold' must be a number between 0 and 1 (or null: the model's own threshold).")
    keep_absent = body.get("keep_absent", False)
    if not isinstance(keep_absent, bool) and keep_absent is not None:  # "false" would read as true
        raise ApiError(400, "invalid_request", "'keep_absent' must be true or false.")
    return {"volume": body.get("volume"), "model": model, "modality": body.get("modality"), "site": body.get("site"),
            "slices": slices, "prompts": prompts, "threshold": thr, "keep_absent": bool(keep_absent),
            "probabilities": probs, "recognize": recognize}
