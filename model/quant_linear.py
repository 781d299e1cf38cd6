"""Linear and embedding layers whose weight is GGML blocks (uint8 [rows, row_bytes]).

The blocks stay as the artifact stores them (memory-mapped); `prepare` builds the device's
fast form once, when the model loads: on the CPU `kernels.qmatmul_cpu`, on CUDA the Triton
kernels of `kernels.qmatmul_triton`, which read the blocks themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from llmc.kernels.qmatmul_cpu import CpuQMatmul
from llmc.kernels.quant_formats import stored_format


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
        self.prepared: CpuQMatmul | None = None

    def prepare(self, dense_copy: bool = False, vnni: bool = False) -> None:
        """Build the CPU's fast form; `dense_copy` also keeps a bf16 copy for many-row calls,
        `vnni` takes llmc's VNNI kernel where it can (kernels/qmatmul_cpu.py)."""
        if self.weight.device.type == "cpu":
            self.prepared = CpuQMatmul(self.weight.data, self.fmt, dense_copy, vnni)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type == "cuda":
            from llmc.kernels.qmatmul_triton import qmatmul

            y = qmatmul(x, self.weight, self.fmt, self.out_features, self.in_features)
        else:
            assert self.prepared is not None, "build_model prepares every QuantLinear before the first step"
            y = self.prepared(x)
        return y if self.bias is None else y + self.bias


class FusedQuantLinear(nn.Module):
    """Quantized linears that read the same input (q/k/v, gate/up) as one matmul over their rows
    stacked: one int4 kernel call instead of two or three, which matters in decode, where each
    call is a few microseconds of a small matrix (SmolLM2's q/k/v: 19.5 µs fused vs 29 µs apart).
    A GGML block row depends only on its own row, so stacking the blocks is exact."""

    bias: torch.Tensor | None

    def __init__(self, parts: list[QuantLinear], dense_copy: bool, vnni: bool = False) -> None:
        super().__init__()
        self.sizes = [part.out_features for part in parts]
        self.prepared = CpuQMatmul(torch.cat([part.weight.data for part in parts]), parts[0].fmt, dense_copy, vnni)
        biases = [part.bias for part in parts]
        bias = torch.cat([b.data for b in biases if b is not None]) if biases[0] is not None else None
        self.register_buffer("bias", bias, persistent=False)

    @staticmethod
    def fusable(parts: list[nn.Module]) -> bool:
        """CPU QuantLinears of one format whose biases are all present or all absent."""
        if not all(isinstance(part, QuantLinear) and part.weight.device.type == "cpu" for part in parts):
            return False
        quant = [part for part in parts if isinstance(part, QuantLinear)]
        return len({part.fmt for part in quant}) == 1 and len({part.bias is None for part in quant}) == 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.prepared(x)
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
