"""Acceptance: reproducible builds, damaged artifacts refused with the file named, versions checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.artifacts.manifest import FORMAT_VERSION, MANIFEST_NAME
from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.errors import BadArtifactError
from llmc.kernels.cpu import cpu_kernels


def _build(src: Path, out: Path) -> Path:
    build(BuildOptions(model=str(src), gguf_file=None, weights=None, output=out))
    return out


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_builds_are_byte_identical(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = _build(tiny_llama_dir, tmp_path / "a")
    b = _build(tiny_llama_dir, tmp_path / "b")
    assert _digests(a) == _digests(b)
    kernels = {"kernels/" + cpu_kernels.library_name(isa) for isa in cpu_kernels.buildable()}
    assert set(_digests(a)) == {"manifest.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", *kernels}


def test_flipped_byte_is_refused_naming_the_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    art = _build(tiny_llama_dir, tmp_path / "a")
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BadArtifactError, match=r"model\.safetensors"):
        Artifact.open(art)
    result = subprocess.run(
        [sys.executable, "-m", "llmc", "run", str(art), "--p", "1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 4
    assert "model.safetensors" in result.stderr
    assert "sha256" in result.stderr


def test_missing_file_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    art = _build(tiny_llama_dir, tmp_path / "a")
    (art / "tokenizer.json").unlink()
    with pytest.raises(BadArtifactError, match=r"tokenizer\.json is missing"):
        Artifact.open(art)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, FORMAT_VERSION - 1, 0, str(FORMAT_VERSION), None])
def test_unknown_format_version_is_refused(tiny_llama_dir: Path, tmp_path: Path, version: object) -> None:
    art = _build(tiny_llama_dir, tmp_path / "a")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["format_version"] = version
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BadArtifactError, match=rf"format_version .* this llmc reads format_version {FORMAT_VERSION}"):
        Artifact.open(art)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(BadArtifactError, match=r"manifest\.json is missing"):
        Artifact.open(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(BadArtifactError, match="not valid JSON"):
        Artifact.open(tmp_path)


def test_failed_build_keeps_the_previous_artifact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    art = _build(tiny_llama_dir, tmp_path / "a")
    before = _digests(art)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 96  # no longer matches the weights
    (broken / "config.json").write_text(json.dumps(config))
    from llmc.errors import BadModelError

    with pytest.raises(BadModelError, match="shape"):
        _build(broken, art)
    assert _digests(art) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
