"""Chat completions with MCP tools: the server runs the model's tool calls and generates again.

Used when the server has MCP tools and a request sets no `tools` of its own. Each round renders
the conversation so far, generates, and parses the output; calls are run on the MCP servers,
the assistant's calls and a `tool` message per result are appended, and the model goes again.
After MAX_TOOL_ROUNDS rounds of calls, one last round runs with tools off so the model must answer.

The reply is an ordinary chat completion whose content is the text of every round (streamed as
it is generated, so streamed deltas reassemble into the non-streamed content). The calls the
server ran are reported in an extra field, `mcp_calls` ([{id, name, arguments, result}]), on the
message (non-streaming) or on a delta of their own (streaming); OpenAI clients ignore it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import msgspec

from llmc.logs import get_logger
from llmc.runtime.api import protocol as p
from llmc.runtime.api.chat_plan import ChatPlan
from llmc.runtime.api.engine_client import EngineClient, collect
from llmc.runtime.api.http import ClientGoneError, Receive, Send, send_json, stream, wait_disconnect
from llmc.runtime.api.render import Renderer, usage
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.tool_calls import ContentEvent, ToolCall, ToolCallParser
from llmc.runtime.tool_calls.base import parse_all

if TYPE_CHECKING:
    from llmc.runtime.api.mcp.tools import McpManager

# Rounds of tool calls per request. A real task needs one or two; a model that keeps calling
# (a loop, or a tool that keeps failing) is cut off here, then made to answer without tools.
MAX_TOOL_ROUNDS = 4
# Tool calls run per round: a real step needs a few; a model that emits hundreds (a loop, or a
# prompt that asks for it) must not start hundreds of tool runs. The rest get an error result.
MAX_CALLS_PER_ROUND = 8

log = get_logger("llmc.mcp")


class McpCall(msgspec.Struct):
    id: str
    name: str
    arguments: str
    result: str


@dataclass
class _Round:
    index: int
    plan: ChatPlan
    ids: list[int]
    params: list[SamplingParams]


class _Totals:
    """Usage summed over rounds: every round's prompt is read again."""

    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = 0

    def add(self, prompt: int, completion: int, cached: int) -> None:
        self.prompt += prompt
        self.completion += completion
        self.cached += cached

    def usage(self) -> p.Usage:
        return usage(self.prompt, self.completion, self.cached)


