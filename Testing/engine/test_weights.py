"""The weights manager against a real hub look-alike on 127.0.0.1 (Testing/hubserver.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hubserver import Hub

from textseg import catalog, weights
from textseg.catalog import ModelSpec, WeightFile
from textseg.cli.models import main as models_main
from textseg.errors import Cancelled, UsageError, WeightsError
from textseg.runcontrol import CancelToken

ROOT = Path(__file__).resolve().parents[2]
REPO = "test-org/tiny-model"


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def env(hub_env):
    return hub_env


def publish(hub: Hub, model_id: str, files: dict, gated: bool = False, catalog_sha: bool = True,
            lfs: bool = True) -> ModelSpec:
    """Publish ``{name: bytes}`` on the hub and register a hidden test model pinned to its commit."""
    wfs = []
    for name, data in files.items():
        commit = hub.add(REPO if not gated else REPO + "-gated", f"weights/{name}", data, lfs=lfs, gated=gated)
        wfs.append(WeightFile(name=name, repo=REPO if not gated else REPO + "-gated", revision=commit,
                              filename=f"weights/{name}", size=len(data), sha256=sha(data) if catalog_sha else None,
                              gated=gated))
    return catalog.register(ModelSpec(id=model_id, family="test", title=model_id, version="1", dims=3,
                                      modalities=("CT",), adapter="x:y", files=tuple(wfs), hidden=True))


def cdn_gets(hub: Hub) -> list:
    return hub.requests("GET", "cdn")


# ---- download ------------------------------------------------------------------------------------
def test_download_with_progress_installs_verified_file(env, hub):
    a, b = blob(300_000, 1), blob(70_000, 2)
    spec = publish(hub, "t-normal", {"a.bin": a, "b.bin": b})
    seen, byte_reports = [], []
    folder = weights.download("t-normal", progress=lambda f, s: seen.append((f, s)),
                              on_bytes=lambda n, d, t: byte_reports.append((n, d, t)))
    assert folder == env / "models" / "t-normal"
    assert (folder / "a.bin").read_bytes() == a and (folder / "b.bin").read_bytes() == b
    assert not list(folder.glob("*.part"))
    rec = json.loads((folder / ".meta" / "a.bin.json").read_text())
    assert rec["sha256"] == sha(a) and rec["size"] == 300_000 and rec["checked_against"] == "catalog"
    assert rec["commit"] == spec.files[0].revision
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert seen[0][1] == "Checking a.bin" and ("Checking b.bin" in [s for _, s in seen])
    assert [f for f, s in seen if s == "Checking b.bin"] == [pytest.approx(300_000 / 370_000)]  # weighted by size
    assert any("Downloading a.bin" in s for _, s in seen) and any("Verifying b.bin" in s for _, s in seen)
    assert ("a.bin", 300_000, 300_000) in byte_reports and ("b.bin", 70_000, 70_000) in byte_reports
    # the hub's protocol: HEAD on resolve (not followed to the CDN), GET redirected to the CDN
    heads = hub.requests("HEAD", "hub")
    assert [h["status"] for h in heads] == [302, 302]
    assert [g["range"] for g in cdn_gets(hub)] == [None, None]
    st = weights.status("t-normal")
    assert st.state == "ready" and [f.state for f in st.files] == ["ready", "ready"]
    # a second download finds the verified files and sends nothing
    n = len(hub.log)
    weights.download("t-normal")
    assert len(hub.log) == n
    assert weights.require_weights(spec) == folder


def test_catalog_without_sha_uses_hub_lfs_sha256_and_git_sha1(env, hub):
    big = blob(50_000, 3)
    spec = publish(hub, "t-lfs", {"big.bin": big}, catalog_sha=False)
    weights.download(spec)
    assert json.loads((env / "models/t-lfs/.meta/big.bin.json").read_text())["checked_against"] == "hub-lfs-sha256"
    small = b'{"vocab": 1}\n'
    spec2 = publish(hub, "t-git", {"config.json": small}, catalog_sha=False, lfs=False)
    weights.download(spec2)
    assert (env / "models/t-git/config.json").read_bytes() == small
    assert json.loads((env / "models/t-git/.meta/config.json.json").read_text())["checked_against"] == "hub-git-sha1"
    # the hub's sha256 is then the reference for verify
    hub.tamper.add("weights/big.bin")
    p = env / "models/t-lfs/big.bin"
    p.write_bytes(big[:-1] + b"\0")
    st = weights.verify("t-lfs")
    assert st.state == "corrupt" and "(recorded at download)" in st.files[0].message
    assert not p.exists() and (env / "models/t-lfs/big.bin.corrupt").is_file()


def test_interrupted_download_resumes_with_range(env, hub):
    data = blob(200_000, 4)
    publish(hub, "t-resume", {"w.bin": data})
    hub.drop_after["weights/w.bin"] = [65_536]
    with pytest.raises(weights.IncompleteDownloadError, match="again to resume"):
        weights.download("t-resume")
    part = env / "models/t-resume/w.bin.part"
    assert part.stat().st_size == 65_536 and not (env / "models/t-resume/w.bin").exists()
    st = weights.status("t-resume")
    assert st.state == "partial" and st.files[0].have == 65_536
    with pytest.raises(WeightsError, match="missing weight file"):
        weights.require_weights(catalog.get_model("t-resume"))
    weights.download("t-resume")  # "after a restart": a new call
    gets = cdn_gets(hub)
    assert [g["range"] for g in gets] == [None, "bytes=65536-"] and gets[1]["status"] == 206
    assert (env / "models/t-resume/w.bin").read_bytes() == data and not part.exists()
    assert weights.status("t-resume").state == "ready"


def test_dropped_connection_resumes_within_one_call_with_retries(env, hub):
    data = blob(150_000, 5)
    publish(hub, "t-retry", {"w.bin": data})
    hub.drop_after["weights/w.bin"] = [40_000, 30_000]
    weights.download("t-retry", retries=2)
    assert [g["range"] for g in cdn_gets(hub)] == [None, "bytes=40000-", "bytes=70000-"]
    assert sha((env / "models/t-retry/w.bin").read_bytes()) == sha(data)


def test_corrupted_transfer_is_never_installed(env, hub):
    data = blob(100_000, 6)
    spec = publish(hub, "t-corrupt", {"w.bin": data})
    hub.tamper.add("weights/w.bin")
    with pytest.raises(weights.ChecksumError, match=r"failed its checksum.*nothing was installed"):
        weights.download("t-corrupt")
    folder = env / "models/t-corrupt"
    assert not (folder / "w.bin").exists() and not (folder / "w.bin.part").exists()
    with pytest.raises(WeightsError):
        weights.require_weights(spec)


def test_server_offering_other_content_than_catalog_is_refused_before_download(env, hub):
    spec = publish(hub, "t-mismatch", {"w.bin": blob(10_000, 7)})
    wf = spec.files[0]
    catalog.register(ModelSpec(**{**spec.__dict__, "files": (WeightFile(**{**wf.__dict__, "sha256": "0" * 64}),)}))
    with pytest.raises(weights.ChecksumError, match="different w.bin than the catalog expects"):
        weights.download("t-mismatch")
    assert cdn_gets(hub) == []


def test_gated_repo_tokens(env, hub, monkeypatch):
    data = blob(20_000, 8)
    publish(hub, "t-gated", {"w.bin": data}, gated=True)
    with pytest.raises(weights.AccessDeniedError) as e:
        weights.download("t-gated")
    msg = str(e.value)
    assert "HTTP 401" in msg and f"https://huggingface.co/{REPO}-gated" in msg and "HF_TOKEN" in msg
    with pytest.raises(weights.AccessDeniedError, match=r"refused for your token \(HTTP 403\).*accept the licence"):
        weights.download("t-gated", token="hf_not_accepted")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(weights.AccessDeniedError, match=r"HTTP 401.*valid read token"):
        weights.download("t-gated")
    assert cdn_gets(hub) == [] and not (env / "models/t-gated/w.bin").exists()
    monkeypatch.setenv("HF_TOKEN", "hf_accepted")
    weights.download("t-gated")
    assert (env / "models/t-gated/w.bin").read_bytes() == data
    assert {h["auth"] for h in hub.requests("HEAD", "hub")} == {None, "Bearer hf_not_accepted", "Bearer hf_wrong",
                                                                "Bearer hf_accepted"}
    assert cdn_gets(hub)[0]["auth"] is None  # the token never leaves the hub's origin


def test_unreachable_server_says_how_to_import(env, hub, monkeypatch):
    publish(hub, "t-offline", {"w.bin": blob(1000, 9)})
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(weights.NetworkError) as e:
        weights.download("t-offline")
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "HTTPS_PROXY" in msg and "textseg models import t-offline FILE" in msg
    assert f"http://127.0.0.1:{port}/{REPO}/resolve/" in msg  # the URL to fetch elsewhere


def test_full_disk_is_refused_before_downloading(env, hub, monkeypatch):
    publish(hub, "t-disk", {"w.bin": blob(50_000, 10)})
    monkeypatch.setattr(weights, "free_bytes", lambda path: 10_000_000)
    with pytest.raises(weights.DiskFullError, match=r"needs 16\.8 MB, 10\.0 MB free.*TEXTSEG_HOME"):
        weights.download("t-disk")
    assert cdn_gets(hub) == []


def test_disk_full_while_writing(env, hub):
    publish(hub, "t-enospc", {"w.bin": blob(200_000, 11)})
    folder = env / "models/t-enospc"
    folder.mkdir(parents=True)
    (folder / "w.bin.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(weights.DiskFullError, match="is full while writing w.bin"):
        weights.download("t-enospc")
    assert not (folder / "w.bin").exists()


@pytest.mark.timeout(20)  # the CDN holds 30 s: a cancel that waited for the next chunk would hang here
def test_cancel_keeps_partial_file(env, hub):
    """The CDN stalls after its first chunk (a connection that stopped moving). A cancel takes effect at once,
    without waiting for more bytes, and every byte received before it is kept, then resumed."""
    data = blob(400_000, 12)
    publish(hub, "t-cancel", {"w.bin": data})
    token = CancelToken()
    hold = hub.hold["weights/w.bin"] = threading.Event()
    seen = []

    def on_bytes(name, done, total):
        if name == "w.bin" and total == len(data):
            seen.append(done)
            token.cancel()

    try:
        with pytest.raises(Cancelled):
            weights.download("t-cancel", cancel=token, on_bytes=on_bytes)
    finally:
        hold.set()
        del hub.hold["weights/w.bin"]
    part = env / "models/t-cancel/w.bin.part"
    kept = part.stat().st_size
    assert seen and kept == seen[-1] and 0 < kept <= hub.CHUNK < len(data)
    weights.download("t-cancel")
    assert cdn_gets(hub)[-1]["range"] == f"bytes={kept}-"
    assert (env / "models/t-cancel/w.bin").read_bytes() == data


_CHILD = """
import json, sys
sys.path.insert(0, {src!r})
from textseg import catalog, weights
from textseg.catalog import ModelSpec, WeightFile
wf = WeightFile(**json.loads(sys.argv[1]))
catalog.register(ModelSpec(id="t-concurrent", family="test", title="t", version="1", dims=3, modalities=("CT",),
                           adapter="x:y", files=(wf,), hidden=True))
