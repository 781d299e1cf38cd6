"""llmc's own C++ CPU kernels (kernels/cpu/*.cpp): compiled by the builder, shipped in the artifact,
loaded by the runtime.

They are compiled where the artifact is built, like the AOTInductor packages, and against the
same torch: the runtime needs no compiler. A build keeps the compiled library in a cache keyed on
the source, torch and the compiler, so that building again (the tests build many artifacts)
costs a copy; the cache is private to the user (0700) and a cached library is reused only when
it matches the sha256 recorded beside it when it was compiled. A library is loaded from bytes in
memory (`load_bytes`), never from a file that could change after it was checked. Loading
registers torch ops for the whole process (`torch.ops.llmc.*`), so a process holds one version of
them: a second, different library is refused, and the caller runs without it.

The kernels are compiled once per instruction set (ISAS: AVX-512 VNNI, AVX-VNNI, AVX2 on x86-64;
NEON with dot products on aarch64) and linked with the torch ops around them, which have no
ISA-specific code and are compiled once (kernels_api.h), against torch's stable ABI
(torch_stable.h, torch 2.10 and later): ATen's C++ headers took ~5 s to parse, the stable ones ~1 s,
and the first library stands before anything a build traces. Each library registers the same op
names, so that a compiled package calls whichever was loaded. An artifact carries all of those of its build host's
architecture; `choose` picks the best one the host runs (`host_isas`, from the CPU's flags), or
the one $LLMC_CPU_ISA names. The aarch64 kernels are correctness-tested under qemu-user
(tests/kernels/cpu/test_arm_neon.py); building and loading them on an aarch64 host is untested.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc import user_cache
from llmc.errors import BadInputError, InternalError
from llmc.logs import get_logger

log = get_logger("llmc.kernels")

# The torch ops (one translation unit including qmatmul.cpp and paged_attention_cpu.cpp),
# compiled without any ISA's flags; and the kernels they call, compiled with each ISA's.
OPS_SOURCE = Path(__file__).with_name("torch_ops.cpp")
KERNELS_SOURCE = Path(__file__).with_name("kernels_isa.cpp")
SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))  # every source either includes
# The sources' per-ISA inner loops and shared declarations (part of the cache key).
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))


@dataclass(frozen=True)
class Isa:
    """One instruction set the kernels are compiled for: the compiler's flags for it (they choose
    the sources' inner loops), the architecture it belongs to (a compiler for that architecture
    builds it, a host of it runs it) and the CPU flags (Linux /proc/cpuinfo names) a host needs to
    run it, checked before loading: an illegal instruction would kill the process."""

    name: str
    compiler_flags: tuple[str, ...]
    cpu_flags: frozenset[str]
    description: str
    arch: str = "x86_64"


# Best first: `choose` takes the first the host runs. AVX-512 VNNI does 64 byte products per
# instruction, AVX-VNNI 32 (`vpdpbusd` on 256 bits), AVX2 32 in two instructions (docs/BENCHMARKS.md).
ISAS = (
    Isa(
        "avx512_vnni",
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"),
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"}),
        "AVX-512 with VNNI",
    ),
    Isa(
        "avx_vnni",
        ("-mavx2", "-mfma", "-mf16c", "-mavxvnni"),
        frozenset({"avx2", "fma", "f16c", "avx_vnni"}),
        "AVX2 with AVX-VNNI",
    ),
    Isa("avx2", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"}), "AVX2 with FMA and F16C"),
    # ARMv8.2-A's `sdot` (Linux calls it asimddp): Graviton 2+, Ampere Altra, Apple M1+, Cortex-A55+.
    Isa(
        "neon_dotprod",
        ("-march=armv8.2-a+dotprod",),
        frozenset({"asimd", "asimddp"}),
        "ARM64 NEON with the dot-product extension",
        arch="aarch64",
    ),
)
ISA_NAMES = tuple(isa.name for isa in ISAS)
_BY_NAME = {isa.name: isa for isa in ISAS}
ISA_ENV = "LLMC_CPU_ISA"  # names the ISA to use instead of the best one (tests, benchmarks)
# platform.machine() → the `arch` of the ISAS that compile and run there
_ARCHES = {
    **dict.fromkeys(("x86_64", "amd64", "i686", "i386"), "x86_64"),
    **dict.fromkeys(("aarch64", "arm64"), "aarch64"),
}
_CPUINFO = Path("/proc/cpuinfo")
# Compiling a source takes ~8 s here; a compiler stuck far beyond that is broken.
_COMPILE_TIMEOUT_S = 300

_loaded: dict[str, tuple[str, str]] = {}  # the one library this process has loaded: sha256 → (ISA, path)
_kept_fds: list[int] = []  # memfds of loaded libraries, open for the process's life (see _sealed_copy)
# The ops a library must register, with their schemas: a library of another llmc is refused.
OPS = {
    "qmatmul": "llmc::qmatmul(Tensor x, Tensor weight, Tensor scales, int bits) -> Tensor",
    "paged_decode_attention": "llmc::paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
    "Tensor block_tables, Tensor context_lens, int block_size, float scale, int window) -> Tensor",
    "half_matmul": "llmc::half_matmul(Tensor x, Tensor weight) -> Tensor",
    "rms_norm": "llmc::rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
}
_COMPILER_ADVICE = "install a C++20 compiler (g++ or clang++) or name one in $CXX, or build with --no-cpu-kernels"
_DETAIL_CHARS = 2000  # of the compiler's messages kept in the error: the last ones say what failed


def library_name(isa: str) -> str:
    """The file name of the library compiled for `isa`."""
    return f"llmc_cpu_kernels.{isa}.so"


def _host_arch() -> str | None:
    return _ARCHES.get(platform.machine().lower())


def host_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo names: "flags" on x86, "Features" on ARM);
    elsewhere what torch can tell. Tests replace this function to play other CPUs."""
    try:
        for line in _CPUINFO.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    flags: set[str] = set()
    if torch.cpu._is_avx2_supported():
        flags |= _BY_NAME["avx2"].cpu_flags
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if torch.cpu._is_avx512_supported() and vnni is not None and vnni():
        flags |= _BY_NAME["avx512_vnni"].cpu_flags
    return frozenset(flags)


