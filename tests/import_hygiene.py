"""Which of the repository's top-level folders a Python process could import as top-level packages.

The repository root is the package `llmc`; its folders import only as `llmc.*`. Where the root is
on sys.path, `import kernels` finds llmc's kernels/ instead of Hugging Face's package (which
transformers imports), and every test that touches transformers fails in odd ways.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# llmc's top-level folders whose names are also common top-level packages.
SHADOWING_NAMES = ("kernels", "runtime", "builder", "artifacts", "benchmarks", "model")


def shadowed_names() -> dict[str, str]:
    """Each top-level name that resolves into this repository, with where it resolves to."""
    found: dict[str, str] = {}
    for name in SHADOWING_NAMES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin is None:
            spec = importlib.util.find_spec(name)
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            origin = spec.origin if spec is not None and spec.origin else (locations[0] if locations else None)
        if origin is not None and Path(origin).resolve().is_relative_to(REPO_ROOT / name):
            found[name] = origin
    return found


def main() -> None:
    """Print the shadowed names as `name=path` lines (for a child process's check)."""
    for name, origin in shadowed_names().items():
        print(f"{name}={origin}")


if __name__ == "__main__":
    main()
