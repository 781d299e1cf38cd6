"""Acceptance: every bad input gets an OpenAI-style 4xx, and the next valid request succeeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmc.builder.build import BuildOptions, build
from tests.server import post_openai_error, running_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("api") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, name="tiny"))
    with running_server(out) as url:
        yield url


def _valid_chat(client: httpx.Client) -> None:
    response = client.post(
        CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1


def _chat(**extra: object) -> dict[str, object]:
    """A valid chat body with `extra` fields set (or overriding)."""
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}


BAD_REQUESTS = [
    # (path, raw body or JSON, expected status, expected param)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"\xff\xfe\x00garbage", 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"[]", 400, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    (CHAT, _chat(temperature="hot"), 400, "temperature"),
    (CHAT, _chat(temperature=9), 400, "temperature"),
    (CHAT, _chat(top_p=0), 400, "top_p"),
    (CHAT, _chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, _chat(max_tokens=10**6), 400, "max_tokens"),
    (CHAT, _chat(seed=2**70), 400, "seed"),
    (CHAT, _chat(stop=[""]), 400, "stop"),
    (CHAT, _chat(n=99), 400, "n"),
    (CHAT, _chat(top_logprobs=3), 400, "top_logprobs"),
    (CHAT, _chat(logit_bias={"x": 1}), 400, "logit_bias"),
    (CHAT, _chat(presence_penalty=5), 400, "presence_penalty"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (CHAT, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny"}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_request_gets_openai_error(base_url: str, path: str, body: object, status: int, param: str | None) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        assert post_openai_error(client, path, body, status)["param"] == param
        _valid_chat(client)


def test_oversized_body_gets_413(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        response = client.post(CHAT, content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error"
        _valid_chat(client)


def test_unknown_route_and_method(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        assert client.get("/v1/nothing").status_code == 404
        assert client.get(CHAT).status_code == 405
        _valid_chat(client)


def test_models_and_health(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert models["data"][0]["max_model_len"] == 256