# The flag prefixes of the instruction sets beyond AVX2 (AVX-512's and AMX's families).
_BEYOND_AVX2_PREFIXES = ("avx512", "amx")


def effective_cpu_flags() -> frozenset[str]:
    """The CPU flags llmc plans with: the host's, less AVX-512 and AMX where $LLMC_CPU_ISA forces
    an ISA below AVX-512, so that a forced AVX2 run on an AVX-512 machine also plans like an
    AVX2-only host (no native bf16 matmuls, for one)."""
    flags = host_cpu_flags()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced in _BY_NAME and not any(flag.startswith(_BEYOND_AVX2_PREFIXES) for flag in _BY_NAME[forced].cpu_flags):
        flags = frozenset(f for f in flags if not f.startswith(_BEYOND_AVX2_PREFIXES))
    return flags


def host_isas() -> list[str]:
    """The ISAs of ISAS this machine runs, best first."""
    arch = _host_arch()
    if arch is None:
        return []
    flags = host_cpu_flags()
    return [isa.name for isa in ISAS if isa.arch == arch and isa.cpu_flags <= flags]


def choose(available: Iterable[str]) -> tuple[str | None, str]:
    """The ISA to load among `available` (the libraries at hand), and why: $LLMC_CPU_ISA's if set
    (BadInputError when it is unknown or this CPU lacks it), else the best one this CPU runs; None
    when there is none."""
    offered = set(available)
    runs = host_isas()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced:
        if forced not in _BY_NAME:
            raise BadInputError(f"${ISA_ENV}={forced!r} is not an ISA llmc knows; use one of {', '.join(ISA_NAMES)}")
        if forced not in runs:
            raise BadInputError(
                f"${ISA_ENV}={forced} needs {_BY_NAME[forced].description}, which this CPU lacks; "
                f"it runs {', '.join(runs) or 'none of them'}: unset ${ISA_ENV} or name one of those"
            )
        if forced not in offered:
            return None, f"${ISA_ENV}={forced}, and there is no library for it"
        return forced, f"${ISA_ENV}={forced}"
    for name in runs:
        if name in offered:
            return name, "the best of the libraries at hand that this CPU runs"
    offers = ", ".join(sorted(offered)) or "the kernel libraries"
    return None, f"this CPU runs none of {offers} (it runs: {', '.join(runs) or 'none'})"


