// The quantized matmul on AMX (Intel's tile registers, Sapphire Rapids and later), in two paths.
//
// The int8 path, for kAmxMinRows activation rows and more (prefill chunks, big batches). It computes
// exactly what the AVX-512 VNNI loops compute (qmatmul_avx512.h): `tdpbsud` adds the same s8 x u8
// products into int32 as `vpdpbusd` does, per group of inputs, and every group's float32 scaling
// is the same operations in the same order. So the outputs are bit-identical to the VNNI path's,
// and what the VNNI path's tests prove of it holds here (tests/kernels/cpu/test_qmatmul_amx.py).
//
// Why it is faster: the VNNI loop unpacks a block's weights again for every 4 activation rows
// and issues one 64-MAC `vpdpbusd` per 4 inputs and 16 outputs; here a block is unpacked once
// into the tile layout, and one `tdpbsud` multiplies 16 activation rows by 16 outputs over a whole
// group (8192 MACs for a group of 32). What remains on the vector units is each group's scaling,
// which a scale per group of 32 inputs makes as costly as the tile work: measured on a 2-core
// Xeon VM, 1.1-1.4x the VNNI loops' rate on 3B-sized matrices from 64 rows on, no faster at 16
// rows (kAmxMinRows) nor on SmolLM2's small ones (docs/BENCHMARKS.md, llmc.benchmarks.amx).
//
// The bf16 path (run_blocks_bf16, the op qmatmul_bf16): the dense copies' arithmetic on weights
// dequantized per block, for many rows where no dense copy is kept; see its section below.
//
// Compiled into the AVX-512 library only, with the AMX instructions enabled per function (the
// library's own flags stay those of AVX-512 VNNI); they run only where the CPU reports AMX and
// Linux grants the process the tile state (amx_usable()), and `$LLMC_CPU_AMX=0` turns both off.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels_api.h"
#include "qmatmul_common.h"

