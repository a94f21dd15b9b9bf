"""``textseg serve --ray``: the same HTTP API, with the inference workers as a Ray Serve deployment.

The FastAPI front end (uploads, jobs, queue, expiry, auth) is unchanged; each job is sent to the
``TextsegWorker`` deployment, whose replicas (one per GPU by default, ``num_gpus=1`` each) may
live on any machine of the Ray cluster. A job's image travels with it through Ray's object store.
The replica streams progress and, prompt group by prompt group, results back to the front end.
A DELETE cancels cooperatively, as the worker-process backend does: the front end calls the
replica's ``cancel(job_id)``, which sets the job's CancelToken, and keeps reading the stream up to
the replica's final message, so what the model returns after the cancel (the completed prompts,
a 2D model's or a recognition's partial results of the slices done, marked incomplete) is kept.
If the stream has not ended ``cancel_timeout`` seconds after the DELETE (a stuck or unreachable
replica), the Ray request itself is cancelled; then, as when the replica dies after the cancel,
the results streamed so far are kept and the job's messages say so. A replica that dies before
any cancel fails only its job; Ray Serve replaces it.

Hung replicas: while a job runs the replica streams a beat every ``heartbeat_interval`` seconds
when it has nothing else to say. A stream silent for ``Settings.heartbeat_timeout`` (a stopped or
lost replica) is cancelled and its job fails with that reason, as does a job past ``job_timeout``;
Ray Serve's own health check (set to the same timeout) replaces the replica, and the dispatcher
reports it unresponsive until the replica answers a ``ping`` again.

Each replica is its own single-replica deployment (application ``textseg-<n>``, fed by one
dispatcher thread), so that a cancel reaches the replica that runs the job.

``Settings.ray_options``: ``address`` (a cluster to join; default: start a local one),
``replicas``, ``num_gpus`` per replica, ``cancel_timeout`` (seconds; default
``Settings.cancel_timeout``), ``local_testing`` (Ray Serve's in-process local testing mode, used by
the tests).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from .backend import BEAT, CANCELLED, DONE, ERROR, FINAL_EVENTS, PROGRESS, RESULTS, Worker, error_event
from .wire import UINT8
from .workers import WorkerState, was_cancelled, write_outputs

log = logging.getLogger("textseg.server")
FIRST_MESSAGE_GRACE = 30.0  # seconds a job's stream may take to say anything at all


def _iter_job(state: WorkerState, job: dict[str, Any], token, lock: threading.Lock, beat: float = 5.0):
    """Run a job in a thread (one at a time: ``lock``); yield ("progress", f, stage), ("results", [...]),
    ("beat",) after ``beat`` seconds without another message, then a final message. ``token`` is set by a
    cooperative cancel; the run then returns what it has."""
    q: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            with lock:  # a job whose request was cancelled may still be stopping
                state.execute(job, lambda f, s: q.put((PROGRESS, float(f), s)), token,
                              lambda rs: q.put((RESULTS, rs)))
                q.put((DONE, list(state.predictor(job["model"]).messages), token.cancelled))
        except Exception as exc:  # noqa: BLE001 - an event for the front end, never a traceback for the client
            q.put(error_event(exc, job.get("id")))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            try:
                msg = q.get(timeout=beat)
            except queue.Empty:
                yield (BEAT,)
                continue
            yield msg
            if msg[0] in FINAL_EVENTS:
                return
    finally:  # also when the request is cancelled (fallback): stop the model, keep nothing running
        token.cancel()
        thread.join()


def make_deployment(num_gpus: float, health_timeout: float = 30.0):
    from ray import serve

    @serve.deployment(ray_actor_options={"num_gpus": num_gpus}, max_ongoing_requests=3,  # a run, its cancel, a ping
                      health_check_period_s=max(1.0, min(10.0, health_timeout / 3)),
                      health_check_timeout_s=health_timeout)
    class TextsegWorker:
        def __init__(self, options: dict[str, Any]) -> None:
            device = "cuda" if num_gpus else options.get("device", "cpu")
            self.state = WorkerState(device, options.get("adapter_options", {}), options.get("weights_dir"))
            self.tokens: dict[str, Any] = {}  # job id -> CancelToken of the running job
            self.lock = threading.Lock()
            self.beat = float(options.get("heartbeat_interval", 5.0))
            for model in options.get("preload", ()):
                self.state.predictor(model)

        def run(self, job: dict[str, Any]):
            from ..runcontrol import CancelToken

            token = self.tokens[job["id"]] = CancelToken()
            try:
                yield from _iter_job(self.state, job, token, self.lock, self.beat)
            finally:
                self.tokens.pop(job["id"], None)

        def cancel(self, job_id: str) -> bool:
            """Set the job's CancelToken; False when this replica does not run it (yet)."""
            return _cancel(self.tokens, job_id)

        def ping(self) -> bool:
            return True

    return TextsegWorker


