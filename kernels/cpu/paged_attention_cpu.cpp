// Decode attention over the paged KV cache on CPUs (AVX-512, AVX2 or ARM64 NEON, one library per
// ISA; the torch op around paged_attention_driver.h, reached through kernels_api.h): one query per
// sequence, read from the cache in place (no gathered copy of the keys and values, which the plain-torch path makes).
//
// Each (sequence, KV head) is computed on its own, in a fixed order, whatever else is in the
// batch: the result of a sequence does not depend on the batch it runs in, nor on the padding of
// a compiled step's bucket (torch's fused CPU attention differs in the last bit between batch
// sizes, which int8-quantized activations turn into different tokens). The plain-torch reference
// is kernels/paged_attention.py `decode_attention`.
//
// q [B, H, D], caches [slots, Hkv, D] (float32, D = 64 or 128, H / Hkv <= 8), block_tables [B, W] int64,
// context_lens [B] int64; token t of sequence b is at slot table[b][t / bs] * bs + t % bs. With
// `window` > 0 a query sees only the last `window` positions. Returns [B, H, D] float32.

#include <cstdint>
#include <vector>

#include "kernels_api.h"
#include "torch_stable.h"

namespace {

llmc_torch::Tensor paged_decode_attention(llmc_torch::Tensor q, llmc_torch::Tensor k_cache, llmc_torch::Tensor v_cache,
                                          llmc_torch::Tensor block_tables, llmc_torch::Tensor context_lens,
                                          int64_t block_size, double scale, int64_t window) {
  using llmc_torch::ScalarType;
  STD_TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode_attention: bad ranks");
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::Float && k_cache.scalar_type() == ScalarType::Float &&
                      v_cache.scalar_type() == ScalarType::Float,
                  "paged_decode_attention: float32 only");
  STD_TORCH_CHECK(block_tables.scalar_type() == ScalarType::Long && context_lens.scalar_type() == ScalarType::Long,
                  "paged_decode_attention: int64 tables and lengths");
  STD_TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1,
                  "paged_decode_attention: block_tables [B, W] and context_lens [B]");
  STD_TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t slots = k_cache.size(0), kv_heads = k_cache.size(1);
  STD_TORCH_CHECK(k_cache.size(2) == d && v_cache.size(0) == slots && v_cache.size(1) == kv_heads && v_cache.size(2) == d,
                  "paged_decode_attention: caches do not match q");
  STD_TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "paged_decode_attention: heads must be a multiple of kv heads");
  const llmc_attention::AttendFn run = llmc_attention::attend_fn_isa(d, heads / kv_heads);
  STD_TORCH_CHECK(run != nullptr, "paged_decode_attention: head_dim 64 or 128 and up to 8 query heads per kv head");
  STD_TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch && block_size > 0,
                  "paged_decode_attention: one table and length per sequence");
  const llmc_torch::Tensor qc = llmc_torch::contiguous(q), tables = llmc_torch::contiguous(block_tables),
                           lens = llmc_torch::contiguous(context_lens);
  const int64_t width = tables.size(1);
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t cache_blocks = slots / block_size;
  const char* error = llmc_attention::table_error(tp, lp, batch, width, block_size, cache_blocks);
  STD_TORCH_CHECK(error == nullptr, "paged_decode_attention: ", error);
  llmc_torch::Tensor out = llmc_torch::empty_float({batch, heads, d});
  const llmc_attention::Problem p{run,
                                  qc.const_data_ptr<float>(),
                                  k_cache.const_data_ptr<float>(),
                                  v_cache.const_data_ptr<float>(),
                                  tp,
                                  lp,
                                  out.mutable_data_ptr<float>(),
                                  heads,
                                  kv_heads,
                                  d,
                                  width,
                                  block_size,
                                  window,
                                  static_cast<float>(scale)};
  torch::stable::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    llmc_attention::run_tasks_isa(p, first, last, scores, rows);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(llmc, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "int block_size, float scale, int window) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention)); }
