// Attention of the fused decode step (see attention.h), and its torch op llama_node::decode_attention for tests and
// benches.
//
// Grouped-query attention: H query heads over K KV heads, head h reading KV head h / G (G = H / K). One query head
// at a time (attend_one), each key and value row of a KV head is read and converted from f16 G times, and dot4 keeps
// only 4 fma chains in flight (bound by their latency); it was 16.7% of a batched SmolLM2 step (G = 3) at ~3% of its
// multiply-adds. attend_group computes up to 3 query heads of a KV head together: each key converted once into
// registers for the 3 heads' 9 chains (3 keys at a time), softmax per head, then each value chunk converted once
// and weighted into the heads' accumulators. Per output it does attend_one's fp32 operations in attend_one's order
// (dot4's summation and reduction, the max, exp8, the total, the fma chain over the values in key order), so the
// bits are the same, which tests/test_attention_grouped.py pins. (A first version converted blocks of 32 rows into
// an fp32 scratch first: no faster than attend_one, its conversion loop stalled on the cache's loads with no
// arithmetic to overlap them.)
//
// Row invariance: a row's arithmetic never depends on its batch-mates; threads only pick which (row, KV head, part
// of its query heads) units they compute.
#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode_vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using llama_node::decode::dot;
#if LN_DECODE_AVX2
using llama_node::decode::exp8;
using llama_node::decode::hsum8;
#endif

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// a KV cache element as fp32 (exact for f16)
inline float kv_float(float x) { return x; }
inline float kv_float(at::Half x) { return static_cast<float>(x); }

// sum of q[i] * k[i] over a cached key: fp32 keys as dot(), f16 keys converted one by one
inline float dot_kv(const float* q, const float* k, int64_t n) { return dot(q, k, n); }
inline float dot_kv(const float* q, const at::Half* k, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}

// y[i] += s * x[i]
template <typename T>
inline void axpy(float s, const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * kv_float(x[i]);
}

// the cache's copy of n fp32 values: as they are, or rounded to the nearest f16 (ties to even)
inline void store_kv(const float* x, float* out, int64_t n, bool) { std::copy(x, x + n, out); }
inline void store_kv(const float* x, at::Half* out, int64_t n, bool scalar) {
  int64_t i = 0;
#if LN_DECODE_AVX2
  if (!scalar)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = at::Half(x[i]);
}

#if LN_DECODE_AVX2
// 8 cached elements as fp32 lanes
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Keys and values ahead of the one in use are prefetched: each is a few cache lines, `step` elements apart, and the
// KV cache comes from DRAM every token (the weights stream through the caches in between). Without it attention was
// bound by load latency: ~25 ns per key and head (measured on SmolLM2, 1023 keys: 6.6 ms of a token).
constexpr int64_t kPrefetch = 16;

// the cache lines of n elements from p
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64) _mm_prefetch(bytes + i, _MM_HINT_T0);
}

// o[0, 8C) = inv · Σ_j p[j] · v_j[0, 8C), v_j = values + j · step: C independent accumulators, so the chain of
// fmas over j is not one 4-cycle latency per 8 values
template <int C, typename T>
inline void weigh_values(const float* p, const T* values, int64_t n, int64_t step, __m256 inv, float* o) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(p[j]);
    const T* v = values + j * step;
    prefetch_row(values + std::min(j + kPrefetch, n - 1) * step, 8 * C);
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(w, load8(v + 8 * c), acc[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], inv));
}

// the dot products of q with 4 keys (E a multiple of 8), each reduced in the same order whatever its place among
// the 4, times scale
// a row of scores (``padded``: a multiple of 8, -inf past the keys) becomes exp(score - max) in place; returns
// 1 / their sum in every lane: the softmax of attend_one and attend_group, so both give the same bits
inline __m256 softmax8(float* sc, int64_t padded) {
  __m256 best = _mm256_set1_ps(kMinusInf);
  for (int64_t j = 0; j < padded; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(sc + j));
  float lanes[8];
  _mm256_storeu_ps(lanes, best);
  const __m256 top = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < padded; j += 8) {  // the padding's -inf becomes 0
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), top));
    _mm256_storeu_ps(sc + j, p);
    total = _mm256_add_ps(total, p);
  }
  return _mm256_set1_ps(1.f / hsum8(total));
}