namespace llmc_qmatmul {

constexpr int64_t kAmxRows = 16;  // activation rows per tile (an int8 tile holds 16 rows)
// The fewest rows the AMX path takes: at 16 it measured as fast as the VNNI loops, at 32 up to
// 1.2x, from 64 on 1.2-1.4x (the 2-core Xeon VM of docs/BENCHMARKS.md, AMX vs VNNI alternated).
constexpr int64_t kAmxMinRows = 32;

// Linux's arch_prctl request for the AMX tile data state (asm/prctl.h, asm/fpu/xstate.h): a
// process must ask for it before its first tile instruction, or that instruction faults.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;
// CPUID leaf 7's EDX bits for the tile registers and their int8 multiplier.
constexpr unsigned kCpuidAmxTile = 1u << 24;
constexpr unsigned kCpuidAmxInt8 = 1u << 25;
constexpr unsigned kCpuidAmxBf16 = 1u << 22;
// CPUID leaf 7, subleaf 1's EAX bit for AVX512_BF16 (the conversion to bf16 pairs).
constexpr unsigned kCpuidAvx512Bf16 = 1u << 5;

// Whether this process may run the AMX path: the CPU has AMX-TILE and AMX-INT8, Linux granted the
// tile state, and $LLMC_CPU_AMX is not "0". Decided once per process.
inline bool amx_usable() {
  static const bool usable = [] {
    const char* env = std::getenv("LLMC_CPU_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    if ((d & kCpuidAmxTile) == 0 || (d & kCpuidAmxInt8) == 0) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

// Whether the bf16 path (run_blocks_bf16) may run: the int8 path's conditions, and the CPU's
// AMX-BF16 and AVX512-BF16.
inline bool amx_bf16_usable() {
  static const bool usable = [] {
    if (!amx_usable()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0 || (d & kCpuidAmxBf16) == 0) return false;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && (a & kCpuidAvx512Bf16) != 0;
  }();
  return usable;
}

// The tile configuration (palette 1): tiles 0-1 hold int32 sums [16 rows x 16 outputs], 4-5 the
// activations [16 rows x G bytes], 6-7 the weights [G / 4 rows x 64 bytes: 16 outputs x 4 inputs];
// each pair takes turns (amx_rows). Tiles 2-3 are left unconfigured.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) inline void configure_tiles(int64_t group) {
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) {  // sums
    cfg.colsb[t] = 64;
    cfg.rows[t] = kAmxRows;
  }
  for (int t = 4; t < 6; ++t) {  // activations
    cfg.colsb[t] = static_cast<uint16_t>(group);
    cfg.rows[t] = kAmxRows;
  }
  for (int t = 6; t < 8; ++t) {  // weights
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(group / 4);
  }
  // GCC 12 at -O2 dropped some of the stores above as if `ldtilecfg` did not read them (seen in
  // the debugger: colsb of tiles 0-3 left zero, and the instruction faulting): the barrier says
  // the memory is read.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// One block's weights in the tile layout and its per-group float32 factors, as the VNNI loops make
// them: per group, G / 4 rows of 64 bytes (row t: for each of the 16 outputs, its inputs 4t..4t+3
// as u8), then `scale` and `offset` (16 floats each; the q6k form has no offset).
struct UnpackedBlock {
  std::vector<uint8_t> values;
  std::vector<float> factors;  // [groups][2][16]
};

// The block's values and factors, for every form the VNNI loops take.
inline void unpack_block(const uint8_t* w, const Half16* sc, int64_t groups, int64_t group, int64_t bits,
                         UnpackedBlock& out) {
  out.values.resize(static_cast<size_t>(groups * group * kRows));
  out.factors.resize(static_cast<size_t>(groups * 2 * kRows));
  uint8_t* u = out.values.data();
  float* f = out.factors.data();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  if (bits == kQ6KBits) {
    const __m512i top = _mm512_set1_epi8(0x30);
    constexpr int kOrAnd = 0xF8;  // a | (b & c), as in q6k_rows
    for (int64_t s = 0; s < groups / kQ6KGroups; ++s) {
      const uint8_t* ws = w + s * kQ6KSuperBytes;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + s * kRows)));
      for (int g = 0; g < kQ6KGroups; ++g) {
        const int64_t gi = s * kQ6KGroups + g;
        const __m512i v0 = _mm512_loadu_si512(ws + g * 128), v1 = _mm512_loadu_si512(ws + g * 128 + 64);
        const __m512i h = _mm512_loadu_si512(ws + kQ6KLowBytes + g * 64);
        uint8_t* ug = u + gi * kQ6KGroup * kRows;
        _mm512_storeu_si512(ug, _mm512_ternarylogic_epi32(_mm512_and_si512(v0, nibble), _mm512_slli_epi16(h, 4), top,
                                                          kOrAnd));
        _mm512_storeu_si512(ug + 64, _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble),
                                                               _mm512_slli_epi16(h, 2), top, kOrAnd));
        _mm512_storeu_si512(ug + 128, _mm512_ternarylogic_epi32(_mm512_and_si512(v1, nibble), h, top, kOrAnd));
        _mm512_storeu_si512(ug + 192, _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble),
                                                                _mm512_srli_epi16(h, 2), top, kOrAnd));
        const auto* sub = reinterpret_cast<const __m128i*>(ws + kQ6KLowBytes + kQ6KHighBytes + g * kRows);
        _mm512_storeu_ps(f + gi * 2 * kRows,
                         _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sub)))));
      }
    }
    return;
  }
  if (bits == kQ4KBits) {
    for (int64_t s = 0; s < groups / kQ4KGroups; ++s) {
      const uint8_t* ws = w + s * kQ4KSuperBytes;
      const Q4KSuper super = q4k_super(sc, s);
      for (int g = 0; g < kQ4KGroups; ++g) {
        const int64_t gi = s * kQ4KGroups + g;
        uint8_t* ug = u + gi * kQ4KGroup * kRows;
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512(ws + g * 256 + c * 64);
          _mm512_storeu_si512(ug + c * 128, _mm512_and_si512(v, nibble));
          _mm512_storeu_si512(ug + c * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
        __m512 scale, offset;
        q4k_group_factors(ws, g, super, scale, offset);
        _mm512_storeu_ps(f + gi * 2 * kRows, scale);
        _mm512_storeu_ps(f + gi * 2 * kRows + kRows, offset);
      }
    }
    return;
  }
  const int64_t group_bytes = kRows * group * bits / 8;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * group_bytes;
    uint8_t* ug = u + g * group * kRows;
    if (bits == 4) {
      for (int64_t c = 0; c < group_bytes / 64; ++c) {
        const __m512i v = _mm512_loadu_si512(wg + c * 64);
        _mm512_storeu_si512(ug + c * 128, _mm512_and_si512(v, nibble));
        _mm512_storeu_si512(ug + c * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
      }
    } else {
      std::memcpy(ug, wg, static_cast<size_t>(group_bytes));  // bits 8: already the tile layout
    }
    const auto* s16 = reinterpret_cast<const __m256i*>(sc + g * 2 * kRows);
    _mm512_storeu_ps(f + g * 2 * kRows, _mm512_cvtph_ps(_mm256_loadu_si256(s16)));
    _mm512_storeu_ps(f + g * 2 * kRows + kRows, _mm512_cvtph_ps(_mm256_loadu_si256(s16 + 1)));
  }
}

