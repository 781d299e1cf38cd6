"""Compiling and shipping llmc's CPU kernels: a machine without a working C++ compiler still builds."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llmc.builder.build import BuildOptions, build
from llmc.errors import InternalError
from llmc.kernels.cpu import cpu_kernels


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
    assert result.manifest.kernels_for("cpu") is None
    assert not (tmp_path / "a" / "kernels").exists()


def test_no_cpu_kernels_leaves_them_out(tiny_llama_dir: Path, tmp_path: Path) -> None:
    options = BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "a")
    result = build(BuildOptions(**{**options.__dict__, "cpu_kernels": False}))
    assert result.manifest.kernels_for("cpu") is None
    assert result.manifest.build.flags["cpu_kernels"] is False


def _fake_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[bytes]:
    """Make cached_library "compile" instantly (a counter's bytes) into a cache under tmp_path."""
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_cache_key", lambda: "key")
    built: list[bytes] = []

    def fake_build(output: Path, tmp: Path) -> None:
        built.append(f"library {len(built)}".encode())
        output.write_bytes(built[-1])

    monkeypatch.setattr(cpu_kernels, "_build", fake_build)
    return built


def test_the_kernel_cache_is_reused_only_when_it_matches_its_digest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built = _fake_compiler(monkeypatch, tmp_path)
    cached = tmp_path / "cache" / "cpu_kernels" / "key" / cpu_kernels.LIBRARY_NAME
    assert cpu_kernels.cached_library() == b"library 0"
    assert cpu_kernels.cached_library() == b"library 0" and len(built) == 1  # reused
    assert (cached.parent.stat().st_mode & 0o777) == 0o700
    cached.write_bytes(b"tampered")  # e.g. a process that wrote into the cache
    assert cpu_kernels.cached_library() == b"library 1"  # not reused: compiled again
    assert cached.read_bytes() == b"library 1"
    cached.with_name(cached.name + ".sha256").unlink()  # a library without its digest is not trusted either
    assert cpu_kernels.cached_library() == b"library 2"


def test_a_kernel_cache_others_can_write_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_compiler(monkeypatch, tmp_path)
    folder = tmp_path / "cache" / "cpu_kernels" / "key"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(InternalError, match="writable by others"):
        cpu_kernels.cached_library()


def test_the_library_is_loaded_from_the_bytes_given(cpu_kernels_loaded: None) -> None:
    """load_bytes maps a sealed in-memory copy: nothing on disk can change what was checked."""
    [(digest, path)] = cpu_kernels._loaded.items()
    assert path.startswith("/proc/self/fd/") or "llmc-kernels-" in path
    with open(path, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == digest
    if path.startswith("/proc/self/fd/"):
        fd = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(PermissionError):
                os.write(fd, b"patched")  # sealed against writes
        finally:
            os.close(fd)
