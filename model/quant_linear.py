"""Linear and embedding layers whose weight is GGML blocks (uint8 [rows, row_bytes]).

The blocks stay as the artifact stores them (memory-mapped); `prepare` builds the device's
fast form once, when the model loads, with the matmul the device chooses (a MatmulFactory: on
the CPU `kernels.qmatmul_cpu.CpuQMatmul`, runtime/backends/cpu.py). The layers know no device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmc.errors import BadArtifactError
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
        # The order the blocks store the input columns in (act-order GPTQ / compressed-tensors,
        # builder/sources/prequantized.py): the input is gathered in it. None: the natural order.
        self.input_perm: nn.Parameter | None = None
        self.prepared: nn.Module | None = None

    def add_input_perm(self) -> None:
        """Expect an `input_perm` tensor (int32 [in_features]) among the artifact's weights."""
        self.input_perm = nn.Parameter(torch.empty(self.in_features, dtype=torch.int32), requires_grad=False)

    def prepare(self, matmul: MatmulFactory) -> None:
        """Build the device's fast form of the blocks with its `matmul`."""
        check_permutation(self.input_perm, self.in_features)
        self.prepared = matmul(self.weight.data, self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.prepared is not None, "build_model prepares every QuantLinear before the first step"
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        y: torch.Tensor = self.prepared(x)
        return y if self.bias is None else y + self.bias


def check_permutation(perm: torch.Tensor | None, size: int) -> None:
    """An artifact's `input_perm` must be a permutation of 0..size-1 (an artifact is untrusted)."""
    if perm is None:
        return
    if perm.shape != (size,) or not torch.equal(torch.sort(perm.long()).values, torch.arange(size)):
        raise BadArtifactError(f"an input_perm tensor is not a permutation of 0..{size - 1}; rebuild the artifact")


class FusedQuantLinear(nn.Module):
    """Quantized linears that read the same input (q/k/v, gate/up) as one matmul over their rows
    stacked: one int4 kernel call instead of two or three, which matters in decode, where each
    call is a few microseconds of a small matrix (SmolLM2's q/k/v: 19.5 µs fused vs 29 µs apart).
    A GGML block row depends only on its own row, so stacking the blocks is exact."""

    bias: torch.Tensor | None
    input_perm: torch.Tensor | None

    def __init__(self, parts: list[QuantLinear], matmul: MatmulFactory) -> None:
        super().__init__()
        self.sizes = [part.out_features for part in parts]
        check_permutation(parts[0].input_perm, parts[0].in_features)
        self.input_perm = parts[0].input_perm  # equal in every part (fusable)
        self.prepared = matmul(torch.cat([part.weight.data for part in parts]), parts[0].fmt)
        biases = [part.bias for part in parts]
        bias = torch.cat([b.data for b in biases if b is not None]) if biases[0] is not None else None
        self.register_buffer("bias", bias, persistent=False)

    @staticmethod
    def fusable(parts: list[nn.Module]) -> bool:
        """QuantLinears of one format whose biases are all present or all absent, and whose input
        orders (act-order sources) are all the same."""
        if not all(isinstance(part, QuantLinear) for part in parts):
            return False
        quant = [part for part in parts if isinstance(part, QuantLinear)]
        perms = [part.input_perm for part in quant]
        first = perms[0]
        if first is None:
            same_order = all(p is None for p in perms)
        else:
            same_order = all(p is not None and torch.equal(first, p) for p in perms[1:])
        return len({part.fmt for part in quant}) == 1 and len({part.bias is None for part in quant}) == 1 and same_order

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
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
