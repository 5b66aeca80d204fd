// Shared pieces of the fused GPSA CPU kernels (forward: gpsa_fwd_cpu.cpp, backward: gpsa_bwd_cpu.cpp).
// The files, one role each: gpsa_cpu_matmul.cpp (the matrix products), gpsa_cpu_rows.cpp (the portable
// row kernels, their exp polynomial, and the dispatch by ISA level), gpsa_cpu_isa.cpp (which level
// runs), gpsa_rows_avx512.cpp and gpsa_rows_avx2.cpp (the intrinsic row kernels), gpsa_cpu_pos_table.cpp (the positional probabilities), gpsa_cpu_scratch.cpp
// (per-thread scratch memory), gpsa_cpu_ops.cpp (the CPU registration of the ops).
//
// Layout of the work: one task owns (batch b, head h, a block of query rows) and keeps whole key
// rows of scores in a local buffer (N up to a few thousand fits). The matrix products of a block
// (Q_blk K^T, P V, ...) are row-major products without transposes (`matmul`), called
// single-threaded inside the parallel region: float ones go to the oneDNN brgemm micro-kernel that
// libtorch exposes (at::native::cpublas::brgemm: AVX-512 where the CPU has it; on the AMD CPU we
// measured, libtorch's MKL ran AVX2 code at about half its GFLOP/s), double ones to libtorch's BLAS.
// Operands that a product needs transposed (K^T, V^T, Q_blk^T, ...) are copied once per (b, h) or
// block: O(N D) against the products' O(N^2 D). The row-wise softmax / mixing / backward algebra
// runs in AVX-512 or AVX2 intrinsics (gpsa_rows_avx512.cpp, gpsa_rows_avx2.cpp) or in portable loops
// that the compiler vectorises, by ISA level (below), with a polynomial exp instead of libm's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace convit_kernels::cpu {

// Row-major C (m x n, row stride ldc) = A (m x k, row stride lda) B (k x n, row stride ldb), or
// C += A B when accumulate. Single-threaded; deterministic for given shapes and strides.
void matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
            int64_t ldc, bool accumulate);
void matmul(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, double* c,
            int64_t ldc, bool accumulate);
// Called by a thread after its last matmul of a parallel region (frees micro-kernel state).
void matmul_release();

// One row of the positional softmax: out[j] = softmax_j(w0 dx + w1 dy + w2 (dx^2 + dy^2)),
// dx = colj[j] - coli, dy = rowj[j] - rowi (key minus query).
void pos_softmax_row(const float* w, const float* colj, const float* rowj, float coli, float rowi, int64_t n,
                     float* out);
void pos_softmax_row(const double* w, const double* colj, const double* rowj, double coli, double rowi,
                     int64_t n, double* out);

// Forward row: s holds the scaled content logits of one query row; on return it holds the mixed
// attention (1 - gate) softmax(s) + gate * ppos. Returns the log-sum-exp of the logits.
float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate);
double softmax_mix_row(double* s, const double* ppos, int64_t n, double gate);

// rbar[0..2] = sum_j ppos[j] (dx, dy, dx^2 + dy^2): the P_pos-mean of r_ij for query row i.
void pos_row_mean(const float* ppos, const float* colj, const float* rowj, float coli, float rowi, int64_t n,
                  float* rbar);
void pos_row_mean(const double* ppos, const double* colj, const double* rowj, double coli, double rowi, int64_t n,
                  double* rbar);

// Backward row. In: s = scaled content logits, dm = dL/dM = g_i V^T. Out: s = scale * dS_c (dS_c: the
// gradient of the scaled logits; times scale it is the gradient of the raw q k^T), dm = the mixed
// attention M (for dV). Adds to acc[0..2] the row's share of dL/dpos_weight and to acc[3]
// rowsum(P_pos dM) - rowsum(P_c dM). rbar: pos_row_mean.
void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
             const float* rowj, float coli, float rowi, int64_t n, float gate, float scale, double* acc);
