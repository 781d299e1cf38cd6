"""Fused-dequantization Triton matmuls against x.float() @ dequantize(W).T, for all ten GGML formats.

On the CPU the kernels run under the Triton interpreter (slow: shapes stay tiny); the `gpu` test runs
real shapes in bf16 when CUDA is there.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
pytest.importorskip("triton")

from llmc.kernels.qmatmul_triton import GEMV_MAX_M, qmatmul
from llmc.kernels.quant_formats import FORMATS, reference_qmatmul
from tests.kernels.blocks import random_blocks

_ALL = list(FORMATS)
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_close(fmt: str, m: int, n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = random_blocks(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    want = reference_qmatmul(x, blocks, fmt)
    got = qmatmul(x.to(device), blocks.to(device), fmt, n, k)
    assert got.dtype == dtype and got.shape == (m, n)
    # fp32: only summation order differs; half types: the output's rounding and, in the GEMM, the
    # weights rounded to x's dtype before tl.dot.
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.float().cpu() / scale, want / scale, atol=tol, rtol=tol)


def _shape(fmt: str) -> tuple[int, int]:
    """(N, K): K-quants need whole 256-weight super-blocks; legacy ones also get a K that is not a
    multiple of the GEMV/GEMM K tile (96), to exercise the masked tail."""
    return (32, 256) if FORMATS[fmt].block_size == 256 else (40, 96)


@pytest.mark.parametrize("fmt", _ALL)
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_matches_reference(fmt: str, m: int) -> None:
    n, k = _shape(fmt)
    _check_close(fmt, m, n, k, torch.float32, _DEVICE)


@pytest.mark.parametrize("fmt", _ALL)
def test_gemm_matches_reference(fmt: str) -> None:
    n, k = _shape(fmt)
    _check_close(fmt, 16, n, k, torch.float16, _DEVICE)


@pytest.mark.parametrize(
    ("fmt", "m", "n", "k", "dtype"), [("q4k", 3, 24, 512, torch.float16), ("q5_1", 19, 72, 160, torch.float32)]
)
def test_odd_shapes(fmt: str, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """Odd M, N not a multiple of any tile, several blocks per row, a partly filled GEMM tile."""
    _check_close(fmt, m, n, k, dtype, _DEVICE, seed=1)


def test_leading_dims_and_validation() -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = random_blocks("q8_0", 8, 64, gen)
    x = torch.randn(2, 1, 64, generator=gen)
    got = qmatmul(x.to(_DEVICE), blocks.to(_DEVICE), "q8_0", 8, 64)
    assert got.shape == (2, 1, 8)
    torch.testing.assert_close(got.cpu().reshape(2, 8), reference_qmatmul(x.reshape(2, 64), blocks, "q8_0"))
    from llmc.errors import BadInputError

    with pytest.raises(BadInputError):
        qmatmul(x, blocks[:, :-1], "q8_0", 8, 64)
    with pytest.raises(BadInputError):
        qmatmul(x, blocks, "q9_0", 8, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", _ALL)
@pytest.mark.parametrize("m", [1, GEMV_MAX_M, 77, 512])
def test_cuda_bf16(fmt: str, m: int) -> None:
    _check_close(fmt, m, 1000, 2048, torch.bfloat16, "cuda")
