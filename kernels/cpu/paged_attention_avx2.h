// The AVX2 inner loop of the paged decode attention (paged_attention_cpu.cpp): 8 floats per
// vector, the same computation as the AVX-512 one (paged_attention_avx512.h) in the same order
// per position. AVX2 has no masked loads of floats by lane count nor `vscalefps`, so partial
// vectors go through a small buffer and 2^n is built in the exponent bits.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "paged_attention_prefetch.h"

namespace llmc_attention {

constexpr int64_t kLanes = 8;  // floats per 256-bit vector

// exp(x) for x <= 0 (softmax arguments after the max is subtracted): 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, and p a degree-6 polynomial (relative error below 2e-7).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.f);  // exp below this underflows float32's normals
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for accuracy
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // 2^n for n in -126..0: the biased exponent n + 127 shifted into place
  constexpr int kBias = 127, kMantissaBits = 23;
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(kBias)), kMantissaBits);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// sum(v[i]) in lane i, for 8 vectors: a transposing tree of shuffles and adds.
inline __m256 reduce8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // [0123 of low halves | high halves]
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// The first `m` lanes of s (m <= kLanes), the others `fill`.
inline __m256 load_partial(const float* s, int64_t m, float fill) {
  if (m == kLanes) return _mm256_loadu_ps(s);
  alignas(32) float buffer[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buffer[i] = i < m ? s[i] : fill;
  return _mm256_load_ps(buffer);
}

inline void store_partial(float* s, int64_t m, __m256 v) {
  if (m == kLanes) return _mm256_storeu_ps(s, v);
  alignas(32) float buffer[kLanes];
  _mm256_store_ps(buffer, v);
  std::copy(buffer, buffer + m, s);
}

inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float reduce_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// One (sequence, KV head): its `kGroup` query heads over `count` cached positions whose rows are
// at `rows` (slot * kv_heads + kv head), keys and values of kVecs vectors each.
template <int kVecs, int kGroup>
void attend(const float* q, const float* keys, const float* values, const int64_t* rows, int64_t count, float scale,
            float* scores, float* out) {
  constexpr int64_t kDim = kVecs * kLanes;
  const __m256 vscale = _mm256_set1_ps(scale);
  const float lowest = -std::numeric_limits<float>::infinity();
  prefetch_rows(keys, rows, 0, kKeysAhead, count, kDim);
  for (int64_t c = 0; c < count; c += kLanes) {  // scores, 8 positions at a time
    const int64_t m = std::min<int64_t>(kLanes, count - c);
    prefetch_rows(keys, rows, c + kKeysAhead, c + kKeysAhead + kLanes, count, kDim);
    for (int g = 0; g < kGroup; ++g) {
      __m256 part[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        part[i] = _mm256_setzero_ps();
        if (i < m) {
          const float* key = keys + rows[c + i] * kDim;
          for (int j = 0; j < kVecs; ++j)
            part[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * kDim + j * kLanes), _mm256_loadu_ps(key + j * kLanes), part[i]);
        }
      }
      store_partial(scores + g * count + c, m, _mm256_mul_ps(reduce8(part), vscale));
    }
  }
  prefetch_rows(values, rows, 0, kValuesAhead, count, kDim);  // while the softmax runs
  float inv[kGroup];
  for (int g = 0; g < kGroup; ++g) {  // softmax numerators in place, and 1 / their sum
    float* s = scores + g * count;
    __m256 peak = _mm256_set1_ps(lowest);
    for (int64_t i = 0; i < count; i += kLanes)
      peak = _mm256_max_ps(peak, load_partial(s + i, std::min<int64_t>(kLanes, count - i), lowest));
    const __m256 top = _mm256_set1_ps(reduce_max(peak));
    __m256 total = _mm256_setzero_ps();
    for (int64_t i = 0; i < count; i += kLanes) {
      const int64_t m = std::min<int64_t>(kLanes, count - i);
      // lanes past the end hold -inf: exp gives 0 there (the clamp at -87 gives ~1e-38, so mask)
      __m256 e = exp_nonpositive(_mm256_sub_ps(load_partial(s + i, m, lowest), top));
      if (m < kLanes) e = load_partial(reinterpret_cast<float*>(&e), m, 0.f);
      store_partial(s + i, m, e);
      total = _mm256_add_ps(total, e);
    }
    inv[g] = 1.f / reduce_add(total);
  }
  __m256 acc[kGroup][kVecs];
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < count; ++t) {  // weighted sum of the values
    const float* value = values + rows[t] * kDim;
    prefetch_rows(values, rows, t + kValuesAhead, t + kValuesAhead + 1, count, kDim);
    __m256 v[kVecs];
    for (int j = 0; j < kVecs; ++j) v[j] = _mm256_loadu_ps(value + j * kLanes);
    for (int g = 0; g < kGroup; ++g) {
      const __m256 p = _mm256_set1_ps(scores[g * count + t]);
      for (int j = 0; j < kVecs; ++j) acc[g][j] = _mm256_fmadd_ps(p, v[j], acc[g][j]);
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j)
      _mm256_storeu_ps(out + g * kDim + j * kLanes, _mm256_mul_ps(acc[g][j], _mm256_set1_ps(inv[g])));
}

}  // namespace llmc_attention
