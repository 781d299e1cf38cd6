"""kernel_form.cpp: GGML blocks into the matmul's layout in one pass, byte for byte what the torch
path (`pack(*parts(blocks, fmt))`) makes, for every format it takes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmc.kernels.cpu import qmatmul_vnni
from llmc.kernels.cpu.qmatmul_cpu import CpuQMatmul
from llmc.quant.formats import FORMATS

pytestmark = pytest.mark.usefixtures("cpu_kernels_loaded")

NATIVE = list(qmatmul_vnni.FORMATS)  # every format the kernel takes


def _blocks(fmt: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, a zero row and a row with one outlier: every scale path.
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)
    w[0] = 0
    w[1, 5] = 1e3
    return FORMATS[fmt].quantize(w)


@pytest.mark.parametrize("fmt", NATIVE)
@pytest.mark.parametrize("shape", [(16, 256), (48, 512), (64, 1536)])
def test_the_library_packs_exactly_as_the_torch_path(fmt: str, shape: tuple[int, int]) -> None:
    blocks = _blocks(fmt, *shape, seed=shape[0])
    native = qmatmul_vnni.native_pack(blocks, fmt)
    assert isinstance(native, tuple), "the library takes this format"
    bits, weight, scales = native
    expected_bits, parts = qmatmul_vnni.parts(blocks, fmt)
    expected_weight, expected_scales = qmatmul_vnni.pack(*parts, expected_bits)
    assert bits == expected_bits
    assert torch.equal(weight, expected_weight)
    assert torch.equal(scales.view(torch.int16), expected_scales.view(torch.int16))  # the float16 bits


def test_a_scale_float16_cannot_hold_is_refused_as_by_scales_fit() -> None:
    blocks = _blocks("q4_1", 16, 256, seed=1).clone()
    # q4_1's offset is the block's float16 minimum: make one the largest finite float16 and the
    # scale of another row infinite, as a stranger's file could.
    blocks.view(16, -1, 20)[3, 0, 2:4] = torch.tensor([0xFF, 0x7B], dtype=torch.uint8)  # 65504: fits
    assert isinstance(qmatmul_vnni.native_pack(blocks, "q4_1"), tuple)
    blocks.view(16, -1, 20)[4, 1, 0:2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # +inf scale
    assert qmatmul_vnni.native_pack(blocks, "q4_1") is False
    _, parts = qmatmul_vnni.parts(blocks, "q4_1")
    assert not qmatmul_vnni.scales_fit(*parts[1:])


def test_fake_weights_take_the_torch_path() -> None:
    with torch._subclasses.FakeTensorMode():
        fake = torch.empty(16, 144, dtype=torch.uint8)
        assert qmatmul_vnni.native_pack(fake, "q4k") is None


@pytest.mark.parametrize("fmt", NATIVE)
def test_a_layer_built_through_the_library_computes_as_before(fmt: str) -> None:
    blocks = _blocks(fmt, 32, 512, seed=3)
    layer = CpuQMatmul(blocks, fmt, cpu_kernels=True)
    assert layer.form == "kernel"
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))
    if fmt in qmatmul_vnni.KQUANT_FORMS:  # its K-quant form, which this library takes
        bits, weight, scales = qmatmul_vnni.pack_kquant_form(blocks, fmt)
    else:
        bits, parts = qmatmul_vnni.parts(blocks, fmt)
        weight, scales = qmatmul_vnni.pack(*parts, bits)
    assert layer.kernel_bits == bits
    assert torch.equal(layer(x), qmatmul_vnni.qmatmul(x, weight, scales, bits))


@pytest.mark.parametrize("fmt", list(qmatmul_vnni.KQUANT_FORMS))
@pytest.mark.parametrize("shape", [(16, 256), (48, 512), (64, 1536)])
def test_the_library_makes_the_kquant_forms_exactly_as_the_torch_path(fmt: str, shape: tuple[int, int]) -> None:
    blocks = _blocks(fmt, *shape, seed=shape[0])
    bits, weight, scales = qmatmul_vnni.kquant_form(blocks, fmt)
    expected_bits, expected_weight, expected_scales = qmatmul_vnni.pack_kquant_form(blocks, fmt)
    assert bits == expected_bits
    assert torch.equal(weight, expected_weight)
    assert torch.equal(scales.view(torch.int16), expected_scales.view(torch.int16))  # the float16 bits


@pytest.mark.parametrize("fmt", list(qmatmul_vnni.KQUANT_FORMS))
def test_a_library_without_the_kquant_forms_gets_the_general_form(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """An artifact of an older llmc ships a library that takes bits 4 and 8 only, and packages traced
    for them: its q6k and q4k weights keep the general form."""
    blocks = _blocks(fmt, 32, 512, seed=5)
    assert CpuQMatmul(blocks, fmt, cpu_kernels=True).kernel_bits == qmatmul_vnni.KQUANT_FORMS[fmt]
    older = SimpleNamespace(kernel_form=torch.ops.llmc.kernel_form, qmatmul=torch.ops.llmc.qmatmul)  # no qmatmul_bits
    monkeypatch.setattr(torch.ops, "llmc", older)
    assert not qmatmul_vnni.kquant_form_available(fmt)
    layer = CpuQMatmul(blocks, fmt, cpu_kernels=True)
    assert layer.kernel_bits == qmatmul_vnni.parts(blocks, fmt)[0] and layer.kernel_weight is not None
    assert layer.kernel_weight.numel() == 32 * 512 * layer.kernel_bits // 8


def test_the_library_converts_every_format_the_kernel_takes() -> None:
    assert set(qmatmul_vnni._NATIVE_CODES) == set(qmatmul_vnni.FORMATS)
    assert len(set(qmatmul_vnni._NATIVE_CODES.values())) == len(qmatmul_vnni._NATIVE_CODES)
