// One decode step of our Llama-style decoder (inference/models/llama.py) in one call: every layer's norms, qgemv
// products, RoPE, K/V write, paged attention and gated MLP, then the final norm. The eager model spends as much
// time dispatching its ~60 small ops a layer as the products take on a 0.5B model; here they are plain loops.
//
// The values are the eager model's: a bf16 model rounds to bf16 where each of its torch ops does (after the norm's
// scaling, each product, each RoPE term, the SiLU, each residual add), a float32 one rounds nowhere; the
// arithmetic between is float32. Only the summation order of reductions differs (the norm's mean of squares, the
// attention's dot products and softmax), so hidden states agree with the eager step to float32 rounding, not bit
// for bit. inference/fused_decode.py hands the weights over and says when a step may run here.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "qgemv.h"

namespace {

// The tensors each layer hands over, in this order (an empty tensor where the model has none: biases, q/k norms,
// and the super-blocks of a product whose scales are not Q4_K's compact ones).
enum Slot : int64_t {
  kInputNorm,
  kQkvCodes, kQkvScales, kQkvMins, kQkvSupers, kQkvBias,
  kQNorm, kKNorm,
  kOCodes, kOScales, kOMins, kOSupers, kOBias,
  kPostNorm,
  kGateUpCodes, kGateUpScales, kGateUpMins, kGateUpSupers,
  kDownCodes, kDownScales, kDownMins, kDownSupers,
  kSlots
};
// ... and its integers: each product's code width and `dense_rows`, in the order qkv, o, gate_up, down.
constexpr int64_t kInts = 8;
// A step's attention runs on the thread pool above this many query-key pairs (rows x query heads x keys). One
// Qwen2.5-0.5B row over 1,000 keys (14,000 pairs) took 4.2 ms a step on one thread and 2.0 on two; over 200 keys
// (2,800 pairs) it takes 0.4-0.6 ms a step on one. The threshold between the two was not tuned further.
constexpr int64_t kSerialPairs = int64_t{1} << 12;

// A value as the model's dtype holds it: rounded to nearest even for bf16, unchanged for float32.
template <typename T>
inline float held(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// out = w * held(x / rms(x)) over one vector of n values (the eager `weight * (xf * rsqrt(mean(xf^2) + eps)).to(T)`).
template <typename T>
void rms_norm(const T* x, const T* w, int64_t n, float eps, T* out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(static_cast<float>(w[i]) * held<T>(static_cast<float>(x[i]) * r));
  }
}

// residual = held(x + residual), out = rms_norm(residual): one row of `RMSNorm.forward_add`.
template <typename T>
void add_rms_norm(const T* x, T* residual, const T* w, int64_t n, float eps, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    residual[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
  }
  rms_norm(residual, w, n, eps, out);
}

template <typename T>
void add_bias(at::Tensor& y, const at::Tensor& bias) {
  if (!bias.numel()) return;
  const int64_t rows = y.size(0), n = y.size(1);
  T* yp = y.data_ptr<T>();
  const T* b = bias.data_ptr<T>();
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < n; ++i) {
      yp[m * n + i] = static_cast<T>(static_cast<float>(yp[m * n + i]) + static_cast<float>(b[i]));
    }
  }
}

// Rotate-half RoPE of one head in place: x * cos + cat(-x2, x1) * sin, each term held as the eager ops hold it.
template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t d, float* scratch) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) scratch[i] = static_cast<float>(x[i]);
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -scratch[i + half] : scratch[i - half];
    const float a = held<T>(scratch[i] * static_cast<float>(cos[i]));
    const float b = held<T>(rotated * static_cast<float>(sin[i]));
    x[i] = static_cast<T>(a + b);
  }
}

struct Shape {
  int64_t heads, kv_heads, head_dim, block_size;
  float scale;
};

