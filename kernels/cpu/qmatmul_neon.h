// The ARM64 NEON inner loop of the quantized matmul, with the dot-product extension (ARMv8.2-A
// `sdot`, `-march=armv8.2-a+dotprod`). Same packed layout as the x86 kernels: a 64-byte chunk
// holds 16 rows x 4 inputs, i.e. four 128-bit vectors of 4 rows each, and `sdot` adds 4 byte
// products into each 32-bit lane, so one vector of int32 sums holds 4 rows ("a quad") and a
// block is 4 quads. `vdotq_laneq_s32` takes the 4 activations of a chunk from one lane of a
// 16-byte load of x, so x is loaded once per 16 inputs.
//
// `sdot` multiplies signed by signed bytes:
// - 4-bit weights (u <= 15) are non-negative as s8: used as they are;
// - 8-bit weights (u up to 255, q8_0's u = q + 128): w = u - 128 (s8), exactly as AVX2 does, and
//   sum(u * x) = sum(w * x) + 128 * sum(x); a group of 32 sums to at most 32 * 128 * 127 in int32.
// Scales are float16, converted with `fcvtl` (vcvt_f32_f16, part of every ARMv8-A).
//
// Correctness is tested under qemu-user (tests/kernels/cpu/test_arm_neon.py); its speed is
// unmeasured until an ARM machine is available, so kMaxBatch is not tuned.
#pragma once

#include <arm_neon.h>

#include "qmatmul_common.h"

namespace llmc_qmatmul {

// Activation rows sharing one pass over a weight block: 4 rows x 4 quads of int32 sums fill half
// of the 32 NEON registers, leaving the rest for the weights and activations (not measured).
constexpr int64_t kMaxBatch = 4;
constexpr int kQuads = static_cast<int>(kRows) / 4;  // 128-bit vectors of int32 sums per block
constexpr int kChunkBytes = 64;                       // 16 rows x 4 inputs, as in qmatmul_vnni.py's pack
constexpr int kXBytes = 16;                           // activations per NEON load: 4 lanes of 4
constexpr float kUnsignedOffset = 128.f;              // 8-bit: u = w + 128

// dot[m][quad] += the chunk's products with the 4 activations in lane kLane of x[m] (weights as s8).
template <int kLane, int kBatch>
inline void chunk_dot(const int8x16_t (&w)[kQuads], const int8x16_t (&x)[kBatch], int32x4_t (&dot)[kBatch][kQuads]) {
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) dot[m][r] = vdotq_laneq_s32(dot[m][r], w[r], x[m], kLane);
}

// The chunk at `p` as signed bytes: its low nibbles (kPart 0), high nibbles (1) or u - 128 (8-bit).
template <int kBits, int kPart>
inline void load_chunk(const uint8_t* p, int8x16_t (&w)[kQuads]) {
  for (int r = 0; r < kQuads; ++r) {
    const uint8x16_t v = vld1q_u8(p + r * 16);
    if constexpr (kBits == 8) {
      w[r] = vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80)));
    } else if constexpr (kPart == 0) {
      w[r] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
    } else {
      w[r] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
    }
  }
}

template <int kGroup, int kBits, int kBatch>
void block_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
                int64_t ldy) {
  float32x4_t acc[kBatch][kQuads];
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) acc[m][r] = vdupq_n_f32(0.f);
  constexpr int64_t kGroupBytes = kRows * kGroup * kBits / 8;
  for (int64_t g = 0; g < groups; ++g) {
    int32x4_t dot[kBatch][kQuads];
    for (int m = 0; m < kBatch; ++m)
      for (int r = 0; r < kQuads; ++r) dot[m][r] = vdupq_n_s32(0);
    const uint8_t* wg = w + g * kGroupBytes;
    const int8_t* xg = a.q + g * kGroup;
    for (int xv = 0; xv < kGroup / kXBytes; ++xv) {
      int8x16_t x[kBatch];
      for (int m = 0; m < kBatch; ++m) x[m] = vld1q_s8(xg + m * k + xv * kXBytes);
      int8x16_t v[kQuads];
      if constexpr (kBits == 4) {  // 16 inputs = 2 chunks of 8: low nibbles inputs 0-3, high 4-7
        const uint8_t* c = wg + xv * 2 * kChunkBytes;
        load_chunk<4, 0>(c, v), chunk_dot<0>(v, x, dot);
        load_chunk<4, 1>(c, v), chunk_dot<1>(v, x, dot);
        load_chunk<4, 0>(c + kChunkBytes, v), chunk_dot<2>(v, x, dot);
        load_chunk<4, 1>(c + kChunkBytes, v), chunk_dot<3>(v, x, dot);
      } else {  // 16 inputs = 4 chunks of 4
        const uint8_t* c = wg + xv * 4 * kChunkBytes;
        load_chunk<8, 0>(c, v), chunk_dot<0>(v, x, dot);
        load_chunk<8, 0>(c + kChunkBytes, v), chunk_dot<1>(v, x, dot);
        load_chunk<8, 0>(c + 2 * kChunkBytes, v), chunk_dot<2>(v, x, dot);
        load_chunk<8, 0>(c + 3 * kChunkBytes, v), chunk_dot<3>(v, x, dot);
      }
    }
    const Half16* sg = sc + g * 2 * kRows;
    for (int r = 0; r < kQuads; ++r) {
      const float32x4_t scale = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sg + r * 4)));
      const float32x4_t offset = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sg + kRows + r * 4)));
      for (int m = 0; m < kBatch; ++m) {
        const int64_t i = m * groups + g;
        const float32x4_t sum = vdupq_n_f32(a.sum[i]);
        float32x4_t d = vcvtq_f32_s32(dot[m][r]);
        if constexpr (kBits == 8) d = vfmaq_f32(d, vdupq_n_f32(kUnsignedOffset), sum);  // exact: < 2^24
        const float32x4_t t = vfmaq_f32(vmulq_f32(offset, sum), scale, d);
        acc[m][r] = vfmaq_f32(acc[m][r], t, vdupq_n_f32(a.scale[i]));
      }
    }
  }
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) vst1q_f32(y + m * ldy + r * 4, acc[m][r]);
}

