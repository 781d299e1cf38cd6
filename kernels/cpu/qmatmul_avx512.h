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

}  // namespace llmc_qmatmul
