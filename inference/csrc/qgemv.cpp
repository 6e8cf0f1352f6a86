// Decode-size products with weights quantized in blocks of 32 values (int4 or int8 codes, an fp16 scale and min
// per block). The activations are quantized to int8 in blocks of 32 too, so each block's dot product is an
// integer one (AVX512-VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`), scaled once per block. Built per CPU by
// inference/qgemv.py, which also lays the weights out as described there (`pack_codes`).
//
// A weight row is `w[k] = u[k] * scale[k / 32] + min[k / 32]` (`Meta`: fp16 scales and mins, or GGUF Q4_K's own
// 6-bit ones under an fp16 pair per 8 blocks), its blocks in three regions, in order (a weight without mins, an
// empty tensor, is symmetric: `min = -8 * scale` for 4 bits, as GGUF Q4_0; 0 for 8 bits):
//   - groups of 16 blocks: vector j (0..7) holds values 4j..4j+3 of each of the 16 blocks, block i at bytes
//     4i..4i+3, so eight integer dot products leave the 16 block sums in one register's 16 lanes;
//   - at most one group of 8 blocks, the same with 8 lanes (32-byte vectors);
//   - pairs of blocks: 64 values in order.
// int8 (`u` the signed code) takes a byte a value in that order. int4 (`u` in 0..15) packs two: in a group, the
// low nibbles of bytes 2t * width.. hold vector 2t and the high nibbles vector 2t + 1 (`width` the vector's
// bytes), so `& 0x0F` and `& 0xF0` (16 u, scaled back once per group) need no shift; in a pair, byte j holds value
// j (low) and value j + 32 (high). AVX2 has no unsigned-by-16 headroom (`vpmaddubsw` saturates at 2^15) and
// shifts instead.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "qgemv.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
// Software prefetch this many bytes ahead of the weight stream: the hardware prefetcher alone left int4 rows at
// about 24 GB/s on two AVX512 cores, 4 KB ahead reads them at 28-34 (measured 0.5-4 KB).
constexpr int64_t kPrefetch = 4096;

inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0); }

// The same for a run of `bytes` codes outside the groups of 16 (which prefetch as they go), and for the scales and
// mins of the row about as far ahead: without these, rows of 28 blocks (Qwen2.5-0.5B's 896) read at 17 GB/s.
inline void prefetch_run(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) prefetch(p + off);
}

struct Regions {
  int64_t groups16, group8, pairs;  // counts of each kind of block run in a row
  explicit Regions(int64_t blocks)
      : groups16(blocks / 16), group8((blocks % 16) / 8), pairs((blocks % 8) / 2) {}
};

// One activation row quantized per block of 32 and laid out as the weights are: `q` in the regions' order,
// `d[b]` the scale of block b, `s[b] = d[b] * sum of its codes` (for the weights' min term).
struct QuantRow {
  const int8_t* q;
  const float* d;
  const float* s;
};

// Where value v of block b lands in a row laid out by regions.
inline int64_t position(const Regions& r, int64_t b, int64_t v) {
  const int64_t b16 = r.groups16 * 16;
  if (b < b16) return (b / 16) * 512 + (v / 4) * 64 + (b % 16) * 4 + v % 4;
  if (b < b16 + 8 * r.group8) return b16 * kBlock + (v / 4) * 32 + (b - b16) * 4 + v % 4;
  return b * kBlock + v;
}

// Where chunk j (values 4j..4j+3) of block b lands: `position(r, b, 0) + j * stride`.
inline int64_t chunk_stride(const Regions& r, int64_t b) { return position(r, b, 4) - position(r, b, 0); }

// Forward declaration: each instruction set quantizes a block of 32 values to int8 (returns max |x|, `sum` the
// codes' sum), rounding `x * (127 / max)` half to even as `nearbyint` does (inference/qgemv.py rounds the same).
template <typename T>
float quantize_block(const T* x, int8_t* out, int32_t& sum);

// Each block b of a row quantized, then `place(b, codes, d, sum, first, stride)`: `d` its scale (max |x| / 127),
// chunk j of its codes (values 4j..4j+3) landing at `first + j * stride` in the layout.
template <typename T, typename Place>
void for_each_quantized_block(const T* x, int64_t k, const Regions& r, Place&& place) {
  alignas(64) int8_t codes[kBlock];
  for (int64_t b = 0; b < k / kBlock; ++b) {
    int32_t sum = 0;
    const float d = quantize_block(x + b * kBlock, codes, sum) / 127.f;
    place(b, codes, d, sum, position(r, b, 0), chunk_stride(r, b));
  }
}

template <typename T>
void quantize_row(const T* x, int64_t k, const Regions& r, int8_t* q, float* d, float* s) {
  auto place = [&](int64_t b, const int8_t* codes, float db, int32_t sum, int64_t first, int64_t stride) {
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
    for (int64_t j = 0; j < kBlock / 4; ++j) std::memcpy(q + first + j * stride, codes + 4 * j, 4);
  };
  for_each_quantized_block(x, k, r, place);
}

