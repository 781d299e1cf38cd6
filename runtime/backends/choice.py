"""Which backend `llmc run` serves an artifact with (`--backend auto|cpu|onnx`).

`auto` takes what the artifact carries and this install can run (docs/decisions/lean-runtime.md
has the measurements behind the order): the onnx target where torch is not installed or the
artifact has no cpu target, else torch's cpu backend.
"""

from __future__ import annotations

import importlib

from llmc.artifacts.manifest import Manifest

BACKEND_CHOICES = ("auto", "cpu", "onnx")


def _importable(module: str) -> bool:
    """Whether `module` imports: a found but broken package (a half-removed torch) counts as absent.
    Called only where the artifact could run on both backends, whose torch side imports it anyway."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def choose_backend(manifest: Manifest, requested: str) -> tuple[str, str]:
    """(backend name, why): the one asked for, or for `auto` the best this host can run."""
    if requested != "auto":
        return requested, "--backend"
    graph = manifest.targets.get("onnx")
    has_graph = graph is not None and graph.graph is not None
    if has_graph and "cpu" not in manifest.targets:
        return "onnx", "the artifact was built for the onnx target only"
    if has_graph and not _importable("torch"):
        return "onnx", "torch is not installed (the lean install)"
    # Without torch (and without a graph) the cpu backend's make_backend says what to install.
    return "cpu", "the artifact's cpu target"


def files_unread(manifest: Manifest, backend: str) -> set[str]:
    """The artifact's files a backend never opens (another target's code; the torch weights on
    onnx), which `llmc run` therefore does not spend its start-up hashing."""
    graph_files: set[str] = set()
    torch_files = {t.file for t in manifest.tensors}
    for name, code in manifest.targets.items():
        if code.graph is not None:
            graph_files |= {code.graph.model, code.graph.weights, code.graph.mapping}
        if name != "onnx":
            torch_files |= {file for step in code.compiled for file in step.files()}
            torch_files |= {library.file for library in code.kernels}
    return torch_files if backend == "onnx" else graph_files
