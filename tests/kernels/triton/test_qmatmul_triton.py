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

from llmc.kernels.triton.qmatmul_triton import (
    GEMV_MAX_M,
    GEMV_UNIT,
    PLANE_FIELDS,
    GemvConfig,
    pack_weight,
    qmatmul,
    qmatmul_packed,
    unpack_weight,
)
from llmc.quant.formats import FORMATS, reference_qmatmul
from llmc.quant.synthetic import random_blocks

_ALL = list(FORMATS)
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_close(
    fmt: str,
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    config: GemvConfig | None = None,
    extreme: bool = False,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = random_blocks(fmt, n, k, gen, extreme=extreme)
    x = torch.randn(m, k, generator=gen).to(dtype)
    want = reference_qmatmul(x, blocks, fmt)
    if config is None:
        got = qmatmul(x.to(device), blocks.to(device), fmt, n, k)
    else:
        got = qmatmul_packed(x.to(device), pack_weight(blocks.to(device), fmt, n, k), config)
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


@pytest.mark.parametrize("fmt", _ALL)
def test_pack_round_trip(fmt: str) -> None:
    """The plane layout is a lossless byte move: fields tile the block, unpack inverts pack exactly,
    and every plane starts aligned (an odd block count leaves padding between planes)."""
    spec = FORMATS[fmt]
    assert sum(length for _, length, _ in PLANE_FIELDS[fmt]) == spec.type_size
    assert [off for off, _, _ in PLANE_FIELDS[fmt]] == sorted(off for off, _, _ in PLANE_FIELDS[fmt])
    for n, nb in ((3, 1), (5, 3), (8, 4)):
        blocks = torch.randint(
            0, 256, (n, nb * spec.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(nb)
        )
        packed = pack_weight(blocks, fmt, n, nb * spec.block_size)
        assert torch.equal(unpack_weight(packed), blocks)
        for plane, (_, length, dtype) in zip(packed.planes, PLANE_FIELDS[fmt], strict=True):
            assert plane.dtype == dtype and plane.shape == (n, nb * length // dtype.itemsize)
            assert (plane.data_ptr() - packed.buffer.data_ptr()) % 128 == 0


@pytest.mark.parametrize("fmt", list(GEMV_UNIT))
@pytest.mark.parametrize(("m", "target"), [(1, 6), (3, 1000), (8, 6)])
def test_gemv_split_k(fmt: str, m: int, target: int) -> None:
    """K split over programs (one step each, or two with a shorter last range: 7 or 12 units in
    steps of 1 or 2), N not a multiple of BLOCK_N; the partials are summed in order by a second kernel."""
    k = 7 * 32 if FORMATS[fmt].block_size == 32 else 3 * 256
    config = GemvConfig(block_n=4, block_c=2, num_warps=4, target_programs=target)
    _check_close(fmt, m, 10, k, torch.float32, _DEVICE, seed=3, config=config)


@pytest.mark.parametrize("fmt", ["q4k", "q4_0"])
@pytest.mark.parametrize("m", [2, 4, 6, 7])
def test_gemv_rows(fmt: str, m: int) -> None:
    """Every unrolled row accumulator of the GEMV (M = 1..8), rows past M masked."""
    n, k = _shape(fmt)
    _check_close(fmt, m, n, k, torch.float32, _DEVICE, seed=m)


@pytest.mark.parametrize("fmt", _ALL)
@pytest.mark.parametrize("m", [1, 16])
def test_extreme_scales(fmt: str, m: int) -> None:
    """Scales of both signs from 2**-14 to 2**14 in one weight: GEMV and GEMM stay exact in fp32."""
    n, k = _shape(fmt)
    _check_close(fmt, m, n, k, torch.float32, _DEVICE, seed=4, extreme=True)


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
@pytest.mark.parametrize("m", [1, 3, GEMV_MAX_M, 16, 64, 77, 512])
def test_cuda_bf16(fmt: str, m: int) -> None:
    """Real shapes: N = 1000 splits K over programs at M <= 8; 4096 x 14336 is a down projection."""
    _check_close(fmt, m, 1000, 2048, torch.bfloat16, "cuda")
    if m in (1, GEMV_MAX_M):
        _check_close(fmt, m, 512, 14336, torch.bfloat16, "cuda", seed=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["q4k", "q6k", "q4_0"])
def test_cuda_graph_deterministic(fmt: str) -> None:
    """Split-K GEMV: bitwise equal across calls and when replayed from a CUDA graph."""
    gen = torch.Generator().manual_seed(6)
    w = pack_weight(random_blocks(fmt, 1024, 4096, gen).cuda(), fmt, 1024, 4096)
    x = torch.randn(1, 4096, generator=gen).to(torch.bfloat16).cuda()
    first = qmatmul_packed(x, w)
    assert torch.equal(first, qmatmul_packed(x, w))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qmatmul_packed(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)
