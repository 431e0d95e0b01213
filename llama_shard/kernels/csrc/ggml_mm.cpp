// y = x @ w.T over raw GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), as ggml on AVX2.
//
// The activation x [M, K] (fp32) is quantised per row to blocks of 32: int8 codes q, an fp32 scale d = amax/127
// and s = d * sum(q) (for the mins of Q4_1 / Q5_1 / Q4_K / Q5_K). Each weight block is dotted with the matching
// activation block(s) in integer SIMD (_mm256_maddubs_epi16 + _mm256_madd_epi16) and scaled by d_w * d_x in fp32.
//
// Q4_0, Q4_1, Q8_0, Q4_K (and Q5_0, Q5_1, Q5_K: ggml_q5.cpp; Q2_K, Q3_K: ggml_q23.cpp) on AVX2 (Group8): 8 weight rows per pass, one per fp32
// lane. Each block's 32 products are summed exactly in integers for all 8 rows at once (in-lane horizontal adds),
// then one vector multiply of the scales and one fma per block update the 8 outputs; the unpacked weight block is
// shared by a tile of 1, 2 or 4 activation rows.
// Q4_0, Q4_1 and Q8_0 repacked at load ("x8", type id | X8: ggml_x8.cpp, its own driver mm_x8): 8 or 16 rows per
// pass, the rows' codes interleaved so that no horizontal adds are needed; the same bits as Group8 over the raw blocks.
// Q6_K on AVX2 (Avx2) and every type on the scalar path: one weight row per pass, an 8-lane fp32 accumulator
// per output (row m, column n), summed horizontally at the end.
//
// Row invariance: output (m, n) depends only on x[m] and w[n]: the activation rows are quantised independently,
// K is never split, the accumulation order over K is fixed, tiles of rows run the same instructions per row, and
// in Group8 a lane's arithmetic does not depend on the other lanes (a short last group repeats its last row).
// Threads split N only. Built with -ffp-contract=off so the compiler fuses no multiply-add differently in different
// tile instantiations (the fmas are explicit, the same in every variant).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "decode_vec.h"
#include "ggml_kernels.h"
#include "ggml_mm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace llama_node::detail;  // the type ids, Acts and the shared helpers (ggml_kernels.h)

// the scalar kernels of every type (ggml_scalar.cpp), for mm's driver
struct Scalar {
  template <int T>
  static void dot(int64_t qtype, const uint8_t* w, int64_t nb, const Acts* x, float* out) {
    scalar_dot<T>(qtype, w, nb, x, out);
  }
};

// ---- AVX2 kernels (ggml-cpu's x86 dot products, over blocks of 32 activations) -----------------------------------
#if LN_AVX2
using llama_node::decode::hsum8;

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Q6_K: one weight row per pass, an 8-lane fp32 accumulator per output, summed horizontally at the end
struct Avx2 {
  template <int T>  // the one-row AVX2 kernel: Q6_K only (Group8 runs the others)
  static void dot(int64_t /*qtype*/, const uint8_t* w, int64_t nb, const Acts* x, float* out) {
    q6_k<T>(w, nb, x, out);
  }

  template <int T>
  static void q6_k(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < nb / 8; ++b, w += 210) {
      const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(w + 208));
      const auto* scales = reinterpret_cast<const int8_t*>(w + 192);
      for (int n = 0; n < 2; ++n) {
        const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * n));
        const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * n + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * n));
        const __m256i q[4] = {  // codes 0..63 (the -32 is applied below)
            _mm256_or_si256(_mm256_and_si256(qa, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2)),
            _mm256_or_si256(_mm256_and_si256(qb, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), _mm256_and_si256(qh, m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2))};
        for (int pair = 0; pair < 2; ++pair) {
          // quarter 2·pair + h: its elements 0..15 use s[2h], 16..31 s[2h + 1]
          const int8_t* s = scales + 8 * n + 4 * pair;
          const __m256i sc0 = _mm256_set_m128i(_mm_set1_epi16(s[1]), _mm_set1_epi16(s[0]));
          const __m256i sc1 = _mm256_set_m128i(_mm_set1_epi16(s[3]), _mm_set1_epi16(s[2]));
          const int64_t xb = 8 * b + 4 * n + 2 * pair;
          for (int t = 0; t < T; ++t) {
            const __m256i x0 = load32(x[t].q + 32 * xb), x1 = load32(x[t].q + 32 * xb + 32);
            const __m256i thirty2 = _mm256_set1_epi8(32);
            const __m256i p0 =
                _mm256_sub_epi16(_mm256_maddubs_epi16(q[2 * pair], x0), _mm256_maddubs_epi16(thirty2, x0));
            const __m256i p1 =
                _mm256_sub_epi16(_mm256_maddubs_epi16(q[2 * pair + 1], x1), _mm256_maddubs_epi16(thirty2, x1));
            __m256 tmp =
                _mm256_mul_ps(_mm256_set1_ps(d * x[t].d[xb]), _mm256_cvtepi32_ps(_mm256_madd_epi16(p0, sc0)));
            tmp = _mm256_fmadd_ps(_mm256_set1_ps(d * x[t].d[xb + 1]), _mm256_cvtepi32_ps(_mm256_madd_epi16(p1, sc1)),
                                  tmp);
            acc[t] = _mm256_add_ps(acc[t], tmp);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) out[t] = hsum8(acc[t]);
  }
};

