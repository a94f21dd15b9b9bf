"""The server's state: uploaded volumes, jobs and their queue, and the ``JobManager`` that runs them on the
workers (textseg.remote.backend's interface) and expires what is old."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .api_errors import ApiError, clip, disk_full_error
from .auth import Caller
from .backend import Worker, disk_full, heartbeat_interval
from .settings import Settings
from .wire import CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED, RUNNING, nrrd_to_volume

log = logging.getLogger("textseg.server")


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

    @property
    def nbytes(self) -> int:
        import numpy as np

        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize


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
    def __init__(self, manager: JobManager, volume: StoredVolume, request: dict[str, Any], owner: str = "local"):
        self.manager = manager
        self.id = uuid.uuid4().hex
        self.volume = volume
        self.request = request
        self.owner = owner
        self.state = QUEUED
        self.stage = QUEUED
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
        self.state, self.stage, self.device, self.started = RUNNING, "starting", device, time.time()
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
            self._final(CANCELLED)
        else:
            self.progress, self.stage = 1.0, DONE
            self._final(DONE)

    def cancelled_before_results(self, stage: str = CANCELLED) -> None:
        self.stage = stage
        self._final(CANCELLED)

    def fail(self, kind: str, message: str) -> None:
        self.error = {"type": kind, "message": clip(message)}
        self.stage = FAILED
        self._final(FAILED)

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
        if self.state == QUEUED:
            d["queue_position"] = self.manager.queue_position(self)
        if admin:
            d["owner"] = Caller.label(self.owner)
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
        self.volumes: dict[str, StoredVolume] = {}
        self.jobs: dict[str, Job] = {}
        self.dropped: OrderedDict[str, str] = OrderedDict()  # job id -> owner, of results dropped by the caps
        self.lock = threading.RLock()
        self.queue = BoundedQueue(settings.queue_size)
        self.stopping = threading.Event()
        self.durations: deque = deque(maxlen=20)
        self.workers: list[Worker] = []
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
                self._cap_volumes(owner, known)
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
                raise disk_full_error("the uploaded image") from None
            raise
        geometry = volume.geometry()
        sv = StoredVolume(sha, path, geometry, tuple(volume.array.shape), str(volume.array.dtype))
        with self.lock:
            sv = self.volumes.setdefault(sha, sv)
            sv.owners.add(owner)
            self._cap_volumes(owner, sv)
        return sv

    def _cap_volumes(self, owner: str, new: StoredVolume) -> None:
        """Keep ``owner``'s stored images within max_volume_bytes_per_client: its least recently used ones stop
        being its (the file goes once no client holds it); ``new`` and images a queued or running job uses stay.
        A client that uses a dropped image again is told volume_not_found and uploads it again (the client
        does that by itself). Called with the lock held."""
        cap = self.settings.max_volume_bytes_per_client
        mine = sorted((v for v in self.volumes.values() if owner in v.owners), key=lambda v: v.last_used)
        total = sum(v.nbytes for v in mine)
        if total <= cap:
            return
        busy = self._busy_volumes()
        for v in mine:
            if total <= cap:
                break
            if v is new or v.sha in busy:
                continue
            v.owners.discard(owner)
            total -= v.nbytes
            log.info("volume %s dropped for %s: over its %d MiB of stored images", v.sha[:12], Caller.label(owner),
                     cap >> 20)
            if not v.owners:
                self._drop_volume(v)

    def _busy_volumes(self) -> set[str]:
        """The images a queued or running job uses (they stay). Called with the lock held."""
        return {j.volume.sha for j in self.jobs.values() if j.state not in FINAL_STATES}

    def _drop_volume(self, v: StoredVolume) -> None:
        """Forget an image and remove its file together, with the lock held: a re-upload of the same image (same
        file name) sees the entry gone only once the old file is, so its new file is never the one removed."""
        del self.volumes[v.sha]
        v.path.unlink(missing_ok=True)

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, volume: StoredVolume, request: dict[str, Any], owner: str = "local") -> Optional[Job]:
        """Queue a job on ``volume``; None when ``owner`` no longer holds it (the per-client cap or the session
        TTL dropped it since the caller looked it up: the client is told to upload it again)."""
        job = Job(self, volume, request, owner)
        with self.lock:
            if self.volumes.get(volume.sha) is not volume or owner not in volume.owners:
                return None
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
            if job.state in FINAL_STATES:
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
            busy = self._busy_volumes()
            old_vols = [v for v in self.volumes.values() if v.sha not in busy
                        and now - v.last_used > self.settings.session_ttl]
            for v in old_vols:
                self._drop_volume(v)
                log.info("volume %s expired", v.sha[:12])
        for j in old_jobs:
            shutil.rmtree(j.dir, ignore_errors=True)

