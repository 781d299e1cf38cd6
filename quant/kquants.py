"""GGML K-quant codecs (q2k q3k q4k q5k q6k): vectorized torch, byte-identical to llama.cpp's quantizer.

Every 256-weight super-block is one GGML struct (block_q2_K ... block_q6_K) with the fields in
GGML's order and little-endian f16 super-scales, so a row of our bytes is a row of a GGUF tensor.

The quantizers reproduce llama.cpp's reference (no importance matrix) quantizers, quantize_row_q*_K_ref,
bit for bit: fit a scale (and for q2k/q4k/q5k a min) per sub-block with ggml's searches
(make_qkx2_quants, make_qx_quants, make_q3_quants), quantize those sub-block scales against one f16
super-scale, then re-round every weight against the scale it will really be decoded with.

Exactness is what makes the error match too. Near-grid weights (e.g. a dequantized Q4_1 model) put
many candidates on exact rounding ties: q5k's first candidate stretches a 16-level sub-block over
30.5 steps, so its top weight lands on 30.5. ggml's iscale = 30.5f / (max - min), then
nearest_int(iscale * (x - min)), rounds it to 30 and fits the grid exactly; computing the same in
another order (30.5 * (1 / span), x * iscale - min * iscale) gave 31, missed the fit and made q5k 4.5%
worse. So every step is ggml's float32 operation in ggml's order: sums accumulate left to right
(torch's reductions reorder), rounding is half-to-even like nearest_int, `c / t` is a true division
(torch computes c * (1 / t)), sqrt goes through float64 (torch's float32 sqrt is not correctly
rounded), candidates win only on a strict improvement, and a sub-block whose scale level rounds to 0
keeps the levels its search found. Each sub-block is first scaled by a power of two, which is exact,
so only weights whose float32 products under/overflow in ggml can come out differently (there ggml
loses precision and we do not): |x| around 1e-6 or 1e4 for q3k's x^9 products, far wider for the rest.

The searches run every sub-block at once: the only Python loops are over the fixed candidate lists
and over weight positions (the ordered sums, q3k's per-weight descent).

The dequantizers are the plain-torch reference: they reproduce gguf-py's numpy dequantizers bit
for bit (the same float32 operations in the same order).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmc.quant.formats import FORMATS, QK_K

GROUP_MAX_EPS = 1e-15  # a sub-block whose largest |x| is below this is all zeros (ggml's threshold)
# Weights encoded per chunk of rows. The candidate searches make ~100 small passes per candidate over a
# chunk (the ordered sums go weight position by position), so it should stay cache-sized; q3k's
# per-weight descent does even more small [chunk/16] steps, so its chunk is larger to amortize per-op
# overhead. Both keep the working set to tens of MB.
_CHUNK_WEIGHTS = 1 << 18
_Q3K_CHUNK_WEIGHTS = 1 << 20

assert sys.byteorder == "little", "the f16 fields are written in native byte order"


@dataclass(frozen=True)
class _AffineSearch:
    """Scale+min search (make_qkx2_quants): candidate inverse scales (rmin + rdelta*i + nmax) / (max - min)."""

    nmax: int  # largest quant level
    rmin: float  # first offset from nmax
    rdelta: float  # offset step
    nstep: int  # i runs over 0..nstep
    use_mad: bool  # weighted absolute error instead of weighted squared error


_Q2K_SEARCH = _AffineSearch(nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
_Q4K_SEARCH = _AffineSearch(nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, use_mad=False)
_Q5K_SEARCH = _AffineSearch(nmax=31, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=False)

# Symmetric search (make_qx_quants): candidate inverse scales -(nmax + _SYM_DELTA*i) / max, |i| <= _SYM_STEPS.
_SYM_STEPS = 9
_SYM_DELTA = 0.1
_Q3K_DESCENT_PASSES = 5  # make_q3_quants: sweeps of per-weight re-rounding

_Q2K_SUB = 16  # weights per sub-block (q2k, q3k, q6k)
_Q4K_SUB = 32  # weights per sub-block (q4k, q5k)
_Q2K_SCALE_LEVELS = 15  # q2k's 4-bit sub-block scales and mins
_K4_SCALE_LEVELS = 63  # q4k/q5k's 6-bit sub-block scales and mins
_Q3K_SCALE_HALF = 32  # q3k's signed 6-bit sub-block scales: -32..31, stored +32
_Q6K_SCALE_HALF = 128  # q6k's int8 sub-block scales: -128..127
_Q3K_NMAX = 4  # q3k weights: -4..3
_Q6K_NMAX = 32  # q6k weights: -32..31
_MAX_F32_EXPONENT = 127  # 2**127 is float32's largest power of two
_BYTE_MASK = 0xFF  # ggml stores some int levels in uint8_t: negative ones wrap


# ----------------------------------------------------------------------------- shared helpers


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [N] → the f16 bytes [N, 2] GGML stores (round to nearest even, little-endian)."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _read_f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 field at byte `offset` of every block [N, type_size], as float32 [N, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _as_blocks(blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """uint8 [rows, n_blocks * type_size] → ([rows * n_blocks, type_size], rows)."""
    size = FORMATS[name].type_size
    assert blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.shape[1] % size == 0, (name, blocks.shape)
    return blocks.reshape(-1, size), blocks.shape[0]


def _by_row_chunks(
    w: torch.Tensor, name: str, encode: Callable[[torch.Tensor], torch.Tensor], chunk_weights: int
) -> torch.Tensor:
    """Run `encode` (float32 [n_blocks, 256] → uint8 [n_blocks, type_size]) over row chunks of w.

    Rows are independent, so chunking changes nothing but speed and memory. The work is thousands
    of small cache-sized ops, which intra-op threads do not speed up but which slow down by orders
    of magnitude when another process holds a core (every op waits on a preempted worker), so this
    thread runs them single-threaded and then restores its thread count.
    """
    assert w.dim() == 2 and w.shape[1] % QK_K == 0, (name, tuple(w.shape))
    w = w.detach().float().contiguous()
    rows, cols = w.shape
    out = torch.empty(rows, FORMATS[name].row_bytes(cols), dtype=torch.uint8)
    step = max(1, chunk_weights // cols)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(0, rows, step):
            chunk = w[r : r + step]
            out[r : r + step] = encode(chunk.reshape(-1, QK_K)).reshape(chunk.shape[0], -1)
    finally:
        torch.set_num_threads(threads)
    return out


def _shifts(bits: int, count: int, dims: int, dim: int) -> torch.Tensor:
    """[0, bits, 2*bits, ...] (count values) laid along `dim` of a `dims`-dimensional broadcastable int tensor."""
    shape = [1] * dims
    shape[dim] = count
    return (torch.arange(count, dtype=torch.int32) * bits).reshape(shape)


def _pack_fields(levels: torch.Tensor, bits: int, lanes: int) -> torch.Tensor:
    """Interleave `lanes` consecutive 32-weight runs into bytes: run k lands at bit k*bits.

    levels: int [N, G * lanes * 32] → uint8 [N, G * 32]; GGML's 2-bit qs, hmask and qh layouts.
    """
    n = levels.shape[0]
    grouped = levels.to(torch.int32).reshape(n, -1, lanes, 32) << _shifts(bits, lanes, 4, 2)
    return grouped.sum(2).to(torch.uint8).reshape(n, -1)


def _unpack_fields(packed: torch.Tensor, bits: int, lanes: int) -> torch.Tensor:
    """Inverse of _pack_fields: uint8 [N, G * 32] → uint8 [N, G * lanes * 32]."""
    n = packed.shape[0]
    mask = (1 << bits) - 1
    parts = packed.reshape(n, -1, 1, 32) >> _shifts(bits, lanes, 4, 2).to(torch.uint8)
    return (parts & mask).reshape(n, -1)


def _pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """int [N, G * 64] → uint8 [N, G * 32]: of each 64 weights, the first 32 in low nibbles, the next in high."""
    return _pack_fields(levels & 0xF, 4, 2)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """q4k/q5k's 12 scale bytes from 8 six-bit scales and 8 six-bit mins (int [N, 8] each)."""
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    high = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([low, mid, high], 1).to(torch.uint8)


