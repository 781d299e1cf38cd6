// llmc's native GGML quantizers (q4_0 q4_1 q5_0 q5_1 q8_0 q2k q3k q4k q5k q6k): a plain C ABI, no torch.
//
// Each format is the algorithm of quant/legacy.py or quant/kquants.py written as scalar C++, one
// block at a time, with every float32 operation in the same order, so the bytes equal the torch
// codecs' (which equal llama.cpp's reference quantizers). What that takes (see kquants.py's docstring):
// sums added left to right, products rounded before they are added (built with -ffp-contract=off, and
// never -ffast-math), rounding half-to-even (nearbyint), true divisions, sqrt correctly rounded,
// strict improvement between candidates, and each sub-block scaled by a power of two first.
//
// Blocks are independent, so a tensor is one flat run of blocks split across threads.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr float kGroupMaxEps = 1e-15f;  // a sub-block whose largest |x| is below this is all zeros
constexpr int kQK = 32;                 // weights per legacy block
constexpr int kQKK = 256;               // weights per K-quant super-block
constexpr int kMaxSub = 32;             // the longest sub-block (q4k/q5k)
constexpr int kMaxF32Exponent = 127;    // 2^127 is float32's largest power of two
constexpr int kQ3DescentPasses = 5;     // make_q3_quants' sweeps of per-weight re-rounding
constexpr int kSymSteps = 9;            // make_qx_quants' candidates: -(nmax + 0.1 i) / max, |i| <= 9

enum InputType { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ------------------------------------------------------------------------------------------- f16

uint16_t f32_to_f16(float f) {
  // Round to nearest even, overflow to inf, subnormals kept: what torch's .half() gives.
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                               // below 2^-14: a subnormal half
    const int e = static_cast<int>(ax >> 23);
    if (e < 102) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - e;  // the value in units of 2^-24 is m / 2^shift
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  const uint32_t r = ax - 0x38000000u;  // rebias the exponent from 127 to 15
  return static_cast<uint16_t>(sign | ((r + 0x0FFFu + ((r >> 13) & 1u)) >> 13));
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

void put_f16(uint8_t* dst, float v) {
  const uint16_t h = f32_to_f16(v);
  dst[0] = static_cast<uint8_t>(h & 0xFF);
  dst[1] = static_cast<uint8_t>(h >> 8);
}

float as_f16(float v) { return f16_to_f32(f32_to_f16(v)); }  // v stored as f16 and read back

// --------------------------------------------------------------------------------------- helpers

float round_even(float v) { return std::nearbyint(v); }  // torch.round: half to even

// max(m, |v|) inline (std::fmax is a libm call without -ffast-math); m starts at +0, so no signed zeros.
inline float max_abs(float m, float v) {
  const float a = std::fabs(v);
  return a > m ? a : m;
}

float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }  // NaN stays NaN

// float → int32 as torch's (and x86's cvtt) conversion: INT32_MIN for NaN and out-of-range values.
int32_t to_i32(float v) {
  if (!(v >= -2147483648.0f && v < 2147483648.0f)) return INT32_MIN;
  return static_cast<int32_t>(v);
}

// The largest value, +0 unless positive (ggml's running max from 0).
float positive_max(const float* v, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; ++i)
    if (v[i] > m) m = v[i];
  return m;
}

// Index of the first value of largest magnitude (torch.argmax's first on ties).
int argmax_abs(const float* v, int n) {
  int at = 0;
  float best = std::fabs(v[0]);
  for (int i = 1; i < n; ++i) {
    const float a = std::fabs(v[i]);
    if (a > best) best = a, at = i;
  }
  return at;
}

// nearest_int((top / peak) * v), 0 where peak is not positive.
int32_t scale_level(float v, float peak, float top) {
  const float inv = peak > 0 ? top / peak : 0.0f;
  return to_i32(round_even(inv * v));
}

// x /= 2^e with max|x| < 2^e <= 2 max|x| (1 when all zero): exact, keeps the searches' sums in range.
float normalize(const float* in, float* out, int n) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = max_abs(amax, in[i]);
  int e = 0;
  std::frexp(amax, &e);
  if (e > kMaxF32Exponent) e = kMaxF32Exponent;
  const float norm = std::ldexp(1.0f, e);
  for (int i = 0; i < n; ++i) out[i] = in[i] / norm;
  return norm;
}