// Rows of one group's int32 sums (tile rows 16 x 16 outputs) scaled into the accumulators acc
// (float32 [16 rows][16 outputs], in memory), the VNNI loops' float operations.
template <bool kQ6K>
[[gnu::always_inline]] inline void scale_rows(const int32_t* dots, const float* factors, const Activations& a,
                                              int64_t m0, int64_t groups, int64_t g, float* acc) {
  const __m512 scale = _mm512_loadu_ps(factors);
  const __m512 offset = _mm512_loadu_ps(factors + kRows);
  for (int r = 0; r < kAmxRows; ++r) {
    const int64_t i = (m0 + r) * groups + g;
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots + r * kRows));
    const __m512 before = _mm512_load_ps(acc + r * kRows);
    __m512 after;
    if constexpr (kQ6K) {
      const __m512 centred = _mm512_sub_ps(dot, _mm512_set1_ps(kQ6KBias * a.sum[i]));
      after = _mm512_fmadd_ps(centred, _mm512_mul_ps(scale, _mm512_set1_ps(a.scale[i])), before);
    } else {
      const __m512 t = _mm512_fmadd_ps(scale, dot, _mm512_mul_ps(offset, _mm512_set1_ps(a.sum[i])));
      after = _mm512_fmadd_ps(t, _mm512_set1_ps(a.scale[i]), before);
    }
    _mm512_store_ps(acc + r * kRows, after);
  }
}

// 16 activation rows from m0 times one unpacked block: y[m0..m0+15][16 outputs]. Two software
// pipelines: the tiles of group g + 1 are multiplied (tiles 0 and 1 take turns) while group g's
// sums are stored, and group g - 1's sums, stored one step earlier, are scaled meanwhile: loads
// of what a tile store has just written wait for it to complete.
template <bool kQ6K>
__attribute__((target("amx-tile,amx-int8"))) void amx_rows(const UnpackedBlock& block, const Activations& a,
                                                           int64_t m0, int64_t groups, int64_t group, int64_t k,
                                                           float* y, int64_t ldy) {
  alignas(64) int32_t dots[2][kAmxRows * kRows];
  alignas(64) float acc[kAmxRows * kRows] = {};
  const uint8_t* u = block.values.data();
  const float* f = block.factors.data();
  const int8_t* x = a.q + m0 * k;  // packed: this tile's groups, 16 x G bytes each
  const int64_t tile_bytes = kAmxRows * group, values_per_group = group * kRows;
  _tile_loadd(4, x, group);
  _tile_loadd(6, u, 64);
  _tile_zero(0);
  _tile_dpbsud(0, 4, 6);
  for (int64_t g = 0; g < groups; g += 2) {
    const bool odd = g + 1 < groups;
    if (odd) {
      _tile_loadd(5, x + (g + 1) * tile_bytes, group);
      _tile_loadd(7, u + (g + 1) * values_per_group, 64);
      _tile_zero(1);
      _tile_dpbsud(1, 5, 7);
    }
    _tile_stored(0, dots[0], 64);
    if (g > 0) scale_rows<kQ6K>(dots[1], f + (g - 1) * 2 * kRows, a, m0, groups, g - 1, acc);
    if (!odd) {
      scale_rows<kQ6K>(dots[0], f + g * 2 * kRows, a, m0, groups, g, acc);
      break;
    }
    if (g + 2 < groups) {
      _tile_loadd(4, x + (g + 2) * tile_bytes, group);
      _tile_loadd(6, u + (g + 2) * values_per_group, 64);
      _tile_zero(0);
      _tile_dpbsud(0, 4, 6);
    }
    _tile_stored(1, dots[1], 64);
    scale_rows<kQ6K>(dots[0], f + g * 2 * kRows, a, m0, groups, g, acc);
    if (g + 2 >= groups) scale_rows<kQ6K>(dots[1], f + (g + 1) * 2 * kRows, a, m0, groups, g + 1, acc);
  }
  for (int r = 0; r < kAmxRows; ++r) _mm512_storeu_ps(y + r * ldy, _mm512_load_ps(acc + r * kRows));
}

