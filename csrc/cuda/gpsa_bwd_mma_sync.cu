// GPSA backward dK/dV on the mma.sync path (csrc/cuda/gpsa_mma.cuh), for fp16/bf16 with D % 16 == 0
// on sm_80+ and N <= kWholeRowMaxN: the whole-row dK/dV kernel of gpsa_bwd_mma.cu with the scores,
// dM and the probabilities in registers in the mma C layout instead of WMMA scratch tiles. No torch
// header. The dQ kernel (gpsa_bwd_mma.cu, WMMA) runs first and writes Delta_c.
//
// CTA: 64 keys of one (b, h), warp w the keys 16 w .. + 15 (their K and V fragments in registers,
// as the A operands); all queries' Q and dO rows in shared memory (row stride 16 kSteps + 8). Per
// 16-query step, lane l holding keys g = l / 4 and g + 8 and queries 2 (l % 4) + {0, 1} of each of
// the two 8-query blocks:
// 1. S^T = K Q^T and dM^T = V dO^T (Q, dO by ldmatrix.x4);
// 2. per element, with the per-query offsets from shared memory (one 8-byte load per 8-query block
//    and row pair): (1 - s) P_c = 2^(S^T scale log2 e + log2(1 - s) - lse_i log2 e),
//    s P_pos = 2^(tab[base_i + kidx_j] + log2 s - pos_lse_i log2 e), M^T = their sum,
//    dS^T = (1 - s) P_c (dM^T - Delta_c_i); queries past N have -inf offsets: M and dS are 0;
// 3. M^T and dS^T packed in registers into A fragments; dV += M^T dO, dK += dS^T Q (dO, Q by
//    ldmatrix.x4.trans).
// End: dK = scale dK, dV written by the lanes owning them.
// Grid: (ceil(N / kRows64), H, B); block: kThreads; dynamic shared memory: DkdvSyncSmem::total.
#include "gpsa_mma.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

struct DkdvSyncSmem {
  size_t k, v, q, go, tab, qbase, qoff_c, qoff_p, qdc, total;
  __host__ __device__ DkdvSyncSmem(int n16, int ld) {
    k = 0;                                              // [64][ld] T
    v = k + align128(size_t(kRows64) * ld * 2);         // [64][ld] T
    q = v + align128(size_t(kRows64) * ld * 2);         // [n16][ld] T
    go = q + align128(size_t(n16) * ld * 2);            // [n16][ld] T
    tab = go + align128(size_t(n16) * ld * 2);          // positional logit table, log2 units
    qbase = tab + align128(kTabMax * sizeof(float));    // [n16] int
    qoff_c = qbase + align128(size_t(n16) * sizeof(int));  // [n16] float
    qoff_p = qoff_c + align128(size_t(n16) * sizeof(float));
    qdc = qoff_p + align128(size_t(n16) * sizeof(float));
    total = qdc + align128(size_t(n16) * sizeof(float));
  }
};

