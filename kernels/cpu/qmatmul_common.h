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

// The activations of a K-quant form quantized per super-block (qmatmul_driver.h
// quantize_superblocks): one scale per 256 inputs, as llama.cpp's q8_K, and the int sums per
// sub-block the form's offsets multiply.
constexpr int64_t kSuperInputs = 256;

struct SuperActivations {
  const int8_t* q;      // [M, K]
  const float* scale;   // [M, K / 256]: dx
  const int16_t* sums;  // [M, K / G]: sum of q over each group of G = 16 (q6k) or 32 (q4k)
};

// How far ahead of the inner loop its weights are prefetched (each line once). The hardware
// prefetcher alone kept a 2-core Intel Xeon VM's kernel at 19-24 GB/s, and the q6k form, which
// walks three regions of each super-block at once, at 12; measured in docs/BENCHMARKS.md. About
// two q6k super-blocks (6.5 KB): far enough to cover a DRAM latency at these rates, near enough to
// stay in L1 (or L2, kPrefetchToL2) until used; on the EPYC below 3.3 and 13 KB were no faster.
constexpr int64_t kPrefetchBytes = 6656;

// Which cache the prefetches fill. Into L1 (`prefetcht0`) on Intel, as measured on the Xeon above;
// into L2 (`prefetcht1`) on AMD: a 2-core EPYC (Zen 4) VM's kernel streamed the q6k form at 8-9
// GB/s on one thread with L1 prefetches, no faster than with none, and at 15-18 with L2 ones (the
// q4k form 10-15 → 17-21, 4 bits 13-17 → 18-22; docs/BENCHMARKS.md): a Zen core has far fewer
// L1 miss buffers than the ~100 lines kPrefetchBytes keeps in flight, so L1 prefetches stall the
// loop while L2 ones do not. Read once per process (the CPU does not change under it).
#if defined(__x86_64__) || defined(__i386__)
inline const bool kPrefetchToL2 = __builtin_cpu_is("amd");
#else
inline const bool kPrefetchToL2 = false;
#endif

// A prefetch of the line holding p into the cache kPrefetchToL2 names. always_inline: GCC 12
// otherwise finds these calls free of side effects and drops them (measured: no prefetch left in
// the q6k loop).
[[gnu::always_inline]] inline void prefetch_ahead(const void* p) {
  if (kPrefetchToL2) {
    __builtin_prefetch(p, 0, 2);
  } else {
    __builtin_prefetch(p, 0, 3);
  }
}

[[gnu::always_inline]] inline void prefetch_line(const uint8_t* p) { prefetch_ahead(p + kPrefetchBytes); }

// The q6k form (bits == kQ6KBits): GGML's q6k blocks regrouped for the kernel at the blocks' own
// 6.5625 bits per weight, w = d * sc * (u - 32) with u = 0..63, an int8 scale sc per 16 weights
// and a float16 d per 256. Per block of 16 rows and super-block of 256 inputs, kQ6KSuperBytes:
//   lows:  16 groups x 2 chunks of 64 bytes, u's low 4 bits in the bits-4 layout (qmatmul.cpp);
//   highs: 16 groups x 64 bytes; byte 4*r + j holds u[r][16g + 4t + j] >> 4 in its bits 2t, 2t+1;
//   subs:  16 groups x 16 rows of sc (int8).
// d is `scales`, float16 [N / 16, K / 256, 1, 16]. The activations are quantized per 16 inputs.
constexpr int64_t kQ6KBits = 6;
constexpr int64_t kQ6KGroup = 16;       // inputs per sc, and per activation scale
constexpr int64_t kQ6KGroups = 16;      // groups per super-block of 256 inputs
constexpr int64_t kQ6KLowBytes = kQ6KGroups * 2 * 64;
constexpr int64_t kQ6KHighBytes = kQ6KGroups * 64;
constexpr int64_t kQ6KSuperBytes = kQ6KLowBytes + kQ6KHighBytes + kQ6KGroups * kRows;  // 3328
constexpr float kQ6KBias = 32.f;        // w = d * sc * (u - 32)

// The lines of group g's lows, highs and sub-block scales, kPrefetchBytes ahead.
[[gnu::always_inline]] inline void prefetch_q6k_group(const uint8_t* super, int64_t g) {
  prefetch_line(super + g * 128);
  prefetch_line(super + g * 128 + 64);
  prefetch_line(super + kQ6KLowBytes + g * 64);
  if (g % 4 == 0) prefetch_line(super + kQ6KLowBytes + kQ6KHighBytes + g * kRows);  // 4 groups per line
}

// The q4k form (bits == kQ4KBits, a code: its values have 4 bits): q4k's blocks at 4.625 bits per
// weight where the bits-4 layout takes 5, w = d * sc * u - dmin * mn with u = 0..15 and q4k's
// 6-bit scale sc and min mn per 32 weights held as bytes. Per block of 16 rows and super-block of
// 256 inputs, kQ4KSuperBytes:
//   values: 8 groups of 32 inputs in the bits-4 layout (4 chunks of 64 bytes each);
//   scs:    8 groups x 16 rows of sc (uint8);
//   mns:    8 groups x 16 rows of mn (uint8).
// d and dmin are `scales`, float16 [N / 16, K / 256, 2, 16]. The activations are quantized per 32.
constexpr int64_t kQ4KBits = 5;
constexpr int64_t kQ4KGroup = 32;
constexpr int64_t kQ4KGroups = 8;
constexpr int64_t kQ4KValueBytes = kQ4KGroups * kRows * kQ4KGroup / 2;  // 2048
constexpr int64_t kQ4KSuperBytes = kQ4KValueBytes + 2 * kQ4KGroups * kRows;  // 2304

// Group g's value lines, and (one line per 4 groups) its scs and mns, kPrefetchBytes ahead.
[[gnu::always_inline]] inline void prefetch_q4k_group(const uint8_t* super, int64_t g) {
  for (int64_t c = 0; c < 4; ++c) prefetch_line(super + g * 256 + c * 64);
  if (g % 4 == 0) {
    prefetch_line(super + kQ4KValueBytes + g * kRows);
    prefetch_line(super + kQ4KValueBytes + kQ4KGroups * kRows + g * kRows);
  }
}

// The float16 values of `scales` per block of 16 rows: a scale and an offset per row and group, or
// (the q6k form) one d per row and super-block, or (the q4k form) a d and a dmin.
inline int64_t scale_halves_per_block(int64_t bits, int64_t groups) {
  if (bits == kQ6KBits) return groups / kQ6KGroups * kRows;
  if (bits == kQ4KBits) return groups / kQ4KGroups * 2 * kRows;
  return groups * 2 * kRows;
}

// The IEEE float16 bits of a scale or offset (at::Half's storage; each ISA converts them itself).
using Half16 = uint16_t;

// y[m, 0:16] = the block's 16 outputs for activation rows m < kBatch (row stride ldy).
using BlockFn = void (*)(const uint8_t* w, const Half16* sc, const Activations& a, int64_t groups, int64_t k,
                         float* y, int64_t ldy);

// The same for a K-quant form over activations quantized per super-block (`supers` = K / 256).
using SuperFn = void (*)(const uint8_t* w, const Half16* sc, const SuperActivations& a, int64_t supers, int64_t k,
                         float* y, int64_t ldy);

}  // namespace llmc_qmatmul
