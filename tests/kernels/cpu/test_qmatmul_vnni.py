"""llmc's quantized matmul (kernels/cpu/qmatmul.cpp): its parts and layout against the reference
dequantizers, and the compiled kernel against its plain-torch reference, for the ISA loaded here
(the best this CPU runs, or $LLMC_CPU_ISA's) and, in child processes, for every other ISA it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.qmatmul_cpu import KERNEL_DENSE_MIN_ROWS, CpuQMatmul
from llmc.kernels.cpu.qmatmul_vnni import (
    FORMATS,
    KQUANT_FORMS,
    PARTS_EXACT,
    Q4K_BITS,
    Q6K_BITS,
    activation_group,
    pack,
    pack_kquant_form,
    pack_q6k,
    parts,
    qmatmul,
    quantize_activations,
    reference_vnni_matmul,
    unpack,
)
from llmc.quant.formats import FORMATS as BLOCK_FORMATS
from llmc.quant.formats import reference_qmatmul
from llmc.quant.synthetic import random_blocks


@pytest.mark.parametrize("fmt", FORMATS)
def test_parts_reproduce_the_reference_dequantizer_exactly(fmt: str) -> None:
    blocks = random_blocks(fmt, 32, 512, torch.Generator().manual_seed(1))
    bits, (u, scale, offset) = parts(blocks, fmt)
    assert u.dtype == torch.uint8 and int(u.max()) < 2**bits
    group = 512 // scale.shape[1]
    rebuilt = (u.float().view(32, -1, group) * scale[..., None] + offset[..., None]).reshape(32, 512)
    if fmt in PARTS_EXACT:
        assert torch.equal(rebuilt, BLOCK_FORMATS[fmt].dequantize(blocks))
    else:
        torch.testing.assert_close(rebuilt, BLOCK_FORMATS[fmt].dequantize(blocks), rtol=2**-23, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_keeps_every_weight(fmt: str) -> None:
    blocks = random_blocks(fmt, 48, 512, torch.Generator().manual_seed(2))
    bits, (u, scale, offset) = parts(blocks, fmt)
    weight, scales = pack(u, scale, offset, bits)
    group = 512 // scale.shape[1]
    expected = u.float().view(48, -1, group) * scale.half().float()[..., None] + offset.half().float()[..., None]
    assert torch.equal(unpack(weight, scales, bits), expected.reshape(48, 512))
    if fmt in ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1"):  # GGML's own f16 scales: exact
        assert torch.equal(unpack(weight, scales, bits), BLOCK_FORMATS[fmt].dequantize(blocks))


def test_activations_quantize_per_32_to_int8_levels() -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    x[1, :32] = 0.0
    q = quantize_activations(x, 32).view(3, 2, 32)
    amax = x.view(3, 2, 32).abs().amax(-1, keepdim=True)
    steps = q / torch.where(amax > 0, amax / 127, 1.0)
    assert torch.allclose(steps, steps.round(), atol=1e-3) and int(steps.abs().max().round()) == 127
    assert torch.equal(q[1, 0], torch.zeros(32))


# (activation rows, output rows): every tail of the row tiles, N any multiple of 16
SHAPES = [
    (1, 16),
    (2, 48),
    (3, 64),
    (4, 80),
    (5, 16),
    (6, 32),
    (7, 48),
    (8, 64),
    (13, 32),
    (14, 16),
    (17, 32),
    (64, 48),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_kernel_matches_its_reference(cpu_kernels_loaded: None, fmt: str, m: int, n: int) -> None:
    """Odd shapes: every tail of the activation-row tiles, N any multiple of 16, K a few groups."""
    gen = torch.Generator().manual_seed(10 + m)
    blocks = random_blocks(fmt, n, 768 if BLOCK_FORMATS[fmt].block_size == 256 else 96, gen)
    bits, (u, scale, offset) = parts(blocks, fmt)
    weight, scales = pack(u, scale, offset, bits)
    x = torch.randn(m, u.shape[1], generator=gen)
    y = qmatmul(x, weight, scales, bits)
    expected = reference_vnni_matmul(x, unpack(weight, scales, bits), u.shape[1] // scale.shape[1])
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # and against the float reference, within the int8 activations' error (~2%, more spread when
    # there are few outputs: 16 of one row)
    ref = reference_qmatmul(x, blocks, fmt)
    assert float((y - ref).norm() / ref.norm()) < 3e-2


@pytest.mark.parametrize(("fmt", "bits_per_weight"), [("q6k", 6.5625), ("q4k", 4.625)])
def test_the_kquant_forms_keep_every_weight_exactly(fmt: str, bits_per_weight: float) -> None:
    blocks = random_blocks(fmt, 48, 768, torch.Generator().manual_seed(4))
    bits, weight, scales = pack_kquant_form(blocks, fmt)
    assert (weight.numel() + 2 * scales.numel()) * 8 == 48 * 768 * bits_per_weight
    assert torch.equal(unpack(weight, scales, bits), BLOCK_FORMATS[fmt].dequantize(blocks))


@pytest.mark.parametrize("fmt", list(KQUANT_FORMS))
@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_the_kquant_form_kernels_match_their_reference(cpu_kernels_loaded: None, fmt: str, m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(20 + m)
    blocks = random_blocks(fmt, n, 768, gen)
    bits, weight, scales = pack_kquant_form(blocks, fmt)
    x = torch.randn(m, 768, generator=gen)
    y = qmatmul(x, weight, scales, bits)
    group = activation_group(bits, 16 if fmt == "q6k" else 32)
    expected = reference_vnni_matmul(x, unpack(weight, scales, bits), group)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    general_bits, (u, scale, offset) = parts(blocks, fmt)
    general = qmatmul(x, *pack(u, scale, offset, general_bits), general_bits)
    if group == 256:  # activations per super-block here, the general form's per group: both near the float product
        exact = x @ unpack(weight, scales, bits).T
        for got in (y, general):
            assert float((got - exact).norm() / exact.norm()) < 2e-2
    else:  # the same result as the general form of the same blocks, up to its float16 scales' rounding
        torch.testing.assert_close(y, general, rtol=1e-3, atol=1e-3 * float(y.abs().max()))


@pytest.mark.parametrize("bits", [Q4K_BITS, Q6K_BITS])
def test_the_kquant_forms_take_the_activations_as_the_library_says(cpu_kernels_loaded: None, bits: int) -> None:
    """One large input beside small ones: quantized per 256 inputs the small ones round to a few
    levels, per group of 16 or 32 they keep theirs, so the result tells which the kernel did; and
    a non-finite input makes its own row NaN, no other."""
    fmt = "q6k" if bits == Q6K_BITS else "q4k"
    blocks = random_blocks(fmt, 32, 512, torch.Generator().manual_seed(12))
    _, weight, scales = pack_kquant_form(blocks, fmt)
    w = unpack(weight, scales, bits)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(13)) * 0.01
    x[:, 100] = 50.0
    y = qmatmul(x, weight, scales, bits)
    group = activation_group(bits, 16 if bits == Q6K_BITS else 32)
    other = 16 if group == 256 and bits == Q6K_BITS else 32 if group == 256 else 256
    expected = reference_vnni_matmul(x, w, group)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(y, reference_vnni_matmul(x, w, other), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    x[1, 300] = float("inf")
    y = qmatmul(x, weight, scales, bits)
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())


def test_llmc_cpu_kquant_per_group_keeps_the_per_group_activations(cpu_kernels_loaded: None) -> None:
    """The switch for measurements and for per-group accuracy, in a child process (decided once);
    a library that quantizes per group anyway says so with or without it."""
    script = (
        "import torch\n"
        "from llmc.benchmarks.cpu_kernels import load_isa\n"
        f"load_isa({cpu_kernels.loaded_isa()!r})\n"
        "print(int(torch.ops.llmc.qmatmul_kquant_activation_inputs()))\n"
    )
    env = {**os.environ, "LLMC_CPU_KQUANT_PER_GROUP": "1"}
    result = subprocess.run(
        [sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0"


def _assert_exact_at_extremes(weight: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> None:
    """The kernel against its reference on activations that quantize to +-127 in every lane (all
    +127, all -127, alternating signs, a ramp): a saturating int16 sum would come out ~50 % short."""
    k = unpack(weight, scales, bits).shape[1]
    x = torch.ones(4, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    x[3] = torch.linspace(-1.0, 1.0, k)
    y = qmatmul(x, weight, scales, bits)
    expected = reference_vnni_matmul(x, unpack(weight, scales, bits), group)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_the_q4k_form_extreme_values_do_not_saturate(cpu_kernels_loaded: None) -> None:
    """u = 15 and 0 with the largest 6-bit scales and mins (63) by activations of +-127: plain AVX2
    sums a group's 8 `vpmaddubsw` pairs in int16 (8 * 3810 fits)."""
    n, k = 32, 512
    blocks = random_blocks("q4k", n, k, torch.Generator().manual_seed(8)).view(n, 2, 144)
    blocks[:, :, 4:16] = 0xFF  # every sc and mn = 63
    blocks[:, :, 16:] = 0xFF  # every u = 15
    blocks[1::2, :, 16:] = 0  # odd rows: every u = 0
    blocks = blocks.reshape(n, -1)
    bits, weight, scales = pack_kquant_form(blocks, "q4k")
    _assert_exact_at_extremes(weight, scales, bits, activation_group(bits, 32))


