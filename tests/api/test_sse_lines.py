"""Server-Sent Events that every line splitter reads back as one event per line
(runtime/api/http.py `sse_data`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from llmc.runtime.api.http import stream

# A token's text may hold characters that JSON keeps raw but str.splitlines() (and httpx's
# aiter_lines(), which the tests and many clients use) breaks lines on.
TEXTS = ["a\u0085b", "\u2028", "x\u2029y", "plain", "é\u2028\u0085ü", "\x0b\x1c"]


def test_every_event_is_one_line_whatever_its_text_holds() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def events() -> AsyncIterator[bytes]:
        for text in TEXTS:
            yield msgspec.json.encode({"choices": [{"text": text}]})

    asyncio.run(stream(send, "r1", events()))
    body = b"".join(m.get("body", b"") for m in sent).decode()
    lines = [line for line in body.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines[:-1]] == TEXTS


def test_a_bug_mid_stream_ends_it_with_an_error_event_not_a_silent_done() -> None:
    # Before, a non-LlmcError left the client a stream without finish_reason or error, followed
    # by [DONE]: indistinguishable from a complete answer.
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def events() -> AsyncIterator[bytes]:
        yield msgspec.json.encode({"choices": [{"text": "partial"}]})
        raise RuntimeError("a bug")

    asyncio.run(stream(send, "r2", events()))
    lines = [line for line in b"".join(m.get("body", b"") for m in sent).decode().splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "server log" in error["message"]
    assert "a bug" not in lines[-2]  # the server log has the details, not the client
