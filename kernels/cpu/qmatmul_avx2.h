// The AVX2 inner loop of the quantized matmul (also built with AVX-VNNI, where `vpdpbusd` on
// 256-bit registers replaces the two-instruction AVX2 product). Same packed layout as AVX-512: a
// 64-byte chunk holds 16 rows, so each half of it (one 256-bit vector) is 8 rows, and the block
// is computed as two halves of 8 rows, each with one vector of int32 sums per activation row.
//
// Plain AVX2 has no u8 x s8 -> int32 product: `vpmaddubsw` multiplies u8 by s8 and adds pairs
// into int16 *with saturation*, then `vpmaddwd` by ones widens to int32 (as llama.cpp does).
// - 4-bit weights (u <= 15): a pair is at most 2 * 15 * 127 = 3810, so a whole group of 32
//   (8 such pairs per lane) sums to at most 30480 < 32767 in int16: one widening per group.
// - 8-bit weights (u up to 255, q8_0's u = q + 128): 2 * 255 * 127 overflows int16. Exact
//   instead: w = u - 128 (s8), |w| * (x * sign(w)) with `vpsignb` (|w| <= 128 as u8, so a pair
//   is at most 2 * 128 * 127 = 32512), then sum(u * x) = sum(w * x) + 128 * sum(x).
#pragma once

#include <immintrin.h>

#include <cstring>

#include "qmatmul_common.h"

namespace llmc_qmatmul {

// Activation rows sharing one pass over a weight block. Measured on 1536x576 q4_1/q8_0, one
// thread (docs/BENCHMARKS.md): plain AVX2 spends 4 instructions per 64 products of 4-bit weights
// beside the nibble unpacking, which 8 rows share (12% faster at 16 rows than 4, though 16
// accumulators then spill); with AVX-VNNI the product is one instruction and 4 rows, which keep
// their accumulators in registers, are 5-15% faster than 8.
#ifdef __AVXVNNI__
constexpr int64_t kMaxBatch = 4;
#else
constexpr int64_t kMaxBatch = 8;
#endif
constexpr int64_t kHalfRows = 8;  // output rows per 256-bit vector of int32 sums
constexpr float kUnsignedOffset = 128.f;  // 8-bit: u = w + 128

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// Half of one 64-byte chunk v of the bits-4 layout (8 rows x 8 inputs, low nibbles inputs 0-3,
// high 4-7) times the 8 inputs at x of kBatch rows (row stride k), added into their sums: int32
// with AVX-VNNI, int16 pairs with plain AVX2, widened once per group (bound in the header comment).
template <int kBatch>
[[gnu::always_inline]] inline void bits4_chunk(__m256i v, const int8_t* x, int64_t k, __m256i (&dot)[kBatch]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, nibble);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  for (int m = 0; m < kBatch; ++m) {
    const __m256i x0 = broadcast4(x + m * k), x1 = broadcast4(x + m * k + 4);
#ifdef __AVXVNNI__
    dot[m] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(dot[m], lo, x0), hi, x1);
#else
    dot[m] = _mm256_add_epi16(dot[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)));
#endif
  }
}

template <int kGroup, int kBits, int kBatch>
void half_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
               int64_t ldy, int half) {
  __m256 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm256_setzero_ps();
  constexpr int64_t kGroupBytes = kRows * kGroup * kBits / 8;
  constexpr int kChunks = kGroupBytes / 64;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dot[kBatch];
    for (int m = 0; m < kBatch; ++m) dot[m] = _mm256_setzero_si256();
    const uint8_t* wg = w + g * kGroupBytes + half * 32;
    const int8_t* xg = a.q + g * kGroup;
    for (int c = 0; c < kChunks; ++c) {
      prefetch_line(wg + c * 64);  // (the second half finds most of these lines cached already)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 64));
      if constexpr (kBits == 4) {
        bits4_chunk<kBatch>(v, xg + c * 8, k, dot);
      } else {
#ifdef __AVXVNNI__
        for (int m = 0; m < kBatch; ++m) dot[m] = _mm256_dpbusd_avx_epi32(dot[m], v, broadcast4(xg + m * k + c * 4));
#else
        const __m256i ws = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));  // u - 128
        const __m256i magnitude = _mm256_sign_epi8(ws, ws);  // |u - 128| <= 128, read as u8
        for (int m = 0; m < kBatch; ++m) {
          const __m256i xs = _mm256_sign_epi8(broadcast4(xg + m * k + c * 4), ws);
          dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xs), _mm256_set1_epi16(1)));
        }