// ---- AVX2, 8 weight rows per pass (Q4_0, Q4_1, Q8_0, Q4_K) ---------------------------------------------------------
// Lane i of every vector belongs to weight row i of the group: each block's 32 products are summed exactly in
// integers (in-lane horizontal adds across the 8 rows), so that one block costs per output a single fp32 multiply of
// the scales, an fma into the accumulator (and for Q4_1 an fma of the min term). Per output (m, n) the fp32 operations
// are, for blocks b in order:  acc = fma(d_w[b] * d_x[b], float(isum_b), acc);  summ = fma(m_w[b], s_x[b], summ);
// and finally acc + summ: the same for every group, tile of activation rows, thread count and N tail (a short group
// repeats its last row in the unused lanes).
struct Group8 {
  static constexpr int W = 8;

  // [row j's 8 int16 | row j + 4's 8 int16] for j = 0..3 -> the 8 rows' int32 sums, lane i = row i
  static inline __m256i reduce16(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_hadd_epi16(p2, p3));
    return _mm256_madd_epi16(h, _mm256_set1_epi16(1));
  }

  // Q4_0 (MIN false) and Q4_1. Codes 0..15 (unsigned: maddubs needs no sign tricks; Q4_0's -8 is subtracted as
  // 8 * sum(x) from the exact integer sum). Rows j and j + 4 share one vector: their 16 code bytes in the two halves,
  // low nibbles (elements 0..15) against x[0..15] in both halves, high nibbles against x[16..31]. int16 partial sums
  // stay exact: 16 products of at most 15 * 127 before the widening madd.
  template <int T, bool MIN>
  static void q4(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
    constexpr int size = MIN ? 20 : 18;
    const uint8_t* next = r[0] + 8 * nb * size;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[T], summ[T];
    for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t off = b * size;
      prefetch_next8<size>(next, b);
      __m256 dw, mw;
      block_scales8<MIN>(r, off, &dw, &mw);
      __m256i lo[4], hi[4];
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_set_m128i(ld128(r[j + 4] + off + size - 16), ld128(r[j] + off + size - 16));
        lo[j] = _mm256_and_si256(v, m4);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      }
      for (int t = 0; t < T; ++t) {
        const int8_t* q = x[t].q + 32 * b;
        const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
        __m256i p[4];
        for (int j = 0; j < 4; ++j)
          p[j] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl), _mm256_maddubs_epi16(hi[j], xh));
        __m256i isum = reduce16(p[0], p[1], p[2], p[3]);
        if constexpr (!MIN) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * x[t].sum[b]));
        const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[t]);
        if constexpr (MIN) summ[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t].s[b]), summ[t]);
      }
    }
    for (int t = 0; t < T; ++t) out[t] = MIN ? _mm256_add_ps(acc[t], summ[t]) : acc[t];
  }

  // Q8_0: ggml's |w| x sign(x, w) (w = -128 included), int32 per row, then in-lane horizontal adds
  template <int T>
  static void q8_0(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    const uint8_t* next = r[0] + 8 * nb * 34;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t off = b * 34;
      prefetch_next8<34>(next, b);
      const __m256 dw = scales8(r, off);
      __m256i wv[8], wa[8];
      for (int i = 0; i < 8; ++i) {
        wv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[i] + off + 2));
        wa[i] = _mm256_sign_epi8(wv[i], wv[i]);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i xv = load32(x[t].q + 32 * b);
        __m256i p[8];
        for (int i = 0; i < 8; ++i)
          p[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[i], _mm256_sign_epi8(xv, wv[i])), ones);
        // [rows 0..3 low halves | rows 0..3 high halves] and the same for rows 4..7
        const __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        const __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
        const __m256i isum =
            _mm256_add_epi32(_mm256_blend_epi32(q0, q1, 0xF0), _mm256_permute2x128_si256(q0, q1, 0x21));
        const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) out[t] = acc[t];
  }

  // Q4_K: per super-block of 256 the fp16 (d, dmin) of the 8 rows as for Q4_1, the 6-bit scales and mins of the 8
  // rows decoded in parallel (bytes 0-3, 4-7, 8-11 of the 12 scale bytes transposed to one dword lane per row), and
  // each 32-byte run of codes (low nibbles: sub-block 2c, high: 2c + 1) dotted as Q4_1's codes are.
  // Per output, for each sub-block j in order: acc = fma(d_w * sc_j * d_x, float(isum), acc);
  // summ = fma(dmin_w * m_j, s_x, summ); and finally acc - summ.
  template <int T>
  static void q4_k(const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
    const uint8_t* next = r[0] + nb * 144;  // 8 rows of nb / 8 super-blocks
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[T], summ[T];
    for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const int64_t off = sb * 144;
      prefetch_next8<144>(next, sb);
      __m256 d, dmin;
      scales_min8(r, off, &d, &dmin);
      __m256i sm[4];
      kscales8(r, off + 4, sm);
      // sub-block sj: the low (even sj) or high nibbles of 32 code bytes. The compiler does not unroll this loop:
      // shifts by register counts, no branches on sj
      for (int sj = 0; sj < 8; ++sj) {
        const __m256 dsc = _mm256_mul_ps(d, kscale8(sm[sj / 4], sj));
        const __m256 dm = _mm256_mul_ps(dmin, kscale8(sm[2 + sj / 4], sj));
        const __m128i nibble = _mm_cvtsi32_si128(4 * (sj % 2));
        __m256i cl[4], ch[4];
        for (int j = 0; j < 4; ++j) {
          const uint8_t* qa = r[j] + off + 16 + 32 * (sj / 2);
          const uint8_t* qb = r[j + 4] + off + 16 + 32 * (sj / 2);
          const __m256i lo = _mm256_set_m128i(ld128(qb), ld128(qa));            // elements 0..15
          const __m256i hi = _mm256_set_m128i(ld128(qb + 16), ld128(qa + 16));  // elements 16..31
          cl[j] = _mm256_and_si256(_mm256_srl_epi16(lo, nibble), m4);
          ch[j] = _mm256_and_si256(_mm256_srl_epi16(hi, nibble), m4);
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
          acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(reduce16(p[0], p[1], p[2], p[3])), acc[t]);
          summ[t] = _mm256_fmadd_ps(dm, _mm256_set1_ps(x[t].s[xb]), summ[t]);
        }
      }
    }
    for (int t = 0; t < T; ++t) out[t] = _mm256_sub_ps(acc[t], summ[t]);
  }

  template <int T>
  static void dot(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
    switch (qtype) {
      case Q4_0: q4<T, false>(r, nb, x, out); break;
      case Q4_1: q4<T, true>(r, nb, x, out); break;
      case Q4_K: q4_k<T>(r, nb, x, out); break;
      default: q8_0<T>(r, nb, x, out); break;
    }
  }
};

