"""CPU quantized matmuls (int4 packing for q4_0/q4_1/q4k, bf16 dense for the rest) against the
reference: dequantize in float32, then multiply."""

from __future__ import annotations

import pytest
import torch

from llmc.kernels import quant_legacy
from llmc.kernels.qmatmul_cpu import INT4_FORMATS, CpuQMatmul, int4_parts
from llmc.kernels.quant_formats import FORMATS, reference_qmatmul
from tests.kernels.blocks import random_blocks

# Activations are rounded to bf16 (8 significant bits) before the multiply, so outputs agree with
# the float32 reference to about bf16's precision relative to the output's scale.
_BF16_TOL = 2e-2


@pytest.mark.parametrize("fmt", INT4_FORMATS)
def test_int4_parts_reproduce_the_reference_dequantizer_exactly(fmt: str) -> None:
    blocks = random_blocks(fmt, 24, 512, torch.Generator().manual_seed(1))
    q, scale, offset = int4_parts(blocks, fmt)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    rebuilt = (q.float().view(24, -1, 32) * scale[..., None] + offset[..., None]).reshape(24, 512)
    assert torch.equal(rebuilt, FORMATS[fmt].dequantize(blocks))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 512), (3, 40, 256), (17, 96, 768)])
def test_fast_path_matches_reference(fmt: str, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n)
    blocks = random_blocks(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen)
    want = reference_qmatmul(x, blocks, fmt)
    got = CpuQMatmul(blocks, fmt)(x)
    assert got.dtype == x.dtype and got.shape == (m, n)
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, atol=_BF16_TOL, rtol=0)


def test_q8_0_is_an_exact_sum_of_two_int4_weights() -> None:
    blocks = random_blocks("q8_0", 24, 512, torch.Generator().manual_seed(2))
    total = torch.zeros(24, 512)
    for q, scale, offset in quant_legacy.int4_pair_q8_0(blocks):
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        total += (q.float().view(24, -1, 32) * scale[..., None] + offset[..., None]).reshape(24, 512)
    assert torch.equal(total, FORMATS["q8_0"].dequantize(blocks))
