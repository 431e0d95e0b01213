// One decode step (one new token per row) through all the layers of a stage, in C++: the same math as
// llama_shard/model.py's Block on GGMLLinear weights, without ~150 dispatched torch ops and the Python between them
// per layer (measured: ~10 of the ~20 ms a SmolLM2 token took, the matmuls being ~8).
//
// Per layer and row: RMSNorm, the fused q/k/v matmul (each part's kernel into its own columns where wq/wk/wv differ
// in type), RoPE (the stage's cos and sign-folded sin tables, so x·cos + roll(x, E/2)·sin as in model.apply_rope),
// the new k and v written into the row's KV slot, attention of each query head over the slot's keys 0..position
// (grouped-query: head h reads KV head h / (H/K)), the output matmul and residual, RMSNorm, the fused gate/up
// matmul, SiLU(gate)·up, the down matmul and residual. On a last stage, the final norm and the head too.
//
// Row invariance: a row's arithmetic never depends on its batch-mates: the matmuls are ggml_mm_parts_into's
// (threads split output columns only), the norms and element-wise ops run per row, and attention runs per (row, head)
// with a fixed order over that row's own keys; threads only pick which (row, head) pairs they compute.
//
// The KV cache is fp32 or f16 (at::Half; llama_shard.config.kv_cache_dtype picks it). f16 keys and values are
// rounded to nearest even when written (F16C's _mm256_cvtps_ph, or c10::Half: the same rounding as torch's
// .to(float16) on the eager path) and converted exactly to fp32 when read, so attention's arithmetic is the same
// fp32 arithmetic on the rounded values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "ggml_mm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LN_DECODE_AVX2 1
#else
#define LN_DECODE_AVX2 0
#endif

namespace {

#if LN_DECODE_AVX2
inline float hsum8(__m256 x) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
#endif

// sum of a[i] * b[i]: 8 lanes then a scalar tail, in a fixed order
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if LN_DECODE_AVX2
  if (n >= 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (i = 8; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    sum = hsum8(acc);
  }
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

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
// exp(x) on 8 lanes: Cephes' expf (a degree-5 polynomial after range reduction by ln 2; about 1 ulp). Below -87 it
// is 0, never a denormal (denormal products cost ~100 cycles each: softmax tails and SiLU of large inputs are full of
// them); above 88 it is exp(88).
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, low), _mm256_set1_ps(88.f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

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

// y = x * rsqrt(mean(x²) + eps) * w, per row, in model.RMSNorm's order of operations
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    const float scale = 1.f / std::sqrt(dot(xr, xr, dim) / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * scale) * w[i];
  }
}

// a matrix of the plan: the row-stack of one or more parts (wq|wk|wv of different types in a Q3_K_M file), each
// raw GGUF blocks of its own type; its outputs are the parts' in order (ggml_mm_parts_into)
struct Linear {
  std::vector<at::Tensor> blocks;         // keeps the parts' memory alive
  std::vector<llama_node::MMPart> parts;  // into blocks
};

struct Layer {
  at::Tensor attn_norm, ffn_norm;
  Linear wqkv, wo, w13, w2;
};

