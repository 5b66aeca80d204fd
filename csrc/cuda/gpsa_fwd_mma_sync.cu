// GPSA forward on the FlashAttention-2 instruction path, for fp16/bf16 with D % 16 == 0 on sm_80+
// and N <= kWholeRowMaxN (the ConViT shapes): mma.sync m16n8k16 with fp32 accumulation, operands
// by ldmatrix from padded shared memory, the scores and probabilities in registers in the
// accumulator layout (csrc/cuda/gpsa_mma.cuh), K and V loaded by cp.async. No torch header.
//
// One pass, two accumulators (benchmarks/NOTES.md, "The mma.sync path": the floors of the one-pass
// and two-pass designs). The positional probabilities do not depend on the batch: per call,
// gpsa_pos_frag_kernel writes s P_pos (H x ceil16(N)^2 values, rounded to T) in the order of the
// mma A fragments (one 16-byte vector per lane and 16 x 16 tile), and the forward loads them, with
// no exp and no table lookup per element. A CTA owns 64 query rows of one (b, h), warp w the 16
// rows 16 w .. + 15; Q, and all keys' K and V rows, sit in shared memory (row stride kLd =
// 16 kSteps + 8: the 16-byte pad puts the 8 rows of an ldmatrix on different banks). Loads: one
// cp.async group per key tile (group 0 also holds Q), waited for tile by tile, so the first tile's
// work overlaps the later tiles' loads.
// Per warp and key tile of kKeys keys, lane l holding rows g = l / 4 and g + 8, keys 2 (l % 4) + {0, 1}
// of every 8-key block (the C fragment):
// 1. the tile's s P_pos fragments from global memory (L2), issued first;
// 2. S = Q K^T (Q fragments in registers, K by ldmatrix.x4: two 8-key blocks per load);
// 3. content branch, online: the rows' running max (over the lane, then its quad by two shuffles),
//    the content accumulator and the lane's partial row sum rescaled by 2^(m_old - m_new),
//    P_c = 2^(S |scale| log2 e - m) (one FFMA, one MUFU.EX2), converted in registers into A
//    fragments (the C layout of two 8-key blocks is the A layout of one 16-key step);
// 4. acc_c += P_c V, acc_p += s P_pos V (V by ldmatrix.x4.trans, shared by both products).
// End: out = (1 - s) acc_c / l + acc_p, lse = (m + log2 l) / log2 e. A negative scale flips the sign
// of the Q fragments (exact), so that the running max is taken on the raw scores.
// Grid: (ceil(N / kRows64), H, B); block: kThreads; dynamic shared memory: MmaSyncFwdSmem::total.
#include "gpsa_mma.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

struct MmaSyncFwdSmem {
  size_t q, k, v, total;
  __host__ __device__ MmaSyncFwdSmem(int n16, int ld) {
    q = 0;                                    // [64][ld] T
    k = q + align128(size_t(kRows64) * ld * 2);  // [n16][ld] T
    v = k + align128(size_t(n16) * ld * 2);      // [n16][ld] T
    total = v + align128(size_t(n16) * ld * 2);
  }
};

// The instance a head dim takes: kSteps = 3 for D = 48 (exact: every ConViT variant but the "+"
// ones), 4 for D <= 64, 8 above; shared-memory rows hold 16 kSteps + 8 elements.
__host__ __device__ __forceinline__ int mma_sync_steps(int D) { return D == 48 ? 3 : D <= 64 ? 4 : 8; }

