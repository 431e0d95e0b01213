// The 5-bit GGUF types Q5_0, Q5_1 and Q5_K for ggml_mm.cpp's driver (numerics and row invariance: see there).
//
// A 5-bit code is a nibble, laid out as Q4_0 / Q4_1 / Q4_K lay out theirs, plus a fifth bit from a separate field:
//   Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}, Q5_1 {f16 d, m; u8 qh[4]; u8 qs[16]}: qh a little-endian uint32, bit j the
//     fifth bit of element j (low nibble of qs[j] for j < 16, high nibble of qs[j - 16] above); w = d (q - 16) and
//     w = d q + m.
//   Q5_K {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: sub-block sj (of 8, 32 weights each) has the low
//     (even sj) or high nibbles of qs[32 (sj / 2) + l] and bit sj of qh[l], l = 0..31; w = d sc_sj q - dmin m_sj
//     with Q4_K's 6-bit scales and mins.
// Codes 0..31 multiply the activation codes unsigned (maddubs); Q5_0's -16 is subtracted as 16 * sum(x) from the exact
// integer sum, and the mins of Q5_1 / Q5_K enter through s = d_x * sum(x), as for Q4_1 / Q4_K (ggml's Q8_1 form).
// Exactness on AVX2: maddubs pair sums are at most 2 * 31 * 127 and an int16 holds at most 8 products
// (8 * 31 * 127 = 31496 < 2^15) before the widening madd: one level earlier than the 4-bit types, whose int16 lanes
// hold 16 products of 15 * 127.
#include "ggml_kernels.h"

namespace llama_node::detail {
namespace {

#if LN_AVX2
// ---- AVX2, 8 weight rows per pass (the Group8 scheme of ggml_mm.cpp) ---------------------------------------------

// [row j's 8 int16 | row j + 4's 8 int16] (4 products each) for j = 0..3 -> the 8 rows' int32 sums, lane i = row i.
// The first hadd makes int16 sums of 8 products (exact for 5-bit codes); they are widened before the second level.
inline __m256i reduce16_q5(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i a = _mm256_madd_epi16(_mm256_hadd_epi16(p0, p1), ones);  // [rows 0 0 1 1 | rows 4 4 5 5]
  const __m256i b = _mm256_madd_epi16(_mm256_hadd_epi16(p2, p3), ones);  // [rows 2 2 3 3 | rows 6 6 7 7]
  return _mm256_hadd_epi32(a, b);
}

// a byte shuffle: bytes 0..7 of each 128-bit lane from byte a, bytes 8..15 from byte b
inline __m256i spread(int a, int b) {
  const auto ca = static_cast<char>(a), cb = static_cast<char>(b);
  return _mm256_setr_epi8(ca, ca, ca, ca, ca, ca, ca, ca, cb, cb, cb, cb, cb, cb, cb, cb, ca, ca, ca, ca, ca, ca, ca,
                          ca, cb, cb, cb, cb, cb, cb, cb, cb);
}

// Q5_0 (MIN false) and Q5_1, as Q4_0 / Q4_1: rows j and j + 4 share a vector (their 16 code bytes in the two halves),
// low nibbles against x[0..15], high nibbles against x[16..31]. The fifth bits: the 8 rows' qh words, rows 0-3 in the
// low half and 4-7 in the high one, so that one in-lane byte shuffle puts row j's (and row j + 4's) bits 0..7 in bytes
// 0..7 and bits 8..15 in bytes 8..15; byte i keeps its bit i % 8 (or with all the other bits, compare with all ones)
// as 16.
template <int T, bool MIN>
void group8_q5_01(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
  constexpr int size = MIN ? 24 : 22, hoff = MIN ? 4 : 2;
  const uint8_t* next = r[0] + 8 * nb * size;
  const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10), all = _mm256_set1_epi8(-1);
  const __m256i other_bits = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);  // byte i: every bit but bit i % 8
  __m256 acc[T], summ[T];
  for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = b * size;
    prefetch_next8<size>(next, b);
    __m256 dw, mw;
    block_scales8<MIN>(r, off, &dw, &mw);
    __m256i qh;
    {
      int h[8];
      for (int i = 0; i < 8; ++i) h[i] = static_cast<int>(ld32(r[i] + off + hoff));
      qh = _mm256_setr_epi32(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
    }
    __m256i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_set_m128i(ld128(r[j + 4] + off + hoff + 4), ld128(r[j] + off + hoff + 4));
      const __m256i bl = _mm256_shuffle_epi8(qh, spread(4 * j, 4 * j + 1));      // bits 0..15: elements 0..15
      const __m256i bh = _mm256_shuffle_epi8(qh, spread(4 * j + 2, 4 * j + 3));  // bits 16..31: elements 16..31
      const __m256i fl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_or_si256(bl, other_bits), all), b4);
      const __m256i fh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_or_si256(bh, other_bits), all), b4);
      lo[j] = _mm256_or_si256(_mm256_and_si256(v, m4), fl);
      hi[j] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), fh);
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* q = x[t].q + 32 * b;
      const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      __m256i p[4];
      for (int j = 0; j < 4; ++j)
        p[j] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl), _mm256_maddubs_epi16(hi[j], xh));
      __m256i isum = reduce16_q5(p[0], p[1], p[2], p[3]);
      if constexpr (!MIN) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(16 * x[t].sum[b]));
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
      acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[t]);
      if constexpr (MIN) summ[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t].s[b]), summ[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = MIN ? _mm256_add_ps(acc[t], summ[t]) : acc[t];
}

