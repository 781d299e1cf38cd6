"""Compiling and shipping llmc's CPU kernels: a machine without a working C++ compiler still builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.builder.build import BuildOptions, build
from llmc.errors import InternalError
from llmc.kernels import cpu_kernels


def test_a_missing_compiler_is_an_internal_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(InternalError, match="compiling llmc's CPU kernels failed"):
        cpu_kernels.cached_library()


def test_without_a_compiler_the_build_goes_on_without_the_kernels(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    result = build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "a"))
    assert result.manifest.cpu_kernels is None
    assert not (tmp_path / "a" / "kernels").exists()


def test_no_cpu_kernels_leaves_them_out(tiny_llama_dir: Path, tmp_path: Path) -> None:
    options = BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "a")
    result = build(BuildOptions(**{**options.__dict__, "cpu_kernels": False}))
    assert result.manifest.cpu_kernels is None
    assert result.manifest.build.flags["cpu_kernels"] is False
