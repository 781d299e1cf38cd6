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

    def prepare(self, dense_copy: bool = False) -> None:
        """Build the CPU's fast form; `dense_copy` also keeps a bf16 copy for many-row calls."""
        if self.weight.device.type == "cpu":
            self.prepared = CpuQMatmul(self.weight.data, self.fmt, dense_copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type == "cuda":
            from llmc.kernels.qmatmul_triton import qmatmul

            y = qmatmul(x, self.weight, self.fmt, self.out_features, self.in_features)
        else:
            assert self.prepared is not None, "build_model prepares every QuantLinear before the first step"
            y = self.prepared(x)
        return y if self.bias is None else y + self.bias


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