template <typename T>
inline __m128 dot4(const float* q, const T* k0, const T* k1, const T* k2, const T* k3, int64_t E, float scale) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t e = 0; e < E; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    a0 = _mm256_fmadd_ps(qv, load8(k0 + e), a0);
    a1 = _mm256_fmadd_ps(qv, load8(k1 + e), a1);
    a2 = _mm256_fmadd_ps(qv, load8(k2 + e), a2);
    a3 = _mm256_fmadd_ps(qv, load8(k3 + e), a3);
  }
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)), _mm_set1_ps(scale));
}
#endif

// one query head over n keys (and values) spaced `step` elements apart: the per-head kernel, the portable code and
// the reference of attend_group
template <typename T>
void attend_one(const float* q, const T* keys, const T* values, int64_t n, int64_t step, int64_t E, bool scalar,
                std::vector<float>& scores, float* o) {
  const float scale = 1.f / std::sqrt(static_cast<float>(E));
  scores.assign((n + 7) / 8 * 8, kMinusInf);
#if LN_DECODE_AVX2
  if (E % 8 == 0 && !scalar) {
    for (int64_t j = 0; j < n; j += 4) {  // past the end, the last key again (its lanes are not stored)
      const T* k[4];
      for (int i = 0; i < 4; ++i) {
        k[i] = keys + std::min(j + i, n - 1) * step;
        prefetch_row(keys + std::min(j + kPrefetch + i, n - 1) * step, E);
      }
      float four[4];
      _mm_storeu_ps(four, dot4(q, k[0], k[1], k[2], k[3], E, scale));
      std::copy(four, four + std::min<int64_t>(4, n - j), scores.data() + j);
    }
    const __m256 inv = softmax8(scores.data(), static_cast<int64_t>(scores.size()));
    int64_t e0 = 0;
    for (; e0 + 64 <= E; e0 += 64) weigh_values<8>(scores.data(), values + e0, n, step, inv, o + e0);
    for (; e0 < E; e0 += 8) weigh_values<1>(scores.data(), values + e0, n, step, inv, o + e0);
    return;
  }
#endif
  float best = kMinusInf;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot_kv(q, keys + j * step, E) * scale;
    best = std::max(best, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) total += (scores[j] = std::exp(scores[j] - best));
  std::fill(o, o + E, 0.f);
  for (int64_t j = 0; j < n; ++j) axpy(scores[j], values + j * step, o, E);
  const float inv = 1.f / total;
  for (int64_t i = 0; i < E; ++i) o[i] *= inv;
}

#if LN_DECODE_AVX2
// scores_h[0, n) = q_h · k_j · scale for NH heads, NK keys (3 or 4) at a time: dot4's fma chain per (head, key)
// and its reduction (whose lanes each depend on one accumulator only, so 3 keys reduce as dot4 reduces 4), each key
// converted once for the NH heads and the NH·NK chains interleaved (dot4 alone keeps 4 in flight, bound by the fma
// latency). NH·NK accumulators, NK keys and q in registers: 3 heads take 3 keys (13 of AVX2's 16; 3 × 4 spilled
// an accumulator into every iteration's chain)
template <int NH, int NK, typename T>
inline void dot_heads(const float* const* q, const T* keys, int64_t n, int64_t step, int64_t E, float scale,
                      float* const* scores) {
  for (int64_t j = 0; j < n; j += NK) {  // past the end, the last key again (its lanes are not stored)
    const T* k[NK];
#pragma GCC unroll 4
    for (int i = 0; i < NK; ++i) {
      k[i] = keys + std::min(j + i, n - 1) * step;
      prefetch_row(keys + std::min(j + kPrefetch + i, n - 1) * step, E);
    }
    __m256 a[NH][NK];
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h)
#pragma GCC unroll 4
      for (int i = 0; i < NK; ++i) a[h][i] = _mm256_setzero_ps();
    for (int64_t e = 0; e < E; e += 8) {
      __m256 kv[NK];
#pragma GCC unroll 4
      for (int i = 0; i < NK; ++i) kv[i] = load8(k[i] + e);
#pragma GCC unroll 4
      for (int h = 0; h < NH; ++h) {
        const __m256 qv = _mm256_loadu_ps(q[h] + e);
#pragma GCC unroll 4
        for (int i = 0; i < NK; ++i) a[h][i] = _mm256_fmadd_ps(qv, kv[i], a[h][i]);
      }
    }
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      const __m256 a3 = a[h][NK - 1 < 3 ? NK - 1 : 3];  // NK = 3: a lane that is not stored
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a3));
      float four[4];
      _mm_storeu_ps(four, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)),
                                     _mm_set1_ps(scale)));
      std::copy(four, four + std::min<int64_t>(NK, n - j), scores[h] + j);
    }
  }
}

