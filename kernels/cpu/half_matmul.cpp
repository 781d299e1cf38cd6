// The torch op around half_matmul_driver.h (reached through kernels_api.h): x [M, K] in any float
// dtype (computed in float32) times a float16 or bfloat16 weight [N, K], transposed → float32
// [M, N]. The plain-torch reference is kernels/cpu/half_matmul.py `reference_half_matmul`.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "kernels_api.h"

namespace {

// Weights one thread reads before a second one joins (~30 us of streaming at one thread's share of
// the memory bandwidth): a small matrix is not worth waking the other threads for.
constexpr int64_t kHalfGrainWeights = int64_t{1} << 18;

at::Tensor half_matmul(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "half_matmul: x [M, K] and weight [N, K]");
  TORCH_CHECK(weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16,
              "half_matmul: the weight must be float16 or bfloat16");
  TORCH_CHECK(weight.is_contiguous(), "half_matmul: the weight must be contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "half_matmul: x has ", k, " columns, the weight ", weight.size(1));
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return y;
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  static_assert(sizeof(at::Half) == 2 && sizeof(at::BFloat16) == 2, "16-bit weights");
  const auto* bits = static_cast<const uint16_t*>(weight.data_ptr());
  const llmc_half::Problem p{xf.data_ptr<float>(), bits, y.data_ptr<float>(), m, k, n, bf16};
  const int64_t tiles = (n + llmc_half::kHalfTileRows - 1) / llmc_half::kHalfTileRows;
  const int64_t grain = std::max<int64_t>(1, kHalfGrainWeights / std::max<int64_t>(1, k * llmc_half::kHalfTileRows));
  at::parallel_for(0, tiles, grain, [&](int64_t first, int64_t last) { llmc_half::run_tiles_isa(p, first, last); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmc, m) { m.def("half_matmul(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("half_matmul", &half_matmul); }
