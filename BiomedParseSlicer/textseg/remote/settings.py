"""How ``textseg serve`` is configured: ``Settings`` and the clients' API keys (``--keys-file``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UsageError


@dataclass(frozen=True)
class ClientKey:
    """One client's API key (``--keys-file``): its name (shown to operators) and whether it is an admin."""

    name: str
    key: str
    admin: bool = False

    def __repr__(self) -> str:  # keys never reach a log through a repr
        return f"ClientKey({self.name!r}, admin={self.admin})"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    api_key: Optional[str] = None  # one key shared by all clients (client "default"); or:
    keys: tuple[ClientKey, ...] = ()  # per-client keys (read_keys_file); a key is required unless host is loopback
    devices: tuple[str, ...] = ("auto",)  # one worker process per entry
    preload: tuple[str, ...] = ()
    queue_size: int = 16  # queued jobs (not counting running ones); full -> 429
    session_ttl: float = 3600.0  # seconds an uploaded volume lives after its last use
    result_ttl: float = 3600.0  # seconds a finished job and its result are kept
    max_upload_bytes: int = 2 << 30  # decoded NRRD size, and decoded voxels of any NRRD-internal compression
    max_results_per_client: int = 100  # finished jobs kept per client; beyond it the oldest is dropped
    max_result_bytes_per_client: int = 4 << 30  # result files kept per client; beyond it the oldest are dropped
    max_volume_bytes_per_client: int = 8 << 30  # stored images per client; beyond it its least recently used go
    max_json_bytes: int = 1 << 20  # a job request
    header_timeout: float = 30.0  # seconds a connection may take to send a request's headers (0: no limit)
    body_timeout: float = 30.0  # seconds without request body data before 408 (0: no limit)
    min_body_rate: int = 16 << 10  # bytes/s a request body must average once body_timeout has passed
    heartbeat_timeout: float = 120.0  # a worker silent this long is hung: its job fails, it is replaced (0: off)
    cancel_timeout: float = 60.0  # a running job not stopped this long after DELETE: its worker is replaced
    job_timeout: float = 3 * 3600.0  # longest a job may run (0: no limit)
    work_dir: Optional[str] = None  # default: a private temp folder removed at shutdown
    show_test_models: bool = False  # offer hidden test-only adapters (tests only; or TEXTSEG_SHOW_TEST_MODELS=1)
    adapter_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # server-side, per model
    weights_dir: Optional[str] = None
    ray: bool = False
    ray_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"



# ---- keys ------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def key_problem(key: str) -> Optional[str]:
    """Why ``key`` is too weak to protect a server, or None. At least 16 printable characters, no spaces,
    at least 8 different ones: 'a', ' ', 'secret' or 'aaaa...' are guessed in no time."""
    if len(key) < 16:
        return f"it has {len(key)} characters; use at least 16"
    if not key.isprintable() or any(c.isspace() for c in key):
        return "it contains spaces or control characters"
    if len(set(key)) < 8:
        return "it repeats too few different characters"
    return None


def read_keys_file(path) -> tuple[ClientKey, ...]:
    """Per-client keys: one client a line, ``NAME KEY [user|admin]``; blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"Cannot read --keys-file {path}: {exc.strerror}.") from None
    keys: list[ClientKey] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("user", "admin")):
            raise UsageError(f"--keys-file {path}, line {n}: expected 'NAME KEY [user|admin]'.")
        name, key = parts[0], parts[1]
        if not _NAME.fullmatch(name):
            raise UsageError(f"--keys-file {path}, line {n}: a client name is 1-64 letters, digits or _.@-.")
        weak = key_problem(key)
        if weak:
            raise UsageError(f"--keys-file {path}, line {n}: the key of '{name}' is too weak ({weak}). Make one with "
                             f"{KEY_HINT}.")
        if any(k.name == name for k in keys) or any(k.key == key for k in keys):
            raise UsageError(f"--keys-file {path}, line {n}: client names and keys must be unique.")
        keys.append(ClientKey(name, key, len(parts) == 3 and parts[2] == "admin"))
    if not keys:
        raise UsageError(f"--keys-file {path} holds no keys.")
    return tuple(keys)


def all_keys(settings: Settings) -> tuple[ClientKey, ...]:
    keys = tuple(settings.keys)
    if settings.api_key is not None:
        if keys:
            raise UsageError("Give either one shared API key (--api-key/--api-key-file) or a --keys-file, not both.")
        keys = (ClientKey("default", settings.api_key),)
    for k in keys:
        weak = key_problem(k.key)
        if weak:
            raise UsageError(f"The API key{'' if k.name == 'default' else ' of ' + repr(k.name)} is too weak ({weak}). "
                             f"Make one with {KEY_HINT}.")
    return keys

