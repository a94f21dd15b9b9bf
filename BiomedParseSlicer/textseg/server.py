"""``textseg serve``: the inference server (FastAPI + uvicorn). See docs/server.md.

    PUT    /v1/volumes/{sha256}         upload a NRRD image (raw or Content-Encoding: gzip) once
    HEAD   /v1/volumes/{sha256}         200 if the server holds it, 404 otherwise
    POST   /v1/jobs                     {volume, model, modality, site, slices, prompts, ...} -> 202
    GET    /v1/jobs/{id}?wait=&version= state, stage, progress (long poll)
    DELETE /v1/jobs/{id}                cancel (completed prompts are kept)
    GET    /v1/jobs/{id}/result         the .seg.nrrd (segments, names, provenance tags)
    GET    /v1/jobs/{id}/result.json    per-prompt metadata (prompt, existence, present, message, ...)
    GET    /v1/jobs/{id}/arrays         masks (bit-packed) and probabilities as .npz (gzip if accepted)
    GET    /v1/health, /health, /v1/models, /v1/workers

Jobs run on one worker process per device (textseg.server_workers) behind a bounded queue.
"""


import asyncio
import hmac
import ipaddress
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import __version__
from .errors import TextsegError, UsageError
from .wire import API_HEADER, API_VERSION, PROBABILITY_MODES, VERSION_HEADER, nrrd_to_volume, version_mismatch_message

log = logging.getLogger("textseg.server")
_HEX = set("0123456789abcdef")
FINAL = ("done", "failed", "cancelled")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    api_key: Optional[str] = None  # required unless host is a loopback address
    devices: Tuple[str, ...] = ("auto",)  # one worker process per entry
    preload: Tuple[str, ...] = ()
    queue_size: int = 16  # queued jobs (not counting running ones); full -> 429
    session_ttl: float = 3600.0  # seconds an uploaded volume lives after its last use
    result_ttl: float = 3600.0  # seconds a finished job and its result are kept
    max_upload_bytes: int = 2 << 30  # decoded NRRD size
    work_dir: Optional[str] = None  # default: a private temp folder removed at shutdown
    show_test_models: bool = False  # offer hidden test-only adapters (tests only; or TEXTSEG_SHOW_TEST_MODELS=1)
    adapter_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # server-side, per model
    weights_dir: Optional[str] = None
    ray: bool = False
    ray_options: Dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# ---- state ---------------------------------------------------------------------------------------
@dataclass
class StoredVolume:
    sha: str
    path: Path
    geometry: Dict[str, Any]
    shape: Tuple[int, ...]
    dtype: str
    last_used: float = field(default_factory=time.monotonic)


