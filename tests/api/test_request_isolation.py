"""Acceptance: one request can never hurt another (issue #17, items 1, 9, 11).

One server (started with an API key, and `--log-level warning` after the subcommand) serves two
greedy victim streams in a loop while every bad input of the API reference is sent: each bad input
gets an OpenAI-style 4xx, every victim run's text equals the run without the attack, /health
answers within a second throughout, and nothing is logged at INFO or as a traceback.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmc.builder.build import BuildOptions, build
from tests.server import post_openai_error, running_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
KEY = "sk-isolation-test"
# Attackers send the scheme in lower case: RFC 9110 makes it case-insensitive (issue #17 item 11).
ATTACKER_AUTH = {"authorization": f"bearer {KEY}"}
VICTIM_AUTH = {"authorization": f"Bearer {KEY}"}
# What /health may take while the server is under attack (the bar).
HEALTH_BUDGET_S = 1.0
HEALTH_POLL_S = 0.05  # often enough to catch a stall of a fraction of the budget
CLIENT_TIMEOUT_S = 60.0  # generous: 2 loaded CI cores; a hang still fails the test, just later
VICTIM = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "The quick brown fox"}],
    "temperature": 0,
    "max_tokens": 120,  # long enough that the victims are mid-stream while attacks land
    "ignore_eos": True,
    "stream": True,
}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def _nested(depth: int) -> bytes:
    return (
        b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"tools":[{"x":'
        + b"[" * depth
        + b"]" * depth
        + b"}]}"
    )


def _called(arguments: str) -> list[dict[str, Any]]:
    """A conversation whose assistant turn called tool f with `arguments` (JSON text)."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]