void bwd_row(double* s, double lse, const double* ppos, const double* rbar, double* dm, const double* colj,
             const double* rowj, double coli, double rowi, int64_t n, double gate, double scale, double* acc);

// Row sums of the backward are taken in float over chunks of kSumChunk elements (each SIMD lane adds
// a few terms) and in double across chunks: as accurate as double sums for these lengths, with a
// fraction of the float-to-double conversions, which cost as much as the arithmetic they sum.
constexpr int64_t kSumChunk = 128;

// The ISA levels of the float row kernels and transpose tiles, lowest first (gpsa_cpu_isa.cpp):
//   portable  the loops of gpsa_cpu_rows.cpp, compiled for the baseline of the target (x86-64: SSE2;
//             aarch64: NEON, which GCC vectorises for without flags);
//   avx2      AVX2 + FMA intrinsics (gpsa_rows_avx2.cpp), x86-64 only;
//   avx512    AVX-512 F + DQ intrinsics (gpsa_rows_avx512.cpp), x86-64 only.
// The intrinsic files compile their functions for their ISA by target attributes (the rest of the
// extension is built for the baseline), so one build runs on every x86-64 CPU. cpu_level() is the
// best level the CPU supports, or the lower one named by CONVIT_KERNELS_CPU_ISA (avx512 | avx2 |
// portable | best; CONVIT_KERNELS_CPU_PORTABLE=1 is the older spelling of portable), read once.
// The matrix products are not part of the level: they go to oneDNN / MKL, which pick their own ISA
// (ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS cap them).
#if defined(__GNUC__) && defined(__x86_64__)
#define CONVIT_HAVE_X86_ROWS 1
#else
#define CONVIT_HAVE_X86_ROWS 0
#endif
enum class CpuLevel : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
CpuLevel cpu_level();
std::string cpu_isa();                      // the name of cpu_level()
std::vector<std::string> cpu_isa_levels();  // the levels this CPU and build can run, lowest first
#if CONVIT_HAVE_X86_ROWS
namespace avx512 {
float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate);
void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
             const float* rowj, float coli, float rowi, int64_t n, float gate, float scale, double* acc);
void transpose_tile16(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                      float alpha);
}  // namespace avx512
namespace avx2 {
float softmax_mix_row(float* s, const float* ppos, int64_t n, float gate);
void bwd_row(float* s, float lse, const float* ppos, const float* rbar, float* dm, const float* colj,
             const float* rowj, float coli, float rowi, int64_t n, float gate, float scale, double* acc);
void transpose_tile8(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                     float alpha);
}  // namespace avx2
#endif

// The positional probabilities of a call. They do not depend on the batch: computed once per call
// as an (H, N, N) table when it is small enough, otherwise one row at a time on demand.
template <typename T>
struct PosRows {
  at::Tensor table;      // (H, N, N) or undefined
  at::Tensor mean_t;     // (H, N, 3): pos_row_mean of every row, with the table if with_means
  at::Tensor colj_t, rowj_t, w_t;
  const T* w = nullptr;  // (H, 3), contiguous
  const T* colj = nullptr;
  const T* rowj = nullptr;
  int64_t N = 0;

  const T* get(int64_t h, int64_t i, T* scratch) const {
    if (table.defined()) return table.const_data_ptr<T>() + (h * N + i) * N;
    pos_softmax_row(w + 3 * h, colj, rowj, colj[i], rowj[i], N, scratch);
    return scratch;
  }

  // The mean of r_ij under row (h, i), whose probabilities `row` get() returned.
  const T* mean(int64_t h, int64_t i, const T* row, T* scratch3) const {
    if (mean_t.defined()) return mean_t.const_data_ptr<T>() + (h * N + i) * 3;
    pos_row_mean(row, colj, rowj, colj[i], rowj[i], N, scratch3);
    return scratch3;
  }
};

// with_means: also tabulate pos_row_mean of every row (the backward's centring; the forward has no use for it).
template <typename T>
PosRows<T> make_pos_rows(const at::Tensor& pos_weight, int64_t rows, int64_t cols, bool with_means);