// ----------------------------------------------------------------------------- sub-block searches

struct AffineSearch {
  int nmax;
  float rmin, rdelta;
  int nstep;
  bool use_mad;
};
constexpr AffineSearch kQ2KSearch{3, -0.5f, 0.1f, 15, true};
constexpr AffineSearch kQ4KSearch{15, -1.0f, 0.1f, 20, false};
constexpr AffineSearch kQ5KSearch{31, -0.5f, 0.1f, 15, false};

// make_qkx2_quants as kquants._affine_search (x ≈ scale * L + min, L in 0..nmax, min <= 0), over
// the S sub-blocks of N weights of a super-block at once, one per SIMD lane: every lane keeps
// its own left-to-right sums and float32 order (only independent lanes run side by side), so each
// lane's result is the scalar search's. Branches become per-lane selects, as in kquants._affine_search.
template <int N, int S>
void affine_search_lanes(const float* x_in, const float* weight_in, const AffineSearch& p, uint8_t* L,
                         float* scale_out, float* neg_min_out) {
  alignas(64) float x[N][S], w[N][S], lv[N][S];
  alignas(64) float norm[S], lo[S], hi[S], sum_w[S], sum_x[S], iscale[S], scale[S], mn[S], err[S], ok[S];
  alignas(64) float best_iscale[S], best_origin[S], best_min[S], best_scale[S], best_err[S];
  alignas(64) float sum_l[S], sum_l2[S], sum_xl[S];
  const float nmax = static_cast<float>(p.nmax);
  for (int s = 0; s < S; ++s) {
    float amax = 0.0f;
    for (int i = 0; i < N; ++i) amax = max_abs(amax, x_in[s * N + i]);
    int e = 0;
    std::frexp(amax, &e);
    norm[s] = std::ldexp(1.0f, e > kMaxF32Exponent ? kMaxF32Exponent : e);
  }
  for (int i = 0; i < N; ++i)
    for (int s = 0; s < S; ++s) {
      x[i][s] = x_in[s * N + i] / norm[s];
      w[i][s] = weight_in[s * N + i] / norm[s];
    }
  for (int s = 0; s < S; ++s) lo[s] = hi[s] = x[0][s], sum_w[s] = sum_x[s] = 0.0f;
  for (int i = 1; i < N; ++i)
    for (int s = 0; s < S; ++s) {
      lo[s] = x[i][s] < lo[s] ? x[i][s] : lo[s];
      hi[s] = x[i][s] > hi[s] ? x[i][s] : hi[s];
    }
  for (int i = 0; i < N; ++i)
    for (int s = 0; s < S; ++s) {
      sum_w[s] += w[i][s];
      sum_x[s] += w[i][s] * x[i][s];
    }
  auto levels = [&](const float* is, const float* origin) {
    for (int i = 0; i < N; ++i)
      for (int s = 0; s < S; ++s) lv[i][s] = clampf(round_even((x[i][s] - origin[s]) * is[s]), 0, nmax);
  };
  auto error = [&](const float* sc, const float* m) {
    for (int s = 0; s < S; ++s) err[s] = 0.0f;
    for (int i = 0; i < N; ++i)
      for (int s = 0; s < S; ++s) {
        float diff = lv[i][s] * sc[s] + m[s] - x[i][s];
        diff = p.use_mad ? std::fabs(diff) : diff * diff;
        err[s] += diff * w[i][s];
      }
  };
  for (int s = 0; s < S; ++s) {
    lo[s] = lo[s] > 0 ? 0.0f : lo[s];
    best_iscale[s] = nmax / (hi[s] == lo[s] ? 1.0f : hi[s] - lo[s]);
    best_origin[s] = best_min[s] = lo[s];
    best_scale[s] = 1.0f / best_iscale[s];
  }
  levels(best_iscale, lo);
  error(best_scale, best_min);
  for (int s = 0; s < S; ++s) best_err[s] = err[s];
  for (int c = 0; c <= p.nstep; ++c) {
    const float steps = (p.rmin + p.rdelta * static_cast<float>(c)) + nmax;
    for (int s = 0; s < S; ++s) {
      const float span = hi[s] - best_min[s];
      ok[s] = span > 0 ? 1.0f : 0.0f;  // a refit min above max leaves no usable grid
      iscale[s] = steps / (span > 0 ? span : 1.0f);
      sum_l[s] = sum_l2[s] = sum_xl[s] = 0.0f;
    }
    levels(iscale, best_min);
    for (int i = 0; i < N; ++i)
      for (int s = 0; s < S; ++s) {
        const float wl = w[i][s] * lv[i][s];
        sum_l[s] += wl;
        sum_l2[s] += wl * lv[i][s];
        sum_xl[s] += wl * x[i][s];
      }
    for (int s = 0; s < S; ++s) {
      float det = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s];
      ok[s] = ok[s] != 0 && det > 0 ? 1.0f : 0.0f;
      det = ok[s] != 0 ? det : 1.0f;
      const float sc = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / det;
      const float m = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / det;
      const float refit = sum_xl[s] / (sum_l2[s] != 0 ? sum_l2[s] : 1.0f);
      scale[s] = m > 0 ? refit : sc;
      mn[s] = m > 0 ? 0.0f : m;
    }
    error(scale, mn);
    for (int s = 0; s < S; ++s) {
      const bool better = ok[s] != 0 && err[s] < best_err[s];
      best_err[s] = better ? err[s] : best_err[s];
      best_iscale[s] = better ? iscale[s] : best_iscale[s];
      best_origin[s] = better ? best_min[s] : best_origin[s];
      best_scale[s] = better ? scale[s] : best_scale[s];
      best_min[s] = better ? mn[s] : best_min[s];
    }
  }
  levels(best_iscale, best_origin);
  for (int s = 0; s < S; ++s) {
    const bool flat = hi[s] == lo[s];
    for (int i = 0; i < N; ++i) L[s * N + i] = flat ? 0 : static_cast<uint8_t>(lv[i][s]);
    neg_min_out[s] = -best_min[s] * norm[s];
    scale_out[s] = (flat ? 0.0f : best_scale[s]) * norm[s];
  }
}

