"""CPU quantized matmuls (int4 packing for q4_0/q4_1/q4k, bf16 dense for the rest) against the
reference: dequantize in float32, then multiply."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from llmc.kernels.cpu.qmatmul_cpu import (
    INT4_DENSE_MIN_ROWS,
    INT4_FORMATS,
    PAIR_DENSE_MIN_ROWS,
    PAIR_FORMATS,
    WEIGHT_FORMS,
    CpuQMatmul,
    has_dense_choice,
    int4_parts,
    weight_form,
)
from llmc.quant import legacy
from llmc.quant.formats import FORMATS, reference_qmatmul
from llmc.quant.synthetic import random_blocks

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


@pytest.mark.parametrize("fmt", INT4_FORMATS)
def test_int4_dense_copy_equals_the_dequantized_weight_in_bf16(fmt: str) -> None:
    blocks = random_blocks(fmt, 48, 512, torch.Generator().manual_seed(4))
    matmul = CpuQMatmul(blocks, fmt, dense_copy=True)
    assert matmul.dense is not None
    assert torch.equal(matmul.dense, FORMATS[fmt].dequantize(blocks).to(torch.bfloat16))


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


@pytest.mark.parametrize("fmt", PAIR_FORMATS)
def test_pair_formats_are_an_exact_sum_of_two_int4_weights(fmt: str) -> None:
    blocks = random_blocks(fmt, 24, 512, torch.Generator().manual_seed(2))
    total = torch.zeros(24, 512)
    for q, scale, offset in getattr(legacy, f"int4_pair_{fmt}")(blocks):
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        total += (q.float().view(24, -1, 32) * scale[..., None] + offset[..., None]).reshape(24, 512)
        # The kernel's zero point, offset + 8 * scale, must be d times a power of two (or 0) where
        # the format has no stored minimum, so that its bf16 rounding is d's and not a new error.
        if fmt != "q5_1":
            zero = offset + 8 * scale
            assert torch.equal(zero.bfloat16().float() * scale, zero * scale.bfloat16().float())
    assert torch.equal(total, FORMATS[fmt].dequantize(blocks))


@pytest.mark.parametrize("fmt", ["q4_0", "q4k", "q8_0", "q5_0"])
@pytest.mark.parametrize("m", [1, PAIR_DENSE_MIN_ROWS, INT4_DENSE_MIN_ROWS - 1, INT4_DENSE_MIN_ROWS, 33])
def test_dense_copy_matches_reference_on_either_side_of_the_switch(fmt: str, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    blocks = random_blocks(fmt, 48, 512, gen)
    x = torch.randn(m, 512, generator=gen)
    want = reference_qmatmul(x, blocks, fmt)
    matmul = CpuQMatmul(blocks, fmt, dense_copy=True)
    assert matmul.packed is not None and matmul.dense is not None
    scale = want.abs().max()
    torch.testing.assert_close(matmul(x) / scale, want / scale, atol=_BF16_TOL, rtol=0)


def _dense_product(x: torch.Tensor, blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.nn.functional.linear(x.bfloat16(), FORMATS[fmt].dequantize(blocks).bfloat16()).float()


@pytest.mark.parametrize(("fmt", "switch"), [("q4_0", INT4_DENSE_MIN_ROWS), ("q8_0", PAIR_DENSE_MIN_ROWS)])
def test_rows_choose_the_form_unless_pinned(fmt: str, switch: int) -> None:
    blocks = random_blocks(fmt, 32, 256, torch.Generator().manual_seed(3))
    model = torch.nn.Sequential(CpuQMatmul(blocks, fmt, dense_copy=True))
    x = torch.randn(switch, 256)
    dense = _dense_product(x, blocks, fmt)
    assert torch.equal(model(x), dense)  # from the switch on: the bf16 GEMM
    assert not torch.equal(model(x[:-1]), dense[:-1])  # below it: the int4 kernel, which rounds otherwise
    with weight_form(model, "packed"):
        assert torch.equal(model(x)[:1], model(x[:1]))  # the int4 kernel whatever the rows
    with weight_form(model, "dense"):
        pinned = model(x[:1])
    assert torch.equal(pinned, dense[:1]) == (switch <= WEIGHT_FORMS["dense"])
    assert has_dense_choice(model) == (switch <= WEIGHT_FORMS["dense"])
    assert not has_dense_choice(torch.nn.Sequential(CpuQMatmul(blocks, fmt)))


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "q6k"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_fused_projections_equal_the_separate_ones(fmt: str, m: int) -> None:
    """q/k/v as one matmul over stacked block rows gives what three matmuls give, bias included."""
    from llmc.model.quant_linear import FusedQuantLinear, QuantLinear

    matmul = partial(CpuQMatmul, dense_copy=True)

    gen = torch.Generator().manual_seed(m)
    parts = []
    for rows in (64, 32, 32):
        layer = QuantLinear(fmt, 256, rows, bias=True, dtype=torch.float32)
        layer.weight.data = random_blocks(fmt, rows, 256, gen)
        layer.bias.data = torch.randn(rows, generator=gen)  # type: ignore[union-attr]
        layer.prepare(matmul)
        parts.append(layer)
    assert FusedQuantLinear.fusable(parts)
    fused = FusedQuantLinear(parts, matmul)
    x = torch.randn(m, 256, generator=gen)
    for got, part in zip(fused(x), parts, strict=True):
        want = part(x)
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, atol=1e-6, rtol=0)