def progress(fraction, stage):
    print(stage, flush=True)
weights.download("t-concurrent", progress=progress)
print("DONE", flush=True)
"""


@pytest.mark.timeout(120)
def test_two_processes_download_the_same_file(env, hub):
    data = blob(300_000, 13)
    spec = publish(hub, "t-concurrent", {"w.bin": data})
    hold = hub.hold["weights/w.bin"] = threading.Event()
    code = _CHILD.format(src=str(ROOT / "BiomedParseSlicer"))
    arg = json.dumps(spec.files[0].__dict__)
    env_vars = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env_vars)
    try:
        assert hub.holding.setdefault("weights/w.bin", threading.Event()).wait(60), "first process never downloaded"
        second = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env_vars)
        lines = [second.stdout.readline() for _ in range(2)]  # its progress while the first holds the lock
        hold.set()
        assert lines == ["Checking w.bin\n", "Waiting for another process downloading w.bin\n"], lines
        out1, _ = first.communicate(timeout=60)
        out2, _ = second.communicate(timeout=60)
    finally:
        hold.set()
        for p in (first, second) if "second" in dir() else (first,):
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert "DONE" in out1 and "DONE" in out2 and "w.bin is ready" in out2
    assert len(cdn_gets(hub)) == 1  # one transfer, the waiter used its verified result
    assert (env / "models/t-concurrent/w.bin").read_bytes() == data
    assert not (env / "models/t-concurrent/w.bin.part").exists()


_CLI_CHILD = """
import json, sys
sys.path.insert(0, {src!r})
from textseg import catalog
from textseg.catalog import ModelSpec, WeightFile
from textseg.cli.models import main
files = tuple(WeightFile(**f) for f in json.loads(sys.argv[1]))
catalog.register(ModelSpec(id={model_id!r}, family="test", title="t", version="1", dims=3, modalities=("CT",),
                           adapter="x:y", files=files, hidden=True))
