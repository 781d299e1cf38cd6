"""MCP tools for chat: start the servers of an `mcp.json` (config.py), offer their tools, run the model's calls.

The MCP SDK is asyncio (anyio) code whose sessions must stay in the task that opened them, while
the engine is synchronous and Granian's worker runs requests on its own event loop. So every
session lives on one background event loop in a daemon thread (one task per server holds its
session open), and `McpManager.call` hands each call to that loop: it may be awaited from any
other event loop. Failures never escape as exceptions: a tool error, a timeout, a dead or
unreachable server all become a result text starting with "error:" for the model to read. A
server that died is started again on the next call to one of its tools.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmc.logs import get_logger
from llmc.runtime.api.mcp.config import ServerSpec

log = get_logger("llmc.mcp")

T = TypeVar("T")

# One tool call gets this long: tools that do real work
# (a web fetch, a database query) finish well within it, and past it the user is better served by
# an "error: timed out" the model can explain than by a request that seems to hang.
CALL_TIMEOUT_S = 60.0
# Starting a server and listing its tools: `npx`/`uvx` servers may download a package first.
START_TIMEOUT_S = 60.0
# After a failed call, a ping this short tells a dead session (restart it) from a tool that failed.
PING_TIMEOUT_S = 5.0
# Closing the sessions at shutdown: servers get this long to exit before we stop waiting.
CLOSE_TIMEOUT_S = 5.0
_WHOLE_CALL_TIMEOUT_S = START_TIMEOUT_S + CALL_TIMEOUT_S + PING_TIMEOUT_S + CLOSE_TIMEOUT_S
# A tool result longer than this is cut: it becomes prompt tokens, and the context is finite.
MAX_RESULT_CHARS = 32_000
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_.-]")  # outside OpenAI's function-name alphabet
MAX_NAME_CHARS = 64
_MAX_TOOL_PAGES = 100  # a server that keeps sending cursors must not keep us listing forever


@dataclass
class _Tool:
    server: _Server
    name: str  # the name the MCP server knows
    description: str
    schema: dict[str, Any]


@dataclass
class _Server:
    spec: ServerSpec
    session: Any = None  # mcp.ClientSession while connected
    tools: list[Any] = field(default_factory=list)
    _stop: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _lock: asyncio.Lock | None = None

    async def connect(self) -> list[Any]:
        """Start the server in a task that keeps its session open; return its tools."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.session is not None:
                return self.tools
            await self.disconnect()
            ready: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._hold(ready, self._stop), name=f"mcp-{self.spec.name}")
            try:
                self.tools = await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT_S)
            except TimeoutError:
                await self.disconnect()
                raise TimeoutError(
                    f"the MCP server {self.spec.name!r} did not start in {START_TIMEOUT_S:g} s"
                ) from None
            except BaseException:
                await self.disconnect()
                raise
            return self.tools

    async def _hold(self, ready: asyncio.Future[list[Any]], stop: asyncio.Event) -> None:
        from mcp import ClientSession

        session = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = await stack.enter_async_context(_transport(self.spec))
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                tools = await _list_tools(session)
                self.session = session
                ready.set_result(tools)
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, Exception):
                    ready.set_exception(exc)
                else:
                    ready.cancel()
            elif not stop.is_set():
                log.warning("mcp.server_lost", server=self.spec.name, error=_describe(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            if self.session is session:  # (a newer holder may have connected since)
                self.session = None

    async def disconnect(self) -> None:
        self.session = None
        if self._stop is not None:
            self._stop.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(task, CLOSE_TIMEOUT_S)  # cancels the task if it times out
            except Exception:  # a server that will not close is left to exit with us
                log.warning("mcp.close_timeout", server=self.spec.name)

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        if self.session is None:  # it died since the last call: start it again
            try:
                await self.connect()
            except Exception as exc:  # the details (paths, addresses) are for the log, not for clients
                log.warning("mcp.restart_failed", server=self.spec.name, error=_describe(exc))
                return f"error: the MCP server {self.spec.name!r} is not running and did not restart"
        session = self.session
        assert session is not None
        try:
            result = await asyncio.wait_for(session.call_tool(name, arguments), CALL_TIMEOUT_S)
        except Exception as exc:
            # A protocol error or a slow tool on a live server, or a dead server: a ping tells which.
            try:
                await asyncio.wait_for(session.send_ping(), PING_TIMEOUT_S)
            except Exception:
                log.warning("mcp.server_dead", server=self.spec.name, error=_describe(exc))
                await self.disconnect()
                return f"error: the MCP server {self.spec.name!r} stopped while running {name!r}"
            if isinstance(exc, TimeoutError):
                return f"error: the tool {name!r} did not answer within {CALL_TIMEOUT_S:g} s"
            log.warning("mcp.call_error", server=self.spec.name, tool=name, error=_describe(exc))
            return f"error: the tool {name!r} failed (the server log has the details)"
        return result_text(result)


async def _list_tools(session: Any) -> list[Any]:
    page = await session.list_tools()
    tools = list(page.tools)
    for _ in range(_MAX_TOOL_PAGES):  # the list may come in pages
        cursor = getattr(page, "next_cursor", None) or getattr(page, "nextCursor", None)
        if not cursor:
            break
        try:
            from mcp.types import PaginatedRequestParams

            page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
        except TypeError:  # older SDKs take the cursor itself
            page = await session.list_tools(cursor=cursor)
        tools.extend(page.tools)
    return tools


def _transport(spec: ServerSpec) -> Any:
    """The SDK's client transport for a server: it yields (read stream, write stream, ...)."""
    if spec.url is None:
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        assert spec.command is not None
        params = StdioServerParameters(command=spec.command, args=list(spec.args), env=spec.env, cwd=spec.cwd)
        return stdio_client(params)
    from mcp.client import streamable_http

    modern = getattr(streamable_http, "streamable_http_client", None)
    if modern is None:  # mcp < 1.24
        return streamable_http.streamablehttp_client(spec.url, headers=spec.headers)  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def with_headers() -> Any:
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with (
            create_mcp_http_client(headers=spec.headers) as client,
            modern(spec.url, http_client=client) as streams,
        ):
            yield streams

    return with_headers()


def result_text(result: Any) -> str:
    """An MCP CallToolResult as text for the model."""
    parts: list[str] = []
    for block in getattr(result, "content", None) or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{kind} content]")
    if not parts:
        structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
        if structured is not None:
            parts.append(json.dumps(structured, ensure_ascii=False))
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[cut: the result has {len(text)} characters]"
    if getattr(result, "is_error", None) or getattr(result, "isError", None):
        return f"error: {text or 'the tool failed'}"
    return text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):  # anyio task groups wrap the real cause
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class McpManager:
    """The configured MCP servers, their tools as OpenAI tool dicts, and a way to call them."""

    def __init__(self, specs: list[ServerSpec], max_tools: int | None = None) -> None:
        self._servers = [_Server(spec) for spec in specs]
        self._max_tools = max_tools
        self._tools: dict[str, _Tool] = {}
        self.tools: list[dict[str, Any]] = []  # OpenAI tool dicts, in server order
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmc-mcp", daemon=True)

    def start(self) -> None:
        """Start every server (in parallel) and collect the tools; a server that fails is logged and left out."""
        self._thread.start()
        results = self._run(self._start_all(), START_TIMEOUT_S + 3 * CLOSE_TIMEOUT_S)
        listed: list[tuple[_Server, Any]] = []
        for server, result in zip(self._servers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("mcp.server_failed", server=server.spec.name, error=_describe(result))
                continue
            log.info("mcp.server_ready", server=server.spec.name, tools=[t.name for t in result])
            listed.extend((server, tool) for tool in result)
        counts: dict[str, int] = {}
        for _, tool in listed:
            counts[tool.name] = counts.get(tool.name, 0) + 1
        for server, tool in listed:
            name = tool.name if counts[tool.name] == 1 else f"{server.spec.name}_{tool.name}"
            name = _NOT_NAME_CHAR.sub("_", name)[:MAX_NAME_CHARS] or "tool"
            base, suffix = name, 2
            while name in self._tools:  # still taken after prefixing (or sanitising): number it
                tail = f"_{suffix}"
                name = base[: MAX_NAME_CHARS - len(tail)] + tail
                suffix += 1
            if self._max_tools is not None and len(self._tools) >= self._max_tools:
                log.warning("mcp.too_many_tools", kept=self._max_tools, dropped=tool.name, server=server.spec.name)
                continue
            schema = getattr(tool, "input_schema", None) or getattr(tool, "inputSchema", None)
            if not isinstance(schema, dict):
                schema = {"type": "object", "properties": {}}
            description = getattr(tool, "description", None) or ""
            self._tools[name] = _Tool(server, tool.name, description, schema)
            self.tools.append(
                {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}
            )

    async def _start_all(self) -> list[Any]:
        return await asyncio.gather(*(s.connect() for s in self._servers), return_exceptions=True)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def call(self, name: str, arguments: str | dict[str, Any]) -> str:
        """Run tool `name` (its OpenAI name) with JSON `arguments`; the result or "error: ..." as text.

        Safe to await from any event loop; never raises (except for the caller's own cancellation).
        """
        tool = self._tools.get(name)
        if tool is None:
            return f"error: there is no tool named {name!r}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser recurses
                return "error: the arguments are not valid JSON"
        if not isinstance(arguments, dict):
            return "error: the arguments must be a JSON object"
        future = asyncio.run_coroutine_threadsafe(tool.server.call(tool.name, arguments), self._loop)
        try:
            # The server enforces CALL_TIMEOUT_S on the call itself; this bound also covers a restart
            # of a dead server and the ping, and guards against a stuck background loop.
            result = await asyncio.wait_for(asyncio.wrap_future(future), _WHOLE_CALL_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            log.warning("mcp.call_timeout", tool=name, seconds=_WHOLE_CALL_TIMEOUT_S)
            return f"error: the tool {name!r} did not answer within {_WHOLE_CALL_TIMEOUT_S:g} s"
        except Exception as exc:
            log.warning("mcp.call_failed", tool=name, error=_describe(exc))
            return f"error: the tool {name!r} failed (the server log has the details)"
        log.info("mcp.call", tool=name, server=tool.server.spec.name, chars=len(result))
        return result

    def close(self) -> None:
        """Stop every server and the background loop (idempotent)."""
        if not self._thread.is_alive():
            return

        async def close_all() -> None:
            await asyncio.gather(*(s.disconnect() for s in self._servers), return_exceptions=True)

        with contextlib.suppress(Exception):
            self._run(close_all(), CLOSE_TIMEOUT_S * 2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)