def unsupported(isa: str | None = None) -> str | None:
    """Why this CPU cannot run the kernels compiled for `isa` (by default: for any ISA), or None when it can."""
    runs = host_isas()
    if isa is None:
        return None if runs else f"this CPU runs none of llmc's kernel ISAs ({', '.join(ISA_NAMES)})"
    if isa not in _BY_NAME:
        return f"{isa!r} is not an ISA this llmc knows ({', '.join(ISA_NAMES)})"
    return None if isa in runs else f"this CPU lacks {isa} ({_BY_NAME[isa].description})"


def buildable() -> list[str]:
    """The ISAs whose libraries can be compiled here: all of ISAS of this machine's architecture
    (whatever this CPU runs: an artifact built on an AVX2 machine carries AVX-512 kernels for its
    deployment hosts). The compiler is the host's own: no cross-compiled library is shipped."""
    arch = _host_arch()
    return [isa.name for isa in ISAS if isa.arch == arch]


def _cache_dir() -> Path:
    return user_cache.cache_root() / "cpu_kernels"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _compile_command(source: Path, output: Path, isa: str) -> list[str]:
    """The compiler's command for one of the sources (OPS_SOURCE, KERNELS_SOURCE) of `isa`'s
    library: only the kernels get the ISA's flags, so the ops' command is the same for every ISA."""
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = _BY_NAME[isa].compiler_flags if source == KERNELS_SOURCE else ()
    command = [*_compiler(), "-O3", "-std=c++20", "-fPIC", "-fopenmp", *flags]
    command += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", "-c", str(source), "-o", str(output)]
    # The library embeds the sources' and torch's headers' paths (`__FILE__` in their checks'
    # messages): mapped to fixed names, so that the same sources and torch installed elsewhere give
    # the same bytes (reproducible artifacts).
    command += [f"-ffile-prefix-map={path}={name}" for path, name in _source_folders()]
    return command + [f"-I{path}" for path in include_paths()]


def _source_folders() -> list[tuple[str, str]]:
    """The folders whose paths the library would embed, with the names that replace them."""
    return [(str(Path(torch.__file__).parent), "torch"), (str(OPS_SOURCE.parent), "llmc/kernels/cpu")]


def _link_command(objects: list[Path], output: Path) -> list[str]:
    from torch.utils.cpp_extension import library_paths

    command = [*_compiler(), "-shared", "-fopenmp", *map(str, objects), "-o", str(output)]
    return command + [f"-L{path}" for path in library_paths()] + ["-ltorch_cpu", "-lc10"]


def _start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")


def _finish(jobs: list[subprocess.Popen[str]]) -> None:
    """Wait for the compilers; CalledProcessError with their messages when one failed. After a
    timeout or a failure no compiler is left running."""
    failures = []
    try:
        for job in jobs:
            _, stderr = job.communicate(timeout=_COMPILE_TIMEOUT_S)
            if job.returncode != 0:
                failures.append(stderr)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    if failures:
        raise subprocess.CalledProcessError(1, _compiler(), stderr="\n".join(failures))


# The torch ops' object file, compiled once per process and linked into every ISA's library
# (the builder compiles the three x86 libraries at once, one thread each): by its command.
_OPS_LOCK = threading.Lock()
_ops_objects: dict[str, Path] = {}