// make_qx_quants (rmse_type 1) as kquants._symmetric_search: x ≈ scale * l, l in -nmax..nmax-1,
// weighting by x^2; over the S sub-blocks of N weights of a super-block at once, one per SIMD lane
// (as affine_search_lanes). Writes L = l + nmax and the scales.
template <int N, int S>
void symmetric_search_lanes(const float* x_in, int nmax_i, uint8_t* L, float* scale_out) {
  alignas(64) float x[N][S], w[N][S], wx[N][S], lv[N][S];
  alignas(64) float norm[S], peak[S], iscale[S], best_iscale[S], scale[S], best[S], sum_xl[S], sum_l2[S];
  bool zero[S];
  const float nmax = static_cast<float>(nmax_i);
  for (int s = 0; s < S; ++s) {
    float amax = 0.0f;
    for (int i = 0; i < N; ++i) amax = max_abs(amax, x_in[s * N + i]);
    zero[s] = amax < kGroupMaxEps;
    int e = 0;
    std::frexp(amax, &e);
    norm[s] = std::ldexp(1.0f, e > kMaxF32Exponent ? kMaxF32Exponent : e);
    float xs[N];
    for (int i = 0; i < N; ++i) xs[i] = x_in[s * N + i] / norm[s];
    peak[s] = zero[s] ? 1.0f : xs[argmax_abs(xs, N)];
    for (int i = 0; i < N; ++i) x[i][s] = xs[i];
  }
  for (int i = 0; i < N; ++i)
    for (int s = 0; s < S; ++s) {
      w[i][s] = x[i][s] * x[i][s];
      wx[i][s] = w[i][s] * x[i][s];
    }
  auto fit = [&](float steps) {
    for (int s = 0; s < S; ++s) iscale[s] = -steps / peak[s], sum_xl[s] = sum_l2[s] = 0.0f;
    for (int i = 0; i < N; ++i)
      for (int s = 0; s < S; ++s) {
        lv[i][s] = clampf(round_even(x[i][s] * iscale[s]), -nmax, nmax - 1);
        sum_xl[s] += wx[i][s] * lv[i][s];
        sum_l2[s] += w[i][s] * lv[i][s] * lv[i][s];
      }
  };
  fit(nmax);
  for (int s = 0; s < S; ++s) {
    best_iscale[s] = iscale[s];
    scale[s] = sum_l2[s] != 0 ? sum_xl[s] / (sum_l2[s] != 0 ? sum_l2[s] : 1.0f) : 0.0f;
    best[s] = scale[s] * sum_xl[s];
  }
  for (int c = -kSymSteps; c <= kSymSteps; ++c) {
    if (c == 0) continue;
    fit(nmax + 0.1f * static_cast<float>(c));
    for (int s = 0; s < S; ++s) {
      const bool better = sum_l2[s] > 0 && sum_xl[s] * sum_xl[s] > best[s] * sum_l2[s];
      const float fitted = sum_xl[s] / (better ? sum_l2[s] : 1.0f);
      scale[s] = better ? fitted : scale[s];
      best[s] = better ? fitted * sum_xl[s] : best[s];
      best_iscale[s] = better ? iscale[s] : best_iscale[s];
    }
  }
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < N; ++i)
      L[s * N + i] = zero[s] ? 0 : static_cast<uint8_t>(clampf(round_even(x[i][s] * best_iscale[s]), -nmax, nmax - 1) + nmax);
    scale_out[s] = zero[s] ? 0.0f : scale[s] * norm[s];
  }
}

