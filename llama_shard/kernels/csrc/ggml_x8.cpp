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
// The driver (mm_x8): at M <= 2 (memory-bound) the 8-row kernels group by group; at M >= 3 two consecutive groups
// (16 rows) per pass for tiles of T = 2, 3 and 4 activation rows (3 only for the last 3 rows), each 4-byte
// activation broadcast feeding both groups' maddubs. Per output the same fp32 operations in the same order
// whichever kernel, tile or pass computes it.
// The integer sums run chunk by chunk across the tile's rows (the weight chunk unpacked once, one int16 sum per row
// live), pinned by an empty asm: GCC otherwise reassociates them into trees of all the block's products and spills.
// Measured and dropped: tiles of 8 activation rows (spills: slower than 4), widening by shifts instead of the madd
// (slower), the Q4_1 min terms in a second pass over the blocks in the 8-row kernel (slower at M = 1; the 16-row
// one does it: registers), the sums chunk by chunk without the asm pin (0.9x: spills), half the broadcasts as one
// 128-bit broadcast + pshufd (0.7-0.8x), the 16-row kernels at M <= 2 (from DRAM 0.75-0.85x at M = 2, ~0.9x at
// M = 1, though 1.15-1.3x from cache), two interleaved runs of 16-row units (0.85-0.9x at M = 8 from DRAM),
// prefetching one unit ahead or into L2 only (no difference beyond noise; two units ahead into L1 kept).
#include "ggml_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

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

// an optimisation barrier: GCC otherwise reassociates the integer sums into trees of all the block's products
// (spilling them): v is computed here, in this order
inline void pin(__m256i& v) { asm("" : "+x"(v)); }

template <int T, bool MIN>
void group8_x8_q4(const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  constexpr int size = q4_size<MIN>, codes = MIN ? 32 : 16;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[T], summ[T];
  for (int t = 0; t < T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * size * b;
    prefetch_next8<size>(g + 8 * size * nb, b);
    if constexpr (MIN) {
      const __m256 mw = _mm256_cvtph_ps(ld128(p + 16));
      for (int t = 0; t < T; ++t) summ[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t].s[b]), summ[t]);
    }
    __m256i s[T];
    for (int h = 0; h < 4; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + codes + 32 * h));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      for (int t = 0; t < T; ++t) {
        const int8_t* q = x[t].q + 32 * b + 4 * h;
        const __m256i pr =
            _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast32(q)), _mm256_maddubs_epi16(hi, bcast32(q + 16)));
        s[t] = h == 0 ? pr : _mm256_add_epi16(s[t], pr);
        if constexpr (T > 1) pin(s[t]);
      }
    }
    const __m256 dw = _mm256_cvtph_ps(ld128(p));
    for (int t = 0; t < T; ++t) {
      __m256i isum = _mm256_madd_epi16(s[t], ones);
      if constexpr (!MIN) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * x[t].sum[b]));
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
      acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = MIN ? _mm256_add_ps(acc[t], summ[t]) : acc[t];
}