def test_the_q6k_form_extreme_values_do_not_saturate(cpu_kernels_loaded: None) -> None:
    """u = 63 and 0 with sub-block scales of +-127 and -128 by activations of +-127: AVX2 sums
    two `vpmaddubsw` pairs in int16 (2 * 16002 fits, 4 would not)."""
    n, k = 32, 512
    blocks = random_blocks("q6k", n, k, torch.Generator().manual_seed(6)).view(n, 2, 210)
    blocks[:, :, :192] = 0xFF  # every u = 63
    blocks[1::2, :, :192] = 0  # odd rows: every u = 0
    blocks[2::4, :, :128] = 0x5A  # and some rows mixed
    blocks[:, :, 192:208] = torch.tensor([127, 0x80], dtype=torch.uint8).repeat(8)  # sc = 127, -128
    blocks = blocks.reshape(n, -1)
    weight, scales = pack_q6k(blocks)
    _assert_exact_at_extremes(weight, scales, Q6K_BITS, activation_group(Q6K_BITS, 16))


@pytest.mark.parametrize("fmt", list(KQUANT_FORMS))
def test_the_kquant_forms_refuse_mismatched_shapes(cpu_kernels_loaded: None, fmt: str) -> None:
    bits, weight, scales = pack_kquant_form(random_blocks(fmt, 32, 512, torch.Generator().manual_seed(7)), fmt)
    with pytest.raises(RuntimeError, match="K = 256 per d"):
        qmatmul(torch.randn(1, 768), weight, scales, bits)
    with pytest.raises(RuntimeError, match="weight does not match K"):
        qmatmul(torch.randn(1, 512), weight[:, :-1].contiguous(), scales, bits)


