"""Issue 8: MCP tools (`llmc run --mcp-config`): the server runs the model's calls and answers.

A random tiny model calls tools only when forced (tool_choice names one: the call is grammar
constrained), which is all these tests need; the server must then really run the tool (it logs
each call to a file), feed the result back, and return an ordinary final answer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmc.builder.build import BuildOptions, build
from llmc.errors import BadInputError
from llmc.runtime.api.http import ClientGoneError
from llmc.runtime.api.mcp import loop as mcp_loop
from llmc.runtime.api.mcp import tools as mcp_tools
from llmc.runtime.api.mcp.config import ServerSpec, load_config
from llmc.runtime.api.mcp.tools import McpManager
from llmc.runtime.tool_calls import ToolCall
from tests.conftest import make_tiny_llama
from tests.server import free_port, running_server

pytest.importorskip("mcp", reason="the MCP SDK is not installed (pip install 'llmc[mcp]')")

SERVER_SCRIPT = Path(__file__).with_name("mcp_server.py")
# A random model spends many tokens inside a forced call's JSON (whitespace, long numbers): room for it.
FORCED_MAX_TOKENS = 800
# Far below the manager's timeouts: a crashed server must be reported at once, not after a timeout.
CRASH_REPORT_S = 20.0


def _forced(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "tool_choice": {"type": "function", "function": {"name": name}},
        "max_tokens": FORCED_MAX_TOKENS,
        "seed": 7,
        **extra,
    }


def _logged_calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _config(folder: Path, log: Path, **servers: dict[str, Any]) -> Path:
    entry = {"command": sys.executable, "args": [str(SERVER_SCRIPT)], "env": {"MCP_TEST_LOG": str(log)}}
    path = folder / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers or {"calc": entry}}))
    return path


@pytest.fixture(scope="module")
def tiny_4k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with room for the tool prompt (its tokenizer spends ~900 tokens on it)."""
    source = make_tiny_llama(tmp_path_factory.mktemp("mcp-src") / "llama", max_position_embeddings=4096)
    out = tmp_path_factory.mktemp("mcp") / "tiny"
    build(BuildOptions(model=str(source), gguf_file=None, weights=None, output=out, name="tiny"))
    return out


@pytest.fixture(scope="module")
def call_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp-log") / "calls.jsonl"