// Two consecutive groups (16 rows) per pass, T >= 2: each activation broadcast feeds both; out[2 t + j] = group j's
// outputs for activation row t. The same fp32 operations per output as group8_x8_q4 (the min terms' chain is
// separate from the scaled sums' until the final add, whichever pass computes it).
template <int T, bool MIN>
void group16_x8_q4(const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  constexpr int size = q4_size<MIN>, codes = MIN ? 32 : 16;
  const int64_t gb = 8 * size * nb;  // bytes per group
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[2 * T], summ[2 * T];
  for (int t = 0; t < 2 * T; ++t) acc[t] = summ[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * size * b;
    prefetch_next8<size>(g + 4 * gb, b);
    prefetch_next8<size>(g + 5 * gb, b);
    __m256i s[2 * T];
    _Pragma("GCC unroll 4") for (int h = 0; h < 4; ++h) {
      __m256i lo[2], hi[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * gb + codes + 32 * h));
        lo[j] = _mm256_and_si256(v, m4), hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      }
      for (int t = 0; t < T; ++t) {
        const int8_t* q = x[t].q + 32 * b + 4 * h;
        const __m256i xl = bcast32(q), xh = bcast32(q + 16);
        for (int j = 0; j < 2; ++j) {
          const __m256i pr = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl), _mm256_maddubs_epi16(hi[j], xh));
          s[2 * t + j] = h == 0 ? pr : _mm256_add_epi16(s[2 * t + j], pr);
          pin(s[2 * t + j]);
        }
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m256 dw = _mm256_cvtph_ps(ld128(p + j * gb));
      for (int t = 0; t < T; ++t) {
        __m256i isum = _mm256_madd_epi16(s[2 * t + j], ones);
        if constexpr (!MIN) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * x[t].sum[b]));
        const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
        acc[2 * t + j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[2 * t + j]);
      }
    }
  }
  if constexpr (MIN)  // the min terms in a second pass over the blocks (registers: 16 accumulators otherwise)
    for (int64_t b = 0; b < nb; ++b)
      for (int j = 0; j < 2; ++j) {
        const __m256 mw = _mm256_cvtph_ps(ld128(g + j * gb + 8 * size * b + 16));
        for (int t = 0; t < T; ++t) summ[2 * t + j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t].s[b]), summ[2 * t + j]);
      }
  for (int t = 0; t < 2 * T; ++t) out[t] = MIN ? _mm256_add_ps(acc[t], summ[t]) : acc[t];
}

template <int T>
void group8_x8_q8(const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * 34 * b;
    prefetch_next8<34>(g + 8 * 34 * nb, b);
    __m256i isum[T];
    for (int h = 0; h < 8; ++h) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * h));
      const __m256i wa = _mm256_sign_epi8(w, w);
      for (int t = 0; t < T; ++t) {
        const __m256i prod = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(bcast32(x[t].q + 32 * b + 4 * h), w));
        const __m256i pr = _mm256_madd_epi16(prod, ones);
        isum[t] = h == 0 ? pr : _mm256_add_epi32(isum[t], pr);
        if constexpr (T > 1) pin(isum[t]);
      }
    }
    const __m256 dw = _mm256_cvtph_ps(ld128(p));
    for (int t = 0; t < T; ++t) {
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
      acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[t]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

template <int T>
void group16_x8_q8(const uint8_t* g, int64_t nb, const Acts* x, __m256* out) {
  const int64_t gb = 8 * 34 * nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2 * T];
  for (int t = 0; t < 2 * T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + 8 * 34 * b;
    prefetch_next8<34>(g + 4 * gb, b);
    prefetch_next8<34>(g + 5 * gb, b);
    __m256i isum[2 * T];
    _Pragma("GCC unroll 8") for (int h = 0; h < 8; ++h) {
      __m256i w[2], wa[2];
      for (int j = 0; j < 2; ++j) {
        w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * gb + 16 + 32 * h));
        wa[j] = _mm256_sign_epi8(w[j], w[j]);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i xv = bcast32(x[t].q + 32 * b + 4 * h);
        for (int j = 0; j < 2; ++j) {
          const __m256i pr = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xv, w[j])), ones);
          isum[2 * t + j] = h == 0 ? pr : _mm256_add_epi32(isum[2 * t + j], pr);
          pin(isum[2 * t + j]);
        }
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m256 dw = _mm256_cvtph_ps(ld128(p + j * gb));
      for (int t = 0; t < T; ++t) {
        const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
        acc[2 * t + j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[2 * t + j]), acc[2 * t + j]);
      }
    }
  }
  for (int t = 0; t < 2 * T; ++t) out[t] = acc[t];
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
namespace {
// one tile of T activation rows against one group (ng = 1) or two consecutive groups (ng = 2) at g; out[ng * t + j]
// is group j's 8 outputs for activation row t
template <int T>
void tile_x8(int64_t qtype, const uint8_t* g, int ng, int64_t nb, const Acts* x, __m256* out) {
  if (ng == 1) {
    switch (qtype) {
      case Q4_0: group8_x8_q4<T, false>(g, nb, x, out); break;
      case Q4_1: group8_x8_q4<T, true>(g, nb, x, out); break;
      default: group8_x8_q8<T>(g, nb, x, out); break;
    }
  } else if constexpr (T == 1) {  // the 8-row kernel on each group (a one-row tail: the pair is in cache)
    int64_t size, head;
    x8_parts(qtype, &size, &head);
    tile_x8<1>(qtype, g, 1, nb, x, out);
    tile_x8<1>(qtype, g + 8 * size * nb, 1, nb, x, out + 1);
  } else {
    switch (qtype) {
      case Q4_0: group16_x8_q4<T, false>(g, nb, x, out); break;
      case Q4_1: group16_x8_q4<T, true>(g, nb, x, out); break;
      default: group16_x8_q8<T>(g, nb, x, out); break;
    }
  }
}
}  // namespace

