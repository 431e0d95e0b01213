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
// (threads split output columns only), the norms and element-wise ops run per row, and attention (attention.cpp)
// runs per (row, KV head) with a fixed order over that row's own keys; threads only pick which units they compute.
//
// The KV cache is fp32 or f16 (at::Half; llama_shard.config.kv_cache_dtype picks it). f16 keys and values are
// rounded to nearest even when written (F16C's _mm256_cvtps_ph, or c10::Half: the same rounding as torch's
// .to(float16) on the eager path) and converted exactly to fp32 when read, so attention's arithmetic is the same
// fp32 arithmetic on the rounded values.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "attention.h"
#include "decode_vec.h"
#include "ggml_mm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using llama_node::decode::dot;
#if LN_DECODE_AVX2
using llama_node::decode::exp8;
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
      const llama_node::AttentionShape shape{H, K, E, max_len};
      if (half_kv_)
        llama_node::write_and_attend(shape, qkv.data(), B, slots.data(), positions.data(), k_[l].data_ptr<at::Half>(),
                                     v_[l].data_ptr<at::Half>(), attn.data(), scalar_);
      else
        llama_node::write_and_attend(shape, qkv.data(), B, slots.data(), positions.data(), k_[l].data_ptr<float>(),
                                     v_[l].data_ptr<float>(), attn.data(), scalar_);
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
