// Quantized matmul on AVX-512 VNNI CPUs: y[M, N] = x[M, K] @ W^T with W = u * scale + offset,
// u an unsigned 4- or 8-bit integer and one (scale, offset) per group of G = 16 or 32 weights of
// a row. Every GGML format has this form (kernels/cpu/qmatmul_vnni.py prepares it).
//
// Like llama.cpp, x is quantized to int8 per G values (scale max|x| / 127), so that the inner
// loop is `vpdpbusd`: 64 multiply-adds of u8 weights by s8 activations per instruction, with no
// conversion of weights to float. Per group and row, y += dx * (scale * sum(u * xq) + offset *
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
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t kRows = 16;      // output rows per block: one 512-bit vector of int32 sums
constexpr int64_t kMaxBatch = 4;   // activation rows sharing one pass over a weight block
constexpr float kInt8Max = 127.f;  // symmetric int8 range of the quantized activations

struct Activations {
  const int8_t* q;      // [M, K]
  const float* scale;   // [M, K / G]: dx
  const float* sum;     // [M, K / G]: sum of q over the group, as float
};

template <int kGroup, int kBits, int kBatch>
void block_rows(const uint8_t* w, const at::Half* sc, const Activations& a, int64_t groups, int64_t k,
                float* y, int64_t ldy) {
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

template <int kGroup, int kBits>
void block(int64_t batch, const uint8_t* w, const at::Half* sc, const Activations& a, int64_t groups, int64_t k,
           float* y, int64_t ldy) {
  switch (batch) {
    case 1: return block_rows<kGroup, kBits, 1>(w, sc, a, groups, k, y, ldy);
    case 2: return block_rows<kGroup, kBits, 2>(w, sc, a, groups, k, y, ldy);
    case 3: return block_rows<kGroup, kBits, 3>(w, sc, a, groups, k, y, ldy);
    default: return block_rows<kGroup, kBits, 4>(w, sc, a, groups, k, y, ldy);
  }
}

using BlockFn = void (*)(int64_t, const uint8_t*, const at::Half*, const Activations&, int64_t, int64_t, float*,
                         int64_t);

BlockFn block_fn(int64_t group, int64_t bits) {
  if (group == 16) return bits == 4 ? &block<16, 4> : &block<16, 8>;
  return bits == 4 ? &block<32, 4> : &block<32, 8>;
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

at::Tensor qmatmul_vnni(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul_vnni: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scales.dim() == 4, "qmatmul_vnni: bad ranks");
  TORCH_CHECK(weight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf, "qmatmul_vnni: bad dtypes");
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous(), "qmatmul_vnni: weights must be contiguous");
  const int64_t m = x.size(0), k = x.size(1), blocks = weight.size(0), n = blocks * kRows, groups = scales.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups == 16 || k / groups == 32),
              "qmatmul_vnni: K must be 16 or 32 inputs per scale group, got K = ", k, " for ", groups, " groups");
  const int64_t group = k / groups;
  TORCH_CHECK(weight.size(1) == groups * kRows * group * bits / 8, "qmatmul_vnni: weight does not match K");
  TORCH_CHECK(scales.size(0) == blocks && scales.size(1) == groups && scales.size(2) == 2 && scales.size(3) == kRows,
              "qmatmul_vnni: scales do not match the weight");
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
  const BlockFn run_block = block_fn(group, bits);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      for (int64_t m0 = 0; m0 < m; m0 += kMaxBatch) {
        const Activations a{qp + m0 * k, dp + m0 * groups, sump + m0 * groups};
        const int64_t rows = std::min(kMaxBatch, m - m0);
        float* out = yp + m0 * n + b * kRows;
        const at::Half* sb = sp + b * groups * 2 * kRows;
        run_block(rows, wp + b * block_bytes, sb, a, groups, k, out, n);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmc, m) { m.def("qmatmul_vnni(Tensor x, Tensor weight, Tensor scales, int bits) -> Tensor"); }

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("qmatmul_vnni", &qmatmul_vnni); }
