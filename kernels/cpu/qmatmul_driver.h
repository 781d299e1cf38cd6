// The ISA-neutral part of the quantized matmul (layout and arithmetic: qmatmul.cpp): the int8
// quantization of the activations and the loop over weight blocks that calls the ISA's inner
// loop. Torch-free: kernels_isa.cpp compiles it per ISA for the torch op (qmatmul.cpp), and the ARM test harness
// (tests/kernels/cpu/arm/harness.cpp) runs this very code under qemu without libtorch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels_api.h"

// The inner loop for the ISA this file is compiled for (kernels/cpu/cpu_kernels.py ISAS' flags).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "qmatmul_avx512.h"
// AMX for kAmxMinRows rows and more (qmatmul_amx.h): GCC 11 and Clang 12 are the first to know its
// instructions, and only Linux's arch_prctl grants its state here.
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include "qmatmul_amx.h"
#define LLMC_QMATMUL_AMX 1
#endif
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

template <int64_t... kBatches>
BlockFn q6k_batch_fn(int64_t batch, std::integer_sequence<int64_t, kBatches...>) {
  BlockFn fn = &q6k_rows<kMaxBatch>;
  ((batch == kBatches + 1 ? (fn = &q6k_rows<kBatches + 1>, 0) : 0), ...);
  return fn;
}

template <int64_t... kBatches>
BlockFn q4k_batch_fn(int64_t batch, std::integer_sequence<int64_t, kBatches...>) {
  BlockFn fn = &q4k_rows<kMaxBatch>;
  ((batch == kBatches + 1 ? (fn = &q4k_rows<kBatches + 1>, 0) : 0), ...);
  return fn;
}

// The inner loop for `batch` activation rows (1..kMaxBatch; more take kMaxBatch).
inline BlockFn block_fn(int64_t group, int64_t bits, int64_t batch) {
  const auto batches = std::make_integer_sequence<int64_t, kMaxBatch>{};
  if (bits == kQ6KBits) return q6k_batch_fn(batch, batches);
  if (bits == kQ4KBits) return q4k_batch_fn(batch, batches);
  if (group == 16) return bits == 4 ? batch_fn<16, 4>(batch, batches) : batch_fn<16, 8>(batch, batches);
  return bits == 4 ? batch_fn<32, 4>(batch, batches) : batch_fn<32, 8>(batch, batches);
}

// 127 / amax, the factor that maps the group onto the int8 levels; 0 where amax is 0, or so small
// (below 127 / FLT_MAX, ~4e-37) that the factor overflows: such a group quantizes to zeros.
inline float inverse_step(float amax) {
  const float inv = amax > 0.f ? kInt8Max / amax : 0.f;
  return inv <= std::numeric_limits<float>::max() ? inv : 0.f;
}

// One group of x → int8 (scale max|x| / 127, round half to even), its scale and the sum of its
// int8 values; a group holding NaN or inf gets zeros, a NaN scale and sum 0, so that its outputs
// are NaN as the reference's are.
inline void quantize_group_scalar(const float* xg, int64_t group, int8_t* q, float* scale, float* sum) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t j = 0; j < group; ++j) {
    amax = std::max(amax, std::fabs(xg[j]));
    finite = finite && std::isfinite(xg[j]);
  }
  if (!finite) {
    std::fill(q, q + group, int8_t{0});
    *scale = std::numeric_limits<float>::quiet_NaN();
    *sum = 0.f;
    return;
  }
  const float inv = inverse_step(amax);
  int32_t total = 0;
  for (int64_t j = 0; j < group; ++j) {
    const auto v = static_cast<int32_t>(std::nearbyint(xg[j] * inv));
    q[j] = static_cast<int8_t>(v);
    total += v;
  }
  *scale = amax / kInt8Max;
  *sum = static_cast<float>(total);
}

#if defined(__AVX2__)
// max |x| over n floats (a multiple of 8) into *top, or false where one of them is inf or NaN.
inline bool finite_amax(const float* x, int64_t n, float* top) {
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  __m256 amax = zero, bad = zero;
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_NEQ_UQ));  // v - v: NaN for inf/NaN
  }
  if (!_mm256_testz_ps(bad, bad)) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  *top = _mm_cvtss_f32(m4);
  return true;
}

