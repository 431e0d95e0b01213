// The 2- and 3-bit K-quants Q2_K and Q3_K for ggml_mm.cpp's driver (numerics and row invariance: see there).
//
// Super-blocks of 256 weights in 16 sub-blocks of 16, each with its own scale; our activation blocks of 32 (one d_x,
// one code sum) cover two of them. The 32-block jb = 4 c + p of a super-block (chunk c = 0, 1 of 128, pass p = 0..3)
// has the 2-bit codes (qs[32 c + l] >> 2 p) & 3, l = 0..31, and the scales 2 jb (l < 16) and 2 jb + 1 (l >= 16):
//   Q2_K {u8 scales[16]; u8 qs[64]; f16 d, dmin}: scale byte k = sc_k | m_k << 4; w = d sc_k q - dmin m_k.
//   Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: the third bit of element l of 32-block jb is bit jb of
//     hmask[l]; u = q | bit << 2 (0..7); w = d (s_k - 32) (u - 4) with 6-bit s_k: low 4 bits from scales[k % 8]
//     (low nibble for k < 8, high above), high 2 bits from bits 2 (k / 4) of scales[8 + k % 4].
// Per 32-block, with U_h = sum of u x over half h (l < 16, l >= 16) and X_h = sum of x there, all exact integers:
//   Q2_K: isum = sc_2jb U_0 + sc_2jb+1 U_1, imin = m_2jb X_0 + m_2jb+1 X_1;
//         acc = fma(d d_x, isum, acc), summ = fma(dmin d_x, imin, summ), and acc - summ at the end.
//   Q3_K: isum = s'_2jb (U_0 - 4 X_0) + s'_2jb+1 (U_1 - 4 X_1) with s' = s - 32; acc = fma(d d_x, isum, acc).
// X_0 is summed here from the activation codes and X_1 = sum - X_0: the activation row keeps ggml_mm.cpp's form (d
// and the code sum per 32), where ggml's Q8_K has a d per 256 and sums per 16.
// Exactness on AVX2: a half's U is summed in int16 (16 products of at most 7 * 127: 14224 < 2^15), pairs (U_0, U_1)
// times the scale pairs in one madd to int32.
#include "ggml_kernels.h"

