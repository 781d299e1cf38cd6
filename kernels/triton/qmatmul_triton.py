# ruff: noqa: N803, N806, SIM108, SIM109  (Triton's convention: upper-case names for sizes and compile-time constants)
"""Matmuls that read GGML quantized blocks directly: y = x @ W^T with W dequantized in registers.

A quantized weight never exists in float form in GPU memory: decoding is memory bound, so reading
4.5 bits instead of 16 per weight is the whole point.

The GPU form (`pack_weight`, once at load; `unpack_weight` is its exact inverse). GGUF's blocks are
18, 22, 34 or 210 bytes, so their fields sit at odd byte offsets and no wide load can reach them.
`pack_weight` splits each block into its fields and stores each field of every block as one plane
(`PLANE_FIELDS`): [N, blocks * field bytes], each plane starting 128-byte aligned. The quant planes
are then 16-byte aligned runs that a thread reads with one 16-byte load, and the scales are plain
f16/int8/int32 arrays. The bytes are GGML's, moved, never re-encoded: the kernels decode GGML's
bit layout as it is.

Two kernels read the planes:
- GEMV for decode (M <= 8 rows of x; `_gemv_kernel`), for every format: each program
  owns BLOCK_N output features and a range of K. Per step it loads [BLOCK_N, BLOCK_C, 16 or 32]
  bytes of quants (BLOCK_C 32/64-weight units of each row) and the matching x, turns each nibble
  into a float with a bit trick instead of an int-to-float conversion (which runs at a quarter of
  the FP32 rate), forms the dot product per scale group and applies d*sc (and dmin*m*sum(x)) once
  per group. The next step's bytes are loaded before the current step is decoded. Narrow layers
  split K over more programs (split-K) and a second kernel sums the partial results in a fixed
  order: deterministic, no atomics, no host sync, CUDA-graph capturable.
- A tiled GEMM for more rows: tl.dot on [BLOCK_M, 64] x [64, BLOCK_N] tiles, the weight tile
  dequantized from 16/32-byte row loads (q2k/q3k: gathered element by element).

`qmatmul` takes the GGUF layout (it packs on every call: a caller that calls it repeatedly should
`pack_weight` once and call `qmatmul_packed`). Triton is optional: this module imports without it,
and the matmuls then raise. `llmc.quant.formats.reference_qmatmul` is the plain-torch oracle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from llmc.errors import BadInputError
from llmc.quant.formats import FORMATS, BlockFormat

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the CPU-only install: qmatmul explains, everything else still imports
    _TRITON_IMPORT_ERROR = exc

# Format ids, passed to the kernels as a tl.constexpr so each format compiles its own dequantizer.
FORMAT_IDS: dict[str, int] = {name: i for i, name in enumerate(FORMATS)}

_U8, _I8, _F16, _I32 = torch.uint8, torch.int8, torch.float16, torch.int32
# Each block's fields in block order (byte offset, bytes, the dtype the kernels read them as); they
# tile the block exactly, and `pack_weight` makes one plane of each.
PLANE_FIELDS: dict[str, tuple[tuple[int, int, torch.dtype], ...]] = {
    "q4_0": ((0, 2, _F16), (2, 16, _U8)),  # d, qs
    "q4_1": ((0, 2, _F16), (2, 2, _F16), (4, 16, _U8)),  # d, m, qs
    "q5_0": ((0, 2, _F16), (2, 4, _I32), (6, 16, _U8)),  # d, qh, qs
    "q5_1": ((0, 2, _F16), (2, 2, _F16), (4, 4, _I32), (8, 16, _U8)),  # d, m, qh, qs
    "q8_0": ((0, 2, _F16), (2, 32, _U8)),  # d, qs
    "q2k": ((0, 16, _U8), (16, 64, _U8), (80, 2, _F16), (82, 2, _F16)),  # scales, qs, d, dmin
    "q3k": ((0, 32, _U8), (32, 64, _U8), (96, 12, _U8), (108, 2, _F16)),  # hmask, qs, scales, d
    "q4k": ((0, 2, _F16), (2, 2, _F16), (4, 12, _U8), (16, 128, _U8)),  # d, dmin, scales, qs
    "q5k": ((0, 2, _F16), (2, 2, _F16), (4, 12, _U8), (16, 32, _U8), (48, 128, _U8)),  # ... qh, qs
    "q6k": ((0, 128, _U8), (128, 64, _U8), (192, 16, _I8), (208, 2, _F16)),  # ql, qh, scales, d
}
MAX_PLANES = 5
PLANE_ALIGN = 128  # bytes: every plane starts on a 128-byte boundary of the packed buffer

# Decode: at most this many rows of x go to the GEMV kernel; more rows amortize dequantization
# better through tl.dot (whose tiles are at least 16 rows anyway).
GEMV_MAX_M = 8
# The GEMV's unit along K: weights per step of one row (legacy: one 32-weight block; q4_K/q5_K: 64
# weights = 32 quant bytes, two sub-blocks; q6_K: 64 weights = 16 bytes each of ql low, ql high,
# qh; q2_K/q3_K: 64 weights = a 16-byte run of 2-bit quants, four 16-weight sub-blocks).
GEMV_UNIT = {
    "q4_0": 32,
    "q4_1": 32,
    "q5_0": 32,
    "q5_1": 32,
    "q8_0": 32,
    "q2k": 64,
    "q3k": 64,
    "q4k": 64,
    "q5k": 64,
    "q6k": 64,
}


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output features per program
    block_c: int  # GEMV_UNIT units of K per step at M = 1 (halved for M = 2..8)
    num_warps: int
    target_programs: int  # split K until about this many programs run (132 SMs on an H200)


# Chosen without a GPU run (none was lent to the session that wrote this), by the SASS that
# triton 3.9 emits for sm_90 (instructions per weight in the main loop, registers). At M = 1,
# 8 rows x 16 units per 4-warp program costs 6.9 (q8_0) / 6.5 (q4_0) / 7.4 (q4_1) / 9.6 (q5_0) /
# 8.9 (q4_K) / 10.2 (q6_K) / 7.8 (q2_K) / 12.6 (q3_K) instructions per weight at 64-139
# registers, the next step's loads in flight; 4 x 16 costs 25-50 % more (the x tile, moved through
# shared memory each step, serves fewer rows), 16 x 16 needs up to 255 registers. From M = 2 the
# rows' accumulators and x tiles add registers, so the step halves (q4_K: 127 at M = 2, 128 at
# M = 8). target_programs = 1024 splits K only where N < 8192 (an 8B's q/o/down 2x, k/v 8x).
# `benchmarks/triton_qmatmul.py --sweep` re-picks these on a GPU.
GEMV_CONFIGS: dict[str, GemvConfig] = {
    fmt: GemvConfig(block_n=8, block_c=16, num_warps=4, target_programs=1024) for fmt in GEMV_UNIT
}
# GEMM tile: 64x64 output tiles with 64-wide K steps (a quarter of a K-quant super-block, two
# legacy blocks). The gathering dequantizer (q2k/q3k) is register hungry: at 4 warps this tile
# spilled for nine of the ten formats on sm_90; at 8 warps none spill. BLOCK_M shrinks to 16/32
# for short prompts.
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 64
GEMM_MAX_BLOCK_M = 64
GEMM_MIN_BLOCK_M = 16  # tl.dot's smallest tile
GEMM_NUM_WARPS = 8
REDUCE_BLOCK = 1024  # split-K's second pass: elements per program


def triton_available() -> bool:
    """Whether the Triton kernels can run here (callers pick the torch path otherwise)."""
    return _TRITON_IMPORT_ERROR is None


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PackedWeight:
    """A [n, k] GGML weight in the GPU's plane layout (see the module docstring)."""

    fmt: str
    n: int
    k: int
    buffer: torch.Tensor  # uint8, every plane inside it
    planes: tuple[torch.Tensor, ...]  # typed [n, blocks * field bytes / itemsize] views of `buffer`


