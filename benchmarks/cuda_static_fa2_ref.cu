// Minimal plain attention forward on the FlashAttention-2 instruction path, out = softmax(scale Q K^T) V,
// bf16, D = 48: the yardstick of benchmarks/cuda_static.py for the mma.sync GPSA forward
// (csrc/cuda/gpsa_fwd_mma_sync.cu). Compiled exactly as the GPSA kernels are (nvcc -O3, sm_90, no
// fast math) with the same primitives (csrc/cuda/gpsa_mma.cuh: mma.sync m16n8k16, ldmatrix, cp.async);
// its hot loop gives the instructions per (query, key) element that a one-pass online softmax costs
// with these tools. Never launched (compile-only; not part of the extension): no checks beyond what
// its structure needs.
//
// Structure (that of the GPSA kernel without the positional branch): a CTA of 4 warps owns 64 query
// rows of one (b, h), each warp 16; all N <= 256 keys' K and V rows in shared memory (row stride
// D + 8), loaded by cp.async one group per 64-key tile. Per tile: S = Q K^T in registers, the rows'
// running max over the lane and its quad, the accumulator and partial sums rescaled, P = 2^(S - m)
// converted in registers into A fragments, O += P V (V by ldmatrix.trans).
#include "gpsa_mma.cuh"

namespace ref {

using namespace convit_kernels::cuda::detail;
using T = __nv_bfloat16;
constexpr int kSteps = 3, kKeys = 64, kBlocks = kKeys / 8;  // D = 48

struct Fa2RefArgs {
  const T* q; const T* k; const T* v; T* out;
  int64_t stride_bh, stride_n;  // the same strides for q, k, v, out here
  int N;
  float scale_log2;  // scale * log2(e), > 0
};

__global__ void __launch_bounds__(kThreads) plain_attn_fa2_fwd_kernel(Fa2RefArgs a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int D = 16 * kSteps, ld = D + 8;
  const int N = a.N, n16 = ceil_div(N, 16) * 16;
  T* q_t = reinterpret_cast<T*>(smem_raw);
  T* k_t = q_t + kRows64 * ld;
  T* v_t = k_t + n16 * ld;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, tg = lane % 4;
  const int i0 = blockIdx.x * kRows64;
  const T* q = a.q + blockIdx.y * a.stride_bh;
  const T* k = a.k + blockIdx.y * a.stride_bh;
  const T* v = a.v + blockIdx.y * a.stride_bh;
  const int n_tiles = ceil_div(N, kKeys);
  constexpr int per_row = D / 8;
  for (int e = tid; e < kRows64 * per_row; e += kThreads) {
    const int r = e / per_row, c = 8 * (e % per_row), n = i0 + r;
    cp_async_16(q_t + r * ld + c, q + int64_t(n < N ? n : 0) * a.stride_n + c, n < N);
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int r0 = t * kKeys, count = min(kKeys, n16 - r0);
    for (int e = tid; e < count * per_row; e += kThreads) {
      const int r = r0 + e / per_row, c = 8 * (e % per_row);
      const int64_t n = r < N ? r : 0;
      cp_async_16(k_t + r * ld + c, k + n * a.stride_n + c, r < N);
      cp_async_16(v_t + r * ld + c, v + n * a.stride_n + c, r < N);
    }
    cp_async_commit();
  }
  const int row0 = i0 + 16 * warp;
  const bool active = row0 < N;
  const float sl2 = a.scale_log2;
  uint32_t qa[kSteps][4];
  float m_r[2] = {-1e30f, -1e30f}, l_r[2] = {0.0f, 0.0f};
  float o[2 * kSteps][4];
#pragma unroll
  for (int dn = 0; dn < 2 * kSteps; ++dn)
#pragma unroll
    for (int x = 0; x < 4; ++x) o[dn][x] = 0.0f;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait_upto(n_tiles - 1 - t);
    __syncthreads();
    if (!active) continue;
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk)
        ldmatrix_x4(qa[kk], q_t + (16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + 16 * kk + (lane >> 4) * 8);
    }
    const int j0 = t * kKeys;
    const bool tail = j0 + kKeys > N;
    float sc[kBlocks][4];
#pragma unroll
    for (int p = 0; p < kBlocks / 2; ++p) {
#pragma unroll
      for (int x = 0; x < 4; ++x) sc[2 * p][x] = sc[2 * p + 1][x] = 0.0f;
      if (j0 + 16 * p < N) {
#pragma unroll
        for (int kk = 0; kk < kSteps; ++kk) {
          uint32_t kb[4];
          ldmatrix_x4(kb, k_t + (j0 + 16 * p + (lane >> 4) * 8 + (lane & 7)) * ld + 16 * kk + ((lane >> 3) & 1) * 8);
          mma16816<T>(sc[2 * p], qa[kk], kb);
          mma16816<T>(sc[2 * p + 1], qa[kk], kb + 2);
        }
      }
    }
    if (tail) {
#pragma unroll
      for (int nb = 0; nb < kBlocks; ++nb)
#pragma unroll
        for (int x = 0; x < 4; ++x)
          if (j0 + 8 * nb + 2 * tg + (x & 1) >= N) sc[nb][x] = -INFINITY;  // REF-TAIL
    }
    float mt[2] = {m_r[0], m_r[1]};
#pragma unroll
    for (int nb = 0; nb < kBlocks; ++nb) {
      mt[0] = fmaxf(mt[0], fmaxf(sc[nb][0], sc[nb][1]));
      mt[1] = fmaxf(mt[1], fmaxf(sc[nb][2], sc[nb][3]));
    }
    float ms[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
      const float alpha = fast_exp2((m_r[r] - mt[r]) * sl2);
      l_r[r] *= alpha;
#pragma unroll
      for (int dn = 0; dn < 2 * kSteps; ++dn) {
        o[dn][2 * r] *= alpha;
        o[dn][2 * r + 1] *= alpha;
      }
      m_r[r] = mt[r];
      ms[r] = -mt[r] * sl2;
    }
#pragma unroll
    for (int kk = 0; kk < kBlocks / 2; ++kk) {
      if (j0 + 16 * kk < N) {
        uint32_t pa[4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int nb = 2 * kk + half;
          float c[4];
#pragma unroll
          for (int x = 0; x < 4; ++x) c[x] = fast_exp2(fmaf(sc[nb][x], sl2, ms[x / 2]));  // REF-HOT: one pass
          l_r[0] += c[0] + c[1];
          l_r[1] += c[2] + c[3];
          pa[2 * half] = pack2<T>(c[0], c[1]);
          pa[2 * half + 1] = pack2<T>(c[2], c[3]);
        }
#pragma unroll
        for (int dp = 0; dp < kSteps; ++dp) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, v_t + (j0 + 16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + 16 * dp + (lane >> 4) * 8);
          mma16816<T>(o[2 * dp], pa, vb);
          mma16816<T>(o[2 * dp + 1], pa, vb + 2);
        }
      }
    }
  }
  if (!active) return;
  T* out = a.out + blockIdx.y * a.stride_bh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
    const int i = row0 + g + 8 * r;
    if (i >= N) continue;
    const float inv = 1.0f / l_r[r];
#pragma unroll
    for (int dn = 0; dn < 2 * kSteps; ++dn) {
      T* dst = out + int64_t(i) * a.stride_n + 8 * dn + 2 * tg;
      dst[0] = __float2bfloat16_rn(o[dn][2 * r] * inv);
      dst[1] = __float2bfloat16_rn(o[dn][2 * r + 1] * inv);
    }
  }
}

}  // namespace ref
