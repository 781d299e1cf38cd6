// Decode attention over the paged KV cache on AVX-512 CPUs: one query per sequence, read from
// the cache in place (no gathered copy of the keys and values, which the plain-torch path makes).
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

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // floats per 512-bit vector

// exp(x) for x <= 0 (softmax arguments after the max is subtracted): 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, and p a degree-6 polynomial (relative error below 2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.f);  // exp below this underflows float32's normals
  x = _mm512_max_ps(x, lowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for accuracy
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// sum(v[i]) in lane i, for 16 vectors: a transposing tree of 45 shuffles and adds instead of 16
// full horizontal reductions.
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4];
  for (int k = 0; k < 8; ++k) w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                                                   _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
    x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

// One (sequence, KV head): its `kGroup` query heads over `count` cached positions whose rows are
// at `rows` (slot * kv_heads + kv head), keys and values of kVecs vectors each.
template <int kVecs, int kGroup>
void attend(const float* q, const float* keys, const float* values, const int64_t* rows, int64_t count, float scale,
            float* scores, float* out) {
  constexpr int64_t kDim = kVecs * kLanes;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < count; c += kLanes) {  // scores, 16 positions at a time
    const int64_t m = std::min<int64_t>(kLanes, count - c);
    const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1);
    for (int g = 0; g < kGroup; ++g) {
      __m512 part[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        part[i] = _mm512_setzero_ps();
        if (i < m) {
          const float* key = keys + rows[c + i] * kDim;
          for (int j = 0; j < kVecs; ++j)
            part[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * kDim + j * kLanes), _mm512_loadu_ps(key + j * kLanes), part[i]);
        }
      }
      _mm512_mask_storeu_ps(scores + g * count + c, valid, _mm512_mul_ps(reduce16(part), vscale));
    }
  }
  float inv[kGroup];
  for (int g = 0; g < kGroup; ++g) {  // softmax numerators in place, and 1 / their sum
    float* s = scores + g * count;
    __m512 peak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < count; i += kLanes) {
      const __mmask16 valid = static_cast<__mmask16>(count - i >= kLanes ? 0xFFFF : (1u << (count - i)) - 1);
      peak = _mm512_mask_max_ps(peak, valid, peak, _mm512_maskz_loadu_ps(valid, s + i));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += kLanes) {
      const __mmask16 valid = static_cast<__mmask16>(count - i >= kLanes ? 0xFFFF : (1u << (count - i)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + i), top));
      _mm512_mask_storeu_ps(s + i, valid, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, e));
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(total);
  }
  __m512 acc[kGroup][kVecs];
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < count; ++t) {  // weighted sum of the values
    const float* value = values + rows[t] * kDim;
    __m512 v[kVecs];
    for (int j = 0; j < kVecs; ++j) v[j] = _mm512_loadu_ps(value + j * kLanes);
    for (int g = 0; g < kGroup; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * count + t]);
      for (int j = 0; j < kVecs; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < kVecs; ++j)
      _mm512_storeu_ps(out + g * kDim + j * kLanes, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv[g])));
}

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

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode_attention: int64 tables and lengths");
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1,
              "paged_decode_attention: block_tables [B, W] and context_lens [B]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t slots = k_cache.size(0), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d && v_cache.size(0) == slots && v_cache.size(1) == kv_heads && v_cache.size(2) == d,
              "paged_decode_attention: caches do not match q");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "paged_decode_attention: heads must be a multiple of kv heads");
  const int64_t group = heads / kv_heads;
  const AttendFn run = d == 64 ? attend_for_group<4>(group) : d == 128 ? attend_for_group<8>(group) : nullptr;
  TORCH_CHECK(run != nullptr, "paged_decode_attention: head_dim 64 or 128 and up to 8 query heads per kv head");
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch && block_size > 0,
              "paged_decode_attention: one table and length per sequence");
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t width = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t cache_blocks = slots / block_size;
  for (int64_t b = 0; b < batch; ++b) {  // what the compiled step trusts must hold here too
    // Compared by division: no product of a stranger's values can overflow.
    TORCH_CHECK(lp[b] >= 1 && (lp[b] - 1) / block_size < width, "paged_decode_attention: a length is outside its table");
    for (int64_t j = 0; j <= (lp[b] - 1) / block_size; ++j)
      TORCH_CHECK(tp[b * width + j] >= 0 && tp[b * width + j] < cache_blocks,
                  "paged_decode_attention: a block id is outside the cache");
  }
  at::Tensor out = at::empty({batch, heads, d}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto fscale = static_cast<float>(scale);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads, n = lp[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, n - window) : 0, count = n - start;
      rows.resize(count);
      int64_t block = start / block_size, offset = start % block_size;
      for (int64_t i = 0; i < count; ++i) {  // row of each position: (slot * kv_heads + h)
        rows[i] = (tp[b * width + block] * block_size + offset) * kv_heads + h;
        if (++offset == block_size) offset = 0, ++block;
      }
      scores.resize(group * count);
      run(qp + (b * heads + h * group) * d, kp, vp, rows.data(), count, fscale, scores.data(),
          op + (b * heads + h * group) * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmc, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "int block_size, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
