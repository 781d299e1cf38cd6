"""The ASGI application: OpenAI-compatible routes over the engine, served by Granian.

App is the front door: it builds the pieces (engine client, renderer, routes), checks each request
with the HTTP guard and the API keys, routes it, and turns whatever a handler raises into an
OpenAI-style error. The handlers are in routes.py, the plumbing in http.py.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

import llmc
from llmc.errors import BadInputError, InternalError, LlmcError
from llmc.logs import get_logger
from llmc.runtime.api.engine_client import EngineClient, key_salt
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.http import ClientGoneError, Receive, Scope, Send, lifespan, send_error
from llmc.runtime.api.http_guard import HttpGuard
from llmc.runtime.api.metrics import Metrics
from llmc.runtime.api.openapi import openapi_spec
from llmc.runtime.api.render import Renderer
from llmc.runtime.api.routes import MODEL_PATH_PREFIX, Routes
from llmc.runtime.engine import Engine
from llmc.runtime.tool_calls import choose_format

if TYPE_CHECKING:
    from llmc.runtime.api.mcp.tools import McpManager
    from llmc.runtime.api.vision.config import VisionConfig

log = get_logger("llmc.api")

PREFIX_CACHE_ISOLATION = ("shared", "key")  # --prefix-cache-isolation: one cache, or one per API key
MODEL_ROUTE = "/v1/models/{id}"  # its label in the request metrics, whatever the id

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class App:
    """The ASGI callable Granian serves: one engine, one served model name."""

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
        vision: VisionConfig | None = None,
    ) -> None:
        self.guard = guard or HttpGuard("127.0.0.1")
        # Several keys may be given, comma-separated: each client (or team) its own.
        self._api_keys = [k.strip().encode() for k in api_key.split(",") if k.strip()] if api_key else []
        self._api_key = self._api_keys[0] if self._api_keys else None
        if prefix_cache_isolation not in PREFIX_CACHE_ISOLATION:
            raise BadInputError(f"--prefix-cache-isolation must be one of {', '.join(PREFIX_CACHE_ISOLATION)}")
        if prefix_cache_isolation == "key" and not self._api_keys:
            raise BadInputError("--prefix-cache-isolation key needs --api-key (one or several keys, comma-separated)")
        self._isolate_by_key = prefix_cache_isolation == "key"
        self.metrics = Metrics(engine.stats)
        tool_format = choose_format(tool_parser, engine.tokenizer.chat_template_source)
        self.client = EngineClient(engine, self.metrics, tool_format, max_request_chars, request_timeout_s)
        self.model_name = served_model_name or engine.model_name
        openapi = msgspec.json.encode(
            openapi_spec(llmc.__version__, auth=api_key is not None, model_name=self.model_name)
        )
        ui_assets = None
        if ui:
            from llmc.runtime.api.ui import UiAssets

            ui_assets = UiAssets()
        vision_proxy = None
        if vision is not None:  # image parts are described by a caption model (--vision-proxy)
            from llmc.runtime.api.vision.proxy import VisionProxy

            vision_proxy = VisionProxy(vision, self.metrics.registry)
        render = Renderer(engine.tokenizer, self.model_name)
        r = Routes(self.client, render, self.metrics, openapi, mcp, ui_assets, vision_proxy)
        self.routes = r
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): r.health,
            ("GET", "/v1/models"): r.models,
            ("POST", "/v1/chat/completions"): r.chat_completions,
            ("POST", "/v1/completions"): r.completions,
            ("POST", "/tokenize"): r.tokenize,
            ("POST", "/detokenize"): r.detokenize,
            ("GET", "/metrics"): r.metrics_route,
            ("GET", "/openapi.json"): r.openapi,
        }
        self._public = {"/health"}  # served without the API key
        if ui:  # the chat page: it asks for the key itself, so it must load without one
            from llmc.runtime.api.ui import ROUTES

            self._routes.update({("GET", path): r.ui_route for path in ROUTES})
            self._routes[("GET", "/")] = r.ui_redirect  # a browser pointed at the server finds the page
            self._public.update([*ROUTES, "/"])

    @property
    def draining(self) -> bool:
        """Set on the first SIGTERM/SIGINT: new requests get 503, /health reports draining."""
        return self.client.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.client.draining = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        handler = self._routes.get((scope["method"], path))
        status = 500
        route = path if any(route_path == path for _, route_path in self._routes) else "unknown"
        if path.startswith(MODEL_PATH_PREFIX):  # GET /v1/models/{id}, the one route with a parameter
            route, handler = MODEL_ROUTE, self.routes.model if scope["method"] == "GET" else None
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
            await send_error(send_recording_status, exc)
        except ClientGoneError:
            status = 499  # nginx's "client closed request"
        except Exception as exc:  # a bug in a handler must not take the server down
            log.exception("api.handler_failed", path=path, error=type(exc).__name__)
            await send_error(send_recording_status, InternalError("internal server error; see the server log"))
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
            key_salt.set("key:" + hashlib.sha256(matched).hexdigest())
