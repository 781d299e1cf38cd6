"""The quantized matmul's AMX path (kernels/cpu/qmatmul_amx.h): 32 activation rows and more, on an
AVX-512 library and a CPU with AMX. It must give the VNNI loops' outputs bit for bit, so that a
sequence's logits do not depend on how many rows share its matmul (the VNNI path's own tests
prove those outputs against the reference, test_qmatmul_vnni.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.qmatmul_vnni import FORMATS, kquant_form_available, pack, pack_kquant_form, parts, qmatmul
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
        "print(json.dumps({'amx': cpu_kernels.uses_amx(), 'variant': cpu_kernels.loaded_variant()}))\n"
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
    assert on == {"amx": True, "variant": "avx512_vnni+amx"}
    assert off == {"amx": False, "variant": "avx512_vnni"}