// `fn(row, m)` for each row m of a float32 or bf16 `x` [rows, K], rows on the thread pool once there are enough of
// them to pay for the fork (a prefill chunk).
template <typename Fn>
void for_each_row(const at::Tensor& x, Fn&& fn) {
  const int64_t k = x.size(1);
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, (int64_t{32} << 10) / k), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (x.scalar_type() == at::kFloat) {
        fn(x.data_ptr<float>() + m * k, m);
      } else {
        fn(x.data_ptr<c10::BFloat16>() + m * k, m);
      }
    }
  });
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// A super-block's 8 sub-scales and 8 sub-mins (6 bits each, packed in 12 bytes as GGUF Q4_K packs them: ggml's
// `get_scale_min_k4`), a byte each in block order, all eight at once in 32-bit words.
struct SubScales {
  uint64_t sc, mn;
};
inline SubScales unpack_sub_scales(const uint8_t* q) {
  uint32_t a, b, c;
  std::memcpy(&a, q, 4);
  std::memcpy(&b, q + 4, 4);
  std::memcpy(&c, q + 8, 4);
  constexpr uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, top2 = 0x30303030u;
  // blocks 0..3 in the low six bits of bytes 0..3 (scales) and 4..7 (mins); blocks 4..7 in the nibbles of bytes
  // 8..11 with their top two bits in the top two of bytes 0..7 (`>> 2` brings bits 6..7 of each byte to 4..5)
  const uint32_t sc_hi = (c & low4) | ((a >> 2) & top2), mn_hi = ((c >> 4) & low4) | ((b >> 2) & top2);
  return {uint64_t{sc_hi} << 32 | (a & low6), uint64_t{mn_hi} << 32 | (b & low6)};
}

// The same for two super-blocks at once in vector registers, for the kernels: `first` and `second` hold their
// 12 bytes (words a, b, c); `sc` and `mn` get 16 bytes each, the 8 blocks of `first` then the 8 of `second`.
inline __m128i load12(const uint8_t* p) {
  int32_t last;
  std::memcpy(&last, p + 8, 4);
  return _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), last, 2);
}
inline void unpack_sub_scales2(__m128i first, __m128i second, __m128i& sc, __m128i& mn) {
  const __m128i ab = _mm_unpacklo_epi32(first, second);                                  // a0 a1 b0 b1
  const __m128i cc = _mm_shuffle_epi32(_mm_unpackhi_epi32(first, second), 0x50);         // c0 c0 c1 c1
  const __m128i aa = _mm_shuffle_epi32(ab, 0x50), bb = _mm_shuffle_epi32(ab, 0xFA);      // a0 a0 a1 a1, b0 b0 b1 b1
  // even words: blocks 0..3 (six low bits); odd words: blocks 4..7 (a nibble of c, two top bits of a or b)
  const __m128i low6 = _mm_set_epi32(0, 0x3F3F3F3F, 0, 0x3F3F3F3F);
  const __m128i low4 = _mm_set_epi32(0x0F0F0F0F, 0, 0x0F0F0F0F, 0);
  const __m128i top2 = _mm_set_epi32(0x30303030, 0, 0x30303030, 0);
  auto join = [&](__m128i six, __m128i nibble, __m128i top) {
    return _mm_or_si128(_mm_and_si128(six, low6),
                        _mm_or_si128(_mm_and_si128(nibble, low4), _mm_and_si128(_mm_srli_epi32(top, 2), top2)));
  };
  sc = join(aa, cc, aa);
  mn = join(bb, _mm_srli_epi32(cc, 4), bb);
}

// A weight's block scales and mins, in one of two forms:
//   - fp16 a block: `sc`, and `mn` (null for a symmetric weight);
//   - GGUF Q4_K's own (`sup` set; 4-bit codes, K a multiple of 256): the 6-bit sub-scales and sub-mins of each
//     super-block of 8 blocks packed in 12 bytes as the file packs them (`q6`), under its fp16 (d, dmin) pair
//     (`sup`), `scale = d * sc`, `min = -dmin * m`: 2 bytes a block where the fp16 pair takes 4, so a decode step
//     that streams the weights reads the file's 18 bytes a block of 32, not 20.
// A super-block is 8 blocks, so a group of 16 in the layout is two of them and the group of 8 one; such a row has
// no pairs (their code takes the fp16 form only).
struct Meta {
  const uint16_t* sc = nullptr;
  const uint16_t* mn = nullptr;
  const uint8_t* q6 = nullptr;
  const uint16_t* sup = nullptr;

  bool compact() const { return sup != nullptr; }
  bool symmetric() const { return !compact() && mn == nullptr; }
  // row n's, of a weight with `blocks` blocks a row
  Meta row(int64_t n, int64_t blocks) const {
    if (compact()) return Meta{nullptr, nullptr, q6 + n * (blocks / 8) * 12, sup + n * (blocks / 8) * 2};
    return Meta{sc + n * blocks, mn ? mn + n * blocks : nullptr};
  }
  // block b's sub-scale or sub-min (compact form): byte b % 8 of its super-block's
  static float byte_of(uint64_t bytes, int64_t b) { return static_cast<float>((bytes >> (8 * (b % 8))) & 0xFF); }
  // block b's scale, and its min plus `offset * scale` (`scale_min_offset`): its super-block unpacked once for both
  struct ScaleMin {
    float scale, min;
  };
  ScaleMin scale_min(int64_t b, float offset) const {
    if (!compact()) {
      const float s = half_to_float(sc[b]);
      return {s, (mn ? half_to_float(mn[b]) : 0.f) + offset * s};
    }
    const SubScales sub = unpack_sub_scales(q6 + b / 8 * 12);
    const float s = half_to_float(sup[b / 8 * 2]) * byte_of(sub.sc, b);
    return {s, -half_to_float(sup[b / 8 * 2 + 1]) * byte_of(sub.mn, b) + offset * s};
  }
};