@pytest.fixture(scope="module")
def client(tiny_4k: Path, call_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    config = _config(tmp_path_factory.mktemp("mcp-config"), call_log)
    with (
        running_server(tiny_4k, "--mcp-config", str(config), "--unauthenticated-mcp") as base,
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        yield http


def _check_add_call(call: dict[str, Any], log: Path, logged_before: int) -> None:
    assert call["name"] == "add"
    args = json.loads(call["arguments"])
    assert call["result"] == str(args["a"] + args["b"])
    logged = _logged_calls(log)[logged_before:]
    assert {"a": args["a"], "b": args["b"]} in [{"a": c["a"], "b": c["b"]} for c in logged]


def test_forced_call_runs_on_the_server_and_the_answer_is_final(client: httpx.Client, call_log: Path) -> None:
    before = len(_logged_calls(call_log))
    response = client.post("/v1/chat/completions", json=_forced("add"))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["tool_calls"] is None
    assert isinstance(choice["message"]["content"], str)
    _check_add_call(choice["message"]["mcp_calls"][0], call_log, before)
    usage = response.json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_answer_reports_the_calls(client: httpx.Client, call_log: Path) -> None:
    before = len(_logged_calls(call_log))
    body = _forced("add", stream=True, stream_options={"include_usage": True})
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    # Split on the SSE separator only: a random model's text may hold any other line break.
    chunks = [event.removeprefix("data: ") for event in response.text.split("\n\n") if event]
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert not any("error" in e for e in events)
    deltas = [choice["delta"] for e in events for choice in e["choices"]]
    calls = [call for d in deltas for call in d.get("mcp_calls", [])]
    _check_add_call(calls[0], call_log, before)
    assert not any("tool_calls" in d for d in deltas)
    reasons = [choice["finish_reason"] for e in events for choice in e["choices"] if choice["finish_reason"]]
    assert reasons in (["stop"], ["length"])
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_a_crashing_tool_is_an_error_result_and_the_server_restarts(client: httpx.Client, call_log: Path) -> None:
    started = time.monotonic()
    # A seed under which the random model closes the call's (free-form) arguments within
    # FORCED_MAX_TOKENS; under some seeds it writes one string until the limit.
    response = client.post("/v1/chat/completions", json=_forced("crash", seed=3))
    assert time.monotonic() - started < CRASH_REPORT_S
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    crash = message["mcp_calls"][0]
    assert crash["name"] == "crash"
    assert crash["result"].startswith("error:")
    assert "calc" in crash["result"]
    # The next request works: the dead server is started again for the call.
    pids_before = {c["pid"] for c in _logged_calls(call_log)}
    before = len(_logged_calls(call_log))
    response = client.post("/v1/chat/completions", json=_forced("add"))
    assert response.status_code == 200, response.text
    _check_add_call(response.json()["choices"][0]["message"]["mcp_calls"][0], call_log, before)
    assert _logged_calls(call_log)[-1]["pid"] not in pids_before


def test_empty_tools_opt_out(client: httpx.Client, call_log: Path) -> None:
    before = len(_logged_calls(call_log))
    refused = client.post("/v1/chat/completions", json=_forced("add", tools=[]))
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tool_choice"
    plain = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "seed": 1}
    with_mcp = client.post("/v1/chat/completions", json=plain).json()
    without = client.post("/v1/chat/completions", json={**plain, "tools": []}).json()
    assert "mcp_calls" not in without["choices"][0]["message"]
    # The MCP tools' descriptions are in the first prompt only.
    assert without["usage"]["prompt_tokens"] + 100 < with_mcp["usage"]["prompt_tokens"]
    assert len(_logged_calls(call_log)) == before


def test_client_tools_go_back_to_the_client(client: httpx.Client, call_log: Path) -> None:
    before = len(_logged_calls(call_log))
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    response = client.post("/v1/chat/completions", json=_forced("get_weather", tools=[weather]))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "mcp_calls" not in choice["message"]
    assert len(_logged_calls(call_log)) == before


@pytest.mark.slow
def test_smollm2_runs_the_tool_and_answers(smollm2_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("mcp-smollm2")
    log = folder / "calls.jsonl"
    config = _config(folder, log)
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Use the add tool to compute 2 + 3, then tell me the result."}],
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "max_tokens": 64,
        "temperature": 0,
    }
    with running_server(smollm2_artifact, "--mcp-config", str(config), "--unauthenticated-mcp") as base:
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    _check_add_call(choice["message"]["mcp_calls"][0], log, 0)
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"].strip()


# ---- the manager on its own -------------------------------------------------------------------


def _spec(name: str, log: Path) -> ServerSpec:
    return ServerSpec(name, command=sys.executable, args=(str(SERVER_SCRIPT),), env={"MCP_TEST_LOG": str(log)})


def test_manager_prefixes_colliding_names_and_reports_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_tools, "CALL_TIMEOUT_S", 1.0)
    log = tmp_path / "calls.jsonl"
    broken = ServerSpec("broken", command=str(tmp_path / "no-such-server"))
    manager = McpManager([_spec("one", log), _spec("two", log), broken])
    manager.start()
    try:
        names = [t["function"]["name"] for t in manager.tools]
        assert names == ["one_add", "one_crash", "one_slow", "two_add", "two_crash", "two_slow"]
        assert manager.tools[0]["function"]["parameters"]["required"] == ["a", "b"]

        async def calls() -> list[str]:  # from an event loop other than the manager's
            return [
                await manager.call("two_add", '{"a": 2, "b": 40}'),
                await manager.call("one_add", {"a": "x"}),
                await manager.call("one_add", "not json"),
                await manager.call("nothing", {}),
                await manager.call("one_slow", {"seconds": 3}),
            ]

        started = time.monotonic()
        added, invalid, not_json, unknown, slow = asyncio.run(calls())
        assert time.monotonic() - started < 10
        assert added == "42"
        assert invalid.startswith("error:")
        assert not_json == "error: the arguments are not valid JSON"
        assert unknown == "error: there is no tool named 'nothing'"
        assert slow == "error: the tool 'slow' did not answer within 1 s"
    finally:
        manager.close()


