"""Compiling and shipping llmc's CPU kernels: a machine without a working C++ compiler still builds."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import cast

import pytest

from llmc.artifacts.writer import ArtifactWriter
from llmc.builder.build import BuildOptions, build
from llmc.errors import BadInputError, InternalError
from llmc.kernels.cpu import cpu_kernels


def test_a_missing_compiler_is_an_internal_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(InternalError, match="compiling llmc's CPU kernels failed"):
        cpu_kernels.cached_library("avx2")


def test_without_a_compiler_the_build_goes_on_without_the_kernels(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    result = build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "a"))
    assert result.manifest.kernels_for("cpu") == []
    assert not (tmp_path / "a" / "kernels").exists()


def test_no_cpu_kernels_leaves_them_out(tiny_llama_dir: Path, tmp_path: Path) -> None:
    options = BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "a")
    result = build(BuildOptions(**{**options.__dict__, "cpu_kernels": False}))
    assert result.manifest.kernels_for("cpu") == []
    assert result.manifest.build.flags["cpu_kernels"] is False


def _fake_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[bytes]:
    """Make cached_library "compile" instantly (a counter's bytes) into a cache under tmp_path."""
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_cache_key", lambda isa: "key")
    built: list[bytes] = []

    def fake_build(output: Path, tmp: Path, isa: str) -> None:
        built.append(f"library {len(built)}".encode())
        output.write_bytes(built[-1])

    monkeypatch.setattr(cpu_kernels, "_build", fake_build)
    return built


def test_the_kernel_cache_is_reused_only_when_it_matches_its_digest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built = _fake_compiler(monkeypatch, tmp_path)
    cached = tmp_path / "cache" / "cpu_kernels" / "key" / cpu_kernels.library_name("avx2")
    assert cpu_kernels.cached_library("avx2") == b"library 0"
    assert cpu_kernels.cached_library("avx2") == b"library 0" and len(built) == 1  # reused
    assert (cached.parent.stat().st_mode & 0o777) == 0o700
    cached.write_bytes(b"tampered")  # e.g. a process that wrote into the cache
    assert cpu_kernels.cached_library("avx2") == b"library 1"  # not reused: compiled again
    assert cached.read_bytes() == b"library 1"
    cached.with_name(cached.name + ".sha256").unlink()  # a library without its digest is not trusted either
    assert cpu_kernels.cached_library("avx2") == b"library 2"


def test_a_kernel_cache_others_can_write_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_compiler(monkeypatch, tmp_path)
    folder = tmp_path / "cache" / "cpu_kernels" / "key"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(InternalError, match="writable by others"):
        cpu_kernels.cached_library("avx2")


def test_the_library_is_loaded_from_the_bytes_given(cpu_kernels_loaded: None) -> None:
    """load_bytes maps a sealed in-memory copy: nothing on disk can change what was checked."""
    [(digest, (_, path))] = cpu_kernels._loaded.items()
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


def _cpu_vendor() -> str | None:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return None


def test_the_weights_are_prefetched_into_l2_on_amd_and_l1_elsewhere(cpu_kernels_loaded: None) -> None:
    """The library's own reading of the CPU (cpuid) agrees with the kernel's vendor in
    /proc/cpuinfo, and says so where logs and the engine's description can show it."""
    expected = "L2" if _cpu_vendor() == "AuthenticAMD" else "L1"
    assert cpu_kernels.prefetch_cache() == expected


# /proc/cpuinfo flags of three kinds of x86 host
AVX2_HOST = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX_VNNI_HOST = AVX2_HOST | {"avx_vnni"}
AVX512_HOST = AVX_VNNI_HOST | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.fixture
def x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(cpu_kernels.ISA_ENV, raising=False)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX512_HOST, ["avx512_vnni", "avx_vnni", "avx2"]),
        (AVX512_HOST - {"avx_vnni"}, ["avx512_vnni", "avx2"]),  # e.g. Ice Lake: AVX-512 VNNI, no AVX-VNNI
        (AVX_VNNI_HOST, ["avx_vnni", "avx2"]),
        (AVX2_HOST, ["avx2"]),
        (AVX2_HOST - {"f16c"}, []),
        (frozenset(), []),
    ],
)
def test_the_host_isas_follow_the_cpu_flags(
    x86: None, monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], expected: list[str]
) -> None:
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: flags)
    assert cpu_kernels.host_isas() == expected
    chosen, _ = cpu_kernels.choose(cpu_kernels.ISA_NAMES)
    assert chosen == (expected[0] if expected else None)


