"""Acceptance: the real openai SDK against `llmc run` on the SmolLM2 artifact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.server import running_server

MODEL = "smollm2"  # the name the smollm2_artifact fixture builds with


@pytest.fixture(scope="module")
def client(smollm2_artifact: Path) -> Iterator[OpenAI]:
    with running_server(smollm2_artifact) as base:
        yield OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_chat_streamed_equals_non_streamed(client: OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    text = full.choices[0].message.content
    assert text and "Paris" in text
    assert full.choices[0].finish_reason in {"stop", "length"}
    assert full.usage is not None and full.usage.completion_tokens <= 24
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_streamed_equals_non_streamed(client: OpenAI) -> None:
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    text = full.choices[0].text
    assert text
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text


def test_eos_ends_chat_with_stop(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=200,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens < 200
    assert "<|im_end|>" not in (reply.choices[0].message.content or "")


def test_stop_string_is_honoured_and_not_emitted(client: OpenAI) -> None:
    prompt = "Count: one, two, three, four, five,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    assert " seven" in free, free
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[" seven"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[: free.index(" seven")]
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[" seven"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seed_reproduces_sampled_text(client: OpenAI) -> None:
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=1234, **args).choices[0].text  # type: ignore[call-overload]
    b = client.completions.create(seed=1234, **args).choices[0].text  # type: ignore[call-overload]
    assert a == b


def test_max_tokens_gives_length(client: OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Tell me a story:", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_health_answers_during_generation(client: OpenAI) -> None:
    base = str(client.base_url).removesuffix("/v1/")
    stream = client.completions.create(
        model=MODEL, prompt="Write a long essay:", max_tokens=64, temperature=0, stream=True
    )
    next(iter(stream))
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    stream.close()


ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers and return their sum",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def test_tool_call_round_trip(client: OpenAI) -> None:
    import json

    messages: list[dict[str, object]] = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]
    forced = {"type": "function", "function": {"name": "add"}}
    args = dict(model=MODEL, tools=[ADD_TOOL], tool_choice=forced, temperature=0, max_tokens=64)
    first = client.chat.completions.create(messages=messages, **args)  # type: ignore[call-overload]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "add" and set(arguments) >= {"a", "b"}

    stream = client.chat.completions.create(messages=messages, stream=True, **args)  # type: ignore[call-overload]
    names: dict[int, str] = {}
    parts: dict[int, list[str]] = {}
    reasons = []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tool_delta in delta.tool_calls or []:
            if tool_delta.function and tool_delta.function.name:
                names[tool_delta.index] = tool_delta.function.name
            if tool_delta.function and tool_delta.function.arguments:
                parts.setdefault(tool_delta.index, []).append(tool_delta.function.arguments)
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons == ["tool_calls"]
    assert [(names[i], "".join(parts[i])) for i in sorted(names)] == [(call.function.name, call.function.arguments)]

    # Logprobs of the tokens the tool-call parser held back still stream, as many as the
    # non-streamed answer has (they were dropped: 1 of 27 in the report that found it).
    with_logprobs = {**args, "logprobs": True}
    whole = client.chat.completions.create(messages=messages, **with_logprobs)  # type: ignore[call-overload]
    expected = [e.logprob for e in whole.choices[0].logprobs.content]
    assert len(expected) == whole.usage.completion_tokens
    stream = client.chat.completions.create(messages=messages, stream=True, **with_logprobs)  # type: ignore[call-overload]
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx(expected, abs=1e-4)

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": str(arguments["a"] + arguments["b"])})
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ADD_TOOL], temperature=0, max_tokens=40
    )  # type: ignore[arg-type]
    assert final.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert final.choices[0].message.content or final.choices[0].message.tool_calls


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("max_tokens", [2, 9])  # cut inside the <tool_call> marker, and inside the JSON
def test_forced_tool_call_cut_by_max_tokens_never_leaks_markup(client: OpenAI, choice: object, max_tokens: int) -> None:
    """finish_reason "length", no content and no (unparseable) call, streamed or not."""
    messages = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]
    args = dict(model=MODEL, messages=messages, tools=[ADD_TOOL], tool_choice=choice, max_tokens=max_tokens)
    full = client.chat.completions.create(temperature=0, **args)  # type: ignore[call-overload]
    (only,) = full.choices
    assert only.finish_reason == "length"
    assert only.message.content is None and not only.message.tool_calls
    assert full.usage is not None and full.usage.completion_tokens == max_tokens

    stream = client.chat.completions.create(temperature=0, stream=True, **args)  # type: ignore[call-overload]
    content, calls, reasons = [], [], []
    for chunk in stream:
        for streamed in chunk.choices:
            content.append(streamed.delta.content or "")
            calls.extend(streamed.delta.tool_calls or [])
            if streamed.finish_reason:
                reasons.append(streamed.finish_reason)
    assert "".join(content) == "" and calls == [] and reasons == ["length"]


def test_strict_tool_that_allows_extra_keys_is_refused(client: OpenAI) -> None:
    import openai

    open_args = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}
    tool = {"type": "function", "function": {"name": "add", "parameters": open_args, "strict": True}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool], max_tokens=2
        )  # type: ignore[call-overload]
    assert "additional properties" in str(caught.value)


def test_completion_echo_and_logprobs(client: OpenAI) -> None:
    prompt = "The three primary colors are"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=2)
    choice = echoed.choices[0]
    assert choice.text == prompt + plain
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    prompt_len = echoed.usage.prompt_tokens if echoed.usage else 0
    assert len(choice.logprobs.tokens or []) == prompt_len + 8
    assert all(v is not None and v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert "".join(choice.logprobs.tokens or []) == choice.text
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=2, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    stream_lps = [v for c in chunks if c.choices[0].logprobs for v in (c.choices[0].logprobs.token_logprobs or [])]
    assert stream_lps[1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-4)


def test_chat_logprobs(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely


def test_parse_with_a_pydantic_model_ends_with_bounded_numbers(client: OpenAI) -> None:
    # Unbounded grammar numbers made SmolLM2 write digits until max_tokens at temperature 0, so
    # openai's parse() failed every time with LengthFinishReasonError.
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        area_km2: float

    reply = client.chat.completions.parse(
        model=MODEL,
        # Before numbers were bounded, this prompt ran to max_tokens on this artifact (and on the Q4_1 one).
        messages=[{"role": "user", "content": "Tell me about Tokyo."}],
        response_format=City,
        temperature=0,
        max_tokens=100,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    city = choice.message.parsed
    assert city is not None and abs(city.population) < 10**16 and abs(city.area_km2) < 1e16


def test_logprobs_of_a_character_split_over_tokens(client: OpenAI, smollm2_artifact: Path) -> None:
    """SmolLM2 spells 🌍 as three byte-level tokens. Each token's `bytes` are its own (they were
    U+FFFD's, from decoding it alone), and text offsets count the character once."""
    from llmc.artifacts.reader import Artifact
    from llmc.runtime.api.render import Renderer
    from llmc.runtime.sampling_params import TokenLogprob
    from llmc.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_artifact(Artifact.open(smollm2_artifact))
    ids = tokenizer.encode("🌍 hello")
    render = Renderer(tokenizer, MODEL)
    content = render.chat_logprobs([TokenLogprob(t, -1.0, []) for t in ids]).content
    assert b"".join(bytes(e.bytes) for e in content) == "🌍 hello".encode()
    assert len(ids) > 2 and render.text_offsets(ids, 0)[-1] == 1  # " hello" starts after one character

    echoed = client.completions.create(
        model=MODEL, prompt="🌍 hello", max_tokens=1, temperature=0, echo=True, logprobs=0
    )
    logprobs = echoed.choices[0].logprobs
    assert logprobs is not None and logprobs.text_offset is not None
    assert logprobs.text_offset[: len(ids)] == render.text_offsets(ids, 0)
    assert logprobs.text_offset[len(ids)] == len("🌍 hello")  # the completion starts where the prompt ends
