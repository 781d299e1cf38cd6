"""Issue 17 (items 3, 6): web pages cannot drive the API (Host, Content-Type, Origin, CORS), and
slow or half-open connections neither lock clients out nor hold the server forever."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from llmc.builder.build import BuildOptions, build
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.http_guard import HttpGuard
from tests.server import running_server

ALLOWED_ORIGIN = "https://app.example.com"
# Short server timeouts, so the slow-client probes finish in seconds.
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
# Half-open connections: more than Granian's old limit of 257, few enough for any fd limit.
HALF_OPEN = 300
# How long past its timeout the server may take to close a slow connection (a loaded CI machine).
CLOSE_MARGIN_S = 10.0
COMPLETION = {"model": "tiny", "prompt": "The fox", "max_tokens": 2}


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("guard") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, name="tiny"))
    flags = ["--cors-origins", ALLOWED_ORIGIN, "--header-timeout", str(HEADER_TIMEOUT_S)]
    with running_server(out, *flags, "--body-timeout", str(BODY_TIMEOUT_S)) as url:
        yield url


def _scope(method: str = "POST", **headers: str) -> dict[str, object]:
    return {"method": method, "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_guard_rules() -> None:
    guard = HttpGuard("127.0.0.1", allowed_hosts=[".example.org", "api.test"], cors_origins=[ALLOWED_ORIGIN])
    allowed = ["localhost:2000", "127.0.0.1", "[::1]:2000", "10.1.2.3:80", "api.test:9", "a.example.org", "example.org"]
    for host in allowed:
        assert guard.host_allowed(host), host
    for host in ["evil.com", "localhost.evil.com", "notexample.org", "api.test.evil"]:
        assert not guard.host_allowed(host), host
    assert HttpGuard("0.0.0.0", allowed_hosts=["*"]).host_allowed("anything.example")
    same = _scope(host="localhost:2000", origin="http://localhost:2000", content_type="application/json")
    assert guard.check(same, json_route=True) == []
    behind_tls = _scope(host="api.test", origin="https://api.test", content_type="application/json; charset=utf-8")
    assert guard.check(behind_tls, json_route=True) == []
    for origin in ["null", "http://localhost:2001", "https://app.example.com.evil"]:
        with pytest.raises(HttpError) as refused:
            guard.check(_scope(host="localhost:2000", origin=origin, content_type="application/json"), True)
        assert refused.value.status == 403, origin
    with pytest.raises(HttpError) as no_type:
        guard.check(_scope(host="localhost:2000"), json_route=True)
    assert no_type.value.status == 415
    assert guard.check(_scope("GET", host="localhost:2000"), json_route=False) == []  # curl, SDKs


def test_cross_origin_text_plain_post_is_refused(base_url: str) -> None:
    # What a web page's fetch(..., {mode: "no-cors", body: "..."}) sends: no preflight happens.
    headers = {"content-type": "text/plain", "origin": "https://evil.example"}
    response = httpx.post(f"{base_url}/v1/completions", content=b'{"prompt": "x"}', headers=headers, timeout=60)
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert httpx.post(f"{base_url}/tokenize", content=b'{"prompt": "x"}', headers=form, timeout=60).status_code == 415


def test_foreign_origin_is_refused_and_listed_origin_gets_cors(base_url: str) -> None:
    evil = httpx.post(f"{base_url}/v1/completions", json=COMPLETION, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    assert "access-control-allow-origin" not in evil.headers
    ok = httpx.post(f"{base_url}/v1/completions", json=COMPLETION, headers={"origin": ALLOWED_ORIGIN}, timeout=60)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = {"origin": ALLOWED_ORIGIN, "access-control-request-method": "POST"}
    answered = httpx.options(f"{base_url}/v1/completions", headers=preflight, timeout=60)
    assert answered.status_code == 204
    assert answered.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in answered.headers["access-control-allow-methods"]
    assert "authorization" in answered.headers["access-control-allow-headers"]
    refused = httpx.options(f"{base_url}/v1/completions", headers={**preflight, "origin": "https://evil.example"})
    assert refused.status_code == 403
    same_origin = httpx.post(f"{base_url}/v1/completions", json=COMPLETION, headers={"origin": base_url}, timeout=60)
    assert same_origin.status_code == 200  # the chat page at /ui calls its own server


def test_foreign_host_is_refused(base_url: str) -> None:
    # DNS rebinding: the attacker's name resolves to 127.0.0.1, the Host header keeps the name.
    response = httpx.get(f"{base_url}/v1/models", headers={"host": "attacker.example:2000"})
    assert response.status_code == 421
    assert "--allowed-hosts" in response.json()["error"]["message"]
    port = urlparse(base_url).port
    assert httpx.get(f"http://localhost:{port}/v1/models").status_code == 200


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Read until the server closes the connection (True) or the deadline passes (False)."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:  # reset: closed as well
            return True
    return False


def test_half_open_connections_do_not_lock_clients_out(base_url: str) -> None:
    port = urlparse(base_url).port
    assert port is not None
    socks = []
    try:
        for _ in range(HALF_OPEN):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /v1/comp")  # half a request line, then silence
            socks.append(sock)
        started = time.monotonic()
        response = httpx.post(f"{base_url}/v1/completions", json=COMPLETION, timeout=HEADER_TIMEOUT_S * 5)
        assert response.status_code == 200
        assert time.monotonic() - started < HEADER_TIMEOUT_S  # served meanwhile, not after the timeout
        deadline = started + HEADER_TIMEOUT_S + CLOSE_MARGIN_S
        still_open = [s for s in socks if not _closed_by_server(s, deadline)]
        assert not still_open, f"{len(still_open)} of {HALF_OPEN} half-open connections still open"
    finally:
        for sock in socks:
            sock.close()


def test_trickled_body_gets_408(base_url: str) -> None:
    port = urlparse(base_url).port
    assert port is not None
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        "content-length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode())
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < BODY_TIMEOUT_S + CLOSE_MARGIN_S and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b" ")  # one byte at a time, never the whole body
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < BODY_TIMEOUT_S + CLOSE_MARGIN_S
