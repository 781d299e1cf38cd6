// The AVX-512 VNNI inner loop of the quantized matmul: one 512-bit vector holds the 16 rows' int32
// sums, `vpdpbusd` adds 4 u8 x s8 products into each (no saturation, any u up to 255).
#pragma once

#include <immintrin.h>

#include <cstring>

#include "qmatmul_common.h"

namespace llmc_qmatmul {

constexpr int64_t kMaxBatch = 4;  // activation rows sharing one pass over a weight block

template <int kGroup, int kBits, int kBatch>
void block_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
                int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
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
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int m = 0; m < kBatch; ++m) {
          int32_t x0, x1;
          std::memcpy(&x0, xg + m * k + c * 8, 4);
          std::memcpy(&x1, xg + m * k + c * 8 + 4, 4);
          dot[m] = _mm512_dpbusd_epi32(dot[m], lo, _mm512_set1_epi32(x0));
          dot[m] = _mm512_dpbusd_epi32(dot[m], hi, _mm512_set1_epi32(x1));
        }
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

// The q6k form (qmatmul_common.h): per group of 16 inputs, u's low nibbles come from two chunks in
// the bits-4 layout and its top two bits from one 64-byte vector (field t of a byte: inputs 4t + j),
// joined by one `vpternlogd` each; then y += dx * d * sc * (sum(u * xq) - 32 * sum(xq)).
template <int kBatch>
void q6k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  constexpr int kOrAnd = 0xF8;  // vpternlogd's truth table of a | (b & c)
  for (int64_t s = 0; s < groups / kQ6KGroups; ++s) {
    const uint8_t* ws = w + s * kQ6KSuperBytes;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + s * kRows)));
    for (int g = 0; g < kQ6KGroups; ++g) {
      const __m512i v0 = _mm512_loadu_si512(ws + g * 128), v1 = _mm512_loadu_si512(ws + g * 128 + 64);
      prefetch_q6k_group(ws, g);
      const __m512i h = _mm512_loadu_si512(ws + kQ6KLowBytes + g * 64);
      const __m512i u[4] = {
          _mm512_ternarylogic_epi32(_mm512_and_si512(v0, nibble), _mm512_slli_epi16(h, 4), top, kOrAnd),
          _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble), _mm512_slli_epi16(h, 2), top,
                                    kOrAnd),
          _mm512_ternarylogic_epi32(_mm512_and_si512(v1, nibble), h, top, kOrAnd),
          _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble), _mm512_srli_epi16(h, 2), top,
                                    kOrAnd),
      };
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

// The q4k form (qmatmul_common.h): the bits-4 inner loop per group of 32, with the group's scale
// d * sc and offset -dmin * mn made from its bytes for the 16 rows at once.
template <int kBatch>
void q4k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  __m512 acc[kBatch];
  for (int m = 0; m < kBatch; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t s = 0; s < groups / kQ4KGroups; ++s) {
    const uint8_t* ws = w + s * kQ4KSuperBytes;
    const Q4KSuper factors = q4k_super(sc, s);
    for (int g = 0; g < kQ4KGroups; ++g) {
      prefetch_q4k_group(ws, g);
      const int64_t gi = s * kQ4KGroups + g;
      __m512i dot[kBatch];
      for (int m = 0; m < kBatch; ++m) dot[m] = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(ws + g * 256 + c * 64);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int m = 0; m < kBatch; ++m) {
          const int8_t* x = a.q + m * k + gi * kQ4KGroup + c * 8;
          int32_t x0, x1;
          std::memcpy(&x0, x, 4);
          std::memcpy(&x1, x + 4, 4);
          dot[m] = _mm512_dpbusd_epi32(dot[m], lo, _mm512_set1_epi32(x0));
          dot[m] = _mm512_dpbusd_epi32(dot[m], hi, _mm512_set1_epi32(x1));
        }
      }
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

}  // namespace llmc_qmatmul
