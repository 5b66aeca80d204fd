// AVX-512 versions of the float row kernels of gpsa_cpu.h and of the 16 x 16 transpose tile, written
// with intrinsics in functions compiled for AVX-512 by target attributes (the rest of the extension is
// built for baseline x86-64) and chosen at run time by cpu_level(). At ConViT's N = 196 a row is 12
// vectors and a tail; GCC's auto-vectorised loops spent as long in masked tails, serial lane-by-lane
// reductions and clamp blends as in the arithmetic. Same formulas as the portable loops in
// gpsa_cpu_rows.cpp (the same exp polynomial, float sums over chunks of kSumChunk elements added in
// double), so every level agrees to rounding; tests run every level (CONVIT_KERNELS_CPU_ISA).
#include "gpsa_cpu.h"

#if CONVIT_HAVE_X86_ROWS

#include <immintrin.h>

#include <cmath>
#include <limits>

#define CONVIT_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#define CONVIT_AVX512_INLINE CONVIT_AVX512 inline __attribute__((always_inline))

namespace convit_kernels::cpu::avx512 {
namespace {

// exp_approx of gpsa_cpu_rows.cpp on 16 lanes: clamp to [-87, 88] (NaN propagates: max/min return
// their second operand when it is NaN), Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial,
// and the power of two applied by vscalefps.
CONVIT_AVX512_INLINE __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
  const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fn, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, fn);
}

// Lanes [j, j + 16) of a row of n: all of them, or the tail's.
CONVIT_AVX512_INLINE __mmask16 lanes(int64_t j, int64_t n) {
  return n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
}

// Adds the 16 float lanes of v to the double accumulators lo (lanes 0-7) and hi (8-15).
CONVIT_AVX512_INLINE void add_to_double(__m512 v, __m512d& lo, __m512d& hi) {
  lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
}

CONVIT_AVX512_INLINE double reduce_double(__m512d lo, __m512d hi) {
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

}  // namespace

CONVIT_AVX512 float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = neg_inf;
  for (int64_t j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, lanes(j, n), s + j));
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), mv));
    _mm512_storeu_ps(s + j, e0);
    _mm512_storeu_ps(s + j + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 k = lanes(j, n);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum0 = _mm512_mask_add_ps(sum0, k, sum0, e);
  }
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  const __m512 a = _mm512_set1_ps((1.0f - gate) / sum), g = _mm512_set1_ps(gate);
  for (j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(j, n);
    const __m512 mixed = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s + j), a,
                                         _mm512_mul_ps(g, _mm512_maskz_loadu_ps(k, ppos + j)));
    _mm512_mask_storeu_ps(s + j, k, mixed);
  }
  return m + std::log(sum);
}

