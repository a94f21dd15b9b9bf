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
    GET    /v1/health, /health, /v1/models, /v1/workers

Jobs and uploaded images belong to the client that made them (its key, plus the client token it
sends); a client sees only its own. Jobs run on one worker process per device
(textseg.remote.workers) behind a bounded queue; a worker that stops answering is replaced.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..errors import TextsegError, UsageError
from .wire import (
    API_HEADER,
    API_VERSION,
    CLIENT_HEADER,
    CLIENT_TOKEN,
    PROBABILITY_MODES,
    VERSION_HEADER,
    UploadTooLarge,
    is_loopback,
    nrrd_to_volume,
    prompt_limits_error,
    version_mismatch_message,
)
from .workers import DISK_FULL, disk_full, heartbeat_interval

log = logging.getLogger("textseg.server")
_HEX = set("0123456789abcdef")
FINAL = ("done", "failed", "cancelled")
MAX_MESSAGE = 1000  # characters of an error message sent to a client (they never echo a whole request)


@dataclass(frozen=True)
class ClientKey:
    """One client's API key (``--keys-file``): its name (shown to operators) and whether it is an admin."""

    name: str
    key: str
    admin: bool = False

    def __repr__(self) -> str:  # keys never reach a log through a repr
        return f"ClientKey({self.name!r}, admin={self.admin})"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    api_key: Optional[str] = None  # one key shared by all clients (client "default"); or:
    keys: tuple[ClientKey, ...] = ()  # per-client keys (read_keys_file); a key is required unless host is loopback
    devices: tuple[str, ...] = ("auto",)  # one worker process per entry
    preload: tuple[str, ...] = ()
    queue_size: int = 16  # queued jobs (not counting running ones); full -> 429
    session_ttl: float = 3600.0  # seconds an uploaded volume lives after its last use
    result_ttl: float = 3600.0  # seconds a finished job and its result are kept
    max_upload_bytes: int = 2 << 30  # decoded NRRD size, and decoded voxels of any NRRD-internal compression
    max_results_per_client: int = 100  # finished jobs kept per client; beyond it the oldest is dropped
    max_result_bytes_per_client: int = 4 << 30  # result files kept per client; beyond it the oldest are dropped
    max_json_bytes: int = 1 << 20  # a job request
    body_timeout: float = 30.0  # seconds without request body data before 408 (0: no limit)
    min_body_rate: int = 16 << 10  # bytes/s a request body must average once body_timeout has passed
    heartbeat_timeout: float = 120.0  # a worker silent this long is hung: its job fails, it is replaced (0: off)
    cancel_timeout: float = 60.0  # a running job not stopped this long after DELETE: its worker is replaced
    job_timeout: float = 3 * 3600.0  # longest a job may run (0: no limit)
    work_dir: Optional[str] = None  # default: a private temp folder removed at shutdown
    show_test_models: bool = False  # offer hidden test-only adapters (tests only; or TEXTSEG_SHOW_TEST_MODELS=1)
    adapter_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # server-side, per model
    weights_dir: Optional[str] = None
    ray: bool = False
    ray_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"


# ---- keys ------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def key_problem(key: str) -> Optional[str]:
    """Why ``key`` is too weak to protect a server, or None. At least 16 printable characters, no spaces,
    at least 8 different ones: 'a', ' ', 'secret' or 'aaaa...' are guessed in no time."""
    if len(key) < 16:
        return f"it has {len(key)} characters; use at least 16"
    if not key.isprintable() or any(c.isspace() for c in key):
        return "it contains spaces or control characters"
    if len(set(key)) < 8:
        return "it repeats too few different characters"
    return None


