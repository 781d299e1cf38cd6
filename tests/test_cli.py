"""The CLI's contract for CI pipelines: JSON on stdout, exit codes by error kind."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

from llmc.errors import EXIT_CODES, ErrorKind
from llmc.kernels import cpu_kernels


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _llmc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc", *args], capture_output=True, text=True, timeout=300)


def test_build_json_and_inspect(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = _llmc("build", "--m", str(tiny_llama_dir), "-o", str(tmp_path / "a"), "--json", "--name", "tiny")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["model_name"] == "tiny" and summary["dtype"] == "f32"
    compiled = {"compiled/decode_cpu.pt2", "compiled/decode_cpu.constants.safetensors"}  # the default --compile
    kernels = set() if cpu_kernels.unsupported() else {"kernels/" + cpu_kernels.LIBRARY_NAME}
    assert set(summary["files"]) == {"model.safetensors", "tokenizer.json", "chat_template.jinja", *compiled, *kernels}
    assert summary["compiled"][0]["kind"] == "decode" and summary["compile_seconds"] > 0
    inspected = _llmc("inspect", str(tmp_path / "a"), "--json", "--verify")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["model"]["num_layers"] == 2 and info["parameters"] == summary["parameters"]
    if kernels:
        assert info["cpu_kernels"] == {
            "file": next(iter(kernels)),
            "torch_version": torch_version(),
            "isa": "avx512_vnni",
        }
    text = _llmc("inspect", str(tmp_path / "a"))
    assert "model_name: tiny" in text.stdout
    # the digest deployments pin (llmc run --expect-manifest-sha256): the manifest's bytes as stored
    digest = hashlib.sha256((tmp_path / "a" / "manifest.json").read_bytes()).hexdigest()
    assert summary["manifest_sha256"] == info["manifest_sha256"] == digest
    assert f"manifest_sha256: {digest}" in text.stdout


def test_build_errors_have_kind_exit_codes(tmp_path: Path) -> None:
    missing = _llmc("build", "--m", str(tmp_path / "nope"), "-o", str(tmp_path / "a"), "--json")
    assert missing.returncode == EXIT_CODES[ErrorKind.BAD_INPUT]
    assert json.loads(missing.stdout)["error"]["kind"] == "bad_input"
    (tmp_path / "empty").mkdir()
    no_config = _llmc("build", "--m", str(tmp_path / "empty"), "-o", str(tmp_path / "a"))
    assert no_config.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "config.json" in no_config.stderr and no_config.stderr.count("\n") == 1
    nothing = _llmc("build", "-o", str(tmp_path / "a"))
    assert nothing.returncode == EXIT_CODES[ErrorKind.BAD_INPUT]


def test_unsupported_architecture_lists_supported(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    result = _llmc("build", "--m", str(src), "-o", str(tmp_path / "a"))
    assert result.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "LlamaForCausalLM" in result.stderr


def test_uncached_hub_id_names_the_id(tmp_path: Path) -> None:
    env_result = subprocess.run(
        [sys.executable, "-m", "llmc", "build", "--m", "nobody-here/no-such-model", "-o", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert env_result.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "nobody-here/no-such-model" in env_result.stderr


def test_cached_hub_id_builds_offline(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A Hugging Face id already in the cache builds with the network switched off."""
    import os
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmc",
            "build",
            "--m",
            "someone/tiny-llama",
            "-o",
            str(tmp_path / "a"),
            "--json",
            "--no-compile",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model_name"] == "someone/tiny-llama"


def test_run_on_a_taken_port_fails_before_loading(tmp_path: Path) -> None:
    with socket.socket() as holder:
        # Another server, bound as Granian binds (SO_REUSEPORT): a second one could share the port.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _llmc("run", str(tmp_path / "not-loaded"), "--p", str(port))
    assert result.returncode == EXIT_CODES[ErrorKind.OUT_OF_RESOURCES], result.stderr
    assert f"could not serve on 127.0.0.1:{port}" in result.stderr and "choose another --p" in result.stderr