def test_manager_talks_streamable_http(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "calls.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--http", str(port)],
        env={"MCP_TEST_LOG": str(log), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "the HTTP MCP server did not start"
                time.sleep(0.2)
        manager = McpManager([ServerSpec("web", url=f"http://127.0.0.1:{port}/mcp")])
        manager.start()
        try:
            assert [t["function"]["name"] for t in manager.tools] == ["add", "crash", "slow"]
            assert asyncio.run(manager.call("add", {"a": 1, "b": 2})) == "3"
        finally:
            manager.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[]", "expected"),
        ('{"mcpServers": {"x": {}}}', 'exactly one of "command"'),
        ('{"mcpServers": {"x": {"command": "a", "url": "http://b"}}}', 'exactly one of "command"'),
        ('{"mcpServers": {"x": {"command": "a", "args": "b"}}}', '"args" must be a list'),
        ('{"mcpServers": {"x": {"url": "ftp://b"}}}', "http:// or https://"),
        ('{"mcpServers": {"x": {"command": "a", "env": {"K": 1}}}}', '"env" must map'),
        ('{"mcpServers": {"x": {"url": "http://b", "type": "sse"}}}', "SSE"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_configs_are_refused(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(config)
    with pytest.raises(BadInputError, match=message):
        load_config(path)


def test_config_resolves_server_directories(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    servers = {"a": {"command": "x"}, "b": {"command": "y", "cwd": "sub"}, "off": {"command": "z", "disabled": True}}
    path.write_text(json.dumps({"mcpServers": servers}))
    specs = load_config(path, cwd="/start")
    assert [(s.name, s.cwd) for s in specs] == [("a", "/start"), ("b", "/start/sub")]


def test_a_config_file_is_read_only_up_to_its_cap(tmp_path: Path) -> None:
    # /dev/zero (or any huge file) was read whole: a MemoryError, or the machine's memory.
    from llmc.runtime.api.mcp.config import MAX_CONFIG_BYTES

    big = tmp_path / "mcp.json"
    big.write_text('{"mcpServers": {}, "pad": "' + "x" * MAX_CONFIG_BYTES + '"}')
    for path in (big, Path("/dev/zero")):
        with pytest.raises(BadInputError, match="over"):
            load_config(path)


def test_bad_config_stops_llmc_run_before_serving(tiny_4k: Path, tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"x": {}}}')
    result = subprocess.run(
        [sys.executable, "-m", "llmc", "run", str(tiny_4k), "--p", str(free_port()), "--mcp-config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2  # bad input
    assert 'exactly one of "command"' in result.stderr


# ---- a round's calls: bounded, cancelled with their client ----------------------------------


class _FakeMcp:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = 0
        self.cancelled = 0

    async def call(self, name: str, arguments: str) -> str:
        self.started += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return f"ran {name}"


def _conversation(mcp: _FakeMcp) -> Any:
    conv = object.__new__(mcp_loop._Conversation)  # run_calls needs only the manager and the messages
    conv.mcp, conv.messages, conv.calls = mcp, [], []
    return conv


def test_a_round_runs_at_most_max_calls() -> None:
    calls = [ToolCall(f"call_{i}", "add", "{}") for i in range(mcp_loop.MAX_CALLS_PER_ROUND + 3)]
    mcp = _FakeMcp(delay=0)

    async def never_disconnects() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    done = asyncio.run(_conversation(mcp).run_calls("", calls, never_disconnects))
    assert mcp.started == mcp_loop.MAX_CALLS_PER_ROUND
    assert [c.result for c in done[: mcp.started]] == ["ran add"] * mcp.started
    assert all(c.result.startswith("error: not run") for c in done[mcp.started :])
    assert len(done) == len(calls)


def test_a_disconnect_cancels_the_running_calls() -> None:
    mcp = _FakeMcp(delay=3600)

    async def disconnects() -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"type": "http.disconnect"}

    async def run() -> None:
        await _conversation(mcp).run_calls("", [ToolCall("call_0", "slow", "{}")] * 2, disconnects)

    started = time.monotonic()
    with pytest.raises(ClientGoneError):
        asyncio.run(run())
    assert time.monotonic() - started < 5
    assert mcp.cancelled == 2
