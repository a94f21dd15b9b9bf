"""A small HuggingFace-hub look-alike on 127.0.0.1 for the weights tests.

It speaks the download protocol as huggingface_hub and our downloader use it:

* ``HEAD|GET {endpoint}/{org}/{repo}/resolve/{revision}/{filename}`` on the *hub* server; the revision is
  ``main``, the commit main points at, or an earlier commit (``new_commit`` moves main).
  LFS files answer ``302`` to a CDN URL on a second server (another origin, as on the real hub)
  with ``X-Linked-Etag`` (the sha256), ``X-Linked-Size``, ``X-Repo-Commit`` and a git ``ETag``;
  small (non-LFS) files answer ``200`` with their git blob sha1 as ``ETag``.
  Gated repos answer ``401`` (no token, ``X-Error-Code: GatedRepo``), ``401`` with
  ``X-Error-Message: Invalid credentials in Authorization header`` (unknown token) or ``403``
  (known token that has not accepted the licence). Unknown revisions/files answer ``404`` with
  ``X-Error-Code: RevisionNotFound|EntryNotFound``.
* ``GET|HEAD {cdn}/lfs/{sha256}``: the bytes, with ``Range: bytes=N-`` answered by ``206``.

Test hooks: ``drop_after[filename]`` (list of byte counts: each GET pops one, sends that many body
bytes and then drops the connection), ``tamper`` (filenames whose CDN bytes are altered after the
checksum was advertised), ``hold[filename]`` (a threading.Event the CDN waits on after the first
chunk), ``chunk_delay``. Every request is logged in ``log`` (method, server, path, range, status).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlparse


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class HubFile:
    content: bytes
    lfs: bool = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class HubRepo:
    commit: str  # the commit ``main`` points at
    gated: bool = False
    files: dict[str, HubFile] = field(default_factory=dict)
    history: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # earlier commits -> their files


class Hub:
    """Two threaded HTTP servers (hub + CDN) sharing this state."""

    CHUNK = 16 * 1024

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.tokens_with_access: set[str] = {"hf_accepted"}
        self.known_tokens: set[str] = {"hf_accepted", "hf_not_accepted"}
        self.drop_after: dict[str, list[int]] = {}
        self.tamper: set[str] = set()
        self.hold: dict[str, threading.Event] = {}
        self.holding: dict[str, threading.Event] = {}
        self.chunk_delay = 0.0
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._servers = [self._server("hub"), self._server("cdn")]
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.02,), daemon=True) for s in self._servers]
        for t in self._threads:
            t.start()

    # ---- setup --------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def add(self, repo: str, filename: str, content: bytes, lfs: bool = True, gated: bool = False,
            commit: Optional[str] = None) -> str:
        """Publish a file; returns the repo's commit hash (the revision to pin). ``commit`` names the
        repo's commit (a catalog pin) when the repo is new; by default it is derived from the repo's name."""
        r = self.repos.setdefault(repo, HubRepo(commit=commit or hashlib.sha1(repo.encode()).hexdigest(), gated=gated))
        r.gated = r.gated or gated
        r.files[filename] = HubFile(content, lfs)
        return r.commit

    def new_commit(self, repo: str, commit: str, files: dict[str, bytes]) -> None:
        """Move ``main`` to a new commit that changes ``files``; the earlier commit stays resolvable."""
        r = self.repos[repo]
        r.history[r.commit] = dict(r.files)
        r.commit = commit
        for name, content in files.items():
            r.files[name] = HubFile(content, r.files[name].lfs if name in r.files else True)

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def requests(self, method: Optional[str] = None, server: Optional[str] = None) -> list[dict]:
        with self._lock:
            return [e for e in self.log if (method is None or e["method"] == method)
                    and (server is None or e["server"] == server)]

    def _record(self, **entry: object) -> None:
        with self._lock:
            self.log.append(entry)

    def _server(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub, Handler.role = hub, role
        srv = _Server(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    def find_sha(self, sha: str) -> Optional[tuple[str, HubFile]]:
        for r in self.repos.values():
            for files in (r.files, *r.history.values()):
                for name, f in files.items():
                    if f.sha256 == sha:
                        return name, f
        return None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that cancel or servers that drop on purpose end connections abruptly


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub
    role: str

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # ---- routing ------------------------------------------------------------------------------
    def _dispatch(self, head: bool) -> None:
        path = urlparse(self.path).path
        status = self._cdn(path, head) if self.role == "cdn" else self._resolve(path, head)
        self.hub._record(method=self.command, server=self.role, path=path, range=self.headers.get("Range"),
                         auth=self.headers.get("Authorization"), status=status)

    def _error(self, code: int, error_code: str = "", message: str = "") -> int:
        body = f'{{"error": "{message or error_code}"}}'.encode()
        self.send_response(code)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return code

    def _resolve(self, path: str, head: bool) -> int:
        parts = unquote(path).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound", "Repository not found")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        denied = self._auth(repo)
        if denied:
            return denied
        if revision in ("main", repo.commit):
            commit, files = repo.commit, repo.files
        elif revision in repo.history:
            commit, files = revision, repo.history[revision]
        else:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        f = files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        if not f.lfs:
            return self._body(f.content, head, extra={"ETag": f'"{git_blob_sha1(f.content)}"', "X-Repo-Commit": commit})
        self.send_response(302)
        self.send_header("Location", f"{self.hub.cdn}/lfs/{f.sha256}?X-Amz-Signature=test")
        self.send_header("ETag", f'"{git_blob_sha1(f.content[:64])}"')
        self.send_header("X-Linked-Etag", f'"{f.sha256}"')
        self.send_header("X-Linked-Size", str(len(f.content)))
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return 302

    def _auth(self, repo: HubRepo) -> int:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token and token not in self.hub.known_tokens:
            return self._error(401, "", "Invalid credentials in Authorization header")
        if not repo.gated or token in self.hub.tokens_with_access:
            return 0
        if not token:
            return self._error(401, "GatedRepo",
                               "Access to model is restricted. You must be authenticated to access it.")
        return self._error(403, "GatedRepo", "Access to model is restricted and you are not in the authorized list.")

    def _cdn(self, path: str, head: bool) -> int:
        found = self.hub.find_sha(path.rsplit("/", 1)[-1])
        if not path.startswith("/lfs/") or found is None:
            return self._error(404, "", "NoSuchKey")
        name, f = found
        content = f.content
        if name in self.hub.tamper:
            content = content[:-1] + bytes([content[-1] ^ 0xFF])
        return self._body(content, head, name=name)

    # ---- bodies with Range, drops and holds ---------------------------------------------------
    def _body(self, content: bytes, head: bool, extra: Optional[dict[str, str]] = None, name: str = "") -> int:
        start, code = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(content):
                return self._error(416, "", "Range Not Satisfiable")
            code = 206
        self.send_response(code)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(content) - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.end_headers()
        if not head:
            self._send(content[start:], name)
        return code

    def _send(self, data: bytes, name: str) -> None:
        drops = self.hub.drop_after.get(name)
        limit = drops.pop(0) if drops else None
        sent = 0
        while sent < len(data):
            if limit is not None and sent >= limit:
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies mid-body
                self.close_connection = True
                return
            n = self.hub.CHUNK if limit is None else min(self.hub.CHUNK, limit - sent)
            self.wfile.write(data[sent:sent + n])
            self.wfile.flush()
            sent += n
            if name in self.hub.hold:
                self.hub.holding.setdefault(name, threading.Event()).set()
                self.hub.hold[name].wait(30)
            if self.hub.chunk_delay:
                threading.Event().wait(self.hub.chunk_delay)