#endif
      }
    }
    const Half16* sg = sc + g * 2 * kRows + half * kHalfRows;
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg)));
    const __m256 offset = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + kRows)));
    for (int m = 0; m < kBatch; ++m) {
      const int64_t i = m * groups + g;
      const __m256 sum = _mm256_set1_ps(a.sum[i]);
      __m256 d;
#ifdef __AVXVNNI__
      d = _mm256_cvtepi32_ps(dot[m]);
#else
      if constexpr (kBits == 4) {
        d = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[m], _mm256_set1_epi16(1)));
      } else {
        d = _mm256_fmadd_ps(_mm256_set1_ps(kUnsignedOffset), sum, _mm256_cvtepi32_ps(dot[m]));  // exact: < 2^24
      }
#endif
      const __m256 t = _mm256_fmadd_ps(scale, d, _mm256_mul_ps(offset, sum));
      acc[m] = _mm256_fmadd_ps(t, _mm256_set1_ps(a.scale[i]), acc[m]);
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm256_storeu_ps(y + m * ldy + half * kHalfRows, acc[m]);
}

// The q6k form's values u (0..63) of group g for 8 rows (ws at the super-block plus the half's 32
// bytes): u[t] holds inputs 4t..4t+3 of the group (qmatmul_common.h).
[[gnu::always_inline]] inline void q6k_group_values(const uint8_t* ws, int g, __m256i (&u)[4]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + g * 128));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + g * 128 + 64));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + kQ6KLowBytes + g * 64));
  u[0] = _mm256_or_si256(_mm256_and_si256(v0, nibble), _mm256_and_si256(_mm256_slli_epi16(h, 4), top));
  u[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 4), nibble), _mm256_and_si256(_mm256_slli_epi16(h, 2), top));
  u[2] = _mm256_or_si256(_mm256_and_si256(v1, nibble), _mm256_and_si256(h, top));
  u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(h, 2), top));
}

// The q6k form (qmatmul_common.h), 8 rows per half as above. Plain AVX2: a `vpmaddubsw` pair is at
// most 2 * 63 * 127 = 16002, so two pairs add in int16 and each such sum is widened (4 would not fit).
template <int kBatch>
void q6k_half_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
                   int64_t ldy, int half) {
  __m256 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t s = 0; s < groups / kQ6KGroups; ++s) {
    const uint8_t* ws = w + s * kQ6KSuperBytes + half * 32;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + s * kRows + half * kHalfRows)));
    for (int g = 0; g < kQ6KGroups; ++g) {
      prefetch_q6k_group(ws - half * 32, g);
      __m256i u[4];
      q6k_group_values(ws, g, u);
      const auto* sub = reinterpret_cast<const __m128i*>(ws - half * 32 + kQ6KLowBytes + kQ6KHighBytes + g * kRows +
                                                         half * kHalfRows);
      const __m256 scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(sub))));
      const int64_t gi = s * kQ6KGroups + g;
      for (int m = 0; m < kBatch; ++m) {
        const int8_t* x = a.q + m * k + gi * kQ6KGroup;
#ifdef __AVXVNNI__
        __m256i dot = _mm256_setzero_si256();
        for (int t = 0; t < 4; ++t) dot = _mm256_dpbusd_avx_epi32(dot, u[t], broadcast4(x + 4 * t));
#else
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(u[0], broadcast4(x)), _mm256_maddubs_epi16(u[1], broadcast4(x + 4)));
        const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(u[2], broadcast4(x + 8)), _mm256_maddubs_epi16(u[3], broadcast4(x + 12)));
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones));
#endif
        const int64_t i = m * groups + gi;
        const __m256 centred = _mm256_sub_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(kQ6KBias * a.sum[i]));  // exact
        acc[m] = _mm256_fmadd_ps(centred, _mm256_mul_ps(scale, _mm256_set1_ps(a.scale[i])), acc[m]);
      }
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm256_storeu_ps(y + m * ldy + half * kHalfRows, acc[m]);
}

