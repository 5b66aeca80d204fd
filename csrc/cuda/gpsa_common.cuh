// Device helpers and kernel arguments shared by every GPSA kernel file (CUDA only; no torch header):
// gpsa_launch.cu chooses the path, gpsa_{fwd,bwd}_simt.cu and gpsa_{fwd,bwd}_mma.cu hold the kernels.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "gpsa_cuda.h"

namespace convit_kernels {
namespace cuda {
namespace detail {

constexpr int kThreads = 128;  // every GPSA kernel runs 4 warps per CTA
constexpr int kWarps = kThreads / 32;

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- element type <-> accumulation type (float for float/half/bf16, double for double) ----
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// IEEE library exp/log (not the fast intrinsics): the fp32 path is judged strictly.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
template <typename Acc> __device__ __forceinline__ Acc neg_inf() { return -INFINITY; }

// 2^x for the fp16/bf16 tensor-core kernels (their probabilities are rounded to 16 bits): the
// hardware ex2.approx.ftz (max relative error 2^-22; a subnormal result flushes to 0), one MUFU
// instruction where exp2f costs four. Off the device (the CPU emulator) the library exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// ---- positional geometry ----
// Query i and key j on a row-major rows x cols grid: dx = col(j) - col(i), dy = row(j) - row(i).
struct Offset {
  int dx, dy;
};
__device__ __forceinline__ Offset grid_offset(int i, int j, int cols) {
  Offset o;
  o.dx = (j % cols) - (i % cols);
  o.dy = (j / cols) - (i / cols);
  return o;
}
// Positional logit w . (dx, dy, dx^2 + dy^2); the bias cancels in the softmax and never enters.
template <typename Acc>
__device__ __forceinline__ Acc pos_logit(const Acc w[3], Offset o) {
  const int d2 = o.dx * o.dx + o.dy * o.dy;  // exact in int for any grid that fits in memory
  return w[0] * Acc(o.dx) + w[1] * Acc(o.dy) + w[2] * Acc(d2);
}

template <typename Acc>
__device__ __forceinline__ Acc sigmoid(Acc x) { return Acc(1) / (Acc(1) + acc_exp(-x)); }

// ---- warp reductions (butterfly: every lane ends with the same, order-fixed result) ----
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc x) {
  for (int off = 16; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Fixed-order tree sum of one value per thread of the CTA (kThreads values); the result is
// returned to every thread. `scratch` holds kThreads Acc values; the call synchronises the CTA.
template <typename Acc>
__device__ Acc block_sum(Acc x, Acc* scratch) {
  const int tid = threadIdx.x;
  __syncthreads();  // scratch may still be read by a previous call
  scratch[tid] = x;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (tid < width) scratch[tid] += scratch[tid + width];
    __syncthreads();
  }
  return scratch[0];
}

// Copies `count` rows of a (.., N, D) slice starting at row `row0` into shared memory as Acc:
// dst[r * ld + d] = src[(row0 + r) * stride_n + d] for r < count, d < D; rows at or past N are
// zero-filled so a masked product never multiplies garbage (0 * NaN would poison a sum).
template <typename T, typename Acc>
__device__ __forceinline__ void load_rows(Acc* dst, int ld, const T* src, int64_t stride_n, int row0, int count,
                                          int N, int D) {
  for (int e = threadIdx.x; e < count * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const int n = row0 + r;
    dst[r * ld + d] = n < N ? to_acc(src[int64_t(n) * stride_n + d]) : Acc(0);
  }
}

// Dot product of two shared-memory rows of length D.
template <typename Acc>
__device__ __forceinline__ Acc dot_rows(const Acc* a, const Acc* b, int D) {
  Acc s = Acc(0);
  for (int d = 0; d < D; ++d) s = fma(a[d], b[d], s);
  return s;
}



// Shared-memory regions start on 128-byte boundaries (WMMA needs 32-byte aligned tile pointers).
__host__ __device__ __forceinline__ size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Launches `kernel` with `smem` bytes of dynamic shared memory, opting in above the 48 KiB default.
template <typename Kernel, typename Args>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const Args& args) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

// Whether the current device has compute capability 8.0 or newer (bf16/fp16 WMMA paths).
inline bool device_is_sm80_or_newer() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

// Shared memory one block may opt in to on the current device (sm_80: 163 KB, sm_86/89: 99 KB,
// sm_90: 227 KB); 0 if it cannot be read. The whole-row kernels keep every key (or query) row in
// shared memory and are chosen only where they fit.
inline size_t device_max_smem_optin() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  return size_t(bytes);
}

// ---- tensor cores (WMMA m16n16k16, fp32 accumulation), sm_80+ for bf16 ----
namespace wmma = nvcuda::wmma;
using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// acc (16 x 16) += A B over D / 16 k steps: A = a_rows (16 x D, row-major, ld D), B = b_rows^T
// where b_rows is 16 x D row-major (ld D), i.e. acc[r][c] += a_rows[r] . b_rows[c].
template <typename T>
__device__ __forceinline__ void mma_rows_dot_rows(AccFrag& acc, const T* a_rows, const T* b_rows, int D) {
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // (k, c) = b_rows[c][16 kk + k]
    wmma::load_matrix_sync(fa, a_rows + 16 * kk, D);
    wmma::load_matrix_sync(fb, b_rows + 16 * kk, D);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// ---- the whole-row tensor-core kernels (N <= kWholeRowMaxN, fp16/bf16, D % 16 == 0) ----
// A CTA's 4 warps own 16 rows each (queries, or keys in the dK/dV kernel); WMMA fragments are
// opaque, so every 16 x 16 fp32 tile goes through a per-warp scratch tile, lane l reading row
// l / 2, columns 8 (l % 2) .. + 7.
constexpr int kRows64 = 16 * kWarps;  // query rows per CTA
constexpr int kScrLd = 20;            // fp32 scratch tile row stride (80 B: a 16-byte multiple, rows spread over banks)
constexpr int kPLd = 24;              // T probability tile row stride (48 B)
constexpr int kTabMax = 4 * kWholeRowMaxN;  // (2 rows - 1)(2 cols - 1) < 4 rows cols = 4 N
constexpr float kLog2e = 1.4426950408889634f;


// Copies `count` rows (zeros past N) into shared memory in T with row stride ld (>= D); 16-byte
// vectors where D, the source row stride and the base allow (as load_rows_raw).
template <typename T>
__device__ __forceinline__ void load_rows_ld(T* dst, int ld, const T* src, int64_t stride_n, int row0, int count,
                                             int N, int D) {
  constexpr int kVec = 16 / int(sizeof(T));
  const bool vec = D % kVec == 0 && stride_n % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    const int per_row = D / kVec;
    for (int e = threadIdx.x; e < count * per_row; e += kThreads) {
      const int r = e / per_row, c = e % per_row;
      const int n = row0 + r;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (n < N) x = *reinterpret_cast<const uint4*>(src + int64_t(n) * stride_n + c * kVec);
      *reinterpret_cast<uint4*>(dst + r * ld + c * kVec) = x;
    }
    return;
  }
  for (int e = threadIdx.x; e < count * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const int n = row0 + r;
    dst[r * ld + d] = n < N ? src[int64_t(n) * stride_n + d] : from_acc<T>(0.0f);
  }
}

// Raw copy of `count` rows (zeros past N) into shared memory in T, row stride D (the tensor-core
// kernels keep their operands in the input dtype).
// Rows move as 16-byte vectors where the row length, the row stride and the base allow it (the
// usual case: D % 8 == 0 for 16-bit types), element by element otherwise. `dst` is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_rows_raw(T* dst, const T* src, int64_t stride_n, int row0, int count, int N,
                                              int D) {
  load_rows_ld(dst, D, src, stride_n, row0, count, N, D);  // rows packed at stride D
}