// The multiple of a block's scale added to its min where codes are read as signed: -8 for a symmetric int4
// weight (Q4_0's `(q - 8) * d`), else 0.
inline float scale_min_offset(int64_t bits, const Meta& meta) { return bits == 4 && meta.symmetric() ? -8.f : 0.f; }

// The row's scales and mins about as far ahead as `prefetch` reads its codes.
inline void prefetch_meta(const Meta& r, int64_t blocks, int64_t row_bytes) {
  const int64_t rows_ahead = std::max<int64_t>(1, kPrefetch / row_bytes), ahead = rows_ahead * blocks;
  auto line = [](const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); };
  if (r.compact()) {
    const int64_t supers = blocks / 8;
    line(r.q6 + rows_ahead * supers * 12);
    line(r.q6 + (rows_ahead + 1) * supers * 12 - 1);
    line(r.sup + rows_ahead * supers * 2);
    return;
  }
  line(r.sc + ahead);
  line(r.sc + ahead + blocks - 1);
  if (r.mn == nullptr) return;
  line(r.mn + ahead);
  line(r.mn + ahead + blocks - 1);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is float32's upper half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
float quantize_block(const T* x, int8_t* out, int32_t& sum) {
  const __m512 a = load16(x), b = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(ia));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(ib));
  return amax;
}

inline __m512i unpack4(const uint8_t* p) {  // 32 bytes -> 64 codes: low nibbles, then high nibbles
  const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_srlv_epi64(raw, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F));
}

// The blocks' mins, `min + offset * scale` over the lanes of `mask` (`Meta::min` a lane at a time).
inline __m512 block_mins(__m512 sv, const uint16_t* mn, int64_t b0, __mmask16 mask, float offset) {
  const __m512 own = mn ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mn + b0)) : _mm512_setzero_ps();
  return _mm512_fmadd_ps(sv, _mm512_set1_ps(offset), own);
}

// The scales (`sv`) and mins (`mv`, `block_mins`) of blocks b0.. of a row over the lanes of `mask` (16 or 8 lanes
// from a super-block's start in the compact form: lanes 0..7 under one (d, dmin), 8..15 under the next).
inline void scales_mins(const Meta& r, int64_t b0, __mmask16 mask, float offset, __m512& sv, __m512& mv) {
  if (!r.compact()) {
    sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, r.sc + b0));
    mv = block_mins(sv, r.mn, b0, mask, offset);
    return;
  }
  const int64_t s0 = b0 / 8;
  const uint16_t* sup = r.sup + s0 * 2;
  const bool two = mask > 0xFF;
  __m128i sc, mn;
  unpack_sub_scales2(load12(r.q6 + s0 * 12), two ? load12(r.q6 + s0 * 12 + 12) : _mm_setzero_si128(), sc, mn);
  // (d0, dmin0, d1, dmin1) as floats, spread so that lanes 0..7 take the first pair and 8..15 the second
  uint16_t halves[4] = {sup[0], sup[1], 0, 0};
  if (two) std::memcpy(halves + 2, sup + 2, 4);
  const __m512 pairs = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(halves))));
  const __m512 d = _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0), pairs);
  const __m512 dmin = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1), pairs);
  sv = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
  mv = _mm512_fmsub_ps(sv, _mm512_set1_ps(offset), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn))));
}

// `acc += dot * scale * x.d + min' * x.s` over the lanes of `mask`, one lane a block, for blocks b0.. of a row
// (`sv`, `mv`: their scales and mins, `scales_mins`, found once for every activation row).
inline __m512 fold_blocks(__m512 acc, __m512 dot, __m512 sv, __m512 mv, const QuantRow& x, int64_t b0,
                          __mmask16 mask, float dot_scale = 1.f) {
  const __m512 xd = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x.d + b0), _mm512_set1_ps(dot_scale));
  acc = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv, xd), acc);
  return _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, x.s + b0), acc);
}

