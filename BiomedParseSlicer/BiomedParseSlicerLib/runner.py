"""Running inference away from Slicer's GUI thread.

Local inference runs in the engine's own server process (``python -m textseg serve`` on
127.0.0.1, started with Slicer's Python) and is reached with the same client as a remote server:

* torch runs in another process, so it never holds the GUI's Python GIL, a CUDA crash or
  out-of-memory cannot take Slicer down, and stopping the server gives all GPU memory back;
* the model stays loaded between runs, and local and remote use one code path (the client).

The client's blocking HTTP calls run in a worker thread (``BackgroundTask``); the GUI polls its
progress with a QTimer and applies results to the scene on the GUI thread (MRML is not
thread-safe). Scripts that call the Logic without a predictor get the in-process ``Predictor``
(``make_predictor(model, "local")``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from textseg.errors import Cancelled, ModelError, UsageError
from textseg.runcontrol import CancelToken


@dataclass
class Snapshot:
    fraction: float
    stage: str
    elapsed: float
    done: bool
    log: list[str]


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

    def start(self) -> BackgroundTask:
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


# Windows' CREATE_NO_WINDOW process creation flag (winbase.h; subprocess.CREATE_NO_WINDOW exists only on Windows).
CREATE_NO_WINDOW = 0x08000000


def process_options(platform: str = sys.platform) -> dict:
    """Popen options for the server process. PythonSlicer is a launcher (CTKAppLauncher) that starts
    python-real as its child and forwards no signal, so the server is a process tree that must be stopped
    as a whole: on POSIX it gets its own session (process group = its pid, signalled with killpg); on
    Windows the tree is ended with taskkill /T (``stop_tree_command``), and no console window opens."""
    if platform == "win32":
        return {"creationflags": CREATE_NO_WINDOW}
    return {"start_new_session": True}


def stop_tree_command(pid: int, platform: str = sys.platform) -> Optional[list[str]]:
    """The command that ends process ``pid`` and all its descendants (Windows), or None where a signal
    to the process group does it (POSIX)."""
    if platform == "win32":
        return ["taskkill", "/F", "/T", "/PID", str(pid)]
    return None


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs. Zombies count as ended: on Linux the group is read
    from /proc (an orphaned python-real whose reaper never reaps it stays a zombie); elsewhere killpg(0)."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_tree(process: subprocess.Popen, grace: float = 5.0, platform: str = sys.platform) -> None:
    """End ``process`` (started with ``process_options``) and everything it started: politely (SIGTERM to the
    group), then for good after ``grace`` seconds (SIGKILL); on Windows taskkill /T /F."""
    command = stop_tree_command(process.pid, platform)
    if command is not None:
        if process.poll() is None:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           **process_options(platform))
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace)
        return
    pgid = process.pid  # start_new_session: the launcher leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()  # reap the launcher, our own child
        if not _group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def default_log_path(port: int) -> Path:
    """Where the server's output goes: the platform's temporary folder as Python finds it (TMPDIR, TEMP or
    TMP, then the platform's default such as %LOCALAPPDATA%\\Temp); Windows and Slicer set no TMPDIR."""
    return Path(tempfile.gettempdir()) / f"textseg-server-{port}.log"


class LocalServer:
    """The engine's server on 127.0.0.1 in a background process tree (one per Slicer session).

    ``start`` runs in the panel's worker thread and ``stop`` in the GUI thread; a stop during a start ends
    the start at once with Cancelled. Stopping ends the whole tree (PythonSlicer's launcher and python-real)."""

    def __init__(self, command: Optional[list[str]] = None, port: Optional[int] = None,
                 log_path: Optional[Path] = None, health_path: str = "/health", device: str = "auto") -> None:
        self.port = port or free_port()
        self.device = device
        self.command = command or [python_executable(), "-m", "textseg", "serve", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--devices", server_device(device)]
        self.log_path = Path(log_path) if log_path else default_log_path(self.port)
        self.health_path = health_path
        self.process: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        process = self.process
        return process is not None and process.poll() is None

    def start(self, timeout: float = 120.0, cancel: Optional[CancelToken] = None) -> str:
        """Start (if needed) and wait until /health answers; ModelError with the log tail if it dies,
        Cancelled when ``stop`` is called meanwhile (or ``cancel`` is set)."""
        with self._lock:
            if self.running:
                return self.url
            self._stopped.clear()
            with open(self.log_path, "wb") as log:
                process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=engine_environment(self.device), **process_options())
            self.process = process
            atexit.register(self.stop)  # Slicer quitting without the panel's cleanup: no orphaned server
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._stopped.is_set():
                raise Cancelled("The local inference server was stopped while it was starting.")
            if cancel is not None and cancel.cancelled:
                self.stop()
                cancel.check()
            if process.poll() is not None:
                raise ModelError(f"The local inference server stopped at start-up:\n{self.log_tail()}")
            if self._healthy():
                return self.url
            self._stopped.wait(0.2)
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
        """End the server's whole process tree (safe to call from any thread, at any time)."""
        self._stopped.set()
        with self._lock:
            process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        stop_process_tree(process)


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
        raise UsageError(f"Cannot reach {url} ({type(exc).__name__}). Check the URL, the network/VPN and any "
                         f"proxy.") from None
    if r.status_code in (401, 403):
        raise UsageError(f"{url} refused the API key (HTTP {r.status_code}). Check the key with the server's "
                         f"administrator.")
    if r.status_code != 200:
        raise UsageError(f"{url}/health answered HTTP {r.status_code}; is this a textseg server?")
    return f"Connected to {url}: {r.text[:200]}"


def make_predictor(model: str, where: str = "local", device: str = "auto", url: str = "",
                   api_key: Optional[str] = None, server: Optional[LocalServer] = None, probabilities: str = "none"):
    """The injected predictor: remote client, client of the local server, or in-process Predictor.
    ``probabilities``: what a server sends besides the masks, "uint8" when the model output is kept for review."""
    if where == "remote" or server is not None:
        from textseg.remote.client import RemotePredictor

        target = server.url if server is not None else url
        if not target:
            raise UsageError("Enter the inference server's URL (e.g. https://gpu-server:8000) first.")
        # Probability maps travel only when kept for review, and then as uint8 (1 byte a voxel per segment).
        return RemotePredictor(target, model, api_key=api_key or None, probabilities=probabilities)
    from textseg.predictor import Predictor

    return Predictor(model, device=device)
