// Quantized matmul on x86 CPUs (AVX-512 VNNI, AVX-VNNI or AVX2; one library per ISA): y[M, N] = x[M, K] @ W^T with W = u * scale + offset,
// u an unsigned 4- or 8-bit integer and one (scale, offset) per group of G = 16 or 32 weights of
// a row. Every GGML format has this form (kernels/cpu/qmatmul_vnni.py prepares it).
//
// Like llama.cpp, x is quantized to int8 per G values (scale max|x| / 127), so that the inner
// loop multiplies u8 weights by s8 activations in integers (`vpdpbusd`, or AVX2's
// `vpmaddubsw`), with no conversion of weights to float. This file is the ISA-neutral driver; the
// inner loop is the ISA's header, chosen by the compiler flags it is built with. Per group and row, y += dx * (scale * sum(u * xq) + offset *
// sum(xq)); the plain-torch reference is kernels/cpu/qmatmul_vnni.py `reference_vnni_matmul`.
//
// Layout of `weight`, per block of 16 output rows and group of G inputs (see pack in the .py):
//   bits 8: G / 4 chunks of 64 bytes; chunk c, byte 4*r + j = u[row r][input 4c + j].
//   bits 4: G / 8 chunks of 64 bytes; chunk c, byte 4*r + j holds u[r][8c + j] in its low nibble
//           and u[r][8c + 4 + j] in its high nibble.
// `scales`: float16 [N / 16, K / G, 2, 16], the 16 rows' scales then their offsets; G is K
// divided by its second dimension.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

// The inner loop for the ISA this file is compiled for (kernels/cpu/cpu_kernels.py ISAS' flags).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "qmatmul_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "qmatmul_avx2.h"
#else
#error "no inner loop of the quantized matmul for this instruction set"
#endif

namespace {

using namespace llmc_qmatmul;

constexpr float kInt8Max = 127.f;  // symmetric int8 range of the quantized activations

template <int kGroup, int kBits, int64_t... kBatches>
BlockFn batch_fn(int64_t batch, std::integer_sequence<int64_t, kBatches...>) {
  BlockFn fn = &block_rows<kGroup, kBits, kMaxBatch>;
  ((batch == kBatches + 1 ? (fn = &block_rows<kGroup, kBits, kBatches + 1>, 0) : 0), ...);
  return fn;
}

// The inner loop for `batch` activation rows (1..kMaxBatch; more take kMaxBatch).
BlockFn block_fn(int64_t group, int64_t bits, int64_t batch) {
  const auto batches = std::make_integer_sequence<int64_t, kMaxBatch>{};
  if (group == 16) return bits == 4 ? batch_fn<16, 4>(batch, batches) : batch_fn<16, 8>(batch, batches);
  return bits == 4 ? batch_fn<32, 4>(batch, batches) : batch_fn<32, 8>(batch, batches);
}

// x [M, K] float → int8 per group of G, its scales and its sums (single-threaded: M * K is
// small beside the weights, and the reference does exactly these float32 operations).
void quantize_activations(const float* x, int64_t count, int64_t group, int8_t* q, float* scale, float* sum) {
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

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scales.dim() == 4, "qmatmul: bad ranks");
  TORCH_CHECK(weight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf, "qmatmul: bad dtypes");
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous(), "qmatmul: weights must be contiguous");
  const int64_t m = x.size(0), k = x.size(1), blocks = weight.size(0), n = blocks * kRows, groups = scales.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups == 16 || k / groups == 32),
              "qmatmul: K must be 16 or 32 inputs per scale group, got K = ", k, " for ", groups, " groups");
  const int64_t group = k / groups;
  TORCH_CHECK(weight.size(1) == groups * kRows * group * bits / 8, "qmatmul: weight does not match K");
  TORCH_CHECK(scales.size(0) == blocks && scales.size(1) == groups && scales.size(2) == 2 && scales.size(3) == kRows,
              "qmatmul: scales do not match the weight");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({m, groups}, x.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({m, groups}, x.options().dtype(at::kFloat));
  quantize_activations(xf.data_ptr<float>(), m * groups, group, xq.data_ptr<int8_t>(), dx.data_ptr<float>(),
                       xsum.data_ptr<float>());
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const int8_t* qp = xq.data_ptr<int8_t>();
  const float* dp = dx.data_ptr<float>();
  const float* sump = xsum.data_ptr<float>();
  const int64_t block_bytes = weight.size(1);
  const BlockFn full = block_fn(group, bits, kMaxBatch), tail = block_fn(group, bits, m % kMaxBatch);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      for (int64_t m0 = 0; m0 < m; m0 += kMaxBatch) {
        const Activations a{qp + m0 * k, dp + m0 * groups, sump + m0 * groups};
        const int64_t rows = std::min(kMaxBatch, m - m0);
        float* out = yp + m0 * n + b * kRows;
        const at::Half* sb = sp + b * groups * 2 * kRows;
        (rows == kMaxBatch ? full : tail)(wp + b * block_bytes, sb, a, groups, k, out, n);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmc, m) { m.def("qmatmul(Tensor x, Tensor weight, Tensor scales, int bits) -> Tensor"); }

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("qmatmul", &qmatmul); }