// Weight row n against `MR` activation rows. Integer sums are split over two registers per activation row (each
// `vpdpbusd` waits for the last one on its register); for int4 those are the low and the high nibbles, the high
// ones taken as 16 * code (`& 0xF0`, no shift) and scaled back once per group.
template <int MR, int BITS, typename OutT>
void row_block(const uint8_t* codes, const Meta& meta, int64_t n_total, int64_t k, const QuantRow* x, OutT* out,
               int64_t n) {
  const int64_t blocks = k / kBlock;
  const Regions reg(blocks);
  const int64_t row_bytes = BITS == 4 ? k / 2 : k;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const uint8_t* w = codes + n * row_bytes;
  const Meta r = meta.row(n, blocks);
  // int8 codes are read as q + 128 here (`vpdpbusd` multiplies unsigned by signed bytes)
  const float offset = scale_min_offset(BITS, meta) + (BITS == 8 ? -128.f : 0.f);
  prefetch_meta(r, blocks, row_bytes);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  int64_t b0 = 0;
  for (int64_t g = 0; g < reg.groups16; ++g, b0 += 16) {
    __m512i dot[MR][2];
    for (int m = 0; m < MR; ++m) dot[m][0] = dot[m][1] = _mm512_setzero_si512();
    const int8_t* xg[MR];
    for (int m = 0; m < MR; ++m) xg[m] = x[m].q + b0 * kBlock;
    if (BITS == 4) {
      for (int t = 0; t < 4; ++t) {
        prefetch(w + g * 256 + t * 64);
        const __m512i raw = _mm512_loadu_si512(w + g * 256 + t * 64);
        const __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(raw, high4);
        for (int m = 0; m < MR; ++m) {
          dot[m][0] = _mm512_dpbusd_epi32(dot[m][0], lo, _mm512_loadu_si512(xg[m] + 128 * t));
          dot[m][1] = _mm512_dpbusd_epi32(dot[m][1], hi, _mm512_loadu_si512(xg[m] + 128 * t + 64));
        }
      }
      __m512 sv, mv;
      scales_mins(r, b0, 0xFFFF, offset, sv, mv);
      for (int m = 0; m < MR; ++m) {
        const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(dot[m][0], 4), dot[m][1]);
        acc[m] = fold_blocks(acc[m], _mm512_cvtepi32_ps(d), sv, mv, x[m], b0, 0xFFFF, 1.f / 16.f);
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        prefetch(w + g * 512 + j * 64);
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + g * 512 + j * 64), flip);
        for (int m = 0; m < MR; ++m)
          dot[m][j % 2] = _mm512_dpbusd_epi32(dot[m][j % 2], wv, _mm512_loadu_si512(xg[m] + j * 64));
      }
      __m512 sv, mv;
      scales_mins(r, b0, 0xFFFF, offset, sv, mv);
      for (int m = 0; m < MR; ++m)
        acc[m] = fold_blocks(acc[m], _mm512_cvtepi32_ps(_mm512_add_epi32(dot[m][0], dot[m][1])), sv, mv, x[m], b0,
                             0xFFFF);
    }
  }
  if (reg.group8) {
    const uint8_t* wg = w + reg.groups16 * (BITS == 4 ? 256 : 512);
    prefetch_run(wg, BITS == 4 ? 128 : 256);
    const __m256i low4y = _mm512_castsi512_si256(low4), high4y = _mm512_castsi512_si256(high4);
    __m256i dot[MR][2];
    for (int m = 0; m < MR; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
    for (int t = 0; t < 4; ++t) {
      __m256i wv[2];
      if (BITS == 4) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + t * 32));
        wv[0] = _mm256_and_si256(raw, low4y);
        wv[1] = _mm256_and_si256(raw, high4y);
      } else {
        for (int h = 0; h < 2; ++h)
          wv[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + (2 * t + h) * 32)),
                                   _mm512_castsi512_si256(flip));
      }
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < 2; ++h)
          dot[m][h] = _mm256_dpbusd_epi32(
              dot[m][h], wv[h],
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].q + b0 * kBlock + (2 * t + h) * 32)));
    }
    __m512 sv, mv;
    scales_mins(r, b0, 0xFF, offset, sv, mv);
    for (int m = 0; m < MR; ++m) {
      const __m256i d = BITS == 4 ? _mm256_add_epi32(_mm256_slli_epi32(dot[m][0], 4), dot[m][1])
                                  : _mm256_add_epi32(dot[m][0], dot[m][1]);
      acc[m] = fold_blocks(acc[m], _mm512_zextps256_ps512(_mm256_cvtepi32_ps(d)), sv, mv, x[m], b0, 0xFF,
                           BITS == 4 ? 1.f / 16.f : 1.f);
    }
    b0 += 8;
  }
  if (reg.pairs) {
    // one block pair a register: lanes 0..7 are block b, 8..15 block b + 1, brought to block order by a permute
    // (fp16 scales: a compact row has no pairs)
    const __mmask16 mask = static_cast<__mmask16>((1u << (2 * reg.pairs)) - 1u);
    prefetch_run(w + b0 * kBlock * BITS / 8, reg.pairs * 2 * kBlock * BITS / 8);
    const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, r.sc + b0));
    const __m512 mv = block_mins(sv, r.mn, b0, mask, offset);
    for (int m = 0; m < MR; ++m) {
      const __m512 block_scale = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(mask, x[m].d + b0));
      acc[m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, x[m].s + b0), acc[m]);
      for (int c = 0; c < reg.pairs; ++c) {
        const __m512i wv = BITS == 4 ? unpack4(w + b0 * 16 + c * 32)
                                     : _mm512_xor_si512(_mm512_loadu_si512(w + (b0 + 2 * c) * kBlock), flip);
        const __m512i dot =
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(x[m].q + (b0 + 2 * c) * kBlock));
        const __m512i lanes = _mm512_set_epi32(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                                               2 * c + 1, 2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(lanes, block_scale), acc[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) out[m * n_total + n] = static_cast<OutT>(_mm512_reduce_add_ps(acc[m]));
}