def test_the_dispatcher_never_picks_an_isa_the_host_lacks(x86: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: AVX2_HOST)
    chosen, why = cpu_kernels.choose(["avx512_vnni", "avx2"])
    assert (chosen, why) == ("avx2", "the best of the libraries at hand that this CPU runs")
    chosen, why = cpu_kernels.choose(["avx512_vnni", "avx_vnni"])
    assert chosen is None and "runs none of avx512_vnni, avx_vnni" in why
    assert cpu_kernels.unsupported("avx512_vnni") == "this CPU lacks avx512_vnni (AVX-512 with VNNI)"
    # and refuses to load such a library before it could execute an illegal instruction
    assert cpu_kernels.load_bytes(b"not loaded", "avx512_vnni") == "this CPU lacks avx512_vnni (AVX-512 with VNNI)"


def test_llmc_cpu_isa_forces_a_lower_isa_and_refuses_one_the_host_lacks(
    x86: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: AVX_VNNI_HOST)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "AVX2")
    assert cpu_kernels.choose(cpu_kernels.ISA_NAMES) == ("avx2", "$LLMC_CPU_ISA=avx2")
    assert cpu_kernels.choose(["avx_vnni"]) == (None, "$LLMC_CPU_ISA=avx2, and there is no library for it")
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx512_vnni")
    with pytest.raises(BadInputError, match="this CPU lacks; it runs avx_vnni, avx2: unset"):
        cpu_kernels.choose(cpu_kernels.ISA_NAMES)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "sse2")
    known = "avx512_vnni, avx_vnni, avx2, neon_dotprod"
    with pytest.raises(BadInputError, match=f"not an ISA llmc knows; use one of {known}"):
        cpu_kernels.choose(cpu_kernels.ISA_NAMES)


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma f16c avx_vnni\n\n")
    monkeypatch.setattr(cpu_kernels, "_CPUINFO", cpuinfo)
    assert cpu_kernels.host_cpu_flags() == {"fpu", "sse2", "avx2", "fma", "f16c", "avx_vnni"}


def test_another_architecture_builds_and_runs_no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "riscv64")
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: AVX512_HOST | ARM_DOTPROD_HOST)
    assert cpu_kernels.buildable() == [] and cpu_kernels.host_isas() == []


# /proc/cpuinfo Features of an ARMv8.2-A core with dot products (e.g. Graviton 2), and of an
# ARMv8.0 one (e.g. Cortex-A72: a Raspberry Pi 4, Graviton 1)
ARM_V80_HOST = frozenset({"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid"})
ARM_DOTPROD_HOST = ARM_V80_HOST | {"atomics", "fphp", "asimdhp", "asimdrdm", "asimddp"}


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
@pytest.mark.parametrize(("flags", "expected"), [(ARM_DOTPROD_HOST, ["neon_dotprod"]), (ARM_V80_HOST, [])])
def test_an_arm_host_runs_neon_dotprod_only_with_asimddp(
    monkeypatch: pytest.MonkeyPatch, machine: str, flags: frozenset[str], expected: list[str]
) -> None:
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: machine)
    monkeypatch.delenv(cpu_kernels.ISA_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: flags)
    assert cpu_kernels.buildable() == ["neon_dotprod"]  # an aarch64 build host compiles and ships it
    assert cpu_kernels.host_isas() == expected
    chosen, why = cpu_kernels.choose(cpu_kernels.ISA_NAMES)
    assert chosen == (expected[0] if expected else None)
    if not expected:
        assert "runs none of" in why
        assert cpu_kernels.unsupported("neon_dotprod") == (
            "this CPU lacks neon_dotprod (ARM64 NEON with the dot-product extension)"
        )
        with pytest.raises(BadInputError, match="this CPU lacks"):
            monkeypatch.setenv(cpu_kernels.ISA_ENV, "neon_dotprod")
            cpu_kernels.choose(cpu_kernels.ISA_NAMES)