// s P_pos of head h in A-fragment order: tile (row block rb, key step ks) of 16 x 16 is 32 16-byte
// vectors, lane l's holding its 4 registers (rows g, g + 8; keys 2 t + {0, 1} and + 8). Rows or
// keys at or past N get 0. Grid: (ceil16(N) / 16, H); block: kThreads, warp w taking the key
// steps w, w + 4, ..
template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_pos_frag_kernel(const float* __restrict__ pos_weight,
                                                                 const float* __restrict__ gating,
                                                                 const float* __restrict__ pos_lse, int N, int cols,
                                                                 uint4* __restrict__ frag) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tg = lane % 4;
  const int rb = blockIdx.x, h = blockIdx.y, nb = gridDim.x;
  const float w[3] = {pos_weight[h * 3 + 0], pos_weight[h * 3 + 1], pos_weight[h * 3 + 2]};
  const float s = sigmoid(gating[h]);
  for (int ks = warp; ks < nb; ks += kWarps) {
    uint32_t r[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int i = 16 * rb + g + 8 * (x % 2), j = 16 * ks + 2 * tg + 8 * (x / 2);
      float z[2];
#pragma unroll
      for (int e = 0; e < 2; ++e)
        z[e] = i < N && j + e < N ? s * acc_exp(pos_logit(w, grid_offset(i, j + e, cols)) - pos_lse[int64_t(h) * N + i])
                                  : 0.0f;
      r[x] = pack2<T>(z[0], z[1]);
    }
    frag[((int64_t(h) * nb + rb) * nb + ks) * 32 + lane] = make_uint4(r[0], r[1], r[2], r[3]);
  }
}

template <typename T, int kSteps, int kKeys>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_mma_sync_kernel(FwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kBlocks = kKeys / 8;  // 8-key blocks per tile
  constexpr int ld = 16 * kSteps + 8;  // compile-time: ldmatrix addresses are a register plus immediates
  const int N = a.N, D = a.D, n16 = ceil_div(N, 16) * 16, nb16 = n16 / 16;
  const int k_steps = kSteps == 3 ? 3 : D / 16;  // the kSteps = 3 instance runs D = 48 only
  const MmaSyncFwdSmem lay(n16, ld);
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, tg = lane % 4;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kRows64;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *k = hs.k, *v = hs.v;
  const int n_tiles = ceil_div(N, kKeys);

  // Loads. cp.async where 16-byte vectors are allowed (rows past N zero-filled), element by
  // element otherwise (then every cp.async group below is empty).
  const bool vec = a.qs.n % 8 == 0 && a.ks.n % 8 == 0 && a.vs.n % 8 == 0 &&
                   (reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                    reinterpret_cast<uintptr_t>(v)) % 16 == 0;
  if (vec) {
    const int per_row = D / 8;
    for (int e = tid; e < kRows64 * per_row; e += kThreads) {
      const int r = e / per_row, c = 8 * (e % per_row), n = i0 + r;
      cp_async_16(q_t + r * ld + c, q + int64_t(n < N ? n : 0) * a.qs.n + c, n < N);
    }
    for (int t = 0; t < n_tiles; ++t) {
      const int r0 = t * kKeys, count = min(kKeys, n16 - r0);
      for (int e = tid; e < count * per_row; e += kThreads) {
        const int r = r0 + e / per_row, c = 8 * (e % per_row);
        const int64_t n = r < N ? r : 0;
        cp_async_16(k_t + r * ld + c, k + n * a.ks.n + c, r < N);
        cp_async_16(v_t + r * ld + c, v + n * a.vs.n + c, r < N);
      }
      cp_async_commit();
    }
  } else {
    load_rows_ld(q_t, ld, q, a.qs.n, i0, kRows64, N, D);  // rows past N: zeros
    load_rows_ld(k_t, ld, k, a.ks.n, 0, n16, N, D);
    load_rows_ld(v_t, ld, v, a.vs.n, 0, n16, N, D);
  }
  const int row0 = i0 + 16 * warp;
  const bool active = row0 < N;  // warp-uniform; an idle warp still meets the CTA barriers
  const float s = sigmoid(a.gating[h]);
  const float sl2 = fabsf(a.scale) * kLog2e;
  const uint32_t flip = a.scale < 0.0f ? 0x80008000u : 0u;  // negates both 16-bit halves
  // this warp's row block of s P_pos, lane's vector of key step 0
  const uint4* pfrag = static_cast<const uint4*>(a.pos_frag) + (int64_t(h) * nb16 + row0 / 16) * nb16 * 32 + lane;

  uint32_t qa[kSteps][4];
  float m_r[2] = {-1e30f, -1e30f}, l_r[2] = {0.0f, 0.0f};  // raw-score max (finite start), partial sums
  float oc[2 * kSteps][4], op[2 * kSteps][4];
#pragma unroll
  for (int dn = 0; dn < 2 * kSteps; ++dn)
#pragma unroll
    for (int x = 0; x < 4; ++x) oc[dn][x] = op[dn][x] = 0.0f;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait_upto(n_tiles - 1 - t);  // this thread's copies of tiles 0 .. t have landed
    __syncthreads();                      // and everyone's
    if (!active) continue;
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        if (kk < k_steps) {
          ldmatrix_x4(qa[kk], q_t + (16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + 16 * kk + (lane >> 4) * 8);
#pragma unroll
          for (int x = 0; x < 4; ++x) qa[kk][x] ^= flip;
        }
      }
    }
    const int j0 = t * kKeys;
    const bool tail = j0 + kKeys > N;
    uint4 ppv[kBlocks / 2];  // 1. the tile's s P_pos fragments, one vector per 16-key step
