"""Issue 6: property-based fuzzing of every route in /openapi.json: no 5xx, and the server keeps serving."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmc.builder.build import BuildOptions, build
from tests.server import running_server

# Examples per operation: enough to reach every field's edge cases (schemathesis adds its coverage
# phase on top), small enough to finish in seconds against the tiny model.
EXAMPLES = 40


def test_schemathesis_finds_no_server_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed (make install-test installs it)")
    out = tmp_path / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, name="tiny"))
    with running_server(out) as base:
        result = subprocess.run(
            [
                cli,
                "run",
                f"{base}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                "1",
                "--request-timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert " passed" in result.stdout
        ok = {"model": "tiny", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3}
        assert httpx.post(f"{base}/v1/chat/completions", json=ok, timeout=60).status_code == 200