// 8 floats x * inv rounded to int8 (round half to even, |v| <= 127) into q; their int32 sum added
// to `total`.
inline void round8(const float* x, __m256 inv, int8_t* q, __m256i& total) {
  const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i v = _mm256_cvtps_epi32(r);
  total = _mm256_add_epi32(total, v);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));  // |v| <= 127
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w, w));
}

// The sum of total's 8 int32 lanes.
inline int32_t sum8(__m256i total) {
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
  return _mm_cvtsi128_si32(t4);
}

// The same float32 operations, 8 lanes at a time (groups are 16 or 32 wide): max and abs are
// exact and `vroundps` to nearest is nearbyint's rounding, so the bytes equal the scalar loop's.
// The scalar loop ran at ~2 cycles per value, 10 % of a 500-token prefill on AVX2.
inline void quantize_group(const float* xg, int64_t group, int8_t* q, float* scale, float* sum) {
  float top;
  if (!finite_amax(xg, group, &top)) return quantize_group_scalar(xg, group, q, scale, sum);
  const __m256 inv = _mm256_set1_ps(inverse_step(top));
  __m256i total = _mm256_setzero_si256();
  for (int64_t j = 0; j < group; j += 8) round8(xg + j, inv, q + j, total);
  *scale = top / kInt8Max;
  *sum = static_cast<float>(sum8(total));
}
#else
inline void quantize_group(const float* xg, int64_t group, int8_t* q, float* scale, float* sum) {
  quantize_group_scalar(xg, group, q, scale, sum);
}
#endif

// `count` groups of x (G floats each) → int8, with their scales dx and their sums. The caller
// splits M * K / G groups among threads (qmatmul.cpp).
inline void quantize_activations(const float* x, int64_t count, int64_t group, int8_t* q, float* scale, float* sum) {
  for (int64_t i = 0; i < count; ++i) quantize_group(x + i * group, group, q + i * group, scale + i, sum + i);
}

// One super-block of x (256 floats) → int8 with one scale (max|x| / 127, rounded as
// quantize_group rounds) and the int sum of each group of `sub` (16 or 32) values, which fits
// int16 (32 * 127). A super-block holding NaN or inf gets zeros, a NaN scale and sums 0.
inline void quantize_superblock_scalar(const float* xs, int64_t sub, int8_t* q, float* scale, int16_t* sums) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t j = 0; j < kSuperInputs; ++j) {
    amax = std::max(amax, std::fabs(xs[j]));
    finite = finite && std::isfinite(xs[j]);
  }
  if (!finite) {
    std::fill(q, q + kSuperInputs, int8_t{0});
    std::fill(sums, sums + kSuperInputs / sub, int16_t{0});
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float inv = inverse_step(amax);
  for (int64_t g = 0; g < kSuperInputs / sub; ++g) {
    int32_t total = 0;
    for (int64_t j = g * sub; j < (g + 1) * sub; ++j) {
      const auto v = static_cast<int32_t>(std::nearbyint(xs[j] * inv));
      q[j] = static_cast<int8_t>(v);
      total += v;
    }
    sums[g] = static_cast<int16_t>(total);
  }
  *scale = amax / kInt8Max;
}

#if defined(__AVX2__)
// The same float32 operations 8 lanes at a time, the bytes equal to the scalar loop's (as in
// quantize_group).
inline void quantize_superblock(const float* xs, int64_t sub, int8_t* q, float* scale, int16_t* sums) {
  float top;
  if (!finite_amax(xs, kSuperInputs, &top)) return quantize_superblock_scalar(xs, sub, q, scale, sums);
  const __m256 inv = _mm256_set1_ps(inverse_step(top));
  for (int64_t g = 0; g < kSuperInputs / sub; ++g) {
    __m256i total = _mm256_setzero_si256();
    for (int64_t j = g * sub; j < (g + 1) * sub; j += 8) round8(xs + j, inv, q + j, total);
    sums[g] = static_cast<int16_t>(sum8(total));
  }
  *scale = top / kInt8Max;
}
#else
inline void quantize_superblock(const float* xs, int64_t sub, int8_t* q, float* scale, int16_t* sums) {
  quantize_superblock_scalar(xs, sub, q, scale, sums);
}
#endif