// The per-head positional logit table in log2 units: tab[(dy + rows - 1)(2 cols - 1) + dx + cols - 1]
// = w0 dx + w1 dy + w2 (dx^2 + dy^2) with w already times log2(e); the logit of query i and key j is
// tab[base(i) + kidx(j)], base(i) = (rows - 1 - row(i))(2 cols - 1) + cols - 1 - col(i), kidx(j) =
// row(j)(2 cols - 1) + col(j). Integer division per table entry only, once per CTA.
__device__ __forceinline__ void build_pos_table(float* tab, float w0, float w1, float w2, int rows, int cols) {
  const int cols2 = 2 * cols - 1, n_tab = (2 * rows - 1) * cols2;
  for (int t = threadIdx.x; t < n_tab; t += kThreads) {
    const int dy = t / cols2 - (rows - 1), dx = t % cols2 - (cols - 1);
    tab[t] = w0 * float(dx) + w1 * float(dy) + w2 * float(dx * dx + dy * dy);
  }
}
__device__ __forceinline__ int pos_base(int i, int rows, int cols) {
  return (rows - 1 - i / cols) * (2 * cols - 1) + (cols - 1 - i % cols);
}
__device__ __forceinline__ int pos_kidx(int j, int cols) { return (j / cols) * (2 * cols - 1) + j % cols; }

// ---- forward: shared by gpsa_fwd_simt.cu, gpsa_fwd_mma.cu and gpsa_launch.cu ----
constexpr int kBlockM = 16;  // query rows per CTA of every forward kernel

template <typename T>
struct FwdArgs {
  using Acc = typename AccOf<T>::type;
  const T* q; const T* k; const T* v;
  Strides3 qs, ks, vs;
  const Acc* pos_weight; const Acc* gating;
  T* out; Strides3 os;
  Acc* lse;
  const Acc* pos_lse;
  void* pos_frag;  // the mma.sync forward's positional fragments (gpsa_fwd_mma_sync.cu)
  int B, H, N, D, rows, cols;
  Acc scale;
};

