"""`llmc run`: verify the artifact, load the engine, serve the OpenAI API from Granian."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from llmc.errors import BadInputError, OutOfResourcesError
from llmc.logs import configure, get_logger, granian_logging

if TYPE_CHECKING:
    from llmc.artifacts.reader import Artifact
    from llmc.runtime.api.vision.config import VisionConfig
    from llmc.runtime.engine import Engine

log = get_logger("llmc.server")

# How long shutdown waits for in-flight responses to close before the process exits anyway. By
# then the engine has ended every request (drain), so responses only have their last bytes to send.
_HTTP_STOP_TIMEOUT_S = 10.0
# After the first SIGTERM/SIGINT, how long running requests may keep generating before they are
# ended with an error event: a typical answer finishes well within it, and process managers
# (systemd, Kubernetes) wait 30 s before they SIGKILL.
SHUTDOWN_TIMEOUT_S = 20.0
# A client must send its request headers within this after connecting, or the connection is closed
# (Granian's default is 30 s): real clients send them at once; a slowloris holds sockets with them.
HEADER_TIMEOUT_S = 10.0
# Connections Granian serves at once (its semaphore is held per connection, idle keep-alive
# included) and the kernel's queue of connections not yet accepted. Granian's defaults (128 each)
# let 257 half-open sockets lock every client out; an idle connection costs a few KB, so allow many.
MAX_CONNECTIONS = 4096
LISTEN_BACKLOG = 4096


class ServeConfig(msgspec.Struct, kw_only=True):
    artifact: str
    host: str = "127.0.0.1"
    port: int = 2000
    served_model_name: str | None = None
    max_model_len: int | None = None
    kv_cache_mb: int = 1024
    kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    prefill_chunk_size: int = 512
    enable_prefix_cache: bool = True
    seed: int | None = None
    threads: int | None = None
    eager: bool = False  # ignore the artifact's compiled steps
    backend: str = "auto"  # runtime/backends/choice.py
    dense_weights: bool | None = None  # dense copies of quantized weights; None: where measured faster
    autotune: bool = True  # measure the weight forms on this host; False (`--no-autotune`): defaults
    kv_huge_pages: bool = False  # 2 MiB pages for the KV cache (`--kv-huge-pages`)
    kv_prefault: bool = True  # fault the KV cache in at start, in the background (`--no-kv-prefault`)
    log_level: str = "INFO"
    api_key: str | None = None
    tool_parser: str = "auto"
    ui_server: bool = False  # serve the chat page at /ui
    mcp_config: str | None = None  # an mcp.json: its servers' tools are offered to the model
    expect_manifest_sha256: str | None = None  # serve only the artifact whose manifest has this digest
    unauthenticated_mcp: bool = False  # allow --mcp-config without --api-key
    allowed_hosts: list[str] | None = None  # Host header names besides the defaults (http_guard)
    cors_origins: list[str] | None = None  # web origins that may call the API from a browser
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S
    header_timeout: float = HEADER_TIMEOUT_S
    body_timeout: float | None = None  # None: http_guard.BODY_TIMEOUT_S
    # Admission control and request bounds (docs/user-guide.md); None: the defaults in
    # runtime/engine.py (DEFAULT_MAX_WAITING) and runtime/api/requests.py (RequestLimits).
    max_waiting: int | None = None
    max_request_chars: int | None = None
    request_timeout: float | None = None  # seconds a request may spend in the engine; None: no limit
    prefix_cache_isolation: str = "shared"  # "key": requests share cached blocks only with the same API key
    # Sampling defaults over the artifact's (requests still override them): a generation config
    # (inline JSON or a file), then the single flags, which win over it.
    generation_config: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    # Proxy vision (runtime/api/vision): image parts are described by this OpenAI-compatible
    # vision endpoint and rewritten into text; None: image parts are refused with a 400.
    vision_proxy: str | None = None
    vision_proxy_model: str | None = None
    vision_proxy_prompt: str | None = None
    vision_proxy_format: str | None = None
    vision_proxy_fallback: str = "error"  # error: 502 when a caption fails; text: a note instead
    vision_proxy_timeout: float | None = None
    vision_proxy_api_key: str | None = None
    vision_allow_remote: bool = False  # fetch http(s) image URLs (public addresses only)


def vision_settings(config: ServeConfig) -> VisionConfig | None:
    """The checked --vision-proxy settings (BadInputError, exit 2, before the model loads)."""
    from llmc.runtime.api.vision.config import vision_config

    if config.vision_proxy is None:
        given = [
            flag
            for flag, value in (
                ("--vision-proxy-model", config.vision_proxy_model),
                ("--vision-proxy-prompt", config.vision_proxy_prompt),
                ("--vision-proxy-format", config.vision_proxy_format),
                ("--vision-proxy-timeout", config.vision_proxy_timeout),
                ("--vision-proxy-api-key", config.vision_proxy_api_key),
                ("--vision-proxy-fallback", None if config.vision_proxy_fallback == "error" else "text"),
                ("--vision-allow-remote", True if config.vision_allow_remote else None),
            )
            if value is not None
        ]
        if given:
            raise BadInputError(f"{', '.join(given)} need --vision-proxy URL (the caption endpoint)")
        return None
    return vision_config(
        config.vision_proxy,
        model=config.vision_proxy_model,
        prompt=config.vision_proxy_prompt,
        format=config.vision_proxy_format,
        fallback=config.vision_proxy_fallback,
        allow_remote=config.vision_allow_remote,
        timeout_s=config.vision_proxy_timeout,
        api_key=config.vision_proxy_api_key,
    )


def generation_overrides(config: ServeConfig) -> dict[str, Any]:
    """`llmc run`'s sampling defaults, validated (BadInputError, exit 2, before the model loads)."""
    from llmc.artifacts import generation

    overrides = generation.load_arg(config.generation_config) if config.generation_config is not None else {}
    flags = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}
    flags |= {"min_p": config.min_p, "max_tokens": config.max_tokens}
    return overrides | generation.parse(flags, "llmc run", strict=True)


