"""The ASGI application: OpenAI-compatible routes over the engine, served by Granian.

Every request is decoded and validated here; bad input becomes an OpenAI-style 4xx and never
reaches the engine. Streaming responses are Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from llmc.errors import BadInputError, InternalError, LlmcError
from llmc.logs import get_logger
from llmc.runtime.api import protocol as p
from llmc.runtime.api.errors import HttpError, error_response
from llmc.runtime.api.requests import chat_messages, completion_prompt, sampling_params, validation_param
from llmc.runtime.engine import Engine
from llmc.runtime.output_processor import RequestOutput

log = get_logger("llmc.api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# A request body above this is refused with 413: even a full 128k-token chat is a few MB of JSON.
MAX_BODY_BYTES = 8 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class ClientGoneError(Exception):
    """The client disconnected; the request is aborted and its resources freed."""


class App:
    def __init__(self, engine: Engine, served_model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.created = int(time.time())
        gen = engine.generation_defaults
        self.defaults = {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k}
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
        }
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
        try:
            if handler is None:
                if any(route_path == path for _, route_path in self._routes):
                    raise HttpError(405, f"method {scope['method']} is not allowed on {path}")
                raise HttpError(404, f"no route {path}", code="not_found")
            await handler(scope, receive, send)
        except LlmcError as exc:
            await _send_error(send, exc)
        except ClientGoneError:
            pass
        except Exception as exc:  # a bug in a handler must not take the server down
            log.exception("api.handler_failed", path=path, error=type(exc).__name__)
            await _send_error(send, InternalError("internal server error; see the server log"))

    # ---- routes --------------------------------------------------------------------------
    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, b'{"status":"ok"}')

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        card = p.ModelCard(
            id=self.model_name, created=self.created, owned_by="llmc", max_model_len=self.engine.max_model_len
        )
        await _send_json(send, 200, msgspec.json.encode(p.ModelList(data=[card])))

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _decode(self._chat_decoder, await _read_body(scope, receive))
        self._check_model(req.model)
        messages = chat_messages(req)
        prompt = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.engine.tokenizer.encode(prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, ids, max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = self._submit(request_id, ids, params, receive)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(delta: p.Delta, finish: str | None = None, usage: p.Usage | None = None) -> bytes:
                choices = [] if usage is not None else [p.ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
                return msgspec.json.encode(
                    p.ChatCompletionChunk(
                        id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
                    )
                )

            async def events() -> AsyncIterator[bytes]:
                yield chunk(p.Delta(role="assistant", content=""))
                async for out in outputs:
                    if out.text:
                        yield chunk(p.Delta(content=out.text))
                    if out.finished:
                        yield chunk(p.Delta(), finish=out.finish_reason)
                        if include_usage:
                            yield chunk(p.Delta(), usage=_usage(out))

            await self._stream(send, request_id, events())
            return
        text, last = await _collect(outputs)
        body = p.ChatCompletion(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[
                p.ChatChoice(index=0, message=p.ResponseMessage("assistant", text), finish_reason=last.finish_reason)
            ],
            usage=_usage(last),
        )
        await _send_json(send, 200, msgspec.json.encode(body))

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _decode(self._completion_decoder, await _read_body(scope, receive))
        self._check_model(req.model)
        ids = completion_prompt(req, self.engine.tokenizer)
        # OpenAI's legacy completions default to 16 tokens.
        params = self._params(req, ids, req.max_tokens if req.max_tokens is not None else 16)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = self._submit(request_id, ids, params, receive)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(text: str, finish: str | None = None, usage: p.Usage | None = None) -> bytes:
                choices = [] if usage is not None else [p.CompletionChoice(index=0, text=text, finish_reason=finish)]
                return msgspec.json.encode(
                    p.Completion(id=request_id, created=created, model=self.model_name, choices=choices, usage=usage)
                )

            async def events() -> AsyncIterator[bytes]:
                async for out in outputs:
                    if out.text or out.finished:
                        yield chunk(out.text, out.finish_reason)
                    if out.finished and include_usage:
                        yield chunk("", usage=_usage(out))

            await self._stream(send, request_id, events())
            return
        text, last = await _collect(outputs)
        body = p.Completion(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[p.CompletionChoice(index=0, text=text, finish_reason=last.finish_reason)],
            usage=_usage(last),
        )
        await _send_json(send, 200, msgspec.json.encode(body))

    # ---- helpers ---------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise HttpError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _params(self, req: Any, ids: list[int], max_tokens: int | None) -> Any:
        params = sampling_params(
            req,
            self.defaults,
            max(1, self.engine.max_model_len - len(ids)),
            max_tokens,
            self.engine.tokenizer.vocab_size,
        )
        self.engine.check_length(len(ids), params.max_tokens)
        return params

    def _submit(self, request_id: str, ids: list[int], params: Any, receive: Receive) -> AsyncIterator[RequestOutput]:
        """Submit to the engine; iterate its outputs; abort in the engine if the client goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:  # runs on the engine thread
            # RuntimeError: the event loop is closed because the server is shutting down.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, out)

        self.engine.submit(request_id, ids, params, sink)
        log.info("api.request", request_id=request_id, prompt_tokens=len(ids), max_tokens=params.max_tokens)
        started = time.perf_counter()

        async def iterate() -> AsyncIterator[RequestOutput]:
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            finished = False
            try:
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        raise ClientGoneError()
                    out = getter.result()
                    if out.finish_reason == "error":
                        finished = True
                        raise InternalError(out.error or "generation failed")
                    yield out
                    if out.finished:
                        finished = True
                        log.info(
                            "api.done",
                            request_id=request_id,
                            completion_tokens=out.completion_tokens,
                            finish_reason=out.finish_reason,
                            seconds=round(time.perf_counter() - started, 3),
                        )
                        return
            finally:
                watcher.cancel()
                if not finished:
                    self.engine.abort(request_id)
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


async def _collect(outputs: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    parts: list[str] = []
    last: RequestOutput | None = None
    async for out in outputs:
        parts.append(out.text)
        last = out
    assert last is not None and last.finished
    return "".join(parts), last


def _usage(out: RequestOutput) -> p.Usage:
    return p.Usage(out.prompt_tokens, out.completion_tokens, out.prompt_tokens + out.completion_tokens)


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


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: LlmcError) -> None:
    status, body = error_response(error)
    try:
        await _send_json(send, status, body)
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
