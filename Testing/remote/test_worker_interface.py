"""One worker interface for both backends of ``textseg serve`` (textseg.remote.backend): the events a job sends,
the one function that turns a job's exceptions into its final event, and a dispatch that fails only its job."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from textseg.errors import Cancelled, UsageError
from textseg.remote import backend, wire
from textseg.remote.backend import DISK_FULL, Worker, error_event
from textseg.remote.jobs import JobManager, StoredVolume
from textseg.remote.settings import Settings


def test_both_backends_implement_the_worker_interface():
    from textseg.remote.ray_backend import RayDispatcher
    from textseg.remote.workers import ProcessWorker

    assert issubclass(ProcessWorker, Worker) and issubclass(RayDispatcher, Worker)
    with pytest.raises(TypeError):
        Worker(0, "cpu", None)  # abstract: a backend must say how it starts, stops and runs a job


def test_a_jobs_exceptions_become_its_final_event():
    assert error_event(Cancelled("stopped by the user"), "j") == (backend.CANCELLED, "stopped by the user")
    assert error_event(UsageError("unknown prompt 'x'"), "j") == (backend.ERROR, "UsageError", "unknown prompt 'x'")
    full = error_event(OSError(errno.ENOSPC, "No space left on device"), "j")
    assert full == (backend.ERROR, "ServerError", DISK_FULL.format(what="the job's results"))
    kind, cls, message = error_event(RuntimeError("CUDA error: device-side assert " + "x" * 1000), "j")
    assert (kind, cls) == (backend.ERROR, "ModelError")
    assert message.startswith("The model failed on the server (RuntimeError: CUDA error") and len(message) < 420
    assert "Traceback" not in message
    ray = error_event(KeyError("replica"), "j", "ServerError", "The Ray worker running this job failed ({kind}).")
    assert ray == (backend.ERROR, "ServerError", "The Ray worker running this job failed (KeyError).")


@pytest.fixture()
def manager(tmp_path):
    m = JobManager(Settings(work_dir=str(tmp_path), queue_size=4))
    yield m
    m.stopping.set()


def _stored(manager, sha="0" * 64, owner="local"):
    volume = StoredVolume(sha, Path("unused.npy"), {}, (2, 3, 4), "int16", owners={owner})
    manager.volumes[sha] = volume
    return volume


def _job(manager, prompts=("bone",)):
    return manager.submit(_stored(manager), {"model": "synthetic-3d", "prompts": list(prompts),
                                             "probabilities": wire.UINT8})


def test_no_job_on_an_image_dropped_after_it_was_looked_up(manager):
    """The route looks the image up, then submits: the per-client cap (another upload of the same client, in a
    thread of its own) may drop it in between. submit checks again under the lock: no job whose image is gone
    (the client is told volume_not_found and uploads it again)."""
    manager.settings.max_volume_bytes_per_client = 48  # one 2x3x4 int16 image
    looked_up = manager.get_volume(_stored(manager, "1" * 64).sha, "local")
    newer = _stored(manager, "2" * 64)
    manager._cap_volumes("local", newer)  # what add_volume does after the newer upload
    assert "1" * 64 not in manager.volumes
    request = {"model": "synthetic-3d", "prompts": ["bone"], "probabilities": wire.UINT8}
    assert manager.submit(looked_up, request) is None and not manager.jobs and len(manager.queue) == 0
    assert manager.submit(newer, request) is not None  # an image still held


def test_events_drive_a_job_to_its_final_state(manager):
    job = _job(manager)
    job.start("cpu")
    assert job.state == wire.RUNNING
    assert not Worker.apply(job, (backend.PROGRESS, 0.5, "decoding 'bone'"))
    assert (job.progress, job.stage) == (0.5, "decoding 'bone'")
    assert not Worker.apply(job, (backend.BEAT,))
    assert Worker.apply(job, (backend.ERROR, "UsageError", "bad prompt"))
    assert job.state == wire.FAILED and job.error == {"type": "UsageError", "message": "bad prompt"}
    other = _job(manager)
    other.start("cpu")
    assert Worker.apply(other, (backend.CANCELLED, "cancelled"))
    assert other.state == wire.CANCELLED and other.state in wire.FINAL_STATES


def test_a_dispatch_that_raises_fails_only_its_job_and_the_worker_goes_on(manager):
    """Before, an unexpected exception in ProcessWorker's dispatch (not in the model: that is the worker
    process's business) ended the dispatcher thread: the job stayed 'running' forever and the device took no
    more jobs."""
    from textseg.remote.workers import ProcessWorker

    class Alive:
        pid = 4242

        def is_alive(self):
            return True

    class Quiet:
        def poll(self, timeout=0):
            return False

    w = ProcessWorker(0, "cpu", {}, manager)
    w.proc, w.conn, w.ready = Alive(), Quiet(), True
    ran = []

    def run(job):
        ran.append(job.id)
        if len(ran) == 1:
            raise RuntimeError("pipe state lost")
        job.start("cpu")
        job.finish({"results": [], "shape": [2, 3, 4], "messages": []})

    w._run = run
    first, second = _job(manager), _job(manager)
    thread = threading.Thread(target=w._loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while second.state not in wire.FINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.02)
    manager.stopping.set()
    thread.join(5)
    assert first.state == wire.FAILED and first.error["type"] == "ServerError"
    assert "failed while running this job (RuntimeError)" in first.error["message"]
    assert second.state == wire.DONE and ran == [first.id, second.id]
    assert w.job is None and np.isfinite(w.info()["restarts"])
