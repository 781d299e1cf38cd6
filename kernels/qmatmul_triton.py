# ruff: noqa: N803  (Triton's convention: upper-case names for sizes and compile-time constants)
"""Matmuls that read GGML quantized blocks directly: y = x @ W^T with W dequantized in registers.

A quantized weight never exists in float form in GPU memory: each program loads the raw block
bytes of its tile (the uint8 [N, K // block_size * type_size] layout of `quant_formats`, byte for
byte a GGUF tensor) and expands them to floats next to the multiply. Decoding is memory bound, so
reading 4.5 bits instead of 16 per weight is the whole point.

Two kernels share one dequantizer: a GEMV-style kernel for decode (few rows of x; each program owns
a slice of output features and sweeps all of K with broadcast-multiply-and-sum) and a tiled GEMM for
prefill (tl.dot on dequantized tiles). The dequantizer addresses every element by (row byte offset,
column index), so it serves both orientations: [BLOCK_N, BLOCK_K] for the GEMV and [BLOCK_K, BLOCK_N]
for tl.dot. Bytes are read one at a time and f16 scales assembled from two bytes, because block
sizes like 18 and 22 bytes leave multi-byte fields unaligned.

Triton is optional: this module imports without it, and `qmatmul` then raises.
`quant_formats.reference_qmatmul` is the plain-torch oracle the tests hold the kernels to.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llmc.errors import BadInputError
from llmc.kernels.quant_formats import FORMATS, BlockFormat

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the CPU-only install: qmatmul explains, everything else still imports
    _TRITON_IMPORT_ERROR = exc

# Format ids, passed to the kernels as a tl.constexpr so each format compiles its own dequantizer.
FORMAT_IDS: dict[str, int] = {name: i for i, name in enumerate(FORMATS)}

# Decode: at most this many rows of x go to the GEMV kernel; more rows amortize dequantization
# better through tl.dot (whose tiles are at least 16 rows anyway).
GEMV_MAX_M = 8
# GEMV tile: a few output features per program so that even narrow layers (N of 576-2048 in small
# models) spread over all SMs; the [BLOCK_M, BLOCK_N, BLOCK_K] product is kept at ~1024 elements by
# shrinking BLOCK_K as BLOCK_M grows. Compiled for sm_90 with triton 3.6 this stays at <= 80
# registers per thread for every format (a 2048-element product took up to 186, costing occupancy).
GEMV_BLOCK_N = 8
GEMV_PRODUCT_ELEMS = 1024
GEMV_MIN_BLOCK_K = 32  # one legacy block
GEMV_NUM_WARPS = 4
# GEMM tile: 64x64 output tiles with 64-wide K steps (a quarter of a K-quant super-block, two
# legacy blocks). Dequantizing by gathers is register hungry: at 4 warps this tile spilled for
# nine of the ten formats on sm_90; at 8 warps none spill. BLOCK_M shrinks to 16/32 for short prompts.
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 64
GEMM_MAX_BLOCK_M = 64
GEMM_MIN_BLOCK_M = 16  # tl.dot's smallest tile
GEMM_NUM_WARPS = 8


def triton_available() -> bool:
    """Whether the Triton kernels can run here (callers pick the torch path otherwise)."""
    return _TRITON_IMPORT_ERROR is None


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _check(x: torch.Tensor, blocks: torch.Tensor, fmt: str, n: int, k: int) -> BlockFormat:
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
    if x.shape[-1] != k:
        raise BadInputError(f"x has {x.shape[-1]} features, the weight expects {k}")
    return spec


def qmatmul(x: torch.Tensor, blocks: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """y = x @ W^T for x [..., K] and W [N, K] stored as GGML blocks; y has x's dtype, sums are fp32."""
    _check(x, blocks, fmt, n, k)
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(
            "qmatmul needs Triton, which is not installed here; install it (pip install triton) "
            "or use the plain-torch dequantize-then-matmul path"
        ) from _TRITON_IMPORT_ERROR
    if x.device != blocks.device:
        raise BadInputError(f"x is on {x.device} but the weight blocks are on {blocks.device}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on"):
        raise BadInputError(f"qmatmul runs on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise BadInputError(f"qmatmul takes fp16, bf16 or fp32 activations, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if blocks.stride(-1) != 1:
        blocks = blocks.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0 and n > 0:
        _launch(x2, blocks, y, FORMAT_IDS[fmt], m, n, k)
    return y.reshape(*lead, n)


def _launch(x: torch.Tensor, blocks: torch.Tensor, y: torch.Tensor, fmt_id: int, m: int, n: int, k: int) -> None:
    """Pick GEMV for decode-sized batches and the tiled GEMM for prefill."""
    args: tuple[Any, ...] = (x, blocks, y, m, n, k, x.stride(0), blocks.stride(0), y.stride(0))
    if m <= GEMV_MAX_M:
        block_m = _next_pow2(m)
        block_k = max(GEMV_MIN_BLOCK_K, GEMV_PRODUCT_ELEMS // (block_m * GEMV_BLOCK_N))
        grid: tuple[int, ...] = (triton.cdiv(n, GEMV_BLOCK_N),)
        _qgemv_kernel[grid](
            *args, FMT=fmt_id, BLOCK_M=block_m, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=block_k, num_warps=GEMV_NUM_WARPS
        )
    else:
        block_m = min(GEMM_MAX_BLOCK_M, max(GEMM_MIN_BLOCK_M, _next_pow2(m)))
        grid = (triton.cdiv(n, GEMM_BLOCK_N), triton.cdiv(m, block_m))
        _qgemm_kernel[grid](
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
    def _u8(ptr, off, mask):
        """One byte per element, widened to int32 for the bit twiddling."""
        return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(ptr, off, mask):
        """A little-endian f16 at any byte offset (18/22-byte blocks leave it unaligned)."""
        lo = tl.load(ptr + off, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptr + off + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _i8(ptr, off, mask):
        """A signed byte: flip the sign bit and re-centre, no bitcast needed."""
        return (_u8(ptr, off, mask) ^ 128) - 128

    @triton.jit
    def _dequant_legacy(ptr, row, col, mask, FMT: tl.constexpr):
        """32-weight blocks: low nibbles hold weights 0-15, high nibbles 16-31; q5 adds a 32-bit qh."""
        j = col % 32
        if FMT == _Q4_0:  # {f16 d; u8 qs[16]}, w = d * (q - 8)
            base = row + (col // 32) * 18
            q = (_u8(ptr, base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15
            w = _f16(ptr, base, mask) * (q - 8).to(tl.float32)
        elif FMT == _Q4_1:  # {f16 d, m; u8 qs[16]}, w = d * q + m
            base = row + (col // 32) * 20
            q = (_u8(ptr, base + 4 + j % 16, mask) >> ((j // 16) * 4)) & 15
            w = _f16(ptr, base, mask) * q.to(tl.float32) + _f16(ptr, base + 2, mask)
        elif FMT == _Q5_0:  # {f16 d; u8 qh[4]; u8 qs[16]}, w = d * (q - 16)
            base = row + (col // 32) * 22
            hb = (_u8(ptr, base + 2 + j // 8, mask) >> (j % 8)) & 1
            q = ((_u8(ptr, base + 6 + j % 16, mask) >> ((j // 16) * 4)) & 15) | (hb << 4)
            w = _f16(ptr, base, mask) * (q - 16).to(tl.float32)
        elif FMT == _Q5_1:  # {f16 d, m; u8 qh[4]; u8 qs[16]}, w = d * q + m
            base = row + (col // 32) * 24
            hb = (_u8(ptr, base + 4 + j // 8, mask) >> (j % 8)) & 1
            q = ((_u8(ptr, base + 8 + j % 16, mask) >> ((j // 16) * 4)) & 15) | (hb << 4)
            w = _f16(ptr, base, mask) * q.to(tl.float32) + _f16(ptr, base + 2, mask)
        else:  # q8_0 {f16 d; i8 qs[32]}, w = d * q
            base = row + (col // 32) * 34
            w = _f16(ptr, base, mask) * _i8(ptr, base + 2 + j, mask).to(tl.float32)
        return w

    @triton.jit
    def _k_scale_min(ptr, scales, sub, mask):
        """q4_K/q5_K's 8 (scale, min) pairs of 6 bits packed in 12 bytes; `sub` = j // 32.

        Pairs 0-3 are the low 6 bits of bytes 0-3 (scale) and 4-7 (min); pairs 4-7 take their low
        4 bits from the nibbles of bytes 8-11 and their top 2 bits from the spare bits of 0-7.
        """
        a = _u8(ptr, scales + sub, mask)  # byte sub: scale (sub < 4) or min's high bits (sub >= 4)
        b = _u8(ptr, scales + sub + 4, mask)  # byte sub + 4: min (sub < 4) or both low nibbles (sub >= 4)
        c = _u8(ptr, scales + sub % 4, mask)  # byte sub - 4 for sub >= 4: the scale's high bits
        low = sub < 4
        sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _dequant_kquant(ptr, row, col, mask, FMT: tl.constexpr):
        """256-weight super-blocks with per-16 or per-32 sub-block scales.

        Within a super-block, 2-bit fields are spread as 128-weight halves x 4 shifts x 32 bytes and
        nibbles as 64-weight quarters x 2 shifts x 32 bytes; `j` is the weight's index in its block.
        """
        j = col % 256
        if FMT == _Q2K:  # {u8 scales[16]; u8 qs[64]; f16 d, dmin}, w = d*(sc&15)*q - dmin*(sc>>4)
            base = row + (col // 256) * 84
            sc = _u8(ptr, base + j // 16, mask)
            q = (_u8(ptr, base + 16 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
            d = _f16(ptr, base + 80, mask)
            dmin = _f16(ptr, base + 82, mask)
            w = d * (sc & 15).to(tl.float32) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)
        elif FMT == _Q3K:  # {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}, w = d*(sc-32)*(q - 4*!h)
            base = row + (col // 256) * 110
            h = (_u8(ptr, base + j % 32, mask) >> (j // 32)) & 1
            ql = (_u8(ptr, base + 32 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
            s = j // 16  # 16 6-bit scales: low nibbles in bytes 0-7, top 2 bits in bytes 8-11
            sl = (_u8(ptr, base + 96 + s % 8, mask) >> ((s // 8) * 4)) & 15
            sh = (_u8(ptr, base + 104 + s % 4, mask) >> ((s // 4) * 2)) & 3
            sc = (sl | (sh << 4)) - 32
            q = ql - 4 * (1 - h)  # GGML's quirk: a set hmask bit means no -4 offset
            w = _f16(ptr, base + 108, mask) * sc.to(tl.float32) * q.to(tl.float32)
        elif FMT == _Q4K:  # {f16 d, dmin; u8 scales[12]; u8 qs[128]}, w = d*sc*q - dmin*mn
            base = row + (col // 256) * 144
            sc, mn = _k_scale_min(ptr, base + 4, j // 32, mask)
            q = (_u8(ptr, base + 16 + (j // 64) * 32 + j % 32, mask) >> (((j // 32) % 2) * 4)) & 15
            w = _f16(ptr, base, mask) * sc * q.to(tl.float32) - _f16(ptr, base + 2, mask) * mn
        elif FMT == _Q5K:  # {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}, as q4_K with a 5th bit
            base = row + (col // 256) * 176
            sc, mn = _k_scale_min(ptr, base + 4, j // 32, mask)
            h = (_u8(ptr, base + 16 + j % 32, mask) >> (j // 32)) & 1
            ql = (_u8(ptr, base + 48 + (j // 64) * 32 + j % 32, mask) >> (((j // 32) % 2) * 4)) & 15
            q = ql | (h << 4)
            w = _f16(ptr, base, mask) * sc * q.to(tl.float32) - _f16(ptr, base + 2, mask) * mn
        else:  # q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}, w = d * sc * (q - 32)
            base = row + (col // 256) * 210
            ql = (_u8(ptr, base + (j // 128) * 64 + j % 64, mask) >> (((j // 64) % 2) * 4)) & 15
            qh = (_u8(ptr, base + 128 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
            q = (ql | (qh << 4)) - 32
            sc = _i8(ptr, base + 192 + j // 16, mask)
            w = _f16(ptr, base + 208, mask) * sc.to(tl.float32) * q.to(tl.float32)
        return w

    @triton.jit
    def _dequant(ptr, row, col, mask, FMT: tl.constexpr):
        """fp32 weights at byte offset `row` (int64 row start) and column `col`, any broadcast shape."""
        return _dequant_legacy(ptr, row, col, mask, FMT) if FMT < _Q2K else _dequant_kquant(ptr, row, col, mask, FMT)

    @triton.jit
    def _qgemv_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        FMT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Decode: BLOCK_N output features x all M (<= 8) rows; each weight tile is dequantized once."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        mask_m = offs_m < M
        rows = offs_n.to(tl.int64) * stride_wn
        x_rows = offs_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = _dequant(w_ptr, rows[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :], FMT)
            x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _qgemm_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
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
        rows = offs_n.to(tl.int64) * stride_wn
        x_rows = offs_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = _dequant(w_ptr, rows[None, :], offs_k[:, None], mask_k[:, None] & mask_n[None, :], FMT)
            x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
        y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