def test_kernel_takes_bf16_activations(cpu_kernels_loaded: None) -> None:
    gen = torch.Generator().manual_seed(5)
    blocks = random_blocks("q4_1", 32, 128, gen)
    bits, (u, scale, offset) = parts(blocks, "q4_1")
    weight, scales = pack(u, scale, offset, bits)
    x = torch.randn(2, 128, generator=gen).bfloat16()
    expected = reference_vnni_matmul(x.float(), unpack(weight, scales, bits), 32)
    torch.testing.assert_close(qmatmul(x, weight, scales, bits), expected, rtol=1e-5, atol=1e-4)


def test_kernel_refuses_mismatched_shapes(cpu_kernels_loaded: None) -> None:
    blocks = random_blocks("q8_0", 16, 64, torch.Generator().manual_seed(6))
    bits, (u, scale, offset) = parts(blocks, "q8_0")
    weight, scales = pack(u, scale, offset, bits)
    with pytest.raises(RuntimeError, match="16 or 32 inputs per scale group"):
        qmatmul(torch.randn(1, 96), weight, scales, bits)
    with pytest.raises(RuntimeError, match="weight does not match K"):
        qmatmul(torch.randn(1, 64), weight, scales, 4)
    with pytest.raises(RuntimeError, match="bits must be 4, 5, 6 or 8"):
        qmatmul(torch.randn(1, 64), weight, scales, 7)