// o_h[e0, e0 + 8C) = inv_h · Σ_j p_h[j] · v_j[e0, e0 + 8C) for NH heads: weigh_values' fma chain per element in key
// order, each value chunk converted once for the NH heads (NH·C accumulators, C values and a weight in registers)
template <int NH, int C, typename T>
inline void weigh_heads(const float* const* p, const T* values, int64_t n, int64_t step, const __m256* inv,
                        int64_t e0, float* const* o) {
  __m256 a[NH][C];
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[h][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* row = values + j * step + e0;
    prefetch_row(values + std::min(j + kPrefetch, n - 1) * step + e0, 8 * C);
    __m256 v[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) v[c] = load8(row + 8 * c);
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      const __m256 w = _mm256_set1_ps(p[h][j]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[h][c] = _mm256_fmadd_ps(w, v[c], a[h][c]);
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o[h] + e0 + 8 * c, _mm256_mul_ps(a[h][c], inv[h]));
}

// NH heads' outputs over E: chunks of 8C, then of 8
template <int NH, int C, typename T>
inline void weigh_all(const float* const* p, const T* values, int64_t n, int64_t step, const __m256* inv, int64_t E,
                      float* const* o) {
  int64_t e0 = 0;
  for (; e0 + 8 * C <= E; e0 += 8 * C) weigh_heads<NH, C>(p, values, n, step, inv, e0, o);
  for (; e0 < E; e0 += 8) weigh_heads<NH, 1>(p, values, n, step, inv, e0, o);
}

// G query heads q [G, E] over the n keys and values of their KV head (spaced `step` apart) into o [G, E], each head
// with attend_one's bits (E a multiple of 8). Heads go in tiles of up to 3 (2 where G is even and not a multiple of
// 3): enough independent fma chains in AVX2's 16 registers. scores: scratch.
template <typename T>
void attend_group(const float* q, int64_t G, const T* keys, const T* values, int64_t n, int64_t step, int64_t E,
                  std::vector<float>& scores, float* o) {
  const float scale = 1.f / std::sqrt(static_cast<float>(E));
  const int64_t padded = (n + 7) / 8 * 8, tile = G % 3 != 0 && G % 2 == 0 ? 2 : 3;
  scores.assign(G * padded, kMinusInf);
  const float* qs[3];
  float* rows[3];
  for (int64_t h0 = 0; h0 < G; h0 += tile) {
    const int64_t nh = std::min(tile, G - h0);
    for (int64_t h = 0; h < nh; ++h) {
      qs[h] = q + (h0 + h) * E;
      rows[h] = scores.data() + (h0 + h) * padded;
    }
    if (nh == 3)
      dot_heads<3, 3>(qs, keys, n, step, E, scale, rows);
    else if (nh == 2)
      dot_heads<2, 4>(qs, keys, n, step, E, scale, rows);
    else
      dot_heads<1, 4>(qs, keys, n, step, E, scale, rows);
  }
  __m256 inv[3];
  const float* ps[3];
  float* outs[3];
  for (int64_t h0 = 0; h0 < G; h0 += tile) {
    const int64_t nh = std::min(tile, G - h0);
    for (int64_t h = 0; h < nh; ++h) {  // attend_one's softmax, on each head's scores
      float* sc = scores.data() + (h0 + h) * padded;
      inv[h] = softmax8(sc, padded);
      ps[h] = sc;
      outs[h] = o + (h0 + h) * E;
    }
    if (nh == 3)
      weigh_all<3, 2>(ps, values, n, step, inv, E, outs);
    else if (nh == 2)
      weigh_all<2, 4>(ps, values, n, step, inv, E, outs);
    else
      weigh_all<1, 8>(ps, values, n, step, inv, E, outs);
  }
}
#endif

}  // namespace