// Blocks first..last-1 for the activations' first `rows` rows, a multiple of 16 (the caller runs
// the rest on the VNNI loops). Each block is unpacked once, here, for all the tiles.
__attribute__((target("amx-tile,amx-int8"))) inline void run_blocks_amx(const Problem& p, int64_t rows, int64_t first,
                                                                         int64_t last) {
  thread_local UnpackedBlock block;
  thread_local std::vector<int8_t> packed;
  configure_tiles(p.group);
  // The activations regrouped per tile: for tile t and group g, its 16 rows' G values in a row
  // (16 x G bytes), so that a tile load reads whole lines instead of 16 strided half lines.
  packed.resize(static_cast<size_t>(rows * p.k));
  for (int64_t t = 0; t < rows / kAmxRows; ++t)
    for (int64_t g = 0; g < p.groups; ++g)
      for (int64_t r = 0; r < kAmxRows; ++r)
        std::memcpy(packed.data() + ((t * p.groups + g) * kAmxRows + r) * p.group,
                    p.q + (t * kAmxRows + r) * p.k + g * p.group, static_cast<size_t>(p.group));
  const Activations a{packed.data(), p.scale, p.sum};
  for (int64_t b = first; b < last; ++b) {
    unpack_block(p.weight + b * p.block_bytes, p.scales + b * scale_halves_per_block(p.bits, p.groups), p.groups,
                 p.group, p.bits, block);
    for (int64_t m0 = 0; m0 < rows; m0 += kAmxRows) {
      float* out = p.y + m0 * p.n + b * kRows;
      if (p.bits == kQ6KBits) {
        amx_rows<true>(block, a, m0, p.groups, p.group, p.k, out, p.n);
      } else {
        amx_rows<false>(block, a, m0, p.groups, p.group, p.k, out, p.n);
      }
    }
  }
  _tile_release();
}

// ---- The bf16 path (qmatmul_bf16): the weights dequantized per block into bf16 -------------------
//
// y = bf16(x) @ bf16(w)^T with float32 sums over all of K, w = scale * u + offset in float32 as
// the dense copies compute it (kernels/cpu/qmatmul_cpu.py), then rounded to bf16: the dense
// copies' arithmetic, without keeping a copy. No per-group scaling is left for the vector units,
// so the tile unit sets the pace; the int8 path stays exact to its own reference and is the one
// for few rows (where to switch is the caller's choice).

constexpr int64_t kBf16Inputs = 32;  // inputs per tile product: 16 pairs of bf16
// The most activation bytes (rows x K bf16) one pass over the blocks reads: half of a 2 MB L2, so
// that every block's pass finds them there; a 512-row prefill's activations alone are 3 MB at
// K = 3072. Each block is dequantized again per chunk.
constexpr int64_t kBf16ChunkBytes = 1 << 20;

// Every tile 16 rows of 64 bytes (bf16_tile_products): 0-3 float32 sums [16 rows x 16 outputs],
// 4-5 bf16 activations [16 rows x 32 inputs], 6-7 bf16 weights [16 pairs of inputs x 16 outputs x 2].
__attribute__((target("amx-tile"))) inline void configure_bf16_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kAmxRows;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // see configure_tiles
  _tile_loadconfig(&cfg);
}

// An unpacked block (unpack_block) as bf16 tile rows: for input pair j (inputs 2j, 2j + 1), 16
// outputs x 2 bf16; out holds K / 2 rows of 32 uint16.
__attribute__((target("avx512bf16,avx512bw,avx512f"))) inline void dequantize_bf16(
    const UnpackedBlock& block, int64_t groups, int64_t group, bool q6k, uint16_t* out) {
  const __m512i byte = _mm512_set1_epi32(0xFF);
  alignas(64) uint16_t order[32];  // (a[n], b[n]) for n < 16 from [a[0..15], b[0..15]]
  for (int n = 0; n < 16; ++n) {
    order[2 * n] = static_cast<uint16_t>(n);
    order[2 * n + 1] = static_cast<uint16_t>(16 + n);
  }
  const __m512i pairs = _mm512_load_si512(order);
  const __m512 bias = _mm512_set1_ps(-kQ6KBias);
  for (int64_t g = 0; g < groups; ++g) {
    const float* f = block.factors.data() + g * 2 * kRows;
    const __m512 scale = _mm512_loadu_ps(f);
    // q6k: scale * (u - 32) = u * scale - 32 * scale, exactly, before the one rounding.
    const __m512 offset = q6k ? _mm512_mul_ps(bias, scale) : _mm512_loadu_ps(f + kRows);
    for (int64_t t = 0; t < group / 4; ++t) {  // 4 inputs per row of the unpacked block
      const __m512i v = _mm512_loadu_si512(block.values.data() + (g * group / 4 + t) * 64);
      __m512 w[4];
      for (int j = 0; j < 4; ++j) {
        const __m512 u = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * j), byte));
        w[j] = _mm512_fmadd_ps(u, scale, offset);
      }
      uint16_t* row = out + (g * group / 2 + 2 * t) * 32;
      _mm512_storeu_si512(row, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0])));
      _mm512_storeu_si512(row + 32, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2])));
    }
  }
}