def _ops_object(isa: str) -> Path:
    """The compiled OPS_SOURCE (the first ISA to need it compiles it; the others wait for it)."""
    command = _compile_command(OPS_SOURCE, Path("torch_ops.o"), isa)
    with _OPS_LOCK:
        done = _ops_objects.get(repr(command))
        if done is not None and done.exists():
            return done
        folder = Path(tempfile.mkdtemp(prefix="llmc-torch-ops-"))
        atexit.register(shutil.rmtree, folder, True)
        obj = folder / "torch_ops.o"
        _finish([_start(_compile_command(OPS_SOURCE, obj, isa))])
        _ops_objects[repr(command)] = obj
        return obj


def _build(output: Path, tmp: Path, isa: str) -> None:
    """Compile the ISA's kernels while the torch ops are compiled (or taken from this process's
    earlier build), and link the two."""
    kernels = tmp / "kernels_isa.o"
    job = _start(_compile_command(KERNELS_SOURCE, kernels, isa))
    try:
        ops = _ops_object(isa)
    finally:
        _finish([job])  # a failed ops compile still waits for (or stops) the kernels' compiler
    subprocess.run(
        _link_command([ops, kernels], output), capture_output=True, text=True, check=True, timeout=_COMPILE_TIMEOUT_S
    )


def _cache_key(isa: str) -> str:
    """What the library depends on: the compiler, its command lines (the ISA's flags, torch's
    headers and ABI, the sources' paths, which the library embeds in its error messages), torch,
    the sources and headers and this module."""
    version = subprocess.run(
        [*_compiler(), "--version"],
        capture_output=True,
        text=True,
        errors="replace",
        check=True,
        timeout=_COMPILE_TIMEOUT_S,
    ).stdout
    digest = hashlib.sha256(torch.__version__.encode() + version.encode())
    probe = Path("object.o")
    commands = [_compile_command(source, probe, isa) for source in (OPS_SOURCE, KERNELS_SOURCE)]
    commands.append(_link_command([probe], probe))
    digest.update(repr(commands).encode())
    for source in (*SOURCES, *HEADERS, Path(__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def cached_library(isa: str) -> bytes:
    """The kernels compiled for `isa`, from the cache (checked against the digest recorded when
    they were compiled) or compiled now; InternalError when no C++ compiler works here (the build
    then goes on without them)."""
    name = library_name(isa)
    try:
        cached = _cache_dir() / _cache_key(isa) / name
        user_cache.private_dir(cached.parent, "the CPU kernel cache")
        data = user_cache.read_verified(cached, "cpu_kernels.cache_mismatch")
        if data is None:
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                built = Path(tmp) / name
                log.info("cpu_kernels.compiling", compiler=_compiler(), isa=isa)
                _build(built, Path(tmp), isa)
                data = built.read_bytes()
            # The library first, then its digest: a reader that sees the digest sees the library.
            # Two builds racing write the same bytes; a mismatch at worst costs one more compile.
            user_cache.write_verified(cached, data)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise InternalError(
            f"compiling llmc's CPU kernels failed ({_COMPILER_ADVICE}): {detail.strip()[-_DETAIL_CHARS:]}"
        ) from exc
    return data


def install(library: bytes, dest: Path) -> None:
    """Write a compiled library (from cached_library) to `dest`, e.g. into an artifact."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(library)


def compile_library(dest: Path, isa: str) -> None:
    """The kernels compiled for `isa` (see cached_library), installed at `dest`."""
    install(cached_library(isa), dest)


def load(path: Path, isa: str) -> str | None:
    """Load the kernel library for `isa` at `path` into this process (see load_bytes); why it
    cannot be used, or None."""
    reason = unsupported(isa)
    if reason is not None:
        return reason
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"the library cannot be read ({exc})"
    return load_bytes(data, isa)


def loaded_isa() -> str | None:
    """The ISA of the library this process has loaded, or None."""
    return next((isa for isa, _ in _loaded.values()), None)


def uses_amx() -> bool:
    """Whether the loaded library's quantized matmul takes its biggest problems (32 activation
    rows and more: prefill, big batches) to the CPU's AMX tiles in this process
    (kernels/cpu/qmatmul_amx.h): an AVX-512 library, a CPU with AMX, Linux's grant of the tile
    state, and $LLMC_CPU_AMX not "0"."""
    return loaded_isa() is not None and hasattr(torch.ops.llmc, "qmatmul_amx") and bool(torch.ops.llmc.qmatmul_amx())


def prefetch_cache() -> str | None:
    """Which cache the loaded library's kernels (the quantized and float16 matmuls, the decode
    attention) prefetch into on this CPU: "L2" on AMD, "L1" elsewhere (kernels/cpu/qmatmul_common.h,
    kPrefetchToL2); None without a
    library, or with one built before the choice existed."""
    if loaded_isa() is None or not hasattr(torch.ops.llmc, "qmatmul_prefetch_l2"):
        return None
    return "L2" if torch.ops.llmc.qmatmul_prefetch_l2() else "L1"


def kquant_activations() -> str | None:
    """How the loaded library quantizes the q4k and q6k forms' activations in this process:
    "per 256" (one scale per super-block, the sub-block scales folded in integers: the AVX-512
    library where AMX does not run, and the AVX2 one) or "per group" (16 or 32 inputs: AMX,
    AVX-VNNI, ARM, `$LLMC_CPU_KQUANT_PER_GROUP=1`); None without a library."""
    if loaded_isa() is None:
        return None
    if not hasattr(torch.ops.llmc, "qmatmul_kquant_activation_inputs"):
        return "per group"
    return "per 256" if torch.ops.llmc.qmatmul_kquant_activation_inputs() else "per group"


def loaded_variant() -> str | None:
    """What the loaded kernels run as, for logs and for the keys of measurements made with them:
    the library's ISA, with "+amx" where its matmul uses AMX; None without a library."""
    isa = loaded_isa()
    return None if isa is None else isa + ("+amx" if uses_amx() else "")


