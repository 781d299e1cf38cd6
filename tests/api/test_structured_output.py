"""Issue 6: structured output and forced tool calls hold even for a random-weights model."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from llmc.builder.build import BuildOptions, build
from tests.conftest import make_tiny_llama
from tests.server import running_server

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Room for the tool-instruction system prompt that is injected for templates without tools.
    source = make_tiny_llama(tmp_path_factory.mktemp("structured") / "src", max_position_embeddings=1024)
    out = source.parent / "tiny"
    build(BuildOptions(model=str(source), gguf_file=None, weights=None, output=out, name="tiny"))
    with running_server(out) as url:
        yield url


def _schema(rng: random.Random) -> dict[str, Any]:
    """A random small schema whose instances are bounded in size (a random model never stops a free string)."""
    kinds = [
        {"type": "integer", "minimum": -1000, "maximum": 1000},
        {"type": "boolean"},
        {"type": "string", "maxLength": rng.randint(1, 12)},
        {"enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": rng.randint(1, 4)},
        {"type": "number", "minimum": 0, "maximum": 1},
    ]
    names = rng.sample(["alpha", "beta", "gamma", "delta", "eps"], k=rng.randint(1, 4))
    props = {name: rng.choice(kinds) for name in names}
    return {"type": "object", "properties": props, "required": names, "additionalProperties": False}


def test_200_json_schema_requests_all_validate(base_url: str) -> None:
    rng = random.Random(0)
    schemas = [_schema(rng) for _ in range(200)]

    async def one(client: httpx.AsyncClient, schema: dict[str, Any], index: int) -> tuple[dict[str, Any], str]:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Give me object {index}"}],
            "max_tokens": 200,
            "temperature": 1.0,
            "seed": index,
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}},
        }
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return schema, response.json()["choices"][0]["message"]["content"]

    async def run_all() -> list[tuple[dict[str, Any], str]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            results = []
            for start in range(0, len(schemas), 20):  # 20 in flight at a time: bounded load
                batch = [one(client, s, start + i) for i, s in enumerate(schemas[start : start + 20])]
                results += await asyncio.gather(*batch)
            return results

    for schema, content in asyncio.run(run_all()):
        jsonschema.validate(json.loads(content), schema)


def test_json_object_mode(base_url: str) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "json please"}],
        "max_tokens": 100,
        "response_format": {"type": "json_object"},
        # A seed under which the random model closes its object (with members) within max_tokens;
        # under some seeds it writes one string until the limit, which no grammar can end early.
        "seed": 6,
    }
    choice = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    assert isinstance(value, dict) and value


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_gives_a_valid_call(base_url: str, choice: object) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "add 2 and 3"}],
        "tools": [ADD_TOOL],
        "tool_choice": choice,
        "max_tokens": 120,
        "temperature": 0.7,
        "seed": 5,
    }
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()
    choice0 = reply["choices"][0]
    assert choice0["finish_reason"] == "tool_calls", reply
    (call,) = choice0["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD_TOOL["function"]["parameters"])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [ADD_TOOL]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (  # llguidance's options are the server's: a client's made `[1 ; 2]`, which is no JSON
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "x-guidance": {"item_separator": " ; "}}},
                }
            },
            "response_format",
        ),
    ],
)
def test_bad_tool_and_format_requests(base_url: str, extra: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{base_url}/v1/chat/completions", json=ok, timeout=60).status_code == 200
