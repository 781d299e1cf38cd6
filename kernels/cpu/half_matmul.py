"""llmc's CPU matmul over float16 / bfloat16 weights (kernels/cpu/half_matmul_driver.h, every ISA)
and its plain-torch reference.

A checkpoint's unquantized tensors (the embedding and lm_head of GPTQ and AWQ checkpoints) come in
float16 or bfloat16; a float32 build keeps them so (builder/build.py), since widening is exact. The
kernel widens each weight as it reads it and sums in float32: half the bytes of a float32 copy,
and every thread reads its share (torch's float32 matmul of one row runs on one thread).
"""

from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def reference_half_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in plain torch (float64 sums): float32(x) @ widened(weight).T."""
    return (x.float().double() @ weight.double().T).float()


class CpuHalfMatmul(nn.Module):
    """x [M, K] (any float dtype) @ a float16 / bfloat16 weight [N, K], transposed, → [M, N] in
    float32 (the logits' dtype), with the library's kernel. The weight stays as the artifact stores
    it (memory-mapped, shared with a tied embedding)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        if weight.dtype not in HALF_DTYPES or weight.dim() != 2:
            raise ValueError(f"CpuHalfMatmul takes a 2-D float16 or bfloat16 weight, not {weight.dtype}")
        # A parameter, as nn.Linear's was: a tied table is the embedding's parameter too, and
        # torch.export cannot unlift one tensor as a parameter and a buffer at once.
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.llmc.half_matmul(x, self.weight)
        return out