template <typename T, int kSteps>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dkdv_mma_sync_kernel(BwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int ld = 16 * kSteps + 8;
  const int N = a.N, D = a.D, n16 = ceil_div(N, 16) * 16;
  const int k_steps = kSteps == 3 ? 3 : D / 16;  // the kSteps = 3 instance runs D = 48 only
  const DkdvSyncSmem lay(n16, ld);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* go_t = reinterpret_cast<T*>(smem_raw + lay.go);
  float* tab = reinterpret_cast<float*>(smem_raw + lay.tab);
  int* qbase = reinterpret_cast<int*>(smem_raw + lay.qbase);
  float* qoff_c = reinterpret_cast<float*>(smem_raw + lay.qoff_c);
  float* qoff_p = reinterpret_cast<float*>(smem_raw + lay.qoff_p);
  float* qdc = reinterpret_cast<float*>(smem_raw + lay.qdc);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, tg = lane % 4;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kRows64;
  const int64_t bh = int64_t(b) * a.H + h;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const float s = sigmoid(a.gating[h]);
  const float log2_1ms = log2f(1.0f - s), log2_s = log2f(s);
  build_pos_table(tab, a.pos_weight[h * 3 + 0] * kLog2e, a.pos_weight[h * 3 + 1] * kLog2e,
                  a.pos_weight[h * 3 + 2] * kLog2e, a.rows, a.cols);
  for (int i = tid; i < n16; i += kThreads) {
    const bool in = i < N;
    qbase[i] = in ? pos_base(i, a.rows, a.cols) : 0;
    qoff_c[i] = in ? log2_1ms - a.lse[bh * N + i] * kLog2e : -INFINITY;
    qoff_p[i] = in ? log2_s - a.pos_lse[int64_t(h) * N + i] * kLog2e : -INFINITY;
    qdc[i] = in ? a.delta_c[bh * N + i] : 0.0f;
  }
  load_rows_ld(k_t, ld, hs.k, a.ks.n, j0, kRows64, N, D);  // rows past N: zeros
  load_rows_ld(v_t, ld, hs.v, a.vs.n, j0, kRows64, N, D);
  load_rows_ld(q_t, ld, hs.q, a.qs.n, 0, n16, N, D);
  load_rows_ld(go_t, ld, hs.go, a.gos.n, 0, n16, N, D);
  __syncthreads();
  const int key0 = j0 + 16 * warp;
  if (key0 >= N) return;  // warp-uniform; no CTA barrier follows

  uint32_t kf[kSteps][4], vf[kSteps][4];  // A fragments of the warp's 16 keys
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    if (kk < k_steps) {
      const int off = (16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + 16 * kk + (lane >> 4) * 8;
      ldmatrix_x4(kf[kk], k_t + off);
      ldmatrix_x4(vf[kk], v_t + off);
    }
  }
  const float* tab_j[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key0 + g + 8 * r, jc = j < N ? j : N - 1;  // keys past N: any geometry, never written
    tab_j[r] = tab + pos_kidx(jc, a.cols);
  }
  const float sl2 = a.scale * kLog2e;
  float dk[2 * kSteps][4], dv[2 * kSteps][4];
#pragma unroll
  for (int dn = 0; dn < 2 * kSteps; ++dn)
#pragma unroll
    for (int x = 0; x < 4; ++x) dk[dn][x] = dv[dn][x] = 0.0f;

  for (int i0 = 0; i0 < n16; i0 += 16) {
    // 1. S^T and dM^T of the two 8-query blocks
    float st[2][4] = {}, dmt[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      if (kk < k_steps) {
        const int off = (i0 + (lane >> 4) * 8 + (lane & 7)) * ld + 16 * kk + ((lane >> 3) & 1) * 8;
        uint32_t qb[4], gb[4];
        ldmatrix_x4(qb, q_t + off);
        ldmatrix_x4(gb, go_t + off);
        mma16816<T>(st[0], kf[kk], qb);
        mma16816<T>(st[1], kf[kk], qb + 2);
        mma16816<T>(dmt[0], vf[kk], gb);
        mma16816<T>(dmt[1], vf[kk], gb + 2);
      }
    }
    // 2-3. M^T and dS^T into A fragments (k = the 16 queries)
    uint32_t ma[4], dsa[4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int ib = i0 + 8 * half + 2 * tg;
      const int2 qb2 = *reinterpret_cast<const int2*>(qbase + ib);
      const float2 oc2 = *reinterpret_cast<const float2*>(qoff_c + ib);
      const float2 op2 = *reinterpret_cast<const float2*>(qoff_p + ib);
      const float2 dc2 = *reinterpret_cast<const float2*>(qdc + ib);
      float m[4], ds[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const bool odd = x & 1;
        const float pc = fast_exp2(fmaf(st[half][x], sl2, odd ? oc2.y : oc2.x));
        const float pp = fast_exp2(tab_j[x / 2][odd ? qb2.y : qb2.x] + (odd ? op2.y : op2.x));
        m[x] = pc + pp;
        ds[x] = pc * (dmt[half][x] - (odd ? dc2.y : dc2.x));
      }
      ma[2 * half] = pack2<T>(m[0], m[1]);  // key row g: a0 (queries 0-7) / a2 (8-15)
      ma[2 * half + 1] = pack2<T>(m[2], m[3]);  // key row g + 8: a1 / a3
      dsa[2 * half] = pack2<T>(ds[0], ds[1]);
      dsa[2 * half + 1] = pack2<T>(ds[2], ds[3]);
    }
#pragma unroll
    for (int dp = 0; dp < kSteps; ++dp) {
      if (dp < k_steps) {
        const int off = (i0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + 16 * dp + (lane >> 4) * 8;
        uint32_t gt[4], qt[4];  // (queries 0-7 | 8-15) x (dims 0-7 | 8-15), transposed
        ldmatrix_x4_trans(gt, go_t + off);
        ldmatrix_x4_trans(qt, q_t + off);
        mma16816<T>(dv[2 * dp], ma, gt);
        mma16816<T>(dv[2 * dp + 1], ma, gt + 2);
        mma16816<T>(dk[2 * dp], dsa, qt);
        mma16816<T>(dk[2 * dp + 1], dsa, qt + 2);
      }
    }
  }
  T* dkp = a.dk + b * a.dks.b + h * a.dks.h;
  T* dvp = a.dv + b * a.dvs.b + h * a.dvs.h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key0 + g + 8 * r;
    if (j >= N) continue;
#pragma unroll
    for (int dn = 0; dn < 2 * kSteps; ++dn) {
      if (dn < 2 * k_steps) {
        const int64_t d = 8 * dn + 2 * tg;
        dkp[int64_t(j) * a.dks.n + d] = from_acc<T>(a.scale * dk[dn][2 * r]);
        dkp[int64_t(j) * a.dks.n + d + 1] = from_acc<T>(a.scale * dk[dn][2 * r + 1]);
        dvp[int64_t(j) * a.dvs.n + d] = from_acc<T>(dv[dn][2 * r]);
        dvp[int64_t(j) * a.dvs.n + d + 1] = from_acc<T>(dv[dn][2 * r + 1]);
      }
    }
  }
#else
  __trap();  // launched only on sm_80+ (see bwd_typed)
#endif
}

bool bwd_dkdv_mma_sync_takes(int N, int D) {
  const int steps = D == 48 ? 3 : D <= 64 ? 4 : 8;
  return N <= kWholeRowMaxN && D % 16 == 0 && D <= 64 &&
         DkdvSyncSmem(ceil_div(N, 16) * 16, 16 * steps + 8).total <= device_max_smem_optin();
}

template <typename T>
cudaError_t bwd_dkdv_mma_sync_launch(const BwdArgs<T>& a, cudaStream_t stream) {
  const int n16 = ceil_div(a.N, 16) * 16;
  const dim3 grid(ceil_div(a.N, kRows64), a.H, a.B);
  if (a.D == 48)
    return launch_with_smem(gpsa_bwd_dkdv_mma_sync_kernel<T, 3>, grid, DkdvSyncSmem(n16, 56).total, stream, a);
  return launch_with_smem(gpsa_bwd_dkdv_mma_sync_kernel<T, 4>, grid, DkdvSyncSmem(n16, 72).total, stream, a);
}

template cudaError_t bwd_dkdv_mma_sync_launch<__half>(const BwdArgs<__half>&, cudaStream_t);
template cudaError_t bwd_dkdv_mma_sync_launch<__nv_bfloat16>(const BwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
