// Quantized matmul on CPUs (AVX-512 VNNI, AVX-VNNI, AVX2, or ARM64 NEON with dot products; one
// library per ISA): y[M, N] = x[M, K] @ W^T with W = u * scale + offset, u an unsigned 4- or
// 8-bit integer and one (scale, offset) per group of G = 16 or 32 weights of a row. Every GGML
// format has this form (kernels/cpu/qmatmul_vnni.py prepares it).
//
// Like llama.cpp, x is quantized to int8 per G values (scale max|x| / 127), so that the inner
// loop multiplies u8 weights by s8 activations in integers (`vpdpbusd`, or AVX2's
// `vpmaddubsw`, ARM's `sdot`), with no conversion of weights to float. This file is the torch op
// around the ISA-neutral driver (qmatmul_driver.h); the inner loop is the ISA's header, chosen by
// the compiler flags it is built with. Per group and row, y += dx * (scale * sum(u * xq) + offset *
// sum(xq)); the plain-torch reference is kernels/cpu/qmatmul_vnni.py `reference_vnni_matmul`.
//
// Layout of `weight`, per block of 16 output rows and group of G inputs (see pack in the .py):
//   bits 8: G / 4 chunks of 64 bytes; chunk c, byte 4*r + j = u[row r][input 4c + j].
//   bits 4: G / 8 chunks of 64 bytes; chunk c, byte 4*r + j holds u[r][8c + j] in its low nibble
//           and u[r][8c + 4 + j] in its high nibble.
// `scales`: float16 [N / 16, K / G, 2, 16], the 16 rows' scales then their offsets; G is K
// divided by its second dimension.
// bits 6: the q6k form, GGML's q6k blocks at their own size; bits 5: the q4k form, q4k's blocks at
// 4.625 bits per weight (layouts in qmatmul_common.h).

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels_api.h"
#include "torch_stable.h"

namespace {

using llmc_qmatmul::Half16;
using llmc_qmatmul::kRows;
using llmc_torch::ScalarType;
using llmc_torch::Tensor;

// Groups of activations one thread quantizes before a second one joins: ~10 us of work (a
// prefill's rows), above the cost of waking the other threads; a decode step's few rows stay on
// the calling thread.
constexpr int64_t kQuantizeGrain = 4096;

// K, the activations' quantization group and their number of groups, for `weight` and `scales`
// in the layout of `bits` (checked).
struct Geometry {
  int64_t k, group, groups;
};

Geometry geometry(const Tensor& x, const Tensor& weight, const Tensor& scales, int64_t bits) {
  const int64_t k = x.size(1), blocks = weight.size(0);
  if (bits == llmc_qmatmul::kQ6KBits) {
    const int64_t supers = scales.size(1), sub = llmc_qmatmul::kQ6KGroup * llmc_qmatmul::kQ6KGroups;
    STD_TORCH_CHECK(supers > 0 && k == supers * sub, "qmatmul: the q6k form needs K = 256 per d, got K = ", k, " for ",
                supers);
    STD_TORCH_CHECK(weight.size(1) == supers * llmc_qmatmul::kQ6KSuperBytes, "qmatmul: weight does not match K");
    STD_TORCH_CHECK(scales.size(0) == blocks && scales.size(2) == 1 && scales.size(3) == kRows,
                "qmatmul: scales do not match the weight");
    return {k, llmc_qmatmul::kQ6KGroup, k / llmc_qmatmul::kQ6KGroup};
  }
  if (bits == llmc_qmatmul::kQ4KBits) {
    const int64_t supers = scales.size(1), sub = llmc_qmatmul::kQ4KGroup * llmc_qmatmul::kQ4KGroups;
    STD_TORCH_CHECK(supers > 0 && k == supers * sub, "qmatmul: the q4k form needs K = 256 per d, got K = ", k, " for ",
                supers);
    STD_TORCH_CHECK(weight.size(1) == supers * llmc_qmatmul::kQ4KSuperBytes, "qmatmul: weight does not match K");
    STD_TORCH_CHECK(scales.size(0) == blocks && scales.size(2) == 2 && scales.size(3) == kRows,
                "qmatmul: scales do not match the weight");
    return {k, llmc_qmatmul::kQ4KGroup, k / llmc_qmatmul::kQ4KGroup};
  }
  const int64_t groups = scales.size(1);
  STD_TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups == 16 || k / groups == 32),
                  "qmatmul: K must be 16 or 32 inputs per scale group, got K = ", k, " for ", groups, " groups");
  const int64_t group = k / groups;
  STD_TORCH_CHECK(weight.size(1) == groups * kRows * group * bits / 8, "qmatmul: weight does not match K");
  STD_TORCH_CHECK(scales.size(0) == blocks && scales.size(1) == groups && scales.size(2) == 2 && scales.size(3) == kRows,
                  "qmatmul: scales do not match the weight");
  return {k, group, groups};
}

