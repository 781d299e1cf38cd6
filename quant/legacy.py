"""GGML's legacy block formats (q4_0 q4_1 q5_0 q5_1 q8_0) as vectorized torch codecs.

Each block is 32 weights. The quantizers are byte-identical to GGML's reference ones (as mirrored by
gguf-py), so a weight we quantize is the weight llama.cpp would have written: every step runs in
float32 in the same order (no fused multiply-add, the inverse scale from the float32 scale before it
is stored as f16, GGML's truncation and round-half-away-from-zero tricks). The dequantizers are the
plain-torch reference every fast path is tested against: bitwise equal to gguf-py's on any valid bytes.

Layouts (little-endian; `qs` holds weight i in the low nibble and weight i + 16 in the high one):
    q4_0: f16 d, qs[16]                      w = d * (q - 8)
    q4_1: f16 d, f16 m, qs[16]               w = d * q + m
    q5_0: f16 d, u32 qh, qs[16]              w = d * (q - 16), bit i of qh is bit 4 of q_i
    q5_1: f16 d, f16 m, u32 qh, qs[16]       w = d * q + m
    q8_0: f16 d, i8 qs[32]                   w = d * q

Inputs are assumed finite; a block whose scale overflows f16 gets an infinite d, as in GGML.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK = 32  # weights per block in every legacy format
_HALF = QK // 2  # weights per nibble plane of the packed `qs` bytes
_F16_BYTES = 2
_QH_BYTES = QK // 8  # the q5 formats' high bits, one per weight
_NIBBLE = 0x0F
_NIBBLE_BITS = 4
_BITS_PER_BYTE = 8

# Levels: q4 values 0..15 (q4_0 centred on 8), q5 values 0..31 (q5_0 centred on 16), q8 values -127..127.
_Q4_LEVELS = 16
_Q5_LEVELS = 32
_Q8_MAX = 127

Q4_0_BYTES = _F16_BYTES + _HALF  # 18
Q4_1_BYTES = 2 * _F16_BYTES + _HALF  # 20
Q5_0_BYTES = _F16_BYTES + _QH_BYTES + _HALF  # 22
Q5_1_BYTES = 2 * _F16_BYTES + _QH_BYTES + _HALF  # 24
Q8_0_BYTES = _F16_BYTES + QK  # 34
_Q8_SHIFT = 128  # int8 + 128 is an unsigned byte: two 4-bit halves

# Blocks per chunk: 8M weights keep the float32 temporaries of one chunk to a few hundred MB.
_CHUNK_BLOCKS = 1 << 18

_BlockFn = Callable[[torch.Tensor], torch.Tensor]
# (q uint8 [rows, cols] in 0..15, scale and offset float32 [rows, cols // 32])
Int4Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _map_blocks(
    fn: _BlockFn, data: torch.Tensor, in_width: int, out_width: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Apply `fn` ([n, in_width] → [n, out_width]) to every block of the rows of `data`, chunk by chunk.

    A row is a run of whole blocks and rows are stored back to back, so the 2-D tensor is one flat list
    of independent blocks; chunking it bounds peak memory whatever the shape.
    """
    rows, cols = data.shape
    flat = data.contiguous().view(-1, in_width)
    if 0 < flat.shape[0] <= _CHUNK_BLOCKS:  # one chunk; also keeps a traced lookup's row count symbolic
        return fn(flat).view(rows, cols // in_width * out_width)
    out = torch.empty(flat.shape[0], out_width, dtype=out_dtype, device=data.device)
    for start in range(0, flat.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        out[start:stop] = fn(flat[start:stop])
    return out.view(rows, cols // in_width * out_width)


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % QK != 0:
        raise ValueError(f"expected a 2-D weight whose rows are whole {QK}-weight blocks, got {tuple(w.shape)}")
    return w.float()


def _check_blocks(blocks: torch.Tensor, type_size: int) -> None:
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % type_size != 0:
        raise ValueError(
            f"expected uint8 [rows, n_blocks * {type_size}] blocks, got {blocks.dtype} {tuple(blocks.shape)}"
        )


# ---- byte packing ----------------------------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] → its f16 (round to nearest even, as numpy and GGML) as little-endian bytes [n, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 at byte `offset` of each block, widened exactly to float32 [n, 1]."""
    return blocks[:, offset : offset + _F16_BYTES].contiguous().view(torch.float16).float()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] → [n, 16]: the low 4 bits of weight i and of weight i + 16 share byte i."""
    return (q[:, :_HALF] & _NIBBLE) | ((q[:, _HALF:] & _NIBBLE) << _NIBBLE_BITS)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 16] → the 4-bit values [n, 32]."""
    return torch.cat((qs & _NIBBLE, qs >> _NIBBLE_BITS), dim=-1)


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(_BITS_PER_BYTE, dtype=torch.uint8, device=device)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] of 5-bit values → the little-endian uint32 `qh` [n, 4] whose bit i is bit 4 of q_i."""
    bits = (q >> _NIBBLE_BITS).view(-1, _QH_BYTES, _BITS_PER_BYTE) << _bit_shifts(q.device)
    return bits.sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is the OR


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """The `qh` bytes [n, 4] → bit 4 of each weight, in place [n, 32] (0 or 16)."""
    bits = (qh.unsqueeze(-1) >> _bit_shifts(qh.device)) & 1
    return bits.view(-1, QK) << _NIBBLE_BITS


# ---- the shared float32 math ------------------------------------------------------------------------------


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d in float32 (an IEEE division, as numpy's), 0 where d is 0 so empty blocks quantize to 0."""
    return torch.where(d == 0, 0.0, torch.ones_like(d) / d)


def _symmetric_scale(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML's signed-max scale: d = (the value of largest magnitude, first one on ties) / -(levels / 2).

    The sign flip maps that extreme weight to level 0, so the other end gets the spare level.
    """
    extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    d = extreme / -(levels // 2)
    return d, _inverse(d)


def _min_max_scale(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGML's affine scale: m = min, d = (max - min) / (levels - 1)."""
    lo = x.amin(dim=-1, keepdim=True)
    d = (x.amax(dim=-1, keepdim=True) - lo) / (levels - 1)
    return d, _inverse(d), lo


def _truncate_levels(y: torch.Tensor, levels: int) -> torch.Tensor:
    """GGML's `(int)(y)` with y >= 0 (it adds 0.5 beforehand to round), clamped to the top level."""
    return y.trunc().clamp_(max=levels - 1).to(torch.uint8)


def _symmetric_levels(x: torch.Tensor, inv: torch.Tensor, levels: int) -> torch.Tensor:
    # Two separate float32 roundings (product, then + offset + 0.5), exactly as GGML: no fused multiply-add.
    return _truncate_levels(x * inv + (levels // 2 + 0.5), levels)


def _affine_levels(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, levels: int) -> torch.Tensor:
    return _truncate_levels((x - lo) * inv + 0.5, levels)


# ---- per-format block codecs --------------------------------------------------------------------------------


def _q4_0_blocks(x: torch.Tensor) -> torch.Tensor:
    d, inv = _symmetric_scale(x, _Q4_LEVELS)
    q = _symmetric_levels(x, inv, _Q4_LEVELS)
    return torch.cat((_f16_bytes(d), _pack_nibbles(q)), dim=-1)


def _q4_1_blocks(x: torch.Tensor) -> torch.Tensor:
    d, inv, lo = _min_max_scale(x, _Q4_LEVELS)
    q = _affine_levels(x, lo, inv, _Q4_LEVELS)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)), dim=-1)


def _q5_0_blocks(x: torch.Tensor) -> torch.Tensor:
    d, inv = _symmetric_scale(x, _Q5_LEVELS)
    q = _symmetric_levels(x, inv, _Q5_LEVELS)
    return torch.cat((_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)), dim=-1)


