"""The format table and its codecs are the bottom floor: part of the artifact contract, they import
nothing of the builder, the runtime or the kernels (and the table not even torch: `llmc inspect`
reads it), and every format's registry entry reaches its codec."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmc.quant.formats import FORMATS

CHILD_TIMEOUT_S = 120  # a cold Python import of torch on a loaded 2-core CI machine
ROWS = 3  # a few rows: each is its own run of blocks


def _llmc_modules_after(code: str) -> tuple[list[str], bool]:
    """The llmc modules a fresh interpreter holds after running `code`, and whether torch is among its modules."""
    report = "[sorted(m for m in sys.modules if m.startswith('llmc')), 'torch' in sys.modules]"
    probe = f"{code}; import sys, json; print(json.dumps({report}))"
    result = subprocess.run(
        [sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=True
    )
    modules, has_torch = json.loads(result.stdout.splitlines()[-1])
    return modules, has_torch


def test_the_format_table_imports_nothing_above_it_not_even_torch() -> None:
    modules, has_torch = _llmc_modules_after("import llmc.quant.formats")
    assert modules == ["llmc", "llmc.errors", "llmc.quant", "llmc.quant.formats"]
    assert not has_torch


def test_the_reference_codecs_import_nothing_from_builder_runtime_or_kernels() -> None:
    modules, _ = _llmc_modules_after("import llmc.quant.legacy, llmc.quant.kquants")
    assert all(name in ("llmc", "llmc.errors") or name.startswith("llmc.quant") for name in modules), modules


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reaches_its_codec(name: str) -> None:
    fmt = FORMATS[name]
    weight = torch.randn(ROWS, 2 * fmt.block_size, generator=torch.Generator().manual_seed(0))
    blocks = fmt.quantize(weight)
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (ROWS, fmt.row_bytes(weight.shape[1]))
    restored = fmt.dequantize(blocks)
    assert restored.dtype == torch.float32 and restored.shape == weight.shape
    # Any codec of these formats lands nearer the weights than zero does.
    assert (restored - weight).square().mean() < weight.square().mean()
