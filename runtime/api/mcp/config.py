"""The `mcp.json` of `llmc run --mcp-config`: read and check it before anything starts.

The config is the common `{"mcpServers": {name: {...}}}` form: a stdio server has `command`
(with optional `args`, `env`, `cwd`), a streamable-HTTP server has `url` (with optional `headers`).
A mistake is a BadInputError naming the server and the field, raised before the model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import BadInputError

# An mcp.json names a few servers: a few KB. Read no more than this (the file may be a device or huge).
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] | None = None


def load_config(path: str | Path, cwd: str | None = None) -> list[ServerSpec]:
    """Read and check an mcp.json; a mistake is a BadInputError naming the server and field.

    A stdio server runs in its "cwd", resolved against `cwd` (default: the current directory).
    """
    where = f"--mcp-config {path}"
    try:
        with open(path, "rb") as file:  # read at most one byte past the cap: /dev/zero has no size
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise BadInputError(f"{where}: over {MAX_CONFIG_BYTES} bytes; is it an mcp.json?")
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise BadInputError(f"{where}: cannot read the file: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser recurses
        raise BadInputError(f"{where}: not valid JSON: {exc or 'nested too deeply'}") from exc
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise BadInputError(f'{where}: expected {{"mcpServers": {{name: {{"command": ...}} or {{"url": ...}}}}}}')
    specs = []
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise BadInputError(f"{where}: server {name!r} must be an object")
        if entry.get("disabled") is True:
            continue
        kind = entry.get("type", entry.get("transport"))
        if kind == "sse":
            raise BadInputError(f"{where}: server {name!r}: SSE servers are not supported; use streamable HTTP")
        command, url = entry.get("command"), entry.get("url")
        if (command is None) == (url is None):
            raise BadInputError(f'{where}: server {name!r} needs exactly one of "command" (stdio) and "url" (HTTP)')
        if command is not None and (not isinstance(command, str) or not command):
            raise BadInputError(f'{where}: server {name!r}: "command" must be a non-empty string')
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise BadInputError(f'{where}: server {name!r}: "url" must be an http:// or https:// URL')
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise BadInputError(f'{where}: server {name!r}: "args" must be a list of strings')
        env, headers = entry.get("env"), entry.get("headers")
        for key, value in (("env", env), ("headers", headers)):
            if value is not None and (
                not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values())
            ):
                raise BadInputError(f'{where}: server {name!r}: "{key}" must map names to strings')
        server_cwd = entry.get("cwd")
        if server_cwd is not None and not isinstance(server_cwd, str):
            raise BadInputError(f'{where}: server {name!r}: "cwd" must be a string')
        if cwd is not None and url is None:
            server_cwd = str(Path(cwd, server_cwd or "."))
        specs.append(
            ServerSpec(name=name, command=command, args=tuple(args), env=env, cwd=server_cwd, url=url, headers=headers)
        )
    return specs


def check_sdk() -> None:
    """The MCP SDK is an optional dependency: say how to get it."""
    try:
        import mcp  # noqa: F401
    except ImportError as exc:
        raise BadInputError("--mcp-config needs the MCP SDK: pip install 'llmc[mcp]'") from exc
