"""llmc's RMSNorm op (kernels/cpu/rms_norm.cpp) against its plain-torch reference, the model's own
RMSNorm, bit for bit; and the model's norms taking it where the library is loaded."""

from __future__ import annotations

import pytest
import torch

from llmc.kernels.cpu.rms_norm import CpuRMSNorm, use_cpu_rms_norm
from llmc.model.layers import RMSNorm


def _norm(dim: int, eps: float, seed: int) -> RMSNorm:
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize(
    ("shape", "eps"),
    [
        ((1, 576), 1e-5),  # decode, one sequence (SmolLM2's width)
        ((3, 576), 1e-6),
        ((64, 3072), 1e-5),  # a big batch at 3B's width
        ((513, 576), 1e-5),  # a prefill chunk: rows shared between threads
        ((2, 7), 1e-5),  # fewer values than the partial sums: the tail loop only
        ((5, 4, 67), 1e-6),  # 3-D (a q/k norm over heads), a width past whole groups of 8
    ],
)
def test_op_matches_the_models_rms_norm_exactly(cpu_kernels_loaded: None, shape: tuple[int, ...], eps: float) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.rand((*shape[:-1], 1), generator=gen) * 40
    reference = _norm(shape[-1], eps, seed=len(shape))
    got = torch.ops.llmc.rms_norm(x, reference.weight, eps)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.equal(got, reference(x))


def test_empty_and_zero_rows(cpu_kernels_loaded: None) -> None:
    norm = _norm(16, 1e-5, seed=1)
    assert torch.ops.llmc.rms_norm(torch.empty(0, 16), norm.weight, 1e-5).shape == (0, 16)
    zeros = torch.zeros(2, 16)
    assert torch.equal(torch.ops.llmc.rms_norm(zeros, norm.weight, 1e-5), norm(zeros))  # eps keeps it finite


@pytest.mark.parametrize("shape", [(0, 16), (3, 0), (2, 0, 5), (4, 3, 8)])
def test_outputs_have_torchs_contiguous_strides(cpu_kernels_loaded: None, shape: tuple[int, ...]) -> None:
    """The ops allocate through the C shim (kernels/cpu/torch_stable.h), which takes the strides it
    is given: they must be the ones torch gives a contiguous tensor, zero-sized dimensions included."""
    got = torch.ops.llmc.rms_norm(torch.zeros(shape), torch.ones(shape[-1]), 1e-5)
    assert got.shape == shape and got.stride() == torch.empty(shape).stride() and got.is_contiguous()


def test_bad_inputs_are_refused(cpu_kernels_loaded: None) -> None:
    weight = torch.ones(8)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llmc.rms_norm(torch.ones(2, 8, dtype=torch.float64), weight, 1e-5)
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.llmc.rms_norm(torch.ones(2, 9), weight, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.llmc.rms_norm(torch.ones(8, 2).T, weight, 1e-5)


def test_model_norms_take_the_op_where_it_applies(cpu_kernels_loaded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every plain RMSNorm becomes a CpuRMSNorm; it calls the op for float32 contiguous rows without
    an offset and computes as before otherwise (an offset norm, a strided view, bfloat16)."""
    model = torch.nn.Sequential(_norm(8, 1e-5, seed=2), RMSNorm(8, 1e-6, offset=1.0), torch.nn.LayerNorm(8))
    assert use_cpu_rms_norm(model) == 2
    assert [type(m) for m in model] == [CpuRMSNorm, CpuRMSNorm, torch.nn.LayerNorm]
    calls: list[tuple[int, ...]] = []
    op = torch.ops.llmc.rms_norm

    def counted(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return op(x, weight, eps)

    monkeypatch.setattr(torch.ops.llmc, "rms_norm", counted)
    x = torch.randn(4, 8)
    plain, offset = model[0], model[1]
    assert torch.equal(plain(x), RMSNorm.forward(plain, x)) and calls == [(4, 8)]
    assert torch.equal(offset(x), RMSNorm.forward(offset, x))  # Gemma's (1 + weight): the reference
    strided = torch.randn(8, 4).T
    assert torch.equal(plain(strided), RMSNorm.forward(plain, strided))
    half = x.to(torch.bfloat16)
    assert torch.equal(plain(half), RMSNorm.forward(plain, half))
    assert calls == [(4, 8)]  # only the first went to the op
