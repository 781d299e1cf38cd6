// Runs llmc's CPU kernels without torch, for cross-compiled builds tested under qemu-user
// (tests/kernels/cpu/test_arm_neon.py): the very drivers and inner loops the library compiles
// (kernels/cpu/qmatmul_driver.h, paged_attention_driver.h), on inputs the test writes to files.
//
//   harness qmatmul CASE...    CASE/meta: m k scale-groups bits blocks; CASE/x (float32 [m, k]),
//                              CASE/weight (uint8, pack()'s layout), CASE/scales (float16 bits);
//                              writes CASE/y (float32 [m, blocks * 16]).
//   harness attention CASE...  CASE/meta: batch heads kv_heads d slots width block_size window
//                              scale; CASE/q, CASE/k, CASE/v (float32), CASE/tables, CASE/lens
//                              (int64); writes CASE/out (float32 [batch, heads, d]).
//   harness half CASE...       CASE/meta: m k n bf16; CASE/x (float32 [m, k]), CASE/weight
//                              (float16 or bfloat16 bits [n, k]); writes CASE/y (float32 [m, n]).
// Exits 0 when every case ran; 2 with a message on stderr for a malformed case.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "half_matmul_driver.h"
#include "paged_attention_driver.h"
#include "qmatmul_driver.h"

namespace {

// No dimension or element count of a test case comes near this (bounds every size the meta file
// names, so that no product of them overflows).
constexpr int64_t kMaxElements = int64_t{1} << 28;

template <typename T>
std::vector<T> read_array(const std::string& path, int64_t count) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (static_cast<int64_t>(bytes.size()) != count * static_cast<int64_t>(sizeof(T)))
    throw std::runtime_error(path + ": expected " + std::to_string(count) + " elements");
  std::vector<T> out(count);
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(out.data()));
  return out;
}

template <typename T>
void write_array(const std::string& path, const std::vector<T>& values) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * sizeof(T)));
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::vector<int64_t> read_meta(const std::string& dir, size_t ints, double* real = nullptr) {
  std::ifstream in(dir + "/meta");
  std::vector<int64_t> meta(ints);
  for (auto& v : meta) {
    if (!(in >> v) || v < 0 || v > kMaxElements) throw std::runtime_error(dir + "/meta: bad or missing size");
  }
  if (real != nullptr && !(in >> *real)) throw std::runtime_error(dir + "/meta: missing scale");
  return meta;
}

int64_t checked_product(int64_t a, int64_t b) {
  if (a != 0 && b > kMaxElements / a) throw std::runtime_error("case too large");
  return a * b;
}

void run_qmatmul(const std::string& dir) {
  using namespace llmc_qmatmul;
  const auto meta = read_meta(dir, 5);
  const int64_t m = meta[0], k = meta[1], scale_groups = meta[2], bits = meta[3], blocks = meta[4];
  // A K-quant form's scale_groups are its super-blocks of 256 inputs (qmatmul_common.h).
  const bool q6k = bits == kQ6KBits, q4k = bits == kQ4KBits;
  if (scale_groups == 0 || k % scale_groups != 0 || (bits != 4 && bits != 8 && !q6k && !q4k) ||
      (q6k || q4k ? k / scale_groups != 256 : k / scale_groups != 16 && k / scale_groups != 32))
    throw std::runtime_error(dir + ": K must be 16 or 32 per group (256 per super-block for bits 5 and 6) and bits 4, 5, 6 or 8");
  const int64_t groups = q6k ? k / kQ6KGroup : q4k ? k / kQ4KGroup : scale_groups;
  const int64_t group = k / groups, n = checked_product(blocks, kRows);
  const int64_t block_bytes = q6k   ? checked_product(scale_groups, kQ6KSuperBytes)
                              : q4k ? checked_product(scale_groups, kQ4KSuperBytes)
                                    : checked_product(groups, kRows * group * bits / 8);
  const auto x = read_array<float>(dir + "/x", checked_product(m, k));
  const auto weight = read_array<uint8_t>(dir + "/weight", checked_product(blocks, block_bytes));
  const auto scales = read_array<Half16>(dir + "/scales", checked_product(blocks, scale_halves_per_block(bits, groups)));
  std::vector<int8_t> q(m * k);
  std::vector<float> dx(m * groups), sum(m * groups), y(checked_product(m, n));
  quantize_activations(x.data(), m * groups, group, q.data(), dx.data(), sum.data());
  const Problem p{weight.data(), scales.data(), q.data(), dx.data(), sum.data(), y.data(),
                  m, k, n, groups, group, bits, block_bytes};
  run_blocks(p, 0, blocks);
  write_array(dir + "/y", y);
}

void run_attention(const std::string& dir) {
  using namespace llmc_attention;
  double scale = 0;
  const auto meta = read_meta(dir, 8, &scale);
  const int64_t batch = meta[0], heads = meta[1], kv_heads = meta[2], d = meta[3], slots = meta[4], width = meta[5];
  const int64_t block_size = meta[6], window = meta[7];
  if (kv_heads == 0 || heads % kv_heads != 0 || block_size == 0) throw std::runtime_error(dir + ": bad heads");
  const AttendFn run = attend_fn(d, heads / kv_heads);
  if (run == nullptr) throw std::runtime_error(dir + ": head_dim 64 or 128, up to 8 query heads per kv head");
  const auto q = read_array<float>(dir + "/q", checked_product(batch, heads * d));
  const auto keys = read_array<float>(dir + "/k", checked_product(slots, kv_heads * d));
  const auto values = read_array<float>(dir + "/v", checked_product(slots, kv_heads * d));
  const auto tables = read_array<int64_t>(dir + "/tables", checked_product(batch, width));
  const auto lens = read_array<int64_t>(dir + "/lens", batch);
  if (const char* error = table_error(tables.data(), lens.data(), batch, width, block_size, slots / block_size))
    throw std::runtime_error(dir + ": " + error);
  std::vector<float> out(batch * heads * d), scores;
  std::vector<int64_t> rows;
  const Problem p{run, q.data(), keys.data(), values.data(), tables.data(), lens.data(), out.data(),
                  heads, kv_heads, d, width, block_size, window, static_cast<float>(scale)};
  run_tasks(p, 0, batch * kv_heads, scores, rows);
  write_array(dir + "/out", out);
}

void run_half(const std::string& dir) {
  const auto meta = read_meta(dir, 4);
  const int64_t m = meta[0], k = meta[1], n = meta[2];
  const auto x = read_array<float>(dir + "/x", checked_product(m, k));
  const auto weight = read_array<uint16_t>(dir + "/weight", checked_product(n, k));
  std::vector<float> y(checked_product(m, n));
  const llmc_half::Problem p{x.data(), weight.data(), y.data(), m, k, n, meta[3] != 0};
  llmc_half::run_tiles(p, 0, (n + llmc_half::kHalfTileRows - 1) / llmc_half::kHalfTileRows);
  write_array(dir + "/y", y);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s qmatmul|attention|half CASE...\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  try {
    for (int i = 2; i < argc; ++i) {
      if (mode == "qmatmul") run_qmatmul(argv[i]);
      else if (mode == "attention") run_attention(argv[i]);
      else if (mode == "half") run_half(argv[i]);
      else throw std::runtime_error("unknown mode " + mode);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 2;
  }
  return 0;
}
