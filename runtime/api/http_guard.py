"""Request-level checks that keep web pages out of the API: Host, Content-Type, Origin and CORS.

A browser lets any page it shows send a "simple" cross-origin POST (text/plain, no preflight) and,
through DNS rebinding, even read the answer under the page's own name. So, before auth and routing:
the Host header must name this server (421 otherwise), a JSON route takes only `application/json`
(415: a browser cannot send that cross-origin without a preflight), and a request with an Origin
is served only same-origin or from an origin in `--cors-origins` (403), which also get the CORS
headers and preflight answers. Clients that are not browsers send no Origin and are unaffected.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from llmc.runtime.api.errors import HttpError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# How long a browser may cache a preflight answer: long enough to save a round trip per request,
# short enough that a changed --cors-origins takes effect within minutes.
PREFLIGHT_MAX_AGE_S = 600
# How long a client may take to send the whole request body once its headers are in (408 after):
# an 8 MB body (the largest accepted) needs ~2 Mbit/s to make it, a chat of a few KB is instant;
# a client trickling bytes to hold a connection open is cut off here (Granian times only headers).
BODY_TIMEOUT_S = 30.0
_LOOPBACK_NAMES = {"localhost", "localhost.", "127.0.0.1", "::1"}
_CORS_METHODS = b"GET, POST, OPTIONS"
_CORS_HEADERS = b"authorization, content-type"


def _split_host(value: str) -> tuple[str, str]:
    """`name:port`, `[v6]:port`, or either without the port → (lower-case name without brackets, port)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def default_allowed_hosts(bind_host: str) -> set[str]:
    """Names a Host header may carry without --allowed-hosts: loopback names, and for a bind to
    another address also the machine's own names. IP literals are always allowed (DNS rebinding
    needs a name the attacker controls), so `curl http://10.0.0.5:2000` works as it did."""
    names = set(_LOOPBACK_NAMES)
    if bind_host not in _LOOPBACK_NAMES and not bind_host.startswith("127."):
        names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
    return names


class HttpGuard:
    """Checks for one server: `allowed_hosts` (None: the defaults; "*": any; ".example.com": the
    name and its subdomains) and `cors_origins` (exact origins such as https://app.example.com,
    or "*")."""

    def __init__(
        self,
        bind_host: str,
        allowed_hosts: list[str] | None = None,
        cors_origins: list[str] | None = None,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        hosts = [h.strip().lower() for h in allowed_hosts or [] if h.strip()]
        self._any_host = "*" in hosts
        self._hosts = default_allowed_hosts(bind_host) | {_split_host(h)[0] for h in hosts if not h.startswith(".")}
        self._host_suffixes = tuple(h for h in hosts if h.startswith("."))
        origins = [o.strip().rstrip("/") for o in cors_origins or [] if o.strip()]
        self._any_origin = "*" in origins
        self._origins = {o.lower() for o in origins}
        self.body_timeout_s = body_timeout_s

    def host_allowed(self, host: str) -> bool:
        name, _ = _split_host(host)
        if self._any_host or name in self._hosts or _is_ip(name):
            return True
        return any(name.endswith(s) or name == s[1:] for s in self._host_suffixes)

    def cors_allowed(self, origin: str) -> bool:
        return self._any_origin or origin.lower().rstrip("/") in self._origins

    def check(self, scope: Scope, json_route: bool) -> list[tuple[bytes, bytes]]:
        """Raise HttpError for a request that must not be served; else the CORS headers its
        response carries (none for same-origin and non-browser requests)."""
        headers = _headers(scope)
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self.host_allowed(host):
            raise HttpError(
                421,
                f"this server does not answer to the host {host!r}; if that is its name, start it with "
                "--allowed-hosts NAME",
                code="misdirected_request",
            )
        if json_route:
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                raise HttpError(
                    415,
                    "send the request body as JSON with the header `Content-Type: application/json`",
                    code="unsupported_media_type",
                )
        origin = headers.get(b"origin")
        if origin is None or _same_origin(origin.decode("latin-1"), host):
            return []
        text = origin.decode("latin-1")
        if not self.cors_allowed(text):
            raise HttpError(
                403,
                f"requests from the web origin {text!r} are refused; to allow a web page on it, start "
                "the server with --cors-origins ORIGIN",
                code="origin_not_allowed",
            )
        return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]

    def is_preflight(self, scope: Scope) -> bool:
        headers = _headers(scope)
        return scope["method"] == "OPTIONS" and b"origin" in headers and b"access-control-request-method" in headers

    async def preflight(self, send: Send) -> None:
        """Answer a preflight from an allowed origin (`check` refused the others); `send` adds the
        origin's CORS headers, as for every response to it."""
        headers = [
            (b"access-control-allow-methods", _CORS_METHODS),
            (b"access-control-allow-headers", _CORS_HEADERS),
            (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def timed_receive(self, receive: Receive) -> Receive:
        """`receive` that raises 408 if the request body is not complete BODY_TIMEOUT_S after the
        request started; once it is, later calls (disconnect watchers) wait as long as they like."""
        deadline = time.monotonic() + self.body_timeout_s
        complete = False

        async def bounded() -> dict[str, Any]:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HttpError(
                    408, f"the request body did not arrive within {self.body_timeout_s:g} s", code="timeout"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        return bounded


def with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """`send` that adds `extra` headers to the response's start."""
    if not extra:
        return send

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def _same_origin(origin: str, host: str) -> bool:
    """The Origin names the server the Host header names (the chat page at /ui calls its own API).
    Schemes are not compared: behind a TLS proxy the page is https while the server speaks http."""
    if not host or "://" not in origin:
        return False  # "null" (sandboxed frames, file://) is never same-origin
    scheme, _, netloc = origin.partition("://")
    o_name, o_port = _split_host(netloc)
    h_name, h_port = _split_host(host)
    default = {"http": "80", "https": "443"}.get(scheme.lower(), "")
    return o_name == h_name and (o_port or default) == (h_port or default)