void check_operands(const Tensor& x, const Tensor& weight, const Tensor& scales, int64_t bits) {
  STD_TORCH_CHECK(bits == 4 || bits == 8 || bits == llmc_qmatmul::kQ6KBits || bits == llmc_qmatmul::kQ4KBits,
                  "qmatmul: bits must be 4, 5, 6 or 8, got ", bits);
  STD_TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scales.dim() == 4, "qmatmul: bad ranks");
  STD_TORCH_CHECK(weight.scalar_type() == ScalarType::Byte && scales.scalar_type() == ScalarType::Half, "qmatmul: bad dtypes");
  STD_TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous(), "qmatmul: weights must be contiguous");
}

// The K-quant forms' matmul where the library takes their activations per super-block
// (kernels_api.h superblock_activations_isa): x → int8 with one scale per 256 inputs and int16
// sums per group, then the blocks.
Tensor qmatmul_per_super(const Tensor& xf, const Tensor& weight, const Tensor& scales, int64_t bits, int64_t k,
                         int64_t group, int64_t groups) {
  const int64_t m = xf.size(0), n = weight.size(0) * kRows, supers = k / llmc_qmatmul::kSuperInputs;
  Tensor xq = llmc_torch::empty({m, k}, aoti_torch_dtype_int8());
  Tensor dx = llmc_torch::empty_float({m, supers});
  Tensor sums = llmc_torch::empty({m, groups}, aoti_torch_dtype_int16());
  const float* xp = xf.const_data_ptr<float>();
  int8_t* qp = xq.mutable_data_ptr<int8_t>();
  float* dxp = dx.mutable_data_ptr<float>();
  auto* sp = static_cast<int16_t*>(sums.mutable_data_ptr());
  const int64_t per = llmc_qmatmul::kSuperInputs / group;
  torch::stable::parallel_for(0, m * supers, kQuantizeGrain / per, [&](int64_t first, int64_t last) {
    llmc_qmatmul::quantize_superblocks_isa(xp + first * llmc_qmatmul::kSuperInputs, last - first, group,
                                           qp + first * llmc_qmatmul::kSuperInputs, dxp + first, sp + first * per);
  });
  Tensor y = llmc_torch::empty_float({m, n});
  llmc_qmatmul::Problem p{weight.const_data_ptr<uint8_t>(),
                          static_cast<const Half16*>(scales.const_data_ptr()),
                          qp,
                          dxp,
                          nullptr,
                          y.mutable_data_ptr<float>(),
                          m, k, n, groups, group, bits, weight.size(1)};
  p.sums = sp;
  p.per_super = true;
  torch::stable::parallel_for(0, weight.size(0), 1,
                              [&](int64_t first, int64_t last) { llmc_qmatmul::run_blocks_isa(p, first, last); });
  return y;
}

bool is_kquant_form(int64_t bits) { return bits == llmc_qmatmul::kQ6KBits || bits == llmc_qmatmul::kQ4KBits; }

Tensor qmatmul(Tensor x, Tensor weight, Tensor scales, int64_t bits) {
  check_operands(x, weight, scales, bits);
  const int64_t m = x.size(0), blocks = weight.size(0), n = blocks * kRows;
  const auto [k, group, groups] = geometry(x, weight, scales, bits);
  const Tensor xf = llmc_torch::float_contiguous(x);
  if (is_kquant_form(bits) && llmc_qmatmul::superblock_activations_isa())
    return qmatmul_per_super(xf, weight, scales, bits, k, group, groups);
  Tensor xq = llmc_torch::empty({m, k}, aoti_torch_dtype_int8());
  Tensor dx = llmc_torch::empty_float({m, groups});
  Tensor xsum = llmc_torch::empty_float({m, groups});
  const float* xp = xf.const_data_ptr<float>();
  int8_t* qp = xq.mutable_data_ptr<int8_t>();
  float *dxp = dx.mutable_data_ptr<float>(), *sump = xsum.mutable_data_ptr<float>();
  torch::stable::parallel_for(0, m * groups, kQuantizeGrain, [&](int64_t first, int64_t last) {
    llmc_qmatmul::quantize_activations_isa(xp + first * group, last - first, group, qp + first * group, dxp + first,
                                           sump + first);
  });
  Tensor y = llmc_torch::empty_float({m, n});
  const llmc_qmatmul::Problem p{weight.const_data_ptr<uint8_t>(),
                                static_cast<const Half16*>(scales.const_data_ptr()),
                                qp,
                                dxp,
                                sump,
                                y.mutable_data_ptr<float>(),
                                m, k, n, groups, group, bits, weight.size(1)};
  torch::stable::parallel_for(0, blocks, 1,
                              [&](int64_t first, int64_t last) { llmc_qmatmul::run_blocks_isa(p, first, last); });
  return y;
}

// Inputs per bf16 tile product (qmatmul_amx.h kBf16Inputs) and rows per tile.
constexpr int64_t kBf16Inputs = 32;
constexpr int64_t kTileRows = 16;

