"""`textseg serve` under hostile or unlucky use (issue 14): client isolation with per-client keys, the
admin view, per-client result caps, hung workers (SIGSTOP), client disconnects, a full disk.

Real uvicorn servers on 127.0.0.1. ``guarded``: a keys file with two clients (alice, bob) and an
operator (ops, admin role), one cpu worker, a slice-wise synthetic model slowed to 0.4 s per slice,
a 3 s heartbeat, a 0.5 s cancel deadline and at most 2 results kept per client. The full-disk test
runs ``textseg serve`` on a 768 KiB tmpfs in its own user+mount namespace (skipped where the
system does not allow unprivileged namespaces).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from textseg.errors import ServerError  # noqa: E402
from textseg.remote.client import RemotePredictor  # noqa: E402
from textseg.remote.server import Settings, read_keys_file, running_server  # noqa: E402
from textseg.remote.wire import CLIENT_HEADER, sha256, volume_to_nrrd  # noqa: E402
from textseg.volume import Volume  # noqa: E402

ALICE, BOB, OPS = "alice-Zk8q2Lr7Vt4xNp6W", "bob-Hs3mYc9Qe1uTb5Rj", "ops-Gf7dKw2Pz8nXa4Lq"
SLOW_2D = {"synthetic-2d": {"delay": 0.4, "batch_size": 1}}  # 0.4 s per slice: 2.4 s per prompt on the phantom


def _h(key, token=None):
    h = {"Authorization": f"Bearer {key}"}
    if token:
        h[CLIENT_HEADER] = token
    return h


def _phantom(fill=None):
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400
    if fill is not None:
        arr[0, 0, 0] = fill  # a different image (other sha256)
    return Volume(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def _keys(folder: Path) -> Path:
    keys = folder / "keys.txt"
    keys.write_text(f"# name key role\nalice {ALICE}\nbob   {BOB}   user\nops   {OPS}   admin\n")
    return keys


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    work = tmp_path_factory.mktemp("guarded-work")
    keys = _keys(work.parent)
    s = Settings(port=0, keys=read_keys_file(keys), devices=("cpu",), show_test_models=True, work_dir=str(work),
                 heartbeat_timeout=3.0, cancel_timeout=0.5, max_results_per_client=2, adapter_options=SLOW_2D)
    with running_server(s) as url:
        yield url, work


def _upload(url, key, v, token=None):
    body = volume_to_nrrd(v)
    r = requests.put(f"{url}/v1/volumes/{sha256(body)}", data=body, headers=_h(key, token), timeout=10)
    assert r.status_code in (200, 201), r.text
    return sha256(body)


def _submit(url, key, sha, prompts, model="synthetic-3d", token=None):
    r = requests.post(f"{url}/v1/jobs", json={"volume": sha, "model": model, "modality": "CT", "prompts": prompts},
                      headers=_h(key, token), timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(url, key, jid, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        j = requests.get(f"{url}/v1/jobs/{jid}", headers=_h(key), timeout=10).json()
        if j.get("state") in states:
            return j
        assert time.monotonic() < deadline, j
        time.sleep(0.05)


def _worker(url):
    return requests.get(f"{url}/v1/workers", headers=_h(OPS), timeout=5).json()["workers"][0]


def _ready_again(url, old_pid, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        w = _worker(url)
        if w["ready"] and w["alive"] and w["pid"] != old_pid:
            return w
        assert time.monotonic() < deadline, w
        time.sleep(0.1)


# ---- isolation (item 4) ------------------------------------------------------------------------------
def test_each_client_sees_only_its_own_jobs_volumes_and_results(guarded):
    url, _ = guarded
    v = _phantom(fill=11)
    sha = _upload(url, ALICE, v)
    jid = _submit(url, ALICE, sha, ["bone"])
    assert _wait(url, ALICE, jid, ("done", "failed"))["state"] == "done"
    # bob (another key) can neither see nor use anything of alice's: 404, as for what does not exist
    for method, path in [("GET", f"/v1/jobs/{jid}"), ("DELETE", f"/v1/jobs/{jid}"),
                         ("GET", f"/v1/jobs/{jid}/result.json"),
                         ("GET", f"/v1/jobs/{jid}/arrays"), ("GET", f"/v1/jobs/{jid}/result"),
                         ("HEAD", f"/v1/volumes/{sha}"),
                         ("GET", f"/v1/volumes/{sha}")]:
        r = requests.request(method, url + path, headers=_h(BOB), timeout=10)
        assert r.status_code == 404, (method, path, r.status_code)
        assert sha not in r.text
    r = requests.post(f"{url}/v1/jobs",
                      json={"volume": sha, "model": "synthetic-3d", "modality": "CT", "prompts": ["air"]},
                      headers=_h(BOB), timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "volume_not_found"
    assert requests.get(f"{url}/v1/jobs", headers=_h(BOB), timeout=5).json()["jobs"] == []
    assert [j["id"] for j in requests.get(f"{url}/v1/jobs", headers=_h(ALICE), timeout=5).json()["jobs"]] == [jid]
    # bob may upload the same image himself (he proves he has it): then it is his too, and alice's job stays hers
    assert _upload(url, BOB, v) == sha
    bob_job = _submit(url, BOB, sha, ["air"])
    assert _wait(url, BOB, bob_job, ("done", "failed"))["state"] == "done"
    assert requests.get(f"{url}/v1/jobs/{jid}", headers=_h(BOB), timeout=5).status_code == 404
    # the same key with two client tokens (two programs sharing a key) are two clients as well
    t1, t2 = "t1-" + "a" * 20 + "Q7", "t2-" + "b" * 20 + "R8"
    mine = _submit(url, ALICE, _upload(url, ALICE, v, t1), ["bone"], token=t1)
    r = requests.get(f"{url}/v1/jobs/{mine}", headers=_h(ALICE, t2), timeout=5)
    assert r.status_code == 404
    assert requests.get(f"{url}/v1/jobs/{mine}", headers=_h(ALICE, t1), timeout=5).status_code == 200
    # the operator (admin role) sees every job and worker with its owner, and may cancel, but gets no results
    every = {j["id"]: j["owner"] for j in requests.get(f"{url}/v1/jobs", headers=_h(OPS), timeout=5).json()["jobs"]}
    assert every[jid] == "alice" and every[bob_job] == "bob" and every[mine].startswith("alice/")
    assert requests.get(f"{url}/v1/jobs/{jid}", headers=_h(OPS), timeout=5).json()["owner"] == "alice"
    assert requests.get(f"{url}/v1/jobs/{jid}/arrays", headers=_h(OPS), timeout=5).status_code == 404
    assert "pid" in _worker(url)
    # a client's worker view names only its own job
    for w in requests.get(f"{url}/v1/workers", headers=_h(BOB), timeout=5).json()["workers"]:
        assert w["job"] in (None, bob_job) and "owner" not in w


def test_results_are_capped_per_client(guarded):
    """max_results_per_client=2: a client's third result drops its oldest; other clients keep theirs."""
    url, work = guarded
    sha_a, sha_b = _upload(url, ALICE, _phantom(fill=21)), _upload(url, BOB, _phantom(fill=22))
    kept_b = _submit(url, BOB, sha_b, ["bone"])
    _wait(url, BOB, kept_b, ("done",))
    jobs = []
    for prompt in ("bone", "air", "fat"):
        jobs.append(_submit(url, ALICE, sha_a, [prompt]))
        _wait(url, ALICE, jobs[-1], ("done",))
    r = requests.get(f"{url}/v1/jobs/{jobs[0]}", headers=_h(ALICE), timeout=5)
    assert r.status_code == 404 and "at most 2 results" in r.json()["message"]
    assert not (work / "jobs" / jobs[0]).exists()
    for jid in jobs[1:]:
        assert requests.get(f"{url}/v1/jobs/{jid}/result.json", headers=_h(ALICE), timeout=5).status_code == 200
    assert requests.get(f"{url}/v1/jobs/{kept_b}/result.json", headers=_h(BOB), timeout=5).status_code == 200


