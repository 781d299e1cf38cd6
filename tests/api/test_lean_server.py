"""Issue #26: the lean server. SmolLM2 built for the onnx target (its GGUF's Q4_1/Q8_0 blocks as
MatMulNBits) is served by `llmc run` in a process where `import torch` fails, and passes the same
OpenAI SDK tests as the torch server (tests/api/test_openai_sdk.py, collected here again with this
module's `client`): streaming, stop, seeds, tools, logprobs, structured output."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from openai import OpenAI

from tests.api.test_openai_sdk import *  # noqa: F403 (the SDK tests, run against the lean server)
from tests.api.test_openai_sdk import MODEL
from tests.server import running_server

# Put first on sys.path, it hides the real torch: importing it raises what a missing package raises.
_FAKE_TORCH = 'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'


@pytest.fixture(scope="module")
def lean_artifact(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """SmolLM2 as `make run` builds it, for the onnx target only."""
    from llmc.builder.build import BuildOptions, build

    out = tmp_path_factory.mktemp("lean") / "artifact"
    build(BuildOptions(model=str(smollm2_gguf), gguf_file=None, weights=None, output=out, name=MODEL, target="onnx"))
    return out


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lean-log") / "server.log"


@pytest.fixture(scope="module")
def client(lean_artifact: Path, server_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    hide = tmp_path_factory.mktemp("no-torch")
    (hide / "torch").mkdir()
    (hide / "torch" / "__init__.py").write_text(_FAKE_TORCH)
    path = [str(hide), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with running_server(lean_artifact, "--log-level", "info", "--ui-server", env=env, log=server_log) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        client._llmc_base = base  # type: ignore[attr-defined] (the page and metrics tests below)
        yield client


def test_served_by_onnxruntime_without_torch(client: OpenAI, server_log: Path) -> None:
    log = server_log.read_text()
    assert 'server.backend backend="onnx"' in log, log[-2000:]
    assert 'runtime="onnxruntime' in log  # the engine's ready line
    base = client._llmc_base  # type: ignore[attr-defined]
    metrics = httpx.get(f"{base}/metrics").text
    assert "llmc_generation_tokens_total" in metrics
    page = httpx.get(f"{base}/ui")
    assert page.status_code == 200 and "<html" in page.text.lower()
