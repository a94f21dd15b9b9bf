"""What the routes share: the server's state on the app, the caller, and the checks of names, jobs and bodies."""

from __future__ import annotations

import json
from typing import Any

from ..api_errors import ApiError
from ..auth import Caller
from ..jobs import Job, JobManager
from ..settings import Settings
from ..wire import FAILED

_HEX = set("0123456789abcdef")
NOT_HELD = ("The server does not hold this volume for this client (never uploaded by it, or expired): upload it "
            "again.")


def manager(request) -> JobManager:
    return request.app.state.manager


def settings(request) -> Settings:
    return request.app.state.manager.settings


def caller(request) -> Caller:
    """Who sent the request (set by auth.Guard before any route runs)."""
    return request.state.caller


def check_sha(sha: str) -> str:
    sha = sha.lower()
    if len(sha) != 64 or not set(sha) <= _HEX:
        raise ApiError(400, "invalid_request", "A volume is named by the sha256 (64 hex digits) of its NRRD bytes.")
    return sha


def owned_job(request, job_id: str, manage: bool = False) -> Job:
    """The caller's job (an admin may also see and cancel, ``manage``, any other); 404 otherwise, as for a job
    that does not exist, so that job ids of others cannot even be confirmed."""
    m, who = manager(request), caller(request)
    s = m.settings
    job = m.jobs.get(job_id)
    if job is not None and (job.owner == who.owner or (manage and who.admin)):
        return job
    if m.dropped.get(job_id) == who.owner:
        raise ApiError(404, "job_not_found", f"Job {job_id} was removed: this server keeps at most "
                       f"{s.max_results_per_client} results "
                       f"({s.max_result_bytes_per_client / 2**20:,.0f} MiB) "
                       "per client and drops the oldest. Run it again.")
    raise ApiError(404, "job_not_found",
                   f"No job {job_id[:64]} for this client on this server (never created, or its "
                   f"result expired after {s.result_ttl:g} s).")


def finished(job: Job) -> dict[str, Any]:
    """A finished job's result metadata; 409 while it runs or after it failed, 404 once its files are gone."""
    if job.state == FAILED:
        raise ApiError(409, "job_failed", f"The job failed: {job.error['message'] if job.error else ''}")
    if job.meta is None:
        raise ApiError(409, "not_ready", f"The job is {job.state}; its result is not available.")
    # checked here: a FileResponse failing mid-response drops the connection
    if not (job.dir / "arrays.npz").is_file():
        raise ApiError(404, "result_missing",
                       "This job's result files are no longer on the server; run the job again.")
    return job.meta


async def read_json(request, limit: int, what: str = "job") -> Any:
    """The request body as JSON: Content-Type application/json (415: a browser form or text/plain post is not
    a request of this API), at most ``limit`` bytes (413), nesting Python can parse (400)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"A {what} is a JSON object sent with 'Content-Type: application/json'.")
    too_big = ApiError(413, "too_large", f"The {what}'s JSON is larger than this server accepts ({limit:,} bytes).")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "invalid_request", f"The {what}'s JSON is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_request", f"The {what} must be a JSON object.") from None
