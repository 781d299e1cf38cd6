// The ISA-neutral part of the quantized matmul (layout and arithmetic: qmatmul.cpp): the int8
// quantization of the activations and the loop over weight blocks that calls the ISA's inner
// loop. Torch-free: kernels_isa.cpp compiles it per ISA for the torch op (qmatmul.cpp), and the ARM test harness
// (tests/kernels/cpu/arm/harness.cpp) runs this very code under qemu without libtorch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "kernels_api.h"

// The inner loop for the ISA this file is compiled for (kernels/cpu/cpu_kernels.py ISAS' flags).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "qmatmul_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "qmatmul_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include "qmatmul_neon.h"
#else
#error "no inner loop of the quantized matmul for this instruction set"
#endif

namespace llmc_qmatmul {

constexpr float kInt8Max = 127.f;  // symmetric int8 range of the quantized activations

template <int kGroup, int kBits, int64_t... kBatches>
BlockFn batch_fn(int64_t batch, std::integer_sequence<int64_t, kBatches...>) {
  BlockFn fn = &block_rows<kGroup, kBits, kMaxBatch>;
  ((batch == kBatches + 1 ? (fn = &block_rows<kGroup, kBits, kBatches + 1>, 0) : 0), ...);
  return fn;
}

// The inner loop for `batch` activation rows (1..kMaxBatch; more take kMaxBatch).
inline BlockFn block_fn(int64_t group, int64_t bits, int64_t batch) {
  const auto batches = std::make_integer_sequence<int64_t, kMaxBatch>{};
  if (group == 16) return bits == 4 ? batch_fn<16, 4>(batch, batches) : batch_fn<16, 8>(batch, batches);
  return bits == 4 ? batch_fn<32, 4>(batch, batches) : batch_fn<32, 8>(batch, batches);
}

// x [M, K] float → int8 per group of G, its scales and its sums (single-threaded: M * K is
// small beside the weights, and the reference does exactly these float32 operations).
inline void quantize_activations(const float* x, int64_t count, int64_t group, int8_t* q, float* scale, float* sum) {
  for (int64_t i = 0; i < count; ++i) {
    const float* xg = x + i * group;
    float amax = 0.f;
    bool finite = true;
    for (int64_t j = 0; j < group; ++j) {
      amax = std::max(amax, std::fabs(xg[j]));
      finite = finite && std::isfinite(xg[j]);
    }
    if (!finite) {  // NaN or inf in x: the group's outputs are NaN, as the reference's are
      std::fill(q + i * group, q + (i + 1) * group, int8_t{0});
      scale[i] = std::numeric_limits<float>::quiet_NaN();
      sum[i] = 0.f;
      continue;
    }
    const float inv = amax > 0.f ? kInt8Max / amax : 0.f;
    int32_t total = 0;
    for (int64_t j = 0; j < group; ++j) {
      const auto v = static_cast<int32_t>(std::nearbyint(xg[j] * inv));
      q[i * group + j] = static_cast<int8_t>(v);
      total += v;
    }
    scale[i] = amax / kInt8Max;
    sum[i] = static_cast<float>(total);
  }
}

// y for weight blocks first..last-1 (the unit the caller's threads split).
inline void run_blocks(const Problem& p, int64_t first, int64_t last) {
  const BlockFn full = block_fn(p.group, p.bits, kMaxBatch), tail = block_fn(p.group, p.bits, p.m % kMaxBatch);
  for (int64_t b = first; b < last; ++b) {
    for (int64_t m0 = 0; m0 < p.m; m0 += kMaxBatch) {
      const Activations a{p.q + m0 * p.k, p.scale + m0 * p.groups, p.sum + m0 * p.groups};
      const int64_t rows = std::min(kMaxBatch, p.m - m0);
      float* out = p.y + m0 * p.n + b * kRows;
      const Half16* sb = p.scales + b * p.groups * 2 * kRows;
      (rows == kMaxBatch ? full : tail)(p.weight + b * p.block_bytes, sb, a, p.groups, p.k, out, p.n);
    }
  }
}

}  // namespace llmc_qmatmul
