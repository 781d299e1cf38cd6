// y[M, N] = x[M, K] @ W^T for a weight stored as float16 or bfloat16 (a checkpoint's own
// precision, kept where the build leaves a tensor unquantized: the tied embedding / lm_head of
// GPTQ and AWQ checkpoints, builder/build.py) and float32 activations and sums. Every weight is
// widened to float32 exactly, so the result is the float32 matmul of the same values up to the
// order of the sums; the plain-torch reference is kernels/cpu/half_matmul.py `reference_half_matmul`.
//
// Why a kernel: torch's float32 matmul of one row runs on one thread and reads 4 bytes per weight;
// this reads 2, on every thread (SmolLM2's 49152 x 576 lm_head: ~5.5 ms per token before).
// Torch-free and ISA-neutral apart from the vector helpers below; compiled per ISA by
// kernels_isa.cpp for the torch op (half_matmul.cpp) and by the ARM test harness.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels_api.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace llmc_half {

// Exact widening of one float16 (IEEE binary16) or bfloat16, for the inputs past the last vector.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <bool kBf16>
inline float widen(uint16_t h) {
  return kBf16 ? bf16_to_float(h) : half_to_float(h);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// 8 lanes on every x86 library: the one-row case streams memory, which 16 lanes do not read faster.
using Vec = __m256;
constexpr int64_t kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
template <bool kBf16>
inline Vec vwiden(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kBf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}
inline Vec vfma(Vec a, Vec b, Vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#elif defined(__aarch64__)
using Vec = float32x4_t;
constexpr int64_t kLanes = 4;
inline Vec vzero() { return vdupq_n_f32(0.f); }
inline Vec vload(const float* p) { return vld1q_f32(p); }
template <bool kBf16>
inline Vec vwiden(const uint16_t* p) {
  const uint16x4_t h = vld1_u16(p);
  if constexpr (kBf16) return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
  return vcvt_f32_f16(vreinterpret_f16_u16(h));
}
inline Vec vfma(Vec a, Vec b, Vec acc) { return vfmaq_f32(acc, a, b); }
inline void vstore(float* p, Vec v) { vst1q_f32(p, v); }
inline float vsum(Vec v) { return vaddvq_f32(v); }
#else
#error "no vector helpers of the half matmul for this instruction set"
#endif

// Weight rows per unit of work the caller's threads split (kernels_api.h).
constexpr int64_t kTileRows = kHalfTileRows;
// Rows of x and of the weight one pass computes together, all their sums in registers (every loop
// below has compile-time bounds, so the compiler keeps them there): one row of x against 8 weight
// rows (decode: 8 independent sums hide the FMA latency while the weights stream from memory);
// several rows of x, 2 at a time against 4 weight rows (8 sums; each widened weight vector feeds
// 2 FMAs, and 4 + 2 loads per 8 FMAs keep the FMA units busy on AVX2's 16 registers).
constexpr int kDecodeRows = 8;
constexpr int kBatchRows = 4, kBatchCols = 2;
// The R rows of a pass are R streams 2K bytes apart, which the hardware prefetchers follow
// poorly: prefetching each row 256 bytes ahead read SmolLM2's 49152 x 576 float16 lm_head from
// DRAM at 18-20 GB/s instead of 13-14 (2 threads, a 2-core Xeon whose memory streams at ~23 GB/s;
// 64-192 halves ahead all did about as well, 512 and more less). On AMD the prefetches fill L2, as
// the quantized matmul's (qmatmul_common.h kPrefetchToL2), and run one pass ahead: the R rows of a
// pass lie one after another, so the next pass is the next R * K values, and its first lines too
// are fetched ahead (in-row prefetches leave them to demand misses, a quarter of a 576-wide row).
// On a 2-core Zen 4 EPYC the 49152 x 576 read took a median 3.3-4.0 ms with in-row L1 prefetches,
// 2.6-3.5 ms with in-row L2 ones and 2.06-2.13 ms one pass ahead into L2 (2.5-3.3 in-row in the
// same alternated runs); 16384 x 2048 about alike both ways (docs/BENCHMARKS.md).
constexpr int64_t kPrefetchHalves = 128;
constexpr int64_t kLineHalves = 32;  // 16-bit values per 64-byte cache line

// y[m0 + c, n0 + r] for r < R, c < C.
template <bool kBf16, int R, int C>
inline void block(const Problem& p, int64_t n0, int64_t m0) {
  Vec acc[R][C];
  for (auto& row : acc)
    for (auto& a : row) a = vzero();
  const int64_t body = p.k / kLanes * kLanes;
  const uint16_t* w = p.weight + n0 * p.k;
  const float* x = p.x + m0 * p.k;
  const int64_t ahead = llmc_qmatmul::kPrefetchToL2 ? R * p.k : kPrefetchHalves;  // see kPrefetchHalves
  for (int64_t j = 0; j < body; j += kLanes) {
    if (j % kLineHalves == 0)  // each cache line of every row once, `ahead` values ahead
      for (int r = 0; r < R; ++r) llmc_qmatmul::prefetch_ahead(w + r * p.k + j + ahead);
    Vec xv[C];
    for (int c = 0; c < C; ++c) xv[c] = vload(x + c * p.k + j);
    for (int r = 0; r < R; ++r) {
      const Vec wv = vwiden<kBf16>(w + r * p.k + j);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float total = vsum(acc[r][c]);
      for (int64_t j = body; j < p.k; ++j) total += widen<kBf16>(w[r * p.k + j]) * x[c * p.k + j];
      p.y[(m0 + c) * p.n + n0 + r] = total;
    }
  }
}

// Every row of x against weight rows n0..n0+R-1.
template <bool kBf16, int R>
inline void all_rows(const Problem& p, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kBatchCols <= p.m; m0 += kBatchCols) block<kBf16, R, kBatchCols>(p, n0, m0);
  for (; m0 < p.m; ++m0) block<kBf16, R, 1>(p, n0, m0);
}

template <bool kBf16>
inline void run_tiles_of(const Problem& p, int64_t first, int64_t last) {
  static_assert(kTileRows % kDecodeRows == 0 && kTileRows % kBatchRows == 0, "whole passes per tile");
  for (int64_t t = first; t < last; ++t) {
    const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, p.n - n0);
    if (rows < kTileRows) {  // the last, partial tile: a row at a time
      for (int64_t r = 0; r < rows; ++r) all_rows<kBf16, 1>(p, n0 + r);
    } else if (p.m == 1) {
      for (int64_t r = 0; r < kTileRows; r += kDecodeRows) block<kBf16, kDecodeRows, 1>(p, n0 + r, 0);
    } else {
      for (int64_t r = 0; r < kTileRows; r += kBatchRows) all_rows<kBf16, kBatchRows>(p, n0 + r);
    }
  }
}

// y[:, tiles first..last-1]: the unit the caller's threads split (a tile is kTileRows weight rows).
inline void run_tiles(const Problem& p, int64_t first, int64_t last) {
  p.bf16 ? run_tiles_of<true>(p, first, last) : run_tiles_of<false>(p, first, last);
}

}  // namespace llmc_half
