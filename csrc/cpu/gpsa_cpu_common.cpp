// Row kernels, BLAS access, the positional table, argument checks and the CPU registration of the
// convit_kernels ops. See gpsa_cpu.h for the layout of the work.
#include "gpsa_cpu.h"

#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

// libtorch exports the Fortran BLAS it links (MKL on x86-64 wheels). Weak, so that a libtorch
// without them still loads this extension: the kernels then use the plain loops below.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CONVIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CONVIT_CLONES
#endif
#define CONVIT_INLINE inline __attribute__((always_inline))

namespace convit_kernels::cpu {
namespace {

// Plain loops for a libtorch without a BLAS (row-major, as matmul).
template <typename T>
void matmul_loops(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                  int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (!accumulate) std::fill(ci, ci + n, T(0));
    for (int64_t l = 0; l < k; ++l) {
      const T ail = a[i * lda + l];
      const T* bl = b + l * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += ail * bl[j];
    }
  }
}

// Row-major C = A B through a column-major BLAS: C^T = B^T A^T, where a row-major matrix is its
// transpose in column-major terms, so neither operand needs a transpose flag.
template <typename T, typename F>
void matmul_blas(F* blas, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc, bool accumulate) {
  const int64_t lim = std::numeric_limits<int>::max();
  if (blas != nullptr && m < lim && n < lim && k < lim && lda < lim && ldb < lim && ldc < lim) {
    const char no = 'N';
    const int im = int(m), in = int(n), ik = int(k), ila = int(lda), ilb = int(ldb), ilc = int(ldc);
    const T one = 1, beta = accumulate ? T(1) : T(0);
    blas(&no, &no, &in, &im, &ik, &one, b, &ilb, a, &ila, &beta, c, &ilc);
    return;
  }
  matmul_loops<T>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

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
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_approx(out[j] - mx);
    out[j] = e;
    sum += e;
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] *= inv;
}

template <typename T>
CONVIT_INLINE T softmax_mix_row_t(T* s, const T* ppos, int64_t n, T gate) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_approx(s[j] - mx);
    s[j] = e;
    sum += e;
  }
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

std::string cpu_isa() {
  static const std::string isa = [] {
#if CONVIT_HAVE_AVX512_ROWS
    const char* portable = std::getenv("CONVIT_KERNELS_CPU_PORTABLE");
    const bool forced = portable != nullptr && std::string(portable) == "1";
    if (!forced && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return "avx512";
#endif
    return "portable";
  }();
  return isa;
}

namespace {
bool use_avx512() {
  static const bool on = cpu_isa() == "avx512";
  return on;
}
}  // namespace

void transpose_copy(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                    float alpha) {
#if CONVIT_HAVE_AVX512_ROWS
  if (use_avx512()) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
      for (int64_t c0 = 0; c0 < cols; c0 += 16)
        avx512::transpose_tile16(src + r0 * lds + c0, std::min<int64_t>(16, rows - r0),
                                 std::min<int64_t>(16, cols - c0), lds, dst + c0 * ldd + r0, ldd, alpha);
    return;
  }
#endif
  transpose_copy<float, float>(src, rows, cols, lds, dst, ldd, alpha);  // the header's plain loop
}

void* thread_scratch(size_t bytes) {
  thread_local c10::DataPtr buffer;
  thread_local size_t capacity = 0;
  if (bytes > capacity || buffer.get() == nullptr) {
    buffer = c10::GetCPUAllocator()->allocate(std::max<size_t>(bytes, 64));  // 64-byte aligned
    capacity = bytes;
  }
  return buffer.get();
}

void matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
            int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (k > 0) {  // (k = 0 takes the BLAS path, which zeroes C unless accumulating)
    // oneDNN's micro-kernel where libtorch has it for this CPU, else libtorch's own BLAS call.
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
    return;
  }
#endif
  matmul_blas<float>(sgemm_, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}
