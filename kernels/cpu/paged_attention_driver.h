// The ISA-neutral part of the paged decode attention (semantics: paged_attention_cpu.cpp): the
// checks of the block tables, the rows of each (sequence, KV head) and the call of the ISA's inner
// loop. Torch-free: paged_attention_cpu.cpp wraps it in the torch op, and the ARM test harness
// (tests/kernels/cpu/arm/harness.cpp) runs this very code under qemu without libtorch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

// The inner loop (`attend`) for the ISA this file is compiled for, see qmatmul_driver.h.
#if defined(__AVX512F__)
#include "paged_attention_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "paged_attention_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "paged_attention_neon.h"
#else
#error "no inner loop of the paged attention for this instruction set"
#endif

namespace llmc_attention {

using AttendFn = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, float, float*, float*);

template <int kVecs>
AttendFn attend_for_group(int64_t group) {
  switch (group) {
    case 1: return &attend<kVecs, 1>;
    case 2: return &attend<kVecs, 2>;
    case 3: return &attend<kVecs, 3>;
    case 4: return &attend<kVecs, 4>;
    case 5: return &attend<kVecs, 5>;
    case 6: return &attend<kVecs, 6>;
    case 7: return &attend<kVecs, 7>;
    case 8: return &attend<kVecs, 8>;
    default: return nullptr;
  }
}

// The inner loop for head dimension d and `group` query heads per KV head; nullptr where none is built.
inline AttendFn attend_fn(int64_t d, int64_t group) {
  return d == 64 ? attend_for_group<64 / kLanes>(group) : d == 128 ? attend_for_group<128 / kLanes>(group) : nullptr;
}

// Why the lengths or block tables [batch, width] do not fit a cache of `cache_blocks` blocks, or
// nullptr: what the compiled step trusts must hold here too.
inline const char* table_error(const int64_t* tables, const int64_t* lens, int64_t batch, int64_t width,
                               int64_t block_size, int64_t cache_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    // Compared by division: no product of a stranger's values can overflow.
    if (!(lens[b] >= 1 && (lens[b] - 1) / block_size < width)) return "a length is outside its table";
    for (int64_t j = 0; j <= (lens[b] - 1) / block_size; ++j)
      if (!(tables[b * width + j] >= 0 && tables[b * width + j] < cache_blocks)) return "a block id is outside the cache";
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

// Tasks first..last-1, task = b * kv_heads + h (the unit the caller's threads split); `scores` and
// `rows` are the thread's scratch.
inline void run_tasks(const Problem& p, int64_t first, int64_t last, std::vector<float>& scores,
                      std::vector<int64_t>& rows) {
  const int64_t group = p.heads / p.kv_heads;
  for (int64_t task = first; task < last; ++task) {
    const int64_t b = task / p.kv_heads, h = task % p.kv_heads, n = p.lens[b];
    const int64_t start = p.window > 0 ? std::max<int64_t>(0, n - p.window) : 0, count = n - start;
    rows.resize(count);
    int64_t block = start / p.block_size, offset = start % p.block_size;
    for (int64_t i = 0; i < count; ++i) {  // row of each position: (slot * kv_heads + h)
      rows[i] = (p.tables[b * p.width + block] * p.block_size + offset) * p.kv_heads + h;
      if (++offset == p.block_size) offset = 0, ++block;
    }
    scores.resize(group * count);
    p.run(p.q + (b * p.heads + h * group) * p.d, p.keys, p.values, rows.data(), count, p.scale, scores.data(),
          p.out + (b * p.heads + h * group) * p.d);
  }
}

}  // namespace llmc_attention
