"""The logits of a model whose lm_head the artifact stores in float16 or bfloat16 while it computes
in float32 (builder/build.py keeps a checkpoint's unquantized embedding / lm_head in its own
16-bit dtype: widening is exact, and it halves the bytes every token reads).

The device's factory (DeviceKernels.half_matmul) makes the module; a device without a kernel for
16-bit weights widens them once at load (WidenedLinear), which computes the same values with the
memory of a float32 copy. The layers know no device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# A device's matmul over a 16-bit weight: (weight [N, K] float16 / bfloat16, compute dtype) -> a
# module that maps activations [M, K] to [M, N] (float32 or the compute dtype).
HalfMatmulFactory = Callable[[torch.Tensor, torch.dtype], nn.Module]


class WidenedLinear(nn.Module):
    """x @ weight.T with the weight widened to the compute dtype once, at load."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def narrower_than(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `weight` is a float stored in fewer bits than the compute dtype."""
    return weight.is_floating_point() and weight.dtype.itemsize < dtype.itemsize