struct Group8Q5 {
  template <int T>
  static void dot(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
    group8_q5<T>(qtype, r, nb, x, out);
  }
};

struct Group8Q23 {
  template <int T>
  static void dot(int64_t qtype, const uint8_t* const* r, int64_t nb, const Acts* x, __m256* out) {
    group8_q23<T>(qtype, r, nb, x, out);
  }
};

// y [M, ldy]: columns 0..n_out - 1 are written
template <class D>
void mm_group8(int64_t qtype, const uint8_t* w, int64_t row_bytes, const std::vector<Acts>& x, float* y,
               int64_t n_out, int64_t ldy, int64_t k) {
  const int64_t m_rows = static_cast<int64_t>(x.size()), nb = k / 32, groups = (n_out + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 65536 / (8 * row_bytes));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    alignas(32) float buf[8];
    __m256 out[4];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = 8 * g, valid = std::min<int64_t>(8, n_out - n);
      const uint8_t* r[8];
      for (int i = 0; i < 8; ++i) r[i] = w + (n + std::min<int64_t>(i, valid - 1)) * row_bytes;
      int64_t m = 0;
      auto put = [&](int rows) {
        for (int t = 0; t < rows; ++t) {
          float* dst = y + (m + t) * ldy + n;
          if (valid == 8) {
            _mm256_storeu_ps(dst, out[t]);
          } else {
            _mm256_store_ps(buf, out[t]);
            std::memcpy(dst, buf, sizeof(float) * valid);
          }
        }
        m += rows;
      };
      for (; m + 4 <= m_rows;) D::template dot<4>(qtype, r, nb, &x[m], out), put(4);
      if (m + 2 <= m_rows) D::template dot<2>(qtype, r, nb, &x[m], out), put(2);
      if (m < m_rows) D::template dot<1>(qtype, r, nb, &x[m], out), put(1);
    }
  });
}
#endif

