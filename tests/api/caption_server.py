"""A stub OpenAI-compatible caption endpoint for the proxy-vision tests, in a thread on 127.0.0.1.

It answers each chat completion with a caption made from the image it was sent (test images are a
PNG signature followed by a label: `png(b"red")` is captioned "a red square"), records every
request, and can be switched to misbehave: answer 500, invalid JSON, the wrong shape, hang up, or
answer too slowly.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAPTION_USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def png(label: bytes) -> bytes:
    """A 'PNG' the server accepts (it sniffs the signature) whose caption is known: a <label> square."""
    return PNG_SIGNATURE + label


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def caption_of(label: str) -> str:
    return f"a {label} square"


@dataclass
class CaptionStub:
    mode: str = "ok"  # ok, 500, garbage, shape, hangup, slow
    slow_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)  # the decoded JSON bodies
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def images(self) -> list[bytes]:
        """The images of every request received, in order."""
        out = []
        with self.lock:
            for body in self.received:
                for part in body["messages"][0]["content"]:
                    if part["type"] == "image_url":
                        out.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
        return out


def _handler(stub: CaptionStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def do_GET(self) -> None:  # a remote image fetch: recorded, so a test can see none was made
            with stub.lock:
                stub.paths.append(self.path)
            self._send(200, png(b"remote"), "image/png")

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length))
            with stub.lock:
                stub.received.append(body)
                stub.paths.append(self.path)
            mode = stub.mode
            if mode == "hangup":
                self.close_connection = True
                self.connection.close()
                return
            if mode == "slow":
                time.sleep(stub.slow_s)
            if mode == "500":
                self._send(500, b'{"error": {"message": "boom"}}', "application/json")
                return
            if mode == "garbage":
                self._send(200, b"<html>not json", "application/json")
                return
            if mode == "shape":
                self._send(200, b'{"choices": [{"text": "a completion, not a chat"}]}', "application/json")
                return
            image = next(p for p in body["messages"][0]["content"] if p["type"] == "image_url")
            data = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
            caption = caption_of(data[len(PNG_SIGNATURE) :].decode())
            reply = {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": caption}, "finish_reason": "stop"}
                ],
                "usage": CAPTION_USAGE,
            }
            self._send(200, json.dumps(reply).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def caption_server() -> Iterator[CaptionStub]:
    stub = CaptionStub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    server.daemon_threads = True
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