// make_q3_quants as kquants._q3_descent: x ≈ scale * l, l in -nmax..nmax-1, weighting by x^2.
float q3_descent(const float* x_in, int n, int nmax_i, uint8_t* L) {
  float x[kMaxSub], w[kMaxSub], wx[kMaxSub], lv[kMaxSub];
  float amax = 0;
  for (int i = 0; i < n; ++i) amax = max_abs(amax, x_in[i]);
  const bool zero = amax < kGroupMaxEps;
  const float norm = normalize(x_in, x, n);
  const float peak = zero ? 1.0f : x[argmax_abs(x, n)];
  const float nmax = static_cast<float>(nmax_i);
  const float iscale = -nmax / peak;
  float sum_xl = 0, sum_l2 = 0;
  for (int i = 0; i < n; ++i) {
    lv[i] = clampf(round_even(iscale * x[i]), -nmax, nmax - 1);
    w[i] = x[i] * x[i];
    wx[i] = w[i] * x[i];
  }
  for (int i = 0; i < n; ++i) sum_xl += wx[i] * lv[i];
  for (int i = 0; i < n; ++i) sum_l2 += w[i] * lv[i] * lv[i];
  for (int pass = 0; pass < kQ3DescentPasses; ++pass) {
    bool changed = false;  // a sweep that changes nothing leaves every later one idle too
    for (int j = 0; j < n; ++j) {
      const float lj = lv[j];
      const float xl_rest = sum_xl - wx[j] * lj;
      const float l2_rest = sum_l2 - w[j] * lj * lj;
      if (!(xl_rest > 0)) continue;
      const float nw = clampf(round_even(x[j] * l2_rest / xl_rest), -nmax, nmax - 1);
      if (!(nw != lj)) continue;
      const float xl_new = xl_rest + wx[j] * nw;
      const float l2_new = l2_rest + w[j] * nw * nw;
      if (l2_new > 0 && xl_new * xl_new * sum_l2 > sum_xl * sum_xl * l2_new) {
        lv[j] = nw;
        sum_xl = xl_new;
        sum_l2 = l2_new;
        changed = true;
      }
    }
    if (!changed) break;
  }
  const float scale = sum_l2 > 0 ? sum_xl / sum_l2 : 0.0f;
  for (int i = 0; i < n; ++i) L[i] = zero ? 0 : static_cast<uint8_t>(lv[i] + nmax);
  return zero ? 0.0f : scale * norm;
}

// Round x / step to lo..hi; where step is 0, the search's level `fallback`.
int requantize(float x, float step, int lo, int hi, int fallback) {
  if (step == 0) return fallback;
  return static_cast<int>(clampf(round_even(x / step), static_cast<float>(lo), static_cast<float>(hi)));
}

// Interleave `lanes` runs of 32 levels into bytes: run k at bit k*bits (kquants._pack_fields).
void pack_fields(const uint8_t* q, int bits, int lanes, int groups, uint8_t* out) {
  for (int g = 0; g < groups; ++g)
    for (int j = 0; j < 32; ++j) {
      uint32_t b = 0;
      for (int k = 0; k < lanes; ++k) b |= static_cast<uint32_t>(q[g * lanes * 32 + k * 32 + j]) << (k * bits);
      out[g * 32 + j] = static_cast<uint8_t>(b);
    }
}

