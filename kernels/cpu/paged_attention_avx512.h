// The AVX-512 inner loop of the paged decode attention (paged_attention_cpu.cpp): 16 floats per
// vector.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "paged_attention_prefetch.h"

namespace llmc_attention {

constexpr int64_t kLanes = 16;  // floats per 512-bit vector

// exp(x) for x <= 0 (softmax arguments after the max is subtracted): 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, and p a degree-6 polynomial (relative error below 2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.f);  // exp below this underflows float32's normals
  x = _mm512_max_ps(x, lowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for accuracy
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// sum(v[i]) in lane i, for 16 vectors: a transposing tree of 45 shuffles and adds instead of 16
// full horizontal reductions.
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4];
  for (int k = 0; k < 8; ++k) w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                                                   _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
    x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

// One (sequence, KV head): its `kGroup` query heads over `count` cached positions whose rows are
// at `rows` (slot * kv_heads + kv head), keys and values of kVecs vectors each.
template <int kVecs, int kGroup>
void attend(const float* q, const float* keys, const float* values, const int64_t* rows, int64_t count, float scale,
            float* scores, float* out) {
  constexpr int64_t kDim = kVecs * kLanes;
  const __m512 vscale = _mm512_set1_ps(scale);
  prefetch_rows(keys, rows, 0, kKeysAhead, count, kDim);
  for (int64_t c = 0; c < count; c += kLanes) {  // scores, 16 positions at a time
    const int64_t m = std::min<int64_t>(kLanes, count - c);
    prefetch_rows(keys, rows, c + kKeysAhead, c + kKeysAhead + kLanes, count, kDim);
    const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1);
    for (int g = 0; g < kGroup; ++g) {
      __m512 part[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        part[i] = _mm512_setzero_ps();
        if (i < m) {
          const float* key = keys + rows[c + i] * kDim;
          for (int j = 0; j < kVecs; ++j)
            part[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * kDim + j * kLanes), _mm512_loadu_ps(key + j * kLanes), part[i]);
        }
      }
      _mm512_mask_storeu_ps(scores + g * count + c, valid, _mm512_mul_ps(reduce16(part), vscale));
    }
  }
  prefetch_rows(values, rows, 0, kValuesAhead, count, kDim);  // while the softmax runs
  float inv[kGroup];
  for (int g = 0; g < kGroup; ++g) {  // softmax numerators in place, and 1 / their sum
    float* s = scores + g * count;
    __m512 peak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < count; i += kLanes) {
      const __mmask16 valid = static_cast<__mmask16>(count - i >= kLanes ? 0xFFFF : (1u << (count - i)) - 1);
      peak = _mm512_mask_max_ps(peak, valid, peak, _mm512_maskz_loadu_ps(valid, s + i));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += kLanes) {
      const __mmask16 valid = static_cast<__mmask16>(count - i >= kLanes ? 0xFFFF : (1u << (count - i)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + i), top));
      _mm512_mask_storeu_ps(s + i, valid, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, e));
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(total);
  }
  __m512 acc[kGroup][kVecs];
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < count; ++t) {  // weighted sum of the values
    const float* value = values + rows[t] * kDim;
    prefetch_rows(values, rows, t + kValuesAhead, t + kValuesAhead + 1, count, kDim);
    __m512 v[kVecs];
    for (int j = 0; j < kVecs; ++j) v[j] = _mm512_loadu_ps(value + j * kLanes);
    for (int g = 0; g < kGroup; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * count + t]);
      for (int j = 0; j < kVecs; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j)
      _mm512_storeu_ps(out + g * kDim + j * kLanes, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv[g])));
}

}  // namespace llmc_attention