def _tool(name: str = "f", parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def _deep_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD_INPUTS: list[tuple[str, str, bytes | dict[str, Any], int, str | None]] = [
    # (id, path, raw body or JSON, expected status, expected param)
    ("temperature-negative", CHAT, _chat(temperature=-0.1), 400, "temperature"),
    ("temperature-above-2", CHAT, _chat(temperature=2.01), 400, "temperature"),
    ("temperature-overflow", CHAT, b'{"model":"tiny","messages":[],"temperature":1e400}', 400, "temperature"),
    ("temperature-string", CHAT, _chat(temperature="hot"), 400, "temperature"),
    ("repetition-penalty-1e-300", CHAT, _chat(repetition_penalty=1e-300), 400, "repetition_penalty"),
    ("repetition-penalty-zero", CHAT, _chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("repetition-penalty-negative", CHAT, _chat(repetition_penalty=-1), 400, "repetition_penalty"),
    ("repetition-penalty-1e300", CHAT, _chat(repetition_penalty=1e300), 400, "repetition_penalty"),
    ("presence-penalty-huge", CHAT, _chat(presence_penalty=1e308), 400, "presence_penalty"),
    ("frequency-penalty-low", CHAT, _chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("top-p-zero", CHAT, _chat(top_p=0), 400, "top_p"),
    ("top-p-above-1", CHAT, _chat(top_p=1.5), 400, "top_p"),
    ("top-k-negative", CHAT, _chat(top_k=-5), 400, "top_k"),
    ("min-p-above-1", CHAT, _chat(min_p=2), 400, "min_p"),
    ("n-zero", CHAT, _chat(n=0), 400, "n"),
    ("n-huge", CHAT, _chat(n=10**6), 400, "n"),
    ("max-tokens-negative", CHAT, _chat(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-huge", CHAT, _chat(max_tokens=10**15), 400, "max_tokens"),
    ("max-tokens-string", CHAT, _chat(max_tokens="many"), 400, "max_tokens"),
    ("seed-out-of-range", CHAT, _chat(seed=2**70), 400, "seed"),
    ("logit-bias-above-100", CHAT, _chat(logit_bias={"5": 101}), 400, "logit_bias"),
    ("logit-bias-minus-1e300", CHAT, _chat(logit_bias={"5": -1e300}), 400, "logit_bias"),
    ("logit-bias-unknown-token", CHAT, _chat(logit_bias={"99999": 1}), 400, "logit_bias"),
    ("logit-bias-superscript-key", CHAT, _chat(logit_bias={"\u00b2": 1}), 400, "logit_bias"),
    ("logit-bias-5000-digit-key", CHAT, _chat(logit_bias={"9" * 5000: 1}), 400, "logit_bias"),
    (
        "logit-bias-2000-entries",
        CHAT,
        _chat(logit_bias={str(i % 300): 1 for i in range(300)} | {f"0{i}": 1 for i in range(1700)}),
        400,
        "logit_bias",
    ),
    ("stop-10000-strings", CHAT, _chat(stop=["x"] * 10000), 400, "stop"),
    ("stop-long-string", CHAT, _chat(stop=["y" * 10000]), 400, "stop"),
    ("stop-empty-string", CHAT, _chat(stop=[""]), 400, "stop"),
    ("stop-token-ids-5000", CHAT, _chat(stop_token_ids=[1] * 5000), 400, "stop_token_ids"),
    ("stop-token-ids-negative", CHAT, _chat(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("top-logprobs-without-logprobs", CHAT, _chat(top_logprobs=3), 400, "top_logprobs"),
    ("top-logprobs-50", CHAT, _chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("chat-logprobs-integer", CHAT, _chat(logprobs=5), 400, "logprobs"),
    (
        "tool-choice-function-string",
        CHAT,
        _chat(tools=[_tool()], tool_choice={"type": "function", "function": "f"}),
        400,
        "tool_choice",
    ),
    ("tool-choice-no-function", CHAT, _chat(tools=[_tool()], tool_choice={"type": "function"}), 400, "tool_choice"),
    (
        "tool-choice-unknown-name",
        CHAT,
        _chat(tools=[_tool()], tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "tool_choice",
    ),
    ("tool-choice-number", CHAT, _chat(tool_choice=5), 400, "tool_choice"),
    ("tool-bad-name", CHAT, _chat(tools=[_tool("bad name!")]), 400, "tools"),
    ("tool-not-function", CHAT, _chat(tools=[{"type": "retrieval"}]), 400, "tools"),
    ("tool-parameters-string", CHAT, _chat(tools=[_tool(parameters="object")]), 400, "tools"),
    ("tools-200", CHAT, _chat(tools=[_tool(f"f{i}") for i in range(200)]), 400, "tools"),
    ("tool-schema-100-deep", CHAT, _chat(tools=[_tool(parameters=_deep_schema(100))]), 400, "tools"),
    ("tools-not-list", CHAT, _chat(tools="f"), 400, "tools"),
    ("response-format-bad-type", CHAT, _chat(response_format={"type": "xml"}), 400, "response_format"),
    (
        "response-format-schema-string",
        CHAT,
        _chat(response_format={"type": "json_schema", "json_schema": {"schema": "x"}}),
        400,
        "response_format",
    ),
    ("json-nested-5000", CHAT, _nested(5000), 400, None),
    ("json-nested-500", CHAT, _nested(500), 400, "tools"),
    ("json-array-nested-5000", CHAT, b"[" * 5000 + b"]" * 5000, 400, None),
    # A tool call's arguments are JSON text inside a string, parsed apart from the body.
    ("tool-call-arguments-3000-deep", CHAT, _chat(messages=_called("[" * 3000 + "]" * 3000)), 400, "messages"),
    ("tool-call-arguments-200-deep", CHAT, _chat(messages=_called("[" * 200 + "]" * 200)), 400, "messages"),
    ("invalid-utf8-body", CHAT, b"\xff\xfe\x00garbage", 400, None),
    ("invalid-utf8-in-string", CHAT, b'{"model":"tiny","messages":[{"role":"user","content":"\xc3\x28"}]}', 400, None),
    ("not-json", CHAT, b"{not json", 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("messages-empty", CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    ("message-content-number", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (
        "message-role-unknown",
        CHAT,
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages",
    ),
    ("model-unknown", CHAT, _chat(model="nope"), 404, "model"),
    (
        "prompt-too-long",
        CHAT,
        _chat(messages=[{"role": "user", "content": "word " * 400}], max_tokens=None),
        400,
        "max_tokens",
    ),
    ("completion-token-out-of-vocab", COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt"),
    ("completion-prompt-object", COMPLETIONS, {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ("completion-logprobs-50", COMPLETIONS, {"model": "tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (
        "completion-repetition-penalty-1e-300",
        COMPLETIONS,
        {"model": "tiny", "prompt": "hi", "repetition_penalty": 1e-300},
        400,
        "repetition_penalty",
    ),
    ("oversized-body", CHAT, b"x" * (9 * 1024 * 1024), 413, None),
]

# Extreme but valid settings: served (200), never at the victims' expense.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("temperature-1e-39-is-greedy", _chat(temperature=1e-39, max_tokens=8)),
    ("logit-bias-extremes", _chat(temperature=1.0, logit_bias={"5": 100, "6": -100, "7": -100}, max_tokens=8)),
    ("repetition-penalty-0.01", _chat(temperature=0.7, repetition_penalty=0.01, max_tokens=8)),
    ("repetition-penalty-2", _chat(temperature=0.7, repetition_penalty=2.0, max_tokens=8)),
    ("penalties-at-bounds", _chat(temperature=2.0, presence_penalty=-2, frequency_penalty=2, max_tokens=8)),
    ("top-k-huge", _chat(temperature=1.0, top_k=10**12, max_tokens=8)),
    ("min-p-1", _chat(temperature=1.0, min_p=1.0, max_tokens=8)),
    ("top-p-1e-46-keeps-the-likeliest", _chat(temperature=1.0, top_p=1e-46, max_tokens=8)),
]


@dataclass
class _Attack:
    """Victim streams and a /health poller running in threads while the tests attack."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    runs: list[tuple[str, str | None]] = field(default_factory=list)  # (text, finish_reason or error)
    health_s: list[float] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._victim) for _ in range(2)]
        self.threads.append(threading.Thread(target=self._health))
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _victim(self) -> None:
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S, headers=VICTIM_AUTH) as client:
            while not self.stop.is_set():
                self.runs.append(stream_chat(client, VICTIM))

    def _health(self) -> None:
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                self.health_s.append(time.perf_counter() - started)
                time.sleep(HEALTH_POLL_S)


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> tuple[str, str | None]:
    """A streamed chat's text and its finish reason (or the error event's message)."""
    text, reason = [], None
    with client.stream("POST", CHAT, json=body) as response:
        if response.status_code != 200:
            return "", f"status {response.status_code}"
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                return "".join(text), f"error: {event['error']['message']}"
            for choice in event["choices"]:
                text.append(choice["delta"].get("content") or "")
                reason = choice.get("finish_reason") or reason
    return "".join(text), reason


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("isolation")
    out = folder / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, name="tiny"))
    log = folder / "server.log"
    with running_server(out, "--api-key", KEY, "--log-level", "warning", log=log) as url:
        yield url, log


@pytest.fixture(scope="module")
def baseline(server: tuple[str, Path]) -> tuple[str, str | None]:
    """The victims' stream with nothing else running."""
    with httpx.Client(base_url=server[0], timeout=CLIENT_TIMEOUT_S, headers=VICTIM_AUTH) as client:
        return stream_chat(client, VICTIM)


@pytest.fixture(scope="module")
def attack(server: tuple[str, Path], baseline: tuple[str, str | None]) -> Iterator[_Attack]:
    running = _Attack(server[0])
    running.start()
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while not running.health_s and time.monotonic() < deadline:  # the threads are up
        time.sleep(HEALTH_POLL_S)
    yield running
    running.finish()


@pytest.fixture
def client(server: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=CLIENT_TIMEOUT_S, headers=ATTACKER_AUTH) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_gets_openai_error(
    attack: _Attack, client: httpx.Client, path: str, body: bytes | dict[str, Any], status: int, param: str | None
) -> None:
    error = post_openai_error(client, path, body, status)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param


@pytest.mark.parametrize("body", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_extreme_valid_settings_are_served(attack: _Attack, client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_tiny_temperature_samples_greedily(attack: _Attack, client: httpx.Client) -> None:
    cold = client.post(CHAT, json=_chat(temperature=1e-39, max_tokens=12, ignore_eos=True)).json()
    greedy = client.post(CHAT, json=_chat(temperature=0, max_tokens=12, ignore_eos=True)).json()
    assert cold["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_auth_scheme_is_case_insensitive(server: tuple[str, Path]) -> None:
    with httpx.Client(base_url=server[0], timeout=CLIENT_TIMEOUT_S) as c:
        for value in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer {KEY}", f"Bearer  {KEY}"):
            assert c.get("/v1/models", headers={"authorization": value}).status_code == 200, value
        for value in (KEY, f"Basic {KEY}", "Bearer wrong", f"Bearer{KEY}", ""):
            response = c.get("/v1/models", headers={"authorization": value})
            assert response.status_code == 401, value
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_victims_unharmed_and_health_fast(attack: _Attack, baseline: tuple[str, str | None]) -> None:
    """Runs after the attacks above (file order): every victim run equals the unattacked one."""
    attack.finish()
    print(f"victim runs {len(attack.runs)}, health polls {len(attack.health_s)}, max {max(attack.health_s):.3f} s")
    assert baseline[1] == "length" and baseline[0]
    assert len(attack.runs) >= 2
    assert all(run == baseline for run in attack.runs), [run for run in attack.runs if run != baseline][:3]
    assert max(attack.health_s) < HEALTH_BUDGET_S, max(attack.health_s)


def test_log_level_after_subcommand_and_no_tracebacks(server: tuple[str, Path]) -> None:
    """`--log-level warning` after `run` holds: no INFO lines (api.request, server.ready); and no
    handler failed (a traceback would be logged at ERROR)."""
    log = server[1].read_text()
    assert " INFO " not in log, log[:2000]
    assert "Traceback" not in log and " ERROR " not in log, log[:4000]