def test_an_x86_host_never_picks_the_arm_kernels(x86: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not even with ARM's flag names among its own (flags are matched per architecture)."""
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: AVX512_HOST | ARM_DOTPROD_HOST)
    assert "neon_dotprod" not in cpu_kernels.host_isas() and "neon_dotprod" not in cpu_kernels.buildable()
    assert cpu_kernels.choose(["neon_dotprod"])[0] is None
    assert cpu_kernels.choose(["neon_dotprod", "avx2"])[0] == "avx2"
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: ARM_DOTPROD_HOST)
    assert cpu_kernels.host_isas() == []
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "neon_dotprod")
    with pytest.raises(BadInputError, match="neon_dotprod needs ARM64 NEON"):
        cpu_kernels.choose(cpu_kernels.ISA_NAMES)


def test_arm_cpu_features_are_read_from_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n\n")
    monkeypatch.setattr(cpu_kernels, "_CPUINFO", cpuinfo)
    assert cpu_kernels.host_cpu_flags() == {"fp", "asimd", "asimddp"}


def test_a_forced_isa_below_avx512_plans_without_avx512_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMC_CPU_ISA=avx2 on an AVX-512 BF16 machine plans like an AVX2-only host: no native bf16."""
    flags = frozenset(
        {"avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
    )
    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: flags)
    monkeypatch.delenv(cpu_kernels.ISA_ENV, raising=False)
    assert cpu_kernels.effective_cpu_flags() == flags
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx512_vnni")
    assert cpu_kernels.effective_cpu_flags() == flags
    for isa in ("avx2", "avx_vnni"):
        monkeypatch.setenv(cpu_kernels.ISA_ENV, isa)
        assert cpu_kernels.effective_cpu_flags() == {"avx2", "fma", "f16c", "avx_vnni"}


def test_the_package_ships_every_kernel_source_and_header() -> None:
    """An installed llmc compiles the kernels from its package's files: a header left out of the
    wheel would make every build go without them (as `*.cpp` alone once did)."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["llmc.kernels.cpu"]
    needed = {*cpu_kernels.SOURCES, *cpu_kernels.HEADERS, cpu_kernels.OPS_SOURCE, cpu_kernels.KERNELS_SOURCE}
    assert cpu_kernels.HEADERS and cpu_kernels.SOURCES
    assert [f.name for f in needed if not any(fnmatch.fnmatch(f.name, p) for p in patterns)] == []


class _Stage:
    """What the kernel steps of the CPU target use of an ArtifactWriter."""

    def __init__(self, stage: Path) -> None:
        self.stage = stage
        self.files: list[str] = []

    def add(self, name: str) -> None:
        assert (self.stage / name).is_file(), name
        self.files.append(name)


@pytest.mark.parametrize("broken", [None, "avx_vnni"])
def test_the_library_this_machine_loads_compiles_first_and_every_library_ships(
    x86: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, broken: str | None
) -> None:
    """The decode step's compile waits for the one library it loads; the others only go into the
    artifact and compile beside it (builder/targets/cpu.py). A library that fails to compile is
    left out, and the next best one this machine runs is loaded instead."""
    from concurrent.futures import ThreadPoolExecutor

    from llmc.builder.targets import cpu as cpu_target

    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: AVX_VNNI_HOST)
    started: list[str] = []

    def compiled(isa: str) -> bytes:
        started.append(isa)
        if isa == broken:
            raise InternalError("compiling llmc's CPU kernels failed")
        return f"library {isa}".encode()

    loaded: list[str] = []
    monkeypatch.setattr(cpu_kernels, "cached_library", compiled)
    monkeypatch.setattr(cpu_kernels, "load_bytes", lambda data, isa: loaded.append(isa))
    stage = _Stage(tmp_path)
    writer = cast(ArtifactWriter, stage)
    with ThreadPoolExecutor(max_workers=1) as pool:
        jobs = cpu_target._start_cpu_kernels(pool)
        assert isinstance(jobs, dict)
        chosen = cpu_target._load_cpu_kernels(writer, jobs)
        assert chosen is not None
        libraries = cpu_target._ship_cpu_kernels(writer, jobs, *chosen)
    assert started == ["avx_vnni", "avx512_vnni", "avx2"]
    best = "avx2" if broken else "avx_vnni"
    assert chosen[0] == best and loaded == [best]
    shipped = [name for name in ("avx512_vnni", "avx_vnni", "avx2") if name != broken]
    assert [library.isa for library in libraries] == shipped
    assert stage.files == [cpu_target.kernels_file(name) for name in shipped]
    for name in shipped:
        assert (tmp_path / cpu_target.kernels_file(name)).read_bytes() == f"library {name}".encode()
