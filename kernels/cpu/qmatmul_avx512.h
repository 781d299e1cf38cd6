// The AVX-512 VNNI inner loop of the quantized matmul: one 512-bit vector holds the 16 rows' int32
// sums, `vpdpbusd` adds 4 u8 x s8 products into each (no saturation, any u up to 255).
#pragma once

#include <immintrin.h>

#include <cstring>

#include "qmatmul_common.h"

namespace llmc_qmatmul {

constexpr int64_t kMaxBatch = 4;  // activation rows sharing one pass over a weight block

// One 64-byte chunk v of the bits-4 layout (16 rows x 8 inputs, low nibbles inputs 0-3, high 4-7)
// times the 8 inputs at x of kBatch rows (row stride k), added into their int32 sums.
template <int kBatch>
[[gnu::always_inline]] inline void bits4_chunk(__m512i v, const int8_t* x, int64_t k, __m512i (&dot)[kBatch]) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(v, nibble);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  for (int m = 0; m < kBatch; ++m) {
    int32_t x0, x1;
    std::memcpy(&x0, x + m * k, 4);
    std::memcpy(&x1, x + m * k + 4, 4);
    dot[m] = _mm512_dpbusd_epi32(dot[m], lo, _mm512_set1_epi32(x0));
    dot[m] = _mm512_dpbusd_epi32(dot[m], hi, _mm512_set1_epi32(x1));
  }
}

template <int kGroup, int kBits, int kBatch>
void block_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
                int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  constexpr int64_t kGroupBytes = kRows * kGroup * kBits / 8;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[kBatch];
    for (int m = 0; m < kBatch; ++m) dot[m] = _mm512_setzero_si512();
    const uint8_t* wg = w + g * kGroupBytes;
    const int8_t* xg = a.q + g * kGroup;
    for (int c = 0; c < kGroupBytes / 64; ++c) {
      prefetch_line(wg + c * 64);
      const __m512i v = _mm512_loadu_si512(wg + c * 64);
      if constexpr (kBits == 4) {
        bits4_chunk<kBatch>(v, xg + c * 8, k, dot);
      } else {
        for (int m = 0; m < kBatch; ++m) {
          int32_t x0;
          std::memcpy(&x0, xg + m * k + c * 4, 4);
          dot[m] = _mm512_dpbusd_epi32(dot[m], v, _mm512_set1_epi32(x0));
        }
      }
    }
    const auto* s16 = reinterpret_cast<const __m256i*>(sc + g * 2 * kRows);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(s16));
    const __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256(s16 + 1));
    for (int m = 0; m < kBatch; ++m) {
      const int64_t i = m * groups + g;
      const __m512 t = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot[m]), _mm512_mul_ps(offset, _mm512_set1_ps(a.sum[i])));
      acc[m] = _mm512_fmadd_ps(t, _mm512_set1_ps(a.scale[i]), acc[m]);
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// The q6k form's values u (0..63) of super-block `ws`'s group g (qmatmul_common.h): u[t] holds, for
// the 16 rows, inputs 4t..4t+3 of the group; the group's lines kPrefetchBytes ahead are prefetched.
[[gnu::always_inline]] inline void q6k_group_values(const uint8_t* ws, int g, __m512i (&u)[4]) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  constexpr int kOrAnd = 0xF8;  // vpternlogd's truth table of a | (b & c)
  const __m512i v0 = _mm512_loadu_si512(ws + g * 128), v1 = _mm512_loadu_si512(ws + g * 128 + 64);
  prefetch_q6k_group(ws, g);
  const __m512i h = _mm512_loadu_si512(ws + kQ6KLowBytes + g * 64);
  u[0] = _mm512_ternarylogic_epi32(_mm512_and_si512(v0, nibble), _mm512_slli_epi16(h, 4), top, kOrAnd);
  u[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble), _mm512_slli_epi16(h, 2), top,
                                   kOrAnd);
  u[2] = _mm512_ternarylogic_epi32(_mm512_and_si512(v1, nibble), h, top, kOrAnd);
  u[3] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble), _mm512_srli_epi16(h, 2), top,
                                   kOrAnd);
}

