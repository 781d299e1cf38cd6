"""llmc's CPU matmul over GGML weights (kernels/cpu/qmatmul.cpp, every ISA), its layout and its reference.

Every GGML format is u * scale + offset per group of 32 weights (16 for q2k, q3k and q6k), with
u an unsigned integer: up to 4-bit for q4_0, q4_1, q4k, q3k (u = q + 4) and q2k (stored two per
byte), up to 8-bit for q8_0 (u = q + 128), q5_0, q5_1, q5k and q6k (one per byte). The kernel
quantizes the activations to int8 per group, as llama.cpp does, and multiplies int8 by uint8 with
`vpdpbusd`; it computes exactly `reference_vnni_matmul` up to float32 summation order. Scales and
offsets are kept in float16: exact for the legacy formats (GGML stores them so), rounded once for
the K-quants' sub-block scales (a relative 2^-11, well below the int8 activations' own error).

q6k and q4k, where that form takes 10 and 5 bits per weight against the blocks' 6.5625 and 4.5,
have forms of their own (`pack_q6k`, `pack_q4k`: 6.5625 and 4.625 bits), exact (no float16 rounding
of the sub-block scales). Where the library says so (`activation_group`: the AVX-512 one where
AMX does not run, and the AVX2 one), their activations are quantized per 256 inputs, as llama.cpp's q8_K, so
that the kernel folds the sub-block scales in integers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch._subclasses.fake_tensor import FakeTensor

from llmc.quant import kquants, legacy

ROWS = 16  # output rows per weight block: one vector of 16 int32 sums
_INT8_MAX = 127
_NIBBLE = 0x0F
_INPUTS_PER_LANE = 4  # vpdpbusd adds 4 byte products into each 32-bit lane
# Scales and offsets are stored in float16: every one must be below its largest value.
_FLOAT16_MAX = torch.finfo(torch.float16).max

# u uint8 [N, K], scale and offset float32 [N, K / group]: w = u * scale + offset per group
Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_PARTS: dict[str, tuple[int, Callable[[torch.Tensor], Parts]]] = {
    "q4_0": (4, legacy.int4_parts_q4_0),
    "q4_1": (4, legacy.int4_parts_q4_1),
    "q4k": (4, kquants.int4_parts_q4k),
    "q3k": (4, kquants.byte_parts_q3k),
    "q2k": (4, kquants.byte_parts_q2k),
    "q8_0": (8, legacy.byte_parts_q8_0),
    "q5_0": (8, legacy.byte_parts_q5_0),
    "q5_1": (8, legacy.byte_parts_q5_1),
    "q5k": (8, kquants.byte_parts_q5k),
    "q6k": (8, kquants.byte_parts_q6k),
}
FORMATS = tuple(_PARTS)
# Where u * scale is exact in float32, so that u * scale + offset rounds once, as the reference
# dequantizer does (q6k's 19-bit scales times 6-bit values need 25 bits).
PARTS_EXACT = frozenset(FORMATS) - {"q6k"}


def fits(fmt: str, rows: int) -> bool:
    """Whether the kernel takes a weight of this format with this many output rows."""
    return fmt in _PARTS and rows % ROWS == 0


def parts(blocks: torch.Tensor, fmt: str) -> tuple[int, Parts]:
    """The format's bits and (u, scale, offset) with w = u * scale + offset."""
    bits, fn = _PARTS[fmt]
    return bits, fn(blocks)


