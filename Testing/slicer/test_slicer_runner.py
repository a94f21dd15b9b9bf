"""The panel's local inference server as Slicer runs it (BiomedParseSlicerLib.runner): the real `textseg serve`
process started through a launcher that behaves like Slicer's PythonSlicer (CTKAppLauncher), its log location
and process options on each OS, and stopping it while another thread is still starting it."""

from __future__ import annotations

import os
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from BiomedParseSlicerLib import runner  # noqa: E402
from textseg.errors import Cancelled, TextsegError  # noqa: E402

# Slicer's PythonSlicer is CTKAppLauncher (commontk/AppLauncher Base/ctkAppLauncher.cpp): it sets up the
# environment, starts bin/python-real with QProcess::start and waits; it installs no signal handler, so
# SIGTERM ends the launcher alone and python-real (the server, holding the model and GPU memory) lives on.
# This stand-in does the same with the same real interpreter: child started, no signal forwarded.
LAUNCHER = """#!{python}
import os, subprocess, sys
child = subprocess.Popen([{python!r}] + sys.argv[1:])
with open(os.environ["LAUNCHED_PID_FILE"], "w") as f:
    f.write(str(child.pid))
sys.exit(child.wait())
"""


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped yet counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def python_slicer(tmp_path, monkeypatch):
    """A `PythonSlicer` launcher on PATH, as inside Slicer; returns the file the launched pid is written to."""
    bin_dir = tmp_path / "slicer-bin"
    bin_dir.mkdir()
    launcher = bin_dir / "PythonSlicer"
    launcher.write_text(LAUNCHER.format(python=sys.executable))
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LAUNCHED_PID_FILE", str(tmp_path / "python-real.pid"))
    return tmp_path / "python-real.pid"


@pytest.mark.skipif(sys.platform == "win32", reason="the POSIX process-group stop; Windows: test_windows_*")
def test_stop_ends_the_server_behind_slicers_launcher(python_slicer, tmp_path):
    """Stop local server (and closing Slicer) must end python-real, not only the launcher: the real `textseg
    serve` behind a PythonSlicer-like launcher is gone after stop(), and its port no longer answers."""
    assert runner.python_executable() == str(python_slicer.parent / "slicer-bin" / "PythonSlicer")
    server = runner.LocalServer(device="cpu", log_path=tmp_path / "server.log")
    assert server.command[0] == runner.python_executable()
    server.start(timeout=120)
    real = int(python_slicer.read_text())
    launcher = server.process.pid
    try:
        assert real != launcher and _alive(real) and server._healthy()
        server.stop()
        assert not server.running
        assert not _alive(launcher), "the launcher still runs"
        assert not _alive(real), "python-real (the server holding the model) still runs after Stop local server"
        assert not server._healthy()
    finally:
        for pid in (real, launcher):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_server_log_in_the_platform_temp_folder_without_tmpdir(tmp_path, monkeypatch):
    """Windows and Slicer set no TMPDIR (Windows names its temp folder TEMP/TMP): the server log goes to the
    folder the platform names, through Python's own temp-folder rules, and the server starts."""
    temp = tmp_path / "AppData-Local-Temp"
    temp.mkdir()
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setenv("TEMP", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the folder chosen earlier in this process
    script = tmp_path / "serve.py"
    script.write_text(
        "import http.server, sys\nprint('serving', flush=True)\nclass H(http.server.BaseHTTPRequestHandler):\n    def "
        "do_GET(self):\n        self.send_response(200); self.end_headers(); "
        "self.wfile.write(b'ok')\nhttp.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    port = runner.free_port()
    server = runner.LocalServer([sys.executable, str(script), str(port)], port=port)
    assert server.log_path.parent == temp
    try:
        server.start(timeout=30)
        assert "serving" in server.log_tail() and (temp / server.log_path.name).is_file()
    finally:
        server.stop()


def test_windows_process_options_hide_the_console_and_stop_the_tree():
    """Windows: the server gets no console window (CREATE_NO_WINDOW, 0x08000000; Slicer's
    launchConsoleProcess hides its console too) and Stop ends the launcher's whole tree (taskkill /T);
    POSIX: a new session, whose process group is signalled."""
    assert runner.process_options("win32") == {"creationflags": 0x08000000}
    assert runner.stop_tree_command(4242, "win32") == ["taskkill", "/F", "/T", "/PID", "4242"]
    assert runner.process_options("linux") == {"start_new_session": True}
    assert runner.process_options("darwin") == {"start_new_session": True}
    assert runner.stop_tree_command(4242, "linux") is None  # POSIX: os.killpg, no command


def test_stop_while_another_thread_starts_the_server(tmp_path):
    """Stop (main thread) while the worker thread is still waiting for the server to answer: start() ends at
    once with a clear Cancelled (not an AttributeError, not after its time-out) and no process is left."""
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('loading a big model', flush=True)\ntime.sleep(60)\n")
    server = runner.LocalServer([sys.executable, str(script)], log_path=tmp_path / "slow.log")
    outcome = {}

    def start():
        try:
            server.start(timeout=60)
            outcome["result"] = "started"
        except BaseException as exc:  # noqa: BLE001 - what the worker thread would hand to the panel
            outcome["result"] = exc

    worker = threading.Thread(target=start)
    began = time.monotonic()
    worker.start()
    while server.process is None and time.monotonic() - began < 30:
        time.sleep(0.02)
    pid = server.process.pid
    server.stop()
    worker.join(30)
    assert not worker.is_alive() and time.monotonic() - began < 30
    assert isinstance(outcome["result"], Cancelled) and "stopped" in str(outcome["result"]), outcome
    assert not _alive(pid) and not server.running
    with pytest.raises(TextsegError, match="stopped at start-up(.|\n)*loading a big model") as info:
        runner.LocalServer([sys.executable, "-c", "print('loading a big model'); raise SystemExit(3)"],
                           log_path=tmp_path / "dead.log").start(timeout=30)
    assert not isinstance(info.value, Cancelled)
