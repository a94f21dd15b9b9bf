"""The service itself: ``/health`` (public), the models it offers, its workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ..auth import Caller
from ..settings import Settings
from ..wire import API_VERSION
from .common import caller, manager

router = APIRouter()


@router.get("/health")
@router.get("/v1/health")
async def health(request: Request):
    m = manager(request)
    settings = m.settings
    infos = [w.info() for w in m.workers]
    alive = sum(1 for i in infos if i["alive"])
    ready = sum(1 for i in infos if i["alive"] and i["ready"] and i.get("responsive", True))
    if infos and ready == len(infos):
        status = "ok"
    elif ready:
        status = "degraded"  # some workers are starting again or not answering
    else:
        status = "unavailable" if any(i["restarts"] for i in infos) else "starting"
    body = {"status": status, "textseg": __version__, "api": API_VERSION, "auth": bool(request.app.state.keys),
            "workers": len(infos), "workers_alive": alive, "workers_ready": ready,
            "queue": {"waiting": len(m.queue), "max": settings.queue_size},
            "max_upload_bytes": settings.max_upload_bytes, "session_ttl": settings.session_ttl,
            "result_ttl": settings.result_ttl}
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "2"})


@router.get("/v1/models")
async def models(request: Request):
    return {"models": await run_in_threadpool(model_list, manager(request).settings)}


@router.get("/v1/workers")
async def workers(request: Request):
    who = caller(request)
    out = []
    for w in manager(request).workers:
        info, job = w.info(), w.job
        if who.admin:
            info["owner"] = Caller.label(job.owner) if job is not None else None
        else:  # another client's job id is a handle on its data: name only the caller's own
            info["busy"] = job is not None
            info["job"] = job.id if job is not None and job.owner == who.owner else None
        out.append(info)
    return {"workers": out}


def model_list(settings: Settings) -> list[dict[str, Any]]:
    from ...catalog import list_models
    from ...weights import is_ready

    wdir = Path(settings.weights_dir) if settings.weights_dir else None
    out = []
    for spec in list_models(include_hidden=settings.show_test_models):
        d = spec.to_dict()
        d["ready"] = is_ready(spec, wdir)
        out.append(d)
    return out
