"""`llmc run`: verify the artifact, then serve it from a Granian worker."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import msgspec

from llmc.logs import configure, get_logger

log = get_logger("llmc.server")

_CONFIG_ENV = "LLMC_SERVE_CONFIG"  # how the parent hands its settings to Granian's worker process


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
    log_level: str = "INFO"
    api_key: str | None = None
    tool_parser: str = "auto"
    ui_server: bool = False  # serve the chat page at /ui
    mcp_config: str | None = None  # an mcp.json: its servers' tools are offered to the model
    mcp_cwd: str | None = None  # where stdio MCP servers run: the directory `llmc run` started in


def create_app() -> object:
    """Granian's factory, run inside the worker: load the engine, start its thread, return the app."""
    from llmc.artifacts.reader import Artifact
    from llmc.runtime.api.app import App
    from llmc.runtime.api.chat_plan import MAX_TOOLS
    from llmc.runtime.engine import Engine, EngineConfig
    from llmc.runtime.mcp_tools import McpManager, load_config

    config = msgspec.json.decode(os.environ[_CONFIG_ENV], type=ServeConfig)
    configure(config.log_level)
    artifact = Artifact.open(config.artifact, verify=False)  # the parent verified it before starting us
    engine = Engine(
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
        ),
        build_on_start=True,  # the model is built on the engine thread, which will run it
    )
    engine.start()
    mcp = None
    if config.mcp_config is not None:
        mcp = McpManager(load_config(config.mcp_config, config.mcp_cwd), max_tools=MAX_TOOLS)
        mcp.start()
        atexit.register(mcp.close)
    log.info("server.ready", host=config.host, port=config.port, model=engine.model_name)
    return App(
        engine,
        config.served_model_name,
        api_key=config.api_key,
        tool_parser=config.tool_parser,
        ui=config.ui_server,
        mcp=mcp,
    )


def serve(config: ServeConfig) -> None:
    """Verify checksums here (a damaged artifact never starts a worker), then hand over to Granian."""
    from granian import Granian
    from granian.constants import Interfaces

    from llmc.artifacts.reader import Artifact

    Artifact.open(config.artifact, verify=True)
    config.artifact = str(Path(config.artifact).resolve())
    if config.mcp_config is not None:  # a bad config fails here, not in the worker
        from llmc.runtime.mcp_tools import check_sdk, load_config

        check_sdk()
        load_config(config.mcp_config)
        config.mcp_config = str(Path(config.mcp_config).resolve())
        config.mcp_cwd = os.getcwd()
    # Granian resolves its import target against the working directory and mistakes a directory
    # holding an __init__.py (such as a source checkout of llmc) for a parent package: serve from
    # the artifact's directory, which never holds one.
    os.chdir(config.artifact)
    os.environ[_CONFIG_ENV] = msgspec.json.encode(config).decode()
    Granian(
        "llmc.runtime.server:create_app",
        address=config.host,
        port=config.port,
        interface=Interfaces.ASGI,
        workers=1,
        factory=True,
        log_access=False,
        log_level=config.log_level.lower(),  # type: ignore[arg-type]
    ).serve()