namespace llama_node {

template <typename T>
void write_and_attend(const AttentionShape& shape, const float* qkv, int64_t B, const int64_t* slots,
                      const int64_t* positions, T* kc, T* vc, float* out, bool scalar, bool grouped, int64_t parts) {
  const int64_t H = shape.heads, K = shape.kv_heads, E = shape.head_dim, G = H / K, max_len = shape.max_len;
  const int64_t stride = (H + 2 * K) * E;
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkv + b * stride;
    const int64_t at = (slots[b] * max_len + positions[b]) * K * E;
    store_kv(row + H * E, kc + at, K * E, scalar);
    store_kv(row + (H + K) * E, vc + at, K * E, scalar);
  }
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += (positions[b] + 1) * E * H;
  // a parallel region costs a few µs: worth it only with some work per thread
  const bool parallel = work >= (1 << 16);
  const bool group = grouped && LN_DECODE_AVX2 && !scalar && E % 8 == 0;  // else one head at a time
  if (!group) {
    parts = G;
  } else if (parts <= 0) {
    // fewer (row, KV head) units than threads would leave a thread idle: split the groups (a lone SmolLM2 row has
    // 3 units for 2 threads)
    const int64_t units = B * K, threads = parallel ? at::get_num_threads() : 1;
    parts = units >= threads ? 1 : std::min(G, (threads + units - 1) / units);
  }
  parts = std::min(std::max<int64_t>(parts, 1), G);
  at::parallel_for(0, B * K * parts, parallel ? 1 : B * K * parts, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (K * parts), kv = t / parts % K, part = t % parts;
      const int64_t h0 = kv * G + part * G / parts, h1 = kv * G + (part + 1) * G / parts;
      const int64_t cache = (slots[b] * max_len * K + kv) * E, n = positions[b] + 1;
      const float* q = qkv + b * stride + h0 * E;
      float* o = out + (b * H + h0) * E;
#if LN_DECODE_AVX2
      if (group) {
        attend_group(q, h1 - h0, kc + cache, vc + cache, n, K * E, E, scores, o);
        continue;
      }
#endif
      for (int64_t h = 0; h < h1 - h0; ++h)
        attend_one(q + h * E, kc + cache, vc + cache, n, K * E, E, scalar, scores, o + h * E);
    }
  });
}

template void write_and_attend<float>(const AttentionShape&, const float*, int64_t, const int64_t*, const int64_t*,
                                      float*, float*, float*, bool, bool, int64_t);
template void write_and_attend<at::Half>(const AttentionShape&, const float*, int64_t, const int64_t*,
                                         const int64_t*, at::Half*, at::Half*, float*, bool, bool, int64_t);

}  // namespace llama_node

namespace {

// llama_node::decode_attention: write_and_attend on tensors (k and v are written in place), for tests and benches
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& k, const at::Tensor& v,
                            at::IntArrayRef slots, at::IntArrayRef positions, int64_t heads, bool grouped,
                            int64_t parts, bool scalar) {
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "decode_attention: k and v must be contiguous fp32 or f16 [slots, max_len, K, E] of one type");
  const int64_t K = k.size(2), E = k.size(3), B = qkv.size(0);
  TORCH_CHECK(heads % K == 0, "decode_attention: heads ", heads, " not a multiple of KV heads ", K);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat &&
                  qkv.size(1) == (heads + 2 * K) * E,
              "decode_attention: qkv must be contiguous fp32 [B, ", (heads + 2 * K) * E, "]");
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == B && static_cast<int64_t>(positions.size()) == B,
              "decode_attention: one slot and position per row");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slots[b] >= 0 && slots[b] < k.size(0) && positions[b] >= 0 && positions[b] < k.size(1),
                "decode_attention: slot ", slots[b], " or position ", positions[b], " out of range");
  at::Tensor out = at::empty({B, heads * E}, qkv.options());
  const llama_node::AttentionShape shape{heads, K, E, k.size(1)};
  if (k.scalar_type() == at::kHalf)
    llama_node::write_and_attend(shape, qkv.data_ptr<float>(), B, slots.data(), positions.data(),
                                 k.data_ptr<at::Half>(), v.data_ptr<at::Half>(), out.data_ptr<float>(), scalar,
                                 grouped, parts);
  else
    llama_node::write_and_attend(shape, qkv.data_ptr<float>(), B, slots.data(), positions.data(),
                                 k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), scalar, grouped,
                                 parts);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_node, m) {
  m.def(
      "decode_attention(Tensor qkv, Tensor(a!) k, Tensor(b!) v, int[] slots, int[] positions, int heads, "
      "bool grouped=True, int parts=0, bool scalar=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_node, CPU, m) { m.impl("decode_attention", &decode_attention); }
