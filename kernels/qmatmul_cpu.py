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

import torch
import torch.nn.functional as F

from llmc.kernels.quant_formats import FORMATS

INT4_FORMATS = ("q4_0", "q4_1", "q4k")
INT4_GROUP = 32  # weights per (scale, offset) pair in all three int4 formats
# `innerKTiles` of the int4 packing: 2 is what the CPU kernel is tuned for (torchao uses it).
_INNER_K_TILES = 2
_INT4_ZERO_POINT = 8  # the int4 kernel computes (q - 8) * scale + zero
_INT4_N_MULTIPLE = 16  # the packing interleaves 16 output rows; other row counts take the dense path
COMPUTE_DTYPE = torch.bfloat16


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian f16 at byte `offset` of every block, as float32. blocks: [..., n_blocks, size]."""
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGML's nibble order within a run of bytes: all low nibbles first, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def int4_parts(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split q4_0 / q4_1 / q4k blocks into 4-bit values and per-32 scale and offset.

    Returns q uint8 [rows, cols] in 0..15, scale and offset float32 [rows, cols // 32] such that
    the dequantized weight is q * scale + offset (exactly, in float32).
    """
    info = FORMATS[fmt]
    rows = blocks.shape[0]
    b = blocks.view(rows, -1, info.type_size)
    if fmt == "q4_0":
        d = _f16(b, 0)
        return _nibbles(b[..., 2:]).reshape(rows, -1), d, -float(_INT4_ZERO_POINT) * d
    if fmt == "q4_1":
        return _nibbles(b[..., 4:]).reshape(rows, -1), _f16(b, 0), _f16(b, 2)
    assert fmt == "q4k", fmt
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc_bytes, qs = b[..., 4:16].int(), b[..., 16:]
    low, mid, high = sc_bytes[..., 0:4], sc_bytes[..., 4:8], sc_bytes[..., 8:12]
    # 8 six-bit scales and mins per super-block: the first four in the low 6 bits of bytes 0-3
    # (scales) and 4-7 (mins); the last four from bytes 8-11's nibbles plus those bytes' top 2 bits.
    scales = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=-1).float()
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1).float()
    # 4 chunks of 32 bytes: each chunk's low nibbles are one 32-weight sub-block, high the next.
    q = _nibbles(qs.reshape(rows, -1, 4, 32)).reshape(rows, -1)
    scale = (d[..., None] * scales).reshape(rows, -1)
    offset = -(dmin[..., None] * mins).reshape(rows, -1)
    return q, scale, offset


class CpuQMatmul:
    """One weight's prepared form; call it with activations [M, K] to get [M, N] in x's dtype."""

    def __init__(self, blocks: torch.Tensor, fmt: str) -> None:
        self.fmt = fmt
        self.out_features = blocks.shape[0]
        info = FORMATS[fmt]
        self.in_features = blocks.shape[1] // info.type_size * info.block_size
        self.packed: torch.Tensor | None = None
        self.scales_zeros: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        if fmt in INT4_FORMATS and self.out_features % _INT4_N_MULTIPLE == 0:
            q, scale, offset = int4_parts(blocks, fmt)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), _INNER_K_TILES)
            zero = offset + _INT4_ZERO_POINT * scale
            self.scales_zeros = torch.stack([scale.T, zero.T], dim=-1).to(COMPUTE_DTYPE).contiguous()
        else:
            self.dense = info.dequantize(blocks).to(COMPUTE_DTYPE)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(COMPUTE_DTYPE)
        if self.packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP, self.scales_zeros)
        else:
            assert self.dense is not None
            y = F.linear(xc, self.dense)
        return y.to(x.dtype)
