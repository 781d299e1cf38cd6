"""A tiny MCP server for tests: `add` (logs each call to $MCP_TEST_LOG), `crash` (kills itself), `slow`.

Run as a stdio server (`python mcp_server.py`) or over streamable HTTP (`python mcp_server.py --http PORT`).
"""

from __future__ import annotations

import json
import os
import sys
import time

try:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP
except ModuleNotFoundError:  # mcp 2.x renamed FastMCP to MCPServer
    from mcp.server.mcpserver import MCPServer as FastMCP

http_port = int(sys.argv[sys.argv.index("--http") + 1]) if "--http" in sys.argv else None
try:
    server = FastMCP("llmc-test", host="127.0.0.1", port=http_port or 8000)  # mcp 1.x: HTTP settings here
except TypeError:
    server = FastMCP("llmc-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    log = os.environ.get("MCP_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"a": a, "b": b, "pid": os.getpid()}) + "\n")
    return a + b


@server.tool()
def crash() -> str:
    """Crash the server."""
    os._exit(3)


@server.tool()
def slow(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "done"


if __name__ == "__main__":
    if http_port is None:
        server.run()
    else:
        try:
            server.run("streamable-http", host="127.0.0.1", port=http_port)  # type: ignore[call-arg]
        except TypeError:
            server.run("streamable-http")