template <int MR, int BITS, typename OutT>
void rows_kernel(const uint8_t* codes, const Meta& meta, int64_t n_total, int64_t k, const QuantRow* x, OutT* out,
                 int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) row_block<MR, BITS, OutT>(codes, meta, n_total, k, x, out, n);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is float32's upper half
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <typename T>
float quantize_block(const T* x, int8_t* out, int32_t& sum) {
  __m256 v[4];
  __m256 top = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i c[4];
  for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
  // the packs work within 128-bit lanes: the 4-byte runs come out as 0, 2, 4, 6, 1, 3, 5, 7
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return amax;
}

// 8 blocks' integer dot products (one per lane) of an unsigned/signed pair of vectors, added to `acc`.
template <int BITS>
inline __m256i dot8(__m256i acc, __m256i w, __m256i xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (BITS == 4) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), ones));
  return _mm256_add_epi32(
      acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w)), ones));
}

inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Weight rows [n0, n1) against `MR` activation rows. Groups run 8 lanes at a time (a 16-block group as two
// halves: its low nibbles, or first 32 bytes of a vector, are blocks 0..7).
// The low 8 bytes of `v` (a super-block's sub-scales or sub-mins, `unpack_sub_scales2`) as floats.
inline __m256 widen8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

template <int MR, int BITS, typename OutT>
void rows_kernel(const uint8_t* codes, const Meta& meta, int64_t n_total, int64_t k, const QuantRow* x, OutT* out,
                 int64_t n0, int64_t n1) {
  const int64_t blocks = k / kBlock;
  const Regions reg(blocks);
  const int64_t row_bytes = BITS == 4 ? k / 2 : k;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const float offset = scale_min_offset(BITS, meta);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    const Meta r = meta.row(n, blocks);
    prefetch_meta(r, blocks, row_bytes);
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    // the scales (`sv`) and mins (`mv`) of blocks b.. in runs of 8, `runs` (1 or 2) of them (in the compact form,
    // a super-block each, unpacked together: b is a multiple of 8)
    auto scales_mins = [&](int64_t b, int runs, __m256* sv, __m256* mv) {
      if (r.compact()) {
        const uint16_t* sup = r.sup + b / 8 * 2;
        const uint8_t* q6 = r.q6 + b / 8 * 12;
        __m128i sc, mn;
        unpack_sub_scales2(load12(q6), runs == 2 ? load12(q6 + 12) : _mm_setzero_si128(), sc, mn);
        for (int h = 0; h < runs; ++h) {
          sv[h] = _mm256_mul_ps(_mm256_set1_ps(half_to_float(sup[2 * h])), widen8(sc));
          const __m256 own = _mm256_mul_ps(_mm256_set1_ps(half_to_float(sup[2 * h + 1])), widen8(mn));  // dmin * m
          mv[h] = _mm256_fmsub_ps(sv[h], _mm256_set1_ps(offset), own);
          sc = _mm_srli_si128(sc, 8);
          mn = _mm_srli_si128(mn, 8);
        }
        return;
      }
      for (int h = 0; h < runs; ++h) {
        sv[h] = load_half8(r.sc + b + 8 * h);
        const __m256 own = r.mn ? load_half8(r.mn + b + 8 * h) : _mm256_setzero_ps();
        mv[h] = _mm256_fmadd_ps(sv[h], _mm256_set1_ps(offset), own);
      }
    };
    // blocks b..b + 7's sums into the accumulators
    auto finish8 = [&](const __m256i* dot, int64_t b, __m256 sv, __m256 mv) {
      for (int m = 0; m < MR; ++m) {
        const __m256 bs = _mm256_mul_ps(sv, _mm256_loadu_ps(x[m].d + b));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), bs, acc[m]);
        acc[m] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(x[m].s + b), acc[m]);
      }
    };
    int64_t b0 = 0;
    for (int64_t g = 0; g < reg.groups16; ++g, b0 += 16) {
      const uint8_t* w = row + g * (BITS == 4 ? 256 : 512);
      __m256i lo[MR], hi[MR];
      for (int m = 0; m < MR; ++m) lo[m] = hi[m] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        __m256i wl, wh;
        if (BITS == 8 || j % 2 == 0) prefetch(w + (BITS == 4 ? (j / 2) * 64 : j * 64));
        if (BITS == 4) {  // load j / 2 holds vector j in its low (j even) or high (j odd) nibbles
          const __m256i raw_l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j / 2) * 64));
          const __m256i raw_h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j / 2) * 64 + 32));
          wl = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw_l, 4) : raw_l, low4);
          wh = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw_h, 4) : raw_h, low4);
        } else {
          wl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64));
          wh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32));
        }
        for (int m = 0; m < MR; ++m) {
          const int8_t* xq = x[m].q + b0 * kBlock + j * 64;
          lo[m] = dot8<BITS>(lo[m], wl, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
          hi[m] = dot8<BITS>(hi[m], wh, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
        }
      }
      __m256 sv[2], mv[2];
      scales_mins(b0, 2, sv, mv);
      finish8(lo, b0, sv[0], mv[0]);
      finish8(hi, b0 + 8, sv[1], mv[1]);
    }
    if (reg.group8) {
      const uint8_t* w = row + reg.groups16 * (BITS == 4 ? 256 : 512);
      prefetch_run(w, BITS == 4 ? 128 : 256);
      __m256i dot[MR];
      for (int m = 0; m < MR; ++m) dot[m] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        __m256i wv;
        if (BITS == 4) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j / 2) * 32));
          wv = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, low4);
        } else {
          wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 32));
        }
        for (int m = 0; m < MR; ++m)
          dot[m] = dot8<BITS>(dot[m], wv,
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].q + b0 * kBlock + j * 32)));
      }
      __m256 sv, mv;
      scales_mins(b0, 1, &sv, &mv);
      finish8(dot, b0, sv, mv);
      b0 += 8;
    }
    float tail[MR] = {};
    prefetch_run(row + b0 * kBlock * BITS / 8, reg.pairs * 2 * kBlock * BITS / 8);
    for (int64_t c = 0; c < reg.pairs; ++c, b0 += 2) {
      __m256i wv[2];
      if (BITS == 4) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b0 * 16));
        wv[0] = _mm256_and_si256(raw, low4);
        wv[1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      } else {
        wv[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b0 * kBlock));
        wv[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (b0 + 1) * kBlock));
      }
      for (int h = 0; h < 2; ++h) {
        const auto [s, mnv] = r.scale_min(b0 + h, offset);
        for (int m = 0; m < MR; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].q + (b0 + h) * kBlock));
          const __m256i dot = dot8<BITS>(_mm256_setzero_si256(), wv[h], xv);
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * x[m].d[b0 + h]), acc[m]);
          tail[m] += mnv * x[m].s[b0 + h];
        }
      }
    }
    for (int m = 0; m < MR; ++m) out[m * n_total + n] = static_cast<OutT>(hsum(acc[m]) + tail[m]);
  }
}

