"""The route handlers: decode and check a request, run it through the engine client, render the reply.

Every request is decoded and validated here; bad input becomes an OpenAI-style 4xx and never
reaches the engine. Streaming responses are Server-Sent Events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

import msgspec

from llmc.errors import BadInputError
from llmc.runtime.api import protocol as p
from llmc.runtime.api.chat_plan import ChatPlan
from llmc.runtime.api.engine_client import EngineClient, UsageCounter, collect, usage_of
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.http import Receive, Scope, Send, decode, read_body, send_json, stream
from llmc.runtime.api.mcp.loop import chat_with_mcp
from llmc.runtime.api.metrics import CONTENT_TYPE, Metrics
from llmc.runtime.api.render import Renderer, deltas, joined_logprobs, tool_call_out
from llmc.runtime.api.requests import check_messages_cap, check_text_cap, check_token_ids_cap, completion_prompt
from llmc.runtime.api.vision.proxy import refuse_images, with_caption_tokens
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.tool_calls import ToolCallParser
from llmc.runtime.tool_calls.base import parse_all

if TYPE_CHECKING:
    from llmc.runtime.api.mcp.tools import McpManager
    from llmc.runtime.api.ui import UiAssets
    from llmc.runtime.api.vision.proxy import VisionProxy

# GET /v1/models/{id}: served ids may hold '/' (owner/name), so everything after the prefix is the id.
MODEL_PATH_PREFIX = "/v1/models/"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for (legacy) /v1/completions


class Routes:
    """The handlers of one served model; App routes each request to one of them."""

    def __init__(
        self,
        client: EngineClient,
        render: Renderer,
        metrics: Metrics,
        openapi: bytes,
        mcp: McpManager | None = None,
        ui: UiAssets | None = None,
        vision: VisionProxy | None = None,
    ) -> None:
        self.client = client
        self.vision = vision
        self.render = render
        self.metrics = metrics
        self.mcp = mcp
        self.model_name = render.model_name
        self.created = int(time.time())
        self._openapi = openapi
        self._ui = ui
        self._tokenize_decoder = msgspec.json.Decoder(p.TokenizeRequest)
        self._detokenize_decoder = msgspec.json.Decoder(p.DetokenizeRequest)
        self._chat_decoder = msgspec.json.Decoder(p.ChatCompletionRequest)
        self._completion_decoder = msgspec.json.Decoder(p.CompletionRequest)

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.client.draining:  # load balancers stop sending work here
            await send_json(send, 503, b'{"status":"draining"}')
            return
        await send_json(send, 200, b'{"status":"ok"}')

    async def openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self._openapi)

    async def ui_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._ui is not None  # routed only when the UI is on
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
        req = decode(self._tokenize_decoder, await read_body(scope, receive))
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise BadInputError("send exactly one of `prompt` and `messages`", param="prompt")
        client = self.client
        if req.messages is not None:
            check_messages_cap(req.messages, client.limits)
            chat, _ = await self._describe_images(p.ChatCompletionRequest(model=self.model_name, messages=req.messages))
            _, ids = await client.off_loop(client.prepare_chat, chat, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            check_text_cap(req.prompt, client.limits)
            ids = await client.off_loop(client.tokenizer.encode, req.prompt)
        body = p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=client.engine.max_model_len)
        await send_json(send, 200, msgspec.json.encode(body))

    async def detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = decode(self._detokenize_decoder, await read_body(scope, receive))
        if req.model is not None:
            self._check_model(req.model)
        check_token_ids_cap(req.tokens, self.client.limits, "tokens")
        tokenizer = self.client.tokenizer
        if any(not 0 <= t < tokenizer.vocab_size for t in req.tokens):
            raise BadInputError("tokens holds an id outside the vocabulary", param="tokens")
        text = tokenizer.decode(req.tokens, skip_special_tokens=False)
        await send_json(send, 200, msgspec.json.encode(p.DetokenizeResponse(prompt=text)))

    def _model_card(self) -> p.ModelCard:
        return p.ModelCard(
            id=self.model_name,
            created=self.created,
            owned_by="llmc",
            max_model_len=self.client.engine.max_model_len,
            generation_defaults=self.client.defaults,
            input_modalities=["text", "image"] if self.vision is not None else ["text"],
        )

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, msgspec.json.encode(p.ModelList(data=[self._model_card()])))

    async def model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/models/{id} (the openai SDK's models.retrieve); the id may hold '/' (owner/name)."""
        self._check_model(scope["path"].rstrip("/")[len(MODEL_PATH_PREFIX) :])
        await send_json(send, 200, msgspec.json.encode(self._model_card()))

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise HttpError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _describe_images(self, req: p.ChatCompletionRequest) -> tuple[p.ChatCompletionRequest, int | None]:
        """The chat with its images replaced by captions (--vision-proxy), and the caption tokens the
        endpoint reported; without the proxy, images are a 400 that says how to enable it."""
        if self.vision is None:
            refuse_images(req.messages)
            return req, None
        return await self.vision.rewrite(req)

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = decode(self._chat_decoder, await read_body(scope, receive))
        self._check_model(req.model)
        client = self.client
        check_messages_cap(req.messages, client.limits)
        req, caption_tokens = await self._describe_images(req)
        if self.mcp is not None and self.mcp.tools and req.tools is None and req.n == 1:
            await chat_with_mcp(client, self.render, self.mcp, req, receive, send)
            return
        plan, ids = await client.off_loop(client.prepare_chat, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = [replace(sp, grammar=plan.grammar) for sp in client.params(req, ids, max_tokens)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = client.submit(request_id, ids, params, receive)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._chat_events(plan, params, outputs, request_id, created, include_usage, caption_tokens)
            await stream(send, request_id, events)
            return
        results = await collect(outputs, len(params))
        choices = []
        for index, r in enumerate(results):
            message = p.ResponseMessage("assistant", r.text)
            reason = r.finish_reason
            if plan.tool_format is not None:
                # An unfinished call is never content (tool_calls/base.py): forced, content is null.
                content, calls = parse_all(plan.tool_format, r.text, plan.forced, r.finish_reason == "length")
                if calls:
                    message = p.ResponseMessage("assistant", content or None, [tool_call_out(c) for c in calls])
                    reason = "tool_calls"
                else:
                    message = p.ResponseMessage("assistant", None if plan.forced and not content else content)
            logprobs = self.render.chat_logprobs(r.logprobs) if params[index].logprobs is not None else None
            choices.append(p.ChatChoice(index=index, message=message, finish_reason=reason, logprobs=logprobs))
        usage = with_caption_tokens(usage_of(results), caption_tokens)
        body = p.ChatCompletion(id=request_id, created=created, model=self.model_name, choices=choices, usage=usage)
        await send_json(send, 200, msgspec.json.encode(body))

    async def _chat_events(
        self,
        plan: ChatPlan,
        params: list[SamplingParams],
        outputs: AsyncIterator[tuple[int, RequestOutput]],
        request_id: str,
        created: int,
        include_usage: bool,
        caption_tokens: int | None = None,
    ) -> AsyncIterator[bytes]:
        """A streamed chat's events: a role delta per choice, content and tool-call deltas, finishes."""
        parsers = [ToolCallParser(plan.tool_format, forced=plan.forced) if plan.tool_format else None for _ in params]

        def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> bytes:
            return self.render.chat_chunk(request_id, created, choices, usage)

        for index in range(len(params)):
            yield chunk([p.ChatChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))])
        usage = UsageCounter()
        # Logprobs of tokens whose text the tool-call parser still holds back: sent with the next
        # delta of their choice (or its finish), so that the stream carries every token's, as the
        # non-streamed answer does.
        held: list[list[p.ChatTokenLogprob]] = [[] for _ in params]
        async for index, out in outputs:
            usage.add(out)
            if out.logprobs:
                held[index].extend(self.render.chat_logprobs(out.logprobs).content)
            parser = parsers[index]
            news = (
                deltas(parser, out.text, out.finished, out.finish_reason == "length")
                if parser
                else [p.Delta(content=out.text)]
            )
            for delta in news:
                if delta.content or delta.tool_calls or held[index]:
                    logprobs = p.ChatLogprobs(content=held[index]) if held[index] else None
                    yield chunk([p.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)])
                    held[index] = []
            if out.finished:
                reason = "tool_calls" if parser and parser.calls else out.finish_reason
                logprobs = p.ChatLogprobs(content=held[index]) if held[index] else None
                held[index] = []
                yield chunk([p.ChatChunkChoice(index=index, delta=p.Delta(), finish_reason=reason, logprobs=logprobs)])
        if include_usage:
            yield chunk([], usage=with_caption_tokens(usage.usage(), caption_tokens))

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = decode(self._completion_decoder, await read_body(scope, receive))
        self._check_model(req.model)
        client = self.client
        if isinstance(req.prompt, str):
            check_text_cap(req.prompt, client.limits)
        ids = await client.off_loop(completion_prompt, req, client.tokenizer)
        # OpenAI's default, unless the artifact or `llmc run` set one.
        legacy = None if client.defaults["max_tokens"] is not None else COMPLETION_MAX_TOKENS
        params = client.params(req, ids, req.max_tokens if req.max_tokens is not None else legacy)
        echo = ""
        if req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else client.tokenizer.decode(ids, False)
            params = [replace(sp, prompt_logprobs=sp.logprobs) for sp in params]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = client.submit(request_id, ids, params, receive)
        created = int(time.time())
        wants_logprobs = params[0].logprobs is not None
        render = self.render
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> bytes:
                body = p.Completion(id=request_id, created=created, model=self.model_name, choices=choices, usage=usage)
                return msgspec.json.encode(body)

            async def events() -> AsyncIterator[bytes]:
                usage = UsageCounter()
                offsets = [0] * len(params)
                async for index, out in outputs:
                    usage.add(out)
                    if echo and offsets[index] == 0:
                        prompt_lps = render.echo_logprobs(ids, out.prompt_logprobs) if wants_logprobs else None
                        yield chunk([p.CompletionChoice(index, echo, None, prompt_lps)])
                        offsets[index] = len(echo)
                    if out.text or out.finished or out.logprobs:
                        logprobs = render.completion_logprobs(out.logprobs, offsets[index]) if out.logprobs else None
                        offsets[index] += len(out.text)
                        yield chunk([p.CompletionChoice(index, out.text, out.finish_reason, logprobs)])
                if include_usage:
                    yield chunk([], usage=usage.usage())

            await stream(send, request_id, events())
            return
        results = await collect(outputs, len(params))
        choices = []
        for index, r in enumerate(results):
            logprobs = None
            if wants_logprobs:
                logprobs = render.completion_logprobs(r.logprobs, len(echo))
                if echo:
                    logprobs = joined_logprobs(render.echo_logprobs(ids, r.prompt_logprobs), logprobs)
            choices.append(p.CompletionChoice(index, echo + r.text, r.finish_reason, logprobs))
        body = p.Completion(
            id=request_id, created=created, model=self.model_name, choices=choices, usage=usage_of(results)
        )
        await send_json(send, 200, msgspec.json.encode(body))
