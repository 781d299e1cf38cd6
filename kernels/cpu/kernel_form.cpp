// GGML blocks straight into the quantized matmul's layout (qmatmul.cpp's header says the layout),
// at load: what kernels/cpu/qmatmul_vnni.py's `pack(*parts(blocks, fmt))` computes with torch,
// byte for byte (tests/kernels/cpu/test_kernel_form.py), in one pass over the blocks instead of
// several over a byte per weight. At 3B that conversion was most of `llmc run`'s start.
//
// Per 16-row block of the weight, each row's blocks are decoded into (u, scale, offset) per group
// of G inputs, w = u * scale + offset, with the same float32 operations as the torch reference
// (one multiply per scale or offset, so no contraction can change a bit), then interleaved.
// Every GGML format the kernel takes (codes below, qmatmul_vnni.py's _NATIVE_CODES).
// Returns [weight, scales, fits]: `fits` is false when a scale or offset does not fit float16
// (qmatmul_vnni.scales_fit), and the caller then does not use the kernel for that weight.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "torch_stable.h"

namespace {

using llmc_torch::ScalarType;
using llmc_torch::Tensor;

constexpr int64_t kFormRows = 16;            // output rows per weight block (qmatmul_common.h kRows)
constexpr int64_t kLane = 4;                 // inputs per 32-bit lane of the packed layout
constexpr float kHalfMax = 65504.f;          // float16's largest finite value
enum FormCode : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2, kQ4K = 3, kQ6K = 4, kQ5_0 = 5, kQ5_1 = 6, kQ5K = 7, kQ2K = 8, kQ3K = 9, kQ6KForm = 10, kQ4KForm = 11 };

struct FormatInfo {
  int64_t block_bytes, block_weights, group, bits;
};

FormatInfo format_info(int64_t code) {
  switch (code) {
    case kQ4_0: return {18, 32, 32, 4};
    case kQ4_1: return {20, 32, 32, 4};
    case kQ8_0: return {34, 32, 32, 8};
    case kQ4K: return {144, 256, 32, 4};
    case kQ6K: return {210, 256, 16, 8};
    case kQ5_0: return {22, 32, 32, 8};
    case kQ5_1: return {24, 32, 32, 8};
    case kQ5K: return {176, 256, 32, 8};
    case kQ2K: return {84, 256, 16, 4};
    case kQ3K: return {110, 256, 16, 4};
    default: return {0, 0, 0, 0};
  }
}

float f16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// q4k and q5k's 8 six-bit scales and mins from their 12 bytes, as scale and offset per 32 weights.
void k4_scales(const uint8_t* b, float* scale, float* offset) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* s = b + 4;
  for (int j = 0; j < 8; ++j) {
    const int sc = j < 4 ? (s[j] & 0x3F) : ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    const int mn = j < 4 ? (s[j + 4] & 0x3F) : ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    scale[j] = d * static_cast<float>(sc);
    offset[j] = -(dmin * static_cast<float>(mn));
  }
}