// The same weights in the dense copies' arithmetic, bf16(x) @ bf16(w)^T summed in float32, on AMX's
// bf16 tiles where qmatmul_bf16_available(): for many rows, where it is faster than qmatmul and the
// dense copies' memory is not kept (kernels/cpu/qmatmul_cpu.py decides).
Tensor qmatmul_bf16(Tensor x, Tensor weight, Tensor scales, int64_t bits) {
  STD_TORCH_CHECK(llmc_qmatmul::has_bf16_path_isa(), "qmatmul_bf16: this CPU or library has no AMX bf16 path");
  check_operands(x, weight, scales, bits);
  const int64_t m = x.size(0), blocks = weight.size(0), n = blocks * kRows;
  const auto [k, group, groups] = geometry(x, weight, scales, bits);
  STD_TORCH_CHECK(k % kBf16Inputs == 0, "qmatmul_bf16: K must be a multiple of 32, got ", k);
  // The activations in tiles [rows / 16][K / 32][16][32] of bfloat16 (rounded as torch's
  // conversion rounds), zero rows past m.
  const int64_t rows = (m + kTileRows - 1) / kTileRows * kTileRows;
  const Tensor xb16 = llmc_torch::contiguous(
      x.scalar_type() == ScalarType::BFloat16 ? x : torch::stable::to(x, ScalarType::BFloat16));
  const auto* xs = static_cast<const uint16_t*>(xb16.const_data_ptr());
  Tensor tiles = llmc_torch::empty({rows, k}, aoti_torch_dtype_bfloat16());
  auto* xb = static_cast<uint16_t*>(tiles.mutable_data_ptr());
  const int64_t chunks = k / kBf16Inputs;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t* dst = xb + ((r / kTileRows * chunks + c) * kTileRows + r % kTileRows) * kBf16Inputs;
      if (r < m) {
        std::memcpy(dst, xs + r * k + c * kBf16Inputs, kBf16Inputs * sizeof(uint16_t));
      } else {
        std::memset(dst, 0, kBf16Inputs * sizeof(uint16_t));
      }
    }
  }
  Tensor y = llmc_torch::empty_float({rows, n});
  const llmc_qmatmul::Problem p{weight.const_data_ptr<uint8_t>(),
                                static_cast<const Half16*>(scales.const_data_ptr()),
                                nullptr,
                                nullptr,
                                nullptr,
                                y.mutable_data_ptr<float>(),
                                rows, k, n, groups, group, bits, weight.size(1)};
  torch::stable::parallel_for(0, blocks, 1,
                              [&](int64_t first, int64_t last) { llmc_qmatmul::run_bf16_isa(p, xb, rows, first, last); });
  return torch::stable::narrow(y, 0, 0, m);
}

bool qmatmul_bf16_available() { return llmc_qmatmul::has_bf16_path_isa(); }

// The `bits` this library's qmatmul takes: a library without this op takes 4 and 8 only.
std::vector<int64_t> qmatmul_bits() { return {4, 8, llmc_qmatmul::kQ6KBits, llmc_qmatmul::kQ4KBits}; }

// Whether 32 activation rows and more run on AMX here (qmatmul_amx.h): the library, the CPU, the
// kernel's grant and $LLMC_CPU_AMX decide. A library without this op never does.
bool qmatmul_amx() { return llmc_qmatmul::uses_amx_isa(); }

// The inputs per activation scale of the K-quant forms' matmul here: 256 where the library takes
// them per super-block (kernels_api.h), else the forms' groups (16 for q6k, 32 for q4k, returned
// as 0: "per group"). A library without this op quantizes per group.
int64_t qmatmul_kquant_activation_inputs() {
  return llmc_qmatmul::superblock_activations_isa() ? llmc_qmatmul::kSuperInputs : 0;
}

// Whether the weights' prefetches fill L2 rather than L1 on this CPU (qmatmul_common.h).
bool qmatmul_prefetch_l2() { return llmc_qmatmul::prefetches_to_l2_isa(); }

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(llmc, m) {
  m.def("qmatmul(Tensor x, Tensor weight, Tensor scales, int bits) -> Tensor");
  m.def("qmatmul_bits() -> int[]");
  m.def("qmatmul_amx() -> bool");
  m.def("qmatmul_prefetch_l2() -> bool");
  m.def("qmatmul_kquant_activation_inputs() -> int");
  m.def("qmatmul_bf16(Tensor x, Tensor weight, Tensor scales, int bits) -> Tensor");
  m.def("qmatmul_bf16_available() -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(llmc, CPU, m) {
  m.impl("qmatmul", TORCH_BOX(&qmatmul));
  m.impl("qmatmul_bf16", TORCH_BOX(&qmatmul_bf16));
}

// The ops without tensors to dispatch on: one kernel for every device.
STABLE_TORCH_LIBRARY_IMPL(llmc, CompositeExplicitAutograd, m) {
  m.impl("qmatmul_bits", TORCH_BOX(&qmatmul_bits));
  m.impl("qmatmul_amx", TORCH_BOX(&qmatmul_amx));
  m.impl("qmatmul_prefetch_l2", TORCH_BOX(&qmatmul_prefetch_l2));
  m.impl("qmatmul_kquant_activation_inputs", TORCH_BOX(&qmatmul_kquant_activation_inputs));
  m.impl("qmatmul_bf16_available", TORCH_BOX(&qmatmul_bf16_available));
}