def read_keys_file(path) -> tuple[ClientKey, ...]:
    """Per-client keys: one client a line, ``NAME KEY [user|admin]``; blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"Cannot read --keys-file {path}: {exc.strerror}.") from None
    keys: list[ClientKey] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("user", "admin")):
            raise UsageError(f"--keys-file {path}, line {n}: expected 'NAME KEY [user|admin]'.")
        name, key = parts[0], parts[1]
        if not _NAME.fullmatch(name):
            raise UsageError(f"--keys-file {path}, line {n}: a client name is 1-64 letters, digits or _.@-.")
        weak = key_problem(key)
        if weak:
            raise UsageError(f"--keys-file {path}, line {n}: the key of '{name}' is too weak ({weak}). Make one with "
                             f"{KEY_HINT}.")
        if any(k.name == name for k in keys) or any(k.key == key for k in keys):
            raise UsageError(f"--keys-file {path}, line {n}: client names and keys must be unique.")
        keys.append(ClientKey(name, key, len(parts) == 3 and parts[2] == "admin"))
    if not keys:
        raise UsageError(f"--keys-file {path} holds no keys.")
    return tuple(keys)


def _all_keys(settings: Settings) -> tuple[ClientKey, ...]:
    keys = tuple(settings.keys)
    if settings.api_key is not None:
        if keys:
            raise UsageError("Give either one shared API key (--api-key/--api-key-file) or a --keys-file, not both.")
        keys = (ClientKey("default", settings.api_key),)
    for k in keys:
        weak = key_problem(k.key)
        if weak:
            raise UsageError(f"The API key{'' if k.name == 'default' else ' of ' + repr(k.name)} is too weak ({weak}). "
                             f"Make one with {KEY_HINT}.")
    return keys


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name (``local`` on a server without keys), its role, and the sha256 of
    the client token it sent (None without one). Jobs and images belong to ``owner``."""

    name: str
    admin: bool = False
    token: Optional[str] = None

    @property
    def owner(self) -> str:
        return self.name if self.token is None else f"{self.name}/{self.token}"

    @staticmethod
    def label(owner: str) -> str:
        """The owner as operators see it: the key's name and the start of the token's hash."""
        name, _, token = owner.partition("/")
        return f"{name}/{token[:12]}" if token else name


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# ---- state ---------------------------------------------------------------------------------------
@dataclass
class StoredVolume:
    sha: str
    path: Path
    geometry: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    last_used: float = field(default_factory=time.monotonic)
    owners: set = field(default_factory=set)  # the clients that uploaded it (proved they have it)


def _disk_full_error(what: str) -> "ApiError":
    return ApiError(507, "disk_full", DISK_FULL.format(what=what))


class _Writer:
    """A file seen by numpy as a plain stream: it writes through Python's io (errno kept on failure)."""

    def __init__(self, fh) -> None:
        self.write = fh.write


def _dir_bytes(path: Path) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return 0


