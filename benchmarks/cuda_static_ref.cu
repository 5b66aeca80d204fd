// Minimal plain attention forward, out = softmax(scale Q K^T) V, bf16, written only as the yardstick
// of benchmarks/cuda_static.py: it is compiled exactly as the GPSA kernels are (nvcc -O3, sm_90,
// WMMA m16n16k16, no fast math) and its hot loops give the instructions per (query, key) element
// that a plain softmax costs with these tools. It is never launched (compile-only; not part of the
// extension), so it carries no checks beyond what its structure needs.
//
// Structure (the same as the GPSA whole-row forward of csrc/cuda/gpsa_fwd_mma.cu): a CTA of 4 warps
// owns 64 query rows of one (b, h), each warp 16; all N <= 256 keys' K and V rows sit in shared
// memory (row stride D + 8 elements: 16 bytes of padding against bank conflicts). Pass 1 per key
// tile of 16: S = Q K^T on tensor cores into a per-warp 16 x 16 scratch tile, lane (r, half) reads
// its 8 scores, keeps a running max and sum in registers (2^x by ex2.approx, log2(e) folded into the scale).
// Pass 2: S again, P = exp2(S - m) / l rounded to bf16 into a per-warp tile, O += P V.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>

namespace ref {

namespace wmma = nvcuda::wmma;
using T = __nv_bfloat16;
constexpr int kThreads = 128, kRowsCta = 64, kScrLd = 20, kPLd = 24;

struct RefArgs {
  const T* q; const T* k; const T* v; T* out;
  int64_t stride_bh, stride_n;  // the same strides for q, k, v, out here
  int N, D;
  float scale_log2;  // scale * log2(e)
};

// 2^x as the GPSA tensor-core kernels take it (gpsa_common.cuh fast_exp2): one MUFU.EX2.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__host__ __device__ inline size_t align128(size_t x) { return (x + 127) / 128 * 128; }

template <bool kMasked>
__device__ __forceinline__ void tile_stats(const float* st, int r, int c0, int j0, int N, float sl2, float& m,
                                           float& l) {
  float x[8], mt = m;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    x[c] = st[r * kScrLd + c0 + c] * sl2;  // REF-HOT: stats
    if (kMasked && j0 + c0 + c >= N) x[c] = -INFINITY;
    mt = fmaxf(mt, x[c]);
  }
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < 8; ++c) sum += fast_exp2(x[c] - mt);
  l = l * fast_exp2(m - mt) + sum;
  m = mt;
}

template <bool kMasked>
__device__ __forceinline__ void tile_probs(const float* st, T* pt, int r, int c0, int j0, int N, float sl2,
                                           float neg_m, float inv_l) {
  alignas(16) T vals[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float p = fast_exp2(fmaf(st[r * kScrLd + c0 + c], sl2, neg_m)) * inv_l;  // REF-HOT: probs
    if (kMasked && j0 + c0 + c >= N) p = 0.0f;
    vals[c] = __float2bfloat16_rn(p);
  }
  *reinterpret_cast<uint4*>(pt + r * kPLd + c0) = *reinterpret_cast<const uint4*>(vals);
}

constexpr int kSteps = 4;  // D <= 64 (the GPSA kernel's instance for D = 48)

__global__ void __launch_bounds__(kThreads) plain_attn_fwd_kernel(RefArgs a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int N = a.N, D = a.D, ld = D + 8, n16 = (N + 15) / 16 * 16;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  size_t off = 0;
  T* q_s = reinterpret_cast<T*>(smem_raw + off); off += align128(size_t(kRowsCta) * ld * sizeof(T));
  T* k_s = reinterpret_cast<T*>(smem_raw + off); off += align128(size_t(n16) * ld * sizeof(T));
  T* v_s = reinterpret_cast<T*>(smem_raw + off); off += align128(size_t(n16) * ld * sizeof(T));
  float* st = reinterpret_cast<float*>(smem_raw + off) + warp * 16 * kScrLd;
  off += 4 * align128(16 * kScrLd * sizeof(float));
  T* pt = reinterpret_cast<T*>(smem_raw + off) + warp * 16 * kPLd;

  const int64_t bh = blockIdx.y;
  const int i0 = blockIdx.x * kRowsCta;
  for (int e = tid; e < kRowsCta * D; e += kThreads) {
    const int r = e / D, d = e % D;
    q_s[r * ld + d] = i0 + r < N ? a.q[bh * a.stride_bh + int64_t(i0 + r) * a.stride_n + d] : __float2bfloat16_rn(0.f);
  }
  for (int e = tid; e < n16 * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const bool in = r < N;
    k_s[r * ld + d] = in ? a.k[bh * a.stride_bh + int64_t(r) * a.stride_n + d] : __float2bfloat16_rn(0.f);
    v_s[r * ld + d] = in ? a.v[bh * a.stride_bh + int64_t(r) * a.stride_n + d] : __float2bfloat16_rn(0.f);
  }
  __syncthreads();
  const int row0 = i0 + 16 * warp;
  if (row0 >= N) return;  // warp-uniform; no CTA barrier below
  const int r = lane / 2, c0 = (lane % 2) * 8, k_steps = D / 16;
  const T* qw = q_s + 16 * warp * ld;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kSteps];
#pragma unroll
  for (int t = 0; t < kSteps; ++t)
    if (t < k_steps) wmma::load_matrix_sync(qf[t], qw + 16 * t, ld);

  auto score_tile = [&](int j0) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      if (kk < k_steps) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, k_s + j0 * ld + 16 * kk, ld);
        wmma::mma_sync(acc, qf[kk], fb, acc);
      }
    }
    __syncwarp();  // the previous tile's scratch reads are done
    wmma::store_matrix_sync(st, acc, kScrLd, wmma::mem_row_major);
    __syncwarp();
  };

  float m = -1e30f, l = 0.0f;  // finite start: a lane whose 8 keys are all masked keeps exp2 finite
  for (int j0 = 0; j0 < n16; j0 += 16) {
    score_tile(j0);
    if (j0 + 16 <= N) tile_stats<false>(st, r, c0, j0, N, a.scale_log2, m, l);
    else tile_stats<true>(st, r, c0, j0, N, a.scale_log2, m, l);
  }
  const float m_all = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  l = l * exp2f(m - m_all);
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  const float inv_l = 1.0f / l, neg_m = -m_all;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[kSteps];
  for (int t = 0; t < kSteps; ++t) wmma::fill_fragment(o[t], 0.0f);
  for (int j0 = 0; j0 < n16; j0 += 16) {
    score_tile(j0);
    if (j0 + 16 <= N) tile_probs<false>(st, pt, r, c0, j0, N, a.scale_log2, neg_m, inv_l);
    else tile_probs<true>(st, pt, r, c0, j0, N, a.scale_log2, neg_m, inv_l);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp;
    wmma::load_matrix_sync(fp, pt, kPLd);
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t >= k_steps) break;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;
      wmma::load_matrix_sync(fv, v_s + j0 * ld + 16 * t, ld);
      wmma::mma_sync(o[t], fp, fv, o[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    if (t >= k_steps) break;
    __syncwarp();
    wmma::store_matrix_sync(st, o[t], kScrLd, wmma::mem_row_major);
    __syncwarp();
    const int i = row0 + r;
    if (i < N)
      for (int c = 0; c < 8; ++c)
        a.out[bh * a.stride_bh + int64_t(i) * a.stride_n + 16 * t + c0 + c] = __float2bfloat16_rn(st[r * kScrLd + c0 + c]);
  }
}

}  // namespace ref