struct TypeInfo {
  int64_t block, bytes;
};

TypeInfo type_info(int64_t qtype) {
  if (qtype == (Q4_0 | X8) || qtype == (Q4_1 | X8) || qtype == (Q8_0 | X8)) qtype &= ~X8;
  switch (qtype) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q2_K: return {256, 84};
    case Q3_K: return {256, 110};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: TORCH_CHECK(false, "ggml_mm: unsupported GGML type ", qtype);
  }
}

template <class K>
void mm(int64_t qtype, const uint8_t* w, int64_t row_bytes, const std::vector<Acts>& x, float* y, int64_t n_out,
        int64_t ldy, int64_t k) {
  const int64_t m_rows = static_cast<int64_t>(x.size()), nb = k / 32;
  // ~64 KiB of weights per task at least, so small matrices do not pay for thread wake-ups per row
  const int64_t grain = std::max<int64_t>(1, 65536 / row_bytes);
  at::parallel_for(0, n_out, grain, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * row_bytes;
      int64_t m = 0;
      auto put = [&](int rows) {
        for (int t = 0; t < rows; ++t) y[(m + t) * ldy + n] = out[t];
        m += rows;
      };
      for (; m + 4 <= m_rows;) K::template dot<4>(qtype, wr, nb, &x[m], out), put(4);
      if (m + 2 <= m_rows) K::template dot<2>(qtype, wr, nb, &x[m], out), put(2);
      if (m < m_rows) K::template dot<1>(qtype, wr, nb, &x[m], out), put(1);
    }
  });
}

// x8 groups on the scalar path: each group's 8 rows unpacked to raw rows, then Scalar's kernels
void mm_scalar_x8(int64_t qtype, const uint8_t* w, int64_t row_bytes, const std::vector<Acts>& x, float* y,
                  int64_t groups, int64_t ldy, int64_t k) {
  const int64_t m_rows = static_cast<int64_t>(x.size()), nb = k / 32;
  const int64_t grain = std::max<int64_t>(1, 65536 / (8 * row_bytes));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> raw(static_cast<size_t>(8 * row_bytes));
    float out[4];
    for (int64_t g = g0; g < g1; ++g) {
      unrepack_x8(qtype, w + 8 * g * row_bytes, nb, raw.data());
      for (int i = 0; i < 8; ++i) {
        const uint8_t* wr = raw.data() + i * row_bytes;
        const int64_t n = 8 * g + i;
        int64_t m = 0;
        auto put = [&](int rows) {
          for (int t = 0; t < rows; ++t) y[(m + t) * ldy + n] = out[t];
          m += rows;
        };
        for (; m + 4 <= m_rows;) Scalar::dot<4>(qtype, wr, nb, &x[m], out), put(4);
        if (m + 2 <= m_rows) Scalar::dot<2>(qtype, wr, nb, &x[m], out), put(2);
        if (m < m_rows) Scalar::dot<1>(qtype, wr, nb, &x[m], out), put(1);
      }
    }
  });
}