// --------------------------------------------------------------------------------------- K-quants

void encode_q2k(const float* x, uint8_t* out) {
  constexpr int kSub = 16, kNSub = kQKK / kSub;
  constexpr float kLevels = 15;  // 4-bit sub-block scales and mins
  uint8_t found[kQKK], q[kQKK];
  float scales[kNSub], mins[kNSub], weight[kQKK];
  for (int k = 0; k < kQKK; ++k) weight[k] = std::fabs(x[k]);
  affine_search_lanes<kSub, kNSub>(x, weight, kQ2KSearch, found, scales, mins);
  const float max_scale = positive_max(scales, kNSub), max_min = positive_max(mins, kNSub);
  const float d = as_f16(max_scale / kLevels), dmin = as_f16(max_min / kLevels);
  for (int s = 0; s < kNSub; ++s) {
    const uint32_t ls = static_cast<uint32_t>(scale_level(scales[s], max_scale, kLevels));
    const uint32_t lm = static_cast<uint32_t>(scale_level(mins[s], max_min, kLevels));
    const uint32_t packed = ((ls & 0xFF) | (lm << 4)) & 0xFF;  // ggml ORs the uint8_t fields unclamped
    out[s] = static_cast<uint8_t>(packed);
    const float step = d * static_cast<float>(packed & 0xF), offset = dmin * static_cast<float>(packed >> 4);
    for (int i = 0; i < kSub; ++i)
      q[s * kSub + i] = static_cast<uint8_t>(requantize(x[s * kSub + i] + offset, step, 0, 3, found[s * kSub + i]));
  }
  pack_fields(q, 2, 4, 2, out + 16);
  put_f16(out + 80, max_scale / kLevels);
  put_f16(out + 82, max_min / kLevels);
}

void encode_q3k(const float* x, uint8_t* out) {
  constexpr int kSub = 16, kNSub = kQKK / kSub, kNmax = 4, kHalf = 32;
  uint8_t found[kQKK], q[kQKK], hi[kQKK], low[kQKK];
  float scales[kNSub];
  int32_t ls[kNSub];
  for (int s = 0; s < kNSub; ++s) scales[s] = q3_descent(x + s * kSub, kSub, kNmax, found + s * kSub);
  const float peak = scales[argmax_abs(scales, kNSub)];  // the signed largest sub-block scale → -32
  const bool live = peak != 0;
  const float iscale = -static_cast<float>(kHalf) / (live ? peak : 1.0f);
  for (int s = 0; s < kNSub; ++s)
    ls[s] = live ? to_i32(clampf(round_even(iscale * scales[s]), -kHalf, kHalf - 1)) : -kHalf;
  const float dv = live ? 1.0f / iscale : 0.0f;
  const float d = as_f16(dv);
  for (int s = 0; s < kNSub; ++s) {
    const float step = d * static_cast<float>(ls[s]);
    for (int i = 0; i < kSub; ++i) {
      const int k = s * kSub + i;
      q[k] = static_cast<uint8_t>(requantize(x[k], step, -kNmax, kNmax - 1, found[k] - kNmax) + kNmax);
      hi[k] = q[k] >> 2;
      low[k] = q[k] & 3;
    }
  }
  pack_fields(hi, 1, 8, 1, out);
  pack_fields(low, 2, 4, 2, out + 32);
  uint8_t* sc = out + 96;
  uint32_t L[kNSub];
  for (int s = 0; s < kNSub; ++s) L[s] = static_cast<uint32_t>(ls[s] + kHalf);
  for (int i = 0; i < 8; ++i) sc[i] = static_cast<uint8_t>((L[i] & 0xF) | ((L[i + 8] & 0xF) << 4));
  for (int b = 0; b < 4; ++b) {
    uint32_t v = 0;
    for (int a = 0; a < 4; ++a) v += (L[4 * a + b] >> 4) << (2 * a);
    sc[8 + b] = static_cast<uint8_t>(v);
  }
  put_f16(out + 108, dv);
}

