// The torch op around half_matmul_driver.h (reached through kernels_api.h): x [M, K] in any float
// dtype (computed in float32) times a float16 or bfloat16 weight [N, K], transposed → float32
// [M, N]. The plain-torch reference is kernels/cpu/half_matmul.py `reference_half_matmul`.

#include <algorithm>
#include <cstdint>

#include "kernels_api.h"
#include "torch_stable.h"

namespace {

// Weights one thread reads before a second one joins (~30 us of streaming at one thread's share of
// the memory bandwidth): a small matrix is not worth waking the other threads for.
constexpr int64_t kHalfGrainWeights = int64_t{1} << 18;

llmc_torch::Tensor half_matmul(llmc_torch::Tensor x, llmc_torch::Tensor weight) {
  using llmc_torch::ScalarType;
  STD_TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "half_matmul: x [M, K] and weight [N, K]");
  STD_TORCH_CHECK(weight.scalar_type() == ScalarType::Half || weight.scalar_type() == ScalarType::BFloat16,
                  "half_matmul: the weight must be float16 or bfloat16");
  STD_TORCH_CHECK(weight.is_contiguous(), "half_matmul: the weight must be contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  STD_TORCH_CHECK(weight.size(1) == k, "half_matmul: x has ", k, " columns, the weight ", weight.size(1));
  const llmc_torch::Tensor xf = llmc_torch::float_contiguous(x);
  llmc_torch::Tensor y = llmc_torch::empty_float({m, n});
  if (m == 0 || n == 0) return y;
  const bool bf16 = weight.scalar_type() == ScalarType::BFloat16;
  const auto* bits = static_cast<const uint16_t*>(weight.const_data_ptr());
  const llmc_half::Problem p{xf.const_data_ptr<float>(), bits, y.mutable_data_ptr<float>(), m, k, n, bf16};
  const int64_t tiles = (n + llmc_half::kHalfTileRows - 1) / llmc_half::kHalfTileRows;
  const int64_t grain = std::max<int64_t>(1, kHalfGrainWeights / std::max<int64_t>(1, k * llmc_half::kHalfTileRows));
  torch::stable::parallel_for(0, tiles, grain,
                              [&](int64_t first, int64_t last) { llmc_half::run_tiles_isa(p, first, last); });
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(llmc, m) { m.def("half_matmul(Tensor x, Tensor weight) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("half_matmul", TORCH_BOX(&half_matmul)); }