sys.exit(main(sys.argv[2:]))
"""


def run_cli_child(spec: ModelSpec, args: list, env_vars: dict) -> subprocess.CompletedProcess:
    """``textseg models ARGS`` in a fresh process (fresh HTTP sessions, real environment)."""
    code = _CLI_CHILD.format(src=str(ROOT / "BiomedParseSlicer"), model_id=spec.id)
    files = json.dumps([f.__dict__ for f in spec.files])
    return subprocess.run([sys.executable, "-c", code, files, *args], capture_output=True, text=True, timeout=60,
                          env=env_vars)


def test_dead_proxy_is_named_in_the_error(env, hub):
    spec = publish(hub, "t-proxy", {"w.bin": blob(2000, 23)})
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proxied = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    proxied.update(HTTP_PROXY=f"http://127.0.0.1:{port}", http_proxy=f"http://127.0.0.1:{port}")
    r = run_cli_child(spec, ["download", "t-proxy", "--quiet"], proxied)
    assert r.returncode == 1 and hub.log == []
    assert r.stderr.startswith(f"error: Cannot reach {hub.endpoint} through the proxy http://127.0.0.1:{port}")
    assert "HTTPS_PROXY/HTTP_PROXY" in r.stderr and "textseg models import t-proxy FILE" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    direct = run_cli_child(spec, ["download", "t-proxy", "--quiet"], dict(os.environ))  # same, without the proxy
    assert direct.returncode == 0, direct.stderr
    assert (env / "models/t-proxy/w.bin").stat().st_size == 2000


def test_plain_url_file_and_missing_remote_entries(env, hub):
    data = blob(30_000, 24)
    spec = publish(hub, "t-url", {"w.bin": data})
    wf = spec.files[0]
    direct = WeightFile(name="direct.bin", url=f"{hub.cdn}/lfs/{sha(data)}", size=len(data), sha256=sha(data))
    wrong_rev = WeightFile(**{**wf.__dict__, "name": "rev.bin", "revision": "f" * 40})
    wrong_file = WeightFile(**{**wf.__dict__, "name": "nofile.bin", "filename": "weights/nope.bin"})
    for i, f in enumerate((direct, wrong_rev, wrong_file)):
        catalog.register(ModelSpec(**{**spec.__dict__, "id": f"t-url{i}", "files": (f,)}))
    weights.download("t-url0")
    assert (env / "models/t-url0/direct.bin").read_bytes() == data
    assert hub.requests(server="hub") == []  # a plain URL needs no hub
    with pytest.raises(weights.RemoteNotFoundError, match=r"f{40}/weights/w.bin is not on .*RevisionNotFoundError"):
        weights.download("t-url1")
    with pytest.raises(weights.RemoteNotFoundError, match=r"weights/nope.bin is not on .*EntryNotFoundError"):
        weights.download("t-url2")


# ---- offline import, verify, remove, status ------------------------------------------------------
def test_import_good_and_bad_files(env, hub, tmp_path):
    a, b = blob(30_000, 14), blob(20_000, 15)
    spec = publish(hub, "t-import", {"a.bin": a, "b.bin": b})
    src = tmp_path / "downloads"
    src.mkdir()
    (src / "a.bin").write_bytes(a)
    (src / "other-name.bin").write_bytes(b)
    bad = src / "bad.bin"
    bad.write_bytes(b[:-1] + b"x")
    short = src / "short.bin"
    short.write_bytes(b[:1000])
    assert weights.import_file("t-import", src / "a.bin") == env / "models/t-import/a.bin"
    with pytest.raises(UsageError, match="a.bin, b.bin"):
        weights.import_file("t-import", src / "other-name.bin")
    with pytest.raises(weights.ChecksumError, match="failed its checksum.*left untouched"):
        weights.import_file("t-import", bad, name="b.bin")
    with pytest.raises(weights.ChecksumError, match="truncated: 1000 bytes, expected 20000"):
        weights.import_file("t-import", short, name="b.bin")
    assert bad.read_bytes() == b[:-1] + b"x"  # the user's file is never touched
    assert not (env / "models/t-import/b.bin").exists() and not (env / "models/t-import/b.bin.part").exists()
    assert weights.status(spec).state == "partial"
    weights.import_file("t-import", src / "other-name.bin", name="b.bin")
    assert weights.status(spec).state == "ready" and weights.require_weights(spec) == env / "models/t-import"
    assert hub.log == []  # offline: nothing was asked of the server


def test_verify_quarantines_and_require_weights_refuses_corrupt_file(env, hub):
    data = blob(40_000, 16)
    spec = publish(hub, "t-verify", {"w.bin": data})
    weights.download(spec)
    assert weights.verify(spec).files[0].message == "sha256 matches the catalog"
    p = env / "models/t-verify/w.bin"
    p.write_bytes(data[:-1] + b"\0")  # same size, different content, new mtime
    assert weights.status(spec).state == "unverified"
    with pytest.raises(weights.ChecksumError,
                       match=r"failed its checksum.*moved to .*w\.bin\.corrupt.*download t-verify"):
        weights.require_weights(spec)
    assert not p.exists() and weights.status(spec).state == "corrupt"
    weights.download(spec)  # fetches a good copy, drops the quarantined one
    assert p.read_bytes() == data and not (env / "models/t-verify/w.bin.corrupt").exists()
    p.write_bytes(data[:100])
    st = weights.verify(spec)
    assert st.state == "corrupt" and "truncated: 100 bytes, expected 40000" in st.files[0].message


def test_hand_copied_file_is_verified_once_then_trusted(env, hub):
    data = blob(10_000, 17)
    spec = publish(hub, "t-copied", {"w.bin": data})
    folder = env / "models/t-copied"
    folder.mkdir(parents=True)
    (folder / "w.bin").write_bytes(data)
    assert weights.status(spec).files[0].state == "unverified"
    weights.require_weights(spec)
    assert weights.status(spec).state == "ready"
    assert hub.log == []


def test_remove_and_status_all(env, hub):
    spec = publish(hub, "t-remove", {"w.bin": blob(5000, 18), "x.bin": blob(6000, 19)})
    hub.drop_after["weights/x.bin"] = [2000]
    with pytest.raises(weights.IncompleteDownloadError):
        weights.download(spec)
    rows = {r.model_id: r for r in weights.status_all(include_hidden=True)}
    assert [f.state for f in rows["t-remove"].files] == ["ready", "partial"] and rows["t-remove"].state == "partial"
    assert rows["deepbet"].state in ("ready", "missing")
    assert "t-remove" not in {r.model_id for r in weights.status_all()}  # hidden models stay hidden
    removed = weights.remove(spec)
    assert sorted(p.name for p in removed) == ["w.bin", "w.bin.json", "x.bin.part"]
    assert not (env / "models/t-remove").exists() and weights.status(spec).state == "missing"


def test_configure_home_and_endpoint(env, hub, tmp_path, monkeypatch):
    data = blob(3000, 20)
    publish(hub, "t-config", {"w.bin": data})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the explicit setting wins
    weights.configure(home=tmp_path / "elsewhere", endpoint=hub.endpoint)
    weights.download("t-config")
    assert (tmp_path / "elsewhere/models/t-config/w.bin").read_bytes() == data
    with pytest.raises(UsageError, match="Unknown weights setting 'colour'"):
        weights.configure(colour="red")


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_verbs_end_to_end(env, hub, tmp_path, capsys):
    data = blob(80_000, 21)
    publish(hub, "t-cli", {"w.bin": data})
    assert models_main(["download", "t-cli"]) == 0
    out = capsys.readouterr()
    assert f"t-cli: ready in {env / 'models/t-cli'}" in out.out and "w.bin" in out.err  # tqdm bar on stderr
    assert models_main(["list", "--all", "--json"]) == 0
    rows = {r["model_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["t-cli"]["state"] == "ready" and rows["t-cli"]["files"][0]["have"] == 80_000
    assert models_main(["verify", "t-cli"]) == 0
    assert "w.bin: ready (sha256 matches the catalog)" in capsys.readouterr().out
    assert models_main(["remove", "t-cli"]) == 0
    assert "removed 2 file(s)" in capsys.readouterr().out
    assert models_main(["list", "--all"]) == 0
    assert any(line.split() == ["t-cli", "missing"] for line in capsys.readouterr().out.splitlines())
    assert models_main([]) == 0  # plain `textseg models`: the list of the models users see
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line
              and not line.startswith((" ", "cache"))]
    assert "deepbet" in listed and "sat-nano" in listed and "t-cli" not in listed
    assert models_main(["verify", "t-cli"]) == 1
    capsys.readouterr()
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    assert models_main(["import", "t-cli", str(f)]) == 0
    assert "imported and verified" in capsys.readouterr().out
    f.write_bytes(data[:10])
    assert models_main(["--home", str(tmp_path / "h2"), "import", "t-cli", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h2/models/t-cli/w.bin").exists()


def test_cli_errors_and_usage(env, hub, capsys):
    publish(hub, "t-cli-gated", {"w.bin": blob(1000, 22)}, gated=True)
    assert models_main(["download", "t-cli-gated", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "accept the licence" in err
    assert models_main(["download", "no-such-model"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
    assert models_main(["frobnicate"]) == 2
    assert models_main([]) == 0  # no verb: the list (README)
    assert models_main(["import", "t-cli-gated", "/no/such/file"]) == 2


def test_cli_module_runs_in_a_fresh_process_without_torch(env, hub):
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'BiomedParseSlicer')!r}); import textseg.cli.models as c; "
            "rc = c.main(['list']); print('torch' in sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "deepbet" in r.stdout and r.stdout.strip().endswith("False")


# ---- revisions: pinned, resolved, recorded ---------------------------------------------------------
V2_COMMIT = "e473e5b2b1a3f44649734afd3dc7cf1770aaa9e2"


def test_catalog_pins_what_is_known_and_says_how_the_rest_is_resolved():
    v2 = catalog.get_model("biomedparse-v2").files[0]
    assert (v2.revision, v2.size, v2.sha256) == (
        V2_COMMIT, 4_460_902_829, "6ea0bee43b983a7490e0b48689add96440c4405ca4b50b9f2fe21d5d03fd9440")
    segvol = catalog.get_model("segvol").files[0]
    assert segvol.revision == "516701d5bef430604a13f5db7ce896149d075663" and segvol.fallback == "main"
    assert "516701d" in segvol.resolution and "main" in segvol.resolution
    for spec in catalog.list_models():
        for wf in spec.files:
            if wf.package:
                continue
            pinned = weights.is_commit(wf.revision) and wf.sha256 and wf.size
            assert pinned or wf.resolution, f"{spec.id}/{wf.name}: neither pinned nor resolution stated"
            assert not wf.sha256 or weights.is_commit(wf.revision), f"{spec.id}/{wf.name}: a checksum needs a pin"


def pinned_spec(model_id, files, revision, fallback="main", sha=None):
    """A hidden test model whose files are pinned to ``revision`` (maybe not on the hub)."""
    wfs = tuple(WeightFile(name=n, repo=REPO, revision=revision, filename=f"weights/{n}", size=len(d),
                           sha256=sha(d) if callable(sha) else sha, fallback=fallback) for n, d in files.items())
    return catalog.register(ModelSpec(id=model_id, family="test", title=model_id, version="1", dims=3,
                                      modalities=("CT",), adapter="x:y", files=wfs, hidden=True))


def test_wrong_pin_resolves_the_branch_and_says_so(env, hub, capsys):
    data = blob(40_000, 31)
    commit = hub.add(REPO, "weights/w.bin", data)
    wrong = "f" * 40
    spec = pinned_spec("t-wrong-pin", {"w.bin": data}, wrong)
    stages = []
    weights.download(spec, progress=lambda f, s: stages.append(s))
    rec = json.loads((env / "models/t-wrong-pin/.meta/w.bin.json").read_text())
    assert rec["commit"] == commit and rec["revision"] == wrong and rec["repo"] == REPO
    assert f"no commit {wrong}" in rec["note"] and "branch main" in rec["note"]
    assert rec["note"] in stages
    assert models_main(["list", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = lines[next(i for i, x in enumerate(lines) if x.split()[:1] == ["t-wrong-pin"]) + 1]
    assert f"commit {commit[:12]}" in line and f"no commit {wrong}" in line, line
    # without a fallback the error names the revision; with the catalog's sha256 a branch that holds
    # other bytes is never installed
    stiff = pinned_spec("t-wrong-pin-stiff", {"w.bin": data}, wrong, fallback=None)
    with pytest.raises(weights.RemoteNotFoundError, match=f"@{wrong}/weights/w.bin is not on"):
        weights.download(stiff)
    other = pinned_spec("t-wrong-pin-sha", {"w.bin": data}, wrong, sha="0" * 64)
    with pytest.raises(weights.ChecksumError, match="different w.bin than the catalog expects"):
        weights.download(other)
    assert not (env / "models/t-wrong-pin-sha/w.bin").exists()


def test_branch_is_resolved_once_for_all_files_of_a_model(env, hub):
    a, b, b2 = blob(30_000, 32), blob(20_000, 33), blob(20_000, 34)
    first = hub.add(REPO, "weights/a.bin", a)
    hub.add(REPO, "weights/b.bin", b)
    spec = pinned_spec("t-branch", {"a.bin": a, "b.bin": b}, "main")

    def progress(fraction, stage):  # main moves while the first file is downloading
        if stage == "Checking b.bin" and hub.repos[REPO].commit == first:
            hub.new_commit(REPO, "2" * 40, {"weights/b.bin": b2})

    spec = catalog.register(ModelSpec(**{**spec.__dict__, "files": tuple(
        WeightFile(**{**wf.__dict__, "size": None}) for wf in spec.files)}))
    weights.download(spec, progress=progress)
    folder = env / "models/t-branch"
    assert (folder / "b.bin").read_bytes() == b  # the pair comes from one commit
    assert {json.loads((folder / f".meta/{n}.json").read_text())["commit"] for n in ("a.bin", "b.bin")} == {first}
    # a later download of a missing file keeps to the installed files' commit; --force takes main again
    (folder / "b.bin").unlink()
    weights.download(spec)
    assert (folder / "b.bin").read_bytes() == b
    weights.download(spec, force=True)
    assert (folder / "b.bin").read_bytes() == b2
    assert json.loads((folder / ".meta/a.bin.json").read_text())["commit"] == "2" * 40


def test_what_was_resolved_is_listed_kept_by_verify_and_stamped_into_every_segment(env, hub, tmp_path, capsys):
    import numpy as np

    from textseg.formats.segments import segments_from_results
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    data = blob(50_000, 35)
    commit = hub.add(REPO, "weights/w.bin", data)
    wf = WeightFile(name="w.bin", repo=REPO, revision="main", filename="weights/w.bin",
                    resolution="branch main, resolved at download")
    spec = catalog.register(ModelSpec(id="t-stamp", family="synthetic", title="t", version="1", dims=3,
                                      modalities=("CT",), adapter="textseg.models.synthetic.adapter:Synthetic3D",
                                      files=(wf,), hidden=True))
    weights.download(spec)
    want = [{"file": "w.bin", "repo": REPO, "revision": "main", "commit": commit, "size": len(data),
             "sha256": sha(data)}]
    assert weights.provenance(spec) == want
    st = weights.status(spec).files[0]
    assert (st.commit, st.sha256, st.revision) == (commit, sha(data), "main")
    assert models_main(["list", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = lines[next(i for i, x in enumerate(lines) if x.split()[:1] == ["t-stamp"]) + 1]
    assert f"revision main  commit {commit[:12]}  sha256 {sha(data)[:16]}" in line, line
    assert weights.verify(spec).state == "ready"
    assert weights.provenance(spec) == want  # verify re-hashes and keeps what the download resolved

    p = Predictor(spec, device="cpu")
    p.set_image(Volume(np.full((4, 6, 8), 500, np.int16), (1.0, 1.0, 1.0)), "CT")
    r = p.predict(["bone"])[0]
    assert r.provenance["weights"] == want and r.provenance["weights_revision"] == commit
    tags = segments_from_results([r])[0].tags
    assert json.loads(tags["textseg.weights"]) == want and tags["textseg.weights_revision"] == commit


def test_import_identifies_a_pinned_file_by_its_checksum(env, tmp_path):
    data = blob(5000, 36)
    spec = pinned_spec("t-import-pin", {"w.bin": data}, V2_COMMIT, sha=sha)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    weights.import_file(spec, f)
    rec = weights.provenance(spec)[0]
    assert rec["commit"] == V2_COMMIT and rec["sha256"] == sha(data)
    unpinned = catalog.register(ModelSpec(
        id="t-import-free", family="test", title="t", version="1", dims=3, modalities=("CT",), adapter="x:y",
        files=(WeightFile(name="w.bin", repo=REPO, revision="main", filename="w.bin"),), hidden=True))
    weights.import_file(unpinned, f)
    rec = json.loads((env / "models/t-import-free/.meta/w.bin.json").read_text())
    assert rec["commit"] is None and rec["source"] == f"imported from {f}" and rec["checked_against"] == "none"


def test_file_changed_since_download_is_not_loaded(env, hub):
    """Without a catalog checksum, the sha256 recorded at download is what a changed file is checked against."""
    data = blob(30_000, 37)
    spec = publish(hub, "t-changed", {"w.bin": data}, catalog_sha=False)
    weights.download(spec)
    p = env / "models/t-changed/w.bin"
    os.utime(p, ns=(1, 1))  # copied without its times: same bytes, hashed once more, still ready
    weights.require_weights(spec)
    assert weights.status(spec).state == "ready" and weights.provenance(spec)[0]["commit"] == spec.files[0].revision
    p.write_bytes(data[:-1] + b"\0")  # replaced by other bytes
    with pytest.raises(weights.ChecksumError, match=r"\(recorded at download\).*textseg models import t-changed"):
        weights.require_weights(spec)
    assert not p.exists() and weights.status(spec).state == "corrupt"