class Job:
    def __init__(self, manager: "JobManager", volume: StoredVolume, request: Dict[str, Any]):
        self.manager = manager
        self.id = uuid.uuid4().hex
        self.volume = volume
        self.request = request
        self.state = "queued"
        self.stage = "queued"
        self.progress = 0.0
        self.error: Optional[Dict[str, str]] = None
        self.meta: Optional[Dict[str, Any]] = None
        self.device: Optional[str] = None
        self.created = time.time()
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self.finished_mono: Optional[float] = None
        self.cancel_requested = False
        self.version = 0
        self.dir = manager.jobs_dir / self.id

    def payload(self) -> Dict[str, Any]:
        return {**self.request, "id": self.id, "volume_path": str(self.volume.path), "geometry": self.volume.geometry,
                "out_dir": str(self.dir)}

    def _bump(self) -> None:
        self.version += 1

    def start(self, device: str) -> None:
        self.state, self.stage, self.device, self.started = "running", "starting", device, time.time()
        self.volume.last_used = time.monotonic()
        self._bump()

    def set_progress(self, fraction: float, stage: str) -> None:
        self.progress, self.stage = max(self.progress, min(max(fraction, 0.0), 1.0)), stage
        self._bump()

    def _final(self, state: str) -> None:
        self.state, self.finished, self.finished_mono = state, time.time(), time.monotonic()
        self.volume.last_used = time.monotonic()
        if self.started:
            self.manager.record_duration(self.finished - self.started)
        self._bump()

    def finish(self, meta: Dict[str, Any]) -> None:
        self.meta = meta
        n, total = len(meta["results"]), len(self.request.get("prompts") or [])
        done = sum(bool(r.get("complete", True)) for r in meta["results"])
        if meta.get("cancelled"):
            from .predictor import kept_summary

            self.stage = (f"cancelled: kept {n} target(s) found so far" if self.request.get("recognize")
                          else f"cancelled: {kept_summary(done, total, n - done)}")
            self._final("cancelled")
        else:
            self.progress, self.stage = 1.0, "done"
            self._final("done")

    def cancelled_before_results(self) -> None:
        self.stage = "cancelled"
        self._final("cancelled")

    def fail(self, kind: str, message: str) -> None:
        self.error = {"type": kind, "message": message}
        self.stage = "failed"
        self._final("failed")

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "id": self.id, "state": self.state, "stage": self.stage, "progress": round(self.progress, 4),
            "version": self.version, "volume": self.volume.sha, "model": self.request["model"],
            "prompts": len(self.request.get("prompts") or []), "device": self.device, "error": self.error,
            "created": self.created, "started": self.started, "finished": self.finished,
            "results": None if self.meta is None else len(self.meta["results"]),
            "messages": [] if self.meta is None else self.meta.get("messages", []),
            "image_reused": None if self.meta is None else self.meta.get("image_reused"),
        }
        if self.state == "queued":
            d["queue_position"] = self.manager.queue_position(self)
        return d