def _q5_1_blocks(x: torch.Tensor) -> torch.Tensor:
    d, inv, lo = _min_max_scale(x, _Q5_LEVELS)
    q = _affine_levels(x, lo, inv, _Q5_LEVELS)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)), dim=-1)


def _q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=-1, keepdim=True) / _Q8_MAX
    y = x * _inverse(d)
    # Round half away from zero as GGML's roundf: floor(|y|) plus one when the exact fraction is >= 0.5
    # (floor(|y| + 0.5) would differ where that sum itself rounds up in float32).
    a = y.abs()
    whole = a.floor()
    mag = whole + (a - whole >= 0.5).float()
    q = torch.where(y < 0, -mag, mag).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d), q), dim=-1)


def _q4_0_values(b: torch.Tensor) -> torch.Tensor:
    return _f16_field(b, 0) * (_unpack_nibbles(b[:, _F16_BYTES:]).float() - _Q4_LEVELS // 2)


def _q4_1_values(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16_field(b, 0), _f16_field(b, _F16_BYTES)
    return d * _unpack_nibbles(b[:, 2 * _F16_BYTES :]).float() + m


def _q5_0_values(b: torch.Tensor) -> torch.Tensor:
    qh, qs = b[:, _F16_BYTES : _F16_BYTES + _QH_BYTES], b[:, _F16_BYTES + _QH_BYTES :]
    q = _unpack_nibbles(qs) | _unpack_high_bits(qh)
    return _f16_field(b, 0) * (q.float() - _Q5_LEVELS // 2)


def _q5_1_values(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16_field(b, 0), _f16_field(b, _F16_BYTES)
    qh, qs = b[:, 2 * _F16_BYTES : 2 * _F16_BYTES + _QH_BYTES], b[:, 2 * _F16_BYTES + _QH_BYTES :]
    return d * (_unpack_nibbles(qs) | _unpack_high_bits(qh)).float() + m


def _q8_0_values(b: torch.Tensor) -> torch.Tensor:
    return _f16_field(b, 0) * b[:, _F16_BYTES:].view(torch.int8).float()


# ---- public API ---------------------------------------------------------------------------------------------


def _int4_parts(blocks: torch.Tensor, type_size: int, offset_of: Callable[[torch.Tensor], torch.Tensor]) -> Int4Parts:
    _check_blocks(blocks, type_size)
    rows = blocks.shape[0]
    b = blocks.contiguous().view(-1, type_size)
    d = _f16_field(b, 0)
    q = _unpack_nibbles(b[:, type_size - _HALF :])
    return q.view(rows, -1), d.view(rows, -1), offset_of(b).view(rows, -1)


def int4_parts_q4_0(blocks: torch.Tensor) -> Int4Parts:
    """4-bit values, per-block scale and offset with w = q * scale + offset (exact in float32): the
    form the CPU's packed int4 matmul takes (kernels/cpu/qmatmul_cpu.py)."""
    return _int4_parts(blocks, Q4_0_BYTES, lambda b: -(_Q4_LEVELS // 2) * _f16_field(b, 0))


def int4_parts_q4_1(blocks: torch.Tensor) -> Int4Parts:
    """As int4_parts_q4_0: the offset is the block's stored minimum."""
    return _int4_parts(blocks, Q4_1_BYTES, lambda b: _f16_field(b, _F16_BYTES))


def int4_pair_q8_0(blocks: torch.Tensor) -> tuple[Int4Parts, Int4Parts]:
    """q8_0 as the sum of two int4 weights, exactly: with u = q + 128 = 16 * hi + lo,
    w = d * q = (hi * 16d - 128d) + (lo * d + 0). Each part is (q, scale, offset) as in
    int4_parts_q4_0, for the CPU's packed int4 matmul (kernels/cpu/qmatmul_cpu.py)."""
    _check_blocks(blocks, Q8_0_BYTES)
    rows = blocks.shape[0]
    b = blocks.contiguous().view(-1, Q8_0_BYTES)
    d = _f16_field(b, 0).view(rows, -1)
    shifted = (b[:, _F16_BYTES:].view(torch.int8).to(torch.int16) + _Q8_SHIFT).to(torch.uint8).view(rows, -1)
    high = (shifted >> _NIBBLE_BITS, d * (1 << _NIBBLE_BITS), -_Q8_SHIFT * d)
    low = (shifted & _NIBBLE, d, torch.zeros_like(d))
    return high, low


def _int4_pair_q5(blocks: torch.Tensor, type_size: int, has_min: bool) -> tuple[Int4Parts, Int4Parts]:
    """q5_0/q5_1 as the sum of two int4 weights, exactly: q = lo + 16 * hi with hi in {0, 1}.
    The high part takes the int4 value 8 + hi at scale 16d, so that both parts' int4 zero points
    ((q - 8) * scale + zero, kernels/cpu/qmatmul_cpu.py) are 0 or -8d: powers of two times d, which
    round to bf16 exactly as d does (a zero of 112d, say, would not)."""
    _check_blocks(blocks, type_size)
    rows = blocks.shape[0]
    b = blocks.contiguous().view(-1, type_size)
    d = _f16_field(b, 0)
    qh_at = type_size - _HALF - _QH_BYTES
    low = _unpack_nibbles(b[:, type_size - _HALF :]).view(rows, -1)
    high = (_unpack_high_bits(b[:, qh_at : qh_at + _QH_BYTES]) >> _NIBBLE_BITS) + _Q4_LEVELS // 2
    high_scale = d * _Q4_LEVELS
    if has_min:  # w = d * q + m = (8 + hi) * 16d - 128d + (lo * d + m)
        high_offset = -(_Q4_LEVELS // 2) * high_scale
        low_offset = _f16_field(b, _F16_BYTES)
    else:  # w = d * (q - 16) = ((8 + hi) * 16d - 136d) + (lo * d - 8d)
        low_offset = -(_Q4_LEVELS // 2) * d
        high_offset = -(_Q4_LEVELS // 2) * high_scale + low_offset
    return (
        (high.view(rows, -1), high_scale.view(rows, -1), high_offset.view(rows, -1)),
        (low, d.view(rows, -1), low_offset.view(rows, -1)),
    )


def int4_pair_q5_0(blocks: torch.Tensor) -> tuple[Int4Parts, Int4Parts]:
    """q5_0 as the sum of two int4 weights (see _int4_pair_q5)."""
    return _int4_pair_q5(blocks, Q5_0_BYTES, has_min=False)


def int4_pair_q5_1(blocks: torch.Tensor) -> tuple[Int4Parts, Int4Parts]:
    """q5_1 as the sum of two int4 weights (see _int4_pair_q5)."""
    return _int4_pair_q5(blocks, Q5_1_BYTES, has_min=True)


def _byte_parts(blocks: torch.Tensor, type_size: int, u_of: _BlockFn, offset_of: _BlockFn) -> Int4Parts:
    _check_blocks(blocks, type_size)
    rows = blocks.shape[0]
    b = blocks.contiguous().view(-1, type_size)
    return u_of(b).view(rows, -1), _f16_field(b, 0).view(rows, -1), offset_of(b).view(rows, -1)


def _q5_levels(b: torch.Tensor) -> torch.Tensor:
    qh_at = b.shape[1] - _HALF - _QH_BYTES
    return _unpack_nibbles(b[:, b.shape[1] - _HALF :]) | _unpack_high_bits(b[:, qh_at : qh_at + _QH_BYTES])


def byte_parts_q8_0(blocks: torch.Tensor) -> Int4Parts:
    """q8_0 as unsigned bytes u = q + 128 with w = u * d - 128d (exact in float32 and in float16):
    the form of the CPU's VNNI matmul (kernels/cpu/qmatmul_vnni.py)."""
    return _byte_parts(
        blocks,
        Q8_0_BYTES,
        lambda b: (b[:, _F16_BYTES:].view(torch.int8).to(torch.int16) + _Q8_SHIFT).to(torch.uint8),
        lambda b: -_Q8_SHIFT * _f16_field(b, 0),
    )


def byte_parts_q5_0(blocks: torch.Tensor) -> Int4Parts:
    """q5_0 as its 5-bit values q with w = q * d - 16d, as byte_parts_q8_0."""
    return _byte_parts(blocks, Q5_0_BYTES, _q5_levels, lambda b: -(_Q5_LEVELS // 2) * _f16_field(b, 0))


def byte_parts_q5_1(blocks: torch.Tensor) -> Int4Parts:
    """q5_1 as its 5-bit values q with w = q * d + m, as byte_parts_q8_0."""
    return _byte_parts(blocks, Q5_1_BYTES, _q5_levels, lambda b: _f16_field(b, _F16_BYTES))


def _quantize(w: torch.Tensor, fn: _BlockFn, type_size: int) -> torch.Tensor:
    return _map_blocks(fn, _check_weight(w), QK, type_size, torch.uint8)


def _dequantize(blocks: torch.Tensor, fn: _BlockFn, type_size: int) -> torch.Tensor:
    _check_blocks(blocks, type_size)
    return _map_blocks(fn, blocks, type_size, QK, torch.float32)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → uint8 [rows, cols // 32 * 18], byte-identical to GGML's q4_0."""
    return _quantize(w, _q4_0_blocks, Q4_0_BYTES)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → uint8 [rows, cols // 32 * 20], byte-identical to GGML's q4_1."""
    return _quantize(w, _q4_1_blocks, Q4_1_BYTES)


def quantize_q5_0(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → uint8 [rows, cols // 32 * 22], byte-identical to GGML's q5_0."""
    return _quantize(w, _q5_0_blocks, Q5_0_BYTES)


def quantize_q5_1(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → uint8 [rows, cols // 32 * 24], byte-identical to GGML's q5_1."""
    return _quantize(w, _q5_1_blocks, Q5_1_BYTES)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → uint8 [rows, cols // 32 * 34], byte-identical to GGML's q8_0."""
    return _quantize(w, _q8_0_blocks, Q8_0_BYTES)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n_blocks * 18] → float32 [rows, n_blocks * 32], bitwise equal to GGML's."""
    return _dequantize(blocks, _q4_0_values, Q4_0_BYTES)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n_blocks * 20] → float32 [rows, n_blocks * 32], bitwise equal to GGML's."""
    return _dequantize(blocks, _q4_1_values, Q4_1_BYTES)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n_blocks * 22] → float32 [rows, n_blocks * 32], bitwise equal to GGML's."""
    return _dequantize(blocks, _q5_0_values, Q5_0_BYTES)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n_blocks * 24] → float32 [rows, n_blocks * 32], bitwise equal to GGML's."""
    return _dequantize(blocks, _q5_1_values, Q5_1_BYTES)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n_blocks * 34] → float32 [rows, n_blocks * 32], bitwise equal to GGML's."""
    return _dequantize(blocks, _q8_0_values, Q8_0_BYTES)