CONVIT_AVX512 void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
                           const float* rowj, float coli, float rowi, int64_t n, float gate, float scale,
                           double* acc) {
  // Pass 1: P_c = exp(s - lse) in place; rowsum(P_c dM) and rowsum(P_pos dM).
  const __m512 lv = _mm512_set1_ps(lse);
  __m512d dc_lo = _mm512_setzero_pd(), dc_hi = dc_lo, dp_lo = dc_lo, dp_hi = dc_lo;
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    __m512 c = _mm512_setzero_ps(), q = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; j += 16) {
      const __mmask16 k = lanes(j, j1);
      const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), lv));
      _mm512_mask_storeu_ps(s + j, k, p);
      const __m512 d = _mm512_maskz_loadu_ps(k, dm + j);  // zero in the tail's unused lanes
      c = _mm512_fmadd_ps(p, d, c);
      q = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, ppos + j), d, q);
    }
    add_to_double(c, dc_lo, dc_hi);
    add_to_double(q, dp_lo, dp_hi);
  }
  const double dc = reduce_double(dc_lo, dc_hi), dp = reduce_double(dp_lo, dp_hi);
  // Pass 2: scale dS_c and M in place, and dL/dpos_weight with r_ij centred on rbar (see bwd_row_t).
  const float omg = 1.0f - gate;
  const __m512 omg_v = _mm512_set1_ps(omg), omg_s = _mm512_set1_ps(omg * scale), g = _mm512_set1_ps(gate);
  const __m512 dct = _mm512_set1_ps(float(dc)), dpt = _mm512_set1_ps(float(dp));
  const __m512 ci = _mm512_set1_ps(coli), ri = _mm512_set1_ps(rowi);
  const __m512 cx = _mm512_set1_ps(rbar[0]), cy = _mm512_set1_ps(rbar[1]), cr = _mm512_set1_ps(rbar[2]);
  __m512d x_lo = _mm512_setzero_pd(), x_hi = x_lo, y_lo = x_lo, y_hi = x_lo, r_lo = x_lo, r_hi = x_lo;
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    __m512 x = _mm512_setzero_ps(), y = _mm512_setzero_ps(), r = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; j += 16) {
      const __mmask16 k = lanes(j, j1);
      const __m512 d = _mm512_maskz_loadu_ps(k, dm + j), pc = _mm512_maskz_loadu_ps(k, s + j);
      const __m512 pp = _mm512_maskz_loadu_ps(k, ppos + j);
      _mm512_mask_storeu_ps(s + j, k, _mm512_mul_ps(_mm512_mul_ps(omg_s, pc), _mm512_sub_ps(d, dct)));
      const __m512 dz = _mm512_maskz_mul_ps(k, _mm512_mul_ps(g, pp), _mm512_sub_ps(d, dpt));  // 0 in unused lanes
      const __m512 dx = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, colj + j), ci);
      const __m512 dy = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, rowj + j), ri);
      x = _mm512_fmadd_ps(dz, _mm512_sub_ps(dx, cx), x);
      y = _mm512_fmadd_ps(dz, _mm512_sub_ps(dy, cy), y);
      const __m512 rr = _mm512_fmadd_ps(dx, dx, _mm512_mul_ps(dy, dy));
      r = _mm512_fmadd_ps(dz, _mm512_sub_ps(rr, cr), r);
      _mm512_mask_storeu_ps(dm + j, k, _mm512_fmadd_ps(omg_v, pc, _mm512_mul_ps(g, pp)));
    }
    add_to_double(x, x_lo, x_hi);
    add_to_double(y, y_lo, y_hi);
    add_to_double(r, r_lo, r_hi);
  }
  acc[0] += reduce_double(x_lo, x_hi);
  acc[1] += reduce_double(y_lo, y_hi);
  acc[2] += reduce_double(r_lo, r_hi);
  acc[3] += dp - dc;
}

// dst (cols x rows) = alpha src^T for rows, cols <= 16. Rows beyond `rows` read as zeros (masked
// loads), columns beyond `cols` are not stored. The 16 x 16 transpose takes four shuffle rounds:
// 32-bit pairs of row pairs, then 64-bit pairs (columns 4L + c of 4 rows in lane L), then 128-bit
// lanes twice, which leaves column 4L + c of all 16 rows in one register.
CONVIT_AVX512 void transpose_tile16(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                                    int64_t ldd, float alpha) {
  const __mmask16 col_mask = lanes(0, cols), row_mask = lanes(0, rows);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * lds) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + c] lane L: column 4L + c of rows g..g+3
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int c = 0; c < 4; ++c) {
    const __m512 va = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), vb = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 wa = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 wb = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    const __m512 out[4] = {_mm512_shuffle_f32x4(va, wa, 0x88), _mm512_shuffle_f32x4(vb, wb, 0x88),
                           _mm512_shuffle_f32x4(va, wa, 0xDD), _mm512_shuffle_f32x4(vb, wb, 0xDD)};
    for (int L = 0; L < 4; ++L) {
      const int j = 4 * L + c;
      if (j < cols) _mm512_mask_storeu_ps(dst + j * ldd, row_mask, _mm512_mul_ps(out[L], scale));
    }
  }
}

}  // namespace convit_kernels::cpu::avx512

#endif  // CONVIT_HAVE_X86_ROWS