def test_a_second_different_library_is_refused(cpu_kernels_loaded: None, tmp_path: Path) -> None:
    other = tmp_path / "other.so"
    other.write_bytes(b"not the same library")
    assert cpu_kernels.load(other, "avx2") == "another version of llmc's CPU kernels is already loaded"


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_copy_beside_the_kernel_form_equals_the_dequantized_weight_in_bf16(fmt: str) -> None:
    blocks = random_blocks(fmt, 32, 512, torch.Generator().manual_seed(7))
    matmul = CpuQMatmul(blocks, fmt, dense_copy=True, cpu_kernels=True)
    assert matmul.kernel_weight is not None and matmul.dense is not None
    assert torch.equal(matmul.dense, BLOCK_FORMATS[fmt].dequantize(blocks).bfloat16())


@pytest.mark.parametrize("m", [1, 3, 31, 32, 40])
def test_cpu_qmatmul_takes_the_kernel_below_the_dense_switch(cpu_kernels_loaded: None, m: int) -> None:
    blocks = random_blocks("q4k", 48, 512, torch.Generator().manual_seed(8))
    matmul = CpuQMatmul(blocks, "q4k", dense_copy=True, cpu_kernels=True)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    ref = reference_qmatmul(x, blocks, "q4k")
    y = matmul(x)
    assert y.dtype == x.dtype
    if m < KERNEL_DENSE_MIN_ROWS:
        bits = matmul.kernel_bits
        group = activation_group(bits, 32)
        assert matmul.kernel_weight is not None and matmul.kernel_scales is not None
        expected = reference_vnni_matmul(x, unpack(matmul.kernel_weight, matmul.kernel_scales, bits), group)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert float((y - ref).norm() / ref.norm()) < 2e-2