class DecodePlan : public torch::CustomClassHolder {
 public:
  // norms: per layer [attn_norm, ffn_norm] (fp32 [D]); blocks: per layer the parts of wqkv, wo, w13 and w2 in that
  // order (raw GGUF blocks, row-stacked within a matrix), qtypes[i] the type of blocks[i]; parts: per layer how many
  // parts each of the 4 matrices has (1 where a matrix is of one type)
  DecodePlan(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim, double eps,
             std::vector<at::Tensor> norms, std::vector<at::Tensor> blocks, std::vector<int64_t> qtypes,
             std::vector<int64_t> parts, bool scalar)
      : dim_(dim), heads_(n_heads), kv_heads_(n_kv_heads), head_dim_(head_dim), ffn_(ffn_dim),
        eps_(static_cast<float>(eps)), scalar_(scalar) {
    TORCH_CHECK(norms.size() % 2 == 0 && parts.size() == norms.size() / 2 * 4 && qtypes.size() == blocks.size(),
                "DecodePlan: 2 norms and 4 part counts per layer, one type per part");
    TORCH_CHECK(n_heads % n_kv_heads == 0, "DecodePlan: heads ", n_heads, " not a multiple of KV heads ", n_kv_heads);
    const int64_t qkv = (n_heads + 2 * n_kv_heads) * head_dim;
    size_t next = 0;  // the next part of blocks
    auto take = [&](int64_t count, int64_t rows, int64_t k) {
      TORCH_CHECK(count >= 1 && next + count <= blocks.size(), "DecodePlan: fewer parts than the counts say");
      Linear m;
      int64_t total = 0;
      for (int64_t i = 0; i < count; ++i, ++next) {
        const at::Tensor& t = blocks[next];
        check_blocks(t, qtypes[next], t.size(0), k);
        m.blocks.push_back(t);
        m.parts.push_back({t.data_ptr<uint8_t>(), qtypes[next], t.size(0)});
        total += t.size(0);
      }
      TORCH_CHECK(total == rows, "DecodePlan: a matrix has ", total, " rows, expected ", rows);
      return m;
    };
    for (size_t l = 0; l < norms.size() / 2; ++l) {
      Layer L{norms[2 * l], norms[2 * l + 1]};
      check_norm(L.attn_norm);
      check_norm(L.ffn_norm);
      L.wqkv = take(parts[4 * l], qkv, dim);
      L.wo = take(parts[4 * l + 1], dim, n_heads * head_dim);
      L.w13 = take(parts[4 * l + 2], 2 * ffn_dim, dim);
      L.w2 = take(parts[4 * l + 3], dim, ffn_dim);
      layers_.push_back(std::move(L));
    }
    TORCH_CHECK(next == blocks.size(), "DecodePlan: more parts than the counts say");
  }

  // the final norm and head of a last stage: forward then returns logits [B, V]
  void set_head(at::Tensor norm, at::Tensor blocks, int64_t qtype) {
    check_norm(norm);
    check_blocks(blocks, qtype, blocks.size(0), dim_);
    head_norm_ = norm;
    head_ = blocks;
    head_type_ = qtype;
  }

