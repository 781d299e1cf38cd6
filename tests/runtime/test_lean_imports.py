"""The serving path imports no torch (issue #26): `pip install llmc[lean]` serves ONNX artifacts on
onnxruntime. Each check runs in a child process where `import torch` fails as it does where torch
is not installed, so a torch import anywhere on the path fails the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.builder.build import BuildOptions, build
from tests.server import free_port

CHILD_TIMEOUT_S = 120  # a cold Python import of llmc (or a server start) on a loaded 2-core CI machine
# What the serving path imports: the CLI, the HTTP app, the engine and its parts.
LEAN_MODULES = (
    "llmc.cli",
    "llmc.runtime.api.app",
    "llmc.runtime.engine",
    "llmc.runtime.sampler",
    "llmc.runtime.backends",
    "llmc.artifacts.reader",
    "llmc.runtime.server",
    "llmc.runtime.backends.onnx",
    "llmc.runtime.backends.choice",
    "llmc.artifacts.inspect",
)
# Put first on sys.path, it hides the real torch: importing it raises what a missing package raises.
_FAKE_TORCH = 'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a child process in which torch cannot be imported."""
    hide = tmp_path_factory.mktemp("no-torch")
    (hide / "torch").mkdir()
    (hide / "torch" / "__init__.py").write_text(_FAKE_TORCH)
    path = [str(hide), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _child(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", *args], env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )


def test_serving_path_imports_no_torch(no_torch_env: dict[str, str]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {LEAN_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    result = _child(no_torch_env, "-c", code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_check_sees_a_torch_import(no_torch_env: dict[str, str]) -> None:
    # The hidden torch really is unimportable in the child: the test above can fail.
    result = _child(no_torch_env, "-c", "import llmc.runtime.runner")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


def test_torch_backend_without_torch_says_what_to_install(no_torch_env: dict[str, str]) -> None:
    code = (
        "from llmc.errors import BadInputError\n"
        "from llmc.runtime.backends import BackendOptions, make_backend\n"
        "try:\n"
        "    make_backend('cpu', BackendOptions())\n"
        "except BadInputError as exc:\n"
        "    print(exc)\n"
    )
    result = _child(no_torch_env, "-c", code)
    assert result.returncode == 0, result.stderr
    assert "pip install 'llmc[torch]'" in result.stdout


def test_llmc_run_of_a_torch_artifact_without_torch_fails_cleanly(
    no_torch_env: dict[str, str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    artifact = tmp_path / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=artifact))
    result = _child(no_torch_env, "-m", "llmc", "run", str(artifact), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr  # BadInputError: the environment lacks an extra
    assert "llmc[torch]" in result.stderr
    assert "Traceback" not in result.stderr


def test_auto_backend_takes_onnx_where_torch_cannot_be_imported(
    no_torch_env: dict[str, str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A torch that is found but does not import (here: hidden) counts as absent."""
    pytest.importorskip("onnx")
    artifact = tmp_path / "both"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=artifact, target="cpu,onnx"))
    code = (
        "from llmc.artifacts.reader import Artifact\n"
        "from llmc.runtime.backends.choice import choose_backend\n"
        f"print(choose_backend(Artifact.open({str(artifact)!r}).manifest, 'auto')[0])\n"
    )
    result = _child(no_torch_env, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "onnx"
