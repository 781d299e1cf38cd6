"""CPU matmuls over GGML-quantized weights, prepared once when the model loads.

Two fast paths, chosen per format by measurement on SmolLM2's shapes (docs/BENCHMARKS.md):
- int4: q4_0, q4_1 and q4k (with a multiple of 16 output rows) are 4-bit values with one
  (scale, offset) per 32 weights, which is exactly what torch's `_weight_int4pack_mm_for_cpu`
  computes, (q - 8) * scale + zero, apart from its bf16 scales. Its packed layout depends on the
  CPU's ISA, so the artifact keeps the GGML blocks and the packing happens here, at load.
- dense: every other format is dequantized once at load into bf16 and multiplied by oneDNN's bf16
  GEMM (the weights then take 2 bytes each in memory; the artifact still holds the blocks).
Both take bf16 activations: oneDNN's and the int4 kernel's fast paths are bf16-only on CPUs.
The reference is `quant_formats.reference_qmatmul`: dequantize in float32, then multiply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmc.kernels import quant_kquants, quant_legacy
from llmc.kernels.quant_formats import FORMATS

INT4_GROUP = 32  # weights per (scale, offset) pair in all three int4 formats
# `innerKTiles` of the int4 packing: 2 is what the CPU kernel is tuned for (torchao uses it).
_INNER_K_TILES = 2
_INT4_ZERO_POINT = 8  # the int4 kernel computes (q - 8) * scale + zero
_INT4_N_MULTIPLE = 16  # the packing interleaves 16 output rows; other row counts take the dense path
COMPUTE_DTYPE = torch.bfloat16


# The codecs split each int4 format into (q, scale, offset); see their int4_parts_* functions.
_INT4_PARTS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "q4_0": quant_legacy.int4_parts_q4_0,
    "q4_1": quant_legacy.int4_parts_q4_1,
    "q4k": quant_kquants.int4_parts_q4k,
}
INT4_FORMATS = tuple(_INT4_PARTS)


def int4_parts(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q uint8 [rows, cols] in 0..15, scale and offset float32 [rows, cols // 32]: the weight is
    q * scale + offset, exactly."""
    return _INT4_PARTS[fmt](blocks)


class CpuQMatmul(nn.Module):
    """One weight's prepared form; call it with activations [M, K] to get [M, N] in x's dtype.

    The prepared tensors are (non-persistent) buffers so that torch.export sees them as the
    compiled step's constants, which the runtime feeds from this module at load.
    """

    packed: torch.Tensor | None
    scales_zeros: torch.Tensor | None
    dense: torch.Tensor | None

    def __init__(self, blocks: torch.Tensor, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features = blocks.shape[0]
        info = FORMATS[fmt]
        self.in_features = blocks.shape[1] // info.type_size * info.block_size
        packed = scales_zeros = dense = None
        if fmt in INT4_FORMATS and self.out_features % _INT4_N_MULTIPLE == 0:
            q, scale, offset = int4_parts(blocks, fmt)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), _INNER_K_TILES)
            zero = offset + _INT4_ZERO_POINT * scale
            scales_zeros = torch.stack([scale.T, zero.T], dim=-1).to(COMPUTE_DTYPE).contiguous()
        else:
            dense = info.dequantize(blocks).to(COMPUTE_DTYPE)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.register_buffer("dense", dense, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(COMPUTE_DTYPE)
        if self.packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP, self.scales_zeros)
        else:
            assert self.dense is not None
            y = F.linear(xc, self.dense)
        return y.to(x.dtype)
