"""Who is calling, and the checks every request passes before a route sees it (``Guard``, pure ASGI)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .api_errors import error_response
from .settings import ClientKey, Settings
from .wire import (
    API_HEADER,
    API_VERSION,
    CLIENT_HEADER,
    CLIENT_TOKEN,
    VERSION_HEADER,
    is_loopback,
    version_mismatch_message,
)

log = logging.getLogger("textseg.server")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name (``local`` on a server without keys), its role, and the sha256 of
    the client token it sent (None without one). Jobs and images belong to ``owner``."""

    name: str
    admin: bool = False
    token: Optional[str] = None

    @property
    def owner(self) -> str:
        return self.name if self.token is None else f"{self.name}/{self.token}"

    @staticmethod
    def label(owner: str) -> str:
        """The owner as operators see it: the key's name and the start of the token's hash."""
        name, _, token = owner.partition("/")
        return f"{name}/{token[:12]}" if token else name



class BodyTimeout(Exception):
    """A request body stopped arriving (idle for body_timeout) or arrives slower than min_body_rate."""


class Guard:
    """The checks every request passes (pure ASGI, so that it can also bound the request body in time):

    * API version (426), then who is calling: the bearer key (401/403) and the client token (400);
    * on a server without keys (loopback only): no browser requests (an ``Origin`` header: CSRF) and a
      loopback ``Host`` (DNS rebinding: a page under another name must not reach 127.0.0.1);
    * the request body must keep arriving: idle ``body_timeout`` s, or an average under ``min_body_rate``
      once that long has passed -> 408 and the connection is closed;
    * a client that disconnects mid-request is one log line, any other exception one logged traceback and a
      JSON 500 with a reference (never a traceback to the client, never twice in the log)."""

    def __init__(self, app, settings: Settings, keys: tuple[ClientKey, ...]) -> None:
        self.app, self.settings = app, settings
        self.keys = {hashlib.sha256(k.key.encode()).digest(): k for k in keys}
        self.public = {"/health", "/v1/health"}

    def _caller(self, scope, headers) -> Any:
        """A Caller, or the error response that refuses the request."""
        api = headers.get(API_HEADER.lower())
        if api is not None and api != str(API_VERSION):
            return error_response(426, "version_mismatch",
                          version_mismatch_message(api, headers.get(VERSION_HEADER.lower(), "")))
        path = scope.get("path", "")
        if not self.keys:
            if headers.get("origin") is not None:
                return error_response(403, "browser_refused",
                              "This textseg server has no API key, so it refuses requests made by "
                              "web browsers (Origin header); use the textseg client, or serve with --api-key.")
            host = _host_name(headers.get("host", ""))
            if host is None or not is_loopback(host):
                return error_response(403, "host_refused",
                              "This textseg server has no API key and answers only to a loopback Host "
                              "(localhost, 127.0.0.1, [::1]); serve with --api-key to reach it under another name.")
            caller = Caller("local")
        elif path in self.public:
            caller = Caller("public")
        else:
            auth = headers.get("authorization", "")
            if not auth:
                return error_response(401, "unauthorized",
                                      "This server needs an API key: send 'Authorization: Bearer <key>' "
                                      "(textseg: --api-key or TEXTSEG_API_KEY).", {"WWW-Authenticate": "Bearer"})
            scheme, _, token = auth.partition(" ")
            # the sha256 of the presented key is looked up: its time depends on the digest, never on the key's bytes
            key = self.keys.get(hashlib.sha256(token.strip().encode()).digest()) if scheme.lower() == "bearer" else None
            if key is None or not hmac.compare_digest(token.strip().encode(), key.key.encode()):
                return error_response(403, "forbidden",
                              "The API key was refused by the server; check --api-key / TEXTSEG_API_KEY.")
            caller = Caller(key.name, key.admin)
        token = headers.get(CLIENT_HEADER.lower())
        if token is not None:
            if not CLIENT_TOKEN.fullmatch(token):
                return error_response(400, "invalid_client_token",
                              f"The {CLIENT_HEADER} header must be 16-128 letters, digits or "
                              "_.~- (a random token of this client, e.g. secrets.token_urlsafe(24)).")
            caller = Caller(caller.name, caller.admin, hashlib.sha256(token.encode()).hexdigest())
        return caller

    def _bounded(self, receive):
        idle, rate = self.settings.body_timeout, self.settings.min_body_rate
        state = {"done": idle <= 0, "got": 0, "t0": 0.0}

        async def bounded_receive():
            if state["done"]:  # the body is complete: later receives wait for a disconnect, without limit
                return await receive()
            state["t0"] = state["t0"] or time.monotonic()
            try:
                msg = await asyncio.wait_for(receive(), idle)
            except asyncio.TimeoutError:
                raise BodyTimeout(f"no data for {idle:g} s") from None
            if msg["type"] == "http.request":
                state["got"] += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    state["done"] = True
                else:
                    elapsed = time.monotonic() - state["t0"]
                    if rate and elapsed > idle and state["got"] < rate * elapsed:
                        raise BodyTimeout(f"{state['got'] / elapsed:,.0f} bytes/s, under the server's minimum of "
                                          f"{rate:,} bytes/s")
            return msg

        return bounded_receive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.requests import ClientDisconnect

        caller = self._caller(scope, Headers(scope=scope))
        if not isinstance(caller, Caller):
            return await caller(scope, receive, send)
        scope.setdefault("state", {})["caller"] = caller
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        what = f"{scope.get('method')} {scope.get('path')}"
        try:
            await self.app(scope, self._bounded(receive), tracked_send)
        except BodyTimeout as exc:
            log.info("%s from %s: the request body stopped arriving (%s); connection closed", what, _client(scope), exc)
            if not started:
                await error_response(408, "body_timeout",
                             f"The request body did not arrive in time ({exc}); the server closed the "
                             "connection. Send it again (check the network).", {"Connection": "close"})(scope, receive,
                                                                                                        send)
        except ClientDisconnect:
            log.info("%s from %s: the client disconnected before its request was complete", what, _client(scope))
        except Exception:  # noqa: BLE001 - logged once here, a JSON 500 to the client
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error %s on %s", ref, what)
            if not started:
                await error_response(500, "internal",
                             f"Internal server error (reference {ref} in the server log).")(scope, receive, send)


def _host_name(host: str) -> Optional[str]:
    """The name of a Host header (without port; IPv6 without brackets), None if it is malformed."""
    from urllib.parse import urlsplit

    try:
        return urlsplit("//" + host).hostname if host else None
    except ValueError:
        return None


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"