  // the KV cache: per layer [slots, max_len, K, E], all fp32 or all f16, in the plan's layer order
  void bind_cache(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "bind_cache: one k and v per layer");
    const auto type = k.empty() ? at::kFloat : k[0].scalar_type();
    for (const auto* list : {&k, &v})
      for (const auto& t : *list)
        TORCH_CHECK((type == at::kFloat || type == at::kHalf) && t.scalar_type() == type && t.dim() == 4 &&
                        t.size(2) == kv_heads_ && t.size(3) == head_dim_ && t.is_contiguous() &&
                        t.sizes() == k[0].sizes(),
                    "bind_cache: caches must be contiguous fp32 or f16 (all one type) [slots, max_len, ", kv_heads_,
                    ", ", head_dim_, "]");
    k_ = std::move(k);
    v_ = std::move(v);
    half_kv_ = type == at::kHalf;
  }

  // h [B, D] fp32: row b is the token at positions[b] of KV slot slots[b]; cos/sin [N, E] fp32 (N > every
  // position). Rows may share a slot (the tokens of a prompt chunk): every row's keys and values are written before
  // any row attends, so row b sees all keys 0..positions[b] of its slot. Returns the hidden states [B, D], or with a
  // head the logits [R, V] of the rows head_rows (R of them).
  at::Tensor forward(at::Tensor h_in, std::vector<int64_t> slots, std::vector<int64_t> positions, at::Tensor cos,
                     at::Tensor sin, std::vector<int64_t> head_rows) {
    const int64_t B = h_in.size(0), D = dim_, H = heads_, K = kv_heads_, E = head_dim_, F = ffn_;
    TORCH_CHECK(h_in.dim() == 2 && D == h_in.size(1) && h_in.scalar_type() == at::kFloat, "forward: h must be fp32 [B, ", D, "]");
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == B && static_cast<int64_t>(positions.size()) == B,
                "forward: one slot and position per row");
    TORCH_CHECK(layers_.empty() || !k_.empty(), "forward: no KV cache bound");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat && cos.size(1) == E &&
                    sin.sizes() == cos.sizes(),
                "forward: cos/sin must be contiguous fp32 [N, ", E, "]");
    const int64_t slot_count = k_.empty() ? 0 : k_[0].size(0), max_len = k_.empty() ? 0 : k_[0].size(1);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(slots[b] >= 0 && slots[b] < slot_count || layers_.empty(), "forward: slot ", slots[b], " out of range");
      TORCH_CHECK(positions[b] >= 0 && (positions[b] < max_len || layers_.empty()) && positions[b] < cos.size(0),
                  "forward: position ", positions[b], " out of range");
    }
    at::Tensor h = h_in.contiguous().clone();
    float* hp = h.data_ptr<float>();
    const int64_t QKV = (H + 2 * K) * E;
    std::vector<float> xn(B * D), qkv(B * QKV), attn(B * H * E), out(B * std::max(D, F)), gu(B * 2 * F), act(B * F);
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      rms_norm(hp, L.attn_norm.data_ptr<float>(), xn.data(), B, D, eps_);
      mm(L.wqkv, xn.data(), B, D, qkv.data());
      for (int64_t b = 0; b < B; ++b) {
        const int64_t p = positions[b];
        rope(qkv.data() + b * QKV, H + K, cp + p * E, sp + p * E);  // q heads then k heads
      }
      if (half_kv_)
        write_and_attend<at::Half>(l, qkv.data(), max_len, slots, positions, attn.data());
      else
        write_and_attend<float>(l, qkv.data(), max_len, slots, positions, attn.data());
      mm(L.wo, attn.data(), B, H * E, out.data());
      for (int64_t i = 0; i < B * D; ++i) hp[i] = out[i] + hp[i];
      rms_norm(hp, L.ffn_norm.data_ptr<float>(), xn.data(), B, D, eps_);
      mm(L.w13, xn.data(), B, D, gu.data());
      for (int64_t b = 0; b < B; ++b) silu_mul(gu.data() + b * 2 * F, act.data() + b * F, F);
      mm(L.w2, act.data(), B, F, out.data());
      for (int64_t i = 0; i < B * D; ++i) hp[i] = out[i] + hp[i];
    }
    if (!head_.defined()) return h;
    const int64_t R = static_cast<int64_t>(head_rows.size());
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(head_rows[r] >= 0 && head_rows[r] < B, "forward: head row ", head_rows[r], " out of range");
      rms_norm(hp + head_rows[r] * D, head_norm_.data_ptr<float>(), xn.data() + r * D, 1, D, eps_);
    }
    at::Tensor logits = at::empty({R, head_.size(0)}, h.options());
    llama_node::ggml_mm_into(xn.data(), R, D, head_.data_ptr<uint8_t>(), head_type_, head_.size(0),
                             logits.data_ptr<float>(), scalar_);
    return logits;
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  static void check_norm(const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous(), "DecodePlan: norms must be fp32 [D]");
  }

  // y [B, rows of w] = x [B, k] @ w.T
  void mm(const Linear& w, const float* x, int64_t B, int64_t k, float* y) const {
    llama_node::ggml_mm_parts_into(x, B, k, w.parts.data(), static_cast<int64_t>(w.parts.size()), y, scalar_);
  }

  static void check_blocks(const at::Tensor& t, int64_t qtype, int64_t rows, int64_t k) {
    TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 2 && t.is_contiguous() && t.size(0) == rows &&
                    t.size(1) == llama_node::ggml_row_bytes(qtype, k),
                "DecodePlan: blocks must be contiguous uint8 [", rows, ", ", llama_node::ggml_row_bytes(qtype, k), "]");
  }

  // x[i]·cos[i] + x[(i + E/2) % E]·sin[i] for each of `heads` heads of x, in place
  void rope(float* x, int64_t heads, const float* c, const float* s) const {
    const int64_t E = head_dim_, half = E / 2;
    float tmp[1024];
    TORCH_CHECK(E <= 1024, "head_dim ", E, " > 1024");
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* v = x + hh * E;
      for (int64_t i = 0; i < E; ++i) tmp[i] = v[i] * c[i] + v[(i + half) % E] * s[i];
      std::copy(tmp, tmp + E, v);
    }
  }

  // every row's new key and value (rows of qkv [B, (H + 2K)·E], after RoPE) into layer l's cache, then each row's
  // query heads over its slot's keys 0..position: softmax(q·k / sqrt(E)) · v into out [B, H·E]
  template <typename T>
  void write_and_attend(size_t l, const float* qkv, int64_t max_len, const std::vector<int64_t>& slots,
                        const std::vector<int64_t>& positions, float* out) const {
    const int64_t B = static_cast<int64_t>(slots.size()), H = heads_, K = kv_heads_, E = head_dim_, G = H / K;
    const int64_t stride = (H + 2 * K) * E;
    T* kc = k_[l].data_ptr<T>();
    T* vc = v_[l].data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      const float* row = qkv + b * stride;
      const int64_t at = (slots[b] * max_len + positions[b]) * K * E;
      store_kv(row + H * E, kc + at, K * E, scalar_);
      store_kv(row + (H + K) * E, vc + at, K * E, scalar_);
    }
    int64_t work = 0;
    for (int64_t b = 0; b < B; ++b) work += (positions[b] + 1) * E * H;
    // a parallel region costs a few µs: worth it only with some work per thread
    const int64_t grain = work < (1 << 16) ? B * H : 1;
    at::parallel_for(0, B * H, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, kv = (slots[b] * max_len * K + hh / G) * E;
        attend_one(qkv + b * stride + hh * E, kc + kv, vc + kv, positions[b] + 1, K * E, scores,
                   out + (b * H + hh) * E);
      }
    });
  }

  // one query head over n keys (and values) spaced `step` elements apart
  template <typename T>
  void attend_one(const float* q, const T* keys, const T* values, int64_t n, int64_t step,
                  std::vector<float>& scores, float* o) const {
    const int64_t E = head_dim_;
    const float scale = 1.f / std::sqrt(static_cast<float>(E));
    scores.assign((n + 7) / 8 * 8, -std::numeric_limits<float>::infinity());
#if LN_DECODE_AVX2
    if (E % 8 == 0 && !scalar_) {
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
      __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (size_t j = 0; j < scores.size(); j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(scores.data() + j));
      float lanes[8];
      _mm256_storeu_ps(lanes, best);
      const __m256 top = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
      __m256 total = _mm256_setzero_ps();
      for (size_t j = 0; j < scores.size(); j += 8) {  // the padding's -inf becomes 0
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), top));
        _mm256_storeu_ps(scores.data() + j, p);
        total = _mm256_add_ps(total, p);
      }
      const __m256 inv = _mm256_set1_ps(1.f / hsum8(total));
      int64_t e0 = 0;
      for (; e0 + 64 <= E; e0 += 64) weigh_values<8>(scores.data(), values + e0, n, step, inv, o + e0);
      for (; e0 < E; e0 += 8) weigh_values<1>(scores.data(), values + e0, n, step, inv, o + e0);
      return;
    }
#endif
    float best = -std::numeric_limits<float>::infinity();
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

  // a[i] = silu(g[i]) · g[F + i] = g[i] / (1 + exp(-g[i])) · g[F + i]
  void silu_mul(const float* g, float* a, int64_t F) const {
    int64_t i = 0;
#if LN_DECODE_AVX2
    if (!scalar_) {
      const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
      for (; i + 8 <= F; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(silu, _mm256_loadu_ps(g + F + i)));
      }
    }
#endif
    for (; i < F; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * g[F + i];
  }

  int64_t dim_, heads_, kv_heads_, head_dim_, ffn_;
  float eps_;
  bool scalar_;
  bool half_kv_ = false;  // the bound cache is f16 (else fp32)
  std::vector<Layer> layers_;
  std::vector<at::Tensor> k_, v_;
  at::Tensor head_norm_, head_;
  int64_t head_type_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_node, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, bool>())
      .def("set_head", &DecodePlan::set_head)
      .def("bind_cache", &DecodePlan::bind_cache)
      .def("forward", &DecodePlan::forward)
      .def("n_layers", &DecodePlan::n_layers);
}
