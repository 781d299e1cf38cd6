// The kernels of one ISA's library: the drivers (qmatmul_driver.h, paged_attention_driver.h)
// compiled with that ISA's flags (kernels/cpu/cpu_kernels.py ISAS), behind kernels_api.h, for the
// torch ops to call. No torch headers: this compiles in about a second per ISA.

#include "half_matmul_driver.h"
#include "kernels_api.h"
#include "paged_attention_driver.h"
#include "qmatmul_driver.h"

namespace llmc_qmatmul {

void quantize_activations_isa(const float* x, int64_t count, int64_t group, int8_t* q, float* scale, float* sum) {
  quantize_activations(x, count, group, q, scale, sum);
}

void run_blocks_isa(const Problem& p, int64_t first, int64_t last) { run_blocks(p, first, last); }

bool superblock_activations_isa() { return superblock_activations(); }

void quantize_superblocks_isa(const float* x, int64_t count, int64_t sub, int8_t* q, float* scale, int16_t* sums) {
  quantize_superblocks(x, count, sub, q, scale, sums);
}

bool uses_amx_isa() { return uses_amx(); }

bool prefetches_to_l2_isa() { return kPrefetchToL2; }

bool has_bf16_path_isa() { return has_bf16_path(); }

void run_bf16_isa(const Problem& p, const uint16_t* xb, int64_t rows, int64_t first, int64_t last) {
  run_bf16(p, xb, rows, first, last);
}

}  // namespace llmc_qmatmul

namespace llmc_attention {

AttendFn attend_fn_isa(int64_t d, int64_t group) { return attend_fn(d, group); }

void run_tasks_isa(const Problem& p, int64_t first, int64_t last, std::vector<float>& scores,
                   std::vector<int64_t>& rows) {
  run_tasks(p, first, last, scores, rows);
}

}  // namespace llmc_attention

namespace llmc_half {

void run_tiles_isa(const Problem& p, int64_t first, int64_t last) { run_tiles(p, first, last); }

}  // namespace llmc_half
