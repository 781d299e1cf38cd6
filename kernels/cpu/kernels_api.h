// What the torch ops (qmatmul.cpp, paged_attention_cpu.cpp: compiled once, without any ISA's
// flags, since parsing torch's headers is most of a compile) call in the kernels
// (kernels_isa.cpp: compiled once per ISA with its flags, without torch's headers). Each ISA's
// library links the one ops object with its own kernels object. Torch-free and ISA-free.
#pragma once

#include <cstdint>
#include <vector>

#include "qmatmul_common.h"

namespace llmc_qmatmul {

// One matmul's operands, shapes already checked by the caller: weight [blocks, block_bytes],
// scales [blocks, groups, 2, 16] float16 bits, the quantized activations of M rows, y [M, N].
struct Problem {
  const uint8_t* weight;
  const Half16* scales;
  const int8_t* q;
  const float* scale;
  const float* sum;
  float* y;
  int64_t m, k, n, groups, group, bits, block_bytes;
  // A K-quant form's activations quantized per super-block (superblock_activations_isa): then
  // `scale` holds one dx per 256 inputs and `sums` the int sums per `group` inputs; `sum` is unused.
  const int16_t* sums = nullptr;
  bool per_super = false;
};

// qmatmul_driver.h's quantize_activations and run_blocks, as compiled for the library's ISA.
void quantize_activations_isa(const float* x, int64_t count, int64_t group, int8_t* q, float* scale, float* sum);
void run_blocks_isa(const Problem& p, int64_t first, int64_t last);
// Whether this library, in this process, takes the K-quant forms' activations quantized per
// super-block of 256 inputs (qmatmul_driver.h quantize_superblocks), and that quantization.
bool superblock_activations_isa();
void quantize_superblocks_isa(const float* x, int64_t count, int64_t sub, int8_t* q, float* scale, int16_t* sums);
bool uses_amx_isa();  // whether run_blocks_isa takes its biggest problems to AMX in this process
bool prefetches_to_l2_isa();  // where run_blocks_isa's weight prefetches go (qmatmul_common.h)
// The bf16 path (qmatmul_amx.h): whether it runs here, and blocks first..last-1 of it over the
// activations `xb`, bf16 in tiles [rows / 16][K / 32][16][32] (rows a multiple of 16).
bool has_bf16_path_isa();
void run_bf16_isa(const Problem& p, const uint16_t* xb, int64_t rows, int64_t first, int64_t last);

}  // namespace llmc_qmatmul

namespace llmc_attention {

using AttendFn = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, float, float*, float*);

// Why the lengths or block tables [batch, width] do not fit a cache of `cache_blocks` blocks, or
// nullptr: what the compiled step trusts must hold here too.
inline const char* table_error(const int64_t* tables, const int64_t* lens, int64_t batch, int64_t width,
                               int64_t block_size, int64_t cache_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    // Compared by division: no product of a stranger's values can overflow.
    if (!(lens[b] >= 1 && (lens[b] - 1) / block_size < width)) return "a length is outside its table";
    for (int64_t j = 0; j <= (lens[b] - 1) / block_size; ++j)
      if (!(tables[b * width + j] >= 0 && tables[b * width + j] < cache_blocks))
        return "a block id is outside the cache";
  }
  return nullptr;
}

// One decode attention's operands, checked by the caller (table_error, attend_fn).
struct Problem {
  AttendFn run;
  const float* q;       // [B, H, D]
  const float* keys;    // [slots, Hkv, D]
  const float* values;  // [slots, Hkv, D]
  const int64_t* tables;
  const int64_t* lens;
  float* out;  // [B, H, D]
  int64_t heads, kv_heads, d, width, block_size, window;
  float scale;
};

// paged_attention_driver.h's attend_fn and run_tasks, as compiled for the library's ISA.
AttendFn attend_fn_isa(int64_t d, int64_t group);
void run_tasks_isa(const Problem& p, int64_t first, int64_t last, std::vector<float>& scores,
                   std::vector<int64_t>& rows);

}  // namespace llmc_attention

namespace llmc_half {

// One half matmul's operands (half_matmul_driver.h), shapes checked by the caller: x float32
// [m, k], weight [n, k] float16 or bfloat16 bits, y float32 [m, n].
struct Problem {
  const float* x;
  const uint16_t* weight;
  float* y;
  int64_t m, k, n;
  bool bf16;
};

// half_matmul_driver.h's run_tiles (tiles of kHalfTileRows weight rows), as compiled for the library's ISA.
constexpr int64_t kHalfTileRows = 8;
void run_tiles_isa(const Problem& p, int64_t first, int64_t last);

}  // namespace llmc_half