#else
#error "qgemv.cpp needs AVX512-VNNI (with BW and VL) or AVX2 with FMA and F16C"
#endif

template <int BITS, typename OutT>
void run_rows(int64_t mr, const uint8_t* codes, const Meta& meta, int64_t n_total, int64_t k, const QuantRow* x,
              OutT* out, int64_t n0, int64_t n1) {
  switch (mr) {
    case 1: return rows_kernel<1, BITS, OutT>(codes, meta, n_total, k, x, out, n0, n1);
    case 2: return rows_kernel<2, BITS, OutT>(codes, meta, n_total, k, x, out, n0, n1);
    case 3: return rows_kernel<3, BITS, OutT>(codes, meta, n_total, k, x, out, n0, n1);
    default: return rows_kernel<4, BITS, OutT>(codes, meta, n_total, k, x, out, n0, n1);
  }
}

// ---- the dense path (many rows: a prefill chunk, a large batch) --------------------------------------------------

// float32 -> bf16 bits, rounded to nearest even (as torch's `.to(torch.bfloat16)` for finite values); plain integer
// arithmetic, so the loops below vectorize.
inline uint16_t bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// Row m of x rounded as the kernel rounds it (int8 codes per block of 32 times max |x| / 127), in bf16, its
// columns in the 8-bit layout's order: lined up with `dequantize_laid_row`, no permutation of either side.
template <typename T>
void round_laid_row(const T* x, int64_t k, const Regions& r, uint16_t* out) {
  auto place = [&](int64_t, const int8_t* codes, float d, int32_t, int64_t first, int64_t stride) {
    for (int64_t j = 0; j < kBlock / 4; ++j)
      for (int64_t v = 0; v < 4; ++v)
        out[first + j * stride + v] = bf16_bits(static_cast<float>(codes[4 * j + v]) * d);
  };
  for_each_quantized_block(x, k, r, place);
}

inline void put(uint16_t* o, float v) { *o = bf16_bits(v); }
inline void put(float* o, float v) { *o = v; }

// One weight row in the 8-bit layout's column order, as bf16 bits or float32 (`u * scale + min` in float32, rounded
// once for bf16). Each region is a run of vectors of `width` columns (a group's 8 vectors share its lane row of 16
// or 8 blocks' scales, a pair's 2 vectors are its blocks); int4 packs each two vectors of a region into `width`
// bytes (low, then high nibbles). `offset * scale` is a symmetric weight's min (int8 codes are signed here).
template <int BITS, typename Out>
void dequantize_laid_row(const uint8_t* w, const Meta& row, float offset, const Regions& r, Out* out) {
  alignas(64) float sl[64], ml[64];
  int64_t b = 0, c = 0;  // the next block, and its first column
  auto lanes = [&](int64_t blocks) {
    for (int64_t i = 0; i < blocks; ++i) {
      const auto [s, m] = row.scale_min(b + i, offset);
      for (int64_t v = 0; v < 4; ++v) sl[4 * i + v] = s, ml[4 * i + v] = m;
    }
  };
  auto vectors = [&](int64_t count, int64_t width) {  // `count` vectors from column c, lane row sl/ml
    for (int64_t j = 0; j < count; ++j) {
      Out* o = out + c + j * width;
      if (BITS == 8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(w) + c + j * width;
        for (int64_t l = 0; l < width; ++l) put(o + l, static_cast<float>(q[l]) * sl[l] + ml[l]);
      } else {
        const uint8_t* q = w + c / 2 + (j / 2) * width;
        const int shift = (j % 2) * 4;
        for (int64_t l = 0; l < width; ++l) put(o + l, static_cast<float>((q[l] >> shift) & 15) * sl[l] + ml[l]);
      }
    }
    c += count * width;
  };
  for (int64_t g = 0; g < r.groups16; ++g, b += 16) {
    lanes(16);
    vectors(8, 64);
  }
  if (r.group8) {
    lanes(8);
    vectors(8, 32);
    b += 8;
  }
  for (int64_t p = 0; p < r.pairs; ++p, b += 2) {
    for (int64_t h = 0; h < 2; ++h) {
      const auto [s, m] = row.scale_min(b + h, offset);
      for (int64_t l = 0; l < kBlock; ++l) sl[kBlock * h + l] = s, ml[kBlock * h + l] = m;
    }
    // a pair is two vectors of 32 sharing 32 bytes (4 bits); its lane row spans both
    const int64_t c0 = c;
    for (int64_t h = 0; h < 2; ++h) {
      Out* o = out + c0 + h * kBlock;
      for (int64_t l = 0; l < kBlock; ++l) {
        const float u = BITS == 8 ? static_cast<float>(reinterpret_cast<const int8_t*>(w)[c0 + h * kBlock + l])
                                  : static_cast<float>((w[c0 / 2 + l] >> (4 * h)) & 15);
        put(o + l, u * sl[kBlock * h + l] + ml[kBlock * h + l]);
      }
    }
    c += 2 * kBlock;
  }
}