template <int kBatch>
void q6k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  q6k_half_rows<kBatch>(w, sc, a, groups, k, y, ldy, 0);
  q6k_half_rows<kBatch>(w, sc, a, groups, k, y, ldy, 1);
}

// The sums of the q4k form's group g of super-block `ws` (the bits-4 layout; ws already at the
// half's 32 bytes of each chunk) by the activations x (this group's 32 inputs of kBatch rows, row
// stride k), for 8 rows: int32 with AVX-VNNI, int16 pairs with plain AVX2 (bound above: u <= 15).
template <int kBatch>
[[gnu::always_inline]] inline void q4k_group_dots(const uint8_t* ws, int g, const int8_t* x, int64_t k,
                                                  __m256i (&dot)[kBatch]) {
  for (int m = 0; m < kBatch; ++m) dot[m] = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c)
    bits4_chunk<kBatch>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + g * 256 + c * 64)), x + c * 8, k, dot);
}

// The q4k form (qmatmul_common.h), 8 rows per half: the bits-4 inner loop per group of 32 (its int16
// bound above holds: u <= 15), with the scale d * sc and offset -dmin * mn made from its bytes.
template <int kBatch>
void q4k_half_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
                   int64_t ldy, int half) {
  __m256 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t s = 0; s < groups / kQ4KGroups; ++s) {
    const uint8_t* ws = w + s * kQ4KSuperBytes;
    const Half16* dd = sc + s * 2 * kRows + half * kHalfRows;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dd)));
    const __m256 neg_dmin =
        _mm256_sub_ps(_mm256_setzero_ps(), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dd + kRows))));
    for (int g = 0; g < kQ4KGroups; ++g) {
      prefetch_q4k_group(ws, g);
      const int64_t gi = s * kQ4KGroups + g;
      __m256i dot[kBatch];
      q4k_group_dots<kBatch>(ws + half * 32, g, a.q + gi * kQ4KGroup, k, dot);
      const uint8_t* bytes = ws + kQ4KValueBytes + g * kRows + half * kHalfRows;
      const __m256 scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)))));
      const __m256 offset = _mm256_mul_ps(
          neg_dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + kQ4KGroups * kRows)))));
      for (int m = 0; m < kBatch; ++m) {
        const int64_t i = m * groups + gi;
#ifdef __AVXVNNI__
        const __m256 dm = _mm256_cvtepi32_ps(dot[m]);
#else
        const __m256 dm = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[m], _mm256_set1_epi16(1)));
#endif
        const __m256 t = _mm256_fmadd_ps(scale, dm, _mm256_mul_ps(offset, _mm256_set1_ps(a.sum[i])));
        acc[m] = _mm256_fmadd_ps(t, _mm256_set1_ps(a.scale[i]), acc[m]);
      }
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm256_storeu_ps(y + m * ldy + half * kHalfRows, acc[m]);
}

template <int kBatch>
void q4k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  q4k_half_rows<kBatch>(w, sc, a, groups, k, y, ldy, 0);
  q4k_half_rows<kBatch>(w, sc, a, groups, k, y, ldy, 1);
}

