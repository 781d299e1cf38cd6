"""The ASGI application: OpenAI-compatible routes over the engine, served by Granian.

Every request is decoded and validated here; bad input becomes an OpenAI-style 4xx and never
reaches the engine. Streaming responses are Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

import llmc
from llmc.errors import BadInputError, InternalError, LlmcError, OutOfResourcesError
from llmc.logs import get_logger
from llmc.runtime.api import protocol as p
from llmc.runtime.api.chat_plan import ChatPlan, plan_chat
from llmc.runtime.api.dispatch import LoopDispatcher
from llmc.runtime.api.errors import HttpError, error_response
from llmc.runtime.api.http_guard import HttpGuard
from llmc.runtime.api.metrics import CONTENT_TYPE, Metrics
from llmc.runtime.api.openapi import openapi_spec
from llmc.runtime.api.requests import (
    RequestLimits,
    cache_salt,
    check_messages_cap,
    check_text_cap,
    check_token_ids_cap,
    completion_prompt,
    sampling_params,
    validation_param,
)
from llmc.runtime.engine import Engine, EngineBusyError
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams, TokenLogprob
from llmc.runtime.tool_calls import ContentEvent, ToolCall, ToolCallParser, choose_format
from llmc.runtime.tool_calls.base import parse_all

if TYPE_CHECKING:
    from llmc.runtime.mcp_tools import McpManager

log = get_logger("llmc.api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# A request body above this is refused with 413: even a full 128k-token chat is a few MB of JSON.
MAX_BODY_BYTES = 8 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
# Threads that render chat templates and tokenize, off the event loop: a few MB of text take
# seconds, and on the loop they would stall every other request (and /health) meanwhile. The
# tokenizer releases the GIL, so a few threads keep small requests moving past a big one.
PREPARE_THREADS = 4
# How long a request waits for its template rendering and tokenization before it is answered with
# an error: the render checks TEMPLATE_RENDER_TIMEOUT_S itself at every piece of output; this
# also covers a template that loops without output, and tokenizing the largest allowed prompt.
PREPARE_TIMEOUT_S = 30.0
PREFIX_CACHE_ISOLATION = ("shared", "key")  # --prefix-cache-isolation: one cache, or one per API key
# GET /v1/models/{id}: served ids may hold '/' (owner/name), so everything after the prefix is the id.
MODEL_PATH_PREFIX = "/v1/models/"
MODEL_ROUTE = "/v1/models/{id}"  # its label in the request metrics, whatever the id
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for (legacy) /v1/completions

T = TypeVar("T")
# The prefix-cache salt of the API key the current request authenticated with, when the cache is
# isolated per key; set by App.__call__, read where sampling params are made (also in MCP rounds).
_key_salt: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmc_key_salt", default=None)


class ClientGoneError(Exception):
    """The client disconnected; the request is aborted and its resources freed."""


class App:
    def __init__(
        self,
        engine: Engine,
        served_model_name: str | None = None,
        api_key: str | None = None,
        tool_parser: str = "auto",
        ui: bool = False,
        mcp: McpManager | None = None,
        guard: HttpGuard | None = None,
        max_request_chars: int | None = None,
        request_timeout_s: float | None = None,
        prefix_cache_isolation: str = "shared",
    ) -> None:
        self.engine = engine
        self.mcp = mcp
        self.guard = guard or HttpGuard("127.0.0.1")
        self.draining = False  # set on the first SIGTERM/SIGINT: new requests get 503
        self._loop_dispatcher: LoopDispatcher | None = None
        self._loop_dispatcher_loop: asyncio.AbstractEventLoop | None = None
        self.tool_format = choose_format(tool_parser, engine.tokenizer.chat_template_source)
        # Several keys may be given, comma-separated: each client (or team) its own.
        self._api_keys = [k.strip().encode() for k in api_key.split(",") if k.strip()] if api_key else []
        self._api_key = self._api_keys[0] if self._api_keys else None
        if prefix_cache_isolation not in PREFIX_CACHE_ISOLATION:
            raise BadInputError(f"--prefix-cache-isolation must be one of {', '.join(PREFIX_CACHE_ISOLATION)}")
        if prefix_cache_isolation == "key" and not self._api_keys:
            raise BadInputError("--prefix-cache-isolation key needs --api-key (one or several keys, comma-separated)")
        self._isolate_by_key = prefix_cache_isolation == "key"
        self.limits = RequestLimits.for_context(engine.max_model_len, max_request_chars)
        self.request_timeout_s = request_timeout_s
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="llmc-prepare")
        self.metrics = Metrics(engine.stats)
        self.model_name = served_model_name or engine.model_name
        self.created = int(time.time())
        # What requests that set none get: the artifact's, then `llmc run`'s flags (engine.py).
        self.defaults = msgspec.structs.asdict(engine.generation_defaults)
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("GET", "/metrics"): self.metrics_route,
            ("GET", "/openapi.json"): self.openapi,
        }
        self._public = {"/health"}  # served without the API key
        if ui:  # the chat page: it asks for the key itself, so it must load without one
            from llmc.runtime.api.ui import ROUTES, UiAssets

            self._ui = UiAssets()
            self._routes.update({("GET", path): self.ui_route for path in ROUTES})
            self._routes[("GET", "/")] = self.ui_redirect  # a browser pointed at the server finds the page
            self._public.update([*ROUTES, "/"])
        self._tokenize_decoder = msgspec.json.Decoder(p.TokenizeRequest)
        self._detokenize_decoder = msgspec.json.Decoder(p.DetokenizeRequest)
        self._openapi = msgspec.json.encode(
            openapi_spec(llmc.__version__, auth=api_key is not None, model_name=self.model_name)
        )
        self._chat_decoder = msgspec.json.Decoder(p.ChatCompletionRequest)
        self._completion_decoder = msgspec.json.Decoder(p.CompletionRequest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        handler = self._routes.get((scope["method"], path))
        status = 500
        route = path if any(route_path == path for _, route_path in self._routes) else "unknown"
        if path.startswith(MODEL_PATH_PREFIX):  # GET /v1/models/{id}, the one route with a parameter
            route, handler = MODEL_ROUTE, self.model if scope["method"] == "GET" else None
        cors: list[tuple[bytes, bytes]] = []  # CORS headers for an origin --cors-origins allows
        receive = self.guard.timed_receive(receive)

        async def send_recording_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            cors = self.guard.check(scope, json_route=handler is not None and scope["method"] == "POST")
            if self.guard.is_preflight(scope):
                await self.guard.preflight(send_recording_status)
                return
            if self.draining and path != "/health":
                raise HttpError(503, "the server is shutting down; retry on another server", code="shutting_down")
            if self._api_key is not None and path not in self._public:
                self._authorize(scope)
            if handler is None:
                if route != "unknown":
                    raise HttpError(405, f"method {scope['method']} is not allowed on {path}")
                raise HttpError(404, f"no route {path}", code="not_found")
            await handler(scope, receive, send_recording_status)
        except LlmcError as exc:
            await _send_error(send_recording_status, exc)
        except ClientGoneError:
            status = 499  # nginx's "client closed request"
        except Exception as exc:  # a bug in a handler must not take the server down
            log.exception("api.handler_failed", path=path, error=type(exc).__name__)
            await _send_error(send_recording_status, InternalError("internal server error; see the server log"))
        self.metrics.requests.labels(route, str(status)).inc()

    def _authorize(self, scope: Scope) -> None:
        assert self._api_key is not None
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        scheme, _, token = given.strip().partition(b" ")
        matched = None
        # RFC 9110 section 11.1: the scheme is case-insensitive (`bearer KEY` is as good as `Bearer KEY`).
        if scheme.lower() == b"bearer":
            for key in self._api_keys:  # every key compared, in constant time each
                if hmac.compare_digest(token.strip(), key):
                    matched = key
        if matched is None:
            raise HttpError(
                401,
                "missing or incorrect API key: send it as `Authorization: Bearer KEY`",
                code="invalid_api_key",
            )
        if self._isolate_by_key:
            _key_salt.set("key:" + hashlib.sha256(matched).hexdigest())

    # ---- routes --------------------------------------------------------------------------
    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.draining:  # load balancers stop sending work here
            await _send_json(send, 503, b'{"status":"draining"}')
            return
        await _send_json(send, 200, b'{"status":"ok"}')

    async def openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self._openapi)

    async def ui_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, body = self._ui.response(scope["path"].rstrip("/"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def ui_redirect(self, scope: Scope, receive: Receive, send: Send) -> None:
        from llmc.runtime.api.ui import PAGE

        # A relative Location: right behind any proxy or Host name, and never a different origin.
        headers = [(b"location", PAGE.encode()), (b"content-length", b"0"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def metrics_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", CONTENT_TYPE.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.metrics.render()})

    async def tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _decode(self._tokenize_decoder, await _read_body(scope, receive))
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise BadInputError("send exactly one of `prompt` and `messages`", param="prompt")
        if req.messages is not None:
            check_messages_cap(req.messages, self.limits)
            chat = p.ChatCompletionRequest(model=self.model_name, messages=req.messages)
            _, ids = await self._off_loop(self._prepare_chat, chat, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            check_text_cap(req.prompt, self.limits)
            ids = await self._off_loop(self.engine.tokenizer.encode, req.prompt)
        body = p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.engine.max_model_len)
        await _send_json(send, 200, msgspec.json.encode(body))

    async def detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _decode(self._detokenize_decoder, await _read_body(scope, receive))
        if req.model is not None:
            self._check_model(req.model)
        check_token_ids_cap(req.tokens, self.limits, "tokens")
        if any(not 0 <= t < self.engine.tokenizer.vocab_size for t in req.tokens):
            raise BadInputError("tokens holds an id outside the vocabulary", param="tokens")
        text = self.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)
        await _send_json(send, 200, msgspec.json.encode(p.DetokenizeResponse(prompt=text)))

    def _model_card(self) -> p.ModelCard:
        return p.ModelCard(
            id=self.model_name,
            created=self.created,
            owned_by="llmc",
            max_model_len=self.engine.max_model_len,
            generation_defaults=self.defaults,
        )

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, msgspec.json.encode(p.ModelList(data=[self._model_card()])))

    async def model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/models/{id} (the openai SDK's models.retrieve); the id may hold '/' (owner/name)."""
        self._check_model(scope["path"].rstrip("/")[len(MODEL_PATH_PREFIX) :])
        await _send_json(send, 200, msgspec.json.encode(self._model_card()))

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _decode(self._chat_decoder, await _read_body(scope, receive))
        self._check_model(req.model)
        check_messages_cap(req.messages, self.limits)
        if self.mcp is not None and self.mcp.tools and req.tools is None and req.n == 1:
            from llmc.runtime.api.mcp_loop import chat_with_mcp  # the MCP tool loop; needs this module

            await chat_with_mcp(self, self.mcp, req, receive, send)
            return
        plan, ids = await self._off_loop(self._prepare_chat, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = [replace(sp, grammar=plan.grammar) for sp in self._params(req, ids, max_tokens)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = self._submit(request_id, ids, params, receive)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            parsers = [
                ToolCallParser(plan.tool_format, forced=plan.forced) if plan.tool_format else None for _ in params
            ]

            def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> bytes:
                body = p.ChatCompletionChunk(
                    id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
                )
                return msgspec.json.encode(body)

            async def events() -> AsyncIterator[bytes]:
                for index in range(len(params)):
                    yield chunk([p.ChatChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))])
                usage = _UsageCounter()
                async for index, out in outputs:
                    usage.add(out)
                    logprobs = self._chat_logprobs(out.logprobs) if out.logprobs else None
                    parser = parsers[index]
                    deltas = (
                        _deltas(parser, out.text, out.finished, out.finish_reason == "length")
                        if parser
                        else [p.Delta(content=out.text)]
                    )
                    for delta in deltas:
                        if delta.content or delta.tool_calls or logprobs:
                            yield chunk([p.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)])
                            logprobs = None
                    if out.finished:
                        reason = "tool_calls" if parser and parser.calls else out.finish_reason
                        yield chunk([p.ChatChunkChoice(index=index, delta=p.Delta(), finish_reason=reason)])
                if include_usage:
                    yield chunk([], usage=usage.usage())

            await self._stream(send, request_id, events())
            return
        results = await _collect(outputs, len(params))
        choices = []
        for index, r in enumerate(results):
            message = p.ResponseMessage("assistant", r.text)
            reason = r.finish_reason
            if plan.tool_format is not None:
                # An unfinished call is never content (tool_calls/base.py): forced, content is null.
                content, calls = parse_all(plan.tool_format, r.text, plan.forced, r.finish_reason == "length")
                if calls:
                    message = p.ResponseMessage("assistant", content or None, [_tool_call_out(c) for c in calls])
                    reason = "tool_calls"
                else:
                    message = p.ResponseMessage("assistant", None if plan.forced and not content else content)
            logprobs = self._chat_logprobs(r.logprobs) if params[index].logprobs is not None else None
            choices.append(p.ChatChoice(index=index, message=message, finish_reason=reason, logprobs=logprobs))
        body = p.ChatCompletion(
            id=request_id, created=created, model=self.model_name, choices=choices, usage=_usage_of(results)
        )
        await _send_json(send, 200, msgspec.json.encode(body))

    def _plan(self, req: p.ChatCompletionRequest) -> ChatPlan:
        template = self.engine.tokenizer.chat_template_source or ""
        return plan_chat(req, self.tool_format, "tools" in template, lambda: self.engine.grammars)

    def _prepare_chat(
        self, req: p.ChatCompletionRequest, add_generation_prompt: bool = True
    ) -> tuple[ChatPlan, list[int]]:
        """Plan, render and tokenize a chat (slow for big chats: run it with `_off_loop`)."""
        plan = self._plan(req)
        tokenizer = self.engine.tokenizer
        prompt = tokenizer.apply_chat_template(
            plan.messages, add_generation_prompt, plan.tools, max_chars=self.limits.max_rendered_chars
        )
        return plan, tokenizer.encode(prompt)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
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

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _decode(self._completion_decoder, await _read_body(scope, receive))
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            check_text_cap(req.prompt, self.limits)
        ids = await self._off_loop(completion_prompt, req, self.engine.tokenizer)
        # OpenAI's default, unless the artifact or `llmc run` set one.
        legacy = None if self.defaults["max_tokens"] is not None else COMPLETION_MAX_TOKENS
        params = self._params(req, ids, req.max_tokens if req.max_tokens is not None else legacy)
        echo = ""
        if req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else self.engine.tokenizer.decode(ids, False)
            params = [replace(sp, prompt_logprobs=sp.logprobs) for sp in params]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = self._submit(request_id, ids, params, receive)
        created = int(time.time())
        wants_logprobs = params[0].logprobs is not None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> bytes:
                body = p.Completion(id=request_id, created=created, model=self.model_name, choices=choices, usage=usage)
                return msgspec.json.encode(body)

            async def events() -> AsyncIterator[bytes]:
                usage = _UsageCounter()
                offsets = [0] * len(params)
                async for index, out in outputs:
                    usage.add(out)
                    if echo and offsets[index] == 0:
                        prompt_lps = self._echo_logprobs(ids, out.prompt_logprobs) if wants_logprobs else None
                        yield chunk([p.CompletionChoice(index, echo, None, prompt_lps)])
                        offsets[index] = len(echo)
                    if out.text or out.finished or out.logprobs:
                        logprobs = self._completion_logprobs(out.logprobs, offsets[index]) if out.logprobs else None
                        offsets[index] += len(out.text)
                        yield chunk([p.CompletionChoice(index, out.text, out.finish_reason, logprobs)])
                if include_usage:
                    yield chunk([], usage=usage.usage())

            await self._stream(send, request_id, events())
            return
        results = await _collect(outputs, len(params))
        choices = []
        for index, r in enumerate(results):
            logprobs = None
            if wants_logprobs:
                logprobs = self._completion_logprobs(r.logprobs, len(echo))
                if echo:
                    head = self._echo_logprobs(ids, r.prompt_logprobs)
                    logprobs = p.CompletionLogprobs(
                        tokens=head.tokens + logprobs.tokens,
                        token_logprobs=head.token_logprobs + logprobs.token_logprobs,
                        top_logprobs=head.top_logprobs + logprobs.top_logprobs,
                        text_offset=head.text_offset + logprobs.text_offset,
                    )
            choices.append(p.CompletionChoice(index, echo + r.text, r.finish_reason, logprobs))
        body = p.Completion(
            id=request_id, created=created, model=self.model_name, choices=choices, usage=_usage_of(results)
        )
        await _send_json(send, 200, msgspec.json.encode(body))

    def _echo_logprobs(self, ids: list[int], prompt_logprobs: list[TokenLogprob | None] | None) -> p.CompletionLogprobs:
        """The prompt's own tokens, as OpenAI echoes them: the first has no logprob."""
        entries = prompt_logprobs or [None] * len(ids)
        tokens = [self._token(t) for t in ids]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return p.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else lp.logprob for lp in entries],
            top_logprobs=[None if lp is None else {self._token(t): v for t, v in lp.top} for lp in entries],
            text_offset=offsets,
        )

    # ---- helpers ---------------------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> p.ChatLogprobs:
        content = []
        for lp in logprobs:
            text = self._token(lp.token_id)
            top = [p.TopLogprob(self._token(t), v, list(self._token(t).encode())) for t, v in lp.top]
            content.append(p.ChatTokenLogprob(text, lp.logprob, list(text.encode()), top))
        return p.ChatLogprobs(content=content)

    def _completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> p.CompletionLogprobs:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for lp in logprobs:
            text = self._token(lp.token_id)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self._token(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return p.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise HttpError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _params(self, req: Any, ids: list[int], max_tokens: int | None) -> list[SamplingParams]:
        room = max(1, self.engine.max_model_len - len(ids))  # default max_tokens: the rest of the context
        default = min(room, self.defaults["max_tokens"] or room)  # a server default never overflows it
        params = sampling_params(req, self.defaults, default, max_tokens, self.engine.tokenizer.vocab_size)
        self.engine.check_length(len(ids), params[0].max_tokens)
        salt = cache_salt(req, _key_salt.get())
        return params if salt is None else [replace(sp, cache_salt=salt) for sp in params]

    def _dispatcher(self) -> LoopDispatcher:
        """The dispatcher of the running event loop (Granian runs one loop per worker)."""
        loop = asyncio.get_running_loop()
        if self._loop_dispatcher is None or self._loop_dispatcher_loop is not loop:
            self._loop_dispatcher, self._loop_dispatcher_loop = LoopDispatcher(loop), loop
        return self._loop_dispatcher

    def _submit(
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
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
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

    async def _stream(self, send: Send, request_id: str, events: AsyncIterator[bytes]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        try:
            async for event in events:
                await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": True})
        except LlmcError as exc:
            # Headers are gone: report the error as a final event, as OpenAI does.
            _, body = error_response(exc)
            await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": True})
        except ClientGoneError:
            return
        except Exception:
            log.exception("api.stream_failed", request_id=request_id)
        try:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except Exception:  # the client left after the last event; nothing to do
            return


@dataclass
class _ChoiceResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


async def _collect(outputs: AsyncIterator[tuple[int, RequestOutput]], n: int) -> list[_ChoiceResult]:
    results = [_ChoiceResult() for _ in range(n)]
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


def _usage(prompt: int, completion: int, cached: int) -> p.Usage:
    return p.Usage(prompt, completion, prompt + completion, p.PromptTokensDetails(cached_tokens=cached))


def _usage_of(results: list[_ChoiceResult]) -> p.Usage:
    return _usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results), results[0].cached_tokens)


class _UsageCounter:
    """Usage for a stream: the last output of each choice carries its running totals."""

    def __init__(self) -> None:
        self._last: dict[str, RequestOutput] = {}

    def add(self, out: RequestOutput) -> None:
        self._last[out.request_id] = out

    def usage(self) -> p.Usage:
        outs = list(self._last.values())
        first = outs[0] if outs else RequestOutput("", "", [])
        return _usage(first.prompt_tokens, sum(o.completion_tokens for o in outs), first.cached_tokens)


def _tool_call_out(call: ToolCall) -> p.ToolCallOut:
    return p.ToolCallOut(id=call.id, function=p.FunctionCall(name=call.name, arguments=call.arguments))


def _deltas(parser: ToolCallParser, text: str, finished: bool, cut: bool = False) -> list[p.Delta]:
    """Stream deltas for new text: content as it is known to be content; each tool call as one
    delta with its id and name, then one with its arguments (`cut`: the output hit max_tokens)."""
    events = parser.feed(text) + (parser.finish(cut) if finished else [])
    deltas = []
    for event in events:
        if isinstance(event, ContentEvent):
            deltas.append(p.Delta(content=event.text))
            continue
        call = event.call
        head = p.FunctionCallDelta(name=call.name, arguments="")
        deltas.append(
            p.Delta(tool_calls=[p.ToolCallDelta(index=event.index, id=call.id, type="function", function=head)])
        )
        body = p.FunctionCallDelta(arguments=call.arguments)
        deltas.append(p.Delta(tool_calls=[p.ToolCallDelta(index=event.index, function=body)]))
    return deltas


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
            raise HttpError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError()
        body = message.get("body", b"")
        size += len(body)
        if size > MAX_BODY_BYTES:
            raise HttpError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"request body is not valid UTF-8 (byte {exc.start})") from exc
    if not body.strip():
        raise BadInputError("request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadInputError(f"invalid request: {exc}", param=validation_param(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise BadInputError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # msgspec decodes free-form JSON (`Any` fields) recursively
        raise BadInputError("request body nests JSON too deeply; flatten it") from exc


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: LlmcError) -> None:
    status, body = error_response(error)
    headers = _JSON
    if isinstance(error, EngineBusyError):
        headers = [*_JSON, (b"retry-after", str(error.retry_after_s).encode())]
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # response already started or client gone: nothing more can be said
        return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
