"""The user's cache of compiled decode-step packages, so that building a model again, or another
checkpoint of the same architecture, compiles nothing.

An entry is keyed on everything the compiled code depends on and nothing it does not: the model's
configuration, the weights' forms (names, formats, shapes, dtypes; never their values), the
compile options, the CPU capability the code is for, the toolchain (torch, Python, the C++
compiler, Inductor's options), the kernel library the code calls, and llmc's own source files that
decide what is traced (model/, quant/, kernels/, builder/targets/). Keying on these rather than on
the exported graph lets a warm build skip reading the weights back and tracing them (~15 s for
SmolLM2 on 2 cores), which the graph key would need. Any change to llmc's tracing code changes the
key, so a stale package is never reused.

The cache lives under `$LLMC_CACHE_DIR/compiled` (default ~/.cache/llmc), a 0700 directory of the
user's own like the kernel library's cache. Files are written atomically, the entry's index last
with the sha256 of each file; a file is reused only when its bytes match that sha256, otherwise
the build compiles afresh (and says so in a warning). Nothing here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

import msgspec
import torch

import llmc
from llmc import user_cache
from llmc.artifacts.manifest import ModelSpec, TensorInfo
from llmc.errors import InternalError
from llmc.logs import get_logger

log = get_logger("llmc.builder.compile")

_INDEX = "index.json"
# Bump when the layout of an entry or the meaning of the key changes: old entries are then ignored.
_SCHEMA = 1
# An entry's index lists a few files with their sha256: anything longer is not one of ours.
_MAX_INDEX_BYTES = 1 << 20
# llmc's folders whose code decides the traced graph or the generated code.
_SOURCE_DIRS = ("model", "quant", "kernels", "builder/targets")
_SOURCE_SUFFIXES = (".py", ".cpp", ".h")
# Environment variables that change what torch traces or how Inductor compiles; not where
# Inductor keeps its own cache, which changes nothing in a package (no debug paths: cpu.py).
_ENV_PREFIXES = ("ATEN_", "TORCHINDUCTOR_", "TORCH_COMPILE", "AOT_INDUCTOR_", "LLMC_CPU")
_ENV_IGNORED = ("TORCHINDUCTOR_CACHE_DIR",)


def cache_dir() -> Path:
    """Where compiled packages are kept (a function, so that tests can point it elsewhere)."""
    return user_cache.cache_root() / "compiled"


def _sources_digest() -> str:
    root = Path(llmc.__file__).parent
    digest = hashlib.sha256()
    for folder in _SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in _SOURCE_SUFFIXES and path.is_file():
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _compiler_version() -> str:
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    compiler = get_cpp_compiler()
    return f"{compiler} {get_compiler_version_info(compiler)}"


def cache_key(
    spec: ModelSpec,
    tensors: Iterable[TensorInfo],
    dtype: torch.dtype,
    options: dict[str, object],
    capability: str,
    inductor_configs: dict[str, object],
    kernels_sha256: str | None,
) -> str:
    """The key of the packages compiled for `capability` from these inputs (see the module doc)."""
    description = {
        "schema": _SCHEMA,
        "spec": msgspec.to_builtins(spec),
        "tensors": sorted((t.name, t.dtype, list(t.shape), t.quant) for t in tensors),
        "dtype": str(dtype),
        "options": options,
        "capability": capability,
        "inductor": {name: repr(value) for name, value in sorted(inductor_configs.items())},
        "kernels": kernels_sha256,
        "torch": torch.__version__,
        "python": sys.version,
        "compiler": _compiler_version(),
        "sources": _sources_digest(),
        "env": sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) and k not in _ENV_IGNORED),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:40]


def load(key: str) -> tuple[dict[str, object], dict[str, bytes]] | None:
    """The entry stored under `key`: its metadata and its files' bytes (by name), each checked
    against the sha256 the index recorded; None when there is no such entry or it does not check."""
    entry = cache_dir() / key
    try:
        status = entry.stat()
        if status.st_uid != os.getuid() or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("compile_cache.unusable", entry=str(entry), reason="writable by others or not yours")
            return None
        with open(entry / _INDEX, "rb") as fh:
            raw = fh.read(_MAX_INDEX_BYTES + 1)
    except OSError:
        return None
    try:
        if len(raw) > _MAX_INDEX_BYTES:
            raise ValueError("index too large")
        index = json.loads(raw)
        files: dict[str, bytes] = {}
        for name, digest in index["files"].items():
            if "/" in name or name.startswith(".") or name == _INDEX:
                raise ValueError(f"bad file name {name!r}")
            data = (entry / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"{name} does not match its sha256")
            files[name] = data
        meta = index["meta"]
        if not isinstance(meta, dict):
            raise ValueError("bad metadata")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        log.warning("compile_cache.unusable", entry=str(entry), reason=str(exc))
        return None
    return meta, files


def store(key: str, meta: dict[str, object], files: dict[str, bytes]) -> None:
    """Keep these files under `key`: each written atomically, the index (with their sha256) last,
    so that a reader sees a whole entry or none. A failure to write only costs the next build a
    compile, so it is logged, not raised."""
    entry = cache_dir() / key
    try:
        user_cache.private_dir(entry, "the compile cache")
        for name, data in files.items():
            user_cache.write_atomically(entry / name, data)
        index = {"meta": meta, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        user_cache.write_atomically(entry / _INDEX, json.dumps(index, sort_keys=True).encode())
    except (OSError, InternalError) as exc:
        log.warning("compile_cache.not_stored", entry=str(entry), reason=str(exc))