#pragma unroll
    for (int kk = 0; kk < kBlocks / 2; ++kk)
      if (j0 + 16 * kk < N) ppv[kk] = pfrag[(j0 / 16 + kk) * 32];

    // 1. S = Q K^T, two 8-key blocks per ldmatrix.x4; blocks wholly past N are skipped
    float sc[kBlocks][4];
#pragma unroll
    for (int p = 0; p < kBlocks / 2; ++p) {
#pragma unroll
      for (int x = 0; x < 4; ++x) sc[2 * p][x] = sc[2 * p + 1][x] = 0.0f;
      if (j0 + 16 * p < N) {
#pragma unroll
        for (int kk = 0; kk < kSteps; ++kk) {
          if (kk < k_steps) {
            uint32_t kb[4];  // (keys 0-7 | 8-15) x (dims 0-7 | 8-15) of this step
            ldmatrix_x4(kb, k_t + (j0 + 16 * p + (lane >> 4) * 8 + (lane & 7)) * ld + 16 * kk + ((lane >> 3) & 1) * 8);
            mma16816<T>(sc[2 * p], qa[kk], kb);
            mma16816<T>(sc[2 * p + 1], qa[kk], kb + 2);
          }
        }
      }
    }
    if (tail) {
#pragma unroll
      for (int nb = 0; nb < kBlocks; ++nb)
#pragma unroll
        for (int x = 0; x < 4; ++x)
          if (j0 + 8 * nb + 2 * tg + (x & 1) >= N) sc[nb][x] = -INFINITY;
    }

    // 2. the rows' running max, rescale of the content accumulator and the partial sums
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
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));  // the quad holding the row
      const float alpha = fast_exp2((m_r[r] - mt[r]) * sl2);
      l_r[r] *= alpha;
#pragma unroll
      for (int dn = 0; dn < 2 * kSteps; ++dn) {
        if (dn < 2 * k_steps) {
          oc[dn][2 * r] *= alpha;
          oc[dn][2 * r + 1] *= alpha;
        }
      }
      m_r[r] = mt[r];
      ms[r] = -mt[r] * sl2;
    }

    // 3-4. per 16-key step: P_c into A fragments, then M V on both accumulators
