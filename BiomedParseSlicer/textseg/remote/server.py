"""``textseg serve``: the inference server (FastAPI + uvicorn). See docs/server.md.

    PUT    /v1/volumes/{sha256}         upload a NRRD image (raw or Content-Encoding: gzip) once
    HEAD   /v1/volumes/{sha256}         200 if this client has uploaded it (and it is still held), 404 otherwise
    POST   /v1/jobs                     {volume, model, modality, site, slices, prompts, ...} -> 202
    GET    /v1/jobs                     this client's jobs (an admin key: every job, with its owner)
    GET    /v1/jobs/{id}?wait=&version= state, stage, progress (long poll)
    DELETE /v1/jobs/{id}                cancel (completed prompts are kept)
    GET    /v1/jobs/{id}/result         the .seg.nrrd (segments, names, provenance tags)
    GET    /v1/jobs/{id}/result.json    per-prompt metadata (prompt, existence, present, message, ...)
    GET    /v1/jobs/{id}/arrays         masks (bit-packed) and probabilities as .npz (gzip if accepted)
    POST   /v1/jobs/{id}/rethreshold    {threshold, segments} -> new masks and confidence, from the kept maps
    GET    /v1/health, /health, /v1/models, /v1/workers

Jobs and uploaded images belong to the client that made them (its key, plus the client token it
sends); a client sees only its own. Jobs run on one worker process per device
(textseg.remote.workers) or Ray Serve replica (textseg.remote.ray_backend), both behind
textseg.remote.backend's ``Worker`` interface, fed from a bounded queue; a worker that stops answering
is replaced.

Where the parts live: ``settings`` (Settings, API keys), ``auth`` (callers, the checks of every
request), ``jobs`` (volumes, jobs, the queue, the JobManager), ``results`` (a finished job's files and
re-thresholds), ``routes/`` (one router per resource), ``api_errors`` (error answers).
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Optional

from .. import __version__
from ..errors import TextsegError, UsageError
from .api_errors import ERROR_STATUS, ApiError, error_response
from .auth import Caller, Guard
from .jobs import Job, JobManager
from .results import seg_nrrd_path
from .routes.jobs import check_request as _check_request
from .settings import ClientKey, Settings, all_keys, key_problem, read_keys_file
from .wire import UploadTooLarge, is_loopback

__all__ = ["ApiError", "Caller", "ClientKey", "Job", "JobManager", "Settings", "_check_request", "create_app",
           "is_loopback", "key_problem", "read_keys_file", "run", "running_server", "seg_nrrd_path"]
log = logging.getLogger("textseg.server")


def create_app(settings: Settings):
    """The FastAPI application. Refuses to run without a (strong) API key on a non-loopback address."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .routes import jobs, results, service, volumes

    keys = all_keys(settings)
    if not keys and not is_loopback(settings.host, resolve=True):
        raise UsageError(f"Serving on {settings.host} (not loopback) needs an API key: pass --api-key-file (or "
                         f"--api-key, TEXTSEG_API_KEY) or --keys-file, and put a TLS reverse proxy in front (see "
                         f"docs/server.md).")
    manager = JobManager(settings)

    @asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="textseg inference server", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.manager = manager
    app.state.keys = keys
    app.add_middleware(Guard, settings=settings, keys=keys)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(TextsegError)
    async def _textseg_error(request, exc: TextsegError):
        if isinstance(exc, UploadTooLarge):
            return error_response(413, "too_large", str(exc))
        return error_response(ERROR_STATUS.get(type(exc).__name__, 400), type(exc).__name__, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return error_response(422, "invalid_request", "Invalid request: " + "; ".join(parts))

    for module in (service, volumes, jobs, results):
        app.include_router(module.router)
    return app


# ---- running ---------------------------------------------------------------------------------------
def _http_base() -> type:
    """The HTTP protocol uvicorn's "auto" picks: httptools when installed, else h11."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        return H11Protocol


def header_deadline_protocol(seconds: float, base: Optional[type] = None) -> type:
    """uvicorn's HTTP protocol (``base``: default as uvicorn's "auto") with a deadline for request headers,
    which uvicorn does not have: a connection that sends nothing, or dribbles its headers, would otherwise hold
    a socket for ever (slowloris). The deadline runs from the connection or from the first byte of a request
    until its headers are complete (the request cycle starts); a connection over it is closed. Bodies have
    their own limits (``body_timeout``, ``min_body_rate``), idle keep-alive connections uvicorn's."""
    base = base or _http_base()

    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        _deadline = None

        def _waiting(self) -> bool:  # no request cycle whose headers are complete and whose answer is pending
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None and seconds > 0:
                self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self._waiting() and not self.transport.is_closing():
                log.info("closed a connection from %s: no complete request headers in %g s", self.client, seconds)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting():
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def run(settings: Settings) -> None:
    """Serve until interrupted (uvicorn, one process; inference runs in the worker processes)."""
    import uvicorn

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_keep_alive=30, http=header_deadline_protocol(settings.header_timeout))


@contextmanager
def running_server(settings: Settings, ready_timeout: float = 120.0) -> Iterator[str]:
    """Run a real uvicorn server in a background thread (tests, benchmarks); yields its URL.

    Waits until every worker is ready. ``settings.port`` 0 picks a free port."""
    import socket

    import uvicorn

    if settings.port == 0:
        with socket.socket() as s:
            s.bind((settings.host, 0))
            settings.port = s.getsockname()[1]
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                           lifespan="on", http=header_deadline_protocol(settings.header_timeout)))
    thread = threading.Thread(target=server.run, name="textseg-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    manager: JobManager = app.state.manager
    while time.monotonic() < deadline:
        if server.started and manager.workers and all(w.ready for w in manager.workers):
            break
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    else:
        server.should_exit = True
        raise RuntimeError("the server's workers did not become ready in time")
    try:
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(30)