def _check_blocks(blocks: torch.Tensor, fmt: str, n: int, k: int) -> BlockFormat:
    """Validate shapes up front: a wrong byte count would otherwise read past rows silently."""
    spec = FORMATS.get(fmt)
    if spec is None:
        raise BadInputError(f"unknown quantization {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not spec.fits(k):
        raise BadInputError(f"{fmt} needs in-features divisible by {spec.block_size}, got {k}")
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, spec.row_bytes(k)):
        raise BadInputError(
            f"{fmt} blocks for a [{n}, {k}] weight must be uint8 [{n}, {spec.row_bytes(k)}], "
            f"got {blocks.dtype} {list(blocks.shape)}"
        )
    return spec


def pack_weight(blocks: torch.Tensor, fmt: str, n: int, k: int) -> PackedWeight:
    """GGUF blocks uint8 [n, row_bytes] -> the plane layout, on blocks' device (a lossless byte move)."""
    spec = _check_blocks(blocks, fmt, n, k)
    nb = k // spec.block_size
    b3 = blocks.reshape(n, nb, spec.type_size)
    starts, total = [], 0
    for _, length, _ in PLANE_FIELDS[fmt]:
        starts.append(total)
        total += _cdiv(n * nb * length, PLANE_ALIGN) * PLANE_ALIGN
    buffer = torch.zeros(max(total, 1), dtype=torch.uint8, device=blocks.device)
    planes = []
    for (off, length, dtype), start in zip(PLANE_FIELDS[fmt], starts, strict=True):
        seg = buffer[start : start + n * nb * length]
        seg.view(n, nb, length).copy_(b3[:, :, off : off + length])
        planes.append(seg.view(dtype).view(n, nb * length // dtype.itemsize))
    return PackedWeight(fmt, n, k, buffer, tuple(planes))


def unpack_weight(packed: PackedWeight) -> torch.Tensor:
    """The exact inverse of `pack_weight`: the GGUF blocks uint8 [n, row_bytes], byte for byte."""
    spec = FORMATS[packed.fmt]
    nb = packed.k // spec.block_size
    parts = [
        p.view(torch.uint8).reshape(packed.n, nb, length)
        for p, (_, length, _) in zip(packed.planes, PLANE_FIELDS[packed.fmt], strict=True)
    ]
    return torch.cat(parts, dim=2).reshape(packed.n, nb * spec.type_size)


def _check_x(x: torch.Tensor, device: torch.device, k: int) -> None:
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(
            "qmatmul needs Triton, which is not installed here; install it (pip install triton) "
            "or use the plain-torch dequantize-then-matmul path"
        ) from _TRITON_IMPORT_ERROR
    if x.shape[-1] != k:
        raise BadInputError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if x.device != device:
        raise BadInputError(f"x is on {x.device} but the weight blocks are on {device}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on"):
        raise BadInputError(f"qmatmul runs on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise BadInputError(f"qmatmul takes fp16, bf16 or fp32 activations, got {x.dtype}")


def qmatmul(x: torch.Tensor, blocks: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """y = x @ W^T for x [..., K] and W [N, K] stored as GGUF blocks; y has x's dtype, sums are fp32.

    Packs W on every call (a copy of the weight): pack once with `pack_weight` for repeated use."""
    _check_blocks(blocks, fmt, n, k)
    _check_x(x, blocks.device, k)
    if blocks.stride(-1) != 1:
        blocks = blocks.contiguous()
    return qmatmul_packed(x, pack_weight(blocks, fmt, n, k))


def qmatmul_packed(x: torch.Tensor, w: PackedWeight, config: GemvConfig | None = None) -> torch.Tensor:
    """y = x @ W^T for a `pack_weight` weight; `config` overrides the GEMV's (for measuring)."""
    _check_x(x, w.buffer.device, w.k)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    if m > 0 and w.n > 0:
        _launch(x2, w, y, m, config)
    return y.reshape(*lead, w.n)


def _plane_args(w: PackedWeight) -> list[torch.Tensor]:
    return list(w.planes) + [w.planes[0]] * (MAX_PLANES - len(w.planes))


def _launch(x: torch.Tensor, w: PackedWeight, y: torch.Tensor, m: int, config: GemvConfig | None) -> None:
    """GEMV for decode-sized batches (split-K where N is narrow), the tiled GEMM for prefill."""
    n, k, fmt_id = w.n, w.k, FORMAT_IDS[w.fmt]
    planes = _plane_args(w)
    if m <= GEMV_MAX_M:
        cfg = config or GEMV_CONFIGS[w.fmt]
        block_m = _next_pow2(m)
        block_c = max(1, cfg.block_c // (2 if block_m >= 2 else 1))
        programs_n = _cdiv(n, cfg.block_n)
        steps = _cdiv(k // GEMV_UNIT[w.fmt], block_c)
        split = max(1, min(steps, cfg.target_programs // programs_n))
        steps_per_split = max(1, _cdiv(steps, split))
        split = max(1, _cdiv(steps, steps_per_split))  # no empty split
        out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _gemv_kernel[(programs_n, split)](
            x,
            *planes,
            out,
            m,
            n,
            k,
            x.stride(0),
            m * n,
            n,
            steps_per_split * block_c,
            FMT=fmt_id,
            UNIT=GEMV_UNIT[w.fmt],
            BLOCK_M=block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_C=block_c,
            num_warps=cfg.num_warps,
        )
        if split > 1:
            _splitk_reduce_kernel[(_cdiv(m * n, REDUCE_BLOCK),)](out, y, split, m * n, BLOCK=REDUCE_BLOCK)
        return
    args: tuple[Any, ...] = (x, *planes, y, m, n, k, x.stride(0), y.stride(0))
    block_m = min(GEMM_MAX_BLOCK_M, max(GEMM_MIN_BLOCK_M, _next_pow2(m)))
    _qgemm_kernel[(triton.cdiv(n, GEMM_BLOCK_N), triton.cdiv(m, block_m))](
        *args,
        FMT=fmt_id,
        # fp32 activations get full fp32 products (no TF32): they are the accuracy path
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=GEMM_BLOCK_N,
        BLOCK_K=GEMM_BLOCK_K,
        num_warps=GEMM_NUM_WARPS,
    )


if _TRITON_IMPORT_ERROR is None:
    _Q4_0: tl.constexpr = tl.constexpr(FORMAT_IDS["q4_0"])
    _Q4_1: tl.constexpr = tl.constexpr(FORMAT_IDS["q4_1"])
    _Q5_0: tl.constexpr = tl.constexpr(FORMAT_IDS["q5_0"])
    _Q5_1: tl.constexpr = tl.constexpr(FORMAT_IDS["q5_1"])
    _Q8_0: tl.constexpr = tl.constexpr(FORMAT_IDS["q8_0"])
    _Q2K: tl.constexpr = tl.constexpr(FORMAT_IDS["q2k"])
    _Q3K: tl.constexpr = tl.constexpr(FORMAT_IDS["q3k"])
    _Q4K: tl.constexpr = tl.constexpr(FORMAT_IDS["q4k"])
    _Q5K: tl.constexpr = tl.constexpr(FORMAT_IDS["q5k"])
    _Q6K: tl.constexpr = tl.constexpr(FORMAT_IDS["q6k"])

    @triton.jit
    def _ld(ptr, off, mask):
        """One element of a plane, widened to int32 (integer planes) or fp32 (f16 planes)."""
        v = tl.load(ptr + off, mask=mask, other=0)
        return v.to(tl.float32) if v.dtype.is_floating() else v.to(tl.int32)

    @triton.jit
    def _magic(q, BIAS: tl.constexpr):
        """q - BIAS as fp32 for 0 <= q < 2**23, without an int-to-float conversion (a quarter-rate
        instruction on sm_90): q in the mantissa of 2**23 is the float 2**23 + q, exactly."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)

    @triton.jit
    def _k_scale_min(ptr, scales, sub, mask):
        """q4_K/q5_K's 8 (scale, min) pairs of 6 bits packed in 12 bytes; `sub` = j // 32.

        Pairs 0-3 are the low 6 bits of bytes 0-3 (scale) and 4-7 (min); pairs 4-7 take their low
        4 bits from the nibbles of bytes 8-11 and their top 2 bits from the spare bits of 0-7.
        """
        a = _ld(ptr, scales + sub, mask)  # byte sub: scale (sub < 4) or min's high bits (sub >= 4)
        b = _ld(ptr, scales + sub + 4, mask)  # byte sub + 4: min (sub < 4) or both low nibbles (sub >= 4)
        c = _ld(ptr, scales + sub % 4, mask)  # byte sub - 4 for sub >= 4: the scale's high bits
        low = sub < 4
        sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _raw(ptr, off, mask):
        """Plane elements as stored, not widened: what the prefetch keeps in registers."""
        return tl.load(ptr + off, mask=mask, other=0)

    @triton.jit
    def _k_unpack(a, b, c, sub):
        """q4_K/q5_K's (scale, min) of sub-block `sub` from scale bytes sub, sub + 4 and sub % 4."""
        a = a.to(tl.int32)
        b = b.to(tl.int32)
        c = c.to(tl.int32)
        low = sub < 4
        sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _wload(p0, p1, p2, p3, p4, n64, offs_c, mask_n, mask_c, K, FMT: tl.constexpr):
        """Issue every load of one GEMV step (BLOCK_N rows x BLOCK_C units) and return the raw values
        r0..r9 (unused slots repeat r1). The loop loads step i + 1 before it decodes step i, so each
        thread keeps two steps of bytes in flight. Quants come as 16/32-byte runs, one load per run."""
        mask2 = mask_n[:, None] & mask_c[None, :]
        mask3 = mask_n[:, None, None] & mask_c[None, :, None]
        if FMT == _Q4K or FMT == _Q5K:
            # 64-weight chunk c = 4 sb + g: qs bytes 32c..32c+31, low nibbles sub-block 2g, high 2g + 1
            nsb = K // 256
            sb = offs_c // 4
            i32 = tl.arange(0, 32)
            QS = p3 if FMT == _Q4K else p4
            r0 = _raw(QS, (n64 * (nsb * 128))[:, None, None] + (offs_c * 32)[None, :, None] + i32[None, None, :], mask3)
            d_off = (n64 * nsb)[:, None] + sb[None, :]
            r1 = _raw(p0, d_off, mask2)
            r2 = _raw(p1, d_off, mask2)
            s_off = (n64 * (nsb * 12))[:, None] + (sb * 12)[None, :]
            sub = 2 * (offs_c % 4)[None, :]
            r3 = _raw(p2, s_off + sub, mask2)
            r4 = _raw(p2, s_off + sub + 4, mask2)
            r5 = _raw(p2, s_off + sub % 4, mask2)
            r6 = _raw(p2, s_off + sub + 1, mask2)
            r7 = _raw(p2, s_off + sub + 5, mask2)
            r8 = _raw(p2, s_off + (sub + 1) % 4, mask2)
            if FMT == _Q5K:  # bit 4 of weight 32s + i is bit s of qh byte i
                qh_off = (n64 * (nsb * 32))[:, None, None] + (sb * 32)[None, :, None] + i32[None, None, :]
                r9 = _raw(p3, qh_off, mask3)
            else:
                r9 = r1
        elif FMT == _Q2K:
            # 64-weight unit c = (sb, half h, 16-run ls): qs byte 32h + 16ls + i holds weights
            # 128h + 32s + 16ls + i at bits 2s (s = 0..3), with scale byte 8h + 2s + ls
            nsb = K // 256
            sb = offs_c // 4
            h = (offs_c % 4) // 2
            ls = offs_c % 2
            i16 = tl.arange(0, 16)
            q_off = (n64 * (nsb * 64))[:, None, None] + (sb * 64 + h * 32 + ls * 16)[None, :, None] + i16[None, None, :]
            r0 = _raw(p1, q_off, mask3)
            d_off = (n64 * nsb)[:, None] + sb[None, :]
            r1 = _raw(p2, d_off, mask2)
            r2 = _raw(p3, d_off, mask2)
            s_off = (n64 * (nsb * 16))[:, None] + (sb * 16 + h * 8 + ls)[None, :]
            r3 = _raw(p0, s_off, mask2)
            r4 = _raw(p0, s_off + 2, mask2)
            r5 = _raw(p0, s_off + 4, mask2)
            r6 = _raw(p0, s_off + 6, mask2)
            r7, r8, r9 = r1, r1, r1
        elif FMT == _Q3K:
            # as q2k's units: qs byte 32h + 16ls + i holds bits 0-1 of weights 128h + 32g + 16ls + i
            # at shift 2g, hmask byte 16ls + i their bit 2 at bit 4h + g; 6-bit scale 8h + 2g + ls:
            # low 4 bits from byte 2g + ls (nibble h), top 2 from byte 8 + (2g + ls) % 4 (bits 4h + 2(g//2))
            nsb = K // 256
            sb = offs_c // 4
            h = (offs_c % 4) // 2
            ls = offs_c % 2
            i16 = tl.arange(0, 16)
            q_off = (n64 * (nsb * 64))[:, None, None] + (sb * 64 + h * 32 + ls * 16)[None, :, None] + i16[None, None, :]
            r0 = _raw(p1, q_off, mask3)
            m_off = (n64 * (nsb * 32))[:, None, None] + (sb * 32 + ls * 16)[None, :, None] + i16[None, None, :]
            r1 = _raw(p0, m_off, mask3)
            r2 = _raw(p3, (n64 * nsb)[:, None] + sb[None, :], mask2)
            s_off = (n64 * (nsb * 12))[:, None] + (sb * 12 + ls)[None, :]
            r3 = _raw(p2, s_off, mask2)
            r4 = _raw(p2, s_off + 2, mask2)
            r5 = _raw(p2, s_off + 4, mask2)
            r6 = _raw(p2, s_off + 6, mask2)
            r7 = _raw(p2, s_off + 8, mask2)
            r8 = _raw(p2, s_off + 10, mask2)
            r9 = r2
        elif FMT == _Q6K:
            # 64-weight unit c = (sb, half hf, 16-run ls): A = ql[64hf + 16ls + i], B = A + 32 and
            # H = qh[32hf + 16ls + i] hold weights 128hf + 32q + 16ls + i of quarters q = 0..3
            # (A low, B low, A high, B high nibbles; bits 2q.. of H on top), int8 scale 8hf + ls + 2q
            nsb = K // 256
            sb = offs_c // 4
            hf = (offs_c % 4) // 2
            ls = offs_c % 2
            i16 = tl.arange(0, 16)
            a_off = (
                (n64 * (nsb * 128))[:, None, None] + (sb * 128 + hf * 64 + ls * 16)[None, :, None] + i16[None, None, :]
            )
            r0 = _raw(p0, a_off, mask3)
            r1 = _raw(p0, a_off + 32, mask3)
            h_off = (
                (n64 * (nsb * 64))[:, None, None] + (sb * 64 + hf * 32 + ls * 16)[None, :, None] + i16[None, None, :]
            )
            r2 = _raw(p1, h_off, mask3)
            r3 = _raw(p3, (n64 * nsb)[:, None] + sb[None, :], mask2)
            s_off = (n64 * (nsb * 16))[:, None] + (sb * 16 + hf * 8 + ls)[None, :]
            r4 = _raw(p2, s_off, mask2)
            r5 = _raw(p2, s_off + 2, mask2)
            r6 = _raw(p2, s_off + 4, mask2)
            r7 = _raw(p2, s_off + 6, mask2)
            r8, r9 = r3, r3
        else:
            # 32-weight blocks: d (r1), quants (r0), m (r2), qh (r3)
            nb = K // 32
            sc_off = (n64 * nb)[:, None] + offs_c[None, :]
            r1 = _raw(p0, sc_off, mask2)
            if FMT == _Q8_0:
                i32 = tl.arange(0, 32)
                r0 = _raw(
                    p1, (n64 * (nb * 32))[:, None, None] + (offs_c * 32)[None, :, None] + i32[None, None, :], mask3
                )
            else:
                i16 = tl.arange(0, 16)
                QS = p1 if FMT == _Q4_0 else (p2 if FMT != _Q5_1 else p3)
                r0 = _raw(
                    QS, (n64 * (nb * 16))[:, None, None] + (offs_c * 16)[None, :, None] + i16[None, None, :], mask3
                )
            if FMT == _Q4_1 or FMT == _Q5_1:
                r2 = _raw(p1, sc_off, mask2)
            else:
                r2 = r1
            if FMT == _Q5_0:
                r3 = _raw(p1, sc_off, mask2)
            elif FMT == _Q5_1:
                r3 = _raw(p2, sc_off, mask2)
            else:
                r3 = r1
            r4, r5, r6, r7, r8, r9 = r1, r1, r1, r1, r1, r1
        return r0, r1, r2, r3, r4, r5, r6, r7, r8, r9

    @triton.jit
    def _wdecode(r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, offs_c, FMT: tl.constexpr):
        """One step's raw values as up to four float tiles [BLOCK_N, C, W] of integer levels (a0..a3:
        groups of W weights, at x offsets _xoffsets + 0/16/32/64/96), their per-unit scales s0..s3
        [BLOCK_N, C] and the mins m0..m3 (subtracted as m * sum(x)); unused slots repeat used ones."""
        if FMT == _Q4K or FMT == _Q5K:
            qb = r0.to(tl.int32)
            lo = qb & 15
            hi = qb >> 4
            if FMT == _Q5K:
                g2 = (2 * (offs_c % 4))[None, :, None]
                qh = r9.to(tl.int32)
                lo = lo | (((qh >> g2) & 1) << 4)
                hi = hi | (((qh >> (g2 + 1)) & 1) << 4)
            sub = 2 * (offs_c % 4)[None, :]
            sc_lo, mn_lo = _k_unpack(r3, r4, r5, sub)
            sc_hi, mn_hi = _k_unpack(r6, r7, r8, sub + 1)
            d = r1.to(tl.float32)
            dmin = r2.to(tl.float32)
            s0 = d * sc_lo
            if FMT == _Q4K:  # a1 holds 16 * hi (see _magic2); its scale takes the 1/16
                a0, a1 = _magic2(qb, 0.0)
                s1 = d * sc_hi * 0.0625
            else:
                a0 = _magic(lo, 0.0)
                a1 = _magic(hi, 0.0)
                s1 = d * sc_hi
            m0 = dmin * mn_lo
            m1 = dmin * mn_hi
            a2, a3, s2, s3, m2, m3 = a0, a1, s0, s1, m0, m1
        elif FMT == _Q2K:  # 2-bit levels at shifts 2s of the run's bytes; scale byte: 4-bit sc, 4-bit m
            qb = r0.to(tl.int32)
            d = r1.to(tl.float32)
            dmin = r2.to(tl.float32)
            # group s stays shifted left by 2s (4**s * q): one mask each; its scale takes 4**-s
            fb = qb | 0x4B000000
            a0 = (fb & 0x4B000003).to(tl.float32, bitcast=True) - 8388608.0
            a1 = (fb & 0x4B00000C).to(tl.float32, bitcast=True) - 8388608.0
            a2 = (fb & 0x4B000030).to(tl.float32, bitcast=True) - 8388608.0
            a3 = (fb & 0x4B0000C0).to(tl.float32, bitcast=True) - 8388608.0
            c0 = r3.to(tl.int32)
            c1 = r4.to(tl.int32)
            c2 = r5.to(tl.int32)
            c3 = r6.to(tl.int32)
            s0 = d * (c0 & 15).to(tl.float32)
            s1 = d * (c1 & 15).to(tl.float32) * 0.25
            s2 = d * (c2 & 15).to(tl.float32) * 0.0625
            s3 = d * (c3 & 15).to(tl.float32) * 0.015625
            m0 = dmin * (c0 >> 4).to(tl.float32)
            m1 = dmin * (c1 >> 4).to(tl.float32)
            m2 = dmin * (c2 >> 4).to(tl.float32)
            m3 = dmin * (c3 >> 4).to(tl.float32)
        elif FMT == _Q3K:  # q = ql + 4 * hbit - 4, w = d * (sc - 32) * q
            qb = r0.to(tl.int32)
            hm = r1.to(tl.int32)
            h4 = (4 * ((offs_c % 4) // 2))[None, :]
            hb = h4[:, :, None]
            a0 = _magic((qb & 3) | (((hm >> hb) & 1) << 2), 4.0)
            a1 = _magic(((qb >> 2) & 3) | (((hm >> (hb + 1)) & 1) << 2), 4.0)
            a2 = _magic(((qb >> 4) & 3) | (((hm >> (hb + 2)) & 1) << 2), 4.0)
            a3 = _magic((qb >> 6) | (((hm >> (hb + 3)) & 1) << 2), 4.0)
            d = r2.to(tl.float32)
            hi02 = r7.to(tl.int32) >> h4
            hi13 = r8.to(tl.int32) >> h4
            s0 = d * ((((r3.to(tl.int32) >> h4) & 15) | ((hi02 & 3) << 4)) - 32).to(tl.float32)
            s1 = d * ((((r4.to(tl.int32) >> h4) & 15) | ((hi13 & 3) << 4)) - 32).to(tl.float32)
            s2 = d * ((((r5.to(tl.int32) >> h4) & 15) | (((hi02 >> 2) & 3) << 4)) - 32).to(tl.float32)
            s3 = d * ((((r6.to(tl.int32) >> h4) & 15) | (((hi13 >> 2) & 3) << 4)) - 32).to(tl.float32)
            m0, m1, m2, m3 = s0, s1, s2, s3
        elif FMT == _Q6K:
            qa = r0.to(tl.int32)
            qb = r1.to(tl.int32)
            qh = r2.to(tl.int32)
            # quarters 2 and 3 stay shifted left by 4 (16 * (q - 32)); their scales take the 1/16
            a0 = _magic((qa & 15) | ((qh << 4) & 0x30), 32.0)
            a1 = _magic((qb & 15) | ((qh << 2) & 0x30), 32.0)
            a2 = _magic((qa & 0xF0) | ((qh << 4) & 0x300), 512.0)
            a3 = _magic((qb & 0xF0) | ((qh << 2) & 0x300), 512.0)
            d = r3.to(tl.float32)
            s0 = d * r4.to(tl.float32)
            s1 = d * r5.to(tl.float32)
            s2 = d * r6.to(tl.float32) * 0.0625
            s3 = d * r7.to(tl.float32) * 0.0625
            m0, m1, m2, m3 = s0, s1, s2, s3
        else:
            s0 = r1.to(tl.float32)
            qb = r0.to(tl.int32)
            if FMT == _Q8_0:
                # int8 q + 128 is the unsigned byte b ^ 128; one xor also sets the exponent of 2**23
                a0 = (qb ^ 0x4B000080).to(tl.float32, bitcast=True) - (8388608.0 + 128.0)
                a1 = a0
            else:  # qs byte i holds weight i (low nibble) and i + 16 (high); q5's qh bit j is weight j's bit 4
                lo = qb & 15
                hi = qb >> 4
                if FMT == _Q5_0 or FMT == _Q5_1:
                    i16 = tl.arange(0, 16)
                    qh = r3[:, :, None]
                    lo = lo | (((qh >> i16[None, None, :]) & 1) << 4)
                    hi = hi | (((qh >> (i16 + 16)[None, None, :]) & 1) << 4)
                s1 = s0
                if FMT == _Q4_0:  # a1 holds 16 * (hi - 8) (see _magic2); its scale takes the 1/16
                    a0, a1 = _magic2(qb, 8.0)
                    s1 = s0 * 0.0625
                elif FMT == _Q4_1:
                    a0, a1 = _magic2(qb, 0.0)
                    s1 = s0 * 0.0625
                elif FMT == _Q5_0:
                    a0 = _magic(lo, 16.0)
                    a1 = _magic(hi, 16.0)
                else:
                    a0 = _magic(lo, 0.0)
                    a1 = _magic(hi, 0.0)
            if FMT == _Q8_0:
                s1 = s0
            m0 = r2.to(tl.float32)  # q4_1/q5_1: w = d * q + m
            a2, a3, s2, s3, m1, m2, m3 = a0, a1, s0, s0, m0, m0, m0
        return a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3

    @triton.jit
    def _magic2(qb, BIAS: tl.constexpr):
        """Both nibbles of bytes qb (int32, 0..255) as fp32 (lo - BIAS, 16 * (hi - BIAS)) in three
        integer ops for two weights: with 2**23 in the exponent, masking keeps the low nibble or
        the high nibble in place (16 * hi); the float subtraction removes 2**23 and the bias."""
        fb = qb | 0x4B000000
        lo = (fb & 0x4B00000F).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)
        hi = (fb & 0x4B0000F0).to(tl.float32, bitcast=True) - (8388608.0 + 16.0 * BIAS)
        return lo, hi

    @triton.jit
    def _xload(x_ptr, xo, xmask, FMT: tl.constexpr):
        """One row of x for a step's groups of weights: tiles [C, W] at xo + 0/16/32/64/96, as stored."""
        x0 = tl.load(x_ptr + xo, mask=xmask, other=0.0)
        if FMT == _Q8_0:
            x1 = x0
            x2 = x0
            x3 = x0
        elif FMT == _Q6K or FMT == _Q2K or FMT == _Q3K:
            x1 = tl.load(x_ptr + xo + 32, mask=xmask, other=0.0)
            x2 = tl.load(x_ptr + xo + 64, mask=xmask, other=0.0)
            x3 = tl.load(x_ptr + xo + 96, mask=xmask, other=0.0)
        elif FMT == _Q4K or FMT == _Q5K:
            x1 = tl.load(x_ptr + xo + 32, mask=xmask, other=0.0)
            x2 = x0
            x3 = x1
        else:
            x1 = tl.load(x_ptr + xo + 16, mask=xmask, other=0.0)
            x2 = x0
            x3 = x1
        return x0, x1, x2, x3

    @triton.jit
    def _xdot(xv, w):
        """x [C, W] (one row) against w [BLOCK_N, C, W]: per-unit dots [BLOCK_N, C], and sum(x) [C]."""
        xv = xv.to(tl.float32)
        return tl.sum(w * xv[None, :, :], axis=2), tl.sum(xv, axis=1)

    @triton.jit
    def _row_part(x0, x1, x2, x3, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT: tl.constexpr):
        """One row of x (its tiles from _xload) against one step's weight tiles: [BLOCK_N, C] partial sums."""
        if FMT == _Q8_0:
            dot0, sx0 = _xdot(x0, a0)
            part = dot0 * s0
        elif FMT == _Q4K or FMT == _Q5K:
            dot0, sx0 = _xdot(x0, a0)
            dot1, sx1 = _xdot(x1, a1)
            part = dot0 * s0 + dot1 * s1 - sx0[None, :] * m0 - sx1[None, :] * m1
        elif FMT == _Q2K:
            dot0, sx0 = _xdot(x0, a0)
            dot1, sx1 = _xdot(x1, a1)
            dot2, sx2 = _xdot(x2, a2)
            dot3, sx3 = _xdot(x3, a3)
            part = dot0 * s0 + dot1 * s1 + dot2 * s2 + dot3 * s3
            part -= sx0[None, :] * m0 + sx1[None, :] * m1 + sx2[None, :] * m2 + sx3[None, :] * m3
        elif FMT == _Q6K or FMT == _Q3K:
            dot0, sx0 = _xdot(x0, a0)
            dot1, sx1 = _xdot(x1, a1)
            dot2, _ = _xdot(x2, a2)
            dot3, _ = _xdot(x3, a3)
            part = dot0 * s0 + dot1 * s1 + dot2 * s2 + dot3 * s3
        else:
            dot0, sx0 = _xdot(x0, a0)
            dot1, sx1 = _xdot(x1, a1)
            part = dot0 * s0 + dot1 * s1
            if FMT == _Q4_1 or FMT == _Q5_1:
                part += (sx0 + sx1)[None, :] * m0
        return part

    @triton.jit
    def _row_acc(x_ptr, xo, xmask, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT: tl.constexpr):
        """_row_part for a row of x loaded now (rows 1..7; row 0's tiles are prefetched)."""
        x0, x1, x2, x3 = _xload(x_ptr, xo, xmask, FMT)
        return _row_part(x0, x1, x2, x3, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)

    @triton.jit
    def _xoffsets(offs_c, FMT: tl.constexpr):
        """Columns of x [C, W] that the first group of each unit multiplies."""
        if FMT == _Q6K or FMT == _Q2K or FMT == _Q3K:
            i16 = tl.arange(0, 16)
            xo = ((offs_c // 4) * 256 + ((offs_c % 4) // 2) * 128 + (offs_c % 2) * 16)[:, None] + i16[None, :]
        elif FMT == _Q4K or FMT == _Q5K:
            xo = (offs_c * 64)[:, None] + tl.arange(0, 32)[None, :]
        elif FMT == _Q8_0:
            xo = (offs_c * 32)[:, None] + tl.arange(0, 32)[None, :]
        else:
            xo = (offs_c * 32)[:, None] + tl.arange(0, 16)[None, :]
        return xo

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        p0,
        p1,
        p2,
        p3,
        p4,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_os,
        stride_om,
        UNITS_PER_SPLIT,
        FMT: tl.constexpr,
        UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Decode: BLOCK_N output features x M (<= 8) rows over the K range of split program_id(1).
        Each step dequantizes its weight tile once and reuses it for every row of x (one accumulator
        per row: the rows are unrolled); sums across units are left until after the loop."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        n64 = offs_n.to(tl.int64)
        c_start = tl.program_id(1) * UNITS_PER_SPLIT
        c_end = tl.minimum(c_start + UNITS_PER_SPLIT, K // UNIT)
        acc0 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc4 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc5 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc6 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc7 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        offs_c = c_start + tl.arange(0, BLOCK_C)
        r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = _wload(p0, p1, p2, p3, p4, n64, offs_c, mask_n, offs_c < c_end, K, FMT)
        x0, x1, x2, x3 = _xload(x_ptr, _xoffsets(offs_c, FMT), (offs_c < c_end)[:, None], FMT)
        for c0 in range(c_start, c_end, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_end
            nxt = offs_c + BLOCK_C  # prefetch the next step (all masked off after the last)
            q0, q1, q2, q3, q4, q5, q6, q7, q8, q9 = _wload(p0, p1, p2, p3, p4, n64, nxt, mask_n, nxt < c_end, K, FMT)
            y0, y1, y2, y3 = _xload(x_ptr, _xoffsets(nxt, FMT), (nxt < c_end)[:, None], FMT)
            a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3 = _wdecode(
                r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, offs_c, FMT
            )
            xo = _xoffsets(offs_c, FMT)
            xm = mask_c[:, None]
            zero = xo * 0  # row r's mask is (zero + r < M): a tensor in both compiler and interpreter
            acc0 += _row_part(x0, x1, x2, x3, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
            if BLOCK_M > 1:
                xr = x_ptr + stride_xm
                acc1 += _row_acc(xr, xo, xm & (zero + 1 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
            if BLOCK_M > 2:
                xr = x_ptr + 2 * stride_xm
                acc2 += _row_acc(xr, xo, xm & (zero + 2 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
                xr = x_ptr + 3 * stride_xm
                acc3 += _row_acc(xr, xo, xm & (zero + 3 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
            if BLOCK_M > 4:
                xr = x_ptr + 4 * stride_xm
                acc4 += _row_acc(xr, xo, xm & (zero + 4 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
                xr = x_ptr + 5 * stride_xm
                acc5 += _row_acc(xr, xo, xm & (zero + 5 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
                xr = x_ptr + 6 * stride_xm
                acc6 += _row_acc(xr, xo, xm & (zero + 6 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
                xr = x_ptr + 7 * stride_xm
                acc7 += _row_acc(xr, xo, xm & (zero + 7 < M), a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3, FMT)
            r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = q0, q1, q2, q3, q4, q5, q6, q7, q8, q9
            x0, x1, x2, x3 = y0, y1, y2, y3
        out = out_ptr + tl.program_id(1).to(tl.int64) * stride_os + offs_n
        ty = out_ptr.dtype.element_ty
        tl.store(out, tl.sum(acc0, axis=1).to(ty), mask=mask_n)
        if BLOCK_M > 1:
            tl.store(out + stride_om, tl.sum(acc1, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 1 < M))
        if BLOCK_M > 2:
            tl.store(out + 2 * stride_om, tl.sum(acc2, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 2 < M))
            tl.store(out + 3 * stride_om, tl.sum(acc3, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 3 < M))
        if BLOCK_M > 4:
            tl.store(out + 4 * stride_om, tl.sum(acc4, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 4 < M))
            tl.store(out + 5 * stride_om, tl.sum(acc5, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 5 < M))
            tl.store(out + 6 * stride_om, tl.sum(acc6, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 6 < M))
            tl.store(out + 7 * stride_om, tl.sum(acc7, axis=1).to(ty), mask=mask_n & (offs_n * 0 + 7 < M))

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, y_ptr, S, MN, BLOCK: tl.constexpr):
        """y = sum over s of part[s] (fp32 [S, M, N]), in order s = 0, 1, ...: deterministic."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, S):
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_legacy(p0, p1, p2, p3, n64, col, mask, K, FMT: tl.constexpr):
        """fp32 weights of 32-weight blocks at rows n64 and columns col (any broadcast shape)."""
        nb = K // 32
        blk = col // 32
        j = col % 32
        s_off = n64 * nb + blk
        d = _ld(p0, s_off, mask)
        if FMT == _Q8_0:
            w = d * ((_ld(p1, n64 * (nb * 32) + blk * 32 + j, mask) ^ 128) - 128).to(tl.float32)
        else:
            QS = p1 if FMT == _Q4_0 else (p2 if FMT != _Q5_1 else p3)
            q = (_ld(QS, n64 * (nb * 16) + blk * 16 + j % 16, mask) >> ((j // 16) * 4)) & 15
            if FMT == _Q5_0 or FMT == _Q5_1:
                q = q | (((_ld(p1 if FMT == _Q5_0 else p2, s_off, mask) >> j) & 1) << 4)
            if FMT == _Q4_0:
                w = d * (q - 8).to(tl.float32)
            elif FMT == _Q5_0:
                w = d * (q - 16).to(tl.float32)
            else:
                w = d * q.to(tl.float32) + _ld(p1, s_off, mask)
        return w

    @triton.jit
    def _dequant_kquant(p0, p1, p2, p3, p4, n64, col, mask, K, FMT: tl.constexpr):
        """fp32 weights of 256-weight super-blocks; `j` is the weight's index in its super-block.
        2-bit fields are spread as 128-weight halves x 4 shifts x 32 bytes and nibbles as 64-weight
        quarters x 2 shifts x 32 bytes."""
        nsb = K // 256
        sb = col // 256
        j = col % 256
        s_off = n64 * nsb + sb
        if FMT == _Q2K:  # scales[16], qs[64], d, dmin: w = d*(sc&15)*q - dmin*(sc>>4)
            sc = _ld(p0, n64 * (nsb * 16) + sb * 16 + j // 16, mask)
            q = (_ld(p1, n64 * (nsb * 64) + sb * 64 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
            w = _ld(p2, s_off, mask) * (sc & 15).to(tl.float32) * q.to(tl.float32) - _ld(p3, s_off, mask) * (
                sc >> 4
            ).to(tl.float32)
        elif FMT == _Q3K:  # hmask[32], qs[64], scales[12], d: w = d*(sc-32)*(q - 4*!h)
            h = (_ld(p0, n64 * (nsb * 32) + sb * 32 + j % 32, mask) >> (j // 32)) & 1
            ql = (_ld(p1, n64 * (nsb * 64) + sb * 64 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
            s = j // 16  # 16 6-bit scales: low nibbles in bytes 0-7, top 2 bits in bytes 8-11
            s_base = n64 * (nsb * 12) + sb * 12
            sl = (_ld(p2, s_base + s % 8, mask) >> ((s // 8) * 4)) & 15
            sh = (_ld(p2, s_base + 8 + s % 4, mask) >> ((s // 4) * 2)) & 3
            sc = (sl | (sh << 4)) - 32
            q = ql - 4 * (1 - h)  # GGML's quirk: a set hmask bit means no -4 offset
            w = _ld(p3, s_off, mask) * sc.to(tl.float32) * q.to(tl.float32)
        elif FMT == _Q4K or FMT == _Q5K:  # d, dmin, scales[12], (qh[32],) qs[128]: w = d*sc*q - dmin*mn
            sc, mn = _k_scale_min(p2, n64 * (nsb * 12) + sb * 12, j // 32, mask)
            QS = p3 if FMT == _Q4K else p4
            q = (_ld(QS, n64 * (nsb * 128) + sb * 128 + (j // 64) * 32 + j % 32, mask) >> (((j // 32) % 2) * 4)) & 15
            if FMT == _Q5K:
                q = q | (((_ld(p3, n64 * (nsb * 32) + sb * 32 + j % 32, mask) >> (j // 32)) & 1) << 4)
            w = _ld(p0, s_off, mask) * sc * q.to(tl.float32) - _ld(p1, s_off, mask) * mn
        else:  # q6_K ql[128], qh[64], i8 scales[16], d: w = d * sc * (q - 32)
            ql = (_ld(p0, n64 * (nsb * 128) + sb * 128 + (j // 128) * 64 + j % 64, mask) >> (((j // 64) % 2) * 4)) & 15
            qh = (_ld(p1, n64 * (nsb * 64) + sb * 64 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
            q = (ql | (qh << 4)) - 32
            sc = _ld(p2, n64 * (nsb * 16) + sb * 16 + j // 16, mask)
            w = _ld(p3, s_off, mask) * sc.to(tl.float32) * q.to(tl.float32)
        return w

    @triton.jit
    def _dequant(p0, p1, p2, p3, p4, n64, col, mask, K, FMT: tl.constexpr):
        """fp32 weights at rows n64 (int64) and columns col, any broadcast shape, gathered per element."""
        if FMT < _Q2K:
            w = _dequant_legacy(p0, p1, p2, p3, n64, col, mask, K, FMT)
        else:
            w = _dequant_kquant(p0, p1, p2, p3, p4, n64, col, mask, K, FMT)
        return w

    @triton.jit
    def _interleave_halves(lo, hi):
        """[R, C, 16 or 32] low and high halves -> [R, C * 2 * W]: each unit's low run, then its high run."""
        w = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))  # [R, C, 2, W]
        return tl.reshape(w, (w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]))

    @triton.jit
    def _dequant_tile64(p0, p1, p2, p3, p4, n64, k0, mask_n, K, FMT: tl.constexpr):
        """fp32 weights [BLOCK_N, 64] of columns k0..k0+63 (k0 a multiple of 64) for rows n64, every
        format but q2k/q3k; columns at or past K (a legacy row of an odd number of blocks) are 0."""
        if FMT == _Q4K or FMT == _Q5K or FMT == _Q6K:
            nsb = K // 256
            sb = k0 // 256
            r = (k0 // 64) % 4  # the 64-weight quarter of the super-block
            d = _ld(p0 if FMT != _Q6K else p3, n64 * nsb + sb, mask_n)[:, None]
            i32 = tl.arange(0, 32)
            if FMT == _Q6K:  # ql bytes 64hf + l: low nibbles for r even, high for r odd; qh bits 2q
                hf = r // 2
                i64 = tl.arange(0, 64)
                ql = _ld(p0, (n64 * (nsb * 128) + sb * 128 + hf * 64)[:, None] + i64[None, :], mask_n[:, None])
                ql = (ql >> ((r % 2) * 4)) & 15
                qh = _ld(p1, (n64 * (nsb * 64) + sb * 64 + hf * 32)[:, None] + (i64 % 32)[None, :], mask_n[:, None])
                q = ql | (((qh >> (((r % 2) * 2 + i64 // 32) * 2)[None, :]) & 3) << 4)
                s_off = n64 * (nsb * 16) + sb * 16 + hf * 8 + (r % 2) * 4
                sc = _ld(p2, s_off[:, None] + (i64 // 16)[None, :], mask_n[:, None]).to(tl.float32)
                w = d * sc * _magic(q, 32.0)
            else:  # chunk g = r: qs bytes 32g + l, low nibbles sub-block 2g, high 2g + 1
                QS = p3 if FMT == _Q4K else p4
                qb = _ld(QS, (n64 * (nsb * 128) + sb * 128 + r * 32)[:, None] + i32[None, :], mask_n[:, None])
                lo = qb & 15
                hi = qb >> 4
                if FMT == _Q5K:
                    qh = _ld(p3, (n64 * (nsb * 32) + sb * 32)[:, None] + i32[None, :], mask_n[:, None])
                    lo = lo | (((qh >> (2 * r)) & 1) << 4)
                    hi = hi | (((qh >> (2 * r + 1)) & 1) << 4)
                s_off = n64 * (nsb * 12) + sb * 12
                sc_lo, mn_lo = _k_scale_min(p2, s_off, 2 * r, mask_n)
                sc_hi, mn_hi = _k_scale_min(p2, s_off, 2 * r + 1, mask_n)
                dmin = _ld(p1, n64 * nsb + sb, mask_n)[:, None]
                w_lo = _magic(lo, 0.0) * (d * sc_lo[:, None]) - dmin * mn_lo[:, None]
                w_hi = _magic(hi, 0.0) * (d * sc_hi[:, None]) - dmin * mn_hi[:, None]
                w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), (w_lo.shape[0], 64))
        else:  # two 32-weight blocks
            nb = K // 32
            blk = k0 // 32 + tl.arange(0, 2)
            mask2 = mask_n[:, None] & (blk < nb)[None, :]
            sc_off = (n64 * nb)[:, None] + blk[None, :]
            d = _ld(p0, sc_off, mask2)[:, :, None]
            if FMT == _Q8_0:
                i32 = tl.arange(0, 32)
                qb = _ld(
                    p1,
                    (n64 * (nb * 32))[:, None, None] + (blk * 32)[None, :, None] + i32[None, None, :],
                    mask2[:, :, None],
                )
                w3 = d * _magic(qb ^ 128, 128.0)
            else:
                i16 = tl.arange(0, 16)
                QS = p1 if FMT == _Q4_0 else (p2 if FMT != _Q5_1 else p3)
                qb = _ld(
                    QS,
                    (n64 * (nb * 16))[:, None, None] + (blk * 16)[None, :, None] + i16[None, None, :],
                    mask2[:, :, None],
                )
                q = _interleave_halves(qb & 15, qb >> 4)  # [BLOCK_N, 64]: weight j of block b at 32b + j
                q = tl.reshape(q, (q.shape[0], 2, 32))
                if FMT == _Q5_0 or FMT == _Q5_1:
                    qh = _ld(p1 if FMT == _Q5_0 else p2, sc_off, mask2)[:, :, None]
                    q = q | (((qh >> tl.arange(0, 32)[None, None, :]) & 1) << 4)
                if FMT == _Q4_0:
                    w3 = d * _magic(q, 8.0)
                elif FMT == _Q5_0:
                    w3 = d * _magic(q, 16.0)
                else:
                    w3 = d * _magic(q, 0.0) + _ld(p1, sc_off, mask2)[:, :, None]
            w = tl.reshape(w3, (w3.shape[0], 64))
        return w

    @triton.jit
    def _qgemm_kernel(
        x_ptr,
        p0,
        p1,
        p2,
        p3,
        p4,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_ym,
        FMT: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Prefill: a [BLOCK_M, BLOCK_N] output tile, dequantizing [BLOCK_K, BLOCK_N] of W^T per step."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        mask_m = offs_m < M
        n64 = offs_n.to(tl.int64)
        x_rows = offs_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            if FMT == _Q2K or FMT == _Q3K:
                w = _dequant(
                    p0, p1, p2, p3, p4, n64[None, :], offs_k[:, None], mask_k[:, None] & mask_n[None, :], K, FMT
                )
            else:  # 16/32-byte loads per row, as in the GEMV (BLOCK_K = 64)
                w = tl.trans(_dequant_tile64(p0, p1, p2, p3, p4, n64, k0, mask_n, K, FMT))
            x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
        y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