// Tile products of one or two dequantized blocks (`w0`, `w1`: dequantize_bf16's layout; `w1` null
// for one) with the activation tiles of rows m0..r1-1, into y. Two blocks and two activation tiles
// at a time, the four sums in tiles 0-3, the activations in 4-5 and the weights in 6-7: four tile
// loads per four products, where one block with two activation tiles took three per two. The
// loads, not the products, set the pace once the tiles come from L2.
__attribute__((target("amx-tile,amx-bf16"))) inline void bf16_tile_products(const Problem& p, const uint16_t* xb,
                                                                           const uint16_t* w0, const uint16_t* w1,
                                                                           int64_t b, int64_t m0, int64_t r1) {
  const int64_t steps = p.k / kBf16Inputs, tile = kAmxRows * kBf16Inputs;  // tile: uint16 per tile
  const int64_t ldy = p.n * static_cast<int64_t>(sizeof(float));
  float* y = p.y + b * kRows;
  for (; m0 < r1; m0 += 2 * kAmxRows) {
    const uint16_t* a0 = xb + m0 / kAmxRows * steps * tile;
    const uint16_t* a1 = a0 + steps * tile;
    const bool two_tiles = m0 + kAmxRows < r1;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (w1 != nullptr && two_tiles) {
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(6, w0 + s * tile, 64);
        _tile_loadd(4, a0 + s * tile, 64);
        _tile_loadd(7, w1 + s * tile, 64);
        _tile_loadd(5, a1 + s * tile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    } else if (w1 != nullptr) {  // one activation tile, two blocks
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, a0 + s * tile, 64);
        _tile_loadd(6, w0 + s * tile, 64);
        _tile_loadd(7, w1 + s * tile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
    } else if (two_tiles) {  // two activation tiles, one block
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(6, w0 + s * tile, 64);
        _tile_loadd(4, a0 + s * tile, 64);
        _tile_loadd(5, a1 + s * tile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
      }
    } else {
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(6, w0 + s * tile, 64);
        _tile_loadd(4, a0 + s * tile, 64);
        _tile_dpbf16ps(0, 4, 6);
      }
    }
    _tile_stored(0, y + m0 * p.n, ldy);
    if (w1 != nullptr) _tile_stored(1, y + m0 * p.n + kRows, ldy);
    if (two_tiles) {
      _tile_stored(2, y + (m0 + kAmxRows) * p.n, ldy);
      if (w1 != nullptr) _tile_stored(3, y + (m0 + kAmxRows) * p.n + kRows, ldy);
    }
  }
}

// Blocks first..last-1 times the activations `xb`, bf16 packed per tile of 16 rows and 32 inputs
// ([rows / 16][K / 32][16][32]; rows a multiple of 16, zeros past the real ones), into y [rows, N].
// The blocks go in pairs (bf16_tile_products), the last one alone where their count is odd.
__attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512f"))) inline void run_blocks_bf16(
    const Problem& p, const uint16_t* xb, int64_t rows, int64_t first, int64_t last) {
  thread_local UnpackedBlock block;
  thread_local std::vector<uint16_t> wb;
  const int64_t block_values = p.k * kRows;  // one dequantized block, in uint16
  wb.resize(static_cast<size_t>(2 * block_values));
  configure_bf16_tiles();
  // A chunk's activations (kBf16ChunkBytes) and two dequantized blocks (2 x K x 32 bytes) share a
  // 2 MB L2: 1.5 MB at K = 8192; a much larger K spills some of them (slower, not wrong).
  const int64_t chunk = std::max(2 * kAmxRows, kBf16ChunkBytes / (2 * p.k) / (2 * kAmxRows) * (2 * kAmxRows));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    for (int64_t b = first; b < last; b += 2) {
      const bool pair = b + 1 < last;
      for (int64_t i = 0; i < (pair ? 2 : 1); ++i) {
        unpack_block(p.weight + (b + i) * p.block_bytes,
                     p.scales + (b + i) * scale_halves_per_block(p.bits, p.groups), p.groups, p.group, p.bits, block);
        dequantize_bf16(block, p.groups, p.group, p.bits == kQ6KBits, wb.data() + i * block_values);
      }
      bf16_tile_products(p, xb, wb.data(), pair ? wb.data() + block_values : nullptr, b, r0, r1);
    }
  }
  _tile_release();
}

}  // namespace llmc_qmatmul
