// The row kernels of the CPU ops (positional softmax, softmax-and-mix, the backward's row algebra)
// in portable loops, with the exp polynomial they share, and the dispatch by ISA level (cpu_level)
// between these loops and the intrinsic versions of gpsa_rows_avx2.cpp / gpsa_rows_avx512.cpp. See
// gpsa_cpu.h for the layout of the work and the levels.
#include "gpsa_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if CONVIT_HAVE_X86_ROWS
// The portable loops that have no intrinsic version are compiled once per level with these.
#define CONVIT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CONVIT_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#endif
#define CONVIT_INLINE inline __attribute__((always_inline))

namespace convit_kernels::cpu {
namespace {

// exp for float, written so that it vectorises: Cephes' range reduction and degree-6 polynomial
// (relative error ~2 ulp), 2^n assembled in the exponent bits. NaN propagates.
CONVIT_INLINE float exp_approx(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: still a normal float, so 2^n is representable
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round to nearest via the 1.5 * 2^23 trick
  const float fn = t - 12582912.0f;
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t bits = (int32_t(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
CONVIT_INLINE double exp_approx(double x) { return std::exp(x); }

// x[j] = exp(x[j] - mx) in place, for a softmax row; returns the sum of the new x.
template <typename T>
CONVIT_INLINE T exp_shift_sum(T* x, int64_t n, T mx) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_approx(x[j] - mx);
    x[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T>
CONVIT_INLINE void pos_softmax_row_t(const T* w, const T* colj, const T* rowj, T coli, T rowi, int64_t n, T* out) {
  const T w0 = w[0], w1 = w[1], w2 = w[2];
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const T dx = colj[j] - coli, dy = rowj[j] - rowi;
    const T z = w0 * dx + w1 * dy + w2 * (dx * dx + dy * dy);
    out[j] = z;
    mx = z > mx ? z : mx;
  }
  const T sum = exp_shift_sum(out, n, mx);
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] *= inv;
}

template <typename T>
CONVIT_INLINE T softmax_mix_row_t(T* s, const T* ppos, int64_t n, T gate) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  const T sum = exp_shift_sum(s, n, mx);
  const T a = (T(1) - gate) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = s[j] * a + gate * ppos[j];
  return mx + std::log(sum);
}

template <typename T>
CONVIT_INLINE void pos_row_mean_t(const T* ppos, const T* colj, const T* rowj, T coli, T rowi, int64_t n, T* rbar) {
  double mx = 0, my = 0, mr = 0;
#pragma omp simd reduction(+ : mx, my, mr)
  for (int64_t j = 0; j < n; ++j) {
    const T dx = colj[j] - coli, dy = rowj[j] - rowi;
    mx += double(ppos[j] * dx);
    my += double(ppos[j] * dy);
    mr += double(ppos[j] * (dx * dx + dy * dy));
  }
  rbar[0] = T(mx);
  rbar[1] = T(my);
  rbar[2] = T(mr);
}

template <typename T>
CONVIT_INLINE void bwd_row_t(T* s, T lse, const T* ppos, const T* rbar, T* dm, const T* colj, const T* rowj, T coli,
                             T rowi, int64_t n, T gate, T scale, double* acc) {
  // dL/dpos_weight_i = sum_j dZ_ij r_ij sums terms of both signs weighted by squared distances. As
  // sum_j dZ_ij = 0, r_ij may be centred on its P_pos-mean rbar_i first: same value, far less
  // cancellation.
  double dc = 0, dp = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    T c = 0, q = 0;
#pragma omp simd reduction(+ : c, q)
    for (int64_t j = j0; j < j1; ++j) {
      const T p = exp_approx(s[j] - lse);
      s[j] = p;
      c += p * dm[j];
      q += ppos[j] * dm[j];
    }
    dc += double(c);
    dp += double(q);
  }
  const T omg = T(1) - gate, omg_s = omg * scale, dct = T(dc), dpt = T(dp);
  const T cx = rbar[0], cy = rbar[1], cr = rbar[2];
  double ax = 0, ay = 0, ar = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    T x = 0, y = 0, r = 0;
#pragma omp simd reduction(+ : x, y, r)
    for (int64_t j = j0; j < j1; ++j) {
      const T d = dm[j], pc = s[j], pp = ppos[j];
      s[j] = omg_s * pc * (d - dct);
      const T dz = gate * pp * (d - dpt);
      const T dx = colj[j] - coli, dy = rowj[j] - rowi;
      x += dz * (dx - cx);
      y += dz * (dy - cy);
      r += dz * (dx * dx + dy * dy - cr);
      dm[j] = omg * pc + gate * pp;
    }
    ax += double(x);
    ay += double(y);
    ar += double(r);
  }
  acc[0] += ax;
  acc[1] += ay;
  acc[2] += ar;
  acc[3] += dp - dc;
}

}  // namespace

namespace {
CpuLevel level() {
  static const CpuLevel l = cpu_level();
  return l;
}
}  // namespace

