// The portable kernels of every type (the scalar path of ggml_mm.cpp's driver, on any CPU): one weight row of raw
// blocks against T activation rows. Integer block sums (exact, so their order is free), then per block in order
// acc += d_w * d_x * float(isum) (and summ += m_w * s_x for the types with a min): the fp32 operations the AVX2
// kernels do per output, so both paths give the same bits per row for any T.
// The 4- and 5-bit types share their loops: a 5-bit code is the nibble plus a fifth bit from a separate field.
#include "ggml_kernels.h"

namespace llama_node::detail {
namespace {

template <int T>
void q8_0(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  float acc[T] = {};
  for (int64_t b = 0; b < nb; ++b, w += 34) {
    const float dw = f16(w);
    const auto* qw = reinterpret_cast<const int8_t*>(w + 2);
    for (int t = 0; t < T; ++t) {
      int isum = 0;
      for (int i = 0; i < 32; ++i) isum += qw[i] * x[t].q[32 * b + i];
      acc[t] += dw * x[t].d[b] * static_cast<float>(isum);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

// Q4_0, Q4_1 (FIFTH false) and Q5_0, Q5_1: {f16 d[, m]; [u8 qh[4];] u8 qs[16]}. Element j < 16 is the low nibble of
// qs[j], j >= 16 the high nibble of qs[j - 16]; the fifth bit of element j is bit j of qh (little-endian).
// w = d * (q - 8 or 16) without a min, d * q + m with one.
template <int T, bool MIN, bool FIFTH>
void q4_5(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  constexpr int head = MIN ? 4 : 2, size = head + (FIFTH ? 4 : 0) + 16, offset = MIN ? 0 : FIFTH ? 16 : 8;
  float acc[T] = {}, summ[T] = {};
  for (int64_t b = 0; b < nb; ++b, w += size) {
    const float dw = f16(w), mw = MIN ? f16(w + 2) : 0.f;
    const uint32_t qh = FIFTH ? ld32(w + head) : 0;
    const uint8_t* qs = w + size - 16;
    int code[32];
    for (int i = 0; i < 16; ++i) {
      code[i] = ((qs[i] & 0xF) | static_cast<int>(((qh >> i) & 1) << 4)) - offset;
      code[i + 16] = ((qs[i] >> 4) | static_cast<int>(((qh >> (i + 16)) & 1) << 4)) - offset;
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* qx = x[t].q + 32 * b;
      int isum = 0;
      for (int i = 0; i < 32; ++i) isum += code[i] * qx[i];
      acc[t] += dw * x[t].d[b] * static_cast<float>(isum);
      if (MIN) summ[t] += mw * x[t].s[b];
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t] + summ[t];
}

// Q4_K (FIFTH false) and Q5_K: super-blocks {f16 d, dmin; u8 scales[12]; [u8 qh[32];] u8 qs[128]}; sub-block j has
// the low (even j) or high nibbles of qs[32 (j / 2) + l] and bit j of qh[l]; w = d sc_j q - dmin m_j.
template <int T, bool FIFTH>
void k4_5(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  constexpr int size = FIFTH ? 176 : 144, qs_off = FIFTH ? 48 : 16;
  float acc[T] = {}, summ[T] = {};
  for (int64_t b = 0; b < nb / 8; ++b, w += size) {
    const float d = f16(w), dmin = f16(w + 2);
    const uint8_t* qh = w + 16;
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_k4(w + 4, j, &sc, &m);
      const uint8_t* qs = w + qs_off + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      const float dsc = d * static_cast<float>(sc), dm = dmin * static_cast<float>(m);
      const int64_t xb = 8 * b + j;
      for (int t = 0; t < T; ++t) {
        const int8_t* qx = x[t].q + 32 * xb;
        int isum = 0;
        for (int i = 0; i < 32; ++i)
          isum += (((qs[i] >> shift) & 0xF) | (FIFTH ? ((qh[i] >> j) & 1) << 4 : 0)) * qx[i];
        acc[t] += dsc * x[t].d[xb] * static_cast<float>(isum);
        summ[t] += dm * x[t].s[xb];
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t] - summ[t];
}

template <int T>
void q6_k(const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  float acc[T] = {};
  for (int64_t b = 0; b < nb / 8; ++b, w += 210) {
    const float d = f16(w + 208);
    const auto* scales = reinterpret_cast<const int8_t*>(w + 192);
    for (int j = 0; j < 8; ++j) {  // 32-blocks: half n = j / 4, quarter j % 4
      const int n = j / 4, quarter = j % 4;
      const uint8_t* ql = w + 64 * n + 32 * (quarter % 2);
      const uint8_t* qh = w + 128 + 32 * n;
      const int lshift = 4 * (quarter / 2), hshift = 2 * quarter;
      const int64_t xb = 8 * b + j;
      for (int t = 0; t < T; ++t) {
        const int8_t* qx = x[t].q + 32 * xb;
        int isum = 0;
        for (int half = 0; half < 2; ++half) {
          int part = 0;
          for (int i = 16 * half; i < 16 * half + 16; ++i) {
            const int q = (((ql[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4)) - 32;
            part += q * qx[i];
          }
          isum += scales[8 * n + half + 2 * quarter] * part;
        }
        acc[t] += d * x[t].d[xb] * static_cast<float>(isum);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

}  // namespace

template <int T>
void scalar_dot(int64_t qtype, const uint8_t* w, int64_t nb, const Acts* x, float* out) {
  switch (qtype) {
    case Q4_0: q4_5<T, false, false>(w, nb, x, out); break;
    case Q4_1: q4_5<T, true, false>(w, nb, x, out); break;
    case Q5_0: q4_5<T, false, true>(w, nb, x, out); break;
    case Q5_1: q4_5<T, true, true>(w, nb, x, out); break;
    case Q8_0: q8_0<T>(w, nb, x, out); break;
    case Q4_K: k4_5<T, false>(w, nb, x, out); break;
    case Q5_K: k4_5<T, true>(w, nb, x, out); break;
    case Q2_K:
    case Q3_K: scalar_q23<T>(qtype, w, nb, x, out); break;
    default: q6_k<T>(w, nb, x, out); break;
  }
}
template void scalar_dot<1>(int64_t, const uint8_t*, int64_t, const Acts*, float*);
template void scalar_dot<2>(int64_t, const uint8_t*, int64_t, const Acts*, float*);
template void scalar_dot<4>(int64_t, const uint8_t*, int64_t, const Acts*, float*);

}  // namespace llama_node::detail
