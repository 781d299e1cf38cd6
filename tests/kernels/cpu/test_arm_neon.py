"""llmc's ARM64 kernels (kernels/cpu/qmatmul_neon.h, paged_attention_neon.h) against the same
plain-torch references and tolerances as the x86 ones, without an ARM machine: the torch-free
drivers the library compiles, in a small harness (tests/kernels/cpu/arm/harness.cpp) cross-compiled
with Debian's aarch64 compiler and run under qemu-user. No aarch64 torch is needed (the harness does
not link libtorch). Skipped, with the reason, where the cross compiler or qemu is missing
(`apt-get install g++-aarch64-linux-gnu qemu-user`); `make test-arm` runs exactly these tests and
fails instead. Correctness only: qemu says nothing about ARM speed."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.half_matmul import HALF_DTYPES, reference_half_matmul
from llmc.kernels.cpu.qmatmul_vnni import (
    FORMATS,
    KQUANT_FORMS,
    ROWS,
    pack,
    pack_kquant_form,
    parts,
    reference_vnni_matmul,
    unpack,
)
from llmc.kernels.paged_attention import decode_attention
from llmc.quant.formats import FORMATS as BLOCK_FORMATS
from llmc.quant.formats import reference_qmatmul
from llmc.quant.synthetic import random_blocks

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
INSTALL = "apt-get install g++-aarch64-linux-gnu qemu-user"
HARNESS = Path(__file__).with_name("arm") / "harness.cpp"
KERNELS = Path(cpu_kernels.__file__).parent
NEON = next(isa for isa in cpu_kernels.ISAS if isa.name == "neon_dotprod")
# qemu's CPU models: "max" has every extension it emulates (dot products included); the
# Cortex-A57 is ARMv8.0, without them.
QEMU_CPU = "max"
QEMU_CPU_WITHOUT_DOTPROD = "cortex-a57"
# Cross-compiling the harness takes ~5 s here and a qemu run well under 10 s: these only stop a
# hung tool.
COMPILE_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120
SIGILL_EXIT = (-4, 132)  # killed by SIGILL: as the signal, or as the 128 + 4 some shells report
ELF_MACHINE_OFFSET, EM_AARCH64 = 18, 183  # e_machine in an ELF header, and its value for aarch64

_missing = [tool for tool in (CROSS_CXX, QEMU) if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.arm,
    pytest.mark.skipif(bool(_missing), reason=f"{' and '.join(_missing)} missing: {INSTALL}"),
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness, cross-compiled (static: qemu then needs no aarch64 libraries) with the flags
    the library is compiled with for neon_dotprod."""
    binary = tmp_path_factory.mktemp("arm") / "harness"
    command = [CROSS_CXX, "-O2", "-std=c++20", "-static", *NEON.compiler_flags, f"-I{KERNELS}", str(HARNESS)]
    result = subprocess.run(
        [*command, "-o", str(binary)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


def _run(harness: Path, mode: str, cases: Sequence[Path], cpu: str = QEMU_CPU) -> subprocess.CompletedProcess[str]:
    command = [QEMU, "-cpu", cpu, str(harness), mode, *map(str, cases)]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def _write(folder: Path, meta: Sequence[float], **arrays: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta").write_text(" ".join(map(str, meta)) + "\n")
    for name, tensor in arrays.items():
        tensor.contiguous().numpy().tofile(folder / name)
    return folder


def _read(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32).view(shape)


def _matmul_case(folder: Path, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bits: int) -> Path:
    m, k = x.shape
    meta = [m, k, scales.shape[1], bits, weight.shape[0]]
    return _write(folder, meta, x=x.float(), weight=weight, scales=scales.view(torch.int16))


def _neon_matmuls(
    harness: Path, folder: Path, problems: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
) -> list[torch.Tensor]:
    """The NEON kernel's y for each (x, weight, scales, bits), all in one qemu run."""
    cases = [_matmul_case(folder / str(i), *problem) for i, problem in enumerate(problems)]
    result = _run(harness, "qmatmul", cases)
    assert result.returncode == 0, result.stderr
    shapes = [(x.shape[0], weight.shape[0] * ROWS) for x, weight, _, _ in problems]
    return [_read(case / "y", shape) for case, shape in zip(cases, shapes, strict=True)]


# (activation rows, output rows): every tail of the 4-row tiles, M 1..64, N any multiple of 16
SHAPES = [(1, 16), (2, 48), (3, 64), (4, 80), (5, 16), (7, 48), (8, 64), (17, 32), (33, 16), (63, 32), (64, 48)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_neon_kernel_matches_its_reference(harness: Path, tmp_path: Path, fmt: str) -> None:
    """Every format, the odd shapes of the x86 tests and more, against the reference the x86
    kernels meet, with their tolerances."""
    problems, expected, refs = [], [], []
    for m, n in SHAPES:
        gen = torch.Generator().manual_seed(10 + m)
        blocks = random_blocks(fmt, n, 768 if BLOCK_FORMATS[fmt].block_size == 256 else 96, gen)
        bits, (u, scale, offset) = parts(blocks, fmt)
        weight, scales = pack(u, scale, offset, bits)
        x = torch.randn(m, u.shape[1], generator=gen)
        problems.append((x, weight, scales, bits))
        expected.append(reference_vnni_matmul(x, unpack(weight, scales, bits), u.shape[1] // scale.shape[1]))
        refs.append(reference_qmatmul(x, blocks, fmt))
    for y, want, ref in zip(_neon_matmuls(harness, tmp_path, problems), expected, refs, strict=True):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert float((y - ref).norm() / ref.norm()) < 3e-2  # the int8 activations' error, as on x86


@pytest.mark.parametrize("fmt", list(KQUANT_FORMS))
def test_neon_kquant_forms_match_their_reference(harness: Path, tmp_path: Path, fmt: str) -> None:
    problems, expected = [], []
    for m, n in SHAPES:
        gen = torch.Generator().manual_seed(20 + m)
        bits, weight, scales = pack_kquant_form(random_blocks(fmt, n, 768, gen), fmt)
        x = torch.randn(m, 768, generator=gen)
        problems.append((x, weight, scales, bits))
        expected.append(reference_vnni_matmul(x, unpack(weight, scales, bits), 16 if fmt == "q6k" else 32))
    for y, want in zip(_neon_matmuls(harness, tmp_path, problems), expected, strict=True):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("fmt", ["q4_0", "q6k"])
def test_neon_tall_matmul_in_row_tiles(harness: Path, tmp_path: Path, fmt: str) -> None:
    """200 rows at K = 4096 run as row tiles of 96, 96 and 8 (qmatmul_driver.h run_blocks): the
    same bits per row as 8 rows at a time, and the reference's numbers."""
    gen = torch.Generator().manual_seed(32)
    blocks = random_blocks(fmt, 32, 4096, gen)
    if fmt in KQUANT_FORMS:
        bits, weight, scales = pack_kquant_form(blocks, fmt)
    else:
        bits, (u, scale, offset) = parts(blocks, fmt)
        weight, scales = pack(u, scale, offset, bits)
    x = torch.randn(200, 4096, generator=gen)
    chunks = [x[i : i + 8] for i in range(0, 200, 8)]
    tall, *alone = _neon_matmuls(harness, tmp_path, [(part, weight, scales, bits) for part in [x, *chunks]])
    assert torch.equal(tall, torch.cat(alone))
    want = reference_vnni_matmul(x, unpack(weight, scales, bits), 16 if fmt == "q6k" else 32)
    torch.testing.assert_close(tall, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize(("bits", "group"), [(8, 32), (8, 16), (4, 32), (4, 16)])
def test_neon_extreme_values_do_not_saturate(harness: Path, tmp_path: Path, bits: int, group: int) -> None:
    """The largest products the formats allow (u = 255 and 0 for 8-bit, whose w = u - 128 spans
    all of s8; 15 for 4-bit) by activations of +-127 in every lane."""
    n, k = 32, 4 * group
    top = 2**bits - 1
    u = torch.full((n, k), top, dtype=torch.uint8)
    u[1::2] = 0
    u[2::4, ::3] = top // 2
    scale = torch.full((n, k // group), 1.0)
    offset = torch.full((n, k // group), -(2.0 ** (bits - 1)))
    weight, scales = pack(u, scale, offset, bits)
    x = torch.ones(5, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    x[3] = torch.linspace(-1.0, 1.0, k)
    [y] = _neon_matmuls(harness, tmp_path, [(x, weight, scales, bits)])
    expected = reference_vnni_matmul(x, unpack(weight, scales, bits), group)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_neon_non_finite_activations_reach_the_output(harness: Path, tmp_path: Path) -> None:
    blocks = random_blocks("q4_0", 16, 64, torch.Generator().manual_seed(9))
    bits, (u, scale, offset) = parts(blocks, "q4_0")
    weight, scales = pack(u, scale, offset, bits)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    x[0, 3] = float("nan")
    [y] = _neon_matmuls(harness, tmp_path, [(x, weight, scales, bits)])
    assert bool(y[0].isnan().all()) and bool(y[1].isfinite().all())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_neon_half_matmul_matches_its_reference(harness: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """The half matmul (half_matmul_driver.h) in one row and in pairs of rows, with input tails and
    a partial last tile, plus every 16-bit pattern widened by the vector and the scalar code."""
    cases, expected = [], []
    bf16 = int(dtype == torch.bfloat16)
    for i, (m, k, n) in enumerate([(1, 576, 37), (1, 7, 5), (3, 100, 21), (17, 64, 8)]):
        gen = torch.Generator().manual_seed(i)
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen).to(dtype)
        cases.append(
            _write(tmp_path / str(i), [m, k, n, int(dtype == torch.bfloat16)], x=x, weight=w.view(torch.int16))
        )
        expected.append(reference_half_matmul(x, w))
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for k in (1, 4):  # the scalar tail, then one NEON vector
        w = torch.zeros(patterns.numel(), k, dtype=torch.int16)
        w[:, 0] = patterns
        meta = [1, k, patterns.numel(), bf16]
        cases.append(_write(tmp_path / f"patterns{k}", meta, x=torch.ones(1, k), weight=w))
        expected.append(patterns.view(dtype).float()[None])
    result = _run(harness, "half", cases)
    assert result.returncode == 0, result.stderr
    for case, want in zip(cases, expected, strict=True):
        got = _read(case / "y", tuple(want.shape))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, equal_nan=True)


def _attention_case(
    gen: torch.Generator, lengths: list[int], heads: int, kv_heads: int, dim: int, block: int = 4
) -> tuple[torch.Tensor, ...]:
    """A random cache with one shuffled block table per sequence, and one query per sequence."""
    width = max(-(-n // block) for n in lengths) + 1  # one padding column, pointing anywhere
    blocks = len(lengths) * width + 3
    k_cache = torch.randn(blocks * block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(blocks * block, kv_heads, dim, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: len(lengths) * width].view(len(lengths), width)
    return torch.randn(len(lengths), heads, dim, generator=gen), k_cache, v_cache, tables, torch.tensor(lengths)


def _neon_attention(
    harness: Path, folder: Path, case: tuple[torch.Tensor, ...], block: int, scale: float, window: int
) -> subprocess.CompletedProcess[str]:
    q, k_cache, v_cache, tables, lens = case
    meta = [*q.shape[:2], k_cache.shape[1], q.shape[2], k_cache.shape[0], tables.shape[1], block, window, scale]
    _write(folder, meta, q=q, k=k_cache, v=v_cache, tables=tables, lens=lens)
    return _run(harness, "attention", [folder])


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(6, 2, 64), (8, 8, 128), (16, 2, 64), (3, 1, 128)])
def test_neon_attention_matches_the_torch_decode_attention(
    harness: Path, tmp_path: Path, window: int | None, heads: int, kv_heads: int, dim: int
) -> None:
    """Lengths across the 4-lane tails and block boundaries, windows shorter and longer than them."""
    case = _attention_case(torch.Generator().manual_seed(heads + dim), [1, 2, 7, 16, 33, 40, 70], heads, kv_heads, dim)
    q, k_cache, v_cache, tables, lens = case
    result = _neon_attention(harness, tmp_path / "case", case, 4, 0.2, window or 0)
    assert result.returncode == 0, result.stderr
    expected = decode_attention(q, k_cache, v_cache, 4, tables, lens, 0.2, window)
    got = _read(tmp_path / "case" / "out", tuple(q.shape))
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_neon_attention_refuses_lengths_and_blocks_outside_the_cache(harness: Path, tmp_path: Path) -> None:
    """The driver's table checks, which the torch op reports as errors, hold under NEON too."""
    q, k_cache, v_cache, tables, lens = _attention_case(torch.Generator().manual_seed(5), [9, 3], 6, 2, 64)
    long = _neon_attention(harness, tmp_path / "long", (q, k_cache, v_cache, tables, lens * 100), 4, 0.2, 0)
    assert long.returncode == 2 and "a length is outside its table" in long.stderr
    tables[0, 0] = 1 << 60  # times the block size, this would wrap to a small slot in int64
    wrap = _neon_attention(harness, tmp_path / "wrap", (q, k_cache, v_cache, tables, lens), 4, 0.2, 0)
    assert wrap.returncode == 2 and "a block id is outside the cache" in wrap.stderr


def test_the_dotprod_build_needs_a_cpu_with_dot_products(harness: Path, tmp_path: Path) -> None:
    """Why neon_dotprod requires the asimddp flag: on an ARMv8.0 core (qemu's Cortex-A57) the
    kernel is an illegal instruction, which the loader's flag check must prevent."""
    blocks = random_blocks("q8_0", 16, 64, torch.Generator().manual_seed(11))
    bits, (u, scale, offset) = parts(blocks, "q8_0")
    weight, scales = pack(u, scale, offset, bits)
    case = _matmul_case(tmp_path / "case", torch.randn(1, 64), weight, scales, bits)
    result = _run(harness, "qmatmul", [case], cpu=QEMU_CPU_WITHOUT_DOTPROD)
    assert result.returncode in SIGILL_EXIT, (result.returncode, result.stderr)
    assert "asimddp" in NEON.cpu_flags


def test_the_library_sources_compile_for_aarch64(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The torch ops (torch_ops.cpp: qmatmul.cpp, paged_attention_cpu.cpp) and the NEON kernels
    (kernels_isa.cpp) compile with the very commands an aarch64 build host runs
    (cpu_kernels._compile_command, torch's headers), here with the cross compiler as $CXX; only the
    kernels get the ISA's flags. Linking needs an aarch64 libtorch, which this machine lacks."""
    monkeypatch.setenv("CXX", CROSS_CXX)
    sources = (cpu_kernels.OPS_SOURCE, cpu_kernels.KERNELS_SOURCE)
    jobs = []
    for source in sources:
        command = cpu_kernels._compile_command(source, tmp_path / f"{source.stem}.o", NEON.name)
        assert (NEON.compiler_flags[0] in command) == (source == cpu_kernels.KERNELS_SOURCE)
        jobs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for job in jobs:
        _, stderr = job.communicate(timeout=COMPILE_TIMEOUT_S)
        assert job.returncode == 0, stderr[-4000:]
    for source in sources:
        header = (tmp_path / f"{source.stem}.o").read_bytes()[:20]
        assert int.from_bytes(header[ELF_MACHINE_OFFSET:20], "little") == EM_AARCH64
