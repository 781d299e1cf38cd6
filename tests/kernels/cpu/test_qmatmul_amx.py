"""The quantized matmul's AMX paths (kernels/cpu/qmatmul_amx.h), on an AVX-512 library and a CPU with
AMX. The int8 path (32 activation rows and more) must give the VNNI loops' outputs bit for bit, so
that a sequence's logits do not depend on how many rows share its matmul (the VNNI path's own tests
prove those outputs against the reference, test_qmatmul_vnni.py). The bf16 path (qmatmul_bf16) must
compute the dense copies' arithmetic, bf16 weights and activations summed in float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.qmatmul_cpu import KERNEL_BF16_MIN_ROWS, CpuQMatmul, weight_form
from llmc.kernels.cpu.qmatmul_vnni import (
    FORMATS,
    bf16_path_available,
    kquant_form_available,
    pack,
    pack_kquant_form,
    parts,
    qmatmul,
    qmatmul_bf16,
    reference_bf16_matmul,
    unpack,
)
from llmc.quant.formats import FORMATS as BLOCK_FORMATS
from llmc.quant.synthetic import random_blocks

AMX_MIN_ROWS = 32  # kAmxMinRows: fewer rows never take the AMX path
VNNI_ROWS = 8  # rows per call of the reference: always the VNNI loops
# Row counts: the smallest the AMX path takes, whole tiles, and tails the VNNI loops finish.
ROWS = [32, 47, 64, 100]
CHILD_TIMEOUT_S = 300  # a child only loads the (cached) library and asks it one question


def _amx_or_skip() -> None:
    if not cpu_kernels.uses_amx():
        pytest.skip(
            f"the AMX path does not run here (kernel library {cpu_kernels.loaded_isa()}; it needs the AVX-512 one, "
            "a CPU with AMX and Linux's grant of the tile state)"
        )


def _forms(fmt: str, k: int) -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(3)
    blocks = random_blocks(fmt, 48, k, gen)
    bits, split = parts(blocks, fmt)
    forms = [("general", *pack(*split, bits), bits)]
    if kquant_form_available(fmt):
        kbits, weight, scales = pack_kquant_form(blocks, fmt)
        forms.append((f"{fmt} form", weight, scales, kbits))
    return forms


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", ROWS)
def test_amx_rows_equal_the_vnni_rows_bit_for_bit(cpu_kernels_loaded: None, fmt: str, m: int) -> None:
    _amx_or_skip()
    k = 768 if BLOCK_FORMATS[fmt].block_size == 256 else 352  # several groups; 11 of 32 or 22 of 16 inputs
    for name, weight, scales, bits in _forms(fmt, k):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 4
        x[0, :7] = 0.0  # a row's group of zeros and a huge value: the int8 range's ends
        x[1, 3] = 1e4
        together = qmatmul(x, weight, scales, bits)
        apart = torch.cat([qmatmul(x[i : i + VNNI_ROWS], weight, scales, bits) for i in range(0, m, VNNI_ROWS)])
        assert torch.equal(together, apart), f"{fmt} ({name}, bits {bits}), {m} rows"


def _child_reports(env: dict[str, str]) -> dict[str, object]:
    script = (
        "import json, sys\n"
        "from llmc.kernels.cpu import cpu_kernels\n"
        "from llmc.benchmarks.cpu_kernels import load_isa\n"
        "load_isa('avx512_vnni')\n"
        "from llmc.kernels.cpu.qmatmul_vnni import bf16_path_available\n"
        "print(json.dumps({'amx': cpu_kernels.uses_amx(), 'bf16': bf16_path_available(),\n"
        "                  'variant': cpu_kernels.loaded_variant()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_llmc_cpu_amx_0_turns_the_amx_path_off(cpu_kernels_loaded: None) -> None:
    """The switch for measurements and for a host whose AMX misbehaves; and the variant that keys
    the weight-form measurements says which path ran."""
    _amx_or_skip()
    on = _child_reports({**os.environ})
    off = _child_reports({**os.environ, "LLMC_CPU_AMX": "0"})
    assert on == {"amx": True, "bf16": bf16_path_available(), "variant": "avx512_vnni+amx"}
    assert off == {"amx": False, "bf16": False, "variant": "avx512_vnni"}


def _bf16_or_skip() -> None:
    if not bf16_path_available():
        pytest.skip("the bf16 path does not run here (it needs the AVX-512 library and a CPU with AMX-BF16)")


# Row counts of the bf16 path: one row, tiles' tails, whole tiles, an odd number of tiles.
BF16_ROWS = [1, 15, 16, 33, 100]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", BF16_ROWS)
def test_the_bf16_path_computes_the_dense_copies_arithmetic(cpu_kernels_loaded: None, fmt: str, m: int) -> None:
    """Against bf16(x) @ bf16(w)^T summed in float64, w each form's own weights (unpack): only the
    float32 summation's order and rounding differ."""
    _bf16_or_skip()
    k = 768 if BLOCK_FORMATS[fmt].block_size == 256 else 352
    for name, weight, scales, bits in _forms(fmt, k):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 4
        y = qmatmul_bf16(x, weight, scales, bits)
        expected = reference_bf16_matmul(x, unpack(weight, scales, bits))
        assert y.shape == (m, weight.shape[0] * 16) and y.dtype == torch.float32
        assert float((y - expected).norm() / expected.norm()) < 1e-5, f"{fmt} ({name}, bits {bits}), {m} rows"


def test_cpu_qmatmul_takes_the_bf16_path_from_its_rows_without_a_dense_copy(cpu_kernels_loaded: None) -> None:
    _bf16_or_skip()
    blocks = random_blocks("q4k", 64, 512, torch.Generator().manual_seed(5))
    layer = CpuQMatmul(blocks, "q4k", dense_copy=False, cpu_kernels=True)
    weight, scales, bits = layer.kernel_weight, layer.kernel_scales, layer.kernel_bits
    assert weight is not None and scales is not None and layer.dense is None
    x = torch.randn(KERNEL_BF16_MIN_ROWS, 512, generator=torch.Generator().manual_seed(6))
    assert torch.equal(layer(x), qmatmul_bf16(x, weight, scales, bits))
    assert torch.equal(layer(x[:-1]), qmatmul(x[:-1], weight, scales, bits))  # below the threshold
    with weight_form(layer, "packed"):  # what a compiled package traces: the int8 path whatever the rows
        assert torch.equal(layer(x), qmatmul(x, weight, scales, bits))
    kept = CpuQMatmul(blocks, "q4k", dense_copy=True, cpu_kernels=True)  # a dense copy is kept: it serves
    assert kept.dense is not None and not kept.bf16_path