// The K-quant forms over activations quantized per super-block (qmatmul_common.h
// SuperActivations; used where superblock_activations() in qmatmul_driver.h), 8 rows per half as
// above. Plain AVX2 folds a sub-block's integer scale into the `vpmaddwd` that widens the int16
// sums (its operand the scale twice per row instead of ones), so a super-block's groups add up in
// int32; the offsets' part comes from the activations' group sums, `vpmaddwd` on pairs of groups.
// Per super-block and row two converts and two FMAs remain of the float epilogue the per-group
// loops pay per group. Every int32 sum fits (bounds in qmatmul_avx512.h; the int16 ones are those
// of the per-group loops above). Not in the AVX-VNNI build: no CPU at hand runs it, so its loops
// stay the per-group ones above.
#ifndef __AVXVNNI__
#define LLMC_QMATMUL_SUPER 1

// Rows sharing a pass: 4 keeps each row's float and int32 accumulators and its products in
// registers; at 8 they spill.
constexpr int64_t kSuperBatch = 4;

// 8 rows' sub-block factors of groups 2j and 2j + 1 as int16 pairs per int32 lane (the `vpmaddwd`
// operand): bytes unsigned (q4k's mins) or signed (q6k's scales).
template <bool kSigned>
[[gnu::always_inline]] inline __m256i factor_pairs8(const uint8_t* first, const uint8_t* second) {
  const __m128i pairs = _mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(first)),
                                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(second)));
  return kSigned ? _mm256_cvtepi8_epi16(pairs) : _mm256_cvtepu8_epi16(pairs);
}

// The activations' sums of groups 2j and 2j + 1 of a row, as one int16 pair broadcast.
[[gnu::always_inline]] inline __m256i sum_pair8(const int16_t* sums) {
  int32_t pair;
  std::memcpy(&pair, sums, 4);
  return _mm256_set1_epi32(pair);
}

// 8 rows' factor of one group, each twice (a row's two int16 lanes of `vpmaddubsw` sums):
// unsigned for q4k's scales, signed for q6k's.
template <bool kSigned>
[[gnu::always_inline]] inline __m256i factor_twice(const uint8_t* bytes) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i twice = _mm_unpacklo_epi8(b, b);
  return kSigned ? _mm256_cvtepi8_epi16(twice) : _mm256_cvtepu8_epi16(twice);
}

template <int kBatch>
void q4k_super_half(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k, float* y,
                    int64_t ldy, int half) {
  __m256 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t groups = supers * kQ4KGroups;
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* ws = w + s * kQ4KSuperBytes;
    const Half16* dd = sc + s * 2 * kRows + half * kHalfRows;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dd)));
    const __m256 neg_dmin =
        _mm256_sub_ps(_mm256_setzero_ps(), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dd + kRows))));
    // the offsets' part first, so that its sums need no registers during the groups
    const uint8_t* mn = ws + kQ4KValueBytes + kQ4KGroups * kRows + half * kHalfRows;
    for (int m = 0; m < kBatch; ++m) {
      __m256i mins = _mm256_setzero_si256();
      for (int j = 0; j < kQ4KGroups / 2; ++j)
        mins = _mm256_add_epi32(mins, _mm256_madd_epi16(factor_pairs8<false>(mn + 2 * j * kRows, mn + (2 * j + 1) * kRows),
                                                        sum_pair8(a.sums + m * groups + s * kQ4KGroups + 2 * j)));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_mul_ps(neg_dmin, _mm256_set1_ps(a.scale[m * supers + s])),
                               acc[m]);
    }
    __m256i scaled[kBatch];
    for (int m = 0; m < kBatch; ++m) scaled[m] = _mm256_setzero_si256();
    for (int g = 0; g < kQ4KGroups; ++g) {
      prefetch_q4k_group(ws, g);
      const int64_t gi = s * kQ4KGroups + g;
      __m256i dot[kBatch];
      q4k_group_dots<kBatch>(ws + half * 32, g, a.q + gi * kQ4KGroup, k, dot);
      const __m256i factor = factor_twice<false>(ws + kQ4KValueBytes + g * kRows + half * kHalfRows);
      for (int m = 0; m < kBatch; ++m) scaled[m] = _mm256_add_epi32(scaled[m], _mm256_madd_epi16(dot[m], factor));
    }
    for (int m = 0; m < kBatch; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled[m]), _mm256_mul_ps(d, _mm256_set1_ps(a.scale[m * supers + s])),
                               acc[m]);
  }
  for (int m = 0; m < kBatch; ++m) _mm256_storeu_ps(y + m * ldy + half * kHalfRows, acc[m]);
}

