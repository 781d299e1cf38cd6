"""Run `llmc run` in a subprocess on a free loopback port, for API tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

# How long a server may take to load the model and answer /health: SmolLM2 f32 needs a few seconds
# on 2 cores; the margin absorbs a loaded CI machine.
STARTUP_TIMEOUT_S = 120.0
# How long a server may take to exit after SIGTERM: it lets in-flight responses finish for up to
# 10 s (runtime/server.py), plus a margin.
SHUTDOWN_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    artifact: Path,
    *extra: str,
    launcher: list[str] | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`launcher`: the command before `run` (default: this interpreter's `python -m llmc`);
    `log`: a file that receives the server's output, else it is kept for the error message.
    After the block the server gets SIGTERM and must exit cleanly, with code 0."""
    port = free_port()
    command = [*(launcher or [sys.executable, "-m", "llmc"]), "run", str(artifact), "--p", str(port), *extra]
    sink = log.open("w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(proc, base):
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            output = log.read_text() if log is not None else output
            raise RuntimeError(f"llmc run exited with {proc.returncode}:\n{output}")
        yield base
        stopped_cleanly = _terminate(proc) == 0
        assert stopped_cleanly, f"llmc run exited with {proc.returncode} after SIGTERM"
    finally:
        if proc.returncode is None:
            _terminate(proc)
        if log is not None:
            sink.close()  # type: ignore[union-attr]


def wait_healthy(proc: subprocess.Popen[Any], base: str, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
    """Poll `base`/health until it answers 200 (True) or the process exits (False); raise past
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not become healthy in {timeout_s} s")
        time.sleep(0.2)
    return False


def _terminate(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def post_openai_error(client: httpx.Client, path: str, body: object, status: int) -> dict[str, Any]:
    """POST `body` (raw bytes sent as JSON, or an object), expect `status` with an OpenAI-shaped
    error, and return that error."""
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error