def _cancel(tokens: dict[str, Any], job_id: str) -> bool:
    token = tokens.get(job_id)
    if token is not None:
        token.cancel()
    return token is not None


class RayDispatcher(Worker):
    """Feeds one replica of the deployment from the server's queue (one dispatcher per replica)."""

    dispatch_failed = "The Ray worker running this job failed ({kind}); submit the job again."

    def __init__(self, index: int, handle, manager, cancel_timeout: float = 60.0) -> None:
        super().__init__(index, "ray", manager)
        self.handle, self.cancel_timeout = handle, cancel_timeout
        self.ready = True
        self.answering = True  # False from a silent stream until the replica answers a ping
        self.last_seen = time.monotonic()
        self.heard = False  # any message of the running job's stream yet?
        self.thread = threading.Thread(target=self._loop, name=f"textseg-ray-dispatch-{index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.join(5)

    @property
    def responsive(self) -> bool:
        return self.answering

    def _available(self) -> bool:
        """After a silent stream: wait until the replica (or Ray Serve's replacement of it) answers a ping."""
        if self.answering:
            return True
        try:
            if self.handle.ping.remote().result(timeout_s=5.0):
                self.answering = True
                log.info("Ray replica %d answers again", self.index)
        except Exception:  # noqa: BLE001 - still down: try again
            self.manager.stopping.wait(1.0)
        return False

    def _run(self, job) -> None:
        payload = job.payload()
        payload["array"] = np.load(payload.pop("volume_path"), allow_pickle=False)
        job.start("ray")
        self.last_seen, self.heard = time.monotonic(), False
        stream = self.handle.options(stream=True).run.remote(payload)
        stop, forced = threading.Event(), threading.Event()
        hung: dict[str, Any] = {}  # set by _watch when it gives up on a silent or overdue stream
        threading.Thread(target=self._watch, args=(job, stream, stop, forced, hung), daemon=True).start()
        results: list[Any] = []
        final, broke = None, ""
        try:
            for msg in stream:
                self.last_seen, self.heard = time.monotonic(), True
                if msg[0] == PROGRESS:
                    self.apply(job, msg)
                elif msg[0] == RESULTS:
                    results.extend(msg[1])
                elif msg[0] == BEAT:
                    continue
                else:
                    final = msg
                    break
        except Exception as exc:  # noqa: BLE001
            if not (job.cancel_requested or hung):
                raise
            broke = type(exc).__name__
            log.info("job %s cancelled on Ray (%s)", job.id, broke)
        finally:
            stop.set()
        if hung and final is None:
            if hung["silent"]:  # Ray Serve's health check replaces the replica: unresponsive until one answers
                self.answering = False
                self.restarts += 1
            job.fail("ServerError", hung["reason"])
            return
        if final is not None and (final[0] == ERROR or (final[0] == CANCELLED and not results)):
            self.apply(job, final)
            return
        if final is None and not job.cancel_requested:
            raise RuntimeError("the Ray stream ended without a result")
        meta = write_outputs(job.dir, job.volume.shape[:3], results, job.request.get("probabilities", UINT8))
        meta["messages"] = final[1] if final is not None and final[0] == DONE else []
        if final is None:  # the stream ended without the replica's last word: say why
            why = (f"did not stop within {self.cancel_timeout:g} s of the cancel; its request was cancelled"
                   if forced.is_set() else f"stopped answering after the cancel ({broke or 'stream ended'})")
            meta["messages"].append(f"The Ray worker {why}, and only the results it had sent before were kept.")
        meta["cancelled"] = was_cancelled(job.request, results, job.cancel_requested)
        job.finish(meta)

    def _watch(self, job, stream, stop: threading.Event, forced: threading.Event, hung: dict[str, Any]) -> None:
        """DELETE -> the replica's cancel(job_id) (cooperative: the stream goes on to the final message);
        no final message within cancel_timeout -> cancel the Ray request itself. A stream silent for
        heartbeat_timeout, or a job past job_timeout -> cancel the request; the job fails (``hung``)."""
        s = self.manager.settings
        deadline, told = None, False
        while not stop.wait(0.05):
            now = time.monotonic()
            # before its first message a request may still wait for its replica (e.g. one Ray Serve is replacing)
            limit = s.heartbeat_timeout if self.heard else max(s.heartbeat_timeout, FIRST_MESSAGE_GRACE)
            silent = s.heartbeat_timeout > 0 and now - self.last_seen > limit
            overdue = s.job_timeout > 0 and job.started_mono is not None and now - job.started_mono > s.job_timeout
            if (silent or overdue) and not job.cancel_requested:
                hung["silent"] = silent
                hung["reason"] = (
                    f"The Ray worker running this job stopped responding (no heartbeat for {s.heartbeat_timeout:g} s); "
                    f"the server cancelled the request and Ray Serve replaces the replica. Submit the job again, and "
                    f"tell the administrator if it happens again." if silent else
                    f"The job ran longer than this server allows ({s.job_timeout:g} s, --job-timeout); the server "
                    f"stopped it. Send fewer prompts or a smaller image, or ask the administrator to raise "
                    f"--job-timeout.")
                log.error("job %s on Ray replica %d: %s", job.id, self.index,
                          "no heartbeat" if silent else "job timeout")
                stream.cancel()
                return
            if not job.cancel_requested:
                continue
            deadline = deadline or now + self.cancel_timeout
            if not told:  # False until the replica has registered the job (the request may be in transit)
                try:
                    told = bool(self.handle.cancel.remote(job.id).result(timeout_s=max(0.1, min(5.0, deadline - now))))
                except Exception as exc:  # noqa: BLE001 - a dead or busy replica: the deadline decides
                    log.warning("cancel of job %s not delivered to Ray (%s)", job.id, type(exc).__name__)
            if time.monotonic() >= deadline:
                log.warning("job %s: the Ray worker did not stop within %g s of the cancel; cancelling the request",
                            job.id, self.cancel_timeout)
                forced.set()
                stream.cancel()
                return


class RayBackend:
    def __init__(self, manager) -> None:
        self.manager = manager
        self.local_testing = False
        self.started_ray = False
        self.apps: list[str] = []

    def start(self) -> list[RayDispatcher]:
        import ray
        from ray import serve

        s = self.manager.settings
        opts = s.ray_options or {}
        self.local_testing = bool(opts.get("local_testing"))
        if not self.local_testing and not ray.is_initialized():
            self.started_ray = True
            ray.init(address=opts.get("address"), ignore_reinit_error=True, log_to_driver=False)
        gpus = opts.get("num_gpus")
        if gpus is None:
            gpus = 1 if (not self.local_testing and ray.is_initialized() and ray.cluster_resources().get("GPU")) else 0
        replicas = int(opts.get("replicas") or (int(ray.cluster_resources().get("GPU", 0)) if gpus else 0) or 1)
        from .backend import heartbeat_interval

        options = {"adapter_options": s.adapter_options, "weights_dir": s.weights_dir, "preload": tuple(s.preload),
                   "device": s.devices[0] if s.devices and s.devices[0] != "auto" else "cpu",
                   "heartbeat_interval": heartbeat_interval(s)}
        # one single-replica application per dispatcher: a cancel must reach the replica running the job
        self.apps = [f"textseg-{i}" for i in range(replicas)]
        health = s.heartbeat_timeout if s.heartbeat_timeout > 0 else 30.0
        apps = [make_deployment(gpus, health).bind(options) for _ in self.apps]
        if hasattr(serve, "run_many"):  # Ray >= 2.4x: the replicas start (load their models) at the same time
            handles = serve.run_many([serve.RunTarget(app, name=name, route_prefix=None)
                                      for app, name in zip(apps, self.apps)],
                                     _local_testing_mode=self.local_testing)
        else:
            handles = [serve.run(app, name=name, route_prefix=None, _local_testing_mode=self.local_testing)
                       for app, name in zip(apps, self.apps)]
        timeout = float(opts.get("cancel_timeout") or s.cancel_timeout or 60.0)
        dispatchers = [RayDispatcher(i, h, self.manager, timeout) for i, h in enumerate(handles)]
        for d in dispatchers:
            d.start()
        log.info("Ray Serve deployment up: %d replica(s), %s GPU each", replicas, gpus)
        return dispatchers

    def stop(self) -> None:
        if not self.local_testing:
            try:
                from ray import serve

                for name in self.apps:
                    serve.delete(name)
                if self.started_ray:  # a local Ray instance we started: take its processes down too
                    import ray

                    serve.shutdown()
                    ray.shutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