class Job:
    def __init__(self, manager: "JobManager", volume: StoredVolume, request: dict[str, Any], owner: str = "local"):
        self.manager = manager
        self.id = uuid.uuid4().hex
        self.volume = volume
        self.request = request
        self.owner = owner
        self.state = "queued"
        self.stage = "queued"
        self.progress = 0.0
        self.error: Optional[dict[str, str]] = None
        self.meta: Optional[dict[str, Any]] = None
        self.device: Optional[str] = None
        self.created = time.time()
        self.started: Optional[float] = None
        self.started_mono: Optional[float] = None
        self.finished: Optional[float] = None
        self.finished_mono: Optional[float] = None
        self.cancel_requested = False
        self.cancel_mono: Optional[float] = None
        self.version = 0
        self.dir = manager.jobs_dir / self.id

    def payload(self) -> dict[str, Any]:
        return {**self.request, "id": self.id, "volume_path": str(self.volume.path), "geometry": self.volume.geometry,
                "out_dir": str(self.dir)}

    def _bump(self) -> None:
        self.version += 1

    def start(self, device: str) -> None:
        self.state, self.stage, self.device, self.started = "running", "starting", device, time.time()
        self.started_mono = time.monotonic()
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
        if self.meta is None:  # no results: whatever the run left (partial files) goes now, not at expiry
            shutil.rmtree(self.dir, ignore_errors=True)
        self._bump()
        self.manager.finished(self)

    def finish(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        n, total = len(meta["results"]), len(self.request.get("prompts") or [])
        done = sum(bool(r.get("complete", True)) for r in meta["results"])
        if meta.get("cancelled"):
            from ..runcontrol import kept_summary

            self.stage = (f"cancelled: kept {n} target(s) found so far" if self.request.get("recognize")
                          else f"cancelled: {kept_summary(done, total, n - done)}")
            self._final("cancelled")
        else:
            self.progress, self.stage = 1.0, "done"
            self._final("done")

    def cancelled_before_results(self, stage: str = "cancelled") -> None:
        self.stage = stage
        self._final("cancelled")

    def fail(self, kind: str, message: str) -> None:
        self.error = {"type": kind, "message": _clip(message)}
        self.stage = "failed"
        self._final("failed")

    def to_dict(self, admin: bool = False) -> dict[str, Any]:
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
        if admin:
            d["owner"] = Caller.label(self.owner)
        return d


def _clip(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 24] + " ... (message shortened)"


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
        self.volumes: dict[str, StoredVolume] = {}
        self.jobs: dict[str, Job] = {}
        self.dropped: OrderedDict[str, str] = OrderedDict()  # job id -> owner, of results dropped by the caps
        self.lock = threading.RLock()
        self.queue = BoundedQueue(settings.queue_size)
        self.stopping = threading.Event()
        self.durations: deque = deque(maxlen=20)
        self.workers: list[Any] = []
        self.backend = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.ray:
            from .ray_backend import RayBackend

            self.backend = RayBackend(self)
            self.workers = self.backend.start()
        else:
            from .workers import ProcessWorker

            options = {"adapter_options": self.settings.adapter_options, "weights_dir": self.settings.weights_dir,
                       "preload": tuple(self.settings.preload), "log_level": self.settings.log_level,
                       "heartbeat_interval": heartbeat_interval(self.settings)}
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
    def get_volume(self, sha: str, owner: Optional[str] = None, touch: bool = True) -> Optional[StoredVolume]:
        """The stored volume if ``owner`` uploaded it; ``touch`` (a job uses it) restarts its expiry clock."""
        with self.lock:
            v = self.volumes.get(sha)
            if v is None or (owner is not None and owner not in v.owners):
                return None
            if touch:
                v.last_used = time.monotonic()
            return v

    def add_volume(self, sha: str, upload: Path, owner: str = "local") -> StoredVolume:
        """Parse an uploaded NRRD (worker thread), keep it as .npy + geometry, owned by ``owner``. An image
        another client already uploaded is not parsed again: the body's sha256 proved it is the same."""
        import numpy as np

        with self.lock:
            known = self.volumes.get(sha)
            if known is not None:
                known.owners.add(owner)
                known.last_used = time.monotonic()
                return known
        with open(upload, "rb") as fh:
            volume = nrrd_to_volume(fh, "The uploaded image", self.settings.max_upload_bytes)
        volume.check_usable("The uploaded image")
        path = self.volumes_dir / f"{sha}.npy"
        tmp = self.volumes_dir / f"{sha}.{uuid.uuid4().hex}.tmp.npy"  # two uploads of one image may race
        try:
            with open(tmp, "wb") as fh:  # through a plain write(): ndarray.tofile reports a full disk without errno
                np.save(_Writer(fh), volume.array, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if disk_full(exc):
                raise _disk_full_error("the uploaded image") from None
            raise
        geometry = volume.geometry()
        sv = StoredVolume(sha, path, geometry, tuple(volume.array.shape), str(volume.array.dtype))
        with self.lock:
            sv = self.volumes.setdefault(sha, sv)
            sv.owners.add(owner)
        return sv

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, volume: StoredVolume, request: dict[str, Any], owner: str = "local") -> Job:
        job = Job(self, volume, request, owner)
        with self.lock:
            if not self.queue.put(job):
                raise ApiError(429, "queue_full",
                               f"The server's queue is full ({self.settings.queue_size} jobs waiting); "
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
            job.cancel_mono = job.cancel_mono or time.monotonic()
            if self.queue.remove(job):
                job.cancelled_before_results("cancelled before it started")

    def queue_position(self, job: Job) -> Optional[int]:
        return self.queue.position(job)

    def record_duration(self, seconds: float) -> None:
        self.durations.append(seconds)

    def retry_after(self) -> int:
        avg = sum(self.durations) / len(self.durations) if self.durations else 2.0
        return int(min(60, max(1, math.ceil(avg * (len(self.queue) + 1) / max(1, len(self.workers))))))

    def finished(self, job: Job) -> None:
        """A job ended: keep at most max_results_per_client results (and bytes) of its owner; the oldest go."""
        s = self.settings
        with self.lock:
            mine = sorted((j for j in self.jobs.values() if j.owner == job.owner and j.finished_mono is not None
                           and j is not job),
                          key=lambda j: j.finished_mono)
            total = _dir_bytes(job.dir) + sum(_dir_bytes(j.dir) for j in mine)
            drop = []
            while mine and (len(mine) + 1 > s.max_results_per_client or total > s.max_result_bytes_per_client):
                old = mine.pop(0)
                total -= _dir_bytes(old.dir)
                drop.append(old)
            for old in drop:
                del self.jobs[old.id]
                self.dropped[old.id] = old.owner
            while len(self.dropped) > 10000:
                self.dropped.popitem(last=False)
        for old in drop:
            shutil.rmtree(old.dir, ignore_errors=True)

    # ---- expiry --------------------------------------------------------------------------------
    def _janitor(self) -> None:
        period = max(0.2, min(30.0, self.settings.session_ttl / 4, self.settings.result_ttl / 4))
        while not self.stopping.wait(period):
            self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            old_jobs = [j for j in self.jobs.values() if j.finished_mono
                        and now - j.finished_mono > self.settings.result_ttl]
            for j in old_jobs:
                del self.jobs[j.id]
            busy = {j.volume.sha for j in self.jobs.values() if j.state not in FINAL}
            old_vols = [v for v in self.volumes.values() if v.sha not in busy
                        and now - v.last_used > self.settings.session_ttl]
            for v in old_vols:
                del self.volumes[v.sha]
        for j in old_jobs:
            shutil.rmtree(j.dir, ignore_errors=True)
        for v in old_vols:
            v.path.unlink(missing_ok=True)
            log.info("volume %s expired", v.sha[:12])


# ---- the HTTP app ----------------------------------------------------------------------------------
def _error(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": code, "message": _clip(message), "status": status}, status_code=status,
                        headers=headers)


_ERROR_STATUS = {"UsageError": 400, "InputError": 400, "WeightsError": 409, "ModelError": 500, "OutputExistsError": 409}


class BodyTimeout(Exception):
    """A request body stopped arriving (idle for body_timeout) or arrives slower than min_body_rate."""


class _Guard:
    """The checks every request passes (pure ASGI, so that it can also bound the request body in time):

    * API version (426), then who is calling: the bearer key (401/403) and the client token (400);
    * on a server without keys (loopback only): no browser requests (an ``Origin`` header: CSRF) and a
      loopback ``Host`` (DNS rebinding: a page under another name must not reach 127.0.0.1);
    * the request body must keep arriving: idle ``body_timeout`` s, or an average under ``min_body_rate``
      once that long has passed -> 408 and the connection is closed;
    * a client that disconnects mid-request is one log line, any other exception one logged traceback and a
      JSON 500 with a reference (never a traceback to the client, never twice in the log)."""

    def __init__(self, app, settings: Settings, keys: tuple[ClientKey, ...]) -> None:
        self.app, self.settings = app, settings
        self.keys = {hashlib.sha256(k.key.encode()).digest(): k for k in keys}
        self.public = {"/health", "/v1/health"}

    def _caller(self, scope, headers) -> Any:
        """A Caller, or the error response that refuses the request."""
        api = headers.get(API_HEADER.lower())
        if api is not None and api != str(API_VERSION):
            return _error(426, "version_mismatch",
                          version_mismatch_message(api, headers.get(VERSION_HEADER.lower(), "")))
        path = scope.get("path", "")
        if not self.keys:
            if headers.get("origin") is not None:
                return _error(403, "browser_refused",
                              "This textseg server has no API key, so it refuses requests made by "
                              "web browsers (Origin header); use the textseg client, or serve with --api-key.")
            host = _host_name(headers.get("host", ""))
            if host is None or not is_loopback(host):
                return _error(403, "host_refused",
                              "This textseg server has no API key and answers only to a loopback Host "
                              "(localhost, 127.0.0.1, [::1]); serve with --api-key to reach it under another name.")
            caller = Caller("local")
        elif path in self.public:
            caller = Caller("public")
        else:
            auth = headers.get("authorization", "")
            if not auth:
                return _error(401, "unauthorized", "This server needs an API key: send 'Authorization: Bearer <key>' "
                              "(textseg: --api-key or TEXTSEG_API_KEY).", {"WWW-Authenticate": "Bearer"})
            scheme, _, token = auth.partition(" ")
            # the sha256 of the presented key is looked up: its time depends on the digest, never on the key's bytes
            key = self.keys.get(hashlib.sha256(token.strip().encode()).digest()) if scheme.lower() == "bearer" else None
            if key is None or not hmac.compare_digest(token.strip().encode(), key.key.encode()):
                return _error(403, "forbidden",
                              "The API key was refused by the server; check --api-key / TEXTSEG_API_KEY.")
            caller = Caller(key.name, key.admin)
        token = headers.get(CLIENT_HEADER.lower())
        if token is not None:
            if not CLIENT_TOKEN.fullmatch(token):
                return _error(400, "invalid_client_token",
                              f"The {CLIENT_HEADER} header must be 16-128 letters, digits or "
                              "_.~- (a random token of this client, e.g. secrets.token_urlsafe(24)).")
            caller = Caller(caller.name, caller.admin, hashlib.sha256(token.encode()).hexdigest())
        return caller

    def _bounded(self, receive):
        idle, rate = self.settings.body_timeout, self.settings.min_body_rate
        state = {"done": idle <= 0, "got": 0, "t0": 0.0}

        async def bounded_receive():
            if state["done"]:  # the body is complete: later receives wait for a disconnect, without limit
                return await receive()
            state["t0"] = state["t0"] or time.monotonic()
            try:
                msg = await asyncio.wait_for(receive(), idle)
            except asyncio.TimeoutError:
                raise BodyTimeout(f"no data for {idle:g} s") from None
            if msg["type"] == "http.request":
                state["got"] += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    state["done"] = True
                else:
                    elapsed = time.monotonic() - state["t0"]
                    if rate and elapsed > idle and state["got"] < rate * elapsed:
                        raise BodyTimeout(f"{state['got'] / elapsed:,.0f} bytes/s, under the server's minimum of "
                                          f"{rate:,} bytes/s")
            return msg

        return bounded_receive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.requests import ClientDisconnect

        caller = self._caller(scope, Headers(scope=scope))
        if not isinstance(caller, Caller):
            return await caller(scope, receive, send)
        scope.setdefault("state", {})["caller"] = caller
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        what = f"{scope.get('method')} {scope.get('path')}"
        try:
            await self.app(scope, self._bounded(receive), tracked_send)
        except BodyTimeout as exc:
            log.info("%s from %s: the request body stopped arriving (%s); connection closed", what, _client(scope), exc)
            if not started:
                await _error(408, "body_timeout",
                             f"The request body did not arrive in time ({exc}); the server closed the "
                             "connection. Send it again (check the network).", {"Connection": "close"})(scope, receive,
                                                                                                        send)
        except ClientDisconnect:
            log.info("%s from %s: the client disconnected before its request was complete", what, _client(scope))
        except Exception:  # noqa: BLE001 - logged once here, a JSON 500 to the client
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error %s on %s", ref, what)
            if not started:
                await _error(500, "internal",
                             f"Internal server error (reference {ref} in the server log).")(scope, receive, send)


def _host_name(host: str) -> Optional[str]:
    """The name of a Host header (without port; IPv6 without brackets), None if it is malformed."""
    from urllib.parse import urlsplit

    try:
        return urlsplit("//" + host).hostname if host else None
    except ValueError:
        return None


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"


def model_list(settings: Settings) -> list[dict[str, Any]]:
    from ..catalog import list_models
    from ..weights import is_ready

    wdir = Path(settings.weights_dir) if settings.weights_dir else None
    out = []
    for spec in list_models(include_hidden=settings.show_test_models):
        d = spec.to_dict()
        d["ready"] = is_ready(spec, wdir)
        out.append(d)
    return out


def _check_request(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Validate a job request; returns the normalized request sent to a worker."""
    from ..catalog import get_model
    from ..prompts import parse_prompts
    from ..weights import is_ready

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
        raise ApiError(409, "weights_missing",
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
    probs = body.get("probabilities", "uint8")
    if probs not in PROBABILITY_MODES:
        raise ApiError(400, "invalid_request", f"'probabilities' must be one of {', '.join(PROBABILITY_MODES)}.")
    slices = body.get("slices")
    if slices is not None and not (isinstance(slices, list) and len(slices) == 2
                                   and all(isinstance(s, int) for s in slices)):
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
    """The FastAPI application. Refuses to run without a (strong) API key on a non-loopback address."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    keys = _all_keys(settings)
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
    app.add_middleware(_Guard, settings=settings, keys=keys)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(TextsegError)
    async def _textseg_error(request, exc: TextsegError):
        if isinstance(exc, UploadTooLarge):
            return _error(413, "too_large", str(exc))
        return _error(_ERROR_STATUS.get(type(exc).__name__, 400), type(exc).__name__, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "invalid_request", "Invalid request: " + "; ".join(parts))

    def _caller(request: Request) -> Caller:
        return request.state.caller

    # ---- service ---------------------------------------------------------------------------
    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        infos = [w.info() for w in manager.workers]
        alive = sum(1 for i in infos if i["alive"])
        ready = sum(1 for i in infos if i["alive"] and i["ready"] and i.get("responsive", True))
        if infos and ready == len(infos):
            status = "ok"
        elif ready:
            status = "degraded"  # some workers are starting again or not answering
        else:
            status = "unavailable" if any(i["restarts"] for i in infos) else "starting"
        body = {"status": status, "textseg": __version__, "api": API_VERSION, "auth": bool(keys), "workers": len(infos),
                "workers_alive": alive, "workers_ready": ready,
                "queue": {"waiting": len(manager.queue), "max": settings.queue_size},
                "max_upload_bytes": settings.max_upload_bytes, "session_ttl": settings.session_ttl,
                "result_ttl": settings.result_ttl}
        return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "2"})

    @app.get("/v1/models")
    async def models():
        return {"models": await run_in_threadpool(model_list, settings)}

    @app.get("/v1/workers")
    async def workers(request: Request):
        caller = _caller(request)
        out = []
        for w in manager.workers:
            info, job = w.info(), w.job
            if caller.admin:
                info["owner"] = Caller.label(job.owner) if job is not None else None
            else:  # another client's job id is a handle on its data: name only the caller's own
                info["busy"] = job is not None
                info["job"] = job.id if job is not None and job.owner == caller.owner else None
            out.append(info)
        return {"workers": out}

    # ---- volumes -----------------------------------------------------------------------------
    def _sha(sha: str) -> str:
        sha = sha.lower()
        if len(sha) != 64 or not set(sha) <= _HEX:
            raise ApiError(400, "invalid_request", "A volume is named by the sha256 (64 hex digits) of its NRRD bytes.")
        return sha

    not_held = ("The server does not hold this volume for this client (never uploaded by it, or expired): upload it "
                "again.")

    @app.head("/v1/volumes/{sha}")
    @app.get("/v1/volumes/{sha}")
    async def volume_info(sha: str, request: Request):
        v = manager.get_volume(_sha(sha), _caller(request).owner, touch=False)
        if v is None:
            raise ApiError(404, "volume_not_found", not_held)
        return {"volume": v.sha, "shape": list(v.shape), "dtype": v.dtype, **v.geometry}

    @app.put("/v1/volumes/{sha}", status_code=201)
    async def upload(sha: str, request: Request):
        sha, owner = _sha(sha), _caller(request).owner
        if manager.get_volume(sha, owner) is not None:
            return JSONResponse({"volume": sha, "known": True}, status_code=200)
        limit = settings.max_upload_bytes
        enc = request.headers.get("content-encoding", "identity").lower()
        if enc not in ("identity", "gzip"):
            raise ApiError(415, "unsupported_encoding",
                           f"Content-Encoding '{enc[:40]}' is not supported; send raw or gzip.")
        tmp = manager.uploads_dir / f"{uuid.uuid4().hex}.nrrd"
        try:
            digest, size = await _receive(request, tmp, enc == "gzip", limit)
            if digest != sha:
                raise ApiError(400, "hash_mismatch",
                               f"The upload's sha256 is {digest}, not {sha} as named: the body was changed "
                               "or truncated in transit. Upload it again.")
            v = await run_in_threadpool(manager.add_volume, sha, tmp, owner)
        finally:
            tmp.unlink(missing_ok=True)
        return {"volume": v.sha, "known": False, "shape": list(v.shape), "dtype": v.dtype, "bytes": size}

    # ---- jobs ----------------------------------------------------------------------------------
    def _job(job_id: str, caller: Caller, manage: bool = False) -> Job:
        """The caller's job (an admin may also see and cancel, ``manage``, any other); 404 otherwise, as for a job
        that does not exist, so that job ids of others cannot even be confirmed."""
        job = manager.jobs.get(job_id)
        if job is not None and (job.owner == caller.owner or (manage and caller.admin)):
            return job
        if manager.dropped.get(job_id) == caller.owner:
            raise ApiError(404, "job_not_found", f"Job {job_id} was removed: this server keeps at most "
                           f"{settings.max_results_per_client} results "
                           f"({settings.max_result_bytes_per_client / 2**20:,.0f} MiB) "
                           "per client and drops the oldest. Run it again.")
        raise ApiError(404, "job_not_found",
                       f"No job {job_id[:64]} for this client on this server (never created, or its "
                       f"result expired after {settings.result_ttl:g} s).")

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        caller = _caller(request)
        body = await _read_json(request, settings.max_json_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request", "The job must be a JSON object.")
        req = _check_request(body, settings)
        volume = manager.get_volume(_sha(str(req["volume"] or "")), caller.owner)
        if volume is None:
            raise ApiError(404, "volume_not_found", not_held)
        return manager.submit(volume, req, caller.owner).to_dict(caller.admin)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request):
        caller = _caller(request)
        with manager.lock:
            jobs = [j for j in manager.jobs.values() if caller.admin or j.owner == caller.owner]
        return {"jobs": [j.to_dict(caller.admin) for j in sorted(jobs, key=lambda j: j.created)]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request, wait: float = 0.0, version: int = -1):
        caller = _caller(request)
        job = _job(job_id, caller, manage=True)
        deadline = time.monotonic() + min(max(wait, 0.0), 30.0)
        while job.version == version and job.state not in FINAL and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return job.to_dict(caller.admin)

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        caller = _caller(request)
        job = _job(job_id, caller, manage=True)
        manager.cancel(job)
        return job.to_dict(caller.admin)

    def _finished(job: Job) -> dict[str, Any]:
        if job.state == "failed":
            raise ApiError(409, "job_failed", f"The job failed: {job.error['message'] if job.error else ''}")
        if job.meta is None:
            raise ApiError(409, "not_ready", f"The job is {job.state}; its result is not available.")
        # checked here: a FileResponse failing mid-response drops the connection
        if not (job.dir / "arrays.npz").is_file():
            raise ApiError(404, "result_missing",
                           "This job's result files are no longer on the server; run the job again.")
        return job.meta

    @app.get("/v1/jobs/{job_id}/result.json")
    async def result_json(job_id: str, request: Request):
        job = _job(job_id, _caller(request))
        return {**_finished(job), "job": job.to_dict()}

    @app.get("/v1/jobs/{job_id}/result")
    async def result_seg(job_id: str, request: Request):
        job = _job(job_id, _caller(request))
        if not _finished(job)["results"]:
            raise ApiError(404, "no_result",
                           "This job produced no segments (no prompts, or cancelled before the first).")
        path = await run_in_threadpool(seg_nrrd_path, job)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job.id}.seg.nrrd")

    @app.get("/v1/jobs/{job_id}/arrays")
    async def result_arrays(job_id: str, request: Request):
        job = _job(job_id, _caller(request))
        _finished(job)
        if "gzip" in request.headers.get("accept-encoding", ""):
            try:
                path = await run_in_threadpool(_gzipped, job.dir / "arrays.npz")
                return FileResponse(path, media_type="application/octet-stream", headers={"Content-Encoding": "gzip"})
            except ApiError as exc:
                if exc.code != "disk_full":
                    raise  # no room for the compressed copy: the result goes out as it is
        return FileResponse(job.dir / "arrays.npz", media_type="application/octet-stream")

    return app