void mm_x8(int64_t qtype, const uint8_t* w, int64_t row_bytes, const Acts* x, int64_t m_rows, float* y,
           int64_t groups, int64_t ldy, int64_t k) {
  const int64_t nb = k / 32, units = (groups + 1) / 2;  // unit u: groups 2u and 2u + 1 (the last may be alone)
  const int64_t grain = std::max<int64_t>(1, 65536 / (16 * row_bytes));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    __m256 out[8];
    if (m_rows <= 2) {
      // Memory-bound: the 8-row kernels group by group, visited as 2 interleaved runs (g0, mid, g0 + 1, mid + 1,
      // ...): one x8 matrix is one sequential stream, and from DRAM (a whole model at M = 1) two streams read faster
      // than one (measured, call-by-call alternation, 1 thread: Q8_0 49152 x 576 0.92-1.29x -> 1.07x of the raw
      // layout; 4 streams no better), and each group's prefetch of the next has the other run's group to land.
      constexpr int64_t S = 2;
      const int64_t g0 = 2 * u0, g1 = std::min(2 * u1, groups), len = (g1 - g0 + S - 1) / S;
      for (int64_t j = 0; j < len * S; ++j) {
        const int64_t g = g0 + (j % S) * len + j / S;
        if (g >= g1) continue;
        const uint8_t* p = w + 8 * g * row_bytes;
        if (m_rows == 2)
          tile_x8<2>(qtype, p, 1, nb, x, out);
        else
          tile_x8<1>(qtype, p, 1, nb, x, out);
        for (int t = 0; t < m_rows; ++t) _mm256_storeu_ps(y + t * ldy + 8 * g, out[t]);
      }
      return;
    }
    // Compute-bound: pairs of groups in order (one run: two runs of the 16-row units were 0.85-0.9x at M = 8 from
    // DRAM), each T-tile reading the pair, the kernels prefetching two units ahead.
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = 2 * u;
      const int ng = g + 1 < groups ? 2 : 1;
      const uint8_t* p = w + 8 * g * row_bytes;
      int64_t m = 0;
      auto put = [&](int rows) {
        for (int t = 0; t < rows; ++t)
          for (int i = 0; i < ng; ++i) _mm256_storeu_ps(y + (m + t) * ldy + 8 * (g + i), out[ng * t + i]);
        m += rows;
      };
      for (; m + 4 <= m_rows;) tile_x8<4>(qtype, p, ng, nb, x + m, out), put(4);
      if (m + 3 == m_rows) tile_x8<3>(qtype, p, ng, nb, x + m, out), put(3);
      if (m + 2 <= m_rows) tile_x8<2>(qtype, p, ng, nb, x + m, out), put(2);
      if (m < m_rows) tile_x8<1>(qtype, p, ng, nb, x + m, out), put(1);
    }
  });
}
#endif

}  // namespace llama_node::detail
