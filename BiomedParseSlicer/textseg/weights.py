"""Where model weights live, and getting them there safely: download, resume, verify, import.

Layout: the cache folder is ``configure(home=...)``, else ``$TEXTSEG_HOME``, else ``~/.textseg``;
model ``ID`` keeps its files in ``<home>/models/ID/<name>``. Next to them: ``<name>.part`` (a
download in progress, resumed with an HTTP Range request), ``<name>.corrupt`` (a file that failed
verification, quarantined), and ``.meta/<name>.json`` (the sha256, size and mtime recorded when the
file was verified, so a verified file is not hashed again on every load) and ``.meta/<name>.lock``.
Files shipped inside a PyPI package (deepbet) are found in that package; nothing is downloaded.

Why huggingface_hub only for metadata: ``hf_hub_url`` builds the pinned ``resolve`` URL (with
``HF_ENDPOINT``), ``get_hf_file_metadata`` does the HEAD exactly as the hub expects (hub-internal
redirects, ``X-Linked-Etag``/``X-Linked-Size``/``X-Repo-Commit``, typed gated/not-found errors) and
``build_hf_headers`` sends the token. The body is fetched with ``requests`` because
``hf_hub_download`` offers no byte-progress callback, no cancel, no sha256 check and no free-disk
refusal, keeps its own blob/symlink cache (symlinks fail on many Windows/Slicer installs, copying
doubles multi-GB files) and sends Xet-backed files through ``hf_xet`` around any such checks.
A file is installed only after its sha256 matches the catalog (or, when the catalog has none, the
hub's LFS sha256 from the HEAD; small non-LFS files: their git blob sha1).

Revisions: a branch (``main``) is resolved to a commit once per download of a model, and every file of
the model comes from that commit (a file downloaded later keeps to the commit its installed siblings
were recorded at, unless ``force``). A pinned commit the hub does not know is replaced by the file's
``fallback`` branch, with a note. The record in ``.meta/<name>.json`` keeps the repo, the revision asked
for, the commit resolved, the size and the sha256: ``status`` / ``textseg models list`` show them and
``provenance`` hands them to every segment's provenance.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .catalog import ModelSpec, WeightFile, get_model, list_models
from .errors import UsageError, WeightsError
from .runcontrol import CancelToken, ProgressFn, sub_progress

BytesFn = Callable[[str, int, Optional[int]], None]  # (file name, bytes done, bytes total)

_CHUNK = 1 << 20
_DISK_MARGIN = 16 << 20  # keep this much free beyond the file itself
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
# What a record says about where the bytes came from (kept by verify while the bytes are the same).
_ORIGIN = ("repo", "filename", "revision", "commit", "url", "note", "source")


def is_commit(revision: Optional[str]) -> bool:
    """A full git commit hash (a pin), not a branch or tag."""
    return bool(revision) and _SHA1.match(str(revision)) is not None


# ---- errors -------------------------------------------------------------------------------------
class AccessDeniedError(WeightsError):
    """401/403: no token, an invalid token, or the model's licence was not accepted."""


class NetworkError(WeightsError):
    """The server cannot be reached (offline, proxy, DNS, TLS, server error)."""


class DiskFullError(WeightsError):
    """Not enough free disk space for the download."""


class ChecksumError(WeightsError):
    """A file's content does not match its expected sha256 (or size): it is never used."""


class IncompleteDownloadError(WeightsError):
    """The connection ended before the whole file arrived; the partial file is kept for resuming."""


class RemoteNotFoundError(WeightsError):
    """The repository, revision or file named by the catalog is not on the server."""


class _RevisionMissing(RemoteNotFoundError):
    """The revision asked for is not on the server (a wrong pin, or history rewritten)."""


# ---- settings -----------------------------------------------------------------------------------
@dataclass
class Settings:
    """Explicit settings (Slicer panel, server config); ``None`` falls back to the environment."""

    home: Optional[Path] = None  # else $TEXTSEG_HOME, else ~/.textseg
    token: Optional[str] = None  # else $HF_TOKEN, else the token saved by `hf auth login`
    endpoint: Optional[str] = None  # else $HF_ENDPOINT, else https://huggingface.co
    timeout: float = 30.0  # seconds to connect / between bytes
    retries: int = 3  # automatic resumes within one download after a dropped connection


_SETTINGS = Settings()


def configure(**changes: Any) -> Settings:
    """Set explicit settings, e.g. ``configure(home="/data/textseg", token="hf_...")``."""
    for key, value in changes.items():
        if not hasattr(_SETTINGS, key):
            raise UsageError(f"Unknown weights setting '{key}'; known: {', '.join(asdict(_SETTINGS))}.")
        if key == "home" and value is not None:
            value = Path(value).expanduser()
        setattr(_SETTINGS, key, value)
    return _SETTINGS


def settings() -> Settings:
    return _SETTINGS


def home() -> Path:
    if _SETTINGS.home is not None:
        return Path(_SETTINGS.home)
    return Path(os.environ.get("TEXTSEG_HOME") or Path.home() / ".textseg").expanduser()


