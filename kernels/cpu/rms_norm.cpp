// RMSNorm as one op: weight * (x * float(1 / sqrt(mean(double(x)^2) + eps))) over the last
// dimension, float32 in and out. The plain-torch reference is model/layers.py `RMSNorm.forward`
// (kernels/cpu/rms_norm.py checks this against it bit for bit).
//
// Why an op for so small a computation: the decode step's compile. Written in torch ops, each norm
// is a float64 reduction and five element-wise ops that Inductor lowers, fuses and generates C++
// for, per norm and per layer: about a third of the cold compile (docs/BENCHMARKS.md). As one
// op it is one call in the generated wrapper.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "torch_stable.h"

namespace {

// Independent partial sums of the squares: the additions of one row overlap instead of waiting
// for each other. The float64 sum rounds to the same float32 scale in any order (see RMSNorm).
constexpr int kSquareSums = 8;
// Rows one thread normalizes before a second one joins (~16K values: a few microseconds).
constexpr int64_t kNormGrainValues = int64_t{1} << 14;

void normalize_row(const float* x, const float* w, float* y, int64_t dim, double eps) {
  double sums[kSquareSums] = {};
  int64_t i = 0;
  for (; i + kSquareSums <= dim; i += kSquareSums) {
    for (int j = 0; j < kSquareSums; ++j) {
      const double v = x[i + j];
      sums[j] += v * v;
    }
  }
  for (; i < dim; ++i) {
    const double v = x[i];
    sums[0] += v * v;
  }
  double sum = 0.0;
  for (double s : sums) sum += s;
  const float scale = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(dim) + eps));
  for (int64_t k = 0; k < dim; ++k) y[k] = w[k] * (x[k] * scale);
}

llmc_torch::Tensor rms_norm(llmc_torch::Tensor x, llmc_torch::Tensor weight, double eps) {
  using llmc_torch::ScalarType;
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float && weight.scalar_type() == ScalarType::Float,
                  "rms_norm: x and the weight must be float32");
  STD_TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(x.dim() - 1) == weight.size(0),
                  "rms_norm: the weight must be 1-D, the size of x's last dimension");
  STD_TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: x and the weight must be contiguous");
  const auto shape = x.sizes();
  llmc_torch::Tensor y = llmc_torch::empty(shape.data(), static_cast<int64_t>(shape.size()), aoti_torch_dtype_float32());
  const int64_t dim = weight.size(0);
  if (dim == 0 || x.numel() == 0) return y;
  const int64_t rows = x.numel() / dim;
  const float* xs = x.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  float* ys = y.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kNormGrainValues / dim);
  torch::stable::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) normalize_row(xs + r * dim, w, ys + r * dim, dim, eps);
  });
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(llmc, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("rms_norm", TORCH_BOX(&rms_norm)); }
