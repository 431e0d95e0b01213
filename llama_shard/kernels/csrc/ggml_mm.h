// The matmul over GGUF blocks (ggml_mm.cpp), for the other native code of the library (decode.cpp, ggml_ops.cpp).
#pragma once
#include <cstdint>

namespace llama_node {

// Bytes of one row of k values of GGML type qtype (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, or
// Q4_0 / Q4_1 / Q8_0 | 0x100: repacked 8 rows at a time, the same bytes per row); TORCH_CHECKs the type and k.
int64_t ggml_row_bytes(int64_t qtype, int64_t k);

// One part of a row-stacked matrix: n_out rows of qtype blocks at w (raw, or repacked for a type id | 0x100).
struct MMPart {
  const uint8_t* w;
  int64_t qtype, n_out;
};

// y [m_rows, N] = x [m_rows, k] @ w.T, w the row-stack of n_parts parts (N their rows in all; parts may differ in
// type: llama.cpp's Q3_K_M stores attn_v in another type than attn_q): part p's outputs are the columns after those
// of parts 0..p-1. The activations are quantised once for all parts, and a column's bits are those of its part alone.
// Threads (at::parallel_for) split each part's rows, so row m of y depends only on x[m] and w: bitwise the same for
// any m_rows and thread count.
// scalar: the portable code path even where AVX2 is compiled in.
void ggml_mm_parts_into(const float* x, int64_t m_rows, int64_t k, const MMPart* parts, int64_t n_parts, float* y,
                        bool scalar = false);

// ggml_mm_parts_into of one part: y [m_rows, n_out]
void ggml_mm_into(const float* x, int64_t m_rows, int64_t k, const uint8_t* w, int64_t qtype, int64_t n_out, float* y,
                  bool scalar = false);

}  // namespace llama_node