void transpose_copy(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                    float alpha) {
#if CONVIT_HAVE_X86_ROWS
  if (level() == CpuLevel::kAvx512) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
      for (int64_t c0 = 0; c0 < cols; c0 += 16)
        avx512::transpose_tile16(src + r0 * lds + c0, std::min<int64_t>(16, rows - r0),
                                 std::min<int64_t>(16, cols - c0), lds, dst + c0 * ldd + r0, ldd, alpha);
    return;
  }
  if (level() == CpuLevel::kAvx2) {
    for (int64_t r0 = 0; r0 < rows; r0 += 8)
      for (int64_t c0 = 0; c0 < cols; c0 += 8)
        avx2::transpose_tile8(src + r0 * lds + c0, std::min<int64_t>(8, rows - r0), std::min<int64_t>(8, cols - c0),
                              lds, dst + c0 * ldd + r0, ldd, alpha);
    return;
  }
#endif
  transpose_copy<float, float>(src, rows, cols, lds, dst, ldd, alpha);  // the header's plain loop
}

// Float rows: the intrinsic versions at their level; the positional rows (once per call, not per
// batch element) are the portable loops compiled for the level's ISA.
namespace {
#if CONVIT_HAVE_X86_ROWS
CONVIT_TARGET_AVX2 void pos_softmax_row_avx2(const float* w, const float* colj, const float* rowj, float coli,
                                             float rowi, int64_t n, float* out) {
  pos_softmax_row_t<float>(w, colj, rowj, coli, rowi, n, out);
}
CONVIT_TARGET_AVX512 void pos_softmax_row_avx512(const float* w, const float* colj, const float* rowj, float coli,
                                                 float rowi, int64_t n, float* out) {
  pos_softmax_row_t<float>(w, colj, rowj, coli, rowi, n, out);
}
CONVIT_TARGET_AVX2 void pos_row_mean_avx2(const float* ppos, const float* colj, const float* rowj, float coli,
                                          float rowi, int64_t n, float* rbar) {
  pos_row_mean_t<float>(ppos, colj, rowj, coli, rowi, n, rbar);
}
CONVIT_TARGET_AVX512 void pos_row_mean_avx512(const float* ppos, const float* colj, const float* rowj, float coli,
                                              float rowi, int64_t n, float* rbar) {
  pos_row_mean_t<float>(ppos, colj, rowj, coli, rowi, n, rbar);
}
#endif
}  // namespace

void pos_softmax_row(const float* w, const float* colj, const float* rowj, float coli, float rowi, int64_t n,
                     float* out) {
#if CONVIT_HAVE_X86_ROWS
  if (level() == CpuLevel::kAvx512) return pos_softmax_row_avx512(w, colj, rowj, coli, rowi, n, out);
  if (level() == CpuLevel::kAvx2) return pos_softmax_row_avx2(w, colj, rowj, coli, rowi, n, out);
#endif
  pos_softmax_row_t<float>(w, colj, rowj, coli, rowi, n, out);
}
void pos_row_mean(const float* ppos, const float* colj, const float* rowj, float coli, float rowi, int64_t n,
                  float* rbar) {
#if CONVIT_HAVE_X86_ROWS
  if (level() == CpuLevel::kAvx512) return pos_row_mean_avx512(ppos, colj, rowj, coli, rowi, n, rbar);
  if (level() == CpuLevel::kAvx2) return pos_row_mean_avx2(ppos, colj, rowj, coli, rowi, n, rbar);
#endif
  pos_row_mean_t<float>(ppos, colj, rowj, coli, rowi, n, rbar);
}
float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate) {
#if CONVIT_HAVE_X86_ROWS
  if (level() == CpuLevel::kAvx512) return avx512::softmax_mix_row(s, ppos, n, gate);
  if (level() == CpuLevel::kAvx2) return avx2::softmax_mix_row(s, ppos, n, gate);
#endif
  return softmax_mix_row_t<float>(s, ppos, n, gate);
}
void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
             const float* rowj, float coli, float rowi, int64_t n, float gate, float scale, double* acc) {
#if CONVIT_HAVE_X86_ROWS
  if (level() == CpuLevel::kAvx512)
    return avx512::bwd_row(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
  if (level() == CpuLevel::kAvx2)
    return avx2::bwd_row(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
#endif
  bwd_row_t<float>(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
}

// Double rows: the same loops, with libm's exp (no AVX-512 version).
void pos_softmax_row(const double* w, const double* colj, const double* rowj, double coli, double rowi, int64_t n,
                     double* out) {
  pos_softmax_row_t<double>(w, colj, rowj, coli, rowi, n, out);
}
void pos_row_mean(const double* ppos, const double* colj, const double* rowj, double coli, double rowi, int64_t n,
                  double* rbar) {
  pos_row_mean_t<double>(ppos, colj, rowj, coli, rowi, n, rbar);
}
double softmax_mix_row(double* s, const double* ppos, int64_t n, double gate) {
  return softmax_mix_row_t<double>(s, ppos, n, gate);
}
void bwd_row(double* s, double lse, const double* ppos, const double* rbar, double* dm, const double* colj,
             const double* rowj, double coli, double rowi, int64_t n, double gate, double scale, double* acc) {
  bwd_row_t<double>(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
}

}  // namespace convit_kernels::cpu
