"""Issue 5, acceptance 3: an artifact copied elsewhere runs in a fresh venv that holds only the
runtime's dependencies (no gguf, no transformers, no builder extras) and downloads nothing.

The venv is made from scratch: pip takes torch's CPU wheel from the machine's wheel folder and
the rest from the package index (about 50 s on 2 cores). The artifact is compiled, so this also
checks that the compiled step loads where neither the builder nor the compiler's inputs exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from llmc.builder.targets.base import CompileOptions
from llmc.runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama
from tests.helpers import build_compiled, generate, open_engine
from tests.server import running_server

REPO = Path(__file__).resolve().parent.parent
# pip in a fresh venv: installing torch's wheel alone takes most of this on 2 cores.
INSTALL_LIMIT_S = 900
PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_LIMIT_S)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_spec = f"torch=={torch.__version__.split('+')[0]}"  # the same torch that compiled the step
    # A copy of the sources: pip builds the wheel in place and must not touch the checkout.
    source = tmp_path_factory.mktemp("llmc-src") / "llmc"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "build", "out", "*.egg-info")
    )
    # The torch extra: the runtime's own dependencies are torch-free, the artifact is a cpu one.
    subprocess.run([*pip, torch_spec, f"{source}[torch]"], check=True, timeout=INSTALL_LIMIT_S)
    return venv


def test_copied_artifact_runs_with_runtime_dependencies_only(
    runtime_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    python = runtime_venv / "bin" / "python"
    for builder_only in ("gguf", "transformers"):
        found = subprocess.run([str(python), "-c", f"import {builder_only}"], capture_output=True)
        assert found.returncode != 0, f"{builder_only} is installed in the runtime-only venv"

    source = make_tiny_llama(tmp_path_factory.mktemp("venv-src") / "llama")
    built = tmp_path_factory.mktemp("venv-artifact") / "tiny"
    build_compiled(source, built, "tiny", CompileOptions(buckets=(1, 2)))
    expected = generate(
        open_engine(built), [PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    )
    copied = tmp_path_factory.mktemp("elsewhere") / "tiny"
    shutil.copytree(built, copied)
    shutil.rmtree(source)  # nothing may point back at the build's inputs

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "NO_PROXY": "*",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    log = tmp_path_factory.mktemp("venv-log") / "run.log"
    launcher = [str(runtime_venv / "bin" / "llmc"), "--log-level", "INFO"]
    with running_server(copied, launcher=launcher, log=log, env=env) as base:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        text = open_engine(built).tokenizer.decode(expected[0])
        assert reply["choices"][0]["text"] == text
        assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    logged = log.read_text()
    assert "compiled.loaded" in logged, logged  # the compiled step ran there, not an eager fallback
    assert json.loads((copied / "manifest.json").read_text())["targets"]["cpu"]["compiled"]