// q4k/q5k's shared part: the 16 header bytes (d, dmin, packed 6-bit scales and mins) and the levels.
void encode_k4(const float* x, const AffineSearch& search, uint8_t* header, uint8_t* q) {
  constexpr int kSub = 32, kNSub = kQKK / kSub;
  constexpr float kLevels = 63;  // 6-bit sub-block scales and mins
  uint8_t found[kQKK];
  float scales[kNSub], mins[kNSub], weight[kQKK];
  for (int s = 0; s < kNSub; ++s) {
    const float* xs = x + s * kSub;
    float sum2 = 0;
    for (int i = 0; i < kSub; ++i) sum2 += xs[i] * xs[i];
    const float rms = static_cast<float>(std::sqrt(static_cast<double>(sum2 / static_cast<float>(kSub))));
    for (int i = 0; i < kSub; ++i) weight[s * kSub + i] = rms + std::fabs(xs[i]);  // weights favour large |x|
  }
  if (search.nmax == kQ4KSearch.nmax)  // one instance per search: its constants fold into the loops
    affine_search_lanes<kSub, kNSub>(x, weight, kQ4KSearch, found, scales, mins);
  else
    affine_search_lanes<kSub, kNSub>(x, weight, kQ5KSearch, found, scales, mins);
  const float max_scale = positive_max(scales, kNSub), max_min = positive_max(mins, kNSub);
  const float d = as_f16(max_scale / kLevels), dmin = as_f16(max_min / kLevels);
  uint32_t ls[kNSub], lm[kNSub];
  for (int s = 0; s < kNSub; ++s) {
    // ggml stores the levels in uint8_t before clamping to 63: a negative one wraps to the top.
    ls[s] = static_cast<uint32_t>(scale_level(scales[s], max_scale, kLevels)) & 0xFF;
    lm[s] = static_cast<uint32_t>(scale_level(mins[s], max_min, kLevels)) & 0xFF;
    if (ls[s] > 63) ls[s] = 63;
    if (lm[s] > 63) lm[s] = 63;
    const float step = d * static_cast<float>(ls[s]), offset = dmin * static_cast<float>(lm[s]);
    for (int i = 0; i < kSub; ++i) {
      const int k = s * kSub + i;
      q[k] = static_cast<uint8_t>(requantize(x[k] + offset, step, 0, search.nmax, found[k]));
    }
  }
  put_f16(header, max_scale / kLevels);
  put_f16(header + 2, max_min / kLevels);
  for (int i = 0; i < 4; ++i) {
    header[4 + i] = static_cast<uint8_t>(ls[i] | ((ls[i + 4] >> 4) << 6));
    header[8 + i] = static_cast<uint8_t>(lm[i] | ((lm[i + 4] >> 4) << 6));
    header[12 + i] = static_cast<uint8_t>((ls[i + 4] & 0xF) | ((lm[i + 4] & 0xF) << 4));
  }
}

void encode_q4k(const float* x, uint8_t* out) {
  uint8_t q[kQKK], nib[kQKK];
  encode_k4(x, kQ4KSearch, out, q);
  for (int k = 0; k < kQKK; ++k) nib[k] = q[k] & 0xF;
  pack_fields(nib, 4, 2, 4, out + 16);
}

void encode_q5k(const float* x, uint8_t* out) {
  uint8_t q[kQKK], nib[kQKK], hi[kQKK];
  encode_k4(x, kQ5KSearch, out, q);
  for (int k = 0; k < kQKK; ++k) {
    nib[k] = q[k] & 0xF;
    hi[k] = q[k] >> 4;
  }
  pack_fields(hi, 1, 8, 1, out + 16);
  pack_fields(nib, 4, 2, 4, out + 48);
}

