"""A small outbound HTTP/1.1 client for the vision proxy: bounded in time and size, no redirects.

The runtime has no HTTP client dependency, and the proxy needs little: one request per connection
(`Connection: close`), a body read while it streams and cut off past a cap (a Content-Length is
never trusted alone), one deadline for the whole exchange, and redirects reported rather than
followed. Remote image fetches also pass an address policy: the host is resolved once, every
address it has must be public, and the connection goes to that checked address (no second DNS
lookup a rebinding attacker could answer differently).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Lines of a response head (status line plus headers): real servers send a dozen or two.
MAX_HEADER_LINES = 100
# Longest line of a response head or chunk-size line; asyncio's StreamReader refuses longer ones.
MAX_LINE_BYTES = 16 * 1024
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$|^[0-9A-Fa-f:.]{2,45}$")  # a DNS name or an IP literal
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # never sent on a request line or in a header

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """The exchange failed: unreachable, timed out, malformed, or refused by the address policy."""


class TooLargeError(FetchError):
    """The body was larger than the caller's cap."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


def is_public(address: IpAddress) -> bool:
    """True for addresses on the public internet: not private, loopback, link-local, multicast,
    reserved, shared (CGNAT) or unspecified; an IPv4-mapped IPv6 address is judged as its IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    max_bytes: int,
    timeout_s: float,
    address_ok: Callable[[IpAddress], bool] | None = None,
) -> Response:
    """One HTTP exchange within `timeout_s`; a body over `max_bytes` raises TooLargeError."""
    try:
        return await asyncio.wait_for(_exchange(method, url, body, headers or {}, max_bytes, address_ok), timeout_s)
    except TimeoutError as exc:
        raise FetchError(f"no complete answer within {timeout_s:g} s") from exc


async def _exchange(
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    max_bytes: int,
    address_ok: Callable[[IpAddress], bool] | None,
) -> Response:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not _HOST.match(parts.hostname):
        raise FetchError("the URL must be http:// or https:// with a host name")
    if _UNSAFE.search(url):
        raise FetchError("the URL holds spaces or control characters")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise FetchError("the URL's port is not a number from 0 to 65535") from exc
    host = parts.hostname
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise FetchError(f"cannot resolve {host}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise FetchError(f"cannot resolve {host}")
    if address_ok is not None and not all(address_ok(a) for a in addresses):
        raise FetchError(f"{host} resolves to a private, loopback or link-local address, which is not fetched")
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await _connect(host, addresses, port, context)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = f"[{host}]" if ":" in host else host
        if parts.port:
            host_header += f":{parts.port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}", "Connection: close"]
        lines += ["User-Agent: llmc", "Accept-Encoding: identity"]
        for name, value in headers.items():
            if _UNSAFE.search(name) or "\r" in value or "\n" in value:
                raise FetchError(f"header {name!r} holds control characters")
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        status, response_headers = await _read_head(reader)
        return Response(status, response_headers, await _read_body(reader, response_headers, max_bytes))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, UnicodeError) as exc:
        raise FetchError(f"the connection to {host} failed mid-answer ({type(exc).__name__})") from exc
    finally:
        writer.close()


async def _connect(
    host: str, addresses: list[IpAddress], port: int, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the first of the checked `addresses` that answers (localhost may be ::1 and
    127.0.0.1, with the server on one of them)."""
    failure: OSError | None = None
    for address in addresses:
        try:
            return await asyncio.open_connection(
                str(address), port, ssl=context, server_hostname=host if context else None, limit=MAX_LINE_BYTES
            )
        except OSError as exc:
            failure = exc
    reason = (failure.strerror if failure else None) or type(failure).__name__
    raise FetchError(f"cannot connect to {host}:{port} ({reason})")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = (await reader.readline()).decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise FetchError("the answer is not HTTP/1.x")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            return int(fields[1]), headers
        name, sep, value = line.partition(":")
        if not sep:
            raise FetchError("the answer has a malformed header line")
        headers[name.strip().lower()] = value.strip()
    raise FetchError(f"the answer has more than {MAX_HEADER_LINES} header lines")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], max_bytes: int) -> bytes:
    too_large = TooLargeError(f"the answer is larger than {max_bytes} bytes")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        size = 0
        while True:
            size_line = (await reader.readline()).split(b";")[0].strip()
            if not size_line or len(size_line) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", size_line):
                raise FetchError("the answer's chunked body is malformed")
            length = int(size_line, 16)
            if length == 0:
                return b"".join(chunks)
            size += length
            if size > max_bytes:
                raise too_large
            chunks.append(await reader.readexactly(length))
            await reader.readexactly(2)  # the CRLF after each chunk
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise FetchError("the answer's Content-Length is not a number")
        if int(declared) > max_bytes:
            raise too_large
        return await reader.readexactly(int(declared))
    data = await reader.read(max_bytes + 1)  # no length given: up to the end of the connection
    while len(data) <= max_bytes:
        more = await reader.read(max_bytes + 1 - len(data))
        if not more:
            return data
        data += more
    raise too_large