// Weights dequantized to bf16 this many at a time (a few MB, reused by the allocator) for the dense path.
constexpr int64_t kDenseChunk = int64_t{1} << 21;

// x [rows, K] @ W.T through bf16 matrix products: the activations rounded as the kernel rounds them (a token's
// logits then do not depend on which path its step took), the weights dequantized a slice of rows at a time.
at::Tensor dense_linear(const at::Tensor& x, const uint8_t* codes, const Meta& meta, int64_t n, int64_t bits) {
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  const Regions reg(blocks);
  const auto bf16 = x.options().dtype(at::kBFloat16);
  at::Tensor xr = at::empty({rows, k}, bf16);
  auto* xrp = reinterpret_cast<uint16_t*>(xr.data_ptr<c10::BFloat16>());
  for_each_row(x, [&](const auto* row, int64_t m) { round_laid_row(row, k, reg, xrp + m * k); });
  const int64_t row_bytes = bits == 4 ? k / 2 : k;
  const float offset = scale_min_offset(bits, meta);
  const int64_t step = std::max<int64_t>(1, kDenseChunk / k);
  at::Tensor out = at::empty({rows, n}, bf16);
  at::Tensor w = at::empty({std::min(step, n), k}, bf16);
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t n1 = std::min(n, n0 + step);
    auto* wp = reinterpret_cast<uint16_t*>(w.data_ptr<c10::BFloat16>());
    at::parallel_for(n0, n1, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Meta row = meta.row(r, blocks);
        uint16_t* o = wp + (r - n0) * k;
        bits == 4 ? dequantize_laid_row<4>(codes + r * row_bytes, row, offset, reg, o)
                  : dequantize_laid_row<8>(codes + r * row_bytes, row, offset, reg, o);
      }
    });
    if (n1 - n0 == n) {
      at::mm_out(out, xr, w.t());
    } else {
      out.narrow(1, n0, n1 - n0).copy_(at::mm(xr, w.narrow(0, 0, n1 - n0).t()));
    }
  }
  return x.scalar_type() == at::kBFloat16 ? out : out.to(x.scalar_type());
}

// The scales and mins of a weight of `n` rows and `blocks` blocks a row, checked: fp16 ones, or with `supers` (not
// empty) Q4_K's compact form (`Meta`: `scales` the packed sub-scales and sub-mins, `mins` empty).
Meta meta_of(const at::Tensor& scales, const at::Tensor& mins, const std::optional<at::Tensor>& supers, int64_t n,
             int64_t blocks, int64_t bits) {
  if (supers.has_value() && supers->defined() && supers->numel() > 0) {
    TORCH_CHECK(bits == 4 && blocks % 8 == 0,
                "super-blocks need 4-bit codes and an input size that is a multiple of 256");
    TORCH_CHECK(supers->scalar_type() == at::kHalf && supers->is_contiguous() && supers->numel() == n * blocks / 4,
                "supers must be contiguous float16 [N, K / 256, 2] (d, dmin)");
    TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() && scales.numel() == n * blocks / 8 * 12 &&
                    mins.numel() == 0,
                "with supers, scales must be contiguous uint8 [N, K / 256 * 12] (Q4_K's packed sub-scales and "
                "sub-mins) and mins empty");
    return Meta{nullptr, nullptr, scales.data_ptr<uint8_t>(),
                reinterpret_cast<const uint16_t*>(supers->data_ptr<c10::Half>())};
  }
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.numel() == n * blocks &&
                  (mins.numel() == n * blocks || mins.numel() == 0),
              "scales and mins must be contiguous float16 [N, K / 32] (mins empty for a symmetric weight)");
  return Meta{reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::Half>()),
              mins.numel() ? reinterpret_cast<const uint16_t*>(mins.data_ptr<c10::Half>()) : nullptr};
}

}  // namespace

