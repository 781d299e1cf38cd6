"""Issue 17 (items 5, 8): big inputs never stall the server, a full queue says 503 + Retry-After,
a request past --request-timeout stops, and the prefix cache is shared only under one salt."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmc.builder.build import BuildOptions, build
from llmc.runtime.api.requests import CHARS_PER_CONTEXT_TOKEN, MAX_STOP_TOKEN_IDS
from tests.conftest import make_tiny_llama
from tests.server import running_server

CONTEXT = 4096  # long enough that a request can generate for seconds on the tiny model
HEALTH_LIMIT_S = 1.0  # the bar: /health answers within a second while big requests run
SYSTEM = "You are a helpful assistant. The vault PIN is 4831. " * 8  # several 16-token blocks


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    model = make_tiny_llama(root / "model", max_position_embeddings=CONTEXT)
    out = root / "tiny"
    build(BuildOptions(model=str(model), gguf_file=None, weights=None, output=out, name="tiny", compile=None))
    return out


@pytest.fixture(scope="module")
def client(artifact: Path) -> Iterator[httpx.Client]:
    with running_server(artifact) as base, httpx.Client(base_url=base, timeout=120) as http:
        yield http


class _HealthPoller:
    """Polls /health on its own connection while the test sends big requests; records latencies."""

    def __init__(self, base_url: str) -> None:
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)

    def _run(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert http.get("/health").status_code == 200
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.05)

    def __enter__(self) -> _HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def test_big_requests_leave_health_responsive(client: httpx.Client) -> None:
    cap = CHARS_PER_CONTEXT_TOKEN * CONTEXT
    huge = "The quick brown fox jumps over the lazy dog. " * 160_000  # 7.2 MB: over the cap
    at_cap = ("The quick brown fox jumps over the lazy dog. " * (cap // 45 + 1))[:cap]
    many = [{"role": "user", "content": "x"} for _ in range(150_000)]  # over the message cap
    allowed = [{"role": "user", "content": "fox"} for _ in range(CONTEXT)]  # rendered and tokenized
    with _HealthPoller(str(client.base_url)) as poller:
        responses = [
            client.post("/tokenize", json={"prompt": huge}),
            client.post("/v1/chat/completions", json={"model": "tiny", "messages": many, "max_tokens": 1}),
            client.post("/tokenize", json={"prompt": at_cap}),
            client.post("/tokenize", json={"messages": allowed}),
        ]
        time.sleep(0.2)  # a few polls after the requests, too
    assert [r.status_code for r in responses] == [413, 413, 200, 200], [r.text[:200] for r in responses]
    assert responses[0].json()["error"]["param"] == "prompt" and str(cap) in responses[0].json()["error"]["message"]
    assert responses[1].json()["error"]["param"] == "messages"
    assert responses[3].json()["count"] > CONTEXT  # every message rendered
    assert len(poller.latencies) >= 3
    assert max(poller.latencies) < HEALTH_LIMIT_S, poller.latencies


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "limit"),
    [
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}] * (CONTEXT + 1)},
            413,
            "messages",
            CONTEXT,
        ),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}] * (CONTEXT + 1)}, 413, "messages", CONTEXT),
        ("/detokenize", {"tokens": [5] * (CONTEXT + 1)}, 413, "tokens", CONTEXT),
        (
            "/v1/chat/completions",
            _chat(stop_token_ids=[5] * (MAX_STOP_TOKEN_IDS + 1)),
            400,
            "stop_token_ids",
            MAX_STOP_TOKEN_IDS,
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "stop_token_ids": [5] * (MAX_STOP_TOKEN_IDS + 1)},
            400,
            "stop_token_ids",
            MAX_STOP_TOKEN_IDS,
        ),
        ("/v1/chat/completions", _chat(cache_salt=""), 400, "cache_salt", None),
    ],
)
def test_over_cap_requests_name_the_limit(
    client: httpx.Client, path: str, body: object, status: int, param: str, limit: int | None
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if limit is not None:
        assert str(limit) in error["message"]
    assert client.post("/v1/chat/completions", json=_chat()).status_code == 200


def test_character_cap_follows_the_context(artifact: Path, client: httpx.Client) -> None:
    cap = CHARS_PER_CONTEXT_TOKEN * CONTEXT
    over = "a" * (cap + 1)
    for path, body, param in [
        ("/tokenize", {"prompt": over}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": over}, "prompt"),
        ("/v1/chat/completions", _chat(over), "messages"),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["param"] == param
        assert str(cap) in response.json()["error"]["message"]
    # --max-request-chars moves the cap.
    with running_server(artifact, "--max-request-chars", "100") as base, httpx.Client(base_url=base) as http:
        assert http.post("/tokenize", json={"prompt": "a" * 100}).status_code == 200
        assert http.post("/tokenize", json={"prompt": "a" * 101}).status_code == 413


def _usage(client: httpx.Client, headers: dict[str, str] | None = None, **extra: object) -> dict[str, int]:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "PIN?"}],
        "max_tokens": 1,
        **extra,
    }
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["usage"]  # type: ignore[no-any-return]


def test_cache_salt_separates_prefix_caches(client: httpx.Client) -> None:
    _usage(client, cache_salt="tenant-a")
    assert _usage(client, cache_salt="tenant-b")["prompt_tokens_details"]["cached_tokens"] == 0
    assert _usage(client)["prompt_tokens_details"]["cached_tokens"] == 0
    again = _usage(client, cache_salt="tenant-a")
    assert again["prompt_tokens_details"]["cached_tokens"] >= 16


def test_full_queue_is_503_with_retry_after_and_keys_isolate_the_cache(artifact: Path) -> None:
    flags = ["--max-num-seqs", "1", "--max-waiting", "1", "--api-key", "k1,k2", "--prefix-cache-isolation", "key"]
    with running_server(artifact, *flags) as base, httpx.Client(base_url=base, timeout=120) as http:
        auth = {"authorization": "Bearer k1"}
        results: dict[str, httpx.Response] = {}

        def send(name: str, max_tokens: int) -> None:
            body = {"model": "tiny", "prompt": "The fox", "max_tokens": max_tokens, "ignore_eos": True}
            with httpx.Client(base_url=base, timeout=120) as own:
                results[name] = own.post("/v1/completions", json=body, headers=auth)

        def gauge(name: str) -> float:
            for line in http.get("/metrics", headers=auth).text.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
            return 0.0

        def wait_for(name: str, value: float) -> None:
            deadline = time.monotonic() + 60
            while gauge(name) != value:
                assert time.monotonic() < deadline, f"{name} never reached {value}"
                time.sleep(0.01)

        running = threading.Thread(target=send, args=("running", 600))
        running.start()
        wait_for("llmc_num_requests_running", 1)
        queued = threading.Thread(target=send, args=("queued", 4))
        queued.start()
        wait_for("llmc_num_requests_waiting", 1)
        refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1}, headers=auth)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "--max-waiting" in refused.json()["error"]["message"]
        running.join()
        queued.join()
        assert results["running"].status_code == 200 and results["queued"].status_code == 200
        assert results["running"].json()["usage"]["completion_tokens"] == 600

        # Prefix-cache isolation by key: k2 never sees k1's cached prompt, k1 does.
        _usage(http, auth)
        assert _usage(http, {"authorization": "Bearer k2"})["prompt_tokens_details"]["cached_tokens"] == 0
        assert _usage(http, auth)["prompt_tokens_details"]["cached_tokens"] >= 16


def test_request_timeout_stops_the_request(artifact: Path) -> None:
    with running_server(artifact, "--request-timeout", "1") as base, httpx.Client(base_url=base, timeout=60) as http:
        body = {"model": "tiny", "prompt": "The fox", "max_tokens": 4000, "ignore_eos": True}
        started = time.monotonic()
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 504, response.text
        assert "--request-timeout" in response.json()["error"]["message"]
        assert time.monotonic() - started < 10
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"
        assert http.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