// bit sj of every byte (sj in an xmm register) moved to bit 4, the other bits cleared: shifts of 16-bit lanes by at
// most 7, then 4, keep each byte's bits within the byte
inline __m256i bit_to_4(__m256i v, __m128i sj, __m256i b4) {
  return _mm256_and_si256(_mm256_slli_epi16(_mm256_srl_epi16(v, sj), 4), b4);
}

// Q5_K, as Q4_K (scales and mins of the 8 rows decoded in parallel, the same fp32 operations per sub-block) with the
// fifth bits of sub-block sj from bit sj of the 32 qh bytes: elements 0..15 of rows j and j + 4 in one vector, as the
// codes are.
template <int T>
void group8_q5_k(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
  const uint8_t* next = r[0] + nb * 176;  // 8 rows of nb / 8 super-blocks
  const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
  __m256 acc[T], summ[T];
  for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const int64_t off = sb * 176;
    prefetch_next8<176>(next, sb);
    __m256 d, dmin;
    scales_min8(r, off, &d, &dmin);
    __m256i sm[4];
    kscales8(r, off + 4, sm);
    for (int sj = 0; sj < 8; ++sj) {  // not unrolled by the compiler: shifts by register counts, no branches on sj
      const __m256 dsc = _mm256_mul_ps(d, kscale8(sm[sj / 4], sj));
      const __m256 dm = _mm256_mul_ps(dmin, kscale8(sm[2 + sj / 4], sj));
      const __m128i nibble = _mm_cvtsi32_si128(4 * (sj % 2)), bit = _mm_cvtsi32_si128(sj);
      __m256i cl[4], ch[4];
      for (int j = 0; j < 4; ++j) {
        const uint8_t* qa = r[j] + off + 48 + 32 * (sj / 2);
        const uint8_t* qb = r[j + 4] + off + 48 + 32 * (sj / 2);
        const uint8_t* ha = r[j] + off + 16;
        const uint8_t* hb = r[j + 4] + off + 16;
        const __m256i lo = _mm256_set_m128i(ld128(qb), ld128(qa));            // elements 0..15
        const __m256i hi = _mm256_set_m128i(ld128(qb + 16), ld128(qa + 16));  // elements 16..31
        const __m256i fl = bit_to_4(_mm256_set_m128i(ld128(hb), ld128(ha)), bit, b4);
        const __m256i fh = bit_to_4(_mm256_set_m128i(ld128(hb + 16), ld128(ha + 16)), bit, b4);
        cl[j] = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(lo, nibble), m4), fl);
        ch[j] = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(hi, nibble), m4), fh);
      }
      const int64_t xb = 8 * sb + sj;
      for (int t = 0; t < T; ++t) {
        const int8_t* q = x[t].q + 32 * xb;
        const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
        __m256i p[4];
        for (int j = 0; j < 4; ++j)
          p[j] = _mm256_add_epi16(_mm256_maddubs_epi16(cl[j], xl), _mm256_maddubs_epi16(ch[j], xh));
        const __m256 scale = _mm256_mul_ps(dsc, _mm256_set1_ps(x[t].d[xb]));
        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(reduce16_q5(p[0], p[1], p[2], p[3])), acc[t]);
        summ[t] = _mm256_fmadd_ps(dm, _mm256_set1_ps(x[t].s[xb]), summ[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = _mm256_sub_ps(acc[t], summ[t]);
}
#endif

}  // namespace

#if LN_AVX2
template <int T>
void group8_q5(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
  switch (qtype) {
    case Q5_0: group8_q5_01<T, false>(r, nb, x, out); break;
    case Q5_1: group8_q5_01<T, true>(r, nb, x, out); break;
    default: group8_q5_k<T>(r, nb, x, out); break;
  }
}
template void group8_q5<1>(int64_t, const uint8_t* const*, int64_t, const Acts*, __m256*);
template void group8_q5<2>(int64_t, const uint8_t* const*, int64_t, const Acts*, __m256*);
template void group8_q5<4>(int64_t, const uint8_t* const*, int64_t, const Acts*, __m256*);
#endif

}  // namespace llama_node::detail