class BoundedQueue:
    """FIFO of queued jobs; cancelling a queued job frees its place at once."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: deque = deque()
        self.cond = threading.Condition()

    def put(self, job: Job) -> bool:
        with self.cond:
            if len(self.items) >= self.maxsize:
                return False
            self.items.append(job)
            self.cond.notify()
            return True

    def get(self, timeout: float) -> Optional[Job]:
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            return self.items.popleft() if self.items else None

    def remove(self, job: Job) -> bool:
        with self.cond:
            try:
                self.items.remove(job)
                return True
            except ValueError:
                return False

    def position(self, job: Job) -> Optional[int]:
        with self.cond:
            return self.items.index(job) if job in self.items else None

    def __len__(self) -> int:
        return len(self.items)


class JobManager:
    """Volumes, jobs, the queue, the workers and the janitor that expires old ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._own_dir = settings.work_dir is None
        self.root = Path(settings.work_dir or tempfile.mkdtemp(prefix="textseg-server-"))
        self.volumes_dir = self.root / "volumes"
        self.jobs_dir = self.root / "jobs"
        self.uploads_dir = self.root / "uploads"
        for d in (self.volumes_dir, self.jobs_dir, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.volumes: Dict[str, StoredVolume] = {}
        self.jobs: Dict[str, Job] = {}
        self.lock = threading.RLock()
        self.queue = BoundedQueue(settings.queue_size)
        self.stopping = threading.Event()
        self.durations: deque = deque(maxlen=20)
        self.workers: List[Any] = []
        self.backend = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.ray:
            from .server_ray import RayBackend

            self.backend = RayBackend(self)
            self.workers = self.backend.start()
        else:
            from .server_workers import ProcessWorker

            options = {"adapter_options": self.settings.adapter_options, "weights_dir": self.settings.weights_dir,
                       "preload": tuple(self.settings.preload), "log_level": self.settings.log_level}
            self.workers = [ProcessWorker(i, d, options, self) for i, d in enumerate(self.settings.devices)]
            for w in self.workers:
                w.start()
        threading.Thread(target=self._janitor, name="textseg-janitor", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        for w in self.workers:
            w.stop()
        if self.backend is not None:
            self.backend.stop()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- volumes ------------------------------------------------------------------------------
    def get_volume(self, sha: str, touch: bool = True) -> Optional[StoredVolume]:
        """The stored volume; ``touch`` (a job uses it) restarts its expiry clock, a HEAD does not."""
        with self.lock:
            v = self.volumes.get(sha)
            if v is not None and touch:
                v.last_used = time.monotonic()
            return v

    def add_volume(self, sha: str, upload: Path) -> StoredVolume:
        """Parse an uploaded NRRD (worker thread), keep it as .npy + geometry."""
        import numpy as np

        with open(upload, "rb") as fh:
            volume = nrrd_to_volume(fh, "The uploaded image")
        volume.check_usable("The uploaded image")
        path = self.volumes_dir / f"{sha}.npy"
        tmp = self.volumes_dir / f"{sha}.{uuid.uuid4().hex}.tmp.npy"  # two uploads of one image may race
        np.save(tmp, volume.array, allow_pickle=False)
        os.replace(tmp, path)
        geometry = {"spacing": list(volume.spacing), "origin": list(volume.origin), "direction": volume.direction.tolist()}
        sv = StoredVolume(sha, path, geometry, tuple(volume.array.shape), str(volume.array.dtype))
        with self.lock:
            self.volumes[sha] = sv
        return sv

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, volume: StoredVolume, request: Dict[str, Any]) -> Job:
        job = Job(self, volume, request)
        with self.lock:
            if not self.queue.put(job):
                raise ApiError(429, "queue_full", f"The server's queue is full ({self.settings.queue_size} jobs waiting); "
                               "retry after the time in Retry-After.", {"Retry-After": str(self.retry_after())})
            self.jobs[job.id] = job
        return job

    def next_job(self, timeout: float) -> Optional[Job]:
        return self.queue.get(timeout)

    def cancel(self, job: Job) -> None:
        with self.lock:
            if job.state in FINAL:
                return
            job.cancel_requested = True
            if self.queue.remove(job):
                job.stage = "cancelled before it started"
                job._final("cancelled")

    def queue_position(self, job: Job) -> Optional[int]:
        return self.queue.position(job)

    def record_duration(self, seconds: float) -> None:
        self.durations.append(seconds)

    def retry_after(self) -> int:
        avg = sum(self.durations) / len(self.durations) if self.durations else 2.0
        return int(min(60, max(1, math.ceil(avg * (len(self.queue) + 1) / max(1, len(self.workers))))))

    # ---- expiry --------------------------------------------------------------------------------
    def _janitor(self) -> None:
        period = max(0.2, min(30.0, self.settings.session_ttl / 4, self.settings.result_ttl / 4))
        while not self.stopping.wait(period):
            self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            old_jobs = [j for j in self.jobs.values() if j.finished_mono and now - j.finished_mono > self.settings.result_ttl]
            for j in old_jobs:
                del self.jobs[j.id]
            busy = {j.volume.sha for j in self.jobs.values() if j.state not in FINAL}
            old_vols = [v for v in self.volumes.values() if v.sha not in busy and now - v.last_used > self.settings.session_ttl]
            for v in old_vols:
                del self.volumes[v.sha]
        for j in old_jobs:
            shutil.rmtree(j.dir, ignore_errors=True)
        for v in old_vols:
            v.path.unlink(missing_ok=True)
            log.info("volume %s expired", v.sha[:12])


# ---- the HTTP app ----------------------------------------------------------------------------------
def _error(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": code, "message": message, "status": status}, status_code=status, headers=headers)


_ERROR_STATUS = {"UsageError": 400, "InputError": 400, "WeightsError": 409, "ModelError": 500, "OutputExistsError": 409}


def model_list(settings: Settings) -> List[Dict[str, Any]]:
    from .catalog import list_models
    from .weights import is_ready

    wdir = Path(settings.weights_dir) if settings.weights_dir else None
    out = []
    for spec in list_models(include_hidden=settings.show_test_models):
        d = spec.to_dict()
        d["ready"] = is_ready(spec, wdir)
        out.append(d)
    return out


def _check_request(body: Dict[str, Any], settings: Settings) -> Dict[str, Any]:
    """Validate a job request; returns the normalized request sent to a worker."""
    from .catalog import get_model
    from .prompts import parse_prompts
    from .weights import is_ready

    allowed = {"volume", "model", "modality", "site", "slices", "prompts", "threshold", "keep_absent", "probabilities",
               "recognize"}
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
        raise ApiError(409, "weights_missing", f"The server does not have the weights of model '{model}'; its administrator "
                       f"must run `textseg models download {model}` on the server.")
    prompts = body.get("prompts") or []
    if not isinstance(prompts, list):
        raise ApiError(400, "invalid_request", "'prompts' must be a list of text or {text, box, points, point_labels}.")
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
        raise ApiError(400, "no_recognition", f"Model '{model}' has no recognition ('segment everything'); send prompts.")
    probs = body.get("probabilities", "uint8")
    if probs not in PROBABILITY_MODES:
        raise ApiError(400, "invalid_request", f"'probabilities' must be one of {', '.join(PROBABILITY_MODES)}.")
    slices = body.get("slices")
    if slices is not None and not (isinstance(slices, list) and len(slices) == 2 and all(isinstance(s, int) for s in slices)):
        raise ApiError(400, "invalid_request", "'slices' must be [first, stop] (two integers).")
    for key in ("modality", "site"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ApiError(400, "invalid_request", f"'{key}' must be a string.")
    thr = body.get("threshold")
    if thr is not None and not isinstance(thr, (int, float)):
        raise ApiError(400, "invalid_request", "'threshold' must be a number.")
    return {"volume": body.get("volume"), "model": model, "modality": body.get("modality"), "site": body.get("site"),
            "slices": slices, "prompts": prompts, "threshold": thr, "keep_absent": bool(body.get("keep_absent", False)),
            "probabilities": probs, "recognize": recognize}


def create_app(settings: Settings):
    """The FastAPI application. Refuses to run without an API key on a non-loopback address."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if not settings.api_key and not is_loopback(settings.host):
        raise UsageError(f"Serving on {settings.host} (not loopback) needs an API key: pass --api-key or set "
                         "TEXTSEG_API_KEY, and put a TLS reverse proxy in front (see docs/server.md).")
    manager = JobManager(settings)

    @asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="textseg inference server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager
    public = {"/health", "/v1/health"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        api = request.headers.get(API_HEADER)
        if api is not None and api != str(API_VERSION):
            return _error(426, "version_mismatch", version_mismatch_message(api, request.headers.get(VERSION_HEADER, "")))
        if settings.api_key and request.url.path not in public:
            auth = request.headers.get("authorization", "")
            if not auth:
                return _error(401, "unauthorized", "This server needs an API key: send 'Authorization: Bearer <key>' "
                              "(textseg: --api-key or TEXTSEG_API_KEY).", {"WWW-Authenticate": "Bearer"})
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                return _error(403, "forbidden", "The API key was refused by the server; check --api-key / TEXTSEG_API_KEY.")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(TextsegError)
    async def _textseg_error(request, exc: TextsegError):
        return _error(_ERROR_STATUS.get(type(exc).__name__, 400), type(exc).__name__, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "invalid_request", "Invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        ref = uuid.uuid4().hex[:8]
        log.exception("internal error %s on %s %s", ref, request.method, request.url.path)
        return _error(500, "internal", f"Internal server error (reference {ref} in the server log).")

    # ---- service ---------------------------------------------------------------------------
    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        alive = sum(1 for w in manager.workers if w.info()["alive"])
        return {"status": "ok" if alive else "starting", "textseg": __version__, "api": API_VERSION,
                "auth": bool(settings.api_key), "workers": len(manager.workers), "workers_alive": alive,
                "queue": {"waiting": len(manager.queue), "max": settings.queue_size},
                "max_upload_bytes": settings.max_upload_bytes, "session_ttl": settings.session_ttl,
                "result_ttl": settings.result_ttl}

    @app.get("/v1/models")
    async def models():
        return {"models": await run_in_threadpool(model_list, settings)}

    @app.get("/v1/workers")
    async def workers():
        return {"workers": [w.info() for w in manager.workers]}

    # ---- volumes -----------------------------------------------------------------------------
    def _sha(sha: str) -> str:
        sha = sha.lower()
        if len(sha) != 64 or not set(sha) <= _HEX:
            raise ApiError(400, "invalid_request", "A volume is named by the sha256 (64 hex digits) of its NRRD bytes.")
        return sha

    @app.head("/v1/volumes/{sha}")
    @app.get("/v1/volumes/{sha}")
    async def volume_info(sha: str):
        v = manager.get_volume(_sha(sha), touch=False)
        if v is None:
            raise ApiError(404, "volume_not_found", "The server does not hold this volume (never uploaded, or expired): upload it again.")
        return {"volume": v.sha, "shape": list(v.shape), "dtype": v.dtype, **v.geometry}

    @app.put("/v1/volumes/{sha}", status_code=201)
    async def upload(sha: str, request: Request):
        sha = _sha(sha)
        known = manager.get_volume(sha)
        if known is not None:
            return JSONResponse({"volume": sha, "known": True}, status_code=200)
        limit = settings.max_upload_bytes
        enc = request.headers.get("content-encoding", "identity").lower()
        if enc not in ("identity", "gzip"):
            raise ApiError(415, "unsupported_encoding", f"Content-Encoding '{enc}' is not supported; send raw or gzip.")
        tmp = manager.uploads_dir / f"{uuid.uuid4().hex}.nrrd"
        try:
            digest, size = await _receive(request, tmp, enc == "gzip", limit)
            if digest != sha:
                raise ApiError(400, "hash_mismatch", f"The upload's sha256 is {digest}, not {sha} as named: the body was changed "
                               "or truncated in transit. Upload it again.")
            v = await run_in_threadpool(manager.add_volume, sha, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return {"volume": v.sha, "known": False, "shape": list(v.shape), "dtype": v.dtype, "bytes": size}

    # ---- jobs ----------------------------------------------------------------------------------
    def _job(job_id: str) -> Job:
        job = manager.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"No job {job_id} on this server (never created, or its result expired "
                           f"after {settings.result_ttl:g} s).")
        return job

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_request", "The job must be a JSON object.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request", "The job must be a JSON object.")
        req = _check_request(body, settings)
        volume = manager.get_volume(_sha(str(req["volume"] or "")))
        if volume is None:
            raise ApiError(404, "volume_not_found", "The server does not hold this volume (never uploaded, or expired): upload it again.")
        return manager.submit(volume, req).to_dict()

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, wait: float = 0.0, version: int = -1):
        job = _job(job_id)
        deadline = time.monotonic() + min(max(wait, 0.0), 30.0)
        while job.version == version and job.state not in FINAL and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return job.to_dict()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = _job(job_id)
        manager.cancel(job)
        return job.to_dict()

    def _finished(job: Job) -> Dict[str, Any]:
        if job.state == "failed":
            raise ApiError(409, "job_failed", f"The job failed: {job.error['message'] if job.error else ''}")
        if job.meta is None:
            raise ApiError(409, "not_ready", f"The job is {job.state}; its result is not available.")
        if not (job.dir / "arrays.npz").is_file():  # checked here: a FileResponse failing mid-response drops the connection
            raise ApiError(404, "result_missing", "This job's result files are no longer on the server; run the job again.")
        return job.meta

    @app.get("/v1/jobs/{job_id}/result.json")
    async def result_json(job_id: str):
        job = _job(job_id)
        return {**_finished(job), "job": job.to_dict()}

    @app.get("/v1/jobs/{job_id}/result")
    async def result_seg(job_id: str):
        job = _job(job_id)
        if not _finished(job)["results"]:
            raise ApiError(404, "no_result", "This job produced no segments (no prompts, or cancelled before the first).")
        path = await run_in_threadpool(seg_nrrd_path, job)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job.id}.seg.nrrd")

    @app.get("/v1/jobs/{job_id}/arrays")
    async def result_arrays(job_id: str, request: Request):
        job = _job(job_id)
        _finished(job)
        if "gzip" in request.headers.get("accept-encoding", ""):
            path = await run_in_threadpool(_gzipped, job.dir / "arrays.npz")
            return FileResponse(path, media_type="application/octet-stream", headers={"Content-Encoding": "gzip"})
        return FileResponse(job.dir / "arrays.npz", media_type="application/octet-stream")

    return app


_SEG_LOCK = threading.Lock()


def _gzipped(path: Path) -> Path:
    """``path`` + .gz (gzip level 1), written once, atomically."""
    import gzip

    gz = path.with_name(path.name + ".gz")
    with _SEG_LOCK:
        if not gz.exists():
            tmp = gz.with_name(gz.name + ".tmp")
            with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, gz)
    return gz


def seg_nrrd_path(job: Job) -> Path:
    """The job's .seg.nrrd, written (once, atomically) with textseg.writers from its arrays."""
    import numpy as np

    from .predictor import PromptResult
    from .prompts import Prompt
    from .volume import Volume
    from .wire import load_npz, unpack_mask
    from .writers import segments_from_results, write_seg_nrrd

    path = job.dir / "result.seg.nrrd"
    with _SEG_LOCK:
        if not path.exists():
            meta = job.meta or {}
            shape = meta["shape"]
            arrays = load_npz((job.dir / "arrays.npz").read_bytes())
            results = [PromptResult(Prompt.from_any(r["prompt"]), None, unpack_mask(arrays[f"mask_{r['index']}"], shape),
                                    r["existence"], r["present"], r["provenance"], r["message"], r["extra"],
                                    complete=r.get("complete", True), objects=r.get("objects") or [])
                       for r in meta["results"]]
            g = job.volume.geometry
            reference = Volume(np.zeros(shape, np.uint8), g["spacing"], g["origin"], g["direction"])
            write_seg_nrrd(path, reference, segments_from_results(results))
    return path


async def _receive(request, path: Path, gzipped: bool, limit: int) -> Tuple[str, int]:
    """Stream the body to ``path`` (decoding gzip), hashing it; 413 past ``limit`` decoded bytes."""
    import hashlib

    declared = request.headers.get("content-length")
    too_big = ApiError(413, "too_large", f"The image is larger than this server accepts ({limit / 2**20:.0f} MiB decoded). "
                       "Crop it or ask the administrator to raise --max-upload-mb.")
    if declared and declared.isdigit() and int(declared) > limit and not gzipped:
        raise too_big
    h = hashlib.sha256()
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    size = 0
    with open(path, "wb") as fh:
        try:
            async for chunk in request.stream():
                data = dec.decompress(chunk, limit + 1 - size) if dec is not None else chunk
                if dec is not None and dec.unconsumed_tail:
                    raise too_big
                size += len(data)
                if size > limit:
                    raise too_big
                h.update(data)
                fh.write(data)
            if dec is not None:
                tail = dec.flush()
                size += len(tail)
                if size > limit:
                    raise too_big
                h.update(tail)
                fh.write(tail)
                if not dec.eof:
                    raise ApiError(400, "bad_gzip", "The gzip body is truncated: upload it again.")
        except zlib.error:
            raise ApiError(400, "bad_gzip", "The body is not valid gzip although Content-Encoding says so.") from None
    return h.hexdigest(), size


# ---- running ---------------------------------------------------------------------------------------
def run(settings: Settings) -> None:
    """Serve until interrupted (uvicorn, one process; inference runs in the worker processes)."""
    import uvicorn

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), timeout_keep_alive=30)


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
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on"))
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
