"""The native quantizers (native_quant.cpp): the torch codecs' bytes, tens of times faster.

quant/kquants.py and quant/legacy.py stay the reference: native_quant.cpp is the same algorithms as
scalar C++ in the same float32 operation order, so `quantize` gives the very bytes the torch codec
gives (tests/quant/test_native_quant.py checks all ten formats, and against llama.cpp).

The library is a plain C ABI (no torch headers: it compiles in about two seconds), compiled at
first use on the build host and kept in a cache like the CPU kernels' (private to the user, 0700,
reused only when it matches the sha256 recorded beside it when it was compiled, written
atomically), keyed on the source, the flags, the compiler and the CPU. It is loaded from the
checked bytes through a sealed memfd, never from a file that could change after the check. Where no
compiler works, `quantize` logs one warning and runs the torch codecs: the bytes are the same,
only slower.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

from llmc import user_cache
from llmc.errors import InternalError
from llmc.logs import get_logger
from llmc.quant.formats import FORMATS

log = get_logger("llmc.quant")

SOURCE = Path(__file__).with_name("native_quant.cpp")
LIBRARY_NAME = "llmc_native_quant.so"
ABI_VERSION = 1  # llmc_quant_abi_version() of native_quant.cpp: a library reporting another is refused
# -march=native: the library only ever runs on the host that compiled it (the cache key holds the
# CPU's flags), never in an artifact. -ffp-contract=off: a fused multiply-add rounds once where the
# reference rounds twice, which changes bytes; for the same reason never -ffast-math (it also
# reorders the ordered sums). -fno-math-errno only drops errno writes (sqrt of a negative).
_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-pthread",
    "-w",
)
# Compiling takes ~2 s here; a compiler stuck far beyond that is broken.
_COMPILE_TIMEOUT_S = 120
_DETAIL_CHARS = 2000  # of the compiler's messages kept in the warning: the last ones say what failed
# The input dtypes the library reads directly (the codes of native_quant.cpp's InputType).
_INPUTS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_kept_fds: list[int] = []  # the loaded library's memfd, open for the process's life (the loader maps it)


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _cache_dir() -> Path:
    return user_cache.cache_root() / "native_quant"


def _cpu_identity() -> str:
    """What -march=native compiles for: the machine and its CPU flags (a cache shared between hosts
    must not hand one CPU's library to another)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_key() -> str:
    version = subprocess.run(
        [*_compiler(), "--version"],
        capture_output=True,
        text=True,
        errors="replace",
        check=True,
        timeout=_COMPILE_TIMEOUT_S,
    ).stdout
    digest = hashlib.sha256(repr((_compiler(), _FLAGS, version, _cpu_identity())).encode())
    digest.update(SOURCE.read_bytes())
    return digest.hexdigest()[:32]


def library_bytes() -> bytes:
    """The compiled library, from the cache or compiled now; InternalError when that fails."""
    try:
        cached = _cache_dir() / _cache_key() / LIBRARY_NAME
        user_cache.private_dir(cached.parent, "the quantizer cache")
        data = user_cache.read_verified(cached, "quant.native_cache_mismatch")
        if data is None:
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                built = Path(tmp) / LIBRARY_NAME
                log.info("quant.native_compiling", compiler=_compiler())
                subprocess.run(
                    [*_compiler(), *_FLAGS, str(SOURCE), "-o", str(built)],
                    capture_output=True,
                    text=True,
                    errors="replace",
                    check=True,
                    timeout=_COMPILE_TIMEOUT_S,
                )
                data = built.read_bytes()
            # The library first, then its digest: a reader that sees the digest sees the library.
            user_cache.write_verified(cached, data)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise InternalError(f"compiling llmc's native quantizer failed: {detail.strip()[-_DETAIL_CHARS:]}") from exc
    return data


def _load(data: bytes) -> ctypes.CDLL:
    """Load the library from exactly these bytes: a sealed memfd on Linux, else a fresh 0700 folder."""
    if hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS"):
        fd = os.memfd_create(LIBRARY_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        _kept_fds.append(fd)
        path = f"/proc/self/fd/{fd}"
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="llmc-quant-"), LIBRARY_NAME)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o500)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    lib = ctypes.CDLL(path)  # a CDLL call releases the GIL: a progress thread keeps drawing meanwhile
    lib.llmc_quant_abi_version.restype = ctypes.c_int
    lib.llmc_quant_abi_version.argtypes = []
    if lib.llmc_quant_abi_version() != ABI_VERSION:
        raise InternalError("the cached native quantizer is another llmc's; remove the quantizer cache")
    lib.llmc_quantize.restype = ctypes.c_int
    lib.llmc_quantize.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native quantizer, or None (after one warning) where it cannot be built or loaded."""
    try:
        return _load(library_bytes())
    except (InternalError, OSError, AttributeError) as exc:
        log.warning("quant.native_unavailable", reason=str(exc)[-_DETAIL_CHARS:], fallback="torch codecs")
        return None


def quantize(name: str, weight: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """float [rows, cols] → uint8 [rows, row_bytes(cols)] in format `name`: the bytes of
    FORMATS[name].quantize, on `threads` threads (torch's intra-op count by default)."""
    fmt = FORMATS[name]
    assert weight.dim() == 2 and fmt.fits(weight.shape[1]), (name, tuple(weight.shape))
    lib = library()
    if lib is None:
        return fmt.quantize(weight)
    w = weight.detach().cpu()
    if w.dtype not in _INPUTS:
        w = w.float()
    w = w.contiguous()
    rows, cols = w.shape
    out = torch.empty(rows, fmt.row_bytes(cols), dtype=torch.uint8)
    n_blocks = rows * (cols // fmt.block_size)
    if n_blocks:
        count = threads if threads is not None else torch.get_num_threads()
        rc = lib.llmc_quantize(fmt.ggml_type, _INPUTS[w.dtype], w.data_ptr(), n_blocks, out.data_ptr(), count)
        if rc != 0:
            raise InternalError(f"the native quantizer refused {name} on {w.dtype} input (code {rc})")
    return out
