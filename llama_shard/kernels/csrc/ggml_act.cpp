// The activation rows quantised per block of 32, for every kernel of ggml_mm.cpp (ggml's quantize_row_q8_0, plus
// the block sums): int8 codes q = round-half-even(x * 127/amax), d = amax/127, s = d * sum(q).
//
// AVX2: amax by max_ps over |x| (exact, in any order; max_ps(|x|, acc) keeps acc where x is NaN, as std::fmax does),
// the same fp32 multiply per element, _mm256_round_ps to nearest even (= std::nearbyint in the default rounding mode)
// and an exact int32 sum: the scalar loop's bits for finite x (the scalar loop called libm's fmaxf and nearbyintf per
// element: ~3% of a decode step's CPU at 8 streams).
#include "ggml_kernels.h"

#include <cmath>

namespace llama_node::detail {

void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s, int32_t* sums) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + 32 * b;
    int sum = 0;
#if LN_AVX2
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      mx = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]), mx);
    }
    __m128 m = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    __m256i c[4], acc = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const __m256 r = _mm256_mul_ps(v[i], _mm256_set1_ps(id));
      c[i] = _mm256_cvtps_epi32(_mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      acc = _mm256_add_epi32(acc, c[i]);
    }
    __m128i a = _mm_add_epi32(_mm256_extracti128_si256(acc, 1), _mm256_castsi256_si128(acc));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm_cvtsi128_si32(_mm_add_epi32(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(2, 3, 0, 1))));
    // packs work within 128-bit lanes: dword j of the packed vector is codes 4j..4j+3 of v[j % 4] (low lane) or
    // 4..7 of it (high lane); the permute puts them in order
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * id));  // round half to even, as _mm256_round_ps
      q[32 * b + i] = static_cast<int8_t>(v);
      sum += v;
    }
#endif
    d[b] = amax / 127.f;
    s[b] = d[b] * static_cast<float>(sum);
    sums[b] = sum;
  }
}

}  // namespace llama_node::detail