def test_non_finite_activations_reach_the_output(cpu_kernels_loaded: None) -> None:
    blocks = random_blocks("q4_0", 16, 64, torch.Generator().manual_seed(9))
    bits, (u, scale, offset) = parts(blocks, "q4_0")
    weight, scales = pack(u, scale, offset, bits)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    x[0, 3] = float("nan")
    y = qmatmul(x, weight, scales, bits)
    assert bool(y[0].isnan().all()) and bool(y[1].isfinite().all())


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "q4k", "q6k"])
def test_a_tall_matmul_gives_each_row_the_bits_it_gets_alone(cpu_kernels_loaded: None, fmt: str) -> None:
    """A prefill's matmul runs its rows in tiles that stay in L2 (qmatmul_driver.h run_blocks): at
    K = 4096 a tile is 96 rows, so 200 rows are two tiles and a tail of 8. Each row's numbers do
    not depend on its tile, nor on the batch it runs in."""
    gen = torch.Generator().manual_seed(31)
    k, m = 4096, 200
    blocks = random_blocks(fmt, 32, k, gen)
    if fmt in KQUANT_FORMS:
        bits, weight, scales = pack_kquant_form(blocks, fmt)
    else:
        bits, (u, scale, offset) = parts(blocks, fmt)
        weight, scales = pack(u, scale, offset, bits)
    x = torch.randn(m, k, generator=gen)
    tall = qmatmul(x, weight, scales, bits)
    alone = torch.cat([qmatmul(x[i : i + 8], weight, scales, bits) for i in range(0, m, 8)])
    assert torch.equal(tall, alone)
    unpacked = unpack(weight, scales, bits)
    group = activation_group(bits, 16 if fmt == "q6k" else 32)
    expected = reference_vnni_matmul(x, unpacked, group)
    torch.testing.assert_close(tall, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("m", [5, 1100])  # 1100 rows: enough groups for the quantization to run on several threads
def test_activations_are_quantized_exactly_as_the_reference(cpu_kernels_loaded: None, m: int) -> None:
    """Identity weights (u = 1 on the diagonal, scale 1, offset 0) make y the dequantized int8
    activations themselves, bit for bit: ties round half to even, zero groups stay zero, a group
    holding inf makes its row NaN (as in the float reference) and no other row."""
    k = 128
    u = torch.eye(k, dtype=torch.uint8)
    weight, scales = pack(u, torch.ones(k, k // 32), torch.zeros(k, k // 32), 8)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(11)) * 3
    x[0, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 126.5] * 4)  # amax 127: x * inv = x, ties
    x[1, 32:64] = 0.0
    x[2, 64:96] = torch.linspace(-1e-30, 1e-30, 32)  # tiny but not zero
    x[2, 96:128] = torch.linspace(-1e-38, 1e-38, 32)  # so tiny that 127 / max overflows: zeros
    # x * (127 / amax) is 21.499998 with one IEEE division, 21.5 with torch's `127 / amax` (a
    # reciprocal, then times 127): the reference must round it to 21, as the kernel does
    x[3, :32] = 0.0
    x[3, :2] = torch.tensor([2.407855749130249, 0.4076291024684906])
    y = qmatmul(x, weight, scales, 8)
    assert y[3, 1] == 21 * (x[3, 0] / 127)
    assert torch.equal(y, quantize_activations(x, 32))
    assert y[0, :8].tolist() == [127.0, 0.0, 2.0, 2.0, -0.0, -2.0, 4.0, 126.0]
    assert not bool(y[2, 96:].any()) and bool(y[2, 64:96].any())
    x[3, 40] = float("inf")
    y = qmatmul(x, weight, scales, 8)
    assert bool(y[3].isnan().all())
    assert torch.equal(y[:3], quantize_activations(x[:3], 32)) and torch.equal(y[4:], quantize_activations(x[4:], 32))


@pytest.mark.parametrize(("bits", "group"), [(8, 32), (8, 16), (4, 32), (4, 16)])
def test_extreme_values_do_not_saturate(cpu_kernels_loaded: None, bits: int, group: int) -> None:
    """The largest products the formats allow (q8_0's u = 255 and u = 0, 4-bit's 15) by activations
    of +-127 in every lane: where AVX2 sums pairs in int16, a saturating sum would come out short."""
    n, k = 32, 4 * group
    top = 2**bits - 1
    u = torch.full((n, k), top, dtype=torch.uint8)
    u[1::2] = 0  # odd rows: q8_0's most negative weight, -128
    u[2::4, ::3] = top // 2  # and some rows mixed
    scale = torch.full((n, k // group), 1.0)
    offset = torch.full((n, k // group), -(2.0 ** (bits - 1)))
    weight, scales = pack(u, scale, offset, bits)
    _assert_exact_at_extremes(weight, scales, bits, group)


# A child runs three test files (about 20 s here, 2 cores shared) after compiling its library if the
# cache lacks it (about 30 s): far below this, which only stops a hung child.
CHILD_TIMEOUT_S = 600
# In the child: every test of this file but this one, and the paged attention's kernel tests.
_CHILD_TESTS = "not every_isa and (cpu_kernel or not test_paged_attention)"


def _other_isas() -> list[str]:
    chosen, _ = cpu_kernels.choose(cpu_kernels.ISA_NAMES)
    return [isa for isa in cpu_kernels.host_isas() if isa != chosen]


@pytest.mark.skipif(bool(os.environ.get(cpu_kernels.ISA_ENV)), reason="a child run: one ISA per process")
@pytest.mark.parametrize(
    "isa", [isa if isa == "avx2" else pytest.param(isa, marks=pytest.mark.slow) for isa in cpu_kernels.ISA_NAMES]
)
def test_every_isa_this_cpu_runs_passes_the_kernel_tests(isa: str) -> None:
    """A process loads one library: the kernel tests of this file, the half matmul's and the paged attention's run
    again in a child process per other ISA (e.g. AVX2 and AVX-VNNI on an AVX-512 machine; AVX2,
    which every x86-64 CI machine runs, in the quick suite)."""
    if isa not in _other_isas():
        pytest.skip(f"{isa} is the ISA loaded here, or this CPU lacks it")
    tests = Path(__file__).parents[1]
    files = [
        str(tests / "cpu" / "test_qmatmul_vnni.py"),
        str(tests / "cpu" / "test_half_matmul.py"),
        str(tests / "test_paged_attention.py"),
    ]
    env = {**os.environ, cpu_kernels.ISA_ENV: isa}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files, "-k", _CHILD_TESTS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary  # each test ran, none skipped