// The q6k form (qmatmul_common.h): per group of 16 inputs, u's low nibbles come from two chunks in
// the bits-4 layout and its top two bits from one 64-byte vector (field t of a byte: inputs 4t + j),
// joined by one `vpternlogd` each; then y += dx * d * sc * (sum(u * xq) - 32 * sum(xq)).
template <int kBatch>
void q6k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t s = 0; s < groups / kQ6KGroups; ++s) {
    const uint8_t* ws = w + s * kQ6KSuperBytes;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + s * kRows)));
    for (int g = 0; g < kQ6KGroups; ++g) {
      __m512i u[4];
      q6k_group_values(ws, g, u);
      const auto* sub = reinterpret_cast<const __m128i*>(ws + kQ6KLowBytes + kQ6KHighBytes + g * kRows);
      const __m512 scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sub))));
      const int64_t gi = s * kQ6KGroups + g;
      for (int m = 0; m < kBatch; ++m) {
        const int8_t* x = a.q + m * k + gi * kQ6KGroup;
        __m512i dot = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t) {
          int32_t xt;
          std::memcpy(&xt, x + 4 * t, 4);
          dot = _mm512_dpbusd_epi32(dot, u[t], _mm512_set1_epi32(xt));
        }
        const int64_t i = m * groups + gi;
        const __m512 centred = _mm512_sub_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(kQ6KBias * a.sum[i]));  // exact
        acc[m] = _mm512_fmadd_ps(centred, _mm512_mul_ps(scale, _mm512_set1_ps(a.scale[i])), acc[m]);
      }
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// The q4k form's factors (qmatmul_common.h): a super-block's d and -dmin for the 16 rows, and from
// them a group's scale d * sc and offset -dmin * mn, made from its bytes. Shared with the AMX
// paths (qmatmul_amx.h), whose outputs must equal these loops' bit for bit.
struct Q4KSuper {
  __m512 d, neg_dmin;
};

inline Q4KSuper q4k_super(const Half16* sc, int64_t s) {
  const auto* dd = reinterpret_cast<const __m256i*>(sc + s * 2 * kRows);
  return {_mm512_cvtph_ps(_mm256_loadu_si256(dd)),
          _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtph_ps(_mm256_loadu_si256(dd + 1)))};
}

inline void q4k_group_factors(const uint8_t* super, int g, const Q4KSuper& f, __m512& scale, __m512& offset) {
  const auto* bytes = reinterpret_cast<const __m128i*>(super + kQ4KValueBytes + g * kRows);
  scale = _mm512_mul_ps(f.d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes))));
  offset = _mm512_mul_ps(f.neg_dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes + kQ4KGroups))));
}

// The int32 sums of the q4k form's group g of super-block `ws` (the bits-4 layout) by the activations
// x (this group's 32 inputs of kBatch rows, row stride k), for the 16 rows.
template <int kBatch>
[[gnu::always_inline]] inline void q4k_group_dots(const uint8_t* ws, int g, const int8_t* x, int64_t k,
                                                  __m512i (&dot)[kBatch]) {
  for (int m = 0; m < kBatch; ++m) dot[m] = _mm512_setzero_si512();
  for (int c = 0; c < 4; ++c) bits4_chunk<kBatch>(_mm512_loadu_si512(ws + g * 256 + c * 64), x + c * 8, k, dot);
}

// The q4k form (qmatmul_common.h): the bits-4 inner loop per group of 32, with the group's scale
// d * sc and offset -dmin * mn made from its bytes for the 16 rows at once.
template <int kBatch>
void q4k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t s = 0; s < groups / kQ4KGroups; ++s) {
    const uint8_t* ws = w + s * kQ4KSuperBytes;
    const Q4KSuper factors = q4k_super(sc, s);
    for (int g = 0; g < kQ4KGroups; ++g) {
      prefetch_q4k_group(ws, g);
      const int64_t gi = s * kQ4KGroups + g;
      __m512i dot[kBatch];
      q4k_group_dots<kBatch>(ws, g, a.q + gi * kQ4KGroup, k, dot);
      __m512 scale, offset;
      q4k_group_factors(ws, g, factors, scale, offset);
      for (int m = 0; m < kBatch; ++m) {
        const int64_t i = m * groups + gi;
        const __m512 t = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot[m]), _mm512_mul_ps(offset, _mm512_set1_ps(a.sum[i])));
        acc[m] = _mm512_fmadd_ps(t, _mm512_set1_ps(a.scale[i]), acc[m]);
      }
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// The K-quant forms over activations quantized per super-block (qmatmul_common.h
// SuperActivations; used where superblock_activations() in qmatmul_driver.h). A sub-block's
// integer scale multiplies its int32 sums (`vpmulld`), so a super-block's 8 or 16 groups add up in
// integers, and the offsets' part comes from the activations' group sums by `vpdpwssd` on pairs of
// groups: per super-block and row, two converts and two FMAs remain of the float epilogue the
// per-group loops above pay per group. All integer sums fit int32 (q4k: 8 * 63 * 32 * 15 * 127;
// q6k: 16 * 128 * 16 * 63 * 127), each within 2^31 / 8.
#define LLMC_QMATMUL_SUPER 1

// Rows sharing a pass: 8, each row's int32 products and float sums in registers (the offsets' part
// is done before the groups); 4 rows were 4-9 % slower on 3B-sized q4k and q6k weights at 16 and
// 256 rows (a 2-core EPYC, docs/BENCHMARKS.md).
constexpr int64_t kSuperBatch = 8;

// Sub-block factors of groups 2j and 2j + 1 for the 16 rows, as int16 pairs per int32 lane (the
// `vpdpwssd` operand): bytes unsigned (q4k's mins) or signed (q6k's scales).
template <bool kSigned>
[[gnu::always_inline]] inline __m512i factor_pairs(const uint8_t* first, const uint8_t* second) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(first));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(second));
  const __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
  return kSigned ? _mm512_cvtepi8_epi16(pairs) : _mm512_cvtepu8_epi16(pairs);
}

