"""The decoder's small shared layers: norms, activations and the gated MLP (dense layers and MoE
shared experts)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmc.artifacts.manifest import ModelSpec
from llmc.kernels.casts import cast
from llmc.model.quant_linear import FusedQuantLinear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = cast(x, torch.float32)
        # The mean square accumulates in float64: summed in any order (eager kernels and the
        # compiled step's fused loops differ) it then rounds to the same float32, so compiled and
        # eager steps agree bit for bit even where bf16 rounding would amplify a last-bit change.
        mean_square = x32.double().pow(2).mean(-1, keepdim=True)
        x32 = x32 * cast(torch.rsqrt(mean_square + self.eps), torch.float32)
        if self.offset:  # Gemma scales in float32 by (1 + weight), then casts
            return cast(x32 * (self.offset + cast(self.weight, torch.float32)), x.dtype)
        return self.weight * cast(x32, x.dtype)


def make_norm(spec: ModelSpec, dim: int) -> nn.Module:
    if spec.norm == "layer":
        return nn.LayerNorm(dim, eps=spec.rms_norm_eps)
    return RMSNorm(dim, spec.rms_norm_eps, spec.norm_weight_offset)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, intermediate: int | None = None) -> None:
        super().__init__()
        bias = spec.mlp_bias
        size = intermediate or spec.intermediate_size
        self.gate_proj = nn.Linear(spec.hidden_size, size, bias=bias)
        self.up_proj = nn.Linear(spec.hidden_size, size, bias=bias)
        self.down_proj = nn.Linear(size, spec.hidden_size, bias=bias)
        self.act = ACTIVATIONS[spec.hidden_act]
        self.gate_up: FusedQuantLinear | None = None  # gate/up as one matmul (fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)
