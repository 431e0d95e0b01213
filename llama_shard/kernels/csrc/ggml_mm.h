// The matmul over GGUF blocks (ggml_mm.cpp), for the other native code of the library (decode.cpp).
#pragma once
#include <cstdint>

namespace llama_node {

// Bytes of one row of k values of GGML type qtype (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, or Q4_0 / Q4_1 /
// Q8_0 | 0x100: repacked 8 rows at a time, the same bytes per row); TORCH_CHECKs the type and k.
int64_t ggml_row_bytes(int64_t qtype, int64_t k);

// y [m_rows, n_out] = x [m_rows, k] @ w.T, w n_out rows of qtype blocks (raw, or repacked for a type id | 0x100).
// Threads (at::parallel_for) split the n_out rows, so row m of y depends only on x[m] and w: bitwise the same for any
// m_rows and thread count.
// scalar: the portable code path even where AVX2 is compiled in.
void ggml_mm_into(const float* x, int64_t m_rows, int64_t k, const uint8_t* w, int64_t qtype, int64_t n_out, float* y,
                  bool scalar = false);

}  // namespace llama_node
