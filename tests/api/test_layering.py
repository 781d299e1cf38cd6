"""The API's modules import one way (issue 18): no import cycle, and MCP uses only public names.

Read from the source with `ast`, lazy imports inside functions included: a cycle hidden in a
function-level import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmc.runtime.api

API_ROOT = Path(llmc.runtime.api.__file__).parent
PACKAGE = "llmc.runtime.api"


def _module_name(path: Path) -> str:
    parts = path.relative_to(API_ROOT).with_suffix("").parts
    return ".".join([PACKAGE, *parts]).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every absolute import in the file."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the API package → the API modules it imports."""
    files = {_module_name(path): path for path in API_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for module, imported in _imports(path):
            for candidate in (module, f"{module}.{imported}"):
                if candidate in files and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, [*path, node])
            if cycle is not None:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle is not None:
            return cycle
    return None


def test_the_api_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.app" in graph and f"{PACKAGE}.mcp.loop" in graph  # the walk found the package
    assert find_cycle(graph) is None


def test_find_cycle_sees_one() -> None:
    # The check can fail: the cycle app.py and mcp_loop.py had before issue 18.
    assert find_cycle({"app": {"mcp_loop", "http"}, "mcp_loop": {"app"}, "http": set()}) == ["app", "mcp_loop", "app"]
    assert find_cycle({"app": {"routes"}, "routes": {"mcp"}, "mcp": {"http"}}) is None


def test_mcp_imports_no_private_names_and_not_the_app() -> None:
    for path in (API_ROOT / "mcp").glob("*.py"):
        for module, imported in _imports(path):
            if module.startswith(PACKAGE):
                assert module != f"{PACKAGE}.app", f"{path.name} imports the app"
                assert not (imported or "").startswith("_"), f"{path.name} imports {module}.{imported}"