#pragma unroll
    for (int kk = 0; kk < kBlocks / 2; ++kk) {
      if (j0 + 16 * kk < N) {
        uint32_t pc[4];
        const uint32_t pp[4] = {ppv[kk].x, ppv[kk].y, ppv[kk].z, ppv[kk].w};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int nb = 2 * kk + half, jb = j0 + 8 * nb + 2 * tg;
          float c[4];
#pragma unroll
          for (int x = 0; x < 4; ++x) c[x] = fast_exp2(fmaf(sc[nb][x], sl2, ms[x / 2]));
          if (tail) {
#pragma unroll
            for (int x = 0; x < 4; ++x)
              if (jb + (x & 1) >= N) c[x] = 0.0f;
          }
          l_r[0] += c[0] + c[1];
          l_r[1] += c[2] + c[3];
          pc[2 * half] = pack2<T>(c[0], c[1]);  // row g: a0 (keys 0-7) / a2 (keys 8-15)
          pc[2 * half + 1] = pack2<T>(c[2], c[3]);  // row g + 8: a1 / a3
        }
#pragma unroll
        for (int dp = 0; dp < kSteps; ++dp) {
          if (dp < k_steps) {
            uint32_t vb[4];  // (keys 0-7 | 8-15) x (dims 0-7 | 8-15), transposed
            ldmatrix_x4_trans(vb, v_t + (j0 + 16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + 16 * dp + (lane >> 4) * 8);
            mma16816<T>(oc[2 * dp], pc, vb);
            mma16816<T>(oc[2 * dp + 1], pc, vb + 2);
            mma16816<T>(op[2 * dp], pp, vb);
            mma16816<T>(op[2 * dp + 1], pp, vb + 2);
          }
        }
      }
    }
  }
  if (!active) return;

  T* out = a.out + b * a.os.b + h * a.os.h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
    const int i = row0 + g + 8 * r;
    if (i >= N) continue;
    if (tg == 0) a.lse[(int64_t(b) * a.H + h) * N + i] = (m_r[r] * sl2 + log2f(l_r[r])) / kLog2e;
    const float cw = (1.0f - s) / l_r[r];
#pragma unroll
    for (int dn = 0; dn < 2 * kSteps; ++dn) {
      if (dn < 2 * k_steps) {
        T* o = out + int64_t(i) * a.os.n + 8 * dn + 2 * tg;
        o[0] = from_acc<T>(fmaf(oc[dn][2 * r], cw, op[dn][2 * r]));
        o[1] = from_acc<T>(fmaf(oc[dn][2 * r + 1], cw, op[dn][2 * r + 1]));
      }
    }
  }
#else
  __trap();  // launched only on sm_80+ (see fwd_typed in gpsa_launch.cu)
#endif
}

bool fwd_mma_sync_takes(int N, int D) {
  return N <= kWholeRowMaxN && D % 16 == 0 &&
         MmaSyncFwdSmem(ceil_div(N, 16) * 16, 16 * mma_sync_steps(D) + 8).total <= device_max_smem_optin();
}

template <typename T>
cudaError_t fwd_mma_sync_launch(const FwdArgs<T>& a, cudaStream_t stream) {
  const int n16 = ceil_div(a.N, 16) * 16, steps = mma_sync_steps(a.D);
  gpsa_pos_frag_kernel<T><<<dim3(n16 / 16, a.H), kThreads, 0, stream>>>(
      a.pos_weight, a.gating, a.pos_lse, a.N, a.cols, static_cast<uint4*>(a.pos_frag));
  const size_t smem = MmaSyncFwdSmem(n16, 16 * steps + 8).total;
  const dim3 grid(ceil_div(a.N, kRows64), a.H, a.B);
  if (steps == 3) return launch_with_smem(gpsa_fwd_mma_sync_kernel<T, 3, 64>, grid, smem, stream, a);
  if (steps == 4) return launch_with_smem(gpsa_fwd_mma_sync_kernel<T, 4, 64>, grid, smem, stream, a);
  return launch_with_smem(gpsa_fwd_mma_sync_kernel<T, 8, 32>, grid, smem, stream, a);
}

template cudaError_t fwd_mma_sync_launch<__half>(const FwdArgs<__half>&, cudaStream_t);
template cudaError_t fwd_mma_sync_launch<__nv_bfloat16>(const FwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
