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
    monkeypatch.setattr(choice, "_importable", lambda module: torch_installed or module != "torch")
    backend, why = choose_backend(Artifact.open(artifacts[targets], verify=False).manifest, "auto")
    assert backend == expected and why


def test_an_explicit_backend_is_taken_as_given(artifacts: dict[str, Path]) -> None:
    manifest = Artifact.open(artifacts["cpu"], verify=False).manifest
    assert choose_backend(manifest, "onnx") == ("onnx", "--backend")


def test_each_backend_skips_only_what_it_never_opens(artifacts: dict[str, Path]) -> None:
    from llmc.runtime.backends.choice import files_unread

    manifest = Artifact.open(artifacts["cpu,onnx"], verify=False).manifest
    graph = {"onnx/model.onnx", "onnx/model.onnx.data", "onnx/mapping.json"}
    torch_side = {t.file for t in manifest.tensors}
    torch_side |= {lib.file for lib in manifest.targets["cpu"].kernels}
    torch_side |= {f for step in manifest.targets["cpu"].compiled for f in step.files()}
    assert files_unread(manifest, "cpu") == graph
    assert files_unread(manifest, "onnx") == torch_side
    assert "tokenizer.json" not in files_unread(manifest, "onnx") | files_unread(manifest, "cpu")


def test_a_damaged_graph_is_refused_by_llmc_run(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """The onnx weights are hashed while onnxruntime loads them: the server never starts, and the
    error names the file (exit code 4)."""
    import shutil
    import subprocess
    import sys

    art = tmp_path / "damaged"
    shutil.copytree(artifacts["onnx"], art)
    data = bytearray((art / "onnx" / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / "onnx" / "model.onnx.data").write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "llmc", "run", str(art), "--p", "1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 4, result.stderr
    assert "onnx/model.onnx.data" in result.stderr and "sha256" in result.stderr


def test_onnx_threads_default_to_every_core_and_follow_the_flag() -> None:
    """onnxruntime-genai runs one thread unless told; llmc's onnx backend takes every core this
    process may use, or `--threads`."""
    import os

    from llmc.runtime.backends import BackendOptions, make_backend

    assert make_backend("onnx", BackendOptions()).describe()["threads"] == len(os.sched_getaffinity(0))
    assert make_backend("onnx", BackendOptions(threads=1)).describe()["threads"] == 1