// `count` super-blocks of x → int8, their scales and their groups' sums (the caller splits
// M * K / 256 super-blocks among threads, qmatmul.cpp).
inline void quantize_superblocks(const float* x, int64_t count, int64_t sub, int8_t* q, float* scale, int16_t* sums) {
  const int64_t per = kSuperInputs / sub;
  for (int64_t i = 0; i < count; ++i)
    quantize_superblock(x + i * kSuperInputs, sub, q + i * kSuperInputs, scale + i, sums + i * per);
}

// Whether the K-quant forms take activations quantized per super-block here (the ISA's header
// says where it has such loops): they fold each sub-block's integer scale into int32 sums, where
// per-group scales cost a float epilogue per 16 or 32 inputs that competes with `vpdpbusd`
// (docs/BENCHMARKS.md). Not where AMX runs: its tiles compute the per-group arithmetic, bit for
// bit the VNNI loops' (qmatmul_amx.h), and a process keeps one arithmetic for every row count.
// `$LLMC_CPU_KQUANT_PER_GROUP=1` keeps the per-group loops (measurements, or per-group accuracy:
// a scale per 256 inputs rounds small activations beside a large one more coarsely, as llama.cpp's
// q8_K does). Decided once per process.
inline bool superblock_activations() {
#ifdef LLMC_QMATMUL_SUPER
  static const bool chosen = [] {
    const char* env = std::getenv("LLMC_CPU_KQUANT_PER_GROUP");
    if (env != nullptr && std::strcmp(env, "1") == 0) return false;
#ifdef LLMC_QMATMUL_AMX
    return !amx_usable();
#else
    return true;
#endif
  }();
  return chosen;
#else
  return false;
#endif
}

#ifdef LLMC_QMATMUL_SUPER
// The loop for `batch` rows: kSuperBatch, or 1 to 4 (a tail of more than 4 rows takes 4, then the
// rest: fewer instantiations to compile than one per row count).
inline SuperFn super_fn(int64_t bits, int64_t batch) {
  const bool q6 = bits == kQ6KBits;
  switch (batch) {
    case 1: return q6 ? &q6k_super_rows<1> : &q4k_super_rows<1>;
    case 2: return q6 ? &q6k_super_rows<2> : &q4k_super_rows<2>;
    case 3: return q6 ? &q6k_super_rows<3> : &q4k_super_rows<3>;
    case 4: return q6 ? &q6k_super_rows<4> : &q4k_super_rows<4>;
    default: return q6 ? &q6k_super_rows<kSuperBatch> : &q4k_super_rows<kSuperBatch>;
  }
}

// y for weight blocks first..last-1 of a K-quant form over super-block activations.
inline void run_super_blocks(const Problem& p, int64_t first, int64_t last) {
  static_assert(kSuperBatch == 4 || kSuperBatch == 8, "super_fn's tails are 1 to 4 rows");
  const int64_t supers = p.k / kSuperInputs;
  for (int64_t b = first; b < last; ++b) {
    const uint8_t* w = p.weight + b * p.block_bytes;
    const Half16* sb = p.scales + b * scale_halves_per_block(p.bits, p.groups);
    for (int64_t m0 = 0; m0 < p.m;) {
      const int64_t left = p.m - m0;
      const int64_t rows = left >= kSuperBatch ? kSuperBatch : left > 4 ? 4 : left;
      const SuperActivations a{p.q + m0 * p.k, p.scale + m0 * supers, p.sums + m0 * p.groups};
      super_fn(p.bits, rows)(w, sb, a, supers, p.k, p.y + m0 * p.n + b * kRows, p.n);
      m0 += rows;
    }
  }
}
#endif