async def _read_json(request, limit: int) -> Any:
    """The request body as JSON: Content-Type application/json (415: a browser form or text/plain post is not
    a job), at most ``limit`` bytes (413), nesting Python can parse (400)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       "A job is a JSON object sent with 'Content-Type: application/json'.")
    too_big = ApiError(413, "too_large", f"The job's JSON is larger than this server accepts ({limit:,} bytes).")
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
        raise ApiError(400, "invalid_request", "The job's JSON is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_request", "The job must be a JSON object.") from None


_SEG_LOCK = threading.Lock()


def _gzipped(path: Path) -> Path:
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
                    raise _disk_full_error("the compressed result") from None
                raise
    return gz


def seg_nrrd_path(job: Job) -> Path:
    """The job's .seg.nrrd, written (once, atomically) with textseg.formats.segments from its arrays."""
    import numpy as np

    from ..formats.segments import segments_from_results, write_seg_nrrd
    from ..predictor import PromptResult
    from ..prompts import Prompt
    from ..volume import Volume
    from .wire import load_npz, unpack_mask

    path = job.dir / "result.seg.nrrd"
    with _SEG_LOCK:
        if not path.exists():
            meta = job.meta or {}
            shape = meta["shape"]
            arrays = load_npz((job.dir / "arrays.npz").read_bytes())
            results = [PromptResult(Prompt.from_any(r["prompt"]), None,
                                    unpack_mask(arrays[f"mask_{r['index']}"], shape),
                                    r["existence"], r["present"], r["provenance"], r["message"], r["extra"],
                                    complete=r.get("complete", True), objects=r.get("objects") or [])
                       for r in meta["results"]]
            reference = Volume.from_geometry(np.zeros(shape, np.uint8), job.volume.geometry)
            try:
                write_seg_nrrd(path, reference, segments_from_results(results))  # atomic: no partial file stays
            except OSError as exc:
                if disk_full(exc):
                    raise _disk_full_error("the job's .seg.nrrd") from None
                raise
    return path


async def _receive(request, path: Path, gzipped: bool, limit: int) -> tuple[str, int]:
    """Stream the body to ``path`` (decoding gzip), hashing it; 413 past ``limit`` decoded bytes, 507 when the
    disk is full (the caller removes ``path``)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, "too_large",
                       f"The image is larger than this server accepts ({limit / 2**20:.0f} MiB decoded). "
                       "Crop it or ask the administrator to raise --max-upload-mb.")
    if declared and declared.isdigit() and int(declared) > limit and not gzipped:
        raise too_big
    h = hashlib.sha256()
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    size = 0
    try:
        with open(path, "wb") as fh:  # the try is outside: closing (flushing) may be what hits the full disk
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
    except OSError as exc:
        if disk_full(exc):
            raise _disk_full_error("the upload") from None
        raise
    return h.hexdigest(), size


# ---- running ---------------------------------------------------------------------------------------
def run(settings: Settings) -> None:
    """Serve until interrupted (uvicorn, one process; inference runs in the worker processes)."""
    import uvicorn

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_keep_alive=30)


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
                                           lifespan="on"))
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