def test_stored_images_are_capped_per_client(tmp_path):
    """max_volume_bytes_per_client = two phantoms (960 bytes each): a client's third image drops its least
    recently used one (file removed, HEAD 404 for it), never another client's; an image two clients hold stays
    for the other; and the client library uploads a dropped image again by itself when a job needs it."""
    s = Settings(port=0, keys=read_keys_file(_keys(tmp_path)), devices=("cpu",), show_test_models=True,
                 work_dir=str(tmp_path / "work"), max_volume_bytes_per_client=2 * 960)
    vols = [_phantom(fill=31 + i) for i in range(4)]
    with running_server(s) as url:
        shared = _upload(url, BOB, vols[0])
        assert _upload(url, ALICE, vols[0]) == shared  # held by both
        own_b = _upload(url, BOB, vols[1])
        first, second = _upload(url, ALICE, vols[2]), _upload(url, ALICE, vols[3])  # alice's 3rd image

        def held(key, sha):
            return requests.head(f"{url}/v1/volumes/{sha}", headers=_h(key), timeout=5).status_code == 200

        assert not held(ALICE, shared) and held(ALICE, first) and held(ALICE, second)
        assert held(BOB, shared) and held(BOB, own_b)  # bob's images are not alice's to drop
        stored = {p.stem for p in (tmp_path / "work" / "volumes").glob("*.npy")}
        assert stored == {shared, own_b, first, second}  # the shared file stays while bob holds it
        assert _upload(url, ALICE, vols[1]) == own_b  # alice takes bob's other image too: her `first` goes
        assert not held(ALICE, first) and not (tmp_path / "work" / "volumes" / f"{first}.npy").exists()

        # the client library: its image dropped between set_image and predict is uploaded again
        token = "cap-" + "c" * 20 + "Z9"
        rp = RemotePredictor(url, "synthetic-3d", api_key=ALICE, client_token=token)
        rp.set_image(vols[2], "CT")
        _upload(url, ALICE, vols[0], token)
        _upload(url, ALICE, vols[1], token)  # the third image of this client: vols[2] is dropped
        assert requests.head(f"{url}/v1/volumes/{first}", headers=_h(ALICE, token), timeout=5).status_code == 404
        (r,) = rp.predict(["bone"])
        assert int(r.mask.sum()) == int((vols[2].array >= 200).sum()) == 128
        assert requests.head(f"{url}/v1/volumes/{first}", headers=_h(ALICE, token), timeout=5).status_code == 200


