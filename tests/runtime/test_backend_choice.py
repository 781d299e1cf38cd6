"""`llmc run --backend auto` (runtime/backends/choice.py): which backend serves which artifact on
which install."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")

from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.runtime.backends import choice
from llmc.runtime.backends.choice import choose_backend


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("choice")
    out = {}
    for targets in ("cpu", "onnx", "cpu,onnx"):
        out[targets] = root / targets.replace(",", "_")
        build(
            BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out[targets], target=targets)
        )
    return out


@pytest.mark.parametrize(
    ("targets", "torch_installed", "expected"),
    [
        ("cpu", True, "cpu"),
        ("cpu,onnx", True, "cpu"),  # torch is the faster path where it is installed (docs/decisions)
        ("onnx", True, "onnx"),  # nothing else to run
        ("cpu,onnx", False, "onnx"),  # the lean install
        ("onnx", False, "onnx"),
        ("cpu", False, "cpu"),  # make_backend then says to install llmc[torch]
    ],
)
def test_auto(
    artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch, targets: str, torch_installed: bool, expected: str
) -> None:
    monkeypatch.setattr(choice, "_installed", lambda module: torch_installed or module != "torch")
    backend, why = choose_backend(Artifact.open(artifacts[targets], verify=False).manifest, "auto")
    assert backend == expected and why


def test_an_explicit_backend_is_taken_as_given(artifacts: dict[str, Path]) -> None:
    manifest = Artifact.open(artifacts["cpu"], verify=False).manifest
    assert choose_backend(manifest, "onnx") == ("onnx", "--backend")
