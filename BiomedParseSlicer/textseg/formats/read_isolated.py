"""Reading image files in a child process with a memory and a time limit.

ITK and GDCM are C++: a file that gets past the header checks (``image_checks``, ``dicom_series``) and
still crashes, spins or over-allocates inside them would take the whole process with it (the CLI, a
cohort run of hundreds of cases). ``read_volume`` therefore reads in one persistent child process,
started on first use and reused for every later read (a cohort pays the ~0.2 s start once); the child
sends the array back through a pipe. A read that crashes the child (a signal), exceeds its memory limit
or its time limit becomes one InputError line, and the next read starts a fresh child.

Limits: memory (Linux/macOS ``RLIMIT_AS`` of the child) = what the child uses + 3x the image's declared
size + 1 GiB, so a file that declares little but allocates much fails cleanly; time = 60 s + 1 s per
20 MB of input, or ``$TEXTSEG_READ_TIMEOUT`` seconds. ``$TEXTSEG_READ_IN_PROCESS=1`` (or
``read_volume(path, isolate=False)``) reads in the calling process instead: the same checks, no limits.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import InputError
from ..volume import Volume

log = logging.getLogger("textseg")

MiB = 1 << 20
GiB = 1 << 30
BASE_TIMEOUT_S = 60.0
BYTES_PER_S = 20 * MiB
STARTUP_TIMEOUT_S = 120.0
VALIDATION_ALLOWANCE = 1 * GiB  # headers, gzip counting, pydicom: all bounded and small
_PASSED_ENV = ("TEXTSEG_READ_MAX_MEMORY_MB",)  # settings read per request (the child outlives changes)
# The child reads with images.read_here, named here rather than imported: images imports this module.
_BOOT = ("import sys; sys.path.insert(0, {root!r}); from textseg.formats.images import read_here; "
         "from textseg.formats.read_isolated import serve; serve(read_here)")


def timeout_for(path: Path) -> float:
    env = os.environ.get("TEXTSEG_READ_TIMEOUT")
    if env:
        try:
            return max(1.0, float(env))
        except ValueError:
            pass
    try:
        if path.is_dir():
            from .dicom_series import dicom_file_list_size

            size = dicom_file_list_size(path)
        else:
            size = path.stat().st_size
    except OSError:
        size = 0
    return BASE_TIMEOUT_S + size / BYTES_PER_S


class ReaderProcess:
    """One child process that reads images on request; restarted when it dies or is stopped."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._owner = 0
        self._log: Any = None
        self._lock = threading.Lock()
        self._ready = False
        self.starts = 0  # children started (a test and benchmark figure)

    def _alive(self) -> bool:
        return self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None

    def _start(self) -> None:
        self._drop()
        root = str(Path(__file__).resolve().parents[2])  # the folder holding textseg/
        env = dict(os.environ, MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT.format(root=root)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env, close_fds=True)
        self._owner = os.getpid()
        self.starts += 1
        self._ready = False

    def _await_ready(self) -> None:
        """Wait for the child's 'ready' line (it imports SimpleITK and the reader first)."""
        if self._ready:
            return
        box: dict[str, Any] = {}
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        waiter = threading.Thread(target=lambda: box.update(line=proc.stdout.readline()), daemon=True)
        waiter.start()
        waiter.join(STARTUP_TIMEOUT_S)
        if not box.get("line", b"").startswith(b'{"ready"'):  # e.g. an embedded Python whose executable cannot run
            proc.kill()
            self._drop()
            raise OSError("the reader process did not start")
        self._ready = True

    def prestart(self) -> None:
        """Start the child now, without waiting for it, so that its imports overlap with the caller's work."""
        with self._lock:
            if not self._alive():
                try:
                    self._start()
                except OSError:
                    pass

    def _drop(self) -> None:
        """Forget (and end) the current child."""
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def read(self, path: Path, timeout: Optional[float] = None) -> Volume:
        timeout = timeout_for(path) if timeout is None else timeout
        with self._lock:
            if not self._alive():
                self._start()
            self._await_ready()
            proc = self._proc
            assert proc is not None and proc.stdin is not None
            self._clear_log()
            request = (json.dumps({"path": str(path), "cwd": os.getcwd(),  # relative paths as the caller means them
                                   "env": {k: os.environ.get(k) for k in _PASSED_ENV}}) + "\n").encode()
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except OSError:  # the child died between two reads: start another one
                self._start()
                self._await_ready()
                proc = self._proc
                proc.stdin.write(request)
                proc.stdin.flush()
            box: dict[str, Any] = {}
            worker = threading.Thread(target=_receive, args=(proc, box), daemon=True)
            worker.start()
            worker.join(timeout)
            if worker.is_alive():
                proc.kill()
                worker.join(10)
                self._drop()
                raise InputError(f"{path}: reading took longer than {timeout:g} s and was stopped; the file is "
                                 f"probably damaged (set TEXTSEG_READ_TIMEOUT=SECONDS to allow more).")
            if "header" not in box or box.get("short"):
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                self._debug_log()
                self._drop()
                raise InputError(f"{path}: cannot be read as an image: the image reader {_death(rc)} on this file; the "
                                 "file is damaged or not a supported image. Check it or export it again.")
            header = box["header"]
            if not header.get("ok"):
                self._debug_log()
                raise InputError(header.get("error") or f"{path}: cannot be read as an image.")
            meta = header["metadata"]
            return Volume.from_geometry(box["array"], header, meta)

    def _clear_log(self) -> None:
        """Keep only the current read's ITK/GDCM output (the child writes at the file's shared offset)."""
        try:
            self._log.seek(0)
            self._log.truncate()
        except (OSError, AttributeError):
            pass

    def _debug_log(self) -> None:
        if not os.environ.get("TEXTSEG_DEBUG") or self._log is None:
            return
        try:
            self._log.seek(0)
            sys.stderr.write(self._log.read()[-20000:].decode("utf-8", "replace"))
        except OSError:
            pass