namespace llama_node::detail {
namespace {

// Q3_K's 6-bit scale k (0..15) from the 12 scale bytes, minus 32
inline int scale_q3k(const uint8_t* s, int k) {
  const int lo = (s[k % 8] >> (4 * (k / 8))) & 0xF, hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
  return (lo | hi << 4) - 32;
}

// ---- scalar: one weight row against T activation rows ------------------------------------------------------------

template <int T>
void scalar_q2_k(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  float acc[T] = {}, summ[T] = {};
  for (int64_t sb = 0; sb < nb / 8; ++sb, w += 84) {
    const float d = f16(w + 80), dmin = f16(w + 82);
    for (int jb = 0; jb < 8; ++jb) {
      const uint8_t* qs = w + 16 + 32 * (jb / 4);
      const int shift = 2 * (jb % 4), s0 = w[2 * jb], s1 = w[2 * jb + 1];
      const int64_t xb = 8 * sb + jb;
      for (int t = 0; t < T; ++t) {
        const int8_t* qx = x[t].q + 32 * xb;
        int u0 = 0, u1 = 0, x0 = 0;
        for (int i = 0; i < 16; ++i) {
          u0 += ((qs[i] >> shift) & 3) * qx[i];
          u1 += ((qs[i + 16] >> shift) & 3) * qx[i + 16];
          x0 += qx[i];
        }
        const int x1 = x[t].sum[xb] - x0;
        const int isum = (s0 & 0xF) * u0 + (s1 & 0xF) * u1, imin = (s0 >> 4) * x0 + (s1 >> 4) * x1;
        acc[t] += d * x[t].d[xb] * static_cast<float>(isum);
        summ[t] += dmin * x[t].d[xb] * static_cast<float>(imin);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t] - summ[t];
}

template <int T>
void scalar_q3_k(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  float acc[T] = {};
  for (int64_t sb = 0; sb < nb / 8; ++sb, w += 110) {
    const float d = f16(w + 108);
    for (int jb = 0; jb < 8; ++jb) {
      const uint8_t* qs = w + 32 + 32 * (jb / 4);
      const int shift = 2 * (jb % 4), s0 = scale_q3k(w + 96, 2 * jb), s1 = scale_q3k(w + 96, 2 * jb + 1);
      int u[32];
      for (int i = 0; i < 32; ++i) u[i] = ((qs[i] >> shift) & 3) | (((w[i] >> jb) & 1) << 2);
      const int64_t xb = 8 * sb + jb;
      for (int t = 0; t < T; ++t) {
        const int8_t* qx = x[t].q + 32 * xb;
        int u0 = 0, u1 = 0, x0 = 0;
        for (int i = 0; i < 16; ++i) {
          u0 += u[i] * qx[i];
          u1 += u[i + 16] * qx[i + 16];
          x0 += qx[i];
        }
        const int x1 = x[t].sum[xb] - x0;
        const int isum = s0 * (u0 - 4 * x0) + s1 * (u1 - 4 * x1);
        acc[t] += d * x[t].d[xb] * static_cast<float>(isum);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

#if LN_AVX2
// ---- AVX2, 8 weight rows per pass (the Group8 scheme of ggml_mm.cpp) ---------------------------------------------
// Row i's 32 codes of a 32-block fill one vector (elements 0..15 in the low half, 16..31 in the high one), dotted
// with the whole activation block: maddubs gives [row i's 8 pair sums of half 0 | 8 of half 1].

inline __m256i ld256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 8 rows' maddubs results -> lane i: the int16 pair (U_0, U_1) of row i. Three levels of hadd (exact in int16, see
// above) give [U_0 of rows 0..7 | U_1 of rows 0..7]; one 64-bit permute and an in-lane word shuffle pair them up.
inline __m256i half_sums8(const __m256i* p) {
  const __m256i a = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7]));
  const __m256i c = _mm256_permute4x64_epi64(_mm256_hadd_epi16(a, b), 0xD8);  // [U_0 0-3, U_1 0-3 | 4-7, 4-7]
  const __m256i pair = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1, 8, 9, 2, 3, 10,
                                        11, 4, 5, 12, 13, 6, 7, 14, 15);
  return _mm256_shuffle_epi8(c, pair);
}

// The activation's (X_0, X_1) of block b as an int16 pair in every lane. X_0 by a sum of absolute differences of the
// codes + 128 against 0.
inline __m256i act_half_sums(const Acts& x, int64_t b) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.q + 32 * b));
  const __m128i s = _mm_sad_epu8(_mm_xor_si128(v, _mm_set1_epi8(-128)), _mm_setzero_si128());
  const int x0 = _mm_cvtsi128_si32(_mm_add_epi64(s, _mm_unpackhi_epi64(s, s))) - 16 * 128;
  const uint32_t x1 = static_cast<uint32_t>(x.sum[b] - x0);
  return _mm256_set1_epi32(static_cast<int>((static_cast<uint32_t>(x0) & 0xFFFF) | x1 << 16));
}

// 16 bytes at offset off of the 8 rows transposed: v[c] lane i = row i's bytes 4c..4c+3
inline void transpose8(const uint8_t* const* r, int64_t off, __m256i* v) {
  __m256i y[4];
  for (int j = 0; j < 4; ++j) y[j] = _mm256_set_m128i(ld128(r[j + 4] + off), ld128(r[j] + off));
  const __m256i t0 = _mm256_unpacklo_epi32(y[0], y[1]), t1 = _mm256_unpacklo_epi32(y[2], y[3]);
  const __m256i t2 = _mm256_unpackhi_epi32(y[0], y[1]), t3 = _mm256_unpackhi_epi32(y[2], y[3]);
  v[0] = _mm256_unpacklo_epi64(t0, t1);
  v[1] = _mm256_unpackhi_epi64(t0, t1);
  v[2] = _mm256_unpacklo_epi64(t2, t3);
  v[3] = _mm256_unpackhi_epi64(t2, t3);
}

// bytes 0 and 1 of every lane -> the lane's two int16 (the scale pair of a 32-block)
inline __m256i byte_pair(__m256i v) {
  const __m256i m = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1, 0, -1, 1, -1, 4, -1,
                                     5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
  return _mm256_shuffle_epi8(v, m);
}

// Q2_K. Per 32-block and output, the fp32 operations of scalar_q2_k's order: acc = fma(d * d_x, isum, acc);
// summ = fma(dmin * d_x, imin, summ).
template <int T>
void group8_q2_k(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
  const uint8_t* next = r[0] + nb * 84;  // 8 rows of nb / 8 super-blocks
  const __m256i m3 = _mm256_set1_epi8(3), low4 = _mm256_set1_epi16(0xF);
  __m256 acc[T], summ[T];
  for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const int64_t off = sb * 84;
    prefetch_next8<84>(next, sb);
    __m256 d, dmin;
    scales_min8(r, off + 80, &d, &dmin);
    __m256i sc[4];
    transpose8(r, off, sc);
    for (int jb = 0; jb < 8; ++jb) {  // shifts by register counts: no per-jb constants or branches
      const __m128i pass = _mm_cvtsi32_si128(2 * (jb % 4));
      __m256i q[8];
      for (int i = 0; i < 8; ++i)
        q[i] = _mm256_and_si256(_mm256_srl_epi16(ld256(r[i] + off + 16 + 32 * (jb / 4)), pass), m3);
      const __m256i s = byte_pair(_mm256_srl_epi32(sc[jb / 2], _mm_cvtsi32_si128(16 * (jb % 2))));
      const __m256i sp = _mm256_and_si256(s, low4), mp = _mm256_and_si256(_mm256_srli_epi16(s, 4), low4);
      const int64_t xb = 8 * sb + jb;
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t].q + 32 * xb));
        __m256i p[8];
        for (int i = 0; i < 8; ++i) p[i] = _mm256_maddubs_epi16(q[i], xv);
        const __m256i isum = _mm256_madd_epi16(half_sums8(p), sp);
        const __m256i imin = _mm256_madd_epi16(act_half_sums(x[t], xb), mp);
        const __m256 dx = _mm256_set1_ps(x[t].d[xb]);
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum), acc[t]);
        summ[t] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(imin), summ[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = _mm256_sub_ps(acc[t], summ[t]);
}

