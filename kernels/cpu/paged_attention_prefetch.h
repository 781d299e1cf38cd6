// Prefetching the cache rows a decode attention reads next (paged_attention_avx2.h,
// paged_attention_avx512.h). A batch's KV cache is far larger than the CPU's caches and each row
// is read once per step (SmolLM2, 16 sequences of 125 positions: 88 MB of float32 keys and values
// per step), so the attention waits on memory; the rows of one (sequence, KV head) are a head's
// width apart inside a block and blocks are scattered, and the hardware prefetcher does not run
// far enough ahead. On the 2-core EPYC of docs/BENCHMARKS.md (AVX2 forced) the 30 layers'
// attention of that batch took 3.7 ms without prefetching and 2.4 ms with these distances, 1.4 ms
// when the cache fits in L2. Into L2 on AMD, as the matmuls' prefetches (qmatmul_common.h
// kPrefetchToL2): on that EPYC, 16 sequences of 512 positions (30 layers of SmolLM2's shape, 377 MB
// of keys and values) took a median 18-21 ms against 26-30 ms with L1 prefetches (AVX-512; AVX2
// 19 against 28-29), three alternated runs each (docs/BENCHMARKS.md); twice these distances into L2
// did no better. The NEON loop (paged_attention_neon.h) does not prefetch: ARM is unmeasured.
#pragma once

#include <algorithm>
#include <cstdint>

#include "qmatmul_common.h"

namespace llmc_attention {

constexpr int64_t kLineFloats = 16;   // floats per 64-byte cache line
constexpr int64_t kKeysAhead = 16;    // positions between the key being scored and the one fetched
constexpr int64_t kValuesAhead = 24;  // the same for the values' weighted sum (less work per row)

// Ask for rows[first..last) (clipped to count) of `base`, d floats each, to be brought near (L1, or L2 on AMD).
inline void prefetch_rows(const float* base, const int64_t* rows, int64_t first, int64_t last, int64_t count,
                          int64_t d) {
  for (int64_t i = first; i < std::min(last, count); ++i)
    for (int64_t j = 0; j < d; j += kLineFloats) llmc_qmatmul::prefetch_ahead(base + rows[i] * d + j);
}

}  // namespace llmc_attention