// The activations' sums of groups 2j and 2j + 1 of row m, as one int16 pair broadcast.
[[gnu::always_inline]] inline __m512i sum_pair(const int16_t* sums) {
  int32_t pair;
  std::memcpy(&pair, sums, 4);
  return _mm512_set1_epi32(pair);
}

// The q4k form: y += dx * (d * sum_g sc_g * dot_g - dmin * sum_g mn_g * xsum_g) per super-block.
template <int kBatch>
void q4k_super_rows(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k, float* y,
                    int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t groups = supers * kQ4KGroups;
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* ws = w + s * kQ4KSuperBytes;
    const Q4KSuper f = q4k_super(sc, s);
    // The offsets' part first, so that its sums need no registers during the groups: kept in L1
    // and added after the groups' part, the order of the float sums the first version of this
    // loop had (adding it first changed last bits, enough to flip SmolLM2's greedy near-ties
    // against llama.cpp's, tests/builder/test_quantize.py).
    const uint8_t* mn = ws + kQ4KValueBytes + kQ4KGroups * kRows;
    alignas(64) int32_t mins[kBatch][kRows];
    for (int m = 0; m < kBatch; ++m) {
      __m512i sum = _mm512_setzero_si512();
      for (int j = 0; j < kQ4KGroups / 2; ++j)
        sum = _mm512_dpwssd_epi32(sum, factor_pairs<false>(mn + 2 * j * kRows, mn + (2 * j + 1) * kRows),
                                  sum_pair(a.sums + m * groups + s * kQ4KGroups + 2 * j));
      _mm512_store_si512(mins[m], sum);
    }
    __m512i scaled[kBatch];
    for (int m = 0; m < kBatch; ++m) scaled[m] = _mm512_setzero_si512();
    for (int g = 0; g < kQ4KGroups; ++g) {
      prefetch_q4k_group(ws, g);
      const int64_t gi = s * kQ4KGroups + g;
      __m512i dot[kBatch];
      q4k_group_dots<kBatch>(ws, g, a.q + gi * kQ4KGroup, k, dot);
      const __m512i scg =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + kQ4KValueBytes + g * kRows)));
      for (int m = 0; m < kBatch; ++m) scaled[m] = _mm512_add_epi32(scaled[m], _mm512_mullo_epi32(scg, dot[m]));
    }
    for (int m = 0; m < kBatch; ++m) {
      const __m512 dx = _mm512_set1_ps(a.scale[m * supers + s]);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled[m]), _mm512_mul_ps(f.d, dx), acc[m]);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(mins[m])), _mm512_mul_ps(f.neg_dmin, dx), acc[m]);
    }
  }
  for (int m = 0; m < kBatch; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// The q6k form: y += dx * d * (sum_g sc_g * dot_g - 32 * sum_g sc_g * xsum_g) per super-block.
template <int kBatch>
void q6k_super_rows(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k, float* y,
                    int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t groups = supers * kQ6KGroups;
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* ws = w + s * kQ6KSuperBytes;
    const uint8_t* subs = ws + kQ6KLowBytes + kQ6KHighBytes;
    // the bias's part first (-32 * sum_g sc_g * xsum_g), so that its sums need no registers during the groups
    __m512i scaled[kBatch];
    for (int m = 0; m < kBatch; ++m) {
      __m512i bias = _mm512_setzero_si512();
      for (int j = 0; j < kQ6KGroups / 2; ++j)
        bias = _mm512_dpwssd_epi32(bias, factor_pairs<true>(subs + 2 * j * kRows, subs + (2 * j + 1) * kRows),
                                   sum_pair(a.sums + m * groups + s * kQ6KGroups + 2 * j));
      scaled[m] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(bias, 5));  // 32 = kQ6KBias
    }
    for (int g = 0; g < kQ6KGroups; ++g) {
      __m512i u[4];
      q6k_group_values(ws, g, u);
      const __m512i scg = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(subs + g * kRows)));
      const int64_t gi = s * kQ6KGroups + g;
      for (int m = 0; m < kBatch; ++m) {
        const int8_t* x = a.q + m * k + gi * kQ6KGroup;
        __m512i dot = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t) {
          int32_t xt;
          std::memcpy(&xt, x + 4 * t, 4);
          dot = _mm512_dpbusd_epi32(dot, u[t], _mm512_set1_epi32(xt));
        }
        scaled[m] = _mm512_add_epi32(scaled[m], _mm512_mullo_epi32(scg, dot));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + s * kRows)));
    for (int m = 0; m < kBatch; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled[m]), _mm512_mul_ps(d, _mm512_set1_ps(a.scale[m * supers + s])),
                               acc[m]);
  }
  for (int m = 0; m < kBatch; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

}  // namespace llmc_qmatmul