// One GGML block (block_weights weights) into u, and its groups' scales and offsets.
void decode_block(int64_t code, const uint8_t* b, uint8_t* u, float* scale, float* offset) {
  switch (code) {
    case kQ5_0:
    case kQ5_1: {
      const float d = f16_at(b);
      const uint8_t* qh = b + (code == kQ5_0 ? 2 : 4);  // bit i: the fifth bit of weight i
      const uint8_t* qs = qh + 4;
      for (int i = 0; i < 16; ++i) u[i] = qs[i] & 0xF, u[i + 16] = qs[i] >> 4;
      for (int i = 0; i < 32; ++i) u[i] |= ((qh[i / 8] >> (i % 8)) & 1) << 4;
      scale[0] = d;
      offset[0] = code == kQ5_0 ? -16.f * d : f16_at(b + 2);
      return;
    }
    case kQ5K: {
      k4_scales(b, scale, offset);
      const uint8_t *qh = b + 16, *qs = b + 48;  // qh bit l of byte t: the fifth bit of weight 32 l + t
      for (int c = 0; c < 4; ++c)
        for (int t = 0; t < 32; ++t) u[c * 64 + t] = qs[c * 32 + t] & 0xF, u[c * 64 + 32 + t] = qs[c * 32 + t] >> 4;
      for (int i = 0; i < 256; ++i) u[i] |= ((qh[i % 32] >> (i / 32)) & 1) << 4;
      return;
    }
    case kQ2K: {
      const uint8_t *sc = b, *qs = b + 16;
      const float d = f16_at(b + 80), dmin = f16_at(b + 82);
      for (int j = 0; j < 16; ++j) {
        scale[j] = d * static_cast<float>(sc[j] & 0xF);
        offset[j] = -(dmin * static_cast<float>(sc[j] >> 4));
      }
      for (int c = 0; c < 2; ++c)  // 2 chunks of 32 bytes, 4 two-bit lanes each
        for (int l = 0; l < 4; ++l)
          for (int t = 0; t < 32; ++t) u[c * 128 + l * 32 + t] = (qs[c * 32 + t] >> (2 * l)) & 3;
      return;
    }
    case kQ3K: {
      const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
      const float d = f16_at(b + 108);
      for (int j = 0; j < 16; ++j) {
        const int low = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4), high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        scale[j] = d * static_cast<float>((low | (high << 4)) - 32);
        offset[j] = -4.f * scale[j];
      }
      for (int c = 0; c < 2; ++c)
        for (int l = 0; l < 4; ++l)
          for (int t = 0; t < 32; ++t) u[c * 128 + l * 32 + t] = (qs[c * 32 + t] >> (2 * l)) & 3;
      for (int i = 0; i < 256; ++i) u[i] |= ((hmask[i % 32] >> (i / 32)) & 1) << 2;
      return;
    }
    case kQ4_0:
    case kQ4_1: {
      const float d = f16_at(b);
      const uint8_t* qs = b + (code == kQ4_0 ? 2 : 4);
      for (int i = 0; i < 16; ++i) u[i] = qs[i] & 0xF, u[i + 16] = qs[i] >> 4;
      scale[0] = d;
      offset[0] = code == kQ4_0 ? -8.f * d : f16_at(b + 2);
      return;
    }
    case kQ8_0: {
      const float d = f16_at(b);
      for (int i = 0; i < 32; ++i) u[i] = static_cast<uint8_t>(static_cast<int8_t>(b[2 + i]) + 128);
      scale[0] = d;
      offset[0] = -128.f * d;
      return;
    }
    case kQ4K: {
      k4_scales(b, scale, offset);
      const uint8_t* qs = b + 16;  // 4 chunks of 32 bytes: low nibbles 32 weights, high nibbles the next 32
      for (int c = 0; c < 4; ++c)
        for (int t = 0; t < 32; ++t) u[c * 64 + t] = qs[c * 32 + t] & 0xF, u[c * 64 + 32 + t] = qs[c * 32 + t] >> 4;
      return;
    }
    case kQ6K: {
      const uint8_t *ql = b, *qh = b + 128;
      const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16_at(b + 208);
      for (int j = 0; j < 16; ++j) {
        scale[j] = d * static_cast<float>(sc[j]);
        offset[j] = -32.f * scale[j];
      }
      for (int h = 0; h < 2; ++h)
        for (int s = 0; s < 2; ++s)
          for (int i = 0; i < 64; ++i) {
            const int lane = 2 * s + i / 32, t = i % 32;
            const int low = (ql[h * 64 + i] >> (4 * s)) & 0xF, high = (qh[h * 32 + t] >> (2 * lane)) & 3;
            u[h * 128 + s * 64 + i] = static_cast<uint8_t>(low | (high << 4));
          }
      return;
    }
  }
}

