// Internal to the kernel library: what ggml_mm.cpp (the driver, Q4_0/Q4_1/Q8_0/Q4_K/Q6_K), ggml_q5.cpp (Q5_0,
// Q5_1, Q5_K) and ggml_q23.cpp (Q2_K, Q3_K) share: the quantised activation row, the GGML type ids and the AVX2 helpers of the 8-rows-per-pass
// kernels. Not an interface for other code (that is ggml_mm.h).
#pragma once
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LN_AVX2 1
#else
#define LN_AVX2 0
#endif

namespace llama_node::detail {

// GGMLQuantizationType values
constexpr int64_t Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
                  Q5_K = 13, Q6_K = 14;
// a type id | X8: the blocks repacked 8 rows at a time (ggml_x8.cpp; Q4_0 and Q4_1)
constexpr int64_t X8 = 0x100;

struct Acts {  // one quantised activation row
  const int8_t* q;     // [K]
  const float* d;      // [K / 32]
  const float* s;      // [K / 32]: d * sum(q of the block)
  const int32_t* sum;  // [K / 32]: sum(q of the block)
};

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline uint32_t ld32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint16_t ld16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline void scale_k4(const uint8_t* s, int j, int* sc, int* m) {  // ggml's get_scale_min_k4
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// One activation row of k values (k a multiple of 32) quantised per block of 32 (ggml_act.cpp): codes q [k], for
// block b: d[b] = amax / 127, s[b] = d[b] * sum of its codes, sums[b] = that sum.
void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s, int32_t* sums);

// The scalar kernels of every type (ggml_scalar.cpp): T outputs, one weight row of raw blocks against T activation
// rows.
template <int T>
void scalar_dot(int64_t qtype, const uint8_t* w, int64_t nb, const Acts* x, float* out);

// The 8 rows of an x8 group at g (Q4_0 or Q4_1, nb blocks each) as raw rows, row i at raw + i * row bytes.
void unrepack_x8(int64_t qtype, const uint8_t* g, int64_t nb, uint8_t* raw);

// ... of Q2_K and Q3_K, for scalar_dot (ggml_q23.cpp)
template <int T>
void scalar_q23(int64_t qtype, const uint8_t* w, int64_t nb, const Acts* x, float* out);

#if LN_AVX2
inline __m128i ld128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// the fp16 d of the 8 rows at byte offset off, lane i = row i
inline __m256 scales8(const uint8_t* const* r, int64_t off) {
  return _mm256_cvtph_ps(_mm_setr_epi16(ld16(r[0] + off), ld16(r[1] + off), ld16(r[2] + off), ld16(r[3] + off),
                                        ld16(r[4] + off), ld16(r[5] + off), ld16(r[6] + off), ld16(r[7] + off)));
}

// the fp16 pairs (d, m) at offset off of the 8 rows as fp32, lane i = row i: 4 rows per cvtph, [d m d m ...], the
// rows ordered so that the shuffles give 0..7
inline void scales_min8(const uint8_t* const* r, int64_t off, __m256* d, __m256* m) {
  const __m256 a =
      _mm256_cvtph_ps(_mm_setr_epi32(ld32(r[0] + off), ld32(r[1] + off), ld32(r[4] + off), ld32(r[5] + off)));
  const __m256 c =
      _mm256_cvtph_ps(_mm_setr_epi32(ld32(r[2] + off), ld32(r[3] + off), ld32(r[6] + off), ld32(r[7] + off)));
  *d = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(2, 0, 2, 0));
  *m = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 1, 3, 1));
}

// the 8 rows' d and, for the types with a min (Q4_1, Q5_1), m of their blocks at offset off (m = d without one)
template <bool MIN>
inline void block_scales8(const uint8_t* const* r, int64_t off, __m256* d, __m256* m) {
  if constexpr (MIN)
    scales_min8(r, off, d, m);
  else
    *d = *m = scales8(r, off);
}

// The next group's 8 rows (contiguous: 8 * size bytes per block of ours) are fetched into L1 while this one runs:
// the hardware prefetchers lose track of 8 interleaved streams (Q8_0 49152 x 576 from DRAM ran at half speed).
template <int size>
inline void prefetch_next8(const uint8_t* next, int64_t b) {
  const char* p = reinterpret_cast<const char*>(next + 8 * size * b);
  for (int c = 0; c < (8 * size + 63) / 64 + 1; ++c) _mm_prefetch(p + 64 * c, _MM_HINT_T0);
}

// The 6-bit scales and mins of a K-quant super-block (12 bytes at offset off) of the 8 rows, decoded in parallel:
// bytes 0-3, 4-7, 8-11 transposed to one dword lane per row. sm[0], sm[1]: scales of sub-blocks 0-3, 4-7; sm[2],
// sm[3]: their mins; sub-block j's in byte j % 4 of each lane (kscale8 picks it).
inline void kscales8(const uint8_t* const* r, int64_t off, __m256i* sm) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m6 = _mm256_set1_epi8(0x3F), m30 = _mm256_set1_epi8(0x30);
  __m256i y[4];
  for (int j = 0; j < 4; ++j) y[j] = _mm256_set_m128i(ld128(r[j + 4] + off), ld128(r[j] + off));
  const __m256i t0 = _mm256_unpacklo_epi32(y[0], y[1]), t1 = _mm256_unpacklo_epi32(y[2], y[3]);
  const __m256i t2 = _mm256_unpackhi_epi32(y[0], y[1]), t3 = _mm256_unpackhi_epi32(y[2], y[3]);
  const __m256i a = _mm256_unpacklo_epi64(t0, t1), b = _mm256_unpackhi_epi64(t0, t1);
  const __m256i c = _mm256_unpacklo_epi64(t2, t3);
  sm[0] = _mm256_and_si256(a, m6);
  sm[1] = _mm256_or_si256(_mm256_and_si256(c, m4), _mm256_and_si256(_mm256_srli_epi32(a, 2), m30));
  sm[2] = _mm256_and_si256(b, m6);
  sm[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi32(b, 2), m30));
}

// sub-block sj's 6-bit value of the 8 rows (from kscales8's sm[sj / 4], or sm[2 + sj / 4] for the min) as fp32. A
// shift by a register count, not a byte shuffle: the compiler does not unroll the loops over sj, and a shuffle mask
// built from a loop variable costs ~30 scalar instructions.
inline __m256 kscale8(__m256i v, int sj) {
  const __m256i byte = _mm256_srl_epi32(v, _mm_cvtsi32_si128(8 * (sj % 4)));
  return _mm256_cvtepi32_ps(_mm256_and_si256(byte, _mm256_set1_epi32(0xFF)));
}

// The AVX2 kernels of the Q5 types, 8 weight rows per pass (ggml_q5.cpp): r[i] is row i of the group, out[t] lane i
// the output of row i against activation row t.
template <int T>
void group8_q5(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out);

// The AVX2 matmul over the x8 layout (ggml_x8.cpp): y [m_rows, ldy] columns 0 .. 8 * groups - 1 = x @ w.T, w
// `groups` full groups of 8 repacked rows (qtype Q4_0, Q4_1 or Q8_0, without X8), threads splitting the groups.
void mm_x8(int64_t qtype, const uint8_t* w, int64_t row_bytes, const Acts* x, int64_t m_rows, float* y,
           int64_t groups, int64_t ldy, int64_t k);
// ... and of Q2_K, Q3_K (ggml_q23.cpp)
template <int T>
void group8_q23(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out);
#endif

}  // namespace llama_node::detail
