"""The worker interface of ``textseg serve``: what the job manager needs of a worker, whatever runs the model.

Two backends implement ``Worker``: ``workers.ProcessWorker`` (one local process per device) and
``ray_backend.RayDispatcher`` (one Ray Serve replica, anywhere in a cluster). Each takes jobs from the
manager's queue in ``Worker._loop`` and runs them in its ``_run``; a running job talks back in events
(``EVENTS``) that ``Worker.apply`` turns into the job's progress and end, and ``error_event`` is the one place
where an exception raised by a job becomes the event that ends it.
"""

from __future__ import annotations

import errno
import logging
from abc import ABC, abstractmethod
from typing import Any, Optional

log = logging.getLogger("textseg.server")
DISK_FULL = ("The server's disk is full: {what} could not be stored. Try again later, and tell the server's "
             "administrator (the server's work folder needs space).")
MODEL_FAILED = ("The model failed on the server ({kind}: {detail}). The server log has the details.")

# Events a running job sends to its worker's dispatcher (over a process pipe, or a Ray stream):
PROGRESS = "progress"  # ("progress", fraction 0..1, stage)
RESULTS = "results"  # ("results", [PromptResult, ...]): results streamed before the end (Ray)
BEAT = "beat"  # ("beat",): alive, nothing to say
DONE = "done"  # ("done", meta) from a process; ("done", messages, cancelled) from a Ray replica
CANCELLED = "cancelled"  # ("cancelled", message): stopped before any result
ERROR = "error"  # ("error", textseg.errors class name, message)
EVENTS = (PROGRESS, RESULTS, BEAT, DONE, CANCELLED, ERROR)
FINAL_EVENTS = (DONE, CANCELLED, ERROR)


def disk_full(exc: BaseException) -> bool:
    """A write failed for want of space (full disk or quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def heartbeat_interval(settings: Any) -> float:
    """How often a worker says it is alive: a fifth of the timeout (a few lost beats are no alarm).
    ``settings``: the server's ``Settings`` (its ``heartbeat_timeout``)."""
    hb = settings.heartbeat_timeout
    return min(5.0, max(0.05, hb / 5)) if hb > 0 else 5.0


def error_event(exc: BaseException, job_id: Any, kind: str = "ModelError", unexpected: str = MODEL_FAILED) -> tuple:
    """The event that ends a job which raised ``exc``: a cancel (``Cancelled``), the engine's own error with its
    class and message (a ``TextsegError``: the client raises the same), a full disk, or anything else as
    ``kind`` with ``unexpected`` (formatted with the exception's class and start) and one logged traceback.
    Never a traceback to the client."""
    from ..errors import Cancelled, TextsegError

    if isinstance(exc, Cancelled):
        return (CANCELLED, str(exc))
    if isinstance(exc, TextsegError):
        return (ERROR, type(exc).__name__, str(exc))
    if disk_full(exc):
        log.error("job %s: the disk is full (%s)", job_id, exc)
        return (ERROR, "ServerError", DISK_FULL.format(what="the job's results"))
    log.error("job %s failed", job_id, exc_info=exc)
    return (ERROR, kind, unexpected.format(kind=type(exc).__name__, detail=str(exc)[:300]))


class Worker(ABC):
    """One place where jobs run (a device's process, a Ray replica), fed from the manager's queue by a
    dispatcher thread of its own (``start``). ``job`` is the job it runs now (None when idle)."""

    # the unexpected failure of the dispatch itself (not of the model): the job ends with this
    dispatch_failed = ("The server's worker failed while running this job ({kind}); submit the job again.")

    def __init__(self, index: int, device: str, manager: Any) -> None:
        self.index, self.device, self.manager = index, device, manager
        self.job: Optional[Any] = None
        self.ready = False
        self.restarts = 0

    # ---- what a backend provides -------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Start the dispatcher thread (and whatever runs the model)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop at server shutdown."""

    @abstractmethod
    def _run(self, job: Any) -> None:
        """Run one job to its end: the job leaves in a final state."""

    def _available(self) -> bool:
        """Whether the worker can take a job now; a backend (re)starts or checks what runs the model here."""
        return True

    def _idle(self) -> None:  # noqa: B027 - an optional hook: most backends have nothing to do between jobs
        """Between jobs (no job queued)."""

    @property
    def pid(self) -> Optional[int]:
        return None

    @property
    def alive(self) -> bool:
        return True

    @property
    def responsive(self) -> bool:
        return True

    # ---- shared ------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What /health and /v1/workers show of this worker."""
        alive = self.alive
        return {"index": self.index, "device": self.device, "pid": self.pid, "alive": alive, "ready": self.ready,
                "responsive": alive and self.responsive, "job": self.job.id if self.job is not None else None,
                "restarts": self.restarts}

    def _loop(self) -> None:
        """The dispatcher thread: take the next job, run it; a dispatch that fails fails only its job."""
        while not self.manager.stopping.is_set():
            if not self._available():
                continue
            job = self.manager.next_job(timeout=0.2)
            if job is None:
                self._idle()
                continue
            self.job = job
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - a dead replica, a lost node, a bug: the job fails, we go on
                self.apply(job, error_event(exc, job.id, "ServerError", self.dispatch_failed))
            finally:
                self.job = None

    @staticmethod
    def apply(job: Any, event: tuple) -> bool:
        """Apply one event of a running job to it (``RESULTS`` and ``BEAT`` are the backend's business);
        True when the event ended the job."""
        kind = event[0]
        if kind == PROGRESS:
            job.set_progress(event[1], event[2])
        elif kind == DONE:
            job.finish(event[1])
        elif kind == CANCELLED:
            job.cancelled_before_results()
        elif kind == ERROR:
            job.fail(event[1], event[2])
        return kind in FINAL_EVENTS
