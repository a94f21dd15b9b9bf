"""Inference workers of ``textseg serve``: one process per device, each reusing its Predictors.

Why processes and not threads: a worker that dies (CUDA fault, segfault in a native library, the
kernel's out-of-memory killer) takes only its own process down. The server notices the dead
pipe, marks the job it was running as failed with the reason (exit code or signal), starts a
fresh worker for that device and keeps serving. GPU memory is also freed with the process.

A worker keeps one Predictor per model and remembers which image each one holds, so jobs on the
same uploaded volume (same modality/site/slices) encode the image once.

A worker that stops answering without dying (stopped, deadlocked, stuck in a driver) is found by
its heartbeat: a thread of the worker sends a beat every ``heartbeat_interval`` seconds, and a
worker silent for ``Settings.heartbeat_timeout`` is killed and replaced, failing its job with the
reason. A running job that has not stopped ``cancel_timeout`` seconds after its DELETE, or that runs
past ``job_timeout``, also costs its worker: the worker is killed and replaced.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..runcontrol import sub_progress
from .backend import BEAT, DONE, PROGRESS, Worker, error_event
from .wire import NO_PROBABILITIES, UINT8, encode_mask, encode_probability, result_record

log = logging.getLogger("textseg.server")
START_GRACE = 120.0  # seconds a new worker may take before its first sign of life (interpreter start, imports)


# ---- job execution (inside a worker process, or a Ray replica) --------------------------------
def load_volume(npy_path: str, geometry: dict[str, Any]):
    from ..volume import Volume

    return Volume.from_geometry(np.load(npy_path, allow_pickle=False), geometry)


class WorkerState:
    """Predictors (one per model) and the image each one holds."""

    def __init__(self, device: str, adapter_options: dict[str, dict[str, Any]], weights_dir: Optional[str] = None):
        self.device = device
        self.adapter_options = adapter_options
        self.weights_dir = weights_dir
        self.predictors: dict[str, Any] = {}
        self.images: dict[str, tuple] = {}  # model -> key of the image set on its predictor
        self.volume_key: Optional[str] = None
        self.volume = None
        self.image_reused = False  # did the last job find its image already prepared (encoded)?

    def predictor(self, model: str):
        if model not in self.predictors:
            from ..predictor import Predictor

            opts = dict(self.adapter_options.get(model, {}))
            self.predictors[model] = Predictor(model, device=self.device, weights_dir=self.weights_dir, **opts)
            self.predictors[model]._ensure_loaded()
        return self.predictors[model]

    def execute(self, job: dict[str, Any], progress: Callable[[float, str], None], cancel,
                on_results: Optional[Callable[[list], None]] = None) -> list:
        """Set the image if this predictor does not hold it yet, then predict; returns the results.

        With ``on_results`` (the Ray backend streams results back), a 3D model's prompts are
        predicted group by group and each group's results are handed over as soon as they exist,
        so a cancel keeps the completed ones there too."""
        pred = self.predictor(job["model"])
        pred.messages.clear()
        if self.volume_key != job["volume"]:
            if "array" in job:  # shipped with the job (Ray: possibly another machine)
                from ..volume import Volume

                self.volume = Volume.from_geometry(job["array"], job["geometry"])
            else:
                self.volume = load_volume(job["volume_path"], job["geometry"])
            self.volume_key = job["volume"]
        key = (job["volume"], job.get("modality"), job.get("site"), tuple(job["slices"]) if job.get("slices") else None)
        prompts = job.get("prompts") or []
        need_image = self.images.get(job["model"]) != key
        self.image_reused = not need_image
        work = bool(prompts or job.get("recognize"))  # else only the image is prepared (RemotePredictor.set_image)
        split = 0.3 if (need_image and work) else (1.0 if need_image else 0.0)
        if need_image:
            self.images.pop(job["model"], None)
            pred.set_image(self.volume, job.get("modality"), job.get("site"), key[3],
                           sub_progress(progress, 0.0, split), cancel)
            self.images[job["model"]] = key
        if job.get("recognize"):
            options = job["recognize"] if isinstance(job["recognize"], dict) else {}
            results = pred.recognize(sub_progress(progress, split, 1.0), cancel, **options)
            if on_results and results:
                on_results(results)
            return results
        results: list = []
        streamed = on_results and pred.spec.dims == 3
        group = max(1, pred.adapter.prompts_per_call(pred._state) if streamed else len(prompts))
        prompting = sub_progress(progress, split, 1.0)
        for start in range(0, len(prompts), group):
            chunk = prompts[start : start + group]
            part = sub_progress(prompting, start / len(prompts), (start + len(chunk)) / len(prompts))
            done = pred.predict(chunk, job.get("threshold"), bool(job.get("keep_absent")), part, cancel)
            results.extend(done)
            if on_results and done:
                on_results(done)
            if len(done) < len(chunk):
                break  # cancelled
        return results

    def run(self, job: dict[str, Any], progress: Callable[[float, str], None], cancel, out_dir: Path) -> dict[str, Any]:
        """execute() and write the outputs for the server (worker-process backend)."""
        results = self.execute(job, progress, cancel)
        meta = write_outputs(out_dir, self.volume.shape, results, job.get("probabilities", UINT8))
        meta["messages"] = list(self.predictor(job["model"]).messages)
        meta["image_reused"] = self.image_reused
        meta["cancelled"] = was_cancelled(job, results, cancel is not None and cancel.cancelled)
        return meta


def was_cancelled(job: dict[str, Any], results: list, cancel_requested: bool) -> bool:
    """Whether a finished job stopped early: prompts left undone, partial (2D) results, or recognition cut short."""
    if not cancel_requested:
        return False
    if job.get("recognize"):  # no results after a cancel: stopped before the first slice batch was done
        return not results or any(not r.complete for r in results)
    return len(results) < len(job.get("prompts") or []) or any(not r.complete for r in results)


def write_outputs(out_dir: Path, shape, results, prob_mode: str) -> dict[str, Any]:
    """arrays.npz (bit-packed masks, probabilities) + result.json in out_dir; returns the JSON.

    The .seg.nrrd is written from these on the first GET of /result (see server.seg_nrrd_path):
    slicerio's segment packing costs seconds on large images, which a RemotePredictor (which
    needs only the arrays) should not wait for."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays, records = {}, []
    for n, r in enumerate(results):
        arrays.update(encode_mask(r.mask, n))
        if prob_mode != NO_PROBABILITIES:
            arrays.update(encode_probability(r.probability, prob_mode, n))
        records.append(result_record(n, r, None if prob_mode == NO_PROBABILITIES else prob_mode))
    tmp = out_dir / "arrays.tmp.npz"
    meta = {"results": records, "shape": list(shape)}
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, out_dir / "arrays.npz")
        (out_dir / "result.json").write_text(json.dumps(meta))
    except OSError:  # a full disk: nothing half-written stays behind
        for name in ("arrays.tmp.npz", "arrays.npz", "result.json"):
            (out_dir / name).unlink(missing_ok=True)
        raise
    return meta