// One vector of float32 lanes, for the attention's loops: AVX512 or AVX2, as the library is built.
#if defined(__AVX512F__)
struct Vec {
  static constexpr int64_t kLanes = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec all(float f) { return {_mm512_set1_ps(f)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {  // bf16 is float32's upper half
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
// a where x >= lo, else 0
inline Vec zero_below(Vec a, Vec x, float lo) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(lo), _CMP_GE_OQ), a.v)};
}
inline Vec sub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec round_nearest(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec times_pow2(Vec a, Vec n) { return {_mm512_scalef_ps(a.v, n.v)}; }
inline Vec div(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec neg_abs(Vec a) {  // the sign bit set (an integer or: AVX512F has no float one)
  return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)))};
}
// a where x >= 0, else b
inline Vec where_nonnegative(Vec x, Vec a, Vec b) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_GE_OQ), b.v, a.v)};
}
inline float sum(Vec a) { return _mm512_reduce_add_ps(a.v); }
// Lane i of the result: the sum of v[i]'s lanes, for 16 vectors. Pairs of vectors are interleaved and added within
// 128-bit chunks, then pairs of pairs, then the chunks: 45 instructions where 16 horizontal sums take about 130.
inline Vec lane_sums(const Vec* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v), _mm512_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  }
  for (int j = 0; j < 4; ++j) {  // chunk c of b[j]: chunk c's sums of vectors 4j .. 4j + 3
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return {_mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)))};
}
// float32 -> bf16 -> float32, nearest even (finite values)
inline Vec round_bf16(Vec a) {
  const __m512i bits = _mm512_castps_si512(a.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return {_mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
#else
struct Vec {
  static constexpr int64_t kLanes = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec all(float f) { return {_mm256_set1_ps(f)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {  // bf16 is float32's upper half
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec zero_below(Vec a, Vec x, float lo) {
  return {_mm256_and_ps(a.v, _mm256_cmp_ps(x.v, _mm256_set1_ps(lo), _CMP_GE_OQ))};
}
inline Vec sub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec round_nearest(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec div(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec neg_abs(Vec a) { return {_mm256_or_ps(a.v, _mm256_set1_ps(-0.f))}; }
inline Vec where_nonnegative(Vec x, Vec a, Vec b) {
  return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_GE_OQ))};
}
inline Vec times_pow2(Vec a, Vec n) {  // n integral, within float32's exponent range (exp clamps it)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(a.v, _mm256_castsi256_ps(e))};
}
inline float sum(Vec a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
// Lane i of the result: the sum of v[i]'s lanes, for 8 vectors (as the AVX512 version, with two 128-bit chunks).
inline Vec lane_sums(const Vec* v) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v), _mm256_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  }
  for (int j = 0; j < 2; ++j) {
    const __m256d x = _mm256_castps_pd(a[2 * j]), y = _mm256_castps_pd(a[2 * j + 1]);
    b[j] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return {_mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31))};
}
inline Vec round_bf16(Vec a) {
  const __m256i bits = _mm256_castps_si256(a.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  return {_mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
#endif

// e^x for x <= 0 (softmax terms), to a relative error of about 1e-7 (the truncation, r^7 / 7!, plus rounding):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, times 2^n. Below -87 (e^x under
// float32's normal range) it is 0.
inline Vec exp_nonpositive(Vec in) {
  const Vec x = max(in, Vec::all(-87.0f));
  const Vec n = round_nearest(mul(x, Vec::all(1.44269504088896341f)));
  Vec r = fma(n, Vec::all(-0.693145751953125f), x);  // ln2 in two parts: r exact to float32
  r = fma(n, Vec::all(-1.42860682030941723212e-6f), r);
  Vec p = Vec::all(1.f / 720);
  p = fma(p, r, Vec::all(1.f / 120));
  p = fma(p, r, Vec::all(1.f / 24));
  p = fma(p, r, Vec::all(1.f / 6));
  p = fma(p, r, Vec::all(0.5f));
  p = fma(p, r, Vec::all(1.f));
  p = fma(p, r, Vec::all(1.f));
  return zero_below(times_pow2(p, n), in, -87.0f);
}

// SiLU of `n` gate values into `out`, unrounded, a vector at a time: g / (1 + e^-g) with e^-g from
// `exp_nonpositive` (for g < 0, g e^g / (1 + e^g)). std::exp a value at a time took 0.5 ms of a 4.9 ms Qwen2.5-0.5B
// step (24 layers of 4,864).
template <typename T>
void silu(const T* gate, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + Vec::kLanes <= n; i += Vec::kLanes) {
    const Vec g = Vec::load(gate + i);
    const Vec e = exp_nonpositive(neg_abs(g));  // e^-|g|
    const Vec num = where_nonnegative(g, g, mul(g, e));
    div(num, add(e, Vec::all(1.f))).store(out + i);
  }
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    out[i] = g / (1.f + std::exp(-g));
  }
}

template <typename T>
inline Vec held_vec(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return round_bf16(v);
  }
}

// How many positions ahead `widen_rows` prefetches. A kv head's rows are `kv_heads * d` values apart in the cache,
// a stride the hardware prefetchers of the AMD EPYC of docs/engine.md did not follow well: without this, the
// attention of a 2,000-token Qwen2.5-0.5B step took nearly twice as long (4.5 against 2.4 ms; 16 positions ahead:
// 3.5 ms, 64: 2.6).
constexpr int64_t kPrefetchPositions = 32;

// Row position `p` of kv head g in a cache of `table`'s blocks.
template <typename T>
inline const T* cache_row(const T* cache, const int32_t* table, int64_t p, int64_t g, const Shape& s) {
  const int64_t slot = static_cast<int64_t>(table[p / s.block_size]) * s.block_size + p % s.block_size;
  return cache + (slot * s.kv_heads + g) * s.head_dim;
}

// Positions p0 .. p0 + n of a row's K (or V) for kv head g as float32 rows of `d` (vectors where d allows), the
// rows `kPrefetchPositions` further on (up to `context`) fetched meanwhile.
template <typename T>
void widen_rows(const T* cache, const int32_t* table, int64_t p0, int64_t n, int64_t context, int64_t g,
                const Shape& s, float* out) {
  const int64_t d = s.head_dim, row_bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t ahead = p0 + t + kPrefetchPositions;
    if (ahead < context) {
      const char* next = reinterpret_cast<const char*>(cache_row(cache, table, ahead, g, s));
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    const T* row = cache_row(cache, table, p0 + t, g, s);
    float* o = out + t * d;
    int64_t i = 0;
    for (; i + Vec::kLanes <= d; i += Vec::kLanes) Vec::load(row + i).store(o + i);
    for (; i < d; ++i) o[i] = static_cast<float>(row[i]);
  }
}

// The lane-wise products of q and k summed over the first `whole` values (a multiple of the vector).
inline Vec products(const float* q, const float* k, int64_t whole) {
  Vec a = Vec::zero();
  for (int64_t i = 0; i < whole; i += Vec::kLanes) a = fma(Vec::load(q + i), Vec::load(k + i), a);
  return a;
}

// Scratch of one (row, kv head) pair, reused across the pairs a thread takes.
struct AttendScratch {
  std::vector<float> scores;  // group x context rounded up to a vector
  std::vector<float> acc;     // group x d
  std::vector<float> q;       // group x d, the query heads as float32
  std::vector<float> rows;    // a vector's worth of positions of K or V, x d, as float32
  std::vector<float> totals;  // group
};

// Attention of row m's query heads that share kv head g, over the row's `context` positions (its new K/V already in
// the cache at `table`'s blocks): scores in float32, their softmax, the weights held in T before they meet V (as
// SDPA's CPU kernel does for bf16), the output held in T. K and V are widened to float32 a vector's worth of
// positions at a time, once for all the heads of the group; a vector of positions' dot products are summed
// together (`lane_sums`) into one vector of scores.
template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t context, int64_t g,
            const Shape& s, T* out, AttendScratch& w) {
  constexpr int64_t W = Vec::kLanes;
  const int64_t d = s.head_dim, group = s.heads / s.kv_heads;
  const int64_t padded = (context + W - 1) / W * W;
  const int64_t whole = d / W * W;  // d's whole vectors; the rest is summed one value at a time
  w.scores.resize(group * padded);
  w.acc.assign(group * d, 0.f);
  w.q.resize(group * d);
  w.rows.resize(W * d);
  w.totals.resize(group);
  for (int64_t i = 0; i < group * d; ++i) w.q[i] = static_cast<float>(q[g * group * d + i]);
  float* rows = w.rows.data();
  const Vec scale = Vec::all(s.scale);
  for (int64_t p0 = 0; p0 < context; p0 += W) {
    const int64_t n = std::min(W, context - p0);
    widen_rows(k_cache, table, p0, n, context, g, s, rows);
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = &w.q[h * d];
      Vec dots[W];
      for (int64_t t = 0; t < n; ++t) dots[t] = products(qh, rows + t * d, whole);
      for (int64_t t = n; t < W; ++t) dots[t] = Vec::zero();
      float* sh = &w.scores[h * padded + p0];
      mul(lane_sums(dots), scale).store(sh);
      for (int64_t t = 0; t < W; ++t) {
        if (t >= n) {
          sh[t] = -std::numeric_limits<float>::infinity();  // past the context: a weight of 0
        } else if (whole < d) {
          float rest = 0.f;
          for (int64_t i = whole; i < d; ++i) rest += qh[i] * rows[t * d + i];
          sh[t] += rest * s.scale;
        }
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* sh = &w.scores[h * padded];
    Vec best = Vec::all(-std::numeric_limits<float>::infinity());
    for (int64_t p = 0; p < padded; p += W) best = max(best, Vec::load(sh + p));
    float lanes[W];
    best.store(lanes);
    const float top = *std::max_element(lanes, lanes + W);
    Vec total = Vec::zero();
    for (int64_t p = 0; p < padded; p += W) {
      const Vec e = exp_nonpositive(sub(Vec::load(sh + p), Vec::all(top)));
      total = add(total, e);
      held_vec<T>(e).store(sh + p);
    }
    w.totals[h] = sum(total);
  }
  for (int64_t p0 = 0; p0 < context; p0 += W) {
    const int64_t n = std::min(W, context - p0);
    widen_rows(v_cache, table, p0, n, context, g, s, rows);
    for (int64_t h = 0; h < group; ++h) {
      const float* weights = &w.scores[h * padded + p0];
      float* ah = &w.acc[h * d];
      for (int64_t i = 0; i < whole; i += W) {
        // two chains of sums (even and odd positions): one would wait on the FMA's latency at every position
        Vec a = Vec::load(ah + i), b = Vec::zero();
        int64_t t = 0;
        for (; t + 1 < n; t += 2) {
          a = fma(Vec::all(weights[t]), Vec::load(rows + t * d + i), a);
          b = fma(Vec::all(weights[t + 1]), Vec::load(rows + (t + 1) * d + i), b);
        }
        if (t < n) a = fma(Vec::all(weights[t]), Vec::load(rows + t * d + i), a);
        add(a, b).store(ah + i);
      }
      for (int64_t i = whole; i < d; ++i) {
        for (int64_t t = 0; t < n; ++t) ah[i] += weights[t] * rows[t * d + i];
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    for (int64_t i = 0; i < d; ++i) out[(g * group + h) * d + i] = static_cast<T>(w.acc[h * d + i] / w.totals[h]);
  }
}

template <typename T>
at::Tensor run_step(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                    const std::vector<at::Tensor>& weights, const std::vector<int64_t>& ints,
                    const at::Tensor& final_norm, const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                    const at::Tensor& block_tables, const at::Tensor& context_lens, const Shape& s, double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t rows = x_in.size(0), hidden = x_in.size(1), d = s.head_dim;
  const int64_t layers = static_cast<int64_t>(weights.size()) / kSlots;
  const int64_t q_size = s.heads * d, kv_size = s.kv_heads * d, qkv_size = q_size + 2 * kv_size;
  const int64_t layer_stride = kv_cache.stride(1), kv_stride = kv_cache.stride(0);
  const int64_t token = kv_size, width = block_tables.size(1);
  T* cache = kv_cache.data_ptr<T>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* contexts = context_lens.data_ptr<int32_t>();
  const auto opts = x_in.options();

  at::Tensor x = x_in;  // the last layer's output (read only at layer 0: the residual takes a copy)
  at::Tensor residual = at::empty({rows, hidden}, opts);
  at::Tensor normed = at::empty({rows, hidden}, opts);
  at::Tensor attn = at::empty({rows, q_size}, opts);
  std::vector<float> scratch(d);
  std::vector<float> silu_row;  // one row's SiLU, before rounding
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  T* np = normed.data_ptr<T>();
  T* ap = attn.data_ptr<T>();

  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[l * kSlots];
    const int64_t* n = &ints[l * kInts];
    const T* in_norm = w[kInputNorm].data_ptr<T>();
    for (int64_t m = 0; m < rows; ++m) {
      if (l == 0) {
        std::copy(xp + m * hidden, xp + (m + 1) * hidden, rp + m * hidden);
        rms_norm(rp + m * hidden, in_norm, hidden, eps, np + m * hidden);
      } else {
        add_rms_norm(xp + m * hidden, rp + m * hidden, in_norm, hidden, eps, np + m * hidden);
      }
    }

    at::Tensor qkv =
        QGEMV_NAMESPACE::q_linear(normed, w[kQkvCodes], w[kQkvScales], w[kQkvMins], n[0], n[1], w[kQkvSupers]);
    add_bias<T>(qkv, w[kQkvBias]);
    T* qkvp = qkv.data_ptr<T>();
    const T* q_norm = ptr<T>(w[kQNorm]);
    const T* k_norm = ptr<T>(w[kKNorm]);
    T* k_layer = cache + l * layer_stride;
    T* v_layer = k_layer + kv_stride;
    for (int64_t m = 0; m < rows; ++m) {
      T* row = qkvp + m * qkv_size;
      const T* c = cos.data_ptr<T>() + m * d;
      const T* sn = sin.data_ptr<T>() + m * d;
      for (int64_t h = 0; h < s.heads + s.kv_heads; ++h) {
        T* head = row + h * d;
        const T* norm = h < s.heads ? q_norm : k_norm;
        if (norm) rms_norm(head, norm, d, eps, head);
        rotate(head, c, sn, d, scratch.data());
      }
      const int64_t slot = slots[m];
      std::copy(row + q_size, row + q_size + kv_size, k_layer + slot * token);
      std::copy(row + q_size + kv_size, row + qkv_size, v_layer + slot * token);
    }
    // (row, kv head) pairs on the thread pool above kSerialPairs query-key pairs, on the calling thread below
    int64_t keys = 0;
    for (int64_t m = 0; m < rows; ++m) keys += contexts[m];
    const int64_t pairs = rows * s.kv_heads;
    const int64_t grain = keys * s.heads <= kSerialPairs ? pairs : 1;
    at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
      AttendScratch scratch_pair;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m = i / s.kv_heads, g = i % s.kv_heads;
        attend<T>(qkvp + m * qkv_size, k_layer, v_layer, tables + m * width, contexts[m], g, s, ap + m * q_size,
                  scratch_pair);
      }
    });

    at::Tensor o = QGEMV_NAMESPACE::q_linear(attn, w[kOCodes], w[kOScales], w[kOMins], n[2], n[3], w[kOSupers]);
    add_bias<T>(o, w[kOBias]);
    const T* op = o.data_ptr<T>();
    const T* post_norm = w[kPostNorm].data_ptr<T>();
    for (int64_t m = 0; m < rows; ++m) {
      add_rms_norm(op + m * hidden, rp + m * hidden, post_norm, hidden, eps, np + m * hidden);
    }

    at::Tensor gate_up = QGEMV_NAMESPACE::q_linear(normed, w[kGateUpCodes], w[kGateUpScales], w[kGateUpMins], n[4],
                                                   n[5], w[kGateUpSupers]);
    const int64_t inter = gate_up.size(1) / 2;
    at::Tensor act = at::empty({rows, inter}, opts);
    const T* gp = gate_up.data_ptr<T>();
    T* actp = act.data_ptr<T>();
    silu_row.resize(inter);
    for (int64_t m = 0; m < rows; ++m) {
      const T* g = gp + m * 2 * inter;
      silu(g, inter, silu_row.data());
      // the eager model rounds the SiLU, then the product
      for (int64_t i = 0; i < inter; ++i) {
        actp[m * inter + i] = static_cast<T>(held<T>(silu_row[i]) * static_cast<float>(g[inter + i]));
      }
    }
    x = QGEMV_NAMESPACE::q_linear(act, w[kDownCodes], w[kDownScales], w[kDownMins], n[6], n[7], w[kDownSupers]);
    xp = x.data_ptr<T>();
  }

  const T* fn = final_norm.data_ptr<T>();
  for (int64_t m = 0; m < rows; ++m) add_rms_norm(xp + m * hidden, rp + m * hidden, fn, hidden, eps, np + m * hidden);
  return normed;
}

// The final norm's output [rows, hidden] of a decode step of `rows` sequences, one new token each: `x` their
// embeddings, `cos` / `sin` [rows, head_dim] their RoPE rows, `weights` kSlots tensors a layer and `ints` kInts
// integers a layer (see above), `kv_cache` [2, layers, blocks, block_size, kv_heads, head_dim], written at
// `slot_mapping` [rows] (int64); `block_tables` [rows, width] and `context_lens` [rows] (int32) as the engine's
// metadata holds them. Every tensor in the model's dtype (float32 or bf16) but the codes, scales and mins.
at::Tensor decode_step(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList weights,
                       at::IntArrayRef ints, const at::Tensor& final_norm, const at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                       const at::Tensor& context_lens, int64_t heads, int64_t kv_heads, double eps, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(weights.size() % kSlots == 0 && !weights.empty() &&
                  ints.size() == weights.size() / kSlots * kInts,
              "weights must hold ", int64_t{kSlots}, " tensors a layer and ints ", kInts, " integers a layer");
  const int64_t rows = x.size(0), layers = static_cast<int64_t>(weights.size()) / kSlots;
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.is_contiguous() && kv_cache.scalar_type() == dtype &&
                  kv_cache.size(0) == 2 && kv_cache.size(1) == layers && kv_cache.size(4) == kv_heads,
              "kv_cache must be contiguous [2, layers, blocks, block_size, kv_heads, head_dim] in x's dtype");
  const int64_t d = kv_cache.size(5);
  TORCH_CHECK(heads % kv_heads == 0 && d % 2 == 0, "heads must be a multiple of kv_heads and head_dim even");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == dtype && t->numel() == rows * d,
                "cos and sin must be contiguous [rows, head_dim] in x's dtype");
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == rows,
              "slot_mapping must be contiguous int64 [rows]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == rows && context_lens.scalar_type() == at::kInt &&
                  context_lens.is_contiguous() && context_lens.numel() == rows,
              "block_tables must be contiguous int32 [rows, width] and context_lens int32 [rows]");
  const int64_t block_size = kv_cache.size(3), slots = kv_cache.size(2) * block_size;
  const int64_t* sm = slot_mapping.data_ptr<int64_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  for (int64_t m = 0; m < rows; ++m) {
    TORCH_CHECK(sm[m] >= 0 && sm[m] < slots, "slot ", sm[m], " is outside the cache");
    TORCH_CHECK(ctx[m] >= 1 && ctx[m] <= block_tables.size(1) * block_size, "context ", ctx[m],
                " is outside the row's block table");
    for (int64_t b = 0; b < (ctx[m] + block_size - 1) / block_size; ++b) {
      TORCH_CHECK(bt[m * block_tables.size(1) + b] >= 0 && bt[m * block_tables.size(1) + b] < kv_cache.size(2),
                  "block ", bt[m * block_tables.size(1) + b], " is outside the cache");
    }
  }
  const int64_t hidden = x.size(1);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[l * kSlots];
    for (Slot slot : {kInputNorm, kPostNorm}) {
      TORCH_CHECK(w[slot].scalar_type() == dtype && w[slot].is_contiguous() && w[slot].numel() == hidden,
                  "layer ", l, ": the norm weights must be contiguous [hidden] in x's dtype");
    }
    for (Slot slot : {kQkvBias, kOBias, kQNorm, kKNorm}) {
      TORCH_CHECK(!w[slot].numel() || (w[slot].scalar_type() == dtype && w[slot].is_contiguous()),
                  "layer ", l, ": biases and q/k norms must be empty or contiguous in x's dtype");
    }
    TORCH_CHECK(w[kQkvCodes].size(0) == (heads + 2 * kv_heads) * d && w[kOCodes].size(0) == hidden &&
                    w[kDownCodes].size(0) == hidden,
                "layer ", l, ": the products' output sizes do not match the heads and the hidden size");
    TORCH_CHECK((!w[kQkvBias].numel() || w[kQkvBias].numel() == (heads + 2 * kv_heads) * d) &&
                    (!w[kOBias].numel() || w[kOBias].numel() == hidden) &&
                    (!w[kQNorm].numel() || w[kQNorm].numel() == d) && (!w[kKNorm].numel() || w[kKNorm].numel() == d),
                "layer ", l, ": a bias or q/k norm has the wrong size");
  }
  TORCH_CHECK(final_norm.scalar_type() == dtype && final_norm.is_contiguous() && final_norm.numel() == hidden,
              "final_norm must be contiguous [hidden] in x's dtype");
  const Shape s{heads, kv_heads, d, block_size, static_cast<float>(scale)};
  const std::vector<at::Tensor> ws(weights.begin(), weights.end());
  const std::vector<int64_t> is(ints.begin(), ints.end());
  if (dtype == at::kFloat) {
    return run_step<float>(x, cos, sin, ws, is, final_norm, kv_cache, slot_mapping, block_tables, context_lens, s, eps);
  }
  return run_step<c10::BFloat16>(x, cos, sin, ws, is, final_norm, kv_cache, slot_mapping, block_tables, context_lens,
                                 s, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QGEMV_NAMESPACE, m) {
  m.def(
      "decode_step(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, int[] ints, Tensor final_norm, "
      "Tensor(a!) kv_cache, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int heads, int kv_heads, "
      "float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(QGEMV_NAMESPACE, CPU, m) { m.impl("decode_step", &decode_step); }
