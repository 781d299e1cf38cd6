"""CPU matmuls over GGML-quantized weights, prepared once when the model loads.

Three fast paths, chosen per format by measurement on SmolLM2's shapes (docs/BENCHMARKS.md):
- int4: q4_0, q4_1 and q4k (with a multiple of 16 output rows) are 4-bit values with one
  (scale, offset) per 32 weights, which is exactly what torch's `_weight_int4pack_mm_for_cpu`
  computes, (q - 8) * scale + zero, apart from its bf16 scales. Its packed layout depends on the
  CPU's ISA, so the artifact keeps the GGML blocks and the packing happens here, at load.
- int4 pair: q8_0 is the sum of two such int4 weights (its high and low nibbles,
  quant_legacy.int4_pair_q8_0): two int4 matmuls read 1 byte per weight where a bf16 copy reads
  2, which matters for the largest matrix of small models, a q8_0 lm_head.
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


def _pack_int4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale, offset) with w = q * scale + offset → the int4 kernel's packed weight and its
    bf16 [cols // 32, rows, 2] scales and zeros (it computes (q - 8) * scale + zero)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), _INNER_K_TILES)
    zero = offset + _INT4_ZERO_POINT * scale
    return packed, torch.stack([scale.T, zero.T], dim=-1).to(COMPUTE_DTYPE).contiguous()


class CpuQMatmul(nn.Module):
    """One weight's prepared form; call it with activations [M, K] to get [M, N] in x's dtype.

    The prepared tensors are (non-persistent) buffers so that torch.export sees them as the
    compiled step's constants, which the runtime feeds from this module at load.
    """

    packed: torch.Tensor | None
    scales_zeros: torch.Tensor | None
    packed_low: torch.Tensor | None  # the int4 pair's second half
    scales_zeros_low: torch.Tensor | None
    dense: torch.Tensor | None

    def __init__(self, blocks: torch.Tensor, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features = blocks.shape[0]
        info = FORMATS[fmt]
        self.in_features = blocks.shape[1] // info.type_size * info.block_size
        packed = scales_zeros = packed_low = scales_zeros_low = dense = None
        if fmt in INT4_FORMATS and self.out_features % _INT4_N_MULTIPLE == 0:
            packed, scales_zeros = _pack_int4(*int4_parts(blocks, fmt))
        elif fmt == "q8_0" and self.out_features % _INT4_N_MULTIPLE == 0:
            high, low = quant_legacy.int4_pair_q8_0(blocks)
            packed, scales_zeros = _pack_int4(*high)
            packed_low, scales_zeros_low = _pack_int4(*low)
        else:
            dense = info.dequantize(blocks).to(COMPUTE_DTYPE)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.register_buffer("packed_low", packed_low, persistent=False)
        self.register_buffer("scales_zeros_low", scales_zeros_low, persistent=False)
        self.register_buffer("dense", dense, persistent=False)

    def _pair(self, xc: torch.Tensor) -> torch.Tensor:
        high = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP, self.scales_zeros)
        low = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed_low, INT4_GROUP, self.scales_zeros_low)
        return high.float() + low.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(COMPUTE_DTYPE)
        if self.packed_low is not None:
            return self._pair(xc).to(x.dtype)
        if self.packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP, self.scales_zeros)
        else:
            assert self.dense is not None
            y = F.linear(xc, self.dense)
        return y.to(x.dtype)