// q6k blocks into the q6k form (qmatmul_common.h): the same bytes per weight, regrouped; d is copied.
std::vector<Tensor> q6k_form(const Tensor& blocks, int64_t rows) {
  constexpr int64_t kBlockBytes = 210, kWeights = 256, kGroup = 16, kGroups = 16;
  constexpr int64_t kLowBytes = kGroups * 2 * 64, kHighBytes = kGroups * 64, kSuperBytes = kLowBytes + kHighBytes + kGroups * kFormRows;
  const int64_t row_bytes = blocks.numel() / rows;
  STD_TORCH_CHECK(row_bytes % kBlockBytes == 0, "kernel_form: a row is not whole blocks");
  const int64_t supers = row_bytes / kBlockBytes, out_blocks = rows / kFormRows;
  Tensor weight = llmc_torch::empty({out_blocks, supers * kSuperBytes}, aoti_torch_dtype_uint8());
  Tensor scales = llmc_torch::empty({out_blocks, supers, 1, kFormRows}, aoti_torch_dtype_float16());
  const uint8_t* src = blocks.const_data_ptr<uint8_t>();
  uint8_t* dst = weight.mutable_data_ptr<uint8_t>();
  auto* ddst = static_cast<uint8_t*>(scales.mutable_data_ptr());
  torch::stable::parallel_for(0, out_blocks, 1, [&](int64_t first, int64_t last) {
    uint8_t u[kWeights];
    float unused_scale[kGroups], unused_offset[kGroups];
    for (int64_t ob = first; ob < last; ++ob)
      for (int64_t s = 0; s < supers; ++s) {
        uint8_t* out = dst + (ob * supers + s) * kSuperBytes;
        for (int64_t r = 0; r < kFormRows; ++r) {
          const uint8_t* b = src + (ob * kFormRows + r) * row_bytes + s * kBlockBytes;
          decode_block(kQ6K, b, u, unused_scale, unused_offset);
          for (int64_t g = 0; g < kGroups; ++g) {
            const uint8_t* ug = u + g * kGroup;
            for (int64_t j = 0; j < kLane; ++j) {
              for (int64_t c = 0; c < 2; ++c)
                out[g * 128 + c * 64 + r * kLane + j] =
                    static_cast<uint8_t>((ug[8 * c + j] & 0xF) | ((ug[8 * c + 4 + j] & 0xF) << 4));
              uint8_t high = 0;
              for (int64_t t = 0; t < 4; ++t) high |= static_cast<uint8_t>((ug[4 * t + j] >> 4) << (2 * t));
              out[kLowBytes + g * 64 + r * kLane + j] = high;
            }
            out[kLowBytes + kHighBytes + g * kFormRows + r] = b[192 + g];  // sc, int8
          }
          std::memcpy(ddst + ((ob * supers + s) * kFormRows + r) * 2, b + 208, 2);  // d, float16
        }
      }
  });
  return {weight, scales, llmc_torch::bool_scalar(true)};
}

// q4k blocks into the q4k form (qmatmul_common.h): the values in the bits-4 layout, the 6-bit scales
// and mins as bytes, d and dmin copied.
std::vector<Tensor> q4k_form(const Tensor& blocks, int64_t rows) {
  constexpr int64_t kBlockBytes = 144, kWeights = 256, kGroup = 32, kGroups = 8;
  constexpr int64_t kValueBytes = kGroups * kFormRows * kGroup / 2, kSuperBytes = kValueBytes + 2 * kGroups * kFormRows;
  const int64_t row_bytes = blocks.numel() / rows;
  STD_TORCH_CHECK(row_bytes % kBlockBytes == 0, "kernel_form: a row is not whole blocks");
  const int64_t supers = row_bytes / kBlockBytes, out_blocks = rows / kFormRows;
  Tensor weight = llmc_torch::empty({out_blocks, supers * kSuperBytes}, aoti_torch_dtype_uint8());
  Tensor scales = llmc_torch::empty({out_blocks, supers, 2, kFormRows}, aoti_torch_dtype_float16());
  const uint8_t* src = blocks.const_data_ptr<uint8_t>();
  uint8_t* dst = weight.mutable_data_ptr<uint8_t>();
  auto* ddst = static_cast<uint8_t*>(scales.mutable_data_ptr());
  torch::stable::parallel_for(0, out_blocks, 1, [&](int64_t first, int64_t last) {
    uint8_t u[kWeights];
    for (int64_t ob = first; ob < last; ++ob)
      for (int64_t s = 0; s < supers; ++s) {
        uint8_t* out = dst + (ob * supers + s) * kSuperBytes;
        uint8_t* dout = ddst + (ob * supers + s) * 2 * kFormRows * 2;
        for (int64_t r = 0; r < kFormRows; ++r) {
          const uint8_t* b = src + (ob * kFormRows + r) * row_bytes + s * kBlockBytes;
          const uint8_t *sb = b + 4, *qs = b + 16;
          for (int64_t j = 0; j < 4; ++j)  // the 32 bytes of qs hold weights 64j + i (low) and 64j + 32 + i (high)
            for (int64_t i = 0; i < 32; ++i) u[64 * j + i] = qs[32 * j + i] & 0xF, u[64 * j + 32 + i] = qs[32 * j + i] >> 4;
          for (int64_t g = 0; g < kGroups; ++g) {
            const uint8_t* ug = u + g * kGroup;
            for (int64_t c = 0; c < kGroup / 8; ++c)
              for (int64_t j = 0; j < kLane; ++j)
                out[g * 256 + (c * kFormRows + r) * kLane + j] = static_cast<uint8_t>(ug[8 * c + j] | (ug[8 * c + 4 + j] << 4));
            const int sc = g < 4 ? (sb[g] & 0x3F) : ((sb[g + 4] & 0xF) | ((sb[g - 4] >> 6) << 4));
            const int mn = g < 4 ? (sb[g + 4] & 0x3F) : ((sb[g + 4] >> 4) | ((sb[g] >> 6) << 4));
            out[kValueBytes + g * kFormRows + r] = static_cast<uint8_t>(sc);
            out[kValueBytes + kGroups * kFormRows + g * kFormRows + r] = static_cast<uint8_t>(mn);
          }
          std::memcpy(dout + r * 2, b, 2);                   // d, float16
          std::memcpy(dout + (kFormRows + r) * 2, b + 2, 2);  // dmin, float16
        }
      }
  });
  return {weight, scales, llmc_torch::bool_scalar(true)};
}