def endpoint() -> str:
    return (_SETTINGS.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def resolve_token(token: Optional[str] = None) -> Optional[str]:
    """The HuggingFace token to send: argument, setting, $HF_TOKEN, then a saved login."""
    found = token or _SETTINGS.token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return found or _saved_token()


def _saved_token() -> Optional[str]:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no saved login, or an unreadable one: download anonymously
        return None


def free_bytes(path: Path) -> int:
    """Free space on the disk holding ``path`` (tests replace this to simulate a full disk)."""
    return shutil.disk_usage(path).free


# ---- paths --------------------------------------------------------------------------------------
def model_dir(spec: ModelSpec) -> Path:
    return home() / "models" / spec.id


@dataclass(frozen=True)
class _Where:
    folder: Path
    name: str

    @property
    def final(self) -> Path:
        return self.folder / self.name

    @property
    def part(self) -> Path:
        return self.folder / (self.name + ".part")

    @property
    def corrupt(self) -> Path:
        return self.folder / (self.name + ".corrupt")

    @property
    def marker(self) -> Path:
        return self.folder / ".meta" / (self.name + ".json")

    @property
    def lock(self) -> Path:
        return self.folder / ".meta" / (self.name + ".lock")


def _where(spec: ModelSpec, wf: WeightFile, weights_dir: Optional[Path]) -> _Where:
    return _Where(Path(weights_dir or model_dir(spec)), wf.name)


def locate(spec: ModelSpec, wf: WeightFile, weights_dir: Optional[Path] = None) -> Optional[Path]:
    """The local path of one catalog file, or None when it is not present."""
    if wf.package:
        try:
            p = Path(str(metadata.distribution(wf.package).locate_file(wf.package_path or wf.name)))
        except metadata.PackageNotFoundError:
            return None
        return p if p.is_file() else None
    p = Path(weights_dir or model_dir(spec)) / wf.name
    return p if p.is_file() else None


def missing_files(spec: ModelSpec, weights_dir: Optional[Path] = None) -> list[WeightFile]:
    return [wf for wf in spec.files if locate(spec, wf, weights_dir) is None]


def is_ready(spec: ModelSpec, weights_dir: Optional[Path] = None) -> bool:
    return not missing_files(spec, weights_dir)


def require_weights(spec: ModelSpec, weights_dir: Optional[Path] = None) -> Path:
    """The model's weights folder, every file present and verified (hashed once, then recorded);
    WeightsError naming the missing files and the fix otherwise. A corrupt file is quarantined."""
    missing = missing_files(spec, weights_dir)
    if missing:
        names = ", ".join(wf.name for wf in missing)
        pkgs = sorted({wf.package for wf in missing if wf.package})
        if pkgs:
            fix = f"install the package that ships them: pip install {' '.join(pkgs)}"
        else:
            fix = (
                f"download them with `textseg models download {spec.id}`, or import a file you "
                f"downloaded yourself with `textseg models import {spec.id} FILE`"
            )
        raise WeightsError(f"Model '{spec.id}' is missing weight file(s) {names} in {weights_dir or model_dir(spec)}: "
                           f"{fix}.")
    for wf in spec.files:
        if not wf.package:
            _ensure_verified(spec, wf, _where(spec, wf, weights_dir))
    return Path(weights_dir or model_dir(spec))


# ---- hashing and the verification record ---------------------------------------------------------
def sha256_file(path: Path, progress: Optional[Callable[[int], None]] = None, cancel: Any = None) -> str:
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            CancelToken.of(cancel).check()
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(w: _Where) -> Optional[dict[str, Any]]:
    try:
        return json.loads(w.marker.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(w: _Where, sha256: str, checked_against: str, **origin: Any) -> None:
    """Record a verified file; ``origin`` (repo, revision, commit, ...) replaces what an earlier record
    said, which is kept only while the bytes are the same (verify re-hashing a downloaded file)."""
    st = w.final.stat()
    old = _read_marker(w) or {}
    kept = {k: old.get(k) for k in _ORIGIN} if old.get("sha256") == sha256 else {k: None for k in _ORIGIN}
    rec = dict(sha256=sha256, size=st.st_size, mtime_ns=st.st_mtime_ns, checked_against=checked_against,
               verified_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **{**kept, **origin})
    try:
        w.marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = w.marker.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, w.marker)
    except OSError:  # read-only weights folder: verify again next time
        pass


def _marker_valid(w: _Where, wf: WeightFile) -> bool:
    rec = _read_marker(w)
    try:
        st = w.final.stat()
    except OSError:
        return False
    if not rec or rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
        return False
    return wf.sha256 is None or rec.get("sha256") == wf.sha256.lower()


def _quarantine(w: _Where, why: str) -> str:
    """Move a bad installed file aside (never loaded, kept for inspection); return the message."""
    try:
        os.replace(w.final, w.corrupt)
        w.marker.unlink(missing_ok=True)
    except OSError:
        w.final.unlink(missing_ok=True)
        return f"{why} The file was deleted."
    return f"{why} It was moved to {w.corrupt} and will not be used."


@dataclass(frozen=True)
class _Expected:
    sha256: Optional[str] = None
    git_sha1: Optional[str] = None
    size: Optional[int] = None
    source: str = "catalog"


def _catalog_expected(wf: WeightFile, rec: Optional[dict[str, Any]] = None) -> _Expected:
    """What a file must be: the catalog's sha256 and size; without them, the sha256 and size in the record
    ``rec`` (given by verify), which was taken when the file was installed."""
    if wf.sha256:
        return _Expected(wf.sha256.lower(), None, wf.size, "catalog")
    if rec and rec.get("sha256"):
        if rec.get("checked_against") in ("catalog", "hub-lfs-sha256", "hub-git-sha1"):
            when = "recorded at download"
        elif str(rec.get("source") or "").startswith("imported"):
            when = "recorded at import"
        else:
            when = "recorded when it was first verified"
        return _Expected(rec["sha256"], None, rec.get("size") or wf.size, when)
    return _Expected(None, None, wf.size, "none")


def _check_file(path: Path, exp: _Expected, label: str, on_bytes: Optional[Callable[[int], None]] = None,
                cancel: Any = None) -> str:
    """sha256 of ``path``; ChecksumError when its size or digest differs from ``exp``."""
    size = path.stat().st_size
    if exp.size is not None and size != exp.size:
        kind = "truncated" if size < exp.size else "too large"
        raise ChecksumError(f"{label} is {kind}: {size} bytes, expected {exp.size}.")
    digest = sha256_file(path, on_bytes, cancel)
    if exp.sha256 and digest != exp.sha256:
        raise ChecksumError(f"{label} failed its checksum: sha256 {digest}, expected {exp.sha256} ({exp.source}).")
    if exp.git_sha1 and _git_blob_sha1(path) != exp.git_sha1:
        raise ChecksumError(f"{label} failed its checksum: git blob sha1 differs from the hub's {exp.git_sha1}.")
    return digest


def _ensure_verified(spec: ModelSpec, wf: WeightFile, w: _Where) -> None:
    """Hash a file whose record no longer matches it (touched, copied, replaced) against the catalog's
    sha256, else the one recorded when it was installed; quarantine it when it differs."""
    if _marker_valid(w, wf):
        return
    rec = _read_marker(w) or {}
    exp = _catalog_expected(wf, rec)
    try:
        digest = _check_file(w.final, exp, f"Weight file {w.final}")
    except ChecksumError as e:
        raise ChecksumError(_quarantine(w, str(e)) + f" Run `textseg models download {spec.id}` to fetch it again, or "
                            f"`textseg models import {spec.id} FILE` to install a file of your own.") from None
    _write_marker(w, digest, "catalog" if exp.source == "catalog" else rec.get("checked_against") or "none")


# ---- status -------------------------------------------------------------------------------------
READY, MISSING, PARTIAL, CORRUPT, UNVERIFIED = "ready", "missing", "partial", "corrupt", "unverified"


@dataclass(frozen=True)
class FileStatus:
    name: str
    state: str  # ready | missing | partial | corrupt | unverified
    path: Optional[str]
    size: Optional[int]  # expected size (catalog or recorded), None if unknown
    have: int  # bytes present (final, partial or quarantined file)
    message: str = ""
    revision: str = ""  # what the catalog asks for: a commit (pin) or a branch
    commit: Optional[str] = None  # the commit the installed file was downloaded from (recorded)
    sha256: Optional[str] = None  # the installed file's sha256 (recorded)
    note: str = ""  # how the revision was resolved at download (e.g. a pin the hub did not know)
    resolution: str = ""  # the catalog's account of how the revision is known or resolved


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    state: str  # ready | missing | partial | corrupt | unverified
    folder: str
    files: tuple[FileStatus, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_status(spec: ModelSpec, wf: WeightFile, weights_dir: Optional[Path]) -> FileStatus:
    if wf.package:
        p = locate(spec, wf, weights_dir)
        msg = "" if p else f"install the package that ships it: pip install {wf.package}"
        return FileStatus(wf.name, READY if p else MISSING, str(p) if p else None, wf.size,
                          p.stat().st_size if p else 0, msg,
                          revision=wf.revision, resolution=f"shipped in the Python package {wf.package}")
    w = _where(spec, wf, weights_dir)
    rec = _read_marker(w)
    size = wf.size or (rec or {}).get("size")
    known = dict(revision=wf.revision if not wf.url else "", resolution=wf.resolution)
    if w.final.is_file():
        have = w.final.stat().st_size
        if size is not None and have != size:
            return FileStatus(wf.name, CORRUPT, str(w.final), size, have, f"size {have} bytes, expected {size}",
                              **known)
        if _marker_valid(w, wf):
            return FileStatus(wf.name, READY, str(w.final), size, have, commit=(rec or {}).get("commit"),
                              sha256=(rec or {}).get("sha256"), note=(rec or {}).get("note") or "", **known)
        return FileStatus(wf.name, UNVERIFIED, str(w.final), size, have, "present but not verified yet", **known)
    if w.part.is_file():
        have = w.part.stat().st_size
        return FileStatus(wf.name, PARTIAL, str(w.part), size, have,
                          "download interrupted; it resumes on the next download", **known)
    if w.corrupt.is_file():
        return FileStatus(wf.name, CORRUPT, str(w.corrupt), size, w.corrupt.stat().st_size,
                          "failed verification (quarantined)", **known)
    return FileStatus(wf.name, MISSING, None, size, 0, **known)


def _model_state(states: list[str]) -> str:
    if not states or all(s == READY for s in states):
        return READY
    for s in (CORRUPT, PARTIAL, UNVERIFIED):
        if s in states:
            return s
    return PARTIAL if READY in states else MISSING


def status(model: Union[str, ModelSpec], weights_dir: Optional[Path] = None) -> ModelStatus:
    """Cheap state of a model's files (no hashing; ``verify`` hashes)."""
    spec = _spec(model)
    files = tuple(_file_status(spec, wf, weights_dir) for wf in spec.files)
    return ModelStatus(spec.id, _model_state([f.state for f in files]), str(weights_dir or model_dir(spec)), files)


def status_all(include_hidden: bool = False) -> list[ModelStatus]:
    return [status(s) for s in list_models(include_hidden)]


def provenance(model: Union[str, ModelSpec], weights_dir: Optional[Path] = None) -> list[dict[str, Any]]:
    """What each weight file of a model is, for a segment's provenance: for a downloaded or imported file
    its repo, the revision the catalog asks for, the commit it was downloaded from, its size and sha256 as
    recorded when it was verified (None where unknown: no record, or a file changed since); for a
    package-shipped file the package and its installed version. No hashing."""
    spec = _spec(model)
    out: list[dict[str, Any]] = []
    for wf in spec.files:
        if wf.package:
            try:
                version: Optional[str] = metadata.version(wf.package)
            except metadata.PackageNotFoundError:
                version = None
            out.append({"file": wf.name, "package": wf.package, "revision": wf.revision, "version": version})
            continue
        w = _where(spec, wf, weights_dir)
        rec = (_read_marker(w) or {}) if _marker_valid(w, wf) else {}
        out.append({"file": wf.name, "repo": wf.repo or wf.url, "revision": None if wf.url else wf.revision,
                    "commit": rec.get("commit"), "size": rec.get("size"), "sha256": rec.get("sha256")})
    return out


def revision_summary(files: list[dict[str, Any]]) -> str:
    """One revision per file (the commit where one was recorded, else what the catalog asks for), comma-joined."""
    return ",".join(str(r) for r in (f.get("commit") or f.get("revision") or f.get("version") for f in files) if r)


def _spec(model: Union[str, ModelSpec]) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else get_model(model)


# ---- cancel, progress, locking ------------------------------------------------------------------
class _Progress:
    """Maps per-file bytes onto one 0..1 fraction over all files of a model."""

    def __init__(self, progress: Optional[ProgressFn], on_bytes: Optional[BytesFn], weights: list[float]) -> None:
        self.progress, self.on_bytes = progress, on_bytes
        total = sum(weights) or 1.0
        self.starts = [sum(weights[:i]) / total for i in range(len(weights))]
        self.spans = [x / total for x in weights]
        self.index = 0

    def stage(self, text: str, fraction: float = 0.0) -> None:
        step = sub_progress(self.progress, self.starts[self.index], self.starts[self.index] + self.spans[self.index])
        if step:
            step(fraction, text)

    def bytes(self, verb: str, name: str, done: int, total: Optional[int]) -> None:
        if self.on_bytes:
            self.on_bytes(name, done, total)
        text = f"{verb} {name}: {done / 1e6:.1f}" + (f"/{total / 1e6:.1f} MB" if total else " MB")
        self.stage(text, done / total if total else 0.0)


class _Lock:
    """An inter-process lock per file; waiting reports progress and honours cancel."""

    def __init__(self, w: _Where, prog: _Progress, cancel: Any) -> None:
        from filelock import FileLock

        w.lock.parent.mkdir(parents=True, exist_ok=True)
        self.lock, self.w, self.prog, self.cancel = FileLock(str(w.lock)), w, prog, cancel

    def __enter__(self) -> _Lock:
        from filelock import Timeout

        while True:
            try:
                self.lock.acquire(timeout=0.5)
                return self
            except Timeout:
                CancelToken.of(self.cancel).check()
                self.prog.stage(f"Waiting for another process downloading {self.w.name}")

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


# ---- remote metadata ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Remote:
    url: str
    expected: _Expected
    commit: Optional[str] = None
    note: str = ""  # what the user should know about how the revision was resolved


Resolved = dict[tuple[str, str], str]  # (repo, revision asked for) -> commit, for one download of a model


def _resolve(spec: ModelSpec, wf: WeightFile, token: Optional[str], prog: _Progress, resolved: Resolved) -> _Remote:
    """The file's metadata at the commit this download uses for its repo and revision: the one already
    resolved for a sibling file (or recorded for an installed one), else what the hub says the revision is.
    A pinned commit the hub does not know falls back to ``wf.fallback`` (a branch), with a note."""
    key = (wf.repo, wf.revision)
    known = resolved.get(key)
    try:
        remote = _hub_metadata(spec, wf, token, known or wf.revision)
    except _RevisionMissing:
        if known and known != wf.revision:  # a commit recorded earlier is gone (history rewritten): ask again
            resolved.pop(key, None)
            return _resolve(spec, wf, token, prog, resolved)
        if not (is_commit(wf.revision) and wf.fallback):
            raise
        note = (f"{wf.repo} has no commit {wf.revision} (the catalog's pin) on {endpoint()}: branch {wf.fallback} was "
                f"resolved instead" + ("; the file must still match the catalog's sha256" if wf.sha256 else ""))
        prog.stage(note)
        remote = _hub_metadata(spec, wf, token, wf.fallback)
        remote = _Remote(remote.url, remote.expected, remote.commit, note)
    if remote.commit:
        resolved[key] = remote.commit
    return remote


def _recorded_commits(spec: ModelSpec, weights_dir: Optional[Path]) -> Resolved:
    """(repo, revision) -> commit recorded for the model's installed files, so that a file downloaded later
    comes from the same commit as its installed siblings."""
    out: Resolved = {}
    for wf in spec.files:
        if wf.package or wf.url:
            continue
        w = _where(spec, wf, weights_dir)
        rec = _read_marker(w)
        if rec and rec.get("commit") and _marker_valid(w, wf):
            out.setdefault((wf.repo, wf.revision), rec["commit"])
    return out


def _origin(wf: WeightFile, remote: _Remote, source: str = "download") -> dict[str, Any]:
    """The record's account of a download: where the bytes came from, at which commit."""
    return dict(repo=wf.repo or None, filename=wf.filename or wf.name, revision=wf.revision if not wf.url else None,
                commit=remote.commit, url=remote.url, note=remote.note or None, source=source)


def _hub_url(wf: WeightFile, revision: Optional[str] = None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(wf.repo, wf.filename or wf.name, revision=revision or wf.revision or "main", endpoint=endpoint())


def _manual_hint(spec: ModelSpec, wf: WeightFile) -> str:
    src = wf.url or _hub_url(wf)
    return (f"To install it without this connection, download {src} on another machine and run "
            f"`textseg models import {spec.id} FILE`.")


def _access_message(spec: ModelSpec, wf: WeightFile, status_code: Optional[int], token: Optional[str],
                    detail: str) -> str:
    page = f"https://huggingface.co/{wf.repo}"
    if not token:
        return (f"Model '{spec.id}' needs a HuggingFace token for {wf.repo} (HTTP {status_code}): accept the licence "
                f"at {page}, create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN (or the "
                f"token setting). {detail}").strip()
    return (f"Access to {wf.repo} was refused for your token (HTTP {status_code}): accept the licence at {page} with "
            f"the account that owns the token (approval can take a while), and check that HF_TOKEN is a valid read "
            f"token. {detail}").strip()


def _transport_error(e: BaseException) -> bool:
    names = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "NetworkError", "ProxyError"}
    return isinstance(e, OSError) or any(
        c.__name__ in names and c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
        for c in type(e).__mro__
    )


def _network_message(spec: ModelSpec, wf: WeightFile, e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = ("If you are behind a proxy, set HTTPS_PROXY (and NO_PROXY); for a company CA set REQUESTS_CA_BUNDLE. "
            "For a mirror, set HF_ENDPOINT.")
    if "offline" in text.lower():
        hint = "HF_HUB_OFFLINE is set: unset it to download."
    target = wf.url or endpoint()
    proxy = _proxy_for(target)
    via = f" through the proxy {proxy}" if proxy else ""
    if proxy:
        hint = ("Check the proxy address in HTTPS_PROXY/HTTP_PROXY (or add the host to NO_PROXY); for a company CA set "
                "REQUESTS_CA_BUNDLE.")
    return f"Cannot reach {target}{via} to download '{spec.id}' ({text}). {hint} {_manual_hint(spec, wf)}"


def _proxy_for(url: str) -> Optional[str]:
    from requests.utils import get_environ_proxies

    proxies = get_environ_proxies(url)
    return proxies.get(url.split(":", 1)[0].lower()) or proxies.get("all")


def _hub_errors() -> Any:
    """The module holding huggingface_hub's typed errors: ``huggingface_hub.errors`` from 0.25 on; before,
    ``huggingface_hub.utils`` (0.23 and 0.24 have an ``errors`` module without these classes)."""
    from huggingface_hub import utils

    try:
        from huggingface_hub import errors
    except ImportError:
        return utils
    return errors if hasattr(errors, "RevisionNotFoundError") else utils


def _hub_metadata(spec: ModelSpec, wf: WeightFile, token: Optional[str], revision: Optional[str] = None) -> _Remote:
    from huggingface_hub import get_hf_file_metadata

    errors = _hub_errors()
    EntryNotFoundError, GatedRepoError = errors.EntryNotFoundError, errors.GatedRepoError
    HfHubHTTPError = errors.HfHubHTTPError
    RepositoryNotFoundError, RevisionNotFoundError = errors.RepositoryNotFoundError, errors.RevisionNotFoundError

    revision = revision or wf.revision
    url = _hub_url(wf, revision)
    try:
        meta = get_hf_file_metadata(url, token=token or False, timeout=_SETTINGS.timeout)
    except GatedRepoError as e:
        raise AccessDeniedError(_access_message(spec, wf, _code(e), token, "")) from None
    except (RevisionNotFoundError, EntryNotFoundError) as e:
        kind = _RevisionMissing if isinstance(e, RevisionNotFoundError) else RemoteNotFoundError
        raise kind(f"{wf.repo}@{revision}/{wf.filename or wf.name} is not on {endpoint()} ({type(e).__name__}): "
                   f"the mirror may be incomplete, or the catalog entry is wrong.") from None
    except RepositoryNotFoundError as e:
        raise AccessDeniedError(_access_message(spec, wf, _code(e), token,
                                                f"(or {wf.repo} does not exist on {endpoint()})")) from None
    except HfHubHTTPError as e:
        code = _code(e)
        if code in (401, 403):
            raise AccessDeniedError(_access_message(spec, wf, code, token, "")) from None
        raise NetworkError(_network_message(spec, wf, e)) from None
    except Exception as e:
        if _transport_error(e):
            raise NetworkError(_network_message(spec, wf, e)) from None
        raise
    return _Remote(url, _expected_from_hub(wf, meta.etag, meta.size),
                   meta.commit_hash or (revision if is_commit(revision) else None))


def _code(e: BaseException) -> Optional[int]:
    return getattr(getattr(e, "response", None), "status_code", None)


def _expected_from_hub(wf: WeightFile, etag: Optional[str], size: Optional[int]) -> _Expected:
    etag = (etag or "").lower()
    if wf.sha256:
        if _SHA256.match(etag) and etag != wf.sha256.lower():
            raise ChecksumError(f"The server offers a different {wf.name} than the catalog expects (sha256 {etag}, "
                                f"expected {wf.sha256}); nothing was downloaded. Check HF_ENDPOINT / the mirror.")
        if wf.size is not None and size is not None and size != wf.size:
            raise ChecksumError(f"The server offers {wf.name} with {size} bytes, the catalog expects {wf.size}; "
                                f"nothing was downloaded.")
        return _Expected(wf.sha256.lower(), None, wf.size, "catalog")
    if _SHA256.match(etag):
        return _Expected(etag, None, size, "hub-lfs-sha256")
    if _SHA1.match(etag):
        return _Expected(None, etag, size, "hub-git-sha1")
    return _Expected(None, None, size or wf.size, "none")


def _url_metadata(spec: ModelSpec, wf: WeightFile) -> _Remote:
    return _Remote(str(wf.url), _Expected(wf.sha256.lower() if wf.sha256 else None, None, wf.size,
                                          "catalog" if wf.sha256 else "none"))


# ---- the transfer -------------------------------------------------------------------------------
def _check_disk(w: _Where, exp: _Expected) -> None:
    if exp.size is None:
        return
    have = w.part.stat().st_size if w.part.is_file() else 0
    need = max(exp.size - have, 0)
    free = free_bytes(w.folder)
    if free < need + _DISK_MARGIN:
        raise DiskFullError(f"Not enough free disk space in {w.folder} for {w.name}: needs {_gb(need + _DISK_MARGIN)}, "
                            f"{_gb(free)} free. Free some space or point TEXTSEG_HOME (or the cache folder setting) at "
                            f"a larger disk.")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _write_chunks(resp: Any, w: _Where, mode: str, start: int, total: Optional[int], prog: _Progress,
                  cancel: Any) -> int:
    done = start
    try:
        with open(w.part, mode) as f:
            for chunk in _chunks(resp):
                f.write(chunk)  # every byte received is kept (a cancel resumes from here)
                done += len(chunk)
                prog.bytes("Downloading", w.name, done, total)
                CancelToken.of(cancel).check()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"The disk holding {w.folder} is full while writing {w.name} ({done} bytes kept in "
                                f"{w.part}; the download resumes after you free space).") from None
        raise
    return done


def _chunks(resp: Any) -> Iterable[bytes]:
    """The body as it arrives (``read1``), so bytes received before a dropped connection are kept."""
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3
        yield from resp.iter_content(64 << 10)
        return
    while True:
        chunk = read1(_CHUNK)
        if not chunk:
            return
        yield chunk


def _get_once(session: Any, remote: _Remote, headers: dict[str, str], w: _Where, prog: _Progress,
              cancel: Any, spec: ModelSpec, wf: WeightFile, token: Optional[str]) -> int:
    have = w.part.stat().st_size if w.part.is_file() else 0
    total = remote.expected.size
    if total is not None and have > total:
        w.part.unlink()
        have = 0
    if total is not None and have == total:
        return have
    h = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
    with session.get(remote.url, headers=h, stream=True, timeout=(_SETTINGS.timeout, _SETTINGS.timeout)) as r:
        if r.status_code in (401, 403):
            raise AccessDeniedError(_access_message(spec, wf, r.status_code, token, ""))
        if r.status_code == 416 and have:  # the server has nothing after our bytes: start over
            w.part.unlink()
            return 0
        if r.status_code >= 400:
            raise NetworkError(f"Download of {w.name} failed: HTTP {r.status_code} from {r.url}. "
                               f"{_manual_hint(spec, wf)}")
        resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if total is None:
            total = _total_from(r, have if resumed else 0)
        return _write_chunks(r, w, "ab" if resumed else "wb", have if resumed else 0, total, prog, cancel)


def _total_from(r: Any, offset: int) -> Optional[int]:
    cr = r.headers.get("Content-Range")
    if cr and "/" in cr and cr.rsplit("/", 1)[1].isdigit():
        return int(cr.rsplit("/", 1)[1])
    cl = r.headers.get("Content-Length")
    return offset + int(cl) if cl and cl.isdigit() else None


def _transient() -> tuple[type, ...]:
    import requests
    import urllib3

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


def _fetch(remote: _Remote, w: _Where, prog: _Progress, cancel: Any, spec: ModelSpec, wf: WeightFile,
           token: Optional[str], retries: int) -> None:
    import requests
    from huggingface_hub.utils import build_hf_headers

    headers = dict(build_hf_headers(token=token or False)) if not wf.url else {}
    headers["Accept-Encoding"] = "identity"
    last: Optional[BaseException] = None
    transient = _transient()
    with requests.Session() as session:
        for attempt in range(retries + 1):
            try:
                done = _get_once(session, remote, headers, w, prog, cancel, spec, wf, token)
            except transient as e:
                last = e
                if attempt < retries:
                    time.sleep(min(0.5 * 2 ** attempt, 5.0))
                continue
            if remote.expected.size is None or done >= remote.expected.size:
                return
            last = None
    have = w.part.stat().st_size if w.part.is_file() else 0
    if have == 0 and last is not None:
        raise NetworkError(_network_message(spec, wf, last))
    raise IncompleteDownloadError(
        f"Download of {w.name} stopped at {_gb(have)}"
        + (f" of {_gb(remote.expected.size)}" if remote.expected.size else "")
        + f" ({type(last).__name__ if last else 'connection closed early'}). Run `textseg models download {spec.id}` "
        f"again to resume. {_manual_hint(spec, wf)}")


def _install(w: _Where, remote: _Remote, prog: _Progress, cancel: Any, label: str, on_fail: str,
             origin: dict[str, Any]) -> None:
    """Verify ``<name>.part`` and move it into place atomically (recording ``origin``); delete it if it fails."""
    exp = remote.expected
    size = w.part.stat().st_size
    try:
        digest = _check_file(w.part, exp, label, lambda n: prog.bytes("Verifying", w.name, n, size), cancel)
    except ChecksumError as e:
        w.part.unlink(missing_ok=True)
        raise ChecksumError(f"{e} {on_fail}") from None
    os.replace(w.part, w.final)
    w.corrupt.unlink(missing_ok=True)
    _write_marker(w, digest, exp.source, **origin)


def _download_file(spec: ModelSpec, wf: WeightFile, w: _Where, token: Optional[str], prog: _Progress,
                   cancel: Any, force: bool, retries: int, resolved: Resolved) -> Path:
    w.folder.mkdir(parents=True, exist_ok=True)
    prog.stage(f"Checking {wf.name}", 0.0)
    with _Lock(w, prog, cancel):
        if not force and w.final.is_file() and _marker_valid(w, wf):
            prog.stage(f"{wf.name} is ready", 1.0)
            return w.final
        remote = _url_metadata(spec, wf) if wf.url else _resolve(spec, wf, token, prog, resolved)
        if w.final.is_file():
            if not force and _still_good(w, wf, remote, prog, cancel):
                return w.final
            _quarantine(w, "")
        _check_disk(w, remote.expected)
        _fetch(remote, w, prog, cancel, spec, wf, token, retries)
        _install(w, remote, prog, cancel, f"Downloaded {w.name}",
                 f"The download was deleted and nothing was installed; run `textseg models download {spec.id}` to "
                 "retry. If it fails again the server or a proxy is altering the file.", _origin(wf, remote))
        prog.stage(f"{wf.name} downloaded and verified", 1.0)
        return w.final


def _still_good(w: _Where, wf: WeightFile, remote: _Remote, prog: _Progress, cancel: Any) -> bool:
    """An installed file without a valid record (copied in by hand, touched): keep it if it verifies."""
    try:
        digest = _check_file(w.final, remote.expected, w.name,
                             lambda n: prog.bytes("Verifying", w.name, n, remote.expected.size), cancel)
    except ChecksumError:
        return False
    _write_marker(w, digest, remote.expected.source,
                  **_origin(wf, remote, "found in the cache; matched the server's file"))
    return True


def download(model: Union[str, ModelSpec], token: Optional[str] = None, progress: Optional[ProgressFn] = None,
             cancel: Any = None, weights_dir: Optional[Path] = None, force: bool = False,
             on_bytes: Optional[BytesFn] = None, retries: Optional[int] = None) -> Path:
    """Download, verify and install every file of a model (resuming partial files); the model folder.

    ``progress(fraction, stage)`` covers all files; ``on_bytes(name, done, total)`` reports bytes;
    ``cancel`` is a CancelToken (``.check()`` raises Cancelled; the partial file is kept).
    Another process downloading the same file is waited for, then its verified file is used."""
    spec = _spec(model)
    token = resolve_token(token)
    todo = [wf for wf in spec.files if not wf.package]
    for wf in spec.files:
        if wf.package and locate(spec, wf, weights_dir) is None:
            raise WeightsError(f"Model '{spec.id}' ships {wf.name} inside the Python package '{wf.package}': pip "
                               f"install {wf.package}.")
    prog = _Progress(progress, on_bytes, [float(wf.size or 1) for wf in todo] or [1.0])
    resolved = {} if force else _recorded_commits(spec, weights_dir)
    for i, wf in enumerate(todo):
        prog.index = i
        _download_file(spec, wf, _where(spec, wf, weights_dir), token, prog, cancel, force,
                       _SETTINGS.retries if retries is None else retries, resolved)
    if progress:
        progress(1.0, f"{spec.id} is ready")
    return Path(weights_dir or model_dir(spec))


# ---- offline import, verify, remove -------------------------------------------------------------
def _pick_file(spec: ModelSpec, source: Path, name: Optional[str]) -> WeightFile:
    own = [wf for wf in spec.files if not wf.package]
    if not own:
        raise UsageError(f"Model '{spec.id}' has no downloadable weight files (nothing to import).")
    for wf in own:
        if name in (wf.name, wf.filename) or (name is None and source.name in (wf.name, Path(wf.filename or "").name)):
            return wf
    if name is None and len(own) == 1:
        return own[0]
    names = ", ".join(wf.name for wf in own)
    raise UsageError(f"Which file of '{spec.id}' is {source.name}? Give one of: {names} (--name NAME).")


def _copy_part(source: Path, w: _Where, prog: _Progress, cancel: Any) -> None:
    total = source.stat().st_size
    _check_disk(w, _Expected(size=total))
    done = 0
    try:
        with open(source, "rb") as src, open(w.part, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                CancelToken.of(cancel).check()
                dst.write(chunk)
                done += len(chunk)
                prog.bytes("Copying", w.name, done, total)
    except BaseException:
        w.part.unlink(missing_ok=True)
        raise


def import_file(model: Union[str, ModelSpec], file: Union[str, Path], name: Optional[str] = None,
                weights_dir: Optional[Path] = None, progress: Optional[ProgressFn] = None, cancel: Any = None) -> Path:
    """Verify and install a manually downloaded file (air-gapped sites). The source is only read.

    Checked against the catalog's size and sha256 (then its commit is the catalog's pin); when the catalog
    has no sha256, only the size where the catalog has one, and the file is installed with its sha256
    recorded (``verify`` then checks it against that record; its commit is unknown)."""
    spec = _spec(model)
    source = Path(file).expanduser()
    if not source.is_file():
        raise UsageError(f"Cannot import {source}: no such file.")
    wf = _pick_file(spec, source, name)
    w = _where(spec, wf, weights_dir)
    w.folder.mkdir(parents=True, exist_ok=True)
    prog = _Progress(progress, None, [1.0])
    exp = _catalog_expected(wf)
    with _Lock(w, prog, cancel):
        _copy_part(source, w, prog, cancel)
        origin = dict(repo=wf.repo or None, filename=wf.filename or wf.name,
                      revision=wf.revision if not wf.url else None,
                      commit=wf.revision if exp.sha256 and is_commit(wf.revision) else None, url=None,
                      note=None, source=f"imported from {source}")
        _install(w, _Remote(str(source), exp), prog, cancel, f"{source} (as '{wf.name}' of '{spec.id}')",
                 "Nothing was installed; your file was left untouched.", origin)
    if progress:
        progress(1.0, f"Imported {wf.name}")
    return w.final


def verify(model: Union[str, ModelSpec], weights_dir: Optional[Path] = None, progress: Optional[ProgressFn] = None,
           cancel: Any = None) -> ModelStatus:
    """Hash every present file against the catalog (or the checksum recorded at download);
    quarantine those that fail. Returns the status afterwards, with a message per file."""
    spec = _spec(model)
    prog = _Progress(progress, None, [float(wf.size or 1) for wf in spec.files] or [1.0])
    notes: dict[str, str] = {}
    for i, wf in enumerate(spec.files):
        prog.index = i
        notes[wf.name] = _verify_one(spec, wf, weights_dir, prog, cancel)
    st = status(spec, weights_dir)
    files = tuple(FileStatus(**{**asdict(f), "message": notes.get(f.name) or f.message}) for f in st.files)
    return ModelStatus(st.model_id, st.state, st.folder, files)


def _verify_one(spec: ModelSpec, wf: WeightFile, weights_dir: Optional[Path], prog: _Progress, cancel: Any) -> str:
    path = locate(spec, wf, weights_dir)
    if path is None:
        return ""
    exp = _catalog_expected(wf, None if wf.package else _read_marker(_where(spec, wf, weights_dir)))
    on = lambda n: prog.bytes("Verifying", wf.name, n, path.stat().st_size)  # noqa: E731
    if wf.package:
        _check_file(path, exp, f"{wf.name} (package {wf.package})", on, cancel)
        return "sha256 matches the catalog" if exp.sha256 else "no checksum known"
    w = _where(spec, wf, weights_dir)
    with _Lock(w, prog, cancel):
        try:
            digest = _check_file(w.final, exp, f"Weight file {w.final}", on, cancel)
        except ChecksumError as e:
            return _quarantine(w, str(e))
        _write_marker(w, digest, "catalog" if wf.sha256 else (_read_marker(w) or {}).get("checked_against", "none"))
    if exp.source == "catalog":
        return "sha256 matches the catalog"
    if exp.sha256:
        return f"sha256 matches the one {exp.source}"
    return "no reference checksum known; sha256 recorded"


def remove(model: Union[str, ModelSpec], weights_dir: Optional[Path] = None) -> list[Path]:
    """Delete a model's downloaded, partial and quarantined files; package-shipped files stay."""
    spec = _spec(model)
    removed: list[Path] = []
    for wf in spec.files:
        if wf.package:
            continue
        w = _where(spec, wf, weights_dir)
        if not w.folder.is_dir():
            continue
        with _Lock(w, _Progress(None, None, [1.0]), None):
            for p in (w.final, w.part, w.corrupt, w.marker):
                if p.is_file():
                    p.unlink()
                    removed.append(p)
        w.lock.unlink(missing_ok=True)
    _prune(Path(weights_dir or model_dir(spec)))
    return removed


def _prune(folder: Path) -> None:
    for d in (folder / ".meta", folder):
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


__all__ = [
    "AccessDeniedError", "ChecksumError", "DiskFullError", "IncompleteDownloadError", "NetworkError",
    "RemoteNotFoundError", "Settings", "FileStatus", "ModelStatus", "configure", "settings", "home", "endpoint",
    "resolve_token", "free_bytes", "model_dir", "locate", "missing_files", "is_ready", "require_weights",
    "sha256_file", "status", "status_all", "download", "import_file", "verify", "remove", "is_commit", "provenance",
    "revision_summary",
]
