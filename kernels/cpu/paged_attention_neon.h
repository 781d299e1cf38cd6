// The ARM64 NEON inner loop of the paged decode attention (paged_attention_cpu.cpp): 4 floats per
// vector, the same computation as the x86 ones (paged_attention_avx512.h) per position, with the
// same exp polynomial; 2^n is built in the exponent bits, as in paged_attention_avx2.h. Needs only
// base ARMv8-A NEON. Correctness is tested under qemu-user (tests/kernels/cpu/test_arm_neon.py);
// its speed is unmeasured until an ARM machine is available.
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace llmc_attention {

constexpr int64_t kLanes = 4;  // floats per 128-bit vector
constexpr int kPartials = 4;   // independent sums per dot product: 4 FMA chains in flight

// exp(x) for x <= 0 (softmax arguments after the max is subtracted): 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, and p a degree-6 polynomial (relative error below 2e-7).
inline float32x4_t exp_nonpositive(float32x4_t x) {
  x = vmaxq_f32(x, vdupq_n_f32(-87.f));  // exp below this underflows float32's normals
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));  // ln2 split in two for accuracy
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.f / 720);
  p = vfmaq_f32(vdupq_n_f32(1.f / 120), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f / 24), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f / 6), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f), p, r);
  // 2^n for n in -126..0: the biased exponent n + 127 shifted into place
  constexpr int kBias = 127, kMantissaBits = 23;
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(kBias)), kMantissaBits);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

// One (sequence, KV head): its `kGroup` query heads over `count` cached positions whose rows are
// at `rows` (slot * kv_heads + kv head), keys and values of kVecs vectors each.
template <int kVecs, int kGroup>
void attend(const float* q, const float* keys, const float* values, const int64_t* rows, int64_t count, float scale,
            float* scores, float* out) {
  static_assert(kVecs % kPartials == 0, "head_dim is a multiple of 16");
  constexpr int64_t kDim = kVecs * kLanes;
  const float lowest = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < kGroup; ++g) {  // scores
    const float* qg = q + g * kDim;
    for (int64_t t = 0; t < count; ++t) {
      const float* key = keys + rows[t] * kDim;
      float32x4_t part[kPartials];
      for (int i = 0; i < kPartials; ++i) part[i] = vdupq_n_f32(0.f);
      for (int j = 0; j < kVecs; j += kPartials)
        for (int i = 0; i < kPartials; ++i)
          part[i] = vfmaq_f32(part[i], vld1q_f32(qg + (j + i) * kLanes), vld1q_f32(key + (j + i) * kLanes));
      const float32x4_t sum = vaddq_f32(vaddq_f32(part[0], part[1]), vaddq_f32(part[2], part[3]));
      scores[g * count + t] = vaddvq_f32(sum) * scale;
    }
  }
  float inv[kGroup];
  for (int g = 0; g < kGroup; ++g) {  // softmax numerators in place, and 1 / their sum
    float* s = scores + g * count;
    float32x4_t peak = vdupq_n_f32(lowest);
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) peak = vmaxq_f32(peak, vld1q_f32(s + i));
    float top = vmaxvq_f32(peak);
    for (int64_t j = i; j < count; ++j) top = std::max(top, s[j]);
    const float32x4_t vtop = vdupq_n_f32(top);
    float32x4_t total = vdupq_n_f32(0.f);
    for (i = 0; i + kLanes <= count; i += kLanes) {
      const float32x4_t e = exp_nonpositive(vsubq_f32(vld1q_f32(s + i), vtop));
      vst1q_f32(s + i, e);
      total = vaddq_f32(total, e);
    }
    if (i < count) {  // the last partial vector through a buffer; lanes past the end add 0
      float buffer[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) buffer[j] = i + j < count ? s[i + j] : top;
      vst1q_f32(buffer, exp_nonpositive(vsubq_f32(vld1q_f32(buffer), vtop)));
      for (int64_t j = 0; j < kLanes; ++j) {
        if (i + j < count) s[i + j] = buffer[j];
        else buffer[j] = 0.f;
      }
      total = vaddq_f32(total, vld1q_f32(buffer));
    }
    inv[g] = 1.f / vaddvq_f32(total);
  }
  float32x4_t acc[kGroup][kVecs];
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j) acc[g][j] = vdupq_n_f32(0.f);
  for (int64_t t = 0; t < count; ++t) {  // weighted sum of the values
    const float* value = values + rows[t] * kDim;
    for (int g = 0; g < kGroup; ++g) {
      const float32x4_t p = vdupq_n_f32(scores[g * count + t]);
      for (int j = 0; j < kVecs; ++j) acc[g][j] = vfmaq_f32(acc[g][j], p, vld1q_f32(value + j * kLanes));
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j) vst1q_f32(out + g * kDim + j * kLanes, vmulq_f32(acc[g][j], vdupq_n_f32(inv[g])));
}

}  // namespace llmc_attention
