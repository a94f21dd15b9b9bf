"""Running inference away from Slicer's GUI thread.

Local inference runs in the engine's own server process (``python -m textseg serve`` on
127.0.0.1, started with Slicer's Python) and is reached with the same client as a remote server:

* torch runs in another process, so it never holds the GUI's Python GIL, a CUDA crash or
  out-of-memory cannot take Slicer down, and stopping the server gives all GPU memory back;
* the model stays loaded between runs, and local and remote use one code path (the client).

The client's blocking HTTP calls run in a worker thread (``BackgroundTask``); the GUI polls its
progress with a QTimer and applies results to the scene on the GUI thread (MRML is not
thread-safe). Where the engine has no server/client yet, local inference falls back to the
in-process ``Predictor`` in the same worker thread (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

from textseg.errors import ModelError, UsageError
from textseg.models.base import CancelToken


@dataclass
class Snapshot:
    fraction: float
    stage: str
    elapsed: float
    done: bool
    log: List[str]


class BackgroundTask:
    """``fn(progress, cancel)`` in a daemon thread; ``poll()`` from the GUI thread."""

    def __init__(self, fn: Callable[[Callable[[float, str], None], CancelToken], Any]) -> None:
        self._fn = fn
        self.cancel_token = CancelToken()
        self._lock = threading.Lock()
        self._fraction, self._stage, self._log = 0.0, "starting", []
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._done = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="textseg-run", daemon=True)

    def start(self) -> "BackgroundTask":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def progress(self, fraction: float, stage: str = "") -> None:
        with self._lock:
            self._fraction = max(0.0, min(1.0, float(fraction)))
            if stage and stage != self._stage:
                self._stage = stage
                self._log.append(stage)

    def log(self, message: str) -> None:
        with self._lock:
            self._log.append(message)

    def _run(self) -> None:
        try:
            self.result = self._fn(self.progress, self.cancel_token)
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread
            self.error = exc
        finally:
            self._done.set()

    def cancel(self) -> None:
        self.cancel_token.cancel()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def poll(self) -> Snapshot:
        """Progress since the last poll (log lines are handed out once)."""
        with self._lock:
            lines, self._log = self._log, []
            return Snapshot(self._fraction, self._stage, time.monotonic() - self._started, self.done, lines)


def python_executable() -> str:
    """Slicer's Python (PythonSlicer) inside Slicer, this interpreter elsewhere."""
    return shutil.which("PythonSlicer") or sys.executable


def engine_environment(device: str = "auto") -> dict:
    """This process's environment with the folder holding ``textseg`` first on PYTHONPATH (an
    extension's module folder is on Slicer's path, not necessarily on PythonSlicer's). The device
    choice reaches the server through CUDA_VISIBLE_DEVICES: 'cpu' hides the GPUs, 'cuda:N' shows GPU N."""
    import textseg

    folder = str(Path(textseg.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([folder] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


def server_device(device: str = "auto") -> str:
    """The local server's one worker device for the panel's choice: 'auto' (CUDA, else Apple MPS,
    else CPU: the server's own default would skip MPS), 'cpu', 'mps', or 'cuda' (GPU N of 'cuda:N'
    is the only one the server sees, through CUDA_VISIBLE_DEVICES)."""
    return "cuda" if device.startswith("cuda") else (device or "auto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """The engine's server on 127.0.0.1 in a background process (one per Slicer session)."""

    def __init__(self, command: Optional[List[str]] = None, port: Optional[int] = None,
                 log_path: Optional[Path] = None, health_path: str = "/health", device: str = "auto") -> None:
        self.port = port or free_port()
        self.device = device
        self.command = command or [python_executable(), "-m", "textseg", "serve", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--devices", server_device(device)]
        self.log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"textseg-server-{self.port}.log"
        self.health_path = health_path
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 120.0, cancel: Optional[CancelToken] = None) -> str:
        """Start (if needed) and wait until /health answers; ModelError with the log tail if it dies."""
        if self.running:
            return self.url
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=engine_environment(self.device))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancel is not None:
                cancel.check()
            if self.process.poll() is not None:
                raise ModelError(f"The local inference server stopped at start-up:\n{self.log_tail()}")
            if self._healthy():
                return self.url
            time.sleep(0.2)
        self.stop()
        raise ModelError(f"The local inference server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=1.0) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


def check_server(url: str, api_key: Optional[str] = None, timeout: float = 10.0) -> str:
    """'Test connection': GET <url>/health; a message for the log, UsageError saying what is wrong."""
    import requests

    url = (url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"'{url}' is not a server URL; it looks like https://gpu-server.example.org:8000.")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = requests.get(url + "/health", headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise UsageError(f"Cannot reach {url} ({type(exc).__name__}). Check the URL, the network/VPN and any proxy.") from None
    if r.status_code in (401, 403):
        raise UsageError(f"{url} refused the API key (HTTP {r.status_code}). Check the key with the server's administrator.")
    if r.status_code != 200:
        raise UsageError(f"{url}/health answered HTTP {r.status_code}; is this a textseg server?")
    return f"Connected to {url}: {r.text[:200]}"


def has_client() -> bool:
    try:
        import textseg.client  # noqa: F401
    except ImportError:
        return False
    return True


def make_predictor(model: str, where: str = "local", device: str = "auto", url: str = "",
                   api_key: Optional[str] = None, server: Optional[LocalServer] = None):
    """The injected predictor: remote client, client of the local server, or in-process Predictor."""
    if where == "remote" or server is not None:
        if not has_client():
            raise UsageError("This engine version has no remote client (textseg.client); use local inference.")
        from textseg.client import RemotePredictor

        target = server.url if server is not None else url
        if not target:
            raise UsageError("Enter the inference server's URL (e.g. https://gpu-server:8000) first.")
        # The module uses the masks only: no probability maps (4 bytes a voxel per segment) travel or stay in memory.
        return RemotePredictor(target, model, api_key=api_key or None, probabilities="none")
    from textseg.predictor import Predictor

    return Predictor(model, device=device)
