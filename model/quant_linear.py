"""Linear and embedding layers whose weight is GGML blocks (uint8 [rows, row_bytes]).

The blocks stay as the artifact stores them (memory-mapped); `prepare` builds the device's
fast form once, when the model loads, with the matmul the device chooses (a MatmulFactory: on
the CPU `kernels.qmatmul_cpu.CpuQMatmul`, runtime/backends/cpu.py). The layers know no device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmc.quant.formats import stored_format

# A device's quantized matmul: (GGML blocks [rows, row_bytes], format) -> a module that maps
# activations [M, in_features] to [M, rows] in their dtype.
MatmulFactory = Callable[[torch.Tensor, str], nn.Module]


class QuantLinear(nn.Module):
    def __init__(self, fmt: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        info = stored_format(fmt)
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, info.row_bytes(in_features), dtype=torch.uint8), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.prepared: nn.Module | None = None

    def prepare(self, matmul: MatmulFactory) -> None:
        """Build the device's fast form of the blocks with its `matmul`."""
        self.prepared = matmul(self.weight.data, self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.prepared is not None, "build_model prepares every QuantLinear before the first step"
        y: torch.Tensor = self.prepared(x)
        return y if self.bias is None else y + self.bias


class FusedQuantLinear(nn.Module):
    """Quantized linears that read the same input (q/k/v, gate/up) as one matmul over their rows
    stacked: one int4 kernel call instead of two or three, which matters in decode, where each
    call is a few microseconds of a small matrix (SmolLM2's q/k/v: 19.5 µs fused vs 29 µs apart).
    A GGML block row depends only on its own row, so stacking the blocks is exact."""

    bias: torch.Tensor | None

    def __init__(self, parts: list[QuantLinear], matmul: MatmulFactory) -> None:
        super().__init__()
        self.sizes = [part.out_features for part in parts]
        self.prepared = matmul(torch.cat([part.weight.data for part in parts]), parts[0].fmt)
        biases = [part.bias for part in parts]
        bias = torch.cat([b.data for b in biases if b is not None]) if biases[0] is not None else None
        self.register_buffer("bias", bias, persistent=False)

    @staticmethod
    def fusable(parts: list[nn.Module]) -> bool:
        """QuantLinears of one format whose biases are all present or all absent."""
        if not all(isinstance(part, QuantLinear) for part in parts):
            return False
        quant = [part for part in parts if isinstance(part, QuantLinear)]
        return len({part.fmt for part in quant}) == 1 and len({part.bias is None for part in quant}) == 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y: torch.Tensor = self.prepared(x)
        if self.bias is not None:
            y = y + self.bias
        return tuple(y.split(self.sizes, dim=-1))


class QuantEmbedding(nn.Module):
    """A lookup that dequantizes only the rows it gathers (a step touches a few rows of the table)."""

    def __init__(self, fmt: str, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.info = stored_format(fmt)
        self.fmt = fmt
        self.dtype = dtype
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, self.info.row_bytes(embedding_dim), dtype=torch.uint8), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, ids.reshape(-1))
        return self.info.dequantize(rows).to(self.dtype).reshape(*ids.shape, -1)