class _Conversation:
    def __init__(self, client: EngineClient, mcp: McpManager, req: p.ChatCompletionRequest) -> None:
        self.client = client
        self.mcp = mcp
        self.req = msgspec.structs.replace(req, tools=mcp.tools)
        self.messages = list(req.messages)
        self.calls: list[McpCall] = []

    def prepare(self, index: int) -> _Round:
        req = self.req
        choice: Any = req.tool_choice
        if index == MAX_TOOL_ROUNDS or choice == "none":
            choice = "none"  # the last round must answer
        elif index > 0:
            choice = "auto"  # a forced call was made in round 0; now the model may answer
        round_req = msgspec.structs.replace(req, messages=self.messages, tool_choice=choice)
        plan, ids = self.client.prepare_chat(round_req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if index > 0 and max_tokens is not None:
            # The conversation grew by the calls and results: fit the answer in what is left.
            max_tokens = min(max_tokens, max(1, self.client.engine.max_model_len - len(ids)))
        params = [replace(sp, grammar=plan.grammar) for sp in self.client.params(round_req, ids, max_tokens)]
        return _Round(index, plan, ids, params)

    async def run_calls(self, content: str, calls: list[ToolCall], receive: Receive) -> list[McpCall]:
        """Run the round's calls (at most MAX_CALLS_PER_ROUND); if the client disconnects
        meanwhile, cancel them (the MCP server sees the cancellation) and raise ClientGoneError."""
        run: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(self.mcp.call(c.name, c.arguments) for c in calls[:MAX_CALLS_PER_ROUND]))
        )
        watcher: asyncio.Future[Any] = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait([run, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            gone = not run.done()
            if gone:
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run  # the calls' cancellations reach the MCP loop before we go on
                log.info("mcp.calls_cancelled", calls=min(len(calls), MAX_CALLS_PER_ROUND))
        if gone:
            raise ClientGoneError()
        skipped = f"error: not run: at most {MAX_CALLS_PER_ROUND} tool calls are run per round"
        results = [*run.result(), *[skipped] * (len(calls) - MAX_CALLS_PER_ROUND)]
        tool_calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
        self.messages.append(p.ChatMessage(role="assistant", content=content or None, tool_calls=tool_calls))
        done = []
        for call, result in zip(calls, results, strict=True):
            self.messages.append(p.ChatMessage(role="tool", content=result, tool_call_id=call.id))
            done.append(McpCall(id=call.id, name=call.name, arguments=call.arguments, result=result))
        self.calls.extend(done)
        return done


async def chat_with_mcp(
    client: EngineClient, render: Renderer, mcp: McpManager, req: p.ChatCompletionRequest, receive: Receive, send: Send
) -> None:
    """Answer one chat request (n == 1), running the model's MCP tool calls on the way."""
    conv = _Conversation(client, mcp, req)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    first = await client.off_loop(conv.prepare, 0)  # before any response: a bad request is still a plain 4xx
    if req.stream:
        await stream(send, request_id, _events(conv, render, first, request_id, created, receive))
        return
    totals = _Totals()
    texts: list[str] = []
    round_ = first
    while True:
        outputs = client.submit(f"{request_id}-{round_.index}", round_.ids, round_.params, receive)
        result = (await collect(outputs, 1))[0]
        totals.add(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        fmt = round_.plan.tool_format
        cut = result.finish_reason == "length"
        content, calls = parse_all(fmt, result.text, cut=cut) if fmt is not None else (result.text, [])
        texts.append(content)
        if not calls:
            break
        await conv.run_calls(content, calls, receive)
        round_ = await client.off_loop(conv.prepare, round_.index + 1)
    logprobs = render.chat_logprobs(result.logprobs) if round_.params[0].logprobs is not None else None
    message = p.ResponseMessage("assistant", "".join(texts))
    choice = p.ChatChoice(index=0, message=message, finish_reason=result.finish_reason, logprobs=logprobs)
    body = msgspec.to_builtins(
        p.ChatCompletion(
            id=request_id, created=created, model=render.model_name, choices=[choice], usage=totals.usage()
        )
    )
    if conv.calls:
        body["choices"][0]["message"]["mcp_calls"] = msgspec.to_builtins(conv.calls)
    await send_json(send, 200, msgspec.json.encode(body))


async def _events(
    conv: _Conversation, render: Renderer, first: _Round, request_id: str, created: int, receive: Receive
) -> AsyncIterator[bytes]:
    client = conv.client
    req = conv.req
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> bytes:
        return render.chat_chunk(request_id, created, choices, usage)

    yield chunk([p.ChatChunkChoice(index=0, delta=p.Delta(role="assistant", content=""))])
    totals = _Totals()
    round_ = first
    while True:
        outputs = client.submit(f"{request_id}-{round_.index}", round_.ids, round_.params, receive)
        fmt = round_.plan.tool_format
        parser = ToolCallParser(fmt) if fmt is not None else None
        last: RequestOutput | None = None
        content: list[str] = []
        async for _, out in outputs:
            last = out
            if parser is not None:
                events = parser.feed(out.text) + (parser.finish(out.finish_reason == "length") if out.finished else [])
                text = "".join(e.text for e in events if isinstance(e, ContentEvent))
            else:
                text = out.text
            content.append(text)
            logprobs = render.chat_logprobs(out.logprobs) if out.logprobs else None
            if text or logprobs:
                yield chunk([p.ChatChunkChoice(index=0, delta=p.Delta(content=text), logprobs=logprobs)])
        assert last is not None  # the engine always sends a finished output
        totals.add(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        calls = parser.calls if parser is not None else []
        if not calls:
            yield chunk([p.ChatChunkChoice(index=0, delta=p.Delta(), finish_reason=last.finish_reason)])
            break
        done = await conv.run_calls("".join(content), calls, receive)
        delta = {"mcp_calls": msgspec.to_builtins(done)}
        yield msgspec.json.encode(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": render.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
            }
        )
        round_ = await client.off_loop(conv.prepare, round_.index + 1)
    if include_usage:
        yield chunk([], usage=totals.usage())