// t itself, or a copy, usable by the kernels: last dim contiguous, row stride >= D (gpsa_cpu_ops.cpp;
// the argument checks are csrc/gpsa_checks.h, shared with the CUDA glue).
at::Tensor rows_usable(const at::Tensor& t);

// A (rows x D) block with row stride ld as the accumulation type A: the block itself when T is A,
// else a converted copy in `stage` (row stride D). Returns the pointer and its row stride.
template <typename T, typename A>
inline std::pair<const A*, int64_t> as_acc(const T* p, int64_t ld, int64_t rows, int64_t D, A* stage) {
  if constexpr (std::is_same_v<T, A>) {
    return {p, ld};
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) stage[r * D + d] = A(p[r * ld + d]);
    return {stage, D};
  }
}

// Rounds a (rows x D) block of A (row stride D) into dst (row stride ld).
template <typename T, typename A>
inline void store_rows(const A* src, int64_t rows, int64_t D, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * ld + d] = T(src[r * D + d]);
}

// dst (cols x rows, row stride ldd) = alpha * src^T, src (rows x cols, row stride lds), converted to
// Dst. The float -> float overload (gpsa_cpu_rows.cpp) moves 16 x 16 tiles through AVX-512 registers
// or 8 x 8 tiles through AVX2 registers, by cpu_level(); this template is the plain loop.
template <typename Src, typename Dst>
inline void transpose_copy(const Src* src, int64_t rows, int64_t cols, int64_t lds, Dst* dst, int64_t ldd,
                           at::opmath_type<Src> alpha) {
  using M = at::opmath_type<Src>;
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) dst[c * ldd + r] = Dst(M(src[r * lds + c]) * alpha);
}
void transpose_copy(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd, float alpha);

// The calling thread's scratch memory: at least `bytes`, 64-byte aligned, valid until the thread calls
// it again. Kept between calls and grown when needed, because a fresh buffer costs one page fault per
// 4 KiB on first touch, which at ConViT shapes took as long as a fifth of the op.
void* thread_scratch(size_t bytes);

// K arrays of counts[i] elements of T in the thread's scratch memory, each 64-byte aligned. The
// forward and the backward place S and K^T at the same alignment, so that the BLAS (whose kernels
// may depend on alignment) recomputes the forward's logits bitwise.
template <typename T, size_t K>
std::array<T*, K> thread_scratch_arrays(const std::array<int64_t, K>& counts) {
  const auto padded = [](int64_t count) { return (sizeof(T) * size_t(count) + 63) / 64 * 64; };
  size_t total = 0;
  for (const int64_t c : counts) total += padded(c);
  char* base = static_cast<char*>(thread_scratch(total));
  std::array<T*, K> arrays;
  for (size_t i = 0; i < K; ++i) {
    arrays[i] = reinterpret_cast<T*>(base);
    base += padded(counts[i]);
  }
  return arrays;
}

// Runs body(claim) once on each of at::parallel_for's threads; claim() hands out the tasks 0 .. count-1,
// the next unclaimed one per call, then -1. A thread that finishes early takes more tasks instead of
// waiting at the end of a static split (on a shared 2-core machine one thread is often slowed by the
// other jobs). Tasks are independent and fixed by the shape, so which thread runs a task does not
// change its result: still bitwise the same for every thread count.
template <typename Body>
void parallel_tasks(int64_t count, const Body& body) {
  std::atomic<int64_t> next{0};
  auto claim = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < count ? t : -1;
  };
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { body(claim); });
}

// Query rows per task: about `target`, spread evenly over ceil(N / target) blocks.
inline int64_t block_rows(int64_t N, int64_t target) {
  const int64_t nblk = (N + target - 1) / target;
  return (N + nblk - 1) / nblk;
}

std::tuple<at::Tensor, at::Tensor> gpsa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& pos_weight, const at::Tensor& gating,
                                                int64_t rows, int64_t cols, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gpsa_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& pos_weight, const at::Tensor& gating, const at::Tensor& lse, int64_t rows, int64_t cols,
    double scale);

}  // namespace convit_kernels::cpu