// Q3_K. The 6-bit scales of the 8 rows decoded in parallel from the transposed 12 bytes (read from offset 94, so
// that the last row's last block is not over-read); per 32-block and output: acc = fma(d * d_x, isum, acc).
template <int T>
void group8_q3_k(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
  const uint8_t* next = r[0] + nb * 110;
  const __m256i m3 = _mm256_set1_epi8(3), b2 = _mm256_set1_epi8(4), m4 = _mm256_set1_epi8(0xF);
  const __m256i thirty2 = _mm256_set1_epi16(32);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const int64_t off = sb * 110;
    prefetch_next8<110>(next, sb);
    const __m256 d = scales8(r, off + 108);
    __m256i sc[4];  // lane i: row i's bytes 94 + 4c .. 97 + 4c: the scale bytes start at byte 2 of sc[0]
    transpose8(r, off + 94, sc);
    __m256i s[3];  // lane i: row i's scale bytes 0-3, 4-7, 8-11
    for (int c = 0; c < 3; ++c)
      s[c] = _mm256_or_si256(_mm256_srli_epi32(sc[c], 16), _mm256_slli_epi32(sc[c + 1], 16));
    for (int jb = 0; jb < 8; ++jb) {
      // bit jb of the hmask bytes to bit 2 in one shift (right for jb >= 2, left below): in 16-bit lanes by at most 5,
      // so that a byte's bit 2 comes from the same byte
      const __m128i pass = _mm_cvtsi32_si128(2 * (jb % 4)), bit = _mm_cvtsi32_si128(jb >= 2 ? jb - 2 : 2 - jb);
      const bool right = jb >= 2;
      const __m128i lo_shift = _mm_cvtsi32_si128(16 * (jb % 2) + 4 * (jb / 4));
      const __m128i hi_shift = _mm_cvtsi32_si128(16 * (jb % 2) + 2 * (jb / 2));
      const __m256i lo = _mm256_and_si256(_mm256_srl_epi32(s[(jb % 4) / 2], lo_shift), m4);
      const __m256i hi = _mm256_and_si256(_mm256_srl_epi32(s[2], hi_shift), m3);
      const __m256i sp = _mm256_sub_epi16(byte_pair(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))), thirty2);
      __m256i u[8];
      for (int i = 0; i < 8; ++i) {
        const __m256i q = _mm256_and_si256(_mm256_srl_epi16(ld256(r[i] + off + 32 + 32 * (jb / 4)), pass), m3);
        const __m256i hm = ld256(r[i] + off);
        const __m256i h = _mm256_and_si256(right ? _mm256_srl_epi16(hm, bit) : _mm256_sll_epi16(hm, bit), b2);
        u[i] = _mm256_or_si256(q, h);
      }
      const int64_t xb = 8 * sb + jb;
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t].q + 32 * xb));
        __m256i p[8];
        for (int i = 0; i < 8; ++i) p[i] = _mm256_maddubs_epi16(u[i], xv);
        const __m256i v = _mm256_sub_epi16(half_sums8(p), _mm256_slli_epi16(act_half_sums(x[t], xb), 2));
        const __m256i isum = _mm256_madd_epi16(v, sp);
        const __m256 dx = _mm256_set1_ps(x[t].d[xb]);
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}
#endif

}  // namespace

template <int T>
void scalar_q23(int64_t qtype, const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  if (qtype == Q2_K)
    scalar_q2_k<T>(w, nb, x, out);
  else
    scalar_q3_k<T>(w, nb, x, out);
}
template void scalar_q23<1>(int64_t, const uint8_t*, int64_t, const Acts*, float*);
template void scalar_q23<2>(int64_t, const uint8_t*, int64_t, const Acts*, float*);
template void scalar_q23<4>(int64_t, const uint8_t*, int64_t, const Acts*, float*);

#if LN_AVX2
template <int T>
void group8_q23(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
  if (qtype == Q2_K)
    group8_q2_k<T>(r, nb, x, out);
  else
    group8_q3_k<T>(r, nb, x, out);
}
template void group8_q23<1>(int64_t, const uint8_t* const*, int64_t, const Acts*, __m256*);
template void group8_q23<2>(int64_t, const uint8_t* const*, int64_t, const Acts*, __m256*);
template void group8_q23<4>(int64_t, const uint8_t* const*, int64_t, const Acts*, __m256*);
#endif

}  // namespace llama_node::detail
