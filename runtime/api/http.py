"""ASGI plumbing: read and decode a request body, send JSON, errors and Server-Sent Events.

Nothing here knows a route or the engine's workings; every handler reads and answers through it,
so a malformed body or a vanished client is handled the same way on every route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from llmc.errors import BadInputError, InternalError, LlmcError
from llmc.logs import get_logger
from llmc.runtime.api.errors import HttpError, error_response
from llmc.runtime.api.requests import validation_param
from llmc.runtime.engine import EngineBusyError

log = get_logger("llmc.api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# A request body above this is refused with 413: even a full 128k-token chat is a few MB of JSON.
MAX_BODY_BYTES = 8 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class ClientGoneError(Exception):
    """The client disconnected; the request is aborted and its resources freed."""


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone (run it beside work that should stop then)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def read_body(scope: Scope, receive: Receive) -> bytes:
    """The whole request body, at most MAX_BODY_BYTES (413); `receive` carries the guard's deadline."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
            raise HttpError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError()
        body = message.get("body", b"")
        size += len(body)
        if size > MAX_BODY_BYTES:
            raise HttpError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """Decode a JSON body into its request type; every way it can be wrong is a BadInputError."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"request body is not valid UTF-8 (byte {exc.start})") from exc
    if not body.strip():
        raise BadInputError("request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadInputError(f"invalid request: {exc}", param=validation_param(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise BadInputError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # msgspec decodes free-form JSON (`Any` fields) recursively
        raise BadInputError("request body nests JSON too deeply; flatten it") from exc


async def send_json(send: Send, status: int, body: bytes) -> None:
    """A whole JSON response (`body` already encoded)."""
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: LlmcError) -> None:
    """An OpenAI-style error response (with Retry-After when the engine is busy)."""
    status, body = error_response(error)
    headers = _JSON
    if isinstance(error, EngineBusyError):
        headers = [*_JSON, (b"retry-after", str(error.retry_after_s).encode())]
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # response already started or client gone: nothing more can be said
        return


# Characters that JSON leaves as they are but that many clients take for line breaks: Python's
# str.splitlines() and httpx's aiter_lines() split on them (SSE itself splits on CR and LF only), so a
# generated token holding one cut its event in two. Their UTF-8 bytes occur only inside a JSON
# string (UTF-8 never reuses a character's bytes inside another's), where the escape means the same.
_LINE_BREAKS_JSON_KEEPS = {
    "\u0085".encode(): b"\\u0085",
    "\u2028".encode(): b"\\u2028",
    "\u2029".encode(): b"\\u2029",
}


def sse_data(event: bytes) -> bytes:
    """One JSON event as an SSE `data:` line that every line splitter reads as one line."""
    for raw, escaped in _LINE_BREAKS_JSON_KEEPS.items():
        if raw in event:
            event = event.replace(raw, escaped)
    return b"data: " + event + b"\n\n"


async def stream(send: Send, request_id: str, events: AsyncIterator[bytes]) -> None:
    """Send `events` as Server-Sent Events, then `[DONE]`; an error mid-stream becomes a last event."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    try:
        async for event in events:
            await send({"type": "http.response.body", "body": sse_data(event), "more_body": True})
    except LlmcError as exc:
        # Headers are gone: report the error as a final event, as OpenAI does.
        _, body = error_response(exc)
        await send({"type": "http.response.body", "body": sse_data(body), "more_body": True})
    except ClientGoneError:
        return
    except Exception:
        log.exception("api.stream_failed", request_id=request_id)
        # A bug of llmc's, not the client's: still a last event, so the client does not take the
        # stream for a complete answer (no finish_reason would ever come).
        _, body = error_response(InternalError("internal server error; see the server log"))
        try:
            await send({"type": "http.response.body", "body": sse_data(body), "more_body": True})
        except Exception:  # the client left meanwhile; nothing to do
            return
    try:
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    except Exception:  # the client left after the last event; nothing to do
        return


async def lifespan(receive: Receive, send: Send) -> None:
    """ASGI lifespan: nothing to set up or tear down here (server.py owns the engine's life)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