// The q6k form (qmatmul_common.h): u = low nibble | top two bits << 4 (0..63, non-negative as s8),
// and `sdot` takes the 4 inputs 4t + j of field t from lane t of the group's 16 activations.
template <int kBatch>
void q6k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  float32x4_t acc[kBatch][kQuads];
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) acc[m][r] = vdupq_n_f32(0.f);
  const uint8x16_t nibble = vdupq_n_u8(0x0F), top = vdupq_n_u8(0x30);
  for (int64_t s = 0; s < groups / kQ6KGroups; ++s) {
    const uint8_t* ws = w + s * kQ6KSuperBytes;
    float32x4_t d[kQuads];
    for (int r = 0; r < kQuads; ++r) d[r] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + s * kRows + r * 4)));
    for (int g = 0; g < kQ6KGroups; ++g) {
      int8x16_t x[kBatch];
      const int64_t gi = s * kQ6KGroups + g;
      for (int m = 0; m < kBatch; ++m) x[m] = vld1q_s8(a.q + m * k + gi * kQ6KGroup);
      int32x4_t dot[kBatch][kQuads];
      for (int m = 0; m < kBatch; ++m)
        for (int r = 0; r < kQuads; ++r) dot[m][r] = vdupq_n_s32(0);
      int8x16_t u[kQuads];
      for (int r = 0; r < kQuads; ++r) {
        const uint8x16_t h = vld1q_u8(ws + kQ6KLowBytes + g * 64 + r * 16);
        u[r] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(vld1q_u8(ws + g * 128 + r * 16), nibble), vandq_u8(vshlq_n_u8(h, 4), top)));
      }
      chunk_dot<0>(u, x, dot);
      for (int r = 0; r < kQuads; ++r) {
        const uint8x16_t h = vld1q_u8(ws + kQ6KLowBytes + g * 64 + r * 16);
        u[r] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(vld1q_u8(ws + g * 128 + r * 16), 4), vandq_u8(vshlq_n_u8(h, 2), top)));
      }
      chunk_dot<1>(u, x, dot);
      for (int r = 0; r < kQuads; ++r) {
        const uint8x16_t h = vld1q_u8(ws + kQ6KLowBytes + g * 64 + r * 16);
        u[r] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(vld1q_u8(ws + g * 128 + 64 + r * 16), nibble), vandq_u8(h, top)));
      }
      chunk_dot<2>(u, x, dot);
      for (int r = 0; r < kQuads; ++r) {
        const uint8x16_t h = vld1q_u8(ws + kQ6KLowBytes + g * 64 + r * 16);
        u[r] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(vld1q_u8(ws + g * 128 + 64 + r * 16), 4), vandq_u8(vshrq_n_u8(h, 2), top)));
      }
      chunk_dot<3>(u, x, dot);
      const int8x16_t sub = vld1q_s8(reinterpret_cast<const int8_t*>(ws + kQ6KLowBytes + kQ6KHighBytes + g * kRows));
      const int16x8_t sub16[2] = {vmovl_s8(vget_low_s8(sub)), vmovl_s8(vget_high_s8(sub))};
      for (int r = 0; r < kQuads; ++r) {
        const int16x8_t half = sub16[r / 2];
        const int32x4_t s32 = r % 2 == 0 ? vmovl_s16(vget_low_s16(half)) : vmovl_s16(vget_high_s16(half));
        const float32x4_t scale = vmulq_f32(d[r], vcvtq_f32_s32(s32));
        for (int m = 0; m < kBatch; ++m) {
          const int64_t i = m * groups + gi;
          const float32x4_t centred = vsubq_f32(vcvtq_f32_s32(dot[m][r]), vdupq_n_f32(kQ6KBias * a.sum[i]));  // exact
          acc[m][r] = vfmaq_f32(acc[m][r], centred, vmulq_f32(scale, vdupq_n_f32(a.scale[i])));
        }
      }
    }
  }
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) vst1q_f32(y + m * ldy + r * 4, acc[m][r]);
}