void encode_q6k(const float* x, uint8_t* out) {
  constexpr int kSub = 16, kNSub = kQKK / kSub, kNmax = 32, kHalf = 128;
  uint8_t found[kQKK], q[kQKK], hi[kQKK];
  float scales[kNSub];
  int32_t ls[kNSub];
  symmetric_search_lanes<kSub, kNSub>(x, kNmax, found, scales);
  const float peak = scales[argmax_abs(scales, kNSub)];
  const bool live = std::fabs(peak) >= kGroupMaxEps;  // an all-zero super-block is stored as zero bytes
  const float iscale = -static_cast<float>(kHalf) / (live ? peak : 1.0f);
  for (int s = 0; s < kNSub; ++s) ls[s] = live ? to_i32(clampf(round_even(iscale * scales[s]), -kHalf, kHalf - 1)) : 0;
  const float dv = live ? 1.0f / iscale : 0.0f;
  const float d = as_f16(dv);
  for (int s = 0; s < kNSub; ++s) {
    const float step = d * static_cast<float>(ls[s]);
    for (int i = 0; i < kSub; ++i) {
      const int k = s * kSub + i;
      q[k] = live ? static_cast<uint8_t>(requantize(x[k], step, -kNmax, kNmax - 1, found[k] - kNmax) + kNmax) : 0;
      hi[k] = q[k] >> 4;
    }
  }
  // ql: per 128 weights, runs 0 and 1 in the low nibbles, runs 2 and 3 in the high ones.
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < 32; ++j) {
        const uint8_t* base = q + h * 128;
        out[h * 64 + r * 32 + j] = static_cast<uint8_t>((base[r * 32 + j] & 0xF) | ((base[(r + 2) * 32 + j] & 0xF) << 4));
      }
  pack_fields(hi, 2, 4, 2, out + 128);
  for (int s = 0; s < kNSub; ++s) out[192 + s] = static_cast<uint8_t>(static_cast<int8_t>(ls[s]));
  put_f16(out + 208, dv);
}

// --------------------------------------------------------------------------------------- legacy

void pack_nibbles(const uint8_t* q, uint8_t* out) {
  for (int i = 0; i < kQK / 2; ++i) out[i] = static_cast<uint8_t>((q[i] & 0xF) | ((q[i + kQK / 2] & 0xF) << 4));
}

void pack_high_bits(const uint8_t* q, uint8_t* out) {
  for (int b = 0; b < 4; ++b) {
    uint32_t v = 0;
    for (int k = 0; k < 8; ++k) v |= static_cast<uint32_t>(q[b * 8 + k] >> 4) << k;
    out[b] = static_cast<uint8_t>(v);
  }
}

// GGML's `(int)(y)` on y >= 0 (the + 0.5 rounds), clamped to the top level.
uint8_t truncate_level(float y, int levels) {
  const float t = std::trunc(y);
  return static_cast<uint8_t>(static_cast<int>(t > levels - 1 ? static_cast<float>(levels - 1) : t));
}

// Symmetric formats (q4_0, q5_0): d = the signed extreme / -(levels / 2).
float symmetric_levels(const float* x, int levels, uint8_t* q) {
  const float d = x[argmax_abs(x, kQK)] / static_cast<float>(-(levels / 2));
  const float inv = d == 0 ? 0.0f : 1.0f / d;
  const float offset = static_cast<float>(levels / 2) + 0.5f;
  for (int i = 0; i < kQK; ++i) q[i] = truncate_level(x[i] * inv + offset, levels);
  return d;
}

// Affine formats (q4_1, q5_1): m = min, d = (max - min) / (levels - 1).
float affine_levels(const float* x, int levels, uint8_t* q, float* lo_out) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < kQK; ++i) {
    lo = x[i] < lo ? x[i] : lo;  // the first of equal values, as ggml's running min and max
    hi = x[i] > hi ? x[i] : hi;
  }
  const float d = (hi - lo) / static_cast<float>(levels - 1);
  const float inv = d == 0 ? 0.0f : 1.0f / d;
  for (int i = 0; i < kQK; ++i) q[i] = truncate_level((x[i] - lo) * inv + 0.5f, levels);
  *lo_out = lo;
  return d;
}

void encode_q4_0(const float* x, uint8_t* out) {
  uint8_t q[kQK];
  put_f16(out, symmetric_levels(x, 16, q));
  pack_nibbles(q, out + 2);
}

void encode_q4_1(const float* x, uint8_t* out) {
  uint8_t q[kQK];
  float lo;
  put_f16(out, affine_levels(x, 16, q, &lo));
  put_f16(out + 2, lo);
  pack_nibbles(q, out + 4);
}

void encode_q5_0(const float* x, uint8_t* out) {
  uint8_t q[kQK];
  put_f16(out, symmetric_levels(x, 32, q));
  pack_high_bits(q, out + 2);
  pack_nibbles(q, out + 6);
}

void encode_q5_1(const float* x, uint8_t* out) {
  uint8_t q[kQK];
  float lo;
  put_f16(out, affine_levels(x, 32, q, &lo));
  put_f16(out + 2, lo);
  pack_high_bits(q, out + 4);
  pack_nibbles(q, out + 8);
}

