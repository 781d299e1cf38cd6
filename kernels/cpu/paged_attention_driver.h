// The ISA-neutral part of the paged decode attention (semantics: paged_attention_cpu.cpp): the
// checks of the block tables, the rows of each (sequence, KV head) and the call of the ISA's inner
// loop. Torch-free: kernels_isa.cpp compiles it per ISA for the torch op (paged_attention_cpu.cpp), and the ARM test harness
// (tests/kernels/cpu/arm/harness.cpp) runs this very code under qemu without libtorch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels_api.h"

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