# ---- the worker process -------------------------------------------------------------------------
class SharedFlag:
    """A cancel flag in shared memory, set and read without a lock: a multiprocessing.Event's lock may be
    held by a worker at the moment it is stopped or killed, and the server must never wait on it."""

    def __init__(self, ctx) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)


def _flag_token(flag):
    """A CancelToken backed by the SharedFlag that the server process sets."""
    from ..runcontrol import CancelToken

    return CancelToken(flag)  # set()/is_set() shared across processes


def worker_main(conn, cancel_flag, device: str, options: dict[str, Any]) -> None:
    """Entry point of a worker process: start the heartbeat, load models, then run jobs sent over ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's business
    logging.basicConfig(level=options.get("log_level", "INFO"), format="%(asctime)s worker[%(process)d] %(message)s")
    lock = threading.Lock()  # the heartbeat thread and the job share the pipe

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    def heartbeat(interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                send((BEAT,))
            except (OSError, ValueError):
                return

    threading.Thread(target=heartbeat, args=(float(options.get("heartbeat_interval", 5.0)),), name="textseg-heartbeat",
                     daemon=True).start()
    state = WorkerState(device, options.get("adapter_options", {}), options.get("weights_dir"))
    for model in options.get("preload", ()):
        try:
            state.predictor(model)
        except Exception as exc:  # noqa: BLE001 - a missing model must not stop the worker
            log.error("preloading %s failed: %s", model, exc)
    send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        last = [0.0]

        def progress(frac: float, stage: str) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.05 or frac >= 1.0:  # noqa: B023 - runs in this iteration
                last[0] = now  # noqa: B023 - runs in this iteration
                send((PROGRESS, float(frac), stage))

        try:
            meta = state.run(job, progress, _flag_token(cancel_flag), Path(job["out_dir"]))
            send((DONE, meta))
        except Exception as exc:  # noqa: BLE001 - an event for the server, never a traceback for the client
            send(error_event(exc, job.get("id")))


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "it stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"it was killed by {name}{hint}"
    return f"it exited with code {code}"


class ProcessWorker(Worker):
    """One worker process on one device, fed by a dispatcher thread from the server's job queue; the thread also
    watches the worker's heartbeat and the running job's cancel and time limits."""

    def __init__(self, index: int, device: str, options: dict[str, Any], manager) -> None:
        super().__init__(index, device, manager)
        self.options = options
        self.ctx = mp.get_context("spawn")  # no fork: CUDA and uvicorn's threads do not survive it
        self.proc = None
        self.conn = None
        self.cancel_flag = SharedFlag(self.ctx)
        self.last_seen = time.monotonic()  # the worker's last message (a beat, progress, a result)
        self.heard = False  # any message from the current process yet?
        self.thread = threading.Thread(target=self._loop, name=f"textseg-dispatch-{index}", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def _spawn(self) -> None:
        parent, child = self.ctx.Pipe()
        self.cancel_flag.clear()
        self.proc = self.ctx.Process(target=worker_main, args=(child, self.cancel_flag, self.device, self.options),
                                     name=f"textseg-worker-{self.index}", daemon=True)
        self.last_seen, self.heard = time.monotonic(), False
        self.proc.start()
        child.close()
        self.conn = parent
        while not self.manager.stopping.is_set():
            if self.conn.poll(0.1):
                try:
                    msg = self._recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "ready":
                    self.ready = True
                    log.info("worker %d ready on %s (pid %d)", self.index, self.device, msg[1])
                    return
            elif not self.proc.is_alive():
                break
            elif self.silent():
                log.error("worker %d on %s stopped responding while starting; killing it", self.index, self.device)
                self._kill()
                break
        self.proc.join(1)
        log.error("worker %d on %s failed to start: %s", self.index, self.device, describe_exit(self.proc.exitcode))
        time.sleep(1.0)

    def stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        if self.proc is not None:
            self.proc.join(3)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(3)

    def _recv(self):
        msg = self.conn.recv()
        self.last_seen, self.heard = time.monotonic(), True
        return msg

    def silent(self) -> bool:
        """No sign of life for heartbeat_timeout seconds (before the first one: START_GRACE at least)."""
        hb = self.manager.settings.heartbeat_timeout
        if hb <= 0 or self.proc is None:
            return False
        return time.monotonic() - self.last_seen > (hb if self.heard else max(hb, START_GRACE))

    def _kill(self) -> None:
        """End a hung worker (SIGKILL also ends a stopped process); the dispatch loop starts a new one."""
        self.ready = False
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return bool(self.proc is not None and self.proc.is_alive())

    @property
    def responsive(self) -> bool:
        return not self.silent()

    # ---- dispatch ----------------------------------------------------------------------------
    def _available(self) -> bool:
        """A live, ready process; else (re)start one (this is the dispatcher thread's only job until it is)."""
        if self.proc is not None and self.proc.is_alive() and self.ready:
            return True
        if self.proc is not None:
            self.restarts += 1
        self.ready = False
        self._spawn()
        return False

    def _idle(self) -> None:
        """Between jobs: read the beats; replace a worker that stopped sending them."""
        try:
            while self.conn.poll(0):
                self._recv()
        except (EOFError, OSError):
            return  # dead: the loop restarts it
        if self.silent():
            log.error("worker %d on %s stopped responding (no heartbeat for %g s) while idle; replacing it",
                      self.index, self.device, self.manager.settings.heartbeat_timeout)
            self._kill()

    def _run(self, job) -> None:
        s = self.manager.settings
        self.cancel_flag.clear()
        job.start(self.device)
        try:
            self.conn.send(job.payload())
        except (OSError, BrokenPipeError):
            self._crashed(job)
            return
        while True:
            if job.cancel_requested:
                self.cancel_flag.set()
                if s.cancel_timeout > 0 and time.monotonic() - (job.cancel_mono or time.monotonic()) > s.cancel_timeout:
                    self._kill()
                    log.error("worker %d on %s did not stop within %g s of the cancel of job %s; replaced it",
                              self.index, self.device, s.cancel_timeout, job.id)
                    job.cancelled_before_results(f"cancelled: the worker did not stop within {s.cancel_timeout:g} s of "
                                                 f"the cancel, so the server replaced it (no results kept)")
                    return
            if self.silent():
                self._kill()
                log.error("worker %d on %s stopped responding (no heartbeat for %g s) during job %s; replaced it",
                          self.index, self.device, s.heartbeat_timeout, job.id)
                job.fail("ServerError",
                         f"The server's worker process on {self.device} stopped responding (no heartbeat "
                         f"for {s.heartbeat_timeout:g} s) while running this job; the server killed it and replaced "
                         f"it. Submit the job again, and tell the administrator if it happens again.")
                return
            if s.job_timeout > 0 and time.monotonic() - job.started_mono > s.job_timeout:
                self._kill()
                log.error("job %s ran past the job timeout (%g s); replaced worker %d", job.id, s.job_timeout,
                          self.index)
                job.fail("ServerError",
                         f"The job ran longer than this server allows ({s.job_timeout:g} s, --job-timeout); "
                         "the server stopped it and replaced its worker. Send fewer prompts or a smaller image, or ask "
                         "the administrator to raise --job-timeout.")
                return
            try:
                if self.conn.poll(0.05):
                    msg = self._recv()
                elif not self.proc.is_alive():
                    if self.conn.poll(0):
                        continue  # read what it said before it died
                    self._crashed(job)
                    return
                else:
                    continue
            except (EOFError, OSError):
                self._crashed(job)
                return
            if self.apply(job, msg):
                return

    def _crashed(self, job) -> None:
        self.proc.join(2)
        why = describe_exit(self.proc.exitcode)
        self.ready = False
        log.error("worker %d on %s died during job %s: %s; restarting it", self.index, self.device, job.id, why)
        job.fail("ServerError", f"The server's worker process on {self.device} died while running this job ({why}). "
                 "The server restarted the worker and keeps serving; submit the job again, and tell the administrator "
                 "if it happens again (the image may be too large for the device's memory).")
