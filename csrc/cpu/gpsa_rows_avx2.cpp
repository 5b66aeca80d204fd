// AVX2 + FMA versions of the float row kernels of gpsa_cpu.h and of the 8 x 8 transpose tile: the
// "avx2" ISA level (gpsa_cpu.h), for the x86-64 CPUs without AVX-512 (AMD Zen 2/3, Intel before Ice
// Lake, most laptops). Compiled for AVX2 by target attributes (the rest of the extension is built for
// baseline x86-64) and chosen at run time by cpu_level(). Same formulas as the portable loops and the
// AVX-512 kernels (the same exp polynomial, float sums over chunks of kSumChunk elements added in
// double). AVX2 has no mask registers: a row's tail (N = 196 is 24 vectors and 4) is loaded and stored
// with vmaskmov and a lane mask from a table, and its unused lanes are zeroed before they are summed.
#include "gpsa_cpu.h"

#if CONVIT_HAVE_X86_ROWS

#include <immintrin.h>

#include <cmath>
#include <limits>

#define CONVIT_AVX2 __attribute__((target("avx2,fma")))
#define CONVIT_AVX2_INLINE CONVIT_AVX2 inline __attribute__((always_inline))

namespace convit_kernels::cpu::avx2 {
namespace {

// Loading 8 ints from kMaskTable + 8 - r gives r all-ones lanes, then zeros.
alignas(64) const int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// The lane mask of [j, j + 8) in a row of n (all lanes when the vector is full).
CONVIT_AVX2_INLINE __m256i lanes(int64_t j, int64_t n) {
  const int64_t r = n - j >= 8 ? 8 : n - j;
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - r));
}

// exp_approx of gpsa_cpu_rows.cpp on 8 lanes: clamp to [-87, 88] (NaN propagates: max/min return their
// second operand when it is NaN), Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial, 2^n built
// in the exponent bits.
CONVIT_AVX2_INLINE __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  const __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(fn, _mm256_set1_ps(2.12194440e-4f), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

CONVIT_AVX2_INLINE float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

CONVIT_AVX2_INLINE float reduce_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Adds the 8 float lanes of v to the double accumulators lo (lanes 0-3) and hi (4-7).
CONVIT_AVX2_INLINE void add_to_double(__m256 v, __m256d& lo, __m256d& hi) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

CONVIT_AVX2_INLINE double reduce_double(__m256d lo, __m256d hi) {
  const __m256d s = _mm256_add_pd(lo, hi);
  __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
  return _mm_cvtsd_f64(t);
}

// A full or masked load / store of the 8 lanes at p (mask from lanes(); unused lanes load as 0).
CONVIT_AVX2_INLINE __m256 load(const float* p, __m256i k, bool full) {
  return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, k);
}
CONVIT_AVX2_INLINE void store(float* p, __m256i k, bool full, __m256 v) {
  if (full) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, k, v);
}

}  // namespace

CONVIT_AVX2 float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t full = n / 8 * 8;
  __m256 mx0 = neg_inf, mx1 = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= full; j += 16) {
    mx0 = _mm256_max_ps(mx0, _mm256_loadu_ps(s + j));
    mx1 = _mm256_max_ps(mx1, _mm256_loadu_ps(s + j + 8));
  }
  for (; j < full; j += 8) mx0 = _mm256_max_ps(mx0, _mm256_loadu_ps(s + j));
  const __m256i tail = lanes(full, n);
  if (full < n)
    mx1 = _mm256_max_ps(mx1, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(s + full, tail), _mm256_castsi256_ps(tail)));
  const float m = reduce_max(_mm256_max_ps(mx0, mx1));
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  for (j = 0; j + 16 <= full; j += 16) {
    const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), mv));
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  for (; j < full; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    sum0 = _mm256_add_ps(sum0, e);
  }
  if (full < n) {
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + full, tail), mv)),
                                   _mm256_castsi256_ps(tail));
    _mm256_maskstore_ps(s + full, tail, e);
    sum1 = _mm256_add_ps(sum1, e);
  }
  const float sum = reduce_add(_mm256_add_ps(sum0, sum1));
  const __m256 a = _mm256_set1_ps((1.0f - gate) / sum), g = _mm256_set1_ps(gate);
  for (j = 0; j < n; j += 8) {
    const bool f = j < full;  // else the tail
    const __m256 mixed = _mm256_fmadd_ps(load(s + j, tail, f), a, _mm256_mul_ps(g, load(ppos + j, tail, f)));
    store(s + j, tail, f, mixed);
  }
  return m + std::log(sum);
}

