// What every ISA's inner loop of the quantized matmul (qmatmul.cpp) shares: the block geometry
// and the quantized activations it reads. An ISA's header (qmatmul_avx512.h, qmatmul_avx2.h,
// qmatmul_neon.h) defines, in namespace llmc_qmatmul,
//   constexpr int64_t kMaxBatch;  // activation rows sharing one pass over a weight block
//   template <int kGroup, int kBits, int kBatch> void block_rows(...);  // see BlockFn below
// and qmatmul_driver.h, compiled once per ISA with that ISA's flags, does the rest. Torch-free, so
// that the ARM test harness (tests/kernels/cpu/arm/harness.cpp) compiles it without libtorch.
#pragma once

#include <cstdint>

namespace llmc_qmatmul {

constexpr int64_t kRows = 16;  // output rows per weight block (the packed layout, qmatmul_vnni.py)

struct Activations {
  const int8_t* q;      // [M, K]
  const float* scale;   // [M, K / G]: dx
  const float* sum;     // [M, K / G]: sum of q over the group, as float
};

// The IEEE float16 bits of a scale or offset (at::Half's storage; each ISA converts them itself).
using Half16 = uint16_t;

// y[m, 0:16] = the block's 16 outputs for activation rows m < kBatch (row stride ldy).
using BlockFn = void (*)(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k,
                         float* y, int64_t ldy);

}  // namespace llmc_qmatmul