def _sealed_copy(data: bytes) -> str:
    """A path that the dynamic loader can open holding exactly `data`, which nobody can change: a
    sealed memfd on Linux; elsewhere a file in a fresh 0700 directory of our own. Kept open (and
    the path unique) for the life of the process: the loader maps it."""
    if hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS"):
        fd = os.memfd_create("llmc_cpu_kernels", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        _kept_fds.append(fd)
        return f"/proc/self/fd/{fd}"
    folder = tempfile.mkdtemp(prefix="llmc-kernels-")  # 0700, ours, never reused
    path = os.path.join(folder, "llmc_cpu_kernels.so")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o500)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def load_bytes(data: bytes, isa: str) -> str | None:
    """Load a kernel library compiled for `isa` into this process from these bytes (the ones the
    caller verified, not a file that could change after the check); return why it cannot be used,
    or None."""
    reason = unsupported(isa)
    if reason is not None:
        return reason
    digest = hashlib.sha256(data).hexdigest()
    if _loaded:
        return None if digest in _loaded else "another version of llmc's CPU kernels is already loaded"
    try:
        path = _sealed_copy(data)
        # What torch.ops.load_library does, minus its realpath(), which turns a memfd's
        # /proc/self/fd path into a name the loader cannot open.
        ctypes.CDLL(path)
    except OSError as exc:
        return f"the library does not load here ({exc})"
    for name, schema in OPS.items():
        try:
            found = str(getattr(torch.ops.llmc, name).default._schema)
        except (AttributeError, RuntimeError):
            found = None
        if found != schema:
            return f"the library is not this llmc's: its op {name} is {found or 'missing'}"
    _register_fakes()
    _loaded[digest] = (isa, path)
    log.info(
        "cpu_kernels.loaded",
        sha256=digest,
        isa=isa,
        amx=uses_amx(),
        prefetch=prefetch_cache(),
        kquant_activations=kquant_activations(),
    )
    return None


def _register_fakes() -> None:
    """Shapes of the ops for torch.export (the builder traces with fake tensors)."""

    @torch.library.register_fake("llmc::qmatmul")
    def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], weight.shape[0] * scales.shape[-1]), dtype=torch.float32)

    @torch.library.register_fake("llmc::paged_decode_attention")
    def _(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[2]))

    @torch.library.register_fake("llmc::half_matmul")
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("llmc::rms_norm")
    def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
