"""llmc's matmul over float16 / bfloat16 weights (kernels/cpu/half_matmul_driver.h) against its
plain-torch reference, for the ISA loaded here (test_qmatmul_vnni.py reruns this file in a child
process for every other ISA the CPU runs)."""

from __future__ import annotations

import pytest
import torch

from llmc.kernels.cpu.half_matmul import HALF_DTYPES, CpuHalfMatmul, reference_half_matmul

# float32 sums in another order than the reference's float64 ones: a few ulps of the largest
# partial sum (|x|, |w| ~ 1 and K up to 1000: sums of ~30).
SUM_TOL = 1e-4


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (1, 576, 4099),  # decode: whole 8-row tiles and a partial last tile
        (1, 100, 13),  # inputs beyond the last whole vector (tails)
        (1, 7, 5),  # all tail, all partial tile
        (2, 64, 24),  # two rows of x: one pass
        (3, 576, 37),  # a pair of rows and one more
        (17, 1000, 21),
        (64, 128, 40),
    ],
)
def test_kernel_matches_its_reference(cpu_kernels_loaded: None, dtype: torch.dtype, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen).to(dtype)
    got = torch.ops.llmc.half_matmul(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got, reference_half_matmul(x, w), rtol=0, atol=SUM_TOL)


def _every_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 8], ids=["scalar", "vector"])
def test_every_16_bit_value_widens_exactly(cpu_kernels_loaded: None, dtype: torch.dtype, k: int) -> None:
    """All 65536 bit patterns (subnormals, signed zeros, infinities, NaNs) in column 0 of a weight
    whose other columns are zeros, times ones: y is the widened value itself. K = 1 takes the
    scalar conversion, K = 8 the vector one (every ISA has at most 8 float32 lanes here)."""
    patterns = _every_pattern(dtype)
    w = torch.zeros(patterns.numel(), k, dtype=dtype)
    w[:, 0] = patterns
    got = torch.ops.llmc.half_matmul(torch.ones(1, k), w)[0]
    torch.testing.assert_close(got, patterns.float(), rtol=0, atol=0, equal_nan=True)


def test_activations_in_other_dtypes_are_widened_first(cpu_kernels_loaded: None) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 96, generator=gen).bfloat16()
    w = torch.randn(20, 96, generator=gen).half()
    torch.testing.assert_close(torch.ops.llmc.half_matmul(x, w), reference_half_matmul(x, w), rtol=0, atol=SUM_TOL)


def test_kernel_refuses_bad_operands(cpu_kernels_loaded: None) -> None:
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.llmc.half_matmul(x, torch.randn(4, 16))
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.llmc.half_matmul(x, torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.llmc.half_matmul(x, torch.randn(16, 4).half().T)


def test_the_module_keeps_the_stored_weight(cpu_kernels_loaded: None) -> None:
    w = torch.randn(10, 32).half()
    module = CpuHalfMatmul(w, torch.float32)
    assert module.weight.data_ptr() == w.data_ptr()  # no copy: the artifact's mapped bytes
    x = torch.randn(4, 32)
    torch.testing.assert_close(module(x), reference_half_matmul(x, w), rtol=0, atol=SUM_TOL)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        CpuHalfMatmul(w.float(), torch.float32)