// y for weight blocks first..last-1 over all of p's rows.
inline void run_blocks_untiled(const Problem& p, int64_t first, int64_t last) {
#ifdef LLMC_QMATMUL_SUPER
  if (p.per_super) return run_super_blocks(p, first, last);
#endif
  int64_t done = 0;  // rows computed on AMX: whole tiles of 16, where the CPU runs it
#ifdef LLMC_QMATMUL_AMX
  static_assert(kAmxRows % kMaxBatch == 0, "the VNNI loops take over at a multiple of their batch");
  if (p.m >= kAmxMinRows && amx_usable()) {
    done = p.m / kAmxRows * kAmxRows;
    run_blocks_amx(p, done, first, last);
  }
#endif
  const BlockFn full = block_fn(p.group, p.bits, kMaxBatch), tail = block_fn(p.group, p.bits, p.m % kMaxBatch);
  for (int64_t b = first; b < last; ++b) {
    for (int64_t m0 = done; m0 < p.m; m0 += kMaxBatch) {
      const Activations a{p.q + m0 * p.k, p.scale + m0 * p.groups, p.sum + m0 * p.groups};
      const int64_t rows = std::min(kMaxBatch, p.m - m0);
      float* out = p.y + m0 * p.n + b * kRows;
      const Half16* sb = p.scales + b * scale_halves_per_block(p.bits, p.groups);
      (rows == kMaxBatch ? full : tail)(p.weight + b * p.block_bytes, sb, a, p.groups, p.k, out, p.n);
    }
  }
}

// Activation bytes (int8, K per row) of one row tile: a tall problem (a prefill chunk) runs its
// rows in tiles that stay in L2 while a thread's weight blocks pass over them, instead of
// streaming all M rows from L3 again for every block of 16 outputs. 384 KB (within the 1 MB L2 of
// Zen 4 beside the weight block and the outputs; Intel's server cores have 1-2 MB) measured best
// of 256 / 384 / 512 KB on a 2-core EPYC: 3B-shaped q4k and q6k matmuls of 512 rows 1-6 % faster
// (docs/BENCHMARKS.md).
constexpr int64_t kActivationTileBytes = 384 * 1024;
// Tile rows are a multiple of this: whole passes of every inner loop (kMaxBatch, kSuperBatch).
constexpr int64_t kTileRowMultiple = 16;

// Rows per tile for inputs of length k (at least kTileRowMultiple).
inline int64_t tile_rows(int64_t k) {
  return std::max(kTileRowMultiple, kActivationTileBytes / k / kTileRowMultiple * kTileRowMultiple);
}

// Rows m0..m0+rows-1 of p as a problem of their own.
inline Problem row_tile(const Problem& p, int64_t m0, int64_t rows) {
  Problem t = p;
  t.m = rows;
  t.q = p.q + m0 * p.k;
  t.y = p.y + m0 * p.n;
  if (p.per_super) {
    t.scale = p.scale + m0 * (p.k / kSuperInputs);
    t.sums = p.sums + m0 * p.groups;
  } else {
    t.scale = p.scale + m0 * p.groups;
    t.sum = p.sum + m0 * p.groups;
  }
  return t;
}

// y for weight blocks first..last-1 (the unit the caller's threads split), in row tiles where M
// is tall. Each row's arithmetic is the same in any tile, so tiling changes no output bit. Not
// where AMX takes the rows: its tiles' blocking was measured untiled, and no AMX CPU was at hand
// to measure it tiled.
inline void run_blocks(const Problem& p, int64_t first, int64_t last) {
  const int64_t tile = tile_rows(p.k);
  bool amx = false;
#ifdef LLMC_QMATMUL_AMX
  amx = !p.per_super && p.m >= kAmxMinRows && amx_usable();
#endif
  if (p.m <= tile || amx) return run_blocks_untiled(p, first, last);
  for (int64_t m0 = 0; m0 < p.m; m0 += tile) run_blocks_untiled(row_tile(p, m0, std::min(tile, p.m - m0)), first, last);
}

// Whether this library's matmul runs kAmxMinRows rows and more on AMX in this process.
inline bool uses_amx() {
#ifdef LLMC_QMATMUL_AMX
  return amx_usable();
#else
  return false;
#endif
}

// Whether this library runs the bf16 path (qmatmul_amx.h) in this process.
inline bool has_bf16_path() {
#ifdef LLMC_QMATMUL_AMX
  return amx_bf16_usable();
#else
  return false;
#endif
}

// The bf16 path for blocks first..last-1 (see run_blocks_bf16); the caller checked has_bf16_path().
inline void run_bf16(const Problem& p, const uint16_t* xb, int64_t rows, int64_t first, int64_t last) {
#ifdef LLMC_QMATMUL_AMX
  run_blocks_bf16(p, xb, rows, first, last);
#else
  (void)p, (void)xb, (void)rows, (void)first, (void)last;
#endif
}

}  // namespace llmc_qmatmul
