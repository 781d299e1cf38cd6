// What the torch ops (torch_ops.cpp) take from torch: its stable C ABI (torch/csrc/stable, torch
// 2.10 and later) instead of ATen's C++ headers. Parsing ATen's headers took ~5 of the ~8 s the ops'
// translation unit compiled in, on the critical path of a build with an empty cache (the first
// library is needed before anything is traced); the stable headers parse in ~1 s
// (docs/BENCHMARKS.md). The ops keep their schemas, results and messages.
#pragma once

// The oldest torch whose stable ABI has everything used here (pyproject's floor): compiling against
// its feature set turns a newer function into a compile error here, not a failure on torch 2.10.
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 10) << 48))
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>

namespace llmc_torch {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// A new contiguous CPU tensor. Through the C shim's empty_strided (what AOTInductor's generated
// code calls), not torch::stable::empty: that one goes through the dispatcher, ~1 us more per op
// call (measured), and qmatmul runs hundreds of times a decode step.
inline Tensor empty(const int64_t* sizes, int64_t ndim, int32_t dtype) {
  constexpr int64_t kMaxDims = 8;  // more than any op here makes
  STD_TORCH_CHECK(ndim <= kMaxDims, "llmc: a tensor of more than 8 dimensions");
  int64_t strides[kMaxDims];
  int64_t stride = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {  // torch's contiguous strides: a 0 counts as 1
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_empty_strided(ndim, sizes, strides, dtype, aoti_torch_device_type_cpu(), 0, &handle));
  return Tensor(handle);
}

inline Tensor empty(std::initializer_list<int64_t> sizes, int32_t dtype) {
  return empty(sizes.begin(), static_cast<int64_t>(sizes.size()), dtype);
}

inline Tensor empty_float(std::initializer_list<int64_t> sizes) { return empty(sizes, aoti_torch_dtype_float32()); }

// x as contiguous float32: x itself when it is one already (no dispatcher call on the hot path).
inline Tensor float_contiguous(const Tensor& x) {
  if (x.scalar_type() == ScalarType::Float && x.is_contiguous()) return x;
  return torch::stable::contiguous(torch::stable::to(x, ScalarType::Float));
}

// x contiguous: x itself when it is already.
inline Tensor contiguous(const Tensor& x) { return x.is_contiguous() ? x : torch::stable::contiguous(x); }

// A 0-dimensional bool tensor holding `value`.
inline Tensor bool_scalar(bool value) {
  Tensor t = empty(nullptr, 0, aoti_torch_dtype_bool());
  *static_cast<bool*>(t.mutable_data_ptr()) = value;
  return t;
}

}  // namespace llmc_torch
