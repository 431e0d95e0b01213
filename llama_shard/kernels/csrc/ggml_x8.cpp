// Q4_0, Q4_1 and Q8_0 repacked at load 8 rows at a time ("x8"), for ggml_mm.cpp's driver: the same numbers as over
// the raw blocks (the same exact integer sums, the same fp32 operations in the same order), fewer instructions.
//
// The layout (llama_shard/ggml_linear.py repacks): rows 8g..8g+7 keep their 8 * row_bytes bytes, reordered as nb
// group-blocks of 8 * size bytes (size 18 for Q4_0, 20 for Q4_1, 34 for Q8_0), group-block b holding block b of
// the 8 rows: f16 d[8]; f16 m[8] (Q4_1 only); then chunks of 32 bytes (4, Q8_0: 8), chunk h = the 8 rows' code
// dwords h in row order (row i's code bytes 4h..4h+3 in bytes 4i..4i+3: Q4_0 / Q4_1 low nibbles elements
// 4h..4h+3, high nibbles 16 + 4h..16 + 4h + 3; Q8_0 elements 4h..4h+3).
// Rows after the last full group of 8 stay raw (the driver runs the raw kernel on them).
//
// AVX2: a chunk's low (high) nibbles are the 8 rows' 4 codes, lane i = row i, against the 4 activation codes
// broadcast to every lane: maddubs + adds leave each row's products in its own lane, so no horizontal reduction
// per block is needed. int16 lanes sum at most 16 products of 15 * 127 (exact), then one madd widens them. Per
// output the fp32 operations are the raw kernel's (Group8::q4 in ggml_mm.cpp), so the bits are the same.
// Measured and dropped: tiles of 8 activation rows (spills: slower than 4), widening by shifts instead of the madd
// (slower), the Q4_1 min terms in a second pass over the blocks (slower at M = 1).
#include "ggml_kernels.h"

namespace llama_node::detail {
namespace {

template <bool MIN>
constexpr int q4_size = MIN ? 20 : 18;

// bytes per block and bytes of fp16 scale fields before the codes, of the x8 types
inline void x8_parts(int64_t qtype, int64_t* size, int64_t* head) {
  *size = qtype == Q8_0 ? 34 : qtype == Q4_1 ? 20 : 18;
  *head = qtype == Q4_1 ? 4 : 2;
}

#if LN_AVX2
inline __m256i bcast32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int T, bool MIN>
void group8_x8_q4(const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  constexpr int size = q4_size<MIN>, codes = MIN ? 32 : 16;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[T], summ[T];
  for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * size * b;
    prefetch_next8<size>(g + 8 * size * nb, b);
    const __m256 dw = _mm256_cvtph_ps(ld128(p));
    if constexpr (MIN) {
      const __m256 mw = _mm256_cvtph_ps(ld128(p + 16));
      for (int t = 0; t < T; ++t) summ[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t].s[b]), summ[t]);
    }
    __m256i lo[4], hi[4];
    for (int h = 0; h < 4; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + codes + 32 * h));
      lo[h] = _mm256_and_si256(v, m4);
      hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* q = x[t].q + 32 * b;
      __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0], bcast32(q)), _mm256_maddubs_epi16(hi[0], bcast32(q + 16)));
      for (int h = 1; h < 4; ++h) {
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[h], bcast32(q + 4 * h)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[h], bcast32(q + 16 + 4 * h)));
      }
      __m256i isum = _mm256_madd_epi16(s, ones);
      if constexpr (!MIN) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * x[t].sum[b]));
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
      acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[t]);
    }
  }
  if constexpr (MIN)
    for (int t = 0; t < T; ++t) acc[t] = _mm256_add_ps(acc[t], summ[t]);
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

// Q8_0: chunk h (of 8) the 8 rows' codes 4h..4h+3; ggml's |w| x sign(x, w) per chunk (pair sums at most
// 2 * 128 * 127: one madd per chunk widens them), the 8 chunks' int32 sums added in lanes
template <int T>
void group8_x8_q8(const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * 34 * b;
    prefetch_next8<34>(g + 8 * 34 * nb, b);
    const __m256 dw = _mm256_cvtph_ps(ld128(p));
    __m256i wa[8];
    for (int h = 0; h < 8; ++h) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * h));
      wa[h] = _mm256_sign_epi8(w, w);
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* q = x[t].q + 32 * b;
      __m256i isum = _mm256_setzero_si256();
      for (int h = 0; h < 8; ++h) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * h));
        const __m256i prod = _mm256_maddubs_epi16(wa[h], _mm256_sign_epi8(bcast32(q + 4 * h), w));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(prod, ones));
      }
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
      acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}
#endif

}  // namespace

void unrepack_x8(int64_t qtype, const uint8_t* g, int64_t nb, uint8_t* raw) {
  int64_t size, head;
  x8_parts(qtype, &size, &head);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * size * b;
    for (int lane = 0; lane < 8; ++lane) {
      uint8_t* blk = raw + lane * nb * size + size * b;
      for (int64_t f = 0; f < head; f += 2) std::memcpy(blk + f, p + 8 * f + 2 * lane, 2);
      for (int64_t h = 0; 4 * h < size - head; ++h) std::memcpy(blk + head + 4 * h, p + 8 * head + 32 * h + 4 * lane, 4);
    }
  }
}

#if LN_AVX2
template <int T>
void group8_x8(int64_t qtype, const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  switch (qtype) {
    case Q4_0: group8_x8_q4<T, false>(g, nb, x, out); break;
    case Q4_1: group8_x8_q4<T, true>(g, nb, x, out); break;
    default: group8_x8_q8<T>(g, nb, x, out); break;
  }
}
template void group8_x8<1>(int64_t, const uint8_t*, int64_t, const Acts*, __m256*);
template void group8_x8<2>(int64_t, const uint8_t*, int64_t, const Acts*, __m256*);
template void group8_x8<4>(int64_t, const uint8_t*, int64_t, const Acts*, __m256*);
#endif

}  // namespace llama_node::detail
