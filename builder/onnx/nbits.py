"""GGML blocks as onnxruntime's `com.microsoft.MatMulNBits`, without requantizing.

Every GGML format is w = u * scale + offset per group of 32 weights (16 for q2k, q3k and q6k),
with u an unsigned integer of at most 8 bits (quant.legacy / quant.kquants `*_parts`). MatMulNBits
computes (code - zero) * scale per block, with zero = 2^(bits-1) when no zero points are given: the
fast form (measured on a 2-core AVX2 host with onnxruntime 1.32: symmetric 0.43 ms for an
8192x2048 GEMV, uint8 zero points 0.53 ms, float zero points exact but 53 ms). So each weight is
written as code = u + shift, with shift = zero - center and center the middle of u's range:

    w = (code - zero) * scale + c,    c = center * scale + offset

For the symmetric formats (q4_0, q8_0, q5_0, q3k, q6k) c is 0 and the weight is MatMulNBits
alone. For the affine ones (q4_1, q5_1, q2k, q4k, q5k) c is a per-group term, which the graph
applies to the activations' group sums: y += groupsum(x) @ c^T, a matmul 1/group the size of the
weight (graph.py). u, scale and offset are exact in float32, and the mapped weight, evaluated
exactly, rounds to the reference dequantizer's float32 weight bit for bit where c is exact in
float32 (`NBitsWeight.inexact_groups` counts the groups where storing c rounded it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmc.kernels.cpu import qmatmul_vnni

# fmt -> (MatMulNBits bits, bits of u): the VNNI kernel's parts (kernels/cpu/qmatmul_vnni.py)
# give u, scale and offset per group for every format.
VALUE_BITS: dict[str, int] = {
    "q4_0": 4,
    "q4_1": 4,
    "q4k": 4,
    "q3k": 3,
    "q2k": 2,
    "q8_0": 8,
    "q5_0": 5,
    "q5_1": 5,
    "q5k": 5,
    "q6k": 6,
}
FORMATS = tuple(VALUE_BITS)
_NIBBLE = 0x0F


@dataclass
class NBitsWeight:
    """One weight [N, K] in MatMulNBits' form: `packed` uint8 [N, K / block, block * bits / 8],
    `scales` float32 [N, K / block], and where the format is affine `offsets` float32 [N, K / block]
    (the c of the module docstring)."""

    n: int
    k: int
    bits: int
    block: int
    packed: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    inexact_groups: int = 0  # groups whose c float32 rounded (0 for the symmetric formats)

    def dequantize(self) -> np.ndarray:
        """float64 [N, K]: the weight this form multiplies by, evaluated exactly."""
        codes = unpack_codes(self.packed, self.bits).reshape(self.n, -1, self.block).astype(np.float64)
        w = (codes - (1 << (self.bits - 1))) * self.scales.astype(np.float64)[..., None]
        if self.offsets is not None:
            w = w + self.offsets.astype(np.float64)[..., None]
        return w.reshape(self.n, self.k)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] → MatMulNBits' bytes [N, K * bits / 8]: for 4 bits, weight 2i in the
    low nibble of byte i and weight 2i + 1 in its high nibble."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_codes, for any leading shape: uint8 [..., K]."""
    flat = packed.reshape(packed.shape[0], -1)
    if bits == 8:
        return flat
    return np.stack([flat & _NIBBLE, flat >> 4], axis=-1).reshape(flat.shape[0], -1)


def map_blocks(blocks: torch.Tensor, fmt: str) -> NBitsWeight:
    """GGML blocks uint8 [N, row bytes] of `fmt` → their MatMulNBits form (see the module docstring)."""
    bits, (u, scale, offset) = qmatmul_vnni.parts(blocks, fmt)
    u_np = u.to(torch.int32).numpy()
    scale_np = scale.float().numpy()
    offset_np = offset.float().numpy()
    n, k = u_np.shape
    block = k // scale_np.shape[1]
    zero = 1 << (bits - 1)
    center = 1 << (VALUE_BITS[fmt] - 1)
    codes = (u_np + (zero - center)).astype(np.uint8)
    exact_c = center * scale_np.astype(np.float64) + offset_np.astype(np.float64)
    offsets: np.ndarray | None = None
    inexact = 0
    if np.any(exact_c != 0.0):
        offsets = exact_c.astype(np.float32)
        inexact = int(np.count_nonzero(offsets.astype(np.float64) != exact_c))
    packed = pack_codes(codes, bits).reshape(n, k // block, block * bits // 8)
    return NBitsWeight(n, k, bits, block, packed, np.ascontiguousarray(scale_np), offsets, inexact)


def concat(weights: list[NBitsWeight]) -> NBitsWeight:
    """Weights of one format and K stacked along N (fused q/k/v or gate/up projections)."""
    first = weights[0]
    assert all((w.bits, w.block, w.k) == (first.bits, first.block, first.k) for w in weights), "mixed forms"
    offsets = None
    if any(w.offsets is not None for w in weights):
        offsets = np.concatenate(
            [w.offsets if w.offsets is not None else np.zeros_like(w.scales) for w in weights], axis=0
        )
    return NBitsWeight(
        sum(w.n for w in weights),
        first.k,
        first.bits,
        first.block,
        np.concatenate([w.packed for w in weights], axis=0),
        np.concatenate([w.scales for w in weights], axis=0),
        offsets,
        sum(w.inexact_groups for w in weights),
    )
