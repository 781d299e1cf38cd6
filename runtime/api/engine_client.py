"""The API's bridge to the engine: sampling params, submit, stream or collect outputs, usage, abort.

The engine runs on its own thread; a request's outputs come back to the event loop through a
LoopDispatcher. A client that disconnects (or a request past --request-timeout) is aborted in the
engine, freeing its blocks. Chat templates and tokenizing run off the event loop (`off_loop`).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import msgspec

from llmc.errors import InternalError, OutOfResourcesError
from llmc.logs import get_logger
from llmc.runtime.api import protocol as p
from llmc.runtime.api.chat_plan import ChatPlan, plan_chat
from llmc.runtime.api.dispatch import LoopDispatcher
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.http import ClientGoneError, Receive, wait_disconnect
from llmc.runtime.api.metrics import Metrics
from llmc.runtime.api.render import usage
from llmc.runtime.api.requests import RequestLimits, cache_salt, sampling_params
from llmc.runtime.engine import Engine
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams, TokenLogprob
from llmc.runtime.tool_calls import ToolCallFormat

log = get_logger("llmc.api")

# Threads that render chat templates and tokenize, off the event loop: a few MB of text take
# seconds, and on the loop they would stall every other request (and /health) meanwhile. The
# tokenizer releases the GIL, so a few threads keep small requests moving past a big one.
PREPARE_THREADS = 4
# How long a request waits for its template rendering and tokenization before it is answered with
# an error: the render checks TEMPLATE_RENDER_TIMEOUT_S itself at every piece of output; this
# also covers a template that loops without output, and tokenizing the largest allowed prompt.
PREPARE_TIMEOUT_S = 30.0

T = TypeVar("T")
# The prefix-cache salt of the API key the current request authenticated with, when the cache is
# isolated per key; set by App's auth, read where sampling params are made (also in MCP rounds).
key_salt: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmc_key_salt", default=None)


@dataclass
class ChoiceResult:
    """One choice's whole output, collected for a non-streamed reply."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]], n: int) -> list[ChoiceResult]:
    """Gather a submitted request's `n` choices until each has finished."""
    results = [ChoiceResult() for _ in range(n)]
    parts: list[list[str]] = [[] for _ in range(n)]
    async for index, out in outputs:
        result = results[index]
        parts[index].append(out.text)
        result.logprobs.extend(out.logprobs)
        result.finish_reason = out.finish_reason
        result.completion_tokens = out.completion_tokens
        result.prompt_tokens = out.prompt_tokens
        result.cached_tokens = out.cached_tokens
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
    for result, texts in zip(results, parts, strict=True):
        result.text = "".join(texts)
    return results


def usage_of(results: list[ChoiceResult]) -> p.Usage:
    return usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results), results[0].cached_tokens)


class UsageCounter:
    """Usage for a stream: the last output of each choice carries its running totals."""

    def __init__(self) -> None:
        self._last: dict[str, RequestOutput] = {}

    def add(self, out: RequestOutput) -> None:
        self._last[out.request_id] = out

    def usage(self) -> p.Usage:
        outs = list(self._last.values())
        first = outs[0] if outs else RequestOutput("", "", [])
        return usage(first.prompt_tokens, sum(o.completion_tokens for o in outs), first.cached_tokens)


