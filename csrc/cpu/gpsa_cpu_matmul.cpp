// The matrix products of the CPU kernels: row-major C = A B (or C += A B), single-threaded, on the
// oneDNN brgemm micro-kernel that libtorch exposes (float, where libtorch has it for this CPU), else
// libtorch's Fortran BLAS, else plain loops. See gpsa_cpu.h for the layout of the work.
#include "gpsa_cpu.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
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

}  // namespace

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

}  // namespace convit_kernels::cpu