def pack(u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, scale, offset) → the kernel's weight uint8 [N / 16, K / G * 16 * G * bits / 8] and
    scales float16 [N / 16, K / G, 2, 16] (layout in qmatmul.cpp). None of the scales may
    overflow float16 (the caller checks `scales_fit`)."""
    n, k = u.shape
    blocks, groups = n // ROWS, scale.shape[1]
    group = k // groups
    by_group = u.to(torch.uint8).view(blocks, ROWS, groups, group).permute(0, 2, 1, 3)  # [b, g, row, k]
    if bits == 4:
        chunks = by_group.reshape(blocks, groups, ROWS, group // 8, 2, _INPUTS_PER_LANE)  # k = 8c + 4h + j
        low, high = chunks[..., 0, :], chunks[..., 1, :]
        weight = (low | (high << 4)).permute(0, 1, 3, 2, 4)  # [b, g, c, row, j]
    else:
        weight = by_group.reshape(blocks, groups, ROWS, group // _INPUTS_PER_LANE, _INPUTS_PER_LANE)
        weight = weight.permute(0, 1, 3, 2, 4)
    scales = torch.stack([scale, offset]).view(2, blocks, ROWS, groups).permute(1, 3, 0, 2)
    return weight.contiguous().view(blocks, -1), scales.to(torch.float16).contiguous()


# The formats the kernel library converts to the layout itself (kernel_form.cpp's codes).
_NATIVE_CODES = {
    "q4_0": 0, "q4_1": 1, "q8_0": 2, "q4k": 3, "q6k": 4, "q5_0": 5, "q5_1": 6, "q5k": 7, "q2k": 8, "q3k": 9,
}  # fmt: skip


def native_pack(blocks: torch.Tensor, fmt: str) -> tuple[int, torch.Tensor, torch.Tensor] | Literal[False] | None:
    """`pack(*parts(blocks, fmt))` by the loaded kernel library in one pass (kernel_form.cpp), as
    (bits, weight, scales); False where a scale does not fit float16 (see scales_fit); None where the
    library cannot (no library loaded, an older one, fake weights): use `pack`."""
    code = _NATIVE_CODES.get(fmt)
    if code is None or isinstance(blocks, FakeTensor) or not hasattr(torch.ops.llmc, "kernel_form"):
        return None
    weight, scales, fits = torch.ops.llmc.kernel_form(blocks.contiguous(), code, blocks.shape[0])
    if not bool(fits):
        return False
    return _PARTS[fmt][0], weight, scales


# The K-quant forms (qmatmul_common.h): where the general form takes 10 bits per weight for q6k
# (a byte per value, a float16 scale and offset per 16 weights) and 5 for q4k, the q6k form holds
# q6k's blocks at their own 6.5625 bits (values split into 4- and 2-bit planes, int8 sub-block scales
# and float16 d as they are) and the q4k form q4k's at 4.625 (4-bit values, 6-bit scales and mins as
# bytes, d and dmin as they are). Both are exact: no float16 rounding of the sub-block scales.
# Libraries older than these forms take only bits 4 and 8.
Q6K_BITS = 6
Q4K_BITS = 5  # a code: the q4k form's values have 4 bits
KQUANT_FORMS = {"q6k": Q6K_BITS, "q4k": Q4K_BITS}
_KQUANT_FORM_CODES = {"q6k": 10, "q4k": 11}  # kernel_form.cpp's kQ6KForm, kQ4KForm
_SUPER = 256  # inputs per K-quant super-block
_Q6K_GROUPS = 16  # groups of 16 weights per super-block
_Q6K_LOW, _Q6K_HIGH, _Q6K_SUB = 2048, 1024, 256  # bytes per block of 16 rows and super-block
_Q6K_BIAS = 32  # w = d * sc * (u - 32)
_HIGH_SHIFTS = (0, 2, 4, 6)  # field t of a highs byte: the top two bits of input 4t + j
_Q4K_GROUP = 32
_Q4K_VALUES = 2048  # bytes of values per block of 16 rows and super-block, then 128 of sc, 128 of mn


def kquant_form_available(fmt: str) -> bool:
    """Whether `fmt` has a K-quant form that the loaded kernel library takes (its
    `llmc::qmatmul_bits` lists the form's code)."""
    bits = KQUANT_FORMS.get(fmt)
    return bits is not None and hasattr(torch.ops.llmc, "qmatmul_bits") and bits in torch.ops.llmc.qmatmul_bits()


def _nibble_layout(u: torch.Tensor, group: int) -> torch.Tensor:
    """u uint8 [N, K] (< 16) in the bits-4 layout per group: [N / 16, K / group, group / 8 * 64]."""
    n, k = u.shape
    by_group = u.view(n // ROWS, ROWS, k // group, group).permute(0, 2, 1, 3)  # [b, g, row, k]
    chunks = by_group.reshape(n // ROWS, k // group, ROWS, group // 8, 2, _INPUTS_PER_LANE)  # k = 8c + 4h + j
    return (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).permute(0, 1, 3, 2, 4).reshape(n // ROWS, k // group, -1)


def _nibbles_back(values: torch.Tensor, rows: int, group: int) -> torch.Tensor:
    """_nibble_layout's inverse: [N / 16, K / group, group / 8 * 64] → u uint8 [N, K]."""
    blocks, groups = values.shape[0], values.shape[1]
    w = values.reshape(blocks, groups, group // 8, ROWS, _INPUTS_PER_LANE)  # [b, g, c, row, j]
    u = torch.stack([w & _NIBBLE, w >> 4], dim=3)  # [b, g, c, h, row, j]
    return u.permute(0, 4, 1, 2, 3, 5).reshape(rows, -1)


def pack_q6k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q6k blocks [N, K / 256 * 210] → the q6k form's weight uint8 [N / 16, K / 256 * 3328] and d
    float16 [N / 16, K / 256, 1, 16] (layout in qmatmul_common.h), in plain torch."""
    u = kquants.byte_parts_q6k(blocks)[0]
    n, k = u.shape
    nb, supers = n // ROWS, k // _SUPER
    b = blocks.reshape(n, supers, 210)
    lows = _nibble_layout(u & _NIBBLE, 16).reshape(nb, supers, -1)
    high = (u >> 4).view(nb, ROWS, supers, _Q6K_GROUPS, 4, _INPUTS_PER_LANE).permute(0, 2, 3, 1, 4, 5)  # k = 4t + j
    highs = high[..., 0, :]
    for t in range(1, 4):
        highs = highs | (high[..., t, :] << _HIGH_SHIFTS[t])  # [b, s, g, row, j]
    subs = b[:, :, 192:208].reshape(nb, ROWS, supers, _Q6K_GROUPS).permute(0, 2, 3, 1)  # [b, s, g, row]
    weight = torch.cat([lows, highs.reshape(nb, supers, -1), subs.reshape(nb, supers, -1)], dim=2).reshape(nb, -1)
    d = b[:, :, 208:210].contiguous().view(torch.float16).reshape(nb, ROWS, supers).permute(0, 2, 1)
    return weight.contiguous(), d.reshape(nb, supers, 1, ROWS).contiguous()


def pack_q4k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4k blocks [N, K / 256 * 144] → the q4k form's weight uint8 [N / 16, K / 256 * 2304] and d,
    dmin float16 [N / 16, K / 256, 2, 16] (layout in qmatmul_common.h), in plain torch."""
    u, sc, mn, d_dmin = kquants.q4k_fields(blocks)
    n, k = u.shape
    nb, supers = n // ROWS, k // _SUPER
    values = _nibble_layout(u, _Q4K_GROUP).reshape(nb, supers, -1)
    per_group = _SUPER // _Q4K_GROUP

    def by_group(field: torch.Tensor) -> torch.Tensor:
        return field.reshape(nb, ROWS, supers, per_group).permute(0, 2, 3, 1).reshape(nb, supers, -1)

    weight = torch.cat([values, by_group(sc), by_group(mn)], dim=2).reshape(nb, -1)
    scales = d_dmin.view(torch.float16).reshape(nb, ROWS, supers, 2).permute(0, 2, 3, 1)
    return weight.contiguous(), scales.contiguous()


def _unpack_q6k(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    nb, supers = scales.shape[0], scales.shape[1]
    rows = nb * ROWS
    w = weight.view(nb, supers, _Q6K_LOW + _Q6K_HIGH + _Q6K_SUB)
    low = _nibbles_back(w[..., :_Q6K_LOW].reshape(nb, supers * _Q6K_GROUPS, -1), rows, 16)
    highs = w[..., _Q6K_LOW : _Q6K_LOW + _Q6K_HIGH].reshape(nb, supers, _Q6K_GROUPS, ROWS, _INPUTS_PER_LANE)
    high = torch.stack([(highs >> shift) & 3 for shift in _HIGH_SHIFTS], dim=4).permute(0, 3, 1, 2, 4, 5)
    u = low | (high.reshape(rows, -1) << 4)
    sub = w[..., _Q6K_LOW + _Q6K_HIGH :].reshape(nb, supers, _Q6K_GROUPS, ROWS).permute(0, 3, 1, 2)
    d = scales.reshape(nb, supers, ROWS).permute(0, 2, 1).reshape(rows, supers, 1).float()
    scale = (d * sub.contiguous().view(torch.int8).reshape(rows, supers, _Q6K_GROUPS).float()).reshape(-1, 1)
    return ((u.float() - _Q6K_BIAS).reshape(-1, 16) * scale).reshape(rows, -1)


def _unpack_q4k(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    nb, supers = scales.shape[0], scales.shape[1]
    rows, per_group = nb * ROWS, _SUPER // _Q4K_GROUP
    w = weight.view(nb, supers, -1)
    u = _nibbles_back(w[..., :_Q4K_VALUES].reshape(nb, supers * per_group, -1), rows, _Q4K_GROUP)

    def by_row(field: torch.Tensor) -> torch.Tensor:
        return field.reshape(nb, supers, per_group, ROWS).permute(0, 3, 1, 2).reshape(rows, supers, per_group).float()

    sc = by_row(w[..., _Q4K_VALUES : _Q4K_VALUES + per_group * ROWS])
    mn = by_row(w[..., _Q4K_VALUES + per_group * ROWS :])
    d_dmin = scales.float().permute(0, 3, 1, 2).reshape(rows, supers, 1, 2)
    scale, offset = d_dmin[..., 0] * sc, -(d_dmin[..., 1] * mn)
    return (u.float().reshape(rows, supers, per_group, -1) * scale[..., None] + offset[..., None]).reshape(rows, -1)


def pack_kquant_form(blocks: torch.Tensor, fmt: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(bits, weight, scales) of `fmt`'s K-quant form (pack_q6k, pack_q4k), in plain torch."""
    weight, scales = (pack_q6k if fmt == "q6k" else pack_q4k)(blocks)
    return KQUANT_FORMS[fmt], weight, scales


def kquant_form(blocks: torch.Tensor, fmt: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """`pack_kquant_form`, by the loaded kernel library in one pass where it can (real weights)."""
    if isinstance(blocks, FakeTensor) or not hasattr(torch.ops.llmc, "kernel_form"):
        return pack_kquant_form(blocks, fmt)
    weight, scales, _ = torch.ops.llmc.kernel_form(blocks.contiguous(), _KQUANT_FORM_CODES[fmt], blocks.shape[0])
    return KQUANT_FORMS[fmt], weight, scales


def scales_fit(scale: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether float16 holds every scale and offset (always, for weights GGML could store).

    Fake tensors (the compile traces with fake weights, builder/targets/cpu.py) have no values and
    are taken to fit; a real weight that did not would lack the kernel's form at load, and the
    runtime then leaves that package unused (runtime/backends/aoti_step.py: constants missing)."""
    if isinstance(scale, FakeTensor) or isinstance(offset, FakeTensor):
        return True
    return bool(scale.abs().max() <= _FLOAT16_MAX and offset.abs().max() <= _FLOAT16_MAX)


def unpack(weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel's layout back to the float32 weight [N, K]: what the tests check `pack` against."""
    if bits == Q6K_BITS:
        return _unpack_q6k(weight, scales)
    if bits == Q4K_BITS:
        return _unpack_q4k(weight, scales)
    blocks, groups = scales.shape[0], scales.shape[1]
    group = weight.shape[1] * 8 // bits // groups // ROWS
    if bits == 4:
        w = weight.view(blocks, groups, group // 8, ROWS, _INPUTS_PER_LANE)
        u = torch.stack([w & _NIBBLE, w >> 4], dim=3)  # [b, g, c, h, row, j]
        u = u.permute(0, 4, 1, 2, 3, 5)
    else:
        u = weight.view(blocks, groups, group // _INPUTS_PER_LANE, ROWS, _INPUTS_PER_LANE).permute(0, 3, 1, 2, 4)
    u = u.reshape(blocks * ROWS, groups, group).float()
    s = scales.float().permute(0, 3, 1, 2).reshape(blocks * ROWS, groups, 2)
    return (u * s[..., :1] + s[..., 1:]).view(blocks * ROWS, -1)


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] → its int8 quantization per `group` values, dequantized (float32): the activations
    the kernel multiplies, computed with the kernel's own float32 operations."""
    m, k = x.shape
    groups = x.float().reshape(m, k // group, group)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    # a tensor divided by a tensor: `127 / amax` is torch's reciprocal times 127, two roundings,
    # which put x * inv on the other side of a .5 tie from the kernel's one IEEE division
    inv = torch.full_like(amax, _INT8_MAX) / amax
    # 0 where amax is 0 or so small that 127 / amax overflows float32: the group quantizes to zeros
    inv = torch.where((amax > 0) & torch.isfinite(inv), inv, torch.zeros_like(amax))
    return (torch.round(groups * inv) * (amax / _INT8_MAX)).reshape(m, k)


def activation_group(bits: int, group: int) -> int:
    """The inputs per activation scale of the loaded library's matmul for a weight of `bits` whose
    scale groups are `group` wide: 256 for the K-quant forms where the library quantizes their
    activations per super-block (qmatmul_driver.h superblock_activations), else `group`."""
    if bits not in (Q6K_BITS, Q4K_BITS) or not hasattr(torch.ops.llmc, "qmatmul_kquant_activation_inputs"):
        return group
    return int(torch.ops.llmc.qmatmul_kquant_activation_inputs()) or group


def reference_vnni_matmul(x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel computes, in plain torch (float64 sums): quantized x @ weight.T, for a
    weight whose scale groups are `group` wide."""
    return (quantize_activations(x, group).double() @ weight.double().T).float()


def qmatmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] (any float dtype) @ the packed weight → float32 [M, N]; needs the kernel library
    loaded (kernels/cpu/cpu_kernels.py)."""
    out: torch.Tensor = torch.ops.llmc.qmatmul(x, weight, scales, bits)
    return out


def bf16_path_available() -> bool:
    """Whether the loaded kernel library runs qmatmul_bf16 here (AVX-512 library, AMX-BF16 CPU)."""
    return hasattr(torch.ops.llmc, "qmatmul_bf16_available") and bool(torch.ops.llmc.qmatmul_bf16_available())


def qmatmul_bf16(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The same packed weight in the dense copies' arithmetic: bf16(x) @ bf16(w)^T, float32 sums and
    result [M, N], the weights dequantized per block on the fly (AMX; see bf16_path_available).
    Reference: reference_bf16_matmul."""
    out: torch.Tensor = torch.ops.llmc.qmatmul_bf16(x, weight, scales, bits)
    return out


def reference_bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What qmatmul_bf16 computes, in plain torch: x and the float32 weight w [N, K] rounded to bf16,
    multiplied and summed in float64 (the kernel sums in float32, in its own order)."""
    return (x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T).float()