std::vector<Tensor> kernel_form(Tensor blocks, int64_t code, int64_t rows) {
  if (code == kQ6KForm || code == kQ4KForm) {
    STD_TORCH_CHECK(blocks.scalar_type() == ScalarType::Byte && blocks.is_contiguous(), "kernel_form: contiguous uint8 blocks");
    STD_TORCH_CHECK(rows > 0 && rows % kFormRows == 0 && blocks.numel() % rows == 0, "kernel_form: rows must be 16 * n");
    return code == kQ6KForm ? q6k_form(blocks, rows) : q4k_form(blocks, rows);
  }
  const FormatInfo f = format_info(code);
  STD_TORCH_CHECK(f.block_bytes > 0, "kernel_form: unknown format code ", code);
  STD_TORCH_CHECK(blocks.scalar_type() == ScalarType::Byte && blocks.is_contiguous(), "kernel_form: contiguous uint8 blocks");
  STD_TORCH_CHECK(rows > 0 && rows % kFormRows == 0 && blocks.numel() % rows == 0, "kernel_form: rows must be 16 * n");
  const int64_t row_bytes = blocks.numel() / rows;
  STD_TORCH_CHECK(row_bytes % f.block_bytes == 0, "kernel_form: a row is not whole blocks");
  const int64_t per_row = row_bytes / f.block_bytes, k = per_row * f.block_weights, groups = k / f.group;
  const int64_t out_blocks = rows / kFormRows, group_bytes = kFormRows * f.group * f.bits / 8;
  Tensor weight = llmc_torch::empty({out_blocks, groups * group_bytes}, aoti_torch_dtype_uint8());
  Tensor scales = llmc_torch::empty({out_blocks, groups, 2, kFormRows}, aoti_torch_dtype_float16());
  const uint8_t* src = blocks.const_data_ptr<uint8_t>();
  uint8_t* dst = weight.mutable_data_ptr<uint8_t>();
  auto* sdst = static_cast<c10::Half*>(scales.mutable_data_ptr());
  std::atomic<bool> fits{true};
  torch::stable::parallel_for(0, out_blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<uint8_t> u(kFormRows * k);
    std::vector<float> sc(kFormRows * groups), off(kFormRows * groups);
    const int64_t groups_per_block = f.block_weights / f.group;
    for (int64_t ob = first; ob < last; ++ob) {
      for (int64_t r = 0; r < kFormRows; ++r) {
        const uint8_t* row = src + (ob * kFormRows + r) * row_bytes;
        for (int64_t i = 0; i < per_row; ++i)
          decode_block(code, row + i * f.block_bytes, &u[r * k + i * f.block_weights],
                       &sc[r * groups + i * groups_per_block], &off[r * groups + i * groups_per_block]);
      }
      uint8_t* out = dst + ob * groups * group_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* og = out + g * group_bytes;
        const int64_t chunks = f.bits == 4 ? f.group / 8 : f.group / kLane;
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t r = 0; r < kFormRows; ++r)
            for (int64_t j = 0; j < kLane; ++j) {
              const uint8_t* ur = &u[r * k + g * f.group];
              og[(c * kFormRows + r) * kLane + j] = f.bits == 4
                                                        ? static_cast<uint8_t>(ur[8 * c + j] | (ur[8 * c + 4 + j] << 4))
                                                        : ur[kLane * c + j];
            }
        c10::Half* sg = sdst + (ob * groups + g) * 2 * kFormRows;
        for (int64_t r = 0; r < kFormRows; ++r) {
          const float s = sc[r * groups + g], o = off[r * groups + g];
          if (!(std::fabs(s) <= kHalfMax && std::fabs(o) <= kHalfMax)) fits = false;
          sg[r] = c10::Half(s);
          sg[kFormRows + r] = c10::Half(o);
        }
      }
    }
  });
  return {weight, scales, llmc_torch::bool_scalar(fits.load())};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(llmc, m) { m.def("kernel_form(Tensor blocks, int code, int rows) -> Tensor[]"); }

STABLE_TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("kernel_form", TORCH_BOX(&kernel_form)); }