# ---- hung workers (item 7) --------------------------------------------------------------------------------
def test_stopped_worker_fails_its_job_is_replaced_and_health_says_so(guarded):
    url, _ = guarded
    sha = _upload(url, ALICE, _phantom())
    jid = _submit(url, ALICE, sha, ["bone", "air"], model="synthetic-2d")
    _wait(url, ALICE, jid, ("running",))
    pid = _worker(url)["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: alive, silent
    try:
        t0 = time.monotonic()
        while requests.get(f"{url}/health", timeout=5).json()["status"] == "ok":
            assert time.monotonic() - t0 < 10, "/health still says ok about a stopped worker"
            time.sleep(0.1)
        job = _wait(url, ALICE, jid, ("done", "failed", "cancelled"), timeout=10)
        assert job["state"] == "failed" and job["error"]["type"] == "ServerError"
        assert "stopped responding" in job["error"]["message"] and "replaced" in job["error"]["message"]
        w = _ready_again(url, pid)
        assert w["restarts"] >= 1
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # normally already killed by the server
        except ProcessLookupError:
            pass
    h = requests.get(f"{url}/health", timeout=5)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    rp = RemotePredictor(url, "synthetic-3d", api_key=ALICE)
    rp.set_image(_phantom(), "CT")
    assert rp.predict(["bone"])[0].voxel_count == 4 * 4 * 8


def test_cancel_of_a_job_on_a_stopped_worker_takes_effect(guarded):
    """DELETE ends the job within the cancel deadline (0.5 s) even though the worker does not answer."""
    url, _ = guarded
    sha = _upload(url, ALICE, _phantom())
    jid = _submit(url, ALICE, sha, ["bone", "air"], model="synthetic-2d")
    _wait(url, ALICE, jid, ("running",))
    pid = _worker(url)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        requests.delete(f"{url}/v1/jobs/{jid}", headers=_h(ALICE), timeout=5)
        job = _wait(url, ALICE, jid, ("done", "failed", "cancelled"), timeout=10)
        assert time.monotonic() - t0 < 2.5  # well before the 3 s heartbeat would have caught it
        assert job["state"] == "cancelled" and "did not stop" in job["stage"]
        _ready_again(url, pid)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- client disconnect (item 12) ---------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if all(r is not record for r in self.records):  # a record propagates to several of the loggers watched
            self.records.append(record)


def test_client_disconnect_during_upload_logs_one_line_and_leaves_no_file(guarded):
    url, work = guarded
    host, port = url.split("//")[1].split(":")
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("textseg.server", "uvicorn.error", "uvicorn", "")]
    level = loggers[0].level
    loggers[0].setLevel(logging.INFO)  # as `textseg serve` logs (--log-level INFO)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        for _ in range(2):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall((f"PUT /v1/volumes/{'ab' * 32} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer "
                           f"{ALICE}\r\nContent-Length: 500000\r\n\r\n").encode() + b"x" * 20000)
                time.sleep(0.3)  # the server is receiving the body
        deadline = time.monotonic() + 5
        while any((work / "uploads").iterdir()) or sum("disconnect" in r.getMessage() for r in handler.records) < 2:
            assert time.monotonic() < deadline, [r.getMessage() for r in handler.records]
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        loggers[0].setLevel(level)
        for lg in loggers:
            lg.removeHandler(handler)
    assert not [r for r in handler.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    assert sum("disconnect" in r.getMessage() for r in handler.records) == 2  # one line per broken upload


# ---- full disk (item 11) --------------------------------------------------------------------------------------
def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"], capture_output=True, timeout=20)
    return probe.returncode == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_disk_server(tmp_path):
    if not _can_mount_tmpfs():
        pytest.skip("needs unprivileged user+mount namespaces (unshare) to give the server a tiny tmpfs")
    work, port = tmp_path / "work", _free_port()
    work.mkdir()
    env = {**os.environ, "TEXTSEG_SHOW_TEST_MODELS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "BiomedParseSlicer"),
                                          os.environ.get("PYTHONPATH", "")])}
    script = ('mount -t tmpfs -o size=768k tmpfs "$0" && exec "$1" -m textseg serve --host 127.0.0.1 --port "$2" '
              '--devices cpu --work-dir "$0" --log-level WARNING')
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(work),
                             sys.executable, str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                h = requests.get(url + "/health", timeout=2)
                if h.status_code == 200 and h.json()["status"] == "ok":
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the tmpfs server did not start"
            time.sleep(0.2)
        # the tmpfs as the server sees it: /proc/<pid>/root/<work> (the python process replaced the shell: same pid)
        yield url, Path(f"/proc/{proc.pid}/root") / str(work).lstrip("/"), proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_full_disk_is_a_clear_507_and_leaves_no_temp_files(tiny_disk_server):
    url, root, proc = tiny_disk_server
    assert _files(root) == []
    # 1. an upload larger than the free space: the body cannot be stored
    big = volume_to_nrrd(Volume(np.ones((4, 256, 512), np.int16)))  # 1 MiB
    r = requests.put(f"{url}/v1/volumes/{sha256(big)}", data=big, timeout=30)
    assert r.status_code == 507 and r.json()["error"] == "disk_full", r.text
    assert "disk is full" in r.json()["message"] and str(root) not in r.text
    assert _files(root) == []
    # 2. the body fits, the stored copy does not (upload + .npy > 768 KiB)
    mid = volume_to_nrrd(Volume(np.ones((2, 200, 512), np.int16)))  # 400 KiB
    r = requests.put(f"{url}/v1/volumes/{sha256(mid)}", data=mid, timeout=30)
    assert r.status_code == 507 and "disk is full" in r.json()["message"], r.text
    assert _files(root) == []
    # 3. a job whose results do not fit: it fails with the reason, and its files are gone at once
    rp = RemotePredictor(url, "synthetic-3d", probabilities="float32")
    v = Volume(np.full((2, 100, 512), 400, np.int16))  # 200 KiB, all "bone": dense float32 probabilities
    rp.set_image(v, "CT")
    with pytest.raises(ServerError, match="disk is full") as err:
        rp.predict(["bone", "bone left", "bone right"])
    assert "Errno" not in str(err.value) and "ModelError" not in str(err.value)
    jobs = rp.http.get(f"{url}/v1/jobs", timeout=5).json()["jobs"]
    assert [j["state"] for j in jobs] == ["done", "failed"]  # set_image's preparing job, then the one that failed
    assert not (root / "jobs" / jobs[1]["id"]).exists() and not [f for f in _files(root) if "tmp" in f]
    # 4. the space came back: a job that fits runs
    rp.probabilities = "none"
    assert rp.predict(["bone"])[0].voxel_count == v.array.size
    assert proc.poll() is None