def _unpack_k4_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4k/q5k's 12 scale bytes [N, 12] → (scales, mins), uint8 [N, 8] each."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return sc, mn


def _pack_q3_scales(ls: torch.Tensor) -> torch.Tensor:
    """q3k's 12 scale bytes from 16 six-bit (offset) scales int [N, 16]: low nibbles, then 2-bit high parts."""
    ls = ls.to(torch.int32)
    low = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = ((ls.reshape(-1, 4, 4) >> 4) << _shifts(2, 4, 3, 1)).sum(1)
    return torch.cat([low, high], 1).to(torch.uint8)


def _unpack_q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """q3k's 12 scale bytes [N, 12] → the 16 offset scales, uint8 [N, 16] (0..63, decoded as value - 32)."""
    n = scales.shape[0]
    low = (scales[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(2, 4, 3, 1).to(torch.uint8).reshape(1, 4, 1)).reshape(n, 16)
    return (low & 0xF) | ((high & 0x3) << 4)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (ggml's `d ? x/d : 0` guards)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _f32(x: float) -> float:
    """x rounded to float32: the value of one step of a C float expression."""
    return torch.tensor(x, dtype=torch.float32).item()


def _div(num: float, den: torch.Tensor) -> torch.Tensor:
    """num / den as a true float32 division (torch evaluates `num / den` as num * (1 / den), rounding twice)."""
    return torch.full_like(den, num) / den


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 ([n, ...] → [...]) in float32, left to right as ggml's loops add: torch.sum reorders."""
    acc = torch.zeros_like(t[0])
    for row in t.unbind(0):
        acc.add_(row)
    return acc


def _requantize(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, fallback: torch.Tensor) -> torch.Tensor:
    """Round x / step to the levels lo..hi (int32); where step is 0, ggml keeps the search's levels `fallback`."""
    q = torch.round(_safe_div(x, step.expand_as(x))).clamp_(lo, hi).to(torch.int32)
    return torch.where(step != 0, q, fallback)


def _scale_levels(values: torch.Tensor, peak: torch.Tensor, top: int) -> torch.Tensor:
    """nearest_int((top / peak) * values) as int32 (values [N, S], peak [N, 1]); 0 where peak is not positive."""
    inv = torch.where(peak > 0, _div(float(top), peak), 0.0)
    return (inv * values).round_().to(torch.int32)


def _positive_max(values: torch.Tensor) -> torch.Tensor:
    """Row max of values [N, S] as [N, 1], +0.0 unless positive (ggml's running max from 0: never -0.0)."""
    peak = values.amax(1, keepdim=True)
    return torch.where(peak > 0, peak, 0.0)


# ----------------------------------------------------------------------------- sub-block scale searches
# The searches take sub-blocks as columns, x [n, G] (one group of n weights per column): every step is
# then a contiguous [G]-wide vector op, and the ordered sums add one row at a time. Each first scales
# its columns by a power of two near 1 / max|x|: that is exact (every float32 result scales alike), and
# keeps the sums (up to x^3 * l^2) far from underflow and overflow whatever the weights' magnitude.


def _columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [N, 256] → [n, N * 256 / n]: each column one sub-block of n consecutive weights."""
    return x.reshape(-1, n).t().contiguous()


def _rows(levels: torch.Tensor, blocks: int) -> torch.Tensor:
    """Inverse of _columns for the searches' levels: [n, blocks * 256 / n] → [blocks, 256]."""
    return levels.t().reshape(blocks, QK_K)


def _normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 2^e per column, 2^e) with max|x| < 2^e <= 2 max|x| (1 for an all-zero column)."""
    amax = x.abs().amax(0)
    exponent = torch.frexp(amax).exponent.clamp_(max=_MAX_F32_EXPONENT)
    norm = torch.ldexp(torch.ones_like(amax), exponent)
    return x / norm, norm


def _affine_search(
    x: torch.Tensor, weight: torch.Tensor, p: _AffineSearch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column, make_qkx2_quants: x ≈ scale * L + min, L in 0..nmax, min <= 0.

    x, weight: float32 [n, G] → (scale [G], -min [G], L int32 [n, G]). First the plain grid from
    min(x, 0) to max(x); then, in ggml's order, grids of rmin + rdelta*i + nmax steps over [best min
    so far, max], each refit by weighted least squares (a positive min is clamped to 0 and the scale
    refit) and kept when its weighted error is strictly smaller. A constant column keeps scale 0,
    levels 0 and min min(x, 0). Only the winning grid (inverse scale, origin) is tracked; its levels
    are recomputed once at the end, and every pass writes into buffers allocated once.
    """
    x, norm = _normalize(x)
    weight = weight / norm  # weights are linear in x (|x|, rms + |x|): the same exact rescaling
    nmax = p.nmax
    lo = x.amin(0).clamp(max=0)
    hi = x.amax(0)
    flat = hi == lo
    sum_w = _seq_sum(weight)
    sum_x = _seq_sum(weight * x)
    lv, diff = torch.empty_like(x), torch.empty_like(x)
    terms = x.new_empty(x.shape[0], 3, x.shape[1])  # per weight: w*l, w*l*l, w*l*x, summed together
    w_l, w_l2, w_xl = terms.unbind(1)

    def levels(iscale: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return torch.sub(x, origin, out=lv).mul_(iscale).round_().clamp_(0, nmax)  # round(iscale * (x - origin))

    def error(scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        torch.mul(lv, scale, out=diff).add_(mn).sub_(x)  # scale * l + min - x
        return _seq_sum((diff.abs_() if p.use_mad else diff.mul_(diff)).mul_(weight))

    best_iscale = _div(float(nmax), torch.where(flat, 1.0, hi - lo))
    best_origin = best_min = lo
    best_scale = _div(1.0, best_iscale)
    levels(best_iscale, lo)
    best_err = error(best_scale, best_min)
    for i in range(p.nstep + 1):
        span = hi - best_min
        live = span > 0  # ggml would divide by a span <= 0 (a refit min above max): no usable grid
        steps = _f32(_f32(p.rmin + _f32(_f32(p.rdelta) * i)) + nmax)
        iscale = _div(steps, torch.where(live, span, 1.0))
        levels(iscale, best_min)
        torch.mul(weight, lv, out=w_l)
        torch.mul(w_l, lv, out=w_l2)
        torch.mul(w_l, x, out=w_xl)
        sum_l, sum_l2, sum_xl = _seq_sum(terms).unbind(0)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = live & (det > 0)
        det = torch.where(ok, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = mn > 0
        scale = torch.where(positive, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), scale)
        mn = torch.where(positive, 0.0, mn)
        err = error(scale, mn)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_origin = torch.where(better, best_min, best_origin)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, mn, best_min)

    found = torch.where(flat, 0.0, levels(best_iscale, best_origin)).to(torch.int32)
    return torch.where(flat, 0.0, best_scale) * norm, -best_min * norm, found


def _symmetric_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, make_qx_quants (rmse_type 1): x ≈ scale * l, l in -nmax..nmax-1, weighting by x^2.

    x: float32 [n, G] → (scale [G], L = l + nmax int32 [n, G]). Candidates put the largest-|x| weight
    at level -(nmax + 0.1*i), the plain i = 0 grid first, then i = -9..9; a candidate replaces the best
    when its least-squares fit is strictly better (sum(wxl)^2 / sum(wl^2), compared as ggml does).
    Columns whose max |x| is below GROUP_MAX_EPS get scale 0 and L = 0.
    """
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    x, norm = _normalize(x)
    peak = torch.where(zero, 1.0, x.gather(0, x.abs().argmax(0, keepdim=True)).squeeze(0))  # the signed max
    w = x * x
    wx = w * x
    lv = torch.empty_like(x)
    terms = x.new_empty(x.shape[0], 2, x.shape[1])  # per weight: w*x*l, w*l*l, summed together
    w_xl, w_l2 = terms.unbind(1)

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, iscale, out=lv).round_().clamp_(-nmax, nmax - 1)

    def fit(steps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = _div(-steps, peak)
        levels(iscale)
        torch.mul(wx, lv, out=w_xl)
        torch.mul(w, lv, out=w_l2).mul_(lv)
        sum_xl, sum_l2 = _seq_sum(terms).unbind(0)
        return iscale, sum_xl, sum_l2

    best_iscale, sum_xl, sum_l2 = fit(float(nmax))
    scale = torch.where(sum_l2 != 0, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), 0.0)
    best = scale * sum_xl
    for i in range(-_SYM_STEPS, _SYM_STEPS + 1):
        if i == 0:
            continue
        iscale, sum_xl, sum_l2 = fit(_f32(nmax + _f32(_f32(_SYM_DELTA) * i)))
        better = (sum_l2 > 0) & (sum_xl * sum_xl > best * sum_l2)
        fitted = sum_xl / torch.where(better, sum_l2, 1.0)
        scale = torch.where(better, fitted, scale)
        best = torch.where(better, fitted * sum_xl, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    found = torch.where(zero, 0, levels(best_iscale).to(torch.int32) + nmax)
    return torch.where(zero, 0.0, scale * norm), found


def _q3_descent(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, make_q3_quants: x ≈ scale * l, l in -nmax..nmax-1, weighting by x^2.

    x: float32 [n, G] → (scale [G], L = l + nmax int32 [n, G]). Start from the grid that puts the
    largest-|x| weight at -nmax, then sweep the weights in order _Q3K_DESCENT_PASSES times: re-round
    each against the least-squares scale of the others and keep the change when it raises
    sum(wxl)^2 / sum(wl^2). A sweep that changes nothing leaves the next ones idle too, so running them
    all equals ggml's early exit. Columns whose max |x| is below GROUP_MAX_EPS get scale 0 and L = 0.
    """
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    x, norm = _normalize(x)
    peak = torch.where(zero, 1.0, x.gather(0, x.abs().argmax(0, keepdim=True)).squeeze(0))
    lv = (_div(-float(nmax), peak) * x).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sum_xl = _seq_sum(wx * lv)
    sum_l2 = _seq_sum(w * lv * lv)
    for _ in range(_Q3K_DESCENT_PASSES):
        for j in range(x.shape[0]):
            lj, wj, wxj = lv[j], w[j], wx[j]
            xl_rest = sum_xl - wxj * lj
            l2_rest = sum_l2 - wj * lj * lj
            new = (x[j] * l2_rest / xl_rest).round_().clamp_(-nmax, nmax - 1)
            xl_new = xl_rest + wxj * new
            l2_new = l2_rest + wj * new * new
            take = (xl_rest > 0) & (new != lj) & (l2_new > 0) & (xl_new * xl_new * sum_l2 > sum_xl * sum_xl * l2_new)
            lv[j] = torch.where(take, new, lj)
            sum_xl = torch.where(take, xl_new, sum_xl)
            sum_l2 = torch.where(take, l2_new, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), 0.0)
    levels = torch.where(zero, 0, lv.to(torch.int32) + nmax)
    return torch.where(zero, 0.0, scale * norm), levels


# ----------------------------------------------------------------------------- q2k


def _encode_q2k(x: torch.Tensor) -> torch.Tensor:
    """x [N, 256] → block_q2_K [N, 84]: scale|min<<4 bytes, 2-bit weights, d, dmin."""
    n = x.shape[0]
    sub = _columns(x, _Q2K_SUB)
    scales, mins, found = _affine_search(sub, sub.abs(), _Q2K_SEARCH)
    scales, mins = scales.reshape(n, -1), mins.reshape(n, -1)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    ls = _scale_levels(scales, max_scale, _Q2K_SCALE_LEVELS)
    lm = _scale_levels(mins, max_min, _Q2K_SCALE_LEVELS)
    packed = ((ls & _BYTE_MASK) | (lm << 4)) & _BYTE_MASK  # ggml ORs the uint8_t fields unclamped
    d = (max_scale / _Q2K_SCALE_LEVELS).half()  # 0 where max_scale is 0, as ggml sets it
    dmin = (max_min / _Q2K_SCALE_LEVELS).half()
    step = (d.float() * (packed & 0xF)).unsqueeze(2)
    offset = (dmin.float() * (packed >> 4)).unsqueeze(2)
    x = x.reshape(n, -1, _Q2K_SUB)
    q = _requantize(x + offset, step, 0, 3, _rows(found, n).reshape(x.shape)).reshape(n, QK_K)
    return torch.cat([packed.to(torch.uint8), _pack_fields(q, 2, 4), _f16_bytes(d), _f16_bytes(dmin)], 1)


def quantize_q2k(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → block_q2_K bytes uint8 [rows, cols/256*84]: 2-bit weights, 4-bit scales and mins."""
    return _by_row_chunks(w, "q2k", _encode_q2k, _CHUNK_WEIGHTS)


def dequantize_q2k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q2_K bytes [rows, n*84] → float32 [rows, n*256]; d*sc*q - dmin*m, as gguf-py computes it."""
    b, rows = _as_blocks(blocks, "q2k")
    sc, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _read_f16(b, 80), _read_f16(b, 82)
    dl = (d * (sc & 0xF).float()).unsqueeze(2)
    ml = (dmin * (sc >> 4).float()).unsqueeze(2)
    q = _unpack_fields(qs, 2, 4).float().reshape(-1, 16, 16)
    return (dl * q - ml).reshape(rows, -1)


def byte_parts_q2k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q2k as its 2-bit values with one scale and offset per 16-weight sub-block, w = q * scale +
    offset (exact in float32): the form of the CPU's VNNI matmul (kernels/cpu/qmatmul_vnni.py)."""
    b, rows = _as_blocks(blocks, "q2k")
    sc = b[:, 0:16]
    d, dmin = _read_f16(b, 80), _read_f16(b, 82)
    q = _unpack_fields(b[:, 16:80], 2, 4)
    return (
        q.reshape(rows, -1),
        (d * (sc & 0xF).float()).reshape(rows, -1),
        (-(dmin * (sc >> 4).float())).reshape(rows, -1),
    )


# ----------------------------------------------------------------------------- q3k


def _encode_q3k(x: torch.Tensor) -> torch.Tensor:
    """x [N, 256] → block_q3_K [N, 110]: high-bit mask, low 2 bits, packed 6-bit scales, d."""
    n = x.shape[0]
    scales, found = _q3_descent(_columns(x, _Q2K_SUB), _Q3K_NMAX)
    scales = scales.reshape(n, -1)
    peak = scales.gather(1, scales.abs().argmax(1, keepdim=True))  # the signed largest sub-block scale → -32
    live = peak != 0  # else ggml leaves the scale bytes 0 (level -32) and d 0
    iscale = _div(-float(_Q3K_SCALE_HALF), torch.where(live, peak, 1.0))
    ls = torch.round(iscale * scales).clamp_(-_Q3K_SCALE_HALF, _Q3K_SCALE_HALF - 1).to(torch.int32)
    ls = torch.where(live, ls, -_Q3K_SCALE_HALF)
    d = torch.where(live, _div(1.0, iscale), 0.0).half()
    step = (d.float() * ls).unsqueeze(2)
    x = x.reshape(n, -1, _Q2K_SUB)
    fallback = _rows(found, n).reshape(x.shape) - _Q3K_NMAX
    q = _requantize(x, step, -_Q3K_NMAX, _Q3K_NMAX - 1, fallback).reshape(n, QK_K) + _Q3K_NMAX
    return torch.cat(
        [_pack_fields(q >> 2, 1, 8), _pack_fields(q & 3, 2, 4), _pack_q3_scales(ls + _Q3K_SCALE_HALF), _f16_bytes(d)],
        1,
    )


def quantize_q3k(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → block_q3_K bytes uint8 [rows, cols/256*110]: 3-bit weights, signed 6-bit scales."""
    return _by_row_chunks(w, "q3k", _encode_q3k, _Q3K_CHUNK_WEIGHTS)


def dequantize_q3k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q3_K bytes [rows, n*110] → float32 [rows, n*256]; d*(sc-32)*(low2 - 4*(1-high)), as gguf-py."""
    b, rows = _as_blocks(blocks, "q3k")
    hmask, qs, sc = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _read_f16(b, 108)
    dl = (d * (_unpack_q3_scales(sc).to(torch.int32) - _Q3K_SCALE_HALF).float()).unsqueeze(2)
    low = _unpack_fields(qs, 2, 4).to(torch.int32)
    high = _unpack_fields(hmask, 1, 8).to(torch.int32)
    q = (low - ((1 - high) << 2)).float().reshape(-1, 16, 16)
    return (dl * q).reshape(rows, -1)


def byte_parts_q3k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q3k as unsigned 3-bit values u = q + 4 with one scale and offset per 16-weight sub-block,
    w = u * scale - 4 * scale (exact in float32), as byte_parts_q2k."""
    b, rows = _as_blocks(blocks, "q3k")
    d = _read_f16(b, 108)
    scale = d * (_unpack_q3_scales(b[:, 96:108]).to(torch.int32) - _Q3K_SCALE_HALF).float()
    u = _unpack_fields(b[:, 32:96], 2, 4) | (_unpack_fields(b[:, 0:32], 1, 8) << 2)
    return u.reshape(rows, -1), scale.reshape(rows, -1), (-_Q3K_NMAX * scale).reshape(rows, -1)


# ----------------------------------------------------------------------------- q4k / q5k


def _encode_k4(x: torch.Tensor, search: _AffineSearch) -> tuple[torch.Tensor, torch.Tensor]:
    """q4k/q5k's shared part, x [N, 256] → (d, dmin, scales: header bytes [N, 16]; levels int32 [N, 256])."""
    n = x.shape[0]
    sub = _columns(x, _Q4K_SUB)
    # sqrtf is correctly rounded; torch's float32 sqrt is not (1 ulp off in ~15% of cases), double sqrt is.
    rms = torch.sqrt((_seq_sum(sub * sub) / _Q4K_SUB).double()).float()
    scales, mins, found = _affine_search(sub, rms + sub.abs(), search)  # weights favour large |x| (ggml's choice)
    scales, mins = scales.reshape(n, -1), mins.reshape(n, -1)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    # ggml stores the levels in uint8_t before clamping to 63: a negative one wraps to the top.
    ls = (_scale_levels(scales, max_scale, _K4_SCALE_LEVELS) & _BYTE_MASK).clamp_(max=_K4_SCALE_LEVELS)
    lm = (_scale_levels(mins, max_min, _K4_SCALE_LEVELS) & _BYTE_MASK).clamp_(max=_K4_SCALE_LEVELS)
    d = (max_scale / _K4_SCALE_LEVELS).half()
    dmin = (max_min / _K4_SCALE_LEVELS).half()
    step = (d.float() * ls).unsqueeze(2)
    offset = (dmin.float() * lm).unsqueeze(2)
    x = x.reshape(n, -1, _Q4K_SUB)
    q = _requantize(x + offset, step, 0, search.nmax, _rows(found, n).reshape(x.shape)).reshape(n, QK_K)
    header = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(ls, lm)], 1)
    return header, q


def _encode_q4k(x: torch.Tensor) -> torch.Tensor:
    """x [N, 256] → block_q4_K [N, 144]: header, then nibbles."""
    header, q = _encode_k4(x, _Q4K_SEARCH)
    return torch.cat([header, _pack_nibbles(q)], 1)


def _encode_q5k(x: torch.Tensor) -> torch.Tensor:
    """x [N, 256] → block_q5_K [N, 176]: header, the fifth bits (qh), then the low nibbles."""
    header, q = _encode_k4(x, _Q5K_SEARCH)
    return torch.cat([header, _pack_fields(q >> 4, 1, 8), _pack_nibbles(q)], 1)


def quantize_q4k(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → block_q4_K bytes uint8 [rows, cols/256*144]: 4-bit weights, 6-bit scales and mins."""
    return _by_row_chunks(w, "q4k", _encode_q4k, _CHUNK_WEIGHTS)


def quantize_q5k(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → block_q5_K bytes uint8 [rows, cols/256*176]: 5-bit weights, 6-bit scales and mins."""
    return _by_row_chunks(w, "q5k", _encode_q5k, _CHUNK_WEIGHTS)


def _decode_k4(b: torch.Tensor, q: torch.Tensor, rows: int) -> torch.Tensor:
    """d*sc*q - dmin*m over 8 sub-blocks of 32, in gguf-py's float32 order."""
    d, dmin = _read_f16(b, 0), _read_f16(b, 2)
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    dl = (d * sc.float()).unsqueeze(2)
    ml = (dmin * mn.float()).unsqueeze(2)
    return (dl * q.float().reshape(-1, 8, 32) - ml).reshape(rows, -1)


def q4k_fields(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4k's fields as stored: its 4-bit values uint8 [rows, cols], its 6-bit scales and mins uint8
    [rows, cols / 32], and the float16 bits (int16) of d and dmin [rows, cols / 256, 2]."""
    b, rows = _as_blocks(blocks, "q4k")
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    q = _unpack_fields(b[:, 16:144], 4, 2)
    return (
        q.reshape(rows, -1),
        sc.reshape(rows, -1),
        mn.reshape(rows, -1),
        b[:, 0:4].contiguous().view(torch.int16).reshape(rows, -1, 2),
    )


def int4_parts_q4k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4k as 4-bit values with one scale and offset per 32-weight sub-block, w = q * scale + offset
    (exact in float32): the form the CPU's packed int4 matmul takes (kernels/cpu/qmatmul_cpu.py)."""
    b, rows = _as_blocks(blocks, "q4k")
    d, dmin = _read_f16(b, 0), _read_f16(b, 2)
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    q = _unpack_fields(b[:, 16:144], 4, 2)
    return q.reshape(rows, -1), (d * sc.float()).reshape(rows, -1), (-(dmin * mn.float())).reshape(rows, -1)


def byte_parts_q5k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q5k as its 5-bit values with one scale and offset per 32-weight sub-block, w = q * scale +
    offset (exact in float32): the form of the CPU's VNNI matmul (kernels/cpu/qmatmul_vnni.py)."""
    b, rows = _as_blocks(blocks, "q5k")
    d, dmin = _read_f16(b, 0), _read_f16(b, 2)
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    q = _unpack_fields(b[:, 48:176], 4, 2) | (_unpack_fields(b[:, 16:48], 1, 8) << 4)
    return q.reshape(rows, -1), (d * sc.float()).reshape(rows, -1), (-(dmin * mn.float())).reshape(rows, -1)


def dequantize_q4k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q4_K bytes [rows, n*144] → float32 [rows, n*256]."""
    b, rows = _as_blocks(blocks, "q4k")
    return _decode_k4(b, _unpack_fields(b[:, 16:144], 4, 2), rows)


def dequantize_q5k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q5_K bytes [rows, n*176] → float32 [rows, n*256]."""
    b, rows = _as_blocks(blocks, "q5k")
    q = _unpack_fields(b[:, 48:176], 4, 2) | (_unpack_fields(b[:, 16:48], 1, 8) << 4)
    return _decode_k4(b, q, rows)


# ----------------------------------------------------------------------------- q6k


def _encode_q6k(x: torch.Tensor) -> torch.Tensor:
    """x [N, 256] → block_q6_K [N, 210]: low nibbles, high 2 bits, int8 scales, d."""
    n = x.shape[0]
    scales, found = _symmetric_search(_columns(x, _Q2K_SUB), _Q6K_NMAX)
    scales = scales.reshape(n, -1)
    at = scales.abs().argmax(1, keepdim=True)
    peak = scales.gather(1, at)
    live = peak.abs() >= GROUP_MAX_EPS  # an all-zero super-block is stored as all-zero bytes
    iscale = _div(-float(_Q6K_SCALE_HALF), torch.where(live, peak, 1.0))
    ls = torch.round(iscale * scales).clamp_(-_Q6K_SCALE_HALF, _Q6K_SCALE_HALF - 1).to(torch.int32)
    ls = torch.where(live, ls, 0)
    d = torch.where(live, _div(1.0, iscale), 0.0).half()
    step = (d.float() * ls).unsqueeze(2)
    x = x.reshape(n, -1, _Q2K_SUB)
    fallback = _rows(found, n).reshape(x.shape) - _Q6K_NMAX
    q = _requantize(x, step, -_Q6K_NMAX, _Q6K_NMAX - 1, fallback).reshape(n, QK_K) + _Q6K_NMAX
    q = torch.where(live, q, 0)
    halves = q.reshape(n, 2, 4, 32)
    ql = (halves[:, :, :2] & 0xF) | ((halves[:, :, 2:] & 0xF) << 4)  # runs 0,1 low nibbles; runs 2,3 high
    qh = _pack_fields(q >> 4, 2, 4)
    return torch.cat([ql.to(torch.uint8).reshape(n, -1), qh, ls.to(torch.int8).view(torch.uint8), _f16_bytes(d)], 1)


def quantize_q6k(w: torch.Tensor) -> torch.Tensor:
    """float [rows, cols] → block_q6_K bytes uint8 [rows, cols/256*210]: 6-bit weights, int8 scales."""
    return _by_row_chunks(w, "q6k", _encode_q6k, _CHUNK_WEIGHTS)


def byte_parts_q6k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q6k as its 6-bit values with one scale and offset per 16-weight sub-block, w = q * scale -
    32 * scale (float32 rounds q * scale where d * sc has over 18 significant bits), as
    byte_parts_q2k."""
    b, rows = _as_blocks(blocks, "q6k")
    n = b.shape[0]
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    scale = _read_f16(b, 208) * sc.view(torch.int8).float()
    low = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0xF
    high = _unpack_fields(qh, 2, 4).reshape(n, 2, 2, 64)
    u = (low | (high << 4)).reshape(rows, -1)
    return u, scale.reshape(rows, -1), (-_Q6K_NMAX * scale).reshape(rows, -1)


def dequantize_q6k(blocks: torch.Tensor) -> torch.Tensor:
    """block_q6_K bytes [rows, n*210] → float32 [rows, n*256]; d*sc*(q-32), as gguf-py computes it."""
    b, rows = _as_blocks(blocks, "q6k")
    n = b.shape[0]
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _read_f16(b, 208)
    dl = (d * sc.view(torch.int8).float()).unsqueeze(2)
    low = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0xF
    high = _unpack_fields(qh, 2, 4).reshape(n, 2, 2, 64)
    q = ((low | (high << 4)).to(torch.int32) - _Q6K_NMAX).float().reshape(n, 16, 16)
    return (dl * q).reshape(rows, -1)
