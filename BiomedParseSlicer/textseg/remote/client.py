"""RemotePredictor: the Predictor contract over HTTP (requests + numpy only; runs inside Slicer).

    predictor = RemotePredictor("https://gpu.example.org", "deepbet", api_key="...")
    predictor.set_image(volume, modality="MRI")        # uploads once (sha256), prepares the image
    results = predictor.predict(["brain"])             # list[PromptResult], as locally

``set_image`` uploads the volume unless the server already holds it (HEAD by sha256), then runs
a job that prepares (encodes) it, so errors such as an unsupported modality surface here, as with
the local Predictor. ``predict`` runs a job and rebuilds the PromptResults from the job's JSON
metadata (prompt, existence, present, message, provenance, extra) and its arrays: masks exact
(bit-packed), probabilities uint8-quantized by default (|error| <= 1/510; pass
``probabilities="float32"`` for exact ones or ``"none"`` to skip them). The job's ``.seg.nrrd``
(written on the server with textseg.formats.segments) is saved by ``download_seg_nrrd(last_job, path)``. Progress
comes from a long poll of the job; a CancelToken cancels the job on the server (DELETE); completed prompts
are kept. A busy server (429, 503) is retried for up to ``busy_timeout`` seconds, honouring its
Retry-After, then reported as a ServerError saying it is busy; a volume the server expired is
uploaded again transparently.

The server shows each client only its own jobs and images. A client is its API key plus the
random client token RemotePredictor sends (``X-Textseg-Client``): one per process by default, so
every predictor of one program (one Slicer session, one CLI run) shares its uploads, and two
programs on one machine, even without a key, cannot see or cancel each other's work.
"""

from __future__ import annotations

import gzip
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from .. import errors
from ..analysis.confidence import DEFAULT_BAND, ModelAnswer, check_band, check_threshold
from ..catalog import ModelSpec, WeightFile
from ..errors import AuthError, Cancelled, InputError, ServerError, UsageError
from ..predictor import PromptLike, PromptResult, check_prompts
from ..prompts import Prompt, parse_prompts
from ..runcontrol import CancelToken, ProgressFn, kept_summary, sub_progress
from ..volume import Volume
from .wire import (
    API_VERSION,
    CANCELLED,
    CLIENT_HEADER,
    CLIENT_TOKEN,
    FAILED,
    FINAL_STATES,
    NO_PROBABILITIES,
    PROBABILITY_MODES,
    UINT8,
    VOLUME_NOT_FOUND,
    WEIGHTS_MISSING,
    client_headers,
    decode_mask,
    decode_probability,
    is_loopback,
    load_npz,
    mask_from_text,
    prompt_limits_error,
    result_from_record,
    sha256,
    volume_to_nrrd,
)

_BUSY_STATUS = (429, 503)  # the server says: not now (queue full, no worker ready); retried for busy_timeout
_RETRY_STATUS = (502, 504)  # a proxy lost the server for a moment; retried `retries` times
_PROCESS_TOKEN = secrets.token_urlsafe(24)  # this program's client token (see the module docstring)


def spec_from_dict(d: dict[str, Any]) -> ModelSpec:
    fields = set(ModelSpec.__dataclass_fields__)
    kw = {k: v for k, v in d.items() if k in fields}
    file_fields = WeightFile.__dataclass_fields__
    kw["files"] = tuple(WeightFile(**{k: v for k, v in f.items() if k in file_fields}) for f in d.get("files", ()))
    for k in ("modalities", "prompt_kinds", "sites", "vocabulary"):
        kw[k] = tuple(kw.get(k) or ())
    return ModelSpec(**kw)