namespace QGEMV_NAMESPACE {

// y[m, n] = sum_k x[m, k] * w[n, k] for x of any row count: the integer kernel up to `dense_rows` rows (the weights
// read once per four; every row if negative), the dense path above.
at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t bits, int64_t dense_rows, const std::optional<at::Tensor>& supers) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t rows = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(k % (2 * kBlock) == 0, "the input size must be a multiple of 64, got ", k);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(1) == (bits == 4 ? k / 2 : k),
              "codes must be contiguous uint8 [N, K / 2] (4 bits) or [N, K] (8 bits)");
  const int64_t blocks = k / kBlock;
  const Meta meta = meta_of(scales, mins, supers, n, blocks, bits);
  const auto* cp = codes.data_ptr<uint8_t>();
  if (dense_rows >= 0 && rows > dense_rows) return dense_linear(x, cp, meta, n, bits);
  const Regions reg(blocks);
  std::vector<int8_t> xq(rows * k);
  std::vector<float> xd(rows * blocks), xs(rows * blocks);
  std::vector<QuantRow> qrows(rows);
  for_each_row(x, [&](const auto* row, int64_t m) {
    quantize_row(row, k, reg, &xq[m * k], &xd[m * blocks], &xs[m * blocks]);
    qrows[m] = QuantRow{&xq[m * k], &xd[m * blocks], &xs[m * blocks]};
  });
  at::Tensor out = at::empty({rows, n}, x.options());
  const bool as_float = x.scalar_type() == at::kFloat;
  const int64_t row_bytes = bits == 4 ? k / 2 : k;
  // at least ~16 KB of weights a task: smaller ones cost more in the fork than they gain
  const int64_t grain = std::max<int64_t>(2, (int64_t{16} << 10) / row_bytes);
  // Tiles of weight rows small enough to stay in L1 while every group of four activation rows passes over them:
  // with many rows (a prefill chunk) the weights are then read from memory once, not once per four rows.
  const int64_t tile = std::max<int64_t>(1, (int64_t{32} << 10) / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += tile) {
    const int64_t n1 = std::min(end, n0 + tile);
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      const int64_t mr = std::min<int64_t>(4, rows - m0);
      if (as_float) {
        float* op = out.data_ptr<float>() + m0 * n;
        bits == 4 ? run_rows<4>(mr, cp, meta, n, k, &qrows[m0], op, n0, n1)
                  : run_rows<8>(mr, cp, meta, n, k, &qrows[m0], op, n0, n1);
      } else {
        c10::BFloat16* op = out.data_ptr<c10::BFloat16>() + m0 * n;
        bits == 4 ? run_rows<4>(mr, cp, meta, n, k, &qrows[m0], op, n0, n1)
                  : run_rows<8>(mr, cp, meta, n, k, &qrows[m0], op, n0, n1);
      }
    }
    }
  });
  return out;
}

// Rows `ids` (int64, any shape) of a weight in the kernel's layout, dequantized (`u * scale + min` in float32) in
// row order, as [ids..., K] in `dtype` (float32, or bf16 rounded once): the lookup of a tied table that is also the
// head, one call where the torch version took about twenty small ops (0.4 ms a Qwen2.5-0.5B decode step).
at::Tensor q_rows(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                  int64_t bits, at::ScalarType dtype, const std::optional<at::Tensor>& supers) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.device().is_cpu(), "ids must be int64 on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2,
              "codes must be contiguous uint8 [N, K / 2] (4 bits) or [N, K] (8 bits)");
  const int64_t n = codes.size(0), k = codes.size(1) * 8 / bits, blocks = k / kBlock;
  TORCH_CHECK(k % (2 * kBlock) == 0, "the row size must be a multiple of 64, got ", k);
  const Meta meta = meta_of(scales, mins, supers, n, blocks, bits);
  const at::Tensor flat = ids.reshape(-1).contiguous();
  const int64_t count = flat.numel();
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "id ", ip[i], " is outside the table");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(k);
  at::Tensor out = at::empty(shape, codes.options().dtype(dtype));
  const auto* cp = codes.data_ptr<uint8_t>();
  const float offset = scale_min_offset(bits, meta);
  const int64_t row_bytes = bits == 4 ? k / 2 : k;
  const Regions reg(blocks);
  std::vector<float> laid(k);
  // each row dequantized in the layout's order, then put in row order in `o`'s type
  auto fill = [&](auto* o) {
    using Out = std::remove_pointer_t<decltype(o)>;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = ip[i];
      const Meta row = meta.row(r, blocks);
      bits == 4 ? dequantize_laid_row<4>(cp + r * row_bytes, row, offset, reg, laid.data())
                : dequantize_laid_row<8>(cp + r * row_bytes, row, offset, reg, laid.data());
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t v = 0; v < kBlock; ++v) o[i * k + b * kBlock + v] = static_cast<Out>(laid[position(reg, b, v)]);
    }
  };
  dtype == at::kFloat ? fill(out.data_ptr<float>()) : fill(out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace QGEMV_NAMESPACE

TORCH_LIBRARY_FRAGMENT(QGEMV_NAMESPACE, m) {
  m.def(
      "q_linear(Tensor x, Tensor codes, Tensor scales, Tensor mins, int bits, int dense_rows=-1, Tensor? supers=None) "
      "-> Tensor");
  m.def(
      "q_rows(Tensor ids, Tensor codes, Tensor scales, Tensor mins, int bits, ScalarType dtype, Tensor? supers=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(QGEMV_NAMESPACE, CPU, m) {
  m.impl("q_linear", &QGEMV_NAMESPACE::q_linear);
  m.impl("q_rows", &QGEMV_NAMESPACE::q_rows);
}