// The q4k form (qmatmul_common.h): the bits-4 inner loop per group of 32, with the scale d * sc and
// offset -dmin * mn made from its bytes, 4 rows per quad.
template <int kBatch>
void q4k_rows(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k, float* y,
              int64_t ldy) {
  float32x4_t acc[kBatch][kQuads];
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) acc[m][r] = vdupq_n_f32(0.f);
  for (int64_t s = 0; s < groups / kQ4KGroups; ++s) {
    const uint8_t* ws = w + s * kQ4KSuperBytes;
    float32x4_t d[kQuads], neg_dmin[kQuads];
    for (int r = 0; r < kQuads; ++r) {
      d[r] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + s * 2 * kRows + r * 4)));
      neg_dmin[r] = vnegq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + s * 2 * kRows + kRows + r * 4))));
    }
    for (int g = 0; g < kQ4KGroups; ++g) {
      const int64_t gi = s * kQ4KGroups + g;
      int32x4_t dot[kBatch][kQuads];
      for (int m = 0; m < kBatch; ++m)
        for (int r = 0; r < kQuads; ++r) dot[m][r] = vdupq_n_s32(0);
      for (int xv = 0; xv < kQ4KGroup / kXBytes; ++xv) {
        int8x16_t x[kBatch];
        for (int m = 0; m < kBatch; ++m) x[m] = vld1q_s8(a.q + m * k + gi * kQ4KGroup + xv * kXBytes);
        int8x16_t v[kQuads];
        const uint8_t* c = ws + g * 256 + xv * 2 * kChunkBytes;
        load_chunk<4, 0>(c, v), chunk_dot<0>(v, x, dot);
        load_chunk<4, 1>(c, v), chunk_dot<1>(v, x, dot);
        load_chunk<4, 0>(c + kChunkBytes, v), chunk_dot<2>(v, x, dot);
        load_chunk<4, 1>(c + kChunkBytes, v), chunk_dot<3>(v, x, dot);
      }
      const uint8x16_t scs = vld1q_u8(ws + kQ4KValueBytes + g * kRows);
      const uint8x16_t mns = vld1q_u8(ws + kQ4KValueBytes + kQ4KGroups * kRows + g * kRows);
      const uint16x8_t sc16[2] = {vmovl_u8(vget_low_u8(scs)), vmovl_u8(vget_high_u8(scs))};
      const uint16x8_t mn16[2] = {vmovl_u8(vget_low_u8(mns)), vmovl_u8(vget_high_u8(mns))};
      for (int r = 0; r < kQuads; ++r) {
        const uint32x4_t s32 = r % 2 == 0 ? vmovl_u16(vget_low_u16(sc16[r / 2])) : vmovl_u16(vget_high_u16(sc16[r / 2]));
        const uint32x4_t m32 = r % 2 == 0 ? vmovl_u16(vget_low_u16(mn16[r / 2])) : vmovl_u16(vget_high_u16(mn16[r / 2]));
        const float32x4_t scale = vmulq_f32(d[r], vcvtq_f32_u32(s32));
        const float32x4_t offset = vmulq_f32(neg_dmin[r], vcvtq_f32_u32(m32));
        for (int m = 0; m < kBatch; ++m) {
          const int64_t i = m * groups + gi;
          const float32x4_t t = vfmaq_f32(vmulq_f32(offset, vdupq_n_f32(a.sum[i])), scale, vcvtq_f32_s32(dot[m][r]));
          acc[m][r] = vfmaq_f32(acc[m][r], t, vdupq_n_f32(a.scale[i]));
        }
      }
    }
  }
  for (int m = 0; m < kBatch; ++m)
    for (int r = 0; r < kQuads; ++r) vst1q_f32(y + m * ldy + r * 4, acc[m][r]);
}

}  // namespace llmc_qmatmul