CONVIT_AVX2 void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
                         const float* rowj, float coli, float rowi, int64_t n, float gate, float scale,
                         double* acc) {
  // Pass 1: P_c = exp(s - lse) in place; rowsum(P_c dM) and rowsum(P_pos dM).
  const __m256 lv = _mm256_set1_ps(lse);
  __m256d dc_lo = _mm256_setzero_pd(), dc_hi = dc_lo, dp_lo = dc_lo, dp_hi = dc_lo;
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    __m256 c = _mm256_setzero_ps(), q = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j += 8) {
      const bool f = j + 8 <= j1;
      const __m256i k = lanes(j, j1);
      const __m256 p = exp8(_mm256_sub_ps(load(s + j, k, f), lv));
      store(s + j, k, f, p);
      const __m256 d = load(dm + j, k, f);  // zero in the tail's unused lanes
      c = _mm256_fmadd_ps(p, d, c);
      q = _mm256_fmadd_ps(load(ppos + j, k, f), d, q);
    }
    add_to_double(c, dc_lo, dc_hi);
    add_to_double(q, dp_lo, dp_hi);
  }
  const double dc = reduce_double(dc_lo, dc_hi), dp = reduce_double(dp_lo, dp_hi);
  // Pass 2: scale dS_c and M in place, and dL/dpos_weight with r_ij centred on rbar (see bwd_row_t).
  const float omg = 1.0f - gate;
  const __m256 omg_v = _mm256_set1_ps(omg), omg_s = _mm256_set1_ps(omg * scale), g = _mm256_set1_ps(gate);
  const __m256 dct = _mm256_set1_ps(float(dc)), dpt = _mm256_set1_ps(float(dp));
  const __m256 ci = _mm256_set1_ps(coli), ri = _mm256_set1_ps(rowi);
  const __m256 cx = _mm256_set1_ps(rbar[0]), cy = _mm256_set1_ps(rbar[1]), cr = _mm256_set1_ps(rbar[2]);
  __m256d x_lo = _mm256_setzero_pd(), x_hi = x_lo, y_lo = x_lo, y_hi = x_lo, r_lo = x_lo, r_hi = x_lo;
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    __m256 x = _mm256_setzero_ps(), y = _mm256_setzero_ps(), r = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j += 8) {
      const bool f = j + 8 <= j1;
      const __m256i k = lanes(j, j1);
      const __m256 d = load(dm + j, k, f), pc = load(s + j, k, f), pp = load(ppos + j, k, f);
      store(s + j, k, f, _mm256_mul_ps(_mm256_mul_ps(omg_s, pc), _mm256_sub_ps(d, dct)));
      // pp is 0 in unused lanes, so dz is too.
      const __m256 dz = _mm256_mul_ps(_mm256_mul_ps(g, pp), _mm256_sub_ps(d, dpt));
      const __m256 dx = _mm256_sub_ps(load(colj + j, k, f), ci);
      const __m256 dy = _mm256_sub_ps(load(rowj + j, k, f), ri);
      x = _mm256_fmadd_ps(dz, _mm256_sub_ps(dx, cx), x);
      y = _mm256_fmadd_ps(dz, _mm256_sub_ps(dy, cy), y);
      const __m256 rr = _mm256_fmadd_ps(dx, dx, _mm256_mul_ps(dy, dy));
      r = _mm256_fmadd_ps(dz, _mm256_sub_ps(rr, cr), r);
      store(dm + j, k, f, _mm256_fmadd_ps(omg_v, pc, _mm256_mul_ps(g, pp)));
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

// dst (cols x rows) = alpha src^T for rows, cols <= 8. Rows beyond `rows` read as zeros, columns
// beyond `cols` are neither read nor stored. Three shuffle rounds: 32-bit pairs of row pairs, 64-bit
// pairs (columns c and c + 4 of four rows in the two 128-bit halves), then the 128-bit halves.
CONVIT_AVX2 void transpose_tile8(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                                 float alpha) {
  const bool full_cols = cols == 8, full_rows = rows == 8;
  const __m256i col_mask = lanes(0, cols), row_mask = lanes(0, rows);
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = i < rows ? load(src + i * lds, col_mask, full_cols) : _mm256_setzero_ps();
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {  // r[g + c] half L: column 4L + c of rows g..g+3
    r[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    r[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  for (int c = 0; c < 4; ++c) {
    if (c < cols)
      store(dst + c * ldd, row_mask, full_rows, _mm256_mul_ps(_mm256_permute2f128_ps(r[c], r[4 + c], 0x20), scale));
    if (c + 4 < cols)
      store(dst + (c + 4) * ldd, row_mask, full_rows,
            _mm256_mul_ps(_mm256_permute2f128_ps(r[c], r[4 + c], 0x31), scale));
  }
}

}  // namespace convit_kernels::cpu::avx2

#endif  // CONVIT_HAVE_X86_ROWS
