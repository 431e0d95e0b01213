// Attention of the fused decode step (decode.cpp's DecodePlan): every row's new key and value written into its KV
// slot, then each row's query heads over the slot's keys 0..position.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

namespace llama_node {

struct AttentionShape {
  int64_t heads, kv_heads, head_dim, max_len;  // H, K, E; max_len: the positions of a KV slot
};

// qkv [B, (H + 2K)·E] (q heads then k then v, after RoPE); caches kc, vc [slots, max_len, K, E] of T (float or
// at::Half); out [B, H·E] = softmax(q·k / sqrt(E)) · v per row and query head. Row b's keys and values go to
// positions[b] of slot slots[b] before any row attends.
//
// grouped: the query heads that share a KV head are computed together (each key and value row read and converted
// once for all of them); else one head at a time, the kernel grouping replaced and is kept as its reference. Both
// give every head the same bits: per output, the same fp32 operations in the same order. parts: how many units of
// work each KV head's query heads are split into when grouped (0: chosen from the batch and thread count, so a lone
// row still keeps two threads busy); the split changes no bit either.
template <typename T>
void write_and_attend(const AttentionShape& shape, const float* qkv, int64_t B, const int64_t* slots,
                      const int64_t* positions, T* kc, T* vc, float* out, bool scalar, bool grouped = true,
                      int64_t parts = 0);

}  // namespace llama_node