void mm_raw(int64_t qtype, const uint8_t* w, int64_t row_bytes, const std::vector<Acts>& acts, float* y,
            int64_t n_out, int64_t ldy, int64_t k, bool scalar) {
#if LN_AVX2
  const bool q5 = qtype == Q5_0 || qtype == Q5_1 || qtype == Q5_K;
  if (!scalar && (qtype == Q2_K || qtype == Q3_K)) {
    mm_group8<Group8Q23>(qtype, w, row_bytes, acts, y, n_out, ldy, k);
    return;
  }
  if (!scalar && q5) {
    mm_group8<Group8Q5>(qtype, w, row_bytes, acts, y, n_out, ldy, k);
    return;
  }
  if (!scalar && qtype != Q6_K) {
    mm_group8<Group8>(qtype, w, row_bytes, acts, y, n_out, ldy, k);
    return;
  }
  if (!scalar) {
    mm<Avx2>(qtype, w, row_bytes, acts, y, n_out, ldy, k);
    return;
  }
#endif
  mm<Scalar>(qtype, w, row_bytes, acts, y, n_out, ldy, k);
}

}  // namespace

namespace llama_node {

int64_t ggml_row_bytes(int64_t qtype, int64_t k) {
  const TypeInfo info = type_info(qtype);
  TORCH_CHECK(k % info.block == 0, "ggml_mm: K = ", k, " is not a multiple of the block size ", info.block);
  return k / info.block * info.bytes;
}

void ggml_mm_parts_into(const float* x, int64_t m_rows, int64_t k, const MMPart* parts, int64_t n_parts, float* y,
                        bool scalar) {
  const int64_t nb = k / 32;
  int64_t ldy = 0;
  for (int64_t p = 0; p < n_parts; ++p) {
    ggml_row_bytes(parts[p].qtype, k);  // checks the type and k
    ldy += parts[p].n_out;
  }
  if (m_rows == 0 || ldy == 0) return;
  // the quantised activations: per thread, reused across calls (no allocation per matmul)
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> ds;
  thread_local std::vector<int32_t> sums;
  q.resize(static_cast<size_t>(m_rows * k));
  ds.resize(static_cast<size_t>(2 * m_rows * nb));
  sums.resize(static_cast<size_t>(m_rows * nb));
  int8_t* qp = q.data();
  float* dp = ds.data();
  int32_t* sp = sums.data();
  at::parallel_for(0, m_rows, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * k, k, qp + m * k, dp + 2 * m * nb, dp + (2 * m + 1) * nb, sp + m * nb);
  });
  std::vector<Acts> acts(m_rows);
  for (int64_t m = 0; m < m_rows; ++m) acts[m] = {qp + m * k, dp + 2 * m * nb, dp + (2 * m + 1) * nb, sp + m * nb};
  float* yp = y;  // part p's columns: after those of parts 0 .. p - 1
  for (int64_t p = 0; p < n_parts; yp += parts[p].n_out, ++p) {
    const uint8_t* w = parts[p].w;
    const int64_t qtype = parts[p].qtype, n_out = parts[p].n_out, row_bytes = ggml_row_bytes(qtype, k);
    if (n_out == 0) continue;
    if (!(qtype & X8)) {
      mm_raw(qtype, w, row_bytes, acts, yp, n_out, ldy, k, scalar);
      continue;
    }
    const int64_t groups = n_out / 8, raw_type = qtype & ~X8;  // full groups of 8 rows repacked, the rest raw
    if (groups > 0) {
#if LN_AVX2
      if (!scalar)
        mm_x8(raw_type, w, row_bytes, acts.data(), m_rows, yp, groups, ldy, k);
      else
#endif
        mm_scalar_x8(raw_type, w, row_bytes, acts, yp, groups, ldy, k);
    }
    if (n_out > 8 * groups)
      mm_raw(raw_type, w + 8 * groups * row_bytes, row_bytes, acts, yp + 8 * groups, n_out - 8 * groups, ldy, k,
             scalar);
  }
}

void ggml_mm_into(const float* x, int64_t m_rows, int64_t k, const uint8_t* w, int64_t qtype, int64_t n_out, float* y,
                  bool scalar) {
  const MMPart part{w, qtype, n_out};
  ggml_mm_parts_into(x, m_rows, k, &part, 1, y, scalar);
}

}  // namespace llama_node
