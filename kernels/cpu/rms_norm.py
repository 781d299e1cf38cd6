"""llmc's CPU RMSNorm (kernels/cpu/rms_norm.cpp): the model's RMSNorm as one op of the kernel
library. Its plain-torch reference is the model's own `RMSNorm.forward` (model/layers.py), which
it matches bit for bit.

It exists for the compile: as torch ops, every norm of every layer is a float64 reduction and
five element-wise ops that Inductor lowers and generates code for, about a third of the decode
step's cold compile; as one op, one call (docs/BENCHMARKS.md). Eager steps (prefill) take it too,
so that compiled and eager steps keep computing the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from llmc.model.layers import RMSNorm


class CpuRMSNorm(RMSNorm):
    """RMSNorm through `llmc::rms_norm` where it applies (float32 activations and weight, no
    Gemma-style offset, contiguous rows: the hidden states of every layer); elsewhere (a q/k norm
    over a strided view, another dtype) the reference computation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or not x.is_contiguous():
            return super().forward(x)
        out: torch.Tensor = torch.ops.llmc.rms_norm(x, self.weight, self.eps)
        return out


def use_cpu_rms_norm(model: nn.Module) -> int:
    """Make every RMSNorm of `model` compute with the kernel library's op (the library must be
    loaded); the number of norms."""
    norms = [module for module in model.modules() if type(module) is RMSNorm]
    for norm in norms:
        norm.__class__ = CpuRMSNorm
    return len(norms)