void encode_q8_0(const float* x, uint8_t* out) {
  float amax = 0;
  for (int i = 0; i < kQK; ++i) amax = max_abs(amax, x[i]);
  const float d = amax / 127.0f;
  const float inv = d == 0 ? 0.0f : 1.0f / d;
  put_f16(out, d);
  // Round half away from zero (roundf) from the exact fraction, as legacy._q8_0_blocks; branch-free
  // loops the compiler vectorizes.
  float r[kQK];
  int32_t q[kQK];
  for (int i = 0; i < kQK; ++i) {
    const float y = x[i] * inv;
    const float a = std::fabs(y);
    const float whole = std::floor(a);
    const float mag = whole + (a - whole >= 0.5f ? 1.0f : 0.0f);
    r[i] = y < 0 ? -mag : mag;
  }
  for (int i = 0; i < kQK; ++i) q[i] = static_cast<int32_t>(r[i]);
  for (int i = 0; i < kQK; ++i) out[2 + i] = static_cast<uint8_t>(q[i]);
}

// ------------------------------------------------------------------------------------- dispatch

struct Format {
  int ggml_type;
  int block_size;
  int type_size;
  void (*encode)(const float*, uint8_t*);
};

constexpr Format kFormats[] = {
    {2, kQK, 18, encode_q4_0},    {3, kQK, 20, encode_q4_1},    {6, kQK, 22, encode_q5_0},
    {7, kQK, 24, encode_q5_1},    {8, kQK, 34, encode_q8_0},    {10, kQKK, 84, encode_q2k},
    {11, kQKK, 110, encode_q3k},  {12, kQKK, 144, encode_q4k},  {13, kQKK, 176, encode_q5k},
    {14, kQKK, 210, encode_q6k},
};

void encode_range(const Format& f, int input, const void* src, uint8_t* dst, int64_t first, int64_t last) {
  float buf[kQKK];
  for (int64_t b = first; b < last; ++b) {
    const int64_t at = b * f.block_size;
    const float* x = buf;
    if (input == kF32) {
      x = static_cast<const float*>(src) + at;
    } else if (input == kF16) {
#ifdef __FLT16_MAX__  // the compiler's own half type: vectorized (F16C) exact conversions
      const _Float16* h = static_cast<const _Float16*>(src) + at;
      for (int i = 0; i < f.block_size; ++i) buf[i] = static_cast<float>(h[i]);
#else
      const uint16_t* h = static_cast<const uint16_t*>(src) + at;
      for (int i = 0; i < f.block_size; ++i) buf[i] = f16_to_f32(h[i]);
#endif
    } else {
      const uint16_t* h = static_cast<const uint16_t*>(src) + at;
      for (int i = 0; i < f.block_size; ++i) buf[i] = bf16_to_f32(h[i]);
    }
    f.encode(x, dst + b * f.type_size);
  }
}

}  // namespace

extern "C" {

// Bumped whenever the ABI below changes: the loader refuses a library that reports another.
int llmc_quant_abi_version() { return 1; }

// Quantize `n_blocks` consecutive blocks of `src` (float32, float16 or bfloat16 as `input` says) into
// `dst` (n_blocks * type_size bytes) as GGML type `ggml_type`, on `threads` threads.
// Returns 0, or -1 for an unknown type or input.
int llmc_quantize(int ggml_type, int input, const void* src, int64_t n_blocks, void* dst, int threads) {
  const Format* f = nullptr;
  for (const Format& c : kFormats)
    if (c.ggml_type == ggml_type) f = &c;
  if (f == nullptr || input < kF32 || input > kBF16 || n_blocks < 0) return -1;
  uint8_t* out = static_cast<uint8_t*>(dst);
  if (threads < 1) threads = 1;
  if (threads > n_blocks) threads = static_cast<int>(n_blocks > 0 ? n_blocks : 1);
  if (threads == 1) {
    encode_range(*f, input, src, out, 0, n_blocks);
    return 0;
  }
  std::vector<std::thread> pool;
  const int64_t per = n_blocks / threads, extra = n_blocks % threads;
  int64_t start = 0;
  for (int t = 0; t < threads; ++t) {
    const int64_t stop = start + per + (t < extra ? 1 : 0);
    pool.emplace_back(encode_range, std::cref(*f), input, src, out, start, stop);
    start = stop;
  }
  for (std::thread& th : pool) th.join();
  return 0;
}

}  // extern "C"