def _encode(value: Any) -> Any:
    """JSON for metadata values: numpy arrays (e.g. ``nifti_affine``) and numbers travel exactly, others as text."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _decode(obj: dict[str, Any]) -> Any:
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    return obj


def _receive(proc: subprocess.Popen, box: dict[str, Any]) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            return
        header = json.loads(line, object_hook=_decode)
        if header.get("ok"):
            array = np.empty(tuple(header["shape"]), dtype=np.dtype(header["dtype"]))
            view = memoryview(array).cast("B") if array.nbytes else memoryview(b"")
            got = 0
            while got < array.nbytes:
                n = proc.stdout.readinto(view[got:])
                if not n:
                    box["short"] = True
                    return
                got += n
            box["array"] = array
        box["header"] = header
    except Exception:  # noqa: BLE001 - a broken pipe or garbled reply counts as a dead reader
        box["short"] = True


def _death(rc: int) -> str:
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        if name == "SIGKILL":
            return "was killed (SIGKILL: out of memory?)"
        return f"crashed ({name})"
    return f"stopped (exit code {rc})"


_READER = ReaderProcess()
atexit.register(_READER.close)


_NO_CHILD: list = []  # set once a child could not be started: read in-process from then on


def read_in_child(path: Path, read_here: Callable[[Path], Volume], timeout: Optional[float] = None) -> Volume:
    """``images.read_volume``'s reading, done in the reader child process; ``read_here`` (``images.read_here``,
    passed in because images imports this module) reads in this process where no child can start, e.g. an
    embedded interpreter whose executable cannot run on its own."""
    if _NO_CHILD:
        return read_here(path)
    try:
        return _READER.read(path, timeout)
    except OSError as exc:
        _NO_CHILD.append(str(exc))
        log.warning("textseg: cannot start the image reader process (%s); reading in this process, without its memory "
                    "and time limits.", exc)
        return read_here(path)


def prestart() -> None:
    """Start the reader child in the background (the CLI calls this first, so that the child's imports overlap
    with its own); nothing happens where reading is in-process."""
    if os.environ.get("TEXTSEG_READ_IN_PROCESS", "").strip().lower() in ("1", "true", "yes") or _NO_CHILD:
        return
    _READER.prestart()


def reader_starts() -> int:
    return _READER.starts


# ---- the child ---------------------------------------------------------------------------------------------------
def _vm_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _set_limit(allowance: Optional[int]) -> None:
    try:
        import resource
    except ImportError:  # Windows: time limit only
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if allowance is None:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            return
        vm = _vm_bytes()
        if not vm:
            return
        limit = vm + allowance + (os.cpu_count() or 1) * 16 * MiB  # thread stacks of ITK's pool
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass


def serve(read_here: Callable[..., Volume]) -> None:
    """Child loop: one JSON request per line on stdin, a JSON header line (+ the array's bytes) on stdout;
    ``read_here`` is ``images.read_here``."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything ITK/GDCM prints on stdout goes to the log, never into the replies
    sys.stdout = sys.stderr
    import warnings

    warnings.simplefilter("ignore")
    import SimpleITK  # noqa: F401 - imported before the parent is told that the child is ready

    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            path = Path(request["path"])
        except (ValueError, KeyError):
            break
        try:
            os.chdir(request.get("cwd") or ".")
        except OSError:
            pass
        for key, value in (request.get("env") or {}).items():
            if key in _PASSED_ENV:
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        reply: dict[str, Any]
        array = None
        try:
            _set_limit(VALIDATION_ALLOWANCE)
            vol = read_here(path, budget=lambda n: _set_limit(3 * int(n) + GiB))
            array = np.ascontiguousarray(vol.array)
            reply = {"ok": True, "shape": list(array.shape), "dtype": array.dtype.str, **vol.geometry(),
                     "metadata": vol.metadata}
            del vol
        except InputError as exc:
            reply = {"ok": False, "error": str(exc)}
        except MemoryError:
            reply = {"ok": False, "error": f"{path}: cannot be read as an image: reading it needs more memory than its "
                                           "header declares (the file is damaged) or than is available."}
        except Exception as exc:  # noqa: BLE001 - anything else is still one line for the user
            reply = {"ok": False, "error": f"{path}: cannot be read as an image ({type(exc).__name__}: "
                                           f"{str(exc).splitlines()[-1][:160] if str(exc).strip() else ''})."}
        finally:
            _set_limit(None)
        try:
            out.write((json.dumps(reply, default=_encode) + "\n").encode())
            if array is not None and reply.get("ok"):
                out.write(memoryview(array).cast("B") if array.nbytes else b"")
            out.flush()
        except OSError:
            break
        array = None