// The SIMT forward (gpsa_fwd_simt.cu), any T, D and device: the whole-row kernel for
// N <= kWholeRowMaxN, else the tiled one. a.pos_lse must hold the positional statistics.
template <typename T>
cudaError_t fwd_simt_launch(const FwdArgs<T>& a, cudaStream_t stream);
// The mma.sync forward (gpsa_fwd_mma_sync.cu), for T = __half / __nv_bfloat16 on sm_80+: taken
// where fwd_mma_sync_takes (N <= kWholeRowMaxN, D % 16 == 0, its shared memory fits the device).
bool fwd_mma_sync_takes(int N, int D);
template <typename T>
cudaError_t fwd_mma_sync_launch(const FwdArgs<T>& a, cudaStream_t stream);
// The WMMA tiled forward (gpsa_fwd_mma.cu), for T = __half / __nv_bfloat16 with D % 16 == 0 on
// sm_80+, any N: where the mma.sync forward does not apply (N > kWholeRowMaxN, or too little shared
// memory). The outputs of the SIMT kernels.
template <typename T>
cudaError_t fwd_mma_launch(const FwdArgs<T>& a, cudaStream_t stream);

// ---- backward: shared by gpsa_bwd_simt.cu, gpsa_bwd_mma.cu and gpsa_launch.cu (the reduction) ----
constexpr int kBwdBlockM = 16;  // query rows per CTA of the dQ kernels
constexpr int kBwdBlockN = 16;  // keys per CTA of the dK/dV kernels
constexpr int kPartials = 4;    // per dQ CTA: dw0, dw1, dw2, sum(Delta_p - Delta_c)

template <typename T>
struct BwdArgs {
  using Acc = typename AccOf<T>::type;
  const T* go; const T* q; const T* k; const T* v;
  Strides3 gos, qs, ks, vs;
  const Acc* pos_weight; const Acc* gating; const Acc* lse; const Acc* pos_lse;
  T* dq; T* dk; T* dv;
  Strides3 dqs, dks, dvs;
  Acc* delta_c;
  Acc* partials;  // (H, B * ceil(N / kBwdBlockM), kPartials)
  int B, H, N, D, rows, cols;
  Acc scale;
};

// One (b, h) slice of a call's operands: element (n, d) of q is q[n * a.qs.n + d] (likewise k, v, go).
template <typename T>
struct HeadSlice {
  const T* q; const T* k; const T* v; const T* go;  // go: the backward's grad_out, null in the forward
};
template <typename T>
__device__ __forceinline__ HeadSlice<T> head_slice(const FwdArgs<T>& a, int b, int h) {
  return {a.q + b * a.qs.b + h * a.qs.h, a.k + b * a.ks.b + h * a.ks.h, a.v + b * a.vs.b + h * a.vs.h, nullptr};
}
template <typename T>
__device__ __forceinline__ HeadSlice<T> head_slice(const BwdArgs<T>& a, int b, int h) {
  return {a.q + b * a.qs.b + h * a.qs.h, a.k + b * a.ks.b + h * a.ks.h, a.v + b * a.vs.b + h * a.vs.h,
          a.go + b * a.gos.b + h * a.gos.h};
}

// The SIMT dQ and dK/dV kernels (gpsa_bwd_simt.cu), any T, D and device: Delta_c, dQ and the
// partial sums (kBwdBlockM rows per dQ CTA), then dK, dV.
template <typename T>
cudaError_t bwd_simt_launch(const BwdArgs<T>& a, cudaStream_t stream);
// The tensor-core dQ and dK/dV kernels (gpsa_bwd_mma.cu), for T = __half / __nv_bfloat16 with
// D % 16 == 0 on sm_80+: the same outputs, workspaces and partial sums as the SIMT kernels.
template <typename T>
cudaError_t bwd_mma_launch(const BwdArgs<T>& a, cudaStream_t stream);
// The mma.sync dK/dV kernel (gpsa_bwd_mma_sync.cu), for T = __half / __nv_bfloat16 on sm_80+: taken
// by bwd_mma_launch's whole-row path where bwd_dkdv_mma_sync_takes (N <= kWholeRowMaxN, D % 16 == 0,
// D <= 64, its shared memory fits); reads the dQ kernel's Delta_c.
bool bwd_dkdv_mma_sync_takes(int N, int D);
template <typename T>
cudaError_t bwd_dkdv_mma_sync_launch(const BwdArgs<T>& a, cudaStream_t stream);
// Whether bwd_mma_launch takes the 64-row whole-row kernels (N <= kWholeRowMaxN and their shared
// memory fits the device); the dQ CTAs, hence the partial sums, then cover kRows64 rows each.
bool bwd_mma_takes_rows64(int N, int D, size_t elem);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