void matmul(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, double* c,
            int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  matmul_blas<double>(dgemm_, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}
void matmul_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

CONVIT_CLONES void pos_softmax_row(const float* w, const float* colj, const float* rowj, float coli, float rowi,
                                   int64_t n, float* out) {
  pos_softmax_row_t<float>(w, colj, rowj, coli, rowi, n, out);
}
void pos_softmax_row(const double* w, const double* colj, const double* rowj, double coli, double rowi, int64_t n,
                     double* out) {
  pos_softmax_row_t<double>(w, colj, rowj, coli, rowi, n, out);
}
namespace {
CONVIT_CLONES float portable_softmax_mix_row(float* s, const float* ppos, int64_t n, float gate) {
  return softmax_mix_row_t<float>(s, ppos, n, gate);
}
}  // namespace
float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate) {
#if CONVIT_HAVE_AVX512_ROWS
  if (use_avx512()) return avx512::softmax_mix_row(s, ppos, n, gate);
#endif
  return portable_softmax_mix_row(s, ppos, n, gate);
}
double softmax_mix_row(double* s, const double* ppos, int64_t n, double gate) {
  return softmax_mix_row_t<double>(s, ppos, n, gate);
}
CONVIT_CLONES void pos_row_mean(const float* ppos, const float* colj, const float* rowj, float coli, float rowi,
                                int64_t n, float* rbar) {
  pos_row_mean_t<float>(ppos, colj, rowj, coli, rowi, n, rbar);
}
void pos_row_mean(const double* ppos, const double* colj, const double* rowj, double coli, double rowi, int64_t n,
                  double* rbar) {
  pos_row_mean_t<double>(ppos, colj, rowj, coli, rowi, n, rbar);
}
namespace {
CONVIT_CLONES void portable_bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm,
                                    const float* colj, const float* rowj, float coli, float rowi, int64_t n,
                                    float gate, float scale, double* acc) {
  bwd_row_t<float>(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
}
}  // namespace
void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
             const float* rowj, float coli, float rowi, int64_t n, float gate, float scale, double* acc) {
#if CONVIT_HAVE_AVX512_ROWS
  if (use_avx512()) return avx512::bwd_row(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
#endif
  portable_bwd_row(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
}
void bwd_row(double* s, double lse, const double* ppos, const double* rbar, double* dm, const double* colj,
             const double* rowj, double coli, double rowi, int64_t n, double gate, double scale, double* acc) {
  bwd_row_t<double>(s, lse, ppos, rbar, dm, colj, rowj, coli, rowi, n, gate, scale, acc);
}

// Above this many (H * N * N) entries the positional rows are recomputed on demand instead.
constexpr int64_t kMaxPosTable = int64_t(1) << 24;

template <typename T>
PosRows<T> make_pos_rows(const at::Tensor& pos_weight, int64_t rows, int64_t cols, bool with_means) {
  PosRows<T> pr;
  const int64_t N = rows * cols, H = pos_weight.size(0);
  auto opts = pos_weight.options();
  pr.N = N;
  pr.w_t = pos_weight.contiguous();
  pr.colj_t = at::empty({N}, opts);
  pr.rowj_t = at::empty({N}, opts);
  T* cj = pr.colj_t.template data_ptr<T>();
  T* rj = pr.rowj_t.template data_ptr<T>();
  for (int64_t j = 0; j < N; ++j) {
    cj[j] = T(j % cols);
    rj[j] = T(j / cols);
  }
  pr.w = pr.w_t.template const_data_ptr<T>();
  pr.colj = cj;
  pr.rowj = rj;
  if (H * N * N <= kMaxPosTable) {
    pr.table = at::empty({H, N, N}, opts);
    if (with_means) pr.mean_t = at::empty({H, N, 3}, opts);
    T* tab = pr.table.template data_ptr<T>();
    T* mean = with_means ? pr.mean_t.template data_ptr<T>() : nullptr;
    const T* w = pr.w;
    at::parallel_for(0, H * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t h = t / N, i = t % N;
        pos_softmax_row(w + 3 * h, cj, rj, cj[i], rj[i], N, tab + t * N);
        if (mean != nullptr) pos_row_mean(tab + t * N, cj, rj, cj[i], rj[i], N, mean + t * 3);
      }
    });
  }
  return pr;
}
template PosRows<float> make_pos_rows<float>(const at::Tensor&, int64_t, int64_t, bool);
template PosRows<double> make_pos_rows<double>(const at::Tensor&, int64_t, int64_t, bool);

void check_common(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& pos_weight, const at::Tensor& gating, int64_t rows, int64_t cols) {
  const std::pair<const char*, const at::Tensor*> qkv[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : qkv) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must have shape (B, H, N, D); got ", t->sizes());
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, " (CPU kernel): ", name, " must be a CPU tensor; got ",
                      t->device());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && at::elementSize(q.scalar_type()) >= 2, op,
                   " (CPU kernel): q must be float64, float32, float16 or bfloat16; got ", q.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
                    ": k and v must have the shape of q ", q.sizes(), "; got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": k and v must have the dtype of q (", q.scalar_type(), "); got ", k.scalar_type(), " and ",
                   v.scalar_type());
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(H >= 1 && N >= 1 && D >= 1, op, ": q must have H, N and D >= 1; got ", q.sizes());
  TORCH_CHECK_VALUE(rows >= 1 && cols >= 1 && rows * cols == N, op,
                    ": rows * cols must equal N = ", N, "; got rows=", rows, ", cols=", cols);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::pair<const char*, const at::Tensor*> params[] = {{"pos_weight", &pos_weight}, {"gating", &gating}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK_TYPE(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation dtype of ",
                     q.scalar_type(), " inputs); got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, " (CPU kernel): ", name, " must be a CPU tensor; got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(pos_weight.dim() == 2 && pos_weight.size(0) == H && pos_weight.size(1) == 3, op,
                    ": pos_weight must have shape (H, 3) = (", H, ", 3); got ", pos_weight.sizes());
  TORCH_CHECK_VALUE(gating.dim() == 1 && gating.size(0) == H, op, ": gating must have shape (H,) = (", H,
                    ",); got ", gating.sizes());
}

at::Tensor rows_usable(const at::Tensor& t) {
  // The products need unit stride along D and a row stride of at least D.
  if (t.stride(3) == 1 && t.stride(2) >= t.size(3)) return t;
  return t.contiguous();
}

TORCH_LIBRARY_IMPL(convit_kernels, CPU, m) {
  m.impl("gpsa_fwd", &gpsa_fwd_cpu);
  m.impl("gpsa_bwd", &gpsa_bwd_cpu);
}

}  // namespace convit_kernels::cpu