template <int kBatch>
void q4k_super_rows(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k, float* y,
                    int64_t ldy) {
  q4k_super_half<kBatch>(w, sc, a, supers, k, y, ldy, 0);
  q4k_super_half<kBatch>(w, sc, a, supers, k, y, ldy, 1);
}

template <int kBatch>
void q6k_super_half(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k, float* y,
                    int64_t ldy, int half) {
  __m256 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t groups = supers * kQ6KGroups;
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* ws = w + s * kQ6KSuperBytes + half * 32;
    const uint8_t* subs = w + s * kQ6KSuperBytes + kQ6KLowBytes + kQ6KHighBytes + half * kHalfRows;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + s * kRows + half * kHalfRows)));
    // the bias's part first (-32 * sum_g sc_g * xsum_g), so that its sums need no registers during the groups
    __m256i scaled[kBatch];
    for (int m = 0; m < kBatch; ++m) {
      __m256i bias = _mm256_setzero_si256();
      for (int j = 0; j < kQ6KGroups / 2; ++j)
        bias = _mm256_add_epi32(bias, _mm256_madd_epi16(factor_pairs8<true>(subs + 2 * j * kRows, subs + (2 * j + 1) * kRows),
                                                        sum_pair8(a.sums + m * groups + s * kQ6KGroups + 2 * j)));
      scaled[m] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(bias, 5));  // 32 = kQ6KBias
    }
    for (int g = 0; g < kQ6KGroups; ++g) {
      prefetch_q6k_group(ws - half * 32, g);
      __m256i u[4];
      q6k_group_values(ws, g, u);
      const __m256i factor = factor_twice<true>(subs + g * kRows);
      const int64_t gi = s * kQ6KGroups + g;
      for (int m = 0; m < kBatch; ++m) {
        const int8_t* x = a.q + m * k + gi * kQ6KGroup;
        const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(u[0], broadcast4(x)), _mm256_maddubs_epi16(u[1], broadcast4(x + 4)));
        const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(u[2], broadcast4(x + 8)), _mm256_maddubs_epi16(u[3], broadcast4(x + 12)));
        scaled[m] = _mm256_add_epi32(scaled[m], _mm256_add_epi32(_mm256_madd_epi16(p01, factor), _mm256_madd_epi16(p23, factor)));
      }
    }
    for (int m = 0; m < kBatch; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled[m]), _mm256_mul_ps(d, _mm256_set1_ps(a.scale[m * supers + s])),
                               acc[m]);
  }
  for (int m = 0; m < kBatch; ++m) _mm256_storeu_ps(y + m * ldy + half * kHalfRows, acc[m]);
}

template <int kBatch>
void q6k_super_rows(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k, float* y,
                    int64_t ldy) {
  q6k_super_half<kBatch>(w, sc, a, supers, k, y, ldy, 0);
  q6k_super_half<kBatch>(w, sc, a, supers, k, y, ldy, 1);
}
#endif  // __AVXVNNI__

template <int kGroup, int kBits, int kBatch>
void block_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
                int64_t ldy) {
  half_rows<kGroup, kBits, kBatch>(w, sc, a, groups, k, y, ldy, 0);
  half_rows<kGroup, kBits, kBatch>(w, sc, a, groups, k, y, ldy, 1);
}

}  // namespace llmc_qmatmul