def _engine(artifact: Artifact, config: ServeConfig, backend: str, overrides: dict[str, Any]) -> Engine:
    """The engine `llmc run`'s flags describe, on `backend`."""
    from llmc.runtime.engine import DEFAULT_MAX_WAITING, Engine, EngineConfig

    return Engine(
        artifact,
        EngineConfig(
            max_model_len=config.max_model_len,
            kv_cache_mb=config.kv_cache_mb,
            kv_blocks=config.kv_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.prefill_chunk_size,
            enable_prefix_cache=config.enable_prefix_cache,
            seed=config.seed,
            threads=config.threads,
            compiled=not config.eager,
            device=backend,
            dense_weights=config.dense_weights,
            autotune=config.autotune,
            kv_huge_pages=config.kv_huge_pages,
            kv_prefault=config.kv_prefault,
            max_waiting=config.max_waiting if config.max_waiting is not None else DEFAULT_MAX_WAITING,
            generation_overrides=overrides,
        ),
    )


def serve(config: ServeConfig) -> None:
    """Load the engine while the artifact's files are verified (nothing serves from a damaged
    artifact; native code is loaded from bytes checked as they are read), serve until SIGINT/SIGTERM.

    The first signal drains: new requests get 503, running ones finish (or are ended with an error
    event after `shutdown_timeout`), then the process exits; a second signal exits at once.

    One process, two threads: the model runs on the main thread, because torch's OpenMP-parallel
    CPU kernels run 2-3x slower when their parallel regions open from any other thread; HTTP is an
    embedded Granian on a second thread with its own asyncio loop. The API hands requests to the
    engine through its queue and gets outputs back with call_soon_threadsafe.
    """
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    from llmc.artifacts.reader import Artifact
    from llmc.runtime.api.app import App
    from llmc.runtime.api.chat_plan import MAX_TOOLS
    from llmc.runtime.api.http_guard import BODY_TIMEOUT_S, HttpGuard
    from llmc.runtime.api.mcp.config import check_sdk, load_config
    from llmc.runtime.api.mcp.tools import McpManager
    from llmc.runtime.backends.choice import choose_backend, files_unread

    configure(config.log_level)
    check_port_free(config.host, config.port)  # before the model loads: fail fast
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "server.not_loopback",
            host=config.host,
            advice="put a reverse proxy (TLS, rate limits, client timeouts) in front of llmc",
        )
    if config.api_key is not None and not any(key.strip() for key in config.api_key.split(",")):
        # App drops blank keys, which would leave the server (and its MCP tools) open to everyone.
        raise BadInputError("--api-key holds no key, only blanks or commas; give one or several keys, comma-separated")
    mcp_config = None
    if config.mcp_config is not None:  # a bad config fails before the model loads
        check_sdk()
        mcp_config = load_config(config.mcp_config, os.getcwd())
        if config.api_key is None and not config.unauthenticated_mcp:
            raise BadInputError(
                "--mcp-config lets every client that reaches the port make this server run the MCP tools "
                "(read files, fetch URLs, whatever they do); protect it with --api-key KEY, or pass "
                "--unauthenticated-mcp if every client that can reach the port may run them"
            )
    overrides = generation_overrides(config)
    vision = vision_settings(config)
    artifact = Artifact.open(config.artifact, verify=False, expect_manifest_sha256=config.expect_manifest_sha256)
    backend, why = choose_backend(artifact.manifest, config.backend)
    log.info("server.backend", backend=backend, reason=why)
    with artifact.verifying(skip=files_unread(artifact.manifest, backend)):
        engine = _engine(artifact, config, backend, overrides)
    mcp = None
    if mcp_config is not None:
        mcp = McpManager(mcp_config, max_tools=MAX_TOOLS)
        mcp.start()
        atexit.register(mcp.close)
    app = App(
        engine,
        config.served_model_name,
        api_key=config.api_key,
        tool_parser=config.tool_parser,
        ui=config.ui_server,
        mcp=mcp,
        guard=HttpGuard(
            config.host,
            config.allowed_hosts,
            config.cors_origins,
            BODY_TIMEOUT_S if config.body_timeout is None else config.body_timeout,
        ),
        max_request_chars=config.max_request_chars,
        request_timeout_s=config.request_timeout,
        prefix_cache_isolation=config.prefix_cache_isolation,
        vision=vision,
    )
    granian_level, granian_config = granian_logging(config.log_level)
    http = _HttpThread(
        Server(
            app,
            address=config.host,
            port=config.port,
            interface=Interfaces.ASGI,
            log_access=False,
            log_level=granian_level,  # type: ignore[arg-type]
            log_dictconfig=granian_config,  # its lines in llmc's format, on stderr
            http=HTTPModes.http1,  # OpenAI clients speak HTTP/1.1; the header timeout is HTTP/1's
            http1_settings=HTTP1Settings(header_read_timeout=int(config.header_timeout * 1000)),
            backlog=LISTEN_BACKLOG,
            backpressure=MAX_CONNECTIONS,
        ),
        on_exit=engine.stop,
    )
    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # the operator insists: no more waiting
            log.warning("server.exit_now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("server.draining", signal=signal.Signals(signum).name, timeout_s=config.shutdown_timeout)
        app.draining = True
        engine.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def on_listening() -> None:
        log.info("server.ready", host=config.host, port=config.port, model=engine.model_name)
        if logging.getLevelName(config.log_level.upper()) > logging.INFO:
            return  # -q / --log-level warning: a quiet server prints nothing of its own
        # A closed stdout or a gone pipe (`llmc run ... | head`) must not stop the server.
        with contextlib.suppress(OSError):
            print("\n".join(startup_lines(config.host, config.port, config.ui_server)), flush=True)

    http.on_listening(on_listening)
    log.info("server.generation_defaults", **msgspec.structs.asdict(engine.generation_defaults))
    http.start()
    try:
        engine.run()
        if app.draining:
            started = time.monotonic()
            clean = engine.drain(config.shutdown_timeout)
            log.info("server.drained", clean=clean, seconds=round(time.monotonic() - started, 3))
    finally:
        http.stop()
    if http.error is not None:
        reason = (str(http.error).splitlines() or [type(http.error).__name__])[0]  # not Rust's backtrace
        raise OutOfResourcesError(
            f"could not serve on {config.host}:{config.port}: {reason}; choose another --p or --h"
        )


# Bind addresses that mean "every interface": no client can connect to them as such.
_ALL_INTERFACES = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def startup_lines(host: str, port: int, ui: bool) -> list[str]:
    """What `llmc run` prints on stdout once it listens: where to point a client (and a browser).

    A server bound to every interface gets a loopback URL that works on this machine, and a note
    that other machines reach it by this machine's address."""
    shown = _ALL_INTERFACES.get(host, host)
    name = f"[{shown}]" if ":" in shown else shown  # an IPv6 literal in a URL is bracketed
    base = f"http://{name}:{port}"
    lines = [f"API:  {base}/v1"]
    if ui:
        lines.append(f"Chat: {base}/ui")
    if host in _ALL_INTERFACES:
        bound = f"{host or '0.0.0.0'}:{port}"
        lines.append(f"Listening on all interfaces ({bound}): other machines use this machine's address")
    return lines


def check_port_free(host: str, port: int) -> None:
    """Raise OutOfResourcesError if something listens on host:port already.

    Granian binds with SO_REUSEPORT, so a second server on a taken port would share it silently
    and clients would reach either model at random; a plain bind (SO_REUSEADDR only, which still
    fails on a listening socket) finds the owner. The probe closes before Granian binds.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OutOfResourcesError(
                f"could not serve on {host}:{port}: {exc.strerror or exc}; choose another --p or --h"
            ) from exc


class _HttpThread:
    """Granian's embedded server on a thread with its own event loop; `on_exit` runs if it ends."""

    def __init__(self, server: Any, on_exit: Callable[[], None]) -> None:
        self._server = server
        self._on_exit = on_exit
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="llmc-http", daemon=True)
        self.error: BaseException | None = None

    def on_listening(self, hook: Callable[[], None]) -> None:
        """Call `hook` once the socket is bound (Granian's startup hooks run after binding)."""
        self._server.on_startup(hook)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._server.serve())
        except BaseException as exc:  # e.g. the port is taken: reported by serve() in the main thread
            self.error = exc
        finally:
            self._on_exit()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._server.stop)
            self._thread.join(timeout=_HTTP_STOP_TIMEOUT_S)