class RemotePredictor:
    """Same contract as textseg.predictor.Predictor (``textseg.predictor.PredictorProtocol``: shapes, frames and
    signatures there), running on a textseg server."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: Optional[str] = None,
        timeout: float = 3600.0,
        request_timeout: tuple[float, float] = (5.0, 120.0),
        retries: int = 5,
        backoff: float = 0.5,
        probabilities: str = UINT8,
        compress: Optional[bool] = None,
        verify: Union[bool, str] = True,
        session: Any = None,
        client_token: Optional[str] = None,
        busy_timeout: float = 300.0,
    ) -> None:
        """``timeout``: the longest a set_image/predict call waits for its job (seconds);
        ``request_timeout``: (connect, read) of each HTTP request; ``compress``: gzip uploads
        (default: yes unless the server is on this machine); ``retries``/``backoff``: how
        often and how patiently dropped connections and 502/504 are retried; ``busy_timeout``:
        how long a busy server (429 queue full, 503) is retried, honouring its Retry-After, before
        a ServerError; ``verify``: TLS verification (True, or a CA bundle path for a private CA);
        ``client_token``: this client's identity on the server besides its key (default:
        $TEXTSEG_CLIENT_TOKEN, else one random token per process)."""
        import requests

        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("TEXTSEG_API_KEY")
        self.timeout = float(timeout)
        self.request_timeout = request_timeout
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.busy_timeout = float(busy_timeout)
        token = client_token or os.environ.get("TEXTSEG_CLIENT_TOKEN") or _PROCESS_TOKEN
        if not CLIENT_TOKEN.fullmatch(token):
            raise UsageError("The client token (client_token / TEXTSEG_CLIENT_TOKEN) must be 16-128 letters, digits or "
                             "_.~-.")
        if probabilities not in PROBABILITY_MODES:
            raise UsageError(f"probabilities must be one of {', '.join(repr(m) for m in PROBABILITY_MODES)}.")
        self.probabilities = probabilities
        self.compress = compress if compress is not None else not _is_loopback_url(self.url)
        self.http = session or requests.Session()
        self.http.verify = verify
        self.http.headers.update(client_headers())
        self.http.headers[CLIENT_HEADER] = token
        if self.api_key:
            self.http.headers["Authorization"] = f"Bearer {self.api_key}"
        self.messages: list[str] = []
        self.last_job: Optional[str] = None  # id of the last predict job (see download_seg_nrrd)
        self._volume: Optional[Volume] = None
        self._sha: Optional[str] = None
        self._nrrd: Optional[bytes] = None
        self._image: dict[str, Any] = {}
        self.server = self._request("GET", "/v1/health").json()
        self.spec: ModelSpec = self._find_spec(model)

    # ---- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, expect: Sequence[int] = (200,), cancel: Optional[CancelToken] = None,
                 waiting: Optional[Callable[[str], None]] = None, **kw: Any):
        """One request, retried while the server is busy (429/503: up to busy_timeout seconds, honouring
        Retry-After; ``waiting`` hears why, ``cancel`` ends the wait with Cancelled), on 502/504 and on dropped
        connections (``retries``); errors -> textseg.errors."""
        import requests

        delay = self.backoff
        attempt = 0
        busy_until: Optional[float] = None
        while True:
            try:
                r = self.http.request(method, self.url + path, timeout=self.request_timeout, **kw)
            except requests.exceptions.SSLError as exc:
                raise ServerError(f"TLS error talking to {self.url}: {exc}. Check the certificate (verify=CA bundle "
                                  f"path).") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                # a POST that may have reached the server is not repeated (it would run the job twice);
                # an unreachable server is reported after two quick retries, not after minutes
                unsent = isinstance(exc, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(exc)
                if attempt >= min(self.retries, 2) or (method == "POST" and not unsent):
                    raise ServerError(f"Cannot reach the textseg server at {self.url} ({type(exc).__name__}). Is it "
                                      "running (`textseg serve`), is the address right, and does a firewall allow "
                                      "it?") from None
                attempt += 1
                self._sleep(delay, cancel)
                delay = min(delay * 2, 30.0)
                continue
            if r.status_code in _BUSY_STATUS and r.status_code not in expect:
                now = time.monotonic()
                busy_until = busy_until or now + self.busy_timeout
                wait = _retry_after(r, delay)
                if now + wait > busy_until:
                    raise _busy_error(r, self.url, self.busy_timeout)
                if waiting is not None:
                    waiting(f"server busy ({_reason(r)}): retrying in {wait:.0f} s")
                self._sleep(wait, cancel)
                delay = min(max(delay * 2, wait), 30.0)
                continue
            if r.status_code in _RETRY_STATUS and attempt < self.retries:
                attempt += 1
                self._sleep(_retry_after(r, delay), cancel)
                delay = min(delay * 2, 30.0)
                continue
            if r.status_code in expect:
                return r
            raise _http_error(r, self.url)

    @staticmethod
    def _sleep(seconds: float, cancel: Optional[CancelToken]) -> None:
        end = time.monotonic() + seconds
        while True:
            if cancel is not None and cancel.cancelled:
                raise Cancelled("Cancelled while waiting for the server; nothing was run.")
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def _find_spec(self, model: str) -> ModelSpec:
        for d in self._request("GET", "/v1/models").json()["models"]:
            if d["id"] == model:
                if not d.get("ready", True):
                    raise errors.WeightsError(f"The server at {self.url} does not have the weights of '{model}'; its "
                                              f"administrator must run `textseg models download {model}`.")
                return spec_from_dict(d)
        raise UsageError(f"The server at {self.url} does not offer model '{model}'. See its /v1/models.")

    # ---- the contract ----------------------------------------------------------------------------
    def set_image(
        self,
        volume: Volume,
        modality: Optional[str] = None,
        site: Optional[str] = None,
        slices: Optional[tuple[int, int]] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        """Upload the image (once) and prepare it on the server."""
        volume.check_usable()
        self._volume = volume
        self._nrrd = volume_to_nrrd(volume)
        self._sha = sha256(self._nrrd)
        self._image = {"modality": modality, "site": site, "slices": list(slices) if slices is not None else None}
        self._upload(progress)
        job = self._run_job([], progress, cancel, scale=(0.1, 1.0))
        if job["state"] == CANCELLED:
            raise Cancelled("Cancelled by the user while the image was being prepared.")

    def check_prompts(self, prompts: Union[str, Sequence[PromptLike]]) -> list[Prompt]:
        """Parse and validate prompts against the server's model without running it."""
        return check_prompts(self.spec, prompts)

    def reset_image(self) -> None:
        self._volume = self._sha = self._nrrd = None
        self._image = {}

    def predict(
        self,
        prompts: Union[str, Sequence[PromptLike]],
        threshold: Optional[float] = None,
        keep_absent: bool = False,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
    ) -> list[PromptResult]:
        """One result per prompt (completed ones only after a cancel), as the local Predictor."""
        if self._volume is None:
            raise UsageError("No image set: call set_image(volume, modality) before predict().")
        plist = [p.to_dict() for p in parse_prompts(prompts)]
        too_many = prompt_limits_error(plist)
        if too_many:
            raise UsageError(too_many)
        if threshold is not None:  # a plain float: JSON has no NaN or numpy scalars
            threshold = check_threshold(threshold)
        job = self._run_job(plist, progress, cancel, threshold=threshold, keep_absent=bool(keep_absent))
        self.last_job = job["id"]
        results = self._results(job) if job.get("results") else []
        if job["state"] == CANCELLED:  # as Predictor.predict says it (a 2D model's results may be partial)
            done = sum(r.complete for r in results)
            self.messages.append(f"Cancelled: {kept_summary(done, len(plist), len(results) - done)}.")
        return results

    def recognize(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                  **options: Any) -> list[PromptResult]:
        """Recognition ("segment everything") on the server, as the local Predictor.recognize (same JSON-able
        options): one result per target found, named after it, with detection ``objects``. (Instance label
        maps of an instance split stay on the server; each instance is one entry of ``objects``.)"""
        if self._volume is None:
            raise UsageError("No image set: call set_image(volume, modality) before recognize().")
        if not self.spec.recognition:
            raise UsageError(f"Model '{self.model}' has no recognition ('segment everything'): give prompts to "
                             f"predict().")
        job = self._run_job([], progress, cancel, recognize=options or True)
        self.last_job = job["id"]
        if job["state"] == CANCELLED:
            self.messages.append(f"Cancelled: kept the {job['results'] or 0} target(s) found in the slices completed.")
        return self._results(job) if job.get("results") else []

    # ---- helpers -------------------------------------------------------------------------------
    def _upload(self, progress: Optional[ProgressFn]) -> None:
        assert self._nrrd is not None and self._sha is not None
        r = self._request("HEAD", f"/v1/volumes/{self._sha}", expect=(200, 404))
        if r.status_code == 200:
            return
        limit = self.server.get("max_upload_bytes")
        if limit and len(self._nrrd) > limit:
            raise InputError(f"The image ({len(self._nrrd) / 2**20:.0f} MiB) is larger than the server accepts "
                             f"({limit / 2**20:.0f} MiB). Crop it, or ask the administrator to raise --max-upload-mb.")
        if progress:
            progress(0.0, "uploading image")
        body, headers = self._nrrd, {"Content-Type": "application/octet-stream"}
        if self.compress:
            body, headers["Content-Encoding"] = gzip.compress(self._nrrd, 1), "gzip"
        self._request("PUT", f"/v1/volumes/{self._sha}", expect=(200, 201), data=body, headers=headers)

    def _submit(self, body: dict[str, Any], progress, cancel=None) -> dict[str, Any]:
        waiting = (lambda stage: progress(0.0, stage)) if progress is not None else None
        r = self._request("POST", "/v1/jobs", expect=(202, 404), json=body, cancel=cancel, waiting=waiting)
        if r.status_code == 404 and r.json().get("error") == VOLUME_NOT_FOUND:
            self._upload(progress)  # the server expired our session: send the image again
            r = self._request("POST", "/v1/jobs", expect=(202,), json=body, cancel=cancel, waiting=waiting)
        elif r.status_code == 404:
            raise _http_error(r, self.url)
        return r.json()

    def _run_job(self, prompts, progress, cancel, scale=(0.0, 1.0), **options: Any) -> dict[str, Any]:
        body = {"volume": self._sha, "model": self.model, **self._image, "prompts": prompts,
                "probabilities": self.probabilities, **options}
        try:
            job = self._submit(body, progress, cancel)
        except Cancelled:  # cancelled while a busy server made us wait: no job exists, nothing was run
            return {"id": None, "state": CANCELLED, "stage": CANCELLED, "progress": 0.0, "results": 0,
                    "messages": []}
        scaled = sub_progress(progress, *scale)
        deadline = time.monotonic() + self.timeout
        cancelled = False
        while job["state"] not in FINAL_STATES:
            if cancel is not None and cancel.cancelled and not cancelled:
                cancelled = True
                job = self._request("DELETE", f"/v1/jobs/{job['id']}").json()
                continue
            if time.monotonic() > deadline:
                self._request("DELETE", f"/v1/jobs/{job['id']}")
                raise ServerError(f"The job did not finish within {self.timeout:g} s (it was {job['stage']}); it was "
                                  f"cancelled. Raise the client's timeout for large images or busy servers.")
            job = self._request("GET", f"/v1/jobs/{job['id']}", params={"wait": 1.0, "version": job["version"]}).json()
            if scaled is not None:
                scaled(job["progress"], job["stage"])
        self.messages.extend(job.get("messages") or [])
        if job["state"] == FAILED:
            err = job.get("error") or {}
            cls = getattr(errors, err.get("type", ""), None)
            cls = cls if isinstance(cls, type) and issubclass(cls, errors.TextsegError) else ServerError
            raise cls(err.get("message") or "The job failed on the server.")
        return job

    def _fetch(self, jid: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A finished job's result.json and arrays."""
        meta = self._request("GET", f"/v1/jobs/{jid}/result.json").json()
        accept = {} if self.compress else {"Accept-Encoding": "identity"}  # loopback: skip gzip both ways
        r = self._request("GET", f"/v1/jobs/{jid}/arrays", headers=accept, stream=True)
        try:
            data = r.raw.read(decode_content=True)  # one read: requests' 10 kB .content chunks are slow for 100 MB
        finally:
            r.close()
        return meta, load_npz(data)

    def _mask(self, arrays: dict[str, np.ndarray], record: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        mask = decode_mask(arrays, record["index"], shape)
        wrong_shape = self._volume is not None and shape != self._volume.shape
        if wrong_shape or int(np.count_nonzero(mask)) != record["voxel_count"]:
            raise ServerError("The server's result does not match the image (shape or voxel count); try again.")
        return mask

    def _results(self, job: dict[str, Any]) -> list[PromptResult]:
        meta, arrays = self._fetch(job["id"])
        assert self._volume is not None
        shape = tuple(meta["shape"])
        out = []
        for rec in meta["results"]:
            mask = self._mask(arrays, rec, shape)
            # probabilities="none": the mask stands for them (values 0/1, uint8, no second full-size copy)
            prob = decode_probability(arrays, rec["index"], shape) if rec["probability"] else mask
            out.append(result_from_record(rec, mask, prob))
        return out

    # ---- the model's answer, kept (textseg.analysis.confidence) ----------------------------------------------
    def model_answers(self, job_id: Optional[str] = None) -> list[ModelAnswer]:
        """The model's answers of a finished job (default: the last predict or recognize), one per result, with
        the uint8 probability maps as they travelled (no float32 copy; a float32 job's maps are quantized by the
        same rule): what textseg.analysis.confidence keeps for re-thresholding and review. UsageError when the
        job ran with probabilities="none"."""
        jid = self._job_id(job_id)
        meta, arrays = self._fetch(jid)
        shape = tuple(meta["shape"])
        out = []
        for rec in meta["results"]:
            if not rec["probability"]:
                raise UsageError(f"Job {jid} kept no probability maps (this client asked for probabilities="
                                 f"{NO_PROBABILITIES!r}); use probabilities='uint8' to keep the model's answers.")
            mask = self._mask(arrays, rec, shape)
            out.append(ModelAnswer.from_uint8(decode_probability(arrays, rec["index"], shape, keep_uint8=True), mask,
                                              rec["provenance"]["threshold"], rec["existence"],
                                              dropped=not rec["present"] and not mask.any()))
        return out

    def rethreshold(self, threshold: float, segments: Optional[Sequence[Union[int, str]]] = None,
                    job_id: Optional[str] = None, keep_absent: Optional[bool] = None,
                    band: float = DEFAULT_BAND) -> list[Rethresholded]:
        """New masks of a finished job's results (default: the last predict or recognize) at ``threshold``,
        computed on the server from the maps it kept, without running the model again: the same rule as
        ``ModelAnswer.mask_at`` locally (textseg.analysis.confidence). ``segments``: result indices or names
        (default all); ``keep_absent``: default the job's. UsageError when the job kept no maps."""
        jid = self._job_id(job_id)
        # checked here as plain floats and ints: JSON has no NaN, and numpy scalars (a slider's value, an index
        # from np.flatnonzero) are not JSON at all
        body: dict[str, Any] = {"threshold": check_threshold(threshold), "band": check_band(band)}
        if segments is not None:
            body["segments"] = [int(s) if isinstance(s, np.integer) else s for s in segments]
        if keep_absent is not None:
            body["keep_absent"] = bool(keep_absent)
        out = self._request("POST", f"/v1/jobs/{jid}/rethreshold", json=body).json()
        shape = tuple(out["shape"])
        return [Rethresholded(r["index"], r["name"], Prompt.from_any(r["prompt"]), r["threshold"],
                              mask_from_text(r["mask"], shape), r["confidence"]) for r in out["results"]]

    def _job_id(self, job_id: Optional[str]) -> str:
        jid = job_id or self.last_job
        if not jid:
            raise UsageError("No job yet: run predict() or recognize() first, or give a job_id.")
        return jid

    def download_seg_nrrd(self, job_id: str, path: Union[str, os.PathLike], overwrite: bool = False) -> str:
        """Save a finished job's .seg.nrrd (written on the server with textseg.formats.segments) to ``path``."""
        from ..formats.atomic import atomic_output

        data = self._request("GET", f"/v1/jobs/{job_id}/result").content
        with atomic_output(path, overwrite) as tmp:
            tmp.write_bytes(data)
        return str(path)


@dataclass
class Rethresholded:
    """One result of a job re-thresholded on the server: its index and name in the job, its new mask (bool,
    (k, j, i) on the image's grid) and the model's confidence in it (textseg.analysis.confidence.confidence)."""

    index: int
    name: str
    prompt: Prompt
    threshold: float
    mask: np.ndarray
    confidence: dict[str, Any]


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlparse

    return is_loopback(urlparse(url).hostname or "")


def _retry_after(r, default: float) -> float:
    try:
        return max(0.0, float(r.headers.get("Retry-After", default)))
    except ValueError:
        return default


def _reason(r) -> str:
    """A short reason for a busy answer: the server's JSON message, else the HTTP status."""
    try:
        body = r.json()
    except ValueError:
        body = None
    msg = body.get("message") if isinstance(body, dict) else None
    return (str(msg) if msg else f"HTTP {r.status_code}")[:300]


def _busy_error(r, url: str, budget: float) -> ServerError:
    what = "its queue is full" if r.status_code == 429 else "it is unavailable (503)"
    return ServerError(f"The server at {url} is busy ({what}: {_reason(r)}) and stayed busy for the {budget:g} s this "
                       f"client waits; try again later, or ask its administrator for more workers or a larger "
                       f"--queue-size.")


def _http_error(r, url: str) -> errors.TextsegError:
    try:
        body = r.json()
        msg = body.get("message") or r.text[:300]
        code = body.get("error", "")
    except ValueError:
        msg, code = r.text[:300] or r.reason, ""
    s = r.status_code
    if s == 401:
        return AuthError(f"The server at {url} needs an API key: pass api_key= / --api-key or set TEXTSEG_API_KEY. "
                         f"({msg})")
    if s == 403:
        return AuthError(f"The server at {url} refused the API key; check it with the administrator. ({msg})")
    if s == 413:  # an upload, or a job or re-threshold request over the server's JSON limit
        what = "The image is" if r.request.path_url.startswith("/v1/volumes/") else "The request is"
        return InputError(f"{what} too large for the server at {url}: {msg}")
    if s == 426:
        return ServerError(msg)
    if s == 507:  # the server's disk is full: its message says so and what to do
        return ServerError(msg)
    if s == 408:
        return ServerError(f"The server at {url} gave up waiting for the request body (slow network?): {msg}")
    if s == 404:
        return UsageError(f"{msg}" if code else f"{url} has no such resource ({r.request.method} "
                                                f"{r.request.path_url}); is it a textseg server of API {API_VERSION}?")
    if s == 409 and code == WEIGHTS_MISSING:
        return errors.WeightsError(msg)
    if 400 <= s < 500:
        cls = getattr(errors, code, None)
        if isinstance(cls, type) and issubclass(cls, errors.TextsegError):
            return cls(msg)
        return UsageError(f"The server at {url} rejected the request ({s}): {msg}")
    return ServerError(f"The server at {url} failed ({s}): {msg}. Try again; if it persists, check the server log.")