class EngineClient:
    """Everything a route needs from the engine, for one served model."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        tool_format: ToolCallFormat,
        max_request_chars: int | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.tool_format = tool_format
        self.limits = RequestLimits.for_context(engine.max_model_len, max_request_chars)
        self.request_timeout_s = request_timeout_s
        self.draining = False  # set on the first SIGTERM/SIGINT: new requests get 503
        # What requests that set none get: the artifact's, then `llmc run`'s flags (engine.py).
        self.defaults = msgspec.structs.asdict(engine.generation_defaults)
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="llmc-prepare")
        self._loop_dispatcher: LoopDispatcher | None = None
        self._loop_dispatcher_loop: asyncio.AbstractEventLoop | None = None

    def plan(self, req: p.ChatCompletionRequest) -> ChatPlan:
        template = self.tokenizer.chat_template_source or ""
        return plan_chat(req, self.tool_format, "tools" in template, lambda: self.engine.grammars)

    def prepare_chat(
        self, req: p.ChatCompletionRequest, add_generation_prompt: bool = True
    ) -> tuple[ChatPlan, list[int]]:
        """Plan, render and tokenize a chat (slow for big chats: run it with `off_loop`)."""
        plan = self.plan(req)
        prompt = self.tokenizer.apply_chat_template(
            plan.messages, add_generation_prompt, plan.tools, max_chars=self.limits.max_rendered_chars
        )
        return plan, self.tokenizer.encode(prompt)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on a prepare thread (with this request's context) so the event loop stays free."""
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(self._prepare_pool, context.run, fn, *args)
        try:
            return await asyncio.wait_for(future, PREPARE_TIMEOUT_S)
        except TimeoutError as exc:
            raise HttpError(
                503,
                f"preparing this request (chat template, tokenizer) took over {PREPARE_TIMEOUT_S} s; "
                "send a shorter prompt or fewer messages",
            ) from exc

    def params(self, req: Any, ids: list[int], max_tokens: int | None) -> list[SamplingParams]:
        """One SamplingParams per choice, checked against the context (a bad request raises here)."""
        room = max(1, self.engine.max_model_len - len(ids))  # default max_tokens: the rest of the context
        default = min(room, self.defaults["max_tokens"] or room)  # a server default never overflows it
        params = sampling_params(req, self.defaults, default, max_tokens, self.tokenizer.vocab_size)
        self.engine.check_length(len(ids), params[0].max_tokens)
        salt = cache_salt(req, key_salt.get())
        return params if salt is None else [replace(sp, cache_salt=salt) for sp in params]

    def _dispatcher(self) -> LoopDispatcher:
        """The dispatcher of the running event loop (Granian runs one loop per worker)."""
        loop = asyncio.get_running_loop()
        if self._loop_dispatcher is None or self._loop_dispatcher_loop is not loop:
            self._loop_dispatcher, self._loop_dispatcher_loop = LoopDispatcher(loop), loop
        return self._loop_dispatcher

    def submit(
        self, request_id: str, ids: list[int], params: list[SamplingParams], receive: Receive
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submit to the engine; yield (choice index, output) until every choice has finished.

        If the client goes away first, the request is aborted in the engine and its blocks freed.
        """
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        dispatcher = self._dispatcher()

        def sink(out: RequestOutput) -> None:  # runs on the engine thread
            dispatcher.post(queue, out)

        seq_ids = self.engine.submit(request_id, ids, params, sink)
        index_of = {seq_id: index for index, seq_id in enumerate(seq_ids)}
        log.info("api.request", request_id=request_id, prompt_tokens=len(ids), max_tokens=params[0].max_tokens)
        started = time.perf_counter()
        self.metrics.prompt_tokens.inc(len(ids))
        metrics = self.metrics

        timeout = self.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout

        async def iterate() -> AsyncIterator[tuple[int, RequestOutput]]:
            watcher = asyncio.ensure_future(wait_disconnect(receive))
            pending = set(seq_ids)
            last_output: float | None = None
            try:
                while pending:
                    getter = asyncio.ensure_future(queue.get())
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    done, _ = await asyncio.wait({getter, watcher}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        getter.cancel()
                        log.info("api.timeout", request_id=request_id, seconds=timeout)
                        raise HttpError(
                            504,
                            f"the request did not finish within this server's --request-timeout of {timeout} s "
                            "and was stopped; ask for fewer max_tokens or retry later",
                            code="timeout",
                        )
                    if getter not in done:
                        getter.cancel()
                        raise ClientGoneError()
                    out = getter.result()
                    now = time.perf_counter()
                    if out.token_ids:
                        metrics.generation_tokens.inc(len(out.token_ids))
                        if last_output is None:
                            metrics.ttft.observe(now - started)
                        else:
                            metrics.itl.observe(now - last_output)
                        last_output = now
                    if out.finished:
                        pending.discard(out.request_id)
                    if out.finish_reason == "error":
                        # While draining, the engine ends what is left at --shutdown-timeout.
                        raise (OutOfResourcesError if self.draining else InternalError)(
                            out.error or "generation failed"
                        )
                    yield index_of[out.request_id], out
                log.info("api.done", request_id=request_id, seconds=round(time.perf_counter() - started, 3))
            finally:
                watcher.cancel()
                if pending:
                    self.engine.abort(sorted(pending))
                    log.info("api.aborted", request_id=request_id)

        return iterate()
