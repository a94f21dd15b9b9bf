"""``textseg serve --ray``: the same HTTP API, with the inference workers as a Ray Serve deployment.

The FastAPI front end (uploads, jobs, queue, expiry, auth) is unchanged; each job is sent to the
``TextsegWorker`` deployment, whose replicas (one per GPU by default, ``num_gpus=1`` each) may
live on any machine of the Ray cluster. A job's image travels with it through Ray's object store.
The replica streams progress and, prompt group by prompt group, results back to the front end;
a DELETE cancels the Ray request, which stops the model through its CancelToken, and the
completed prompts are kept. A replica that dies fails only its job; Ray Serve replaces it.

``Settings.ray_options``: ``address`` (a cluster to join; default: start a local one),
``replicas``, ``num_gpus`` per replica, ``local_testing`` (Ray Serve's in-process local testing
mode, used by the tests).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Dict, List

import numpy as np

from .server_workers import WorkerState, was_cancelled, write_outputs

log = logging.getLogger("textseg.server")


def _iter_job(state: WorkerState, job: Dict[str, Any]):
    """Run a job in a thread; yield ("progress", f, stage), ("results", [...]), then a final message."""
    from .errors import Cancelled, TextsegError
    from .models.base import CancelToken

    q: "queue.Queue" = queue.Queue()
    token = CancelToken()

    def work() -> None:
        try:
            state.execute(job, lambda f, s: q.put(("progress", float(f), s)), token, lambda rs: q.put(("results", rs)))
            q.put(("done", list(state.predictor(job["model"]).messages), token.cancelled))
        except Cancelled as exc:
            q.put(("cancelled", str(exc)))
        except TextsegError as exc:
            q.put(("error", type(exc).__name__, str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported without a traceback
            log.exception("job %s failed", job.get("id"))
            q.put(("error", "ModelError", f"The model failed on the server ({type(exc).__name__}: {str(exc)[:300]})."))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            msg = q.get()
            yield msg
            if msg[0] in ("done", "cancelled", "error"):
                return
    finally:  # also when the request is cancelled: stop the model, keep nothing running
        token.cancel()
        thread.join()


def make_deployment(num_gpus: float):
    from ray import serve

    @serve.deployment(ray_actor_options={"num_gpus": num_gpus}, max_ongoing_requests=1)
    class TextsegWorker:
        def __init__(self, options: Dict[str, Any]) -> None:
            device = "cuda" if num_gpus else options.get("device", "cpu")
            self.state = WorkerState(device, options.get("adapter_options", {}), options.get("weights_dir"))
            for model in options.get("preload", ()):
                self.state.predictor(model)

        def run(self, job: Dict[str, Any]):
            yield from _iter_job(self.state, job)

    return TextsegWorker


class RayDispatcher:
    """Feeds the deployment from the server's queue (one per replica); mirrors ProcessWorker."""

    def __init__(self, index: int, handle, manager) -> None:
        self.index, self.handle, self.manager = index, handle, manager
        self.job = None
        self.ready = True
        self.restarts = 0
        self.thread = threading.Thread(target=self._loop, name=f"textseg-ray-dispatch-{index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.join(5)

    def info(self) -> Dict[str, Any]:
        return {"index": self.index, "device": "ray", "pid": None, "alive": True, "ready": True,
                "job": self.job.id if self.job is not None else None, "restarts": self.restarts}

    def _loop(self) -> None:
        while not self.manager.stopping.is_set():
            job = self.manager.next_job(timeout=0.2)
            if job is None:
                continue
            self.job = job
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - a dead replica, a lost node...
                log.exception("ray job %s failed", job.id)
                job.fail("ServerError", f"The Ray worker running this job failed ({type(exc).__name__}); submit the job again.")
            finally:
                self.job = None

    def _run(self, job) -> None:
        payload = job.payload()
        payload["array"] = np.load(payload.pop("volume_path"), allow_pickle=False)
        job.start("ray")
        stream = self.handle.options(stream=True).run.remote(payload)
        stop = threading.Event()

        def watch() -> None:  # DELETE -> cancel the Ray request (the replica stops via its CancelToken)
            while not stop.wait(0.05):
                if job.cancel_requested:
                    stream.cancel()
                    return

        threading.Thread(target=watch, daemon=True).start()
        results: List[Any] = []
        final = None
        try:
            for msg in stream:
                if msg[0] == "progress":
                    job.set_progress(msg[1], msg[2])
                elif msg[0] == "results":
                    results.extend(msg[1])
                else:
                    final = msg
                    break
        except Exception as exc:  # noqa: BLE001
            if not job.cancel_requested:
                raise
            log.info("job %s cancelled on Ray (%s)", job.id, type(exc).__name__)
        finally:
            stop.set()
        if final is not None and final[0] == "error":
            job.fail(final[1], final[2])
            return
        if final is not None and final[0] == "cancelled" and not results:
            job.cancelled_before_results()
            return
        if final is None and not job.cancel_requested:
            raise RuntimeError("the Ray stream ended without a result")
        meta = write_outputs(job.dir, job.volume.shape[:3], results, job.request.get("probabilities", "uint8"))
        meta["messages"] = final[1] if final is not None and final[0] == "done" else []
        meta["cancelled"] = was_cancelled(job.request, results, job.cancel_requested)
        job.finish(meta)


class RayBackend:
    def __init__(self, manager) -> None:
        self.manager = manager
        self.local_testing = False
        self.started_ray = False

    def start(self) -> List[RayDispatcher]:
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
        options = {"adapter_options": s.adapter_options, "weights_dir": s.weights_dir, "preload": tuple(s.preload),
                   "device": s.devices[0] if s.devices and s.devices[0] != "auto" else "cpu"}
        app = make_deployment(gpus).options(num_replicas=replicas).bind(options)
        handle = serve.run(app, name="textseg", route_prefix=None, _local_testing_mode=self.local_testing)
        dispatchers = [RayDispatcher(i, handle, self.manager) for i in range(replicas)]
        for d in dispatchers:
            d.start()
        log.info("Ray Serve deployment up: %d replica(s), %s GPU each", replicas, gpus)
        return dispatchers

    def stop(self) -> None:
        if not self.local_testing:
            try:
                from ray import serve

                serve.delete("textseg")
                if self.started_ray:  # a local Ray instance we started: take its processes down too
                    import ray

                    serve.shutdown()
                    ray.shutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
