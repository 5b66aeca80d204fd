// GPSA backward on CUDA cores (SIMT), every dtype, without atomics and bitwise deterministic. No
// torch header.
//
// Per (b, h), with s = sigmoid(gating[h]), P_c = exp(S - lse) (S = scale Q K^T), P_p the
// positional softmax, M = (1 - s) P_c + s P_p and g = grad_out (docs/DESIGN.md section 1):
//   dV = M^T g                      dM = g V^T
//   Delta_c = rowsum(P_c dM)        Delta_p = rowsum(P_p dM)
//   dS = (1 - s) P_c (dM - Delta_c) dZ = s P_p (dM - Delta_p)
//   dQ = scale dS K                 dK = scale dS^T Q
//   dw_h = sum_{b,i,j} dZ_ij (dx, dy, dx^2 + dy^2)      dg_h = s (1 - s) sum_{b,i} (Delta_p - Delta_c)
// Three kernels, each writing every output element exactly once:
//   gpsa_bwd_dq_kernel     over query blocks: Delta_c, Delta_p (first pass over the keys), dQ and
//                          this CTA's partial sums of dw and dg (second pass);
//   gpsa_bwd_dkdv_kernel   over key blocks: dK, dV (reads Delta_c);
//   gpsa_bwd_reduce_kernel (gpsa_launch.cu) per head: the partial sums, added in a fixed order.
// fp16/bf16 with D % 16 == 0 on sm_80+ take the tensor-core kernels of gpsa_bwd_mma.cu instead of
// the first two (64-row whole-row kernels for N <= kWholeRowMaxN), with the same reduction.
#include "gpsa_common.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

constexpr int kBwdChunk = 32;  // keys (dQ kernel) or queries (dK/dV kernel) staged at a time
constexpr int kBwdRowsPerWarp = kBwdBlockM / kWarps;                   // 4
constexpr int kBwdOutPerThread = kBwdBlockM * kMaxHeadDim / kThreads;  // 16

static_assert(kBwdChunk == 32, "a tile row is one warp wide");
static_assert(kBwdBlockM == kBwdBlockN, "both kernels use kBwdOutPerThread accumulators");
static_assert(kBwdBlockM * kBwdChunk >= kThreads, "the dS tile doubles as block_sum scratch");

// dQ kernel: one CTA per (query block of kBwdBlockM rows, h, b).
// Tile entry (r, j0 + lane) of a chunk belongs to warp r % kWarps, which keeps that row's
// statistics (lse, pos_lse, Delta_c, Delta_p) in registers, identical in all its lanes.
// Grid: (ceil(N / kBwdBlockM), H, B); block: kThreads; dynamic shared memory: dq_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dq_kernel(BwdArgs<T> a) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int N = a.N, D = a.D, ldkv = D + 1;
  Acc* q_s = reinterpret_cast<Acc*>(smem_raw);  // [kBwdBlockM][D]
  Acc* go_s = q_s + kBwdBlockM * D;             // [kBwdBlockM][D]
  Acc* k_s = go_s + kBwdBlockM * D;             // [kBwdChunk][D + 1]
  Acc* v_s = k_s + kBwdChunk * ldkv;            // [kBwdChunk][D + 1]
  Acc* ds_s = v_s + kBwdChunk * ldkv;           // [kBwdBlockM][kBwdChunk]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, qb = blockIdx.x, i0 = qb * kBwdBlockM;
  const int64_t bh = int64_t(b) * a.H + h;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *go = hs.go, *k = hs.k, *v = hs.v;
  const Acc w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const Acc s = sigmoid(a.gating[h]);

  Acc lse_c[kBwdRowsPerWarp], plse[kBwdRowsPerWarp], delta_c[kBwdRowsPerWarp], delta_p[kBwdRowsPerWarp];
#pragma unroll
  for (int u = 0; u < kBwdRowsPerWarp; ++u) {
    const int i = i0 + warp + kWarps * u;
    lse_c[u] = i < N ? a.lse[bh * N + i] : Acc(0);
    plse[u] = i < N ? a.pos_lse[int64_t(h) * N + i] : Acc(0);
    delta_c[u] = delta_p[u] = Acc(0);  // per-lane partial sums during pass 1
  }
  load_rows(q_s, D, q, a.qs.n, i0, kBwdBlockM, N, D);
  load_rows(go_s, D, go, a.gos.n, i0, kBwdBlockM, N, D);

  // Pass 1: Delta_c = rowsum(P_c dM), Delta_p = rowsum(P_p dM).
  for (int j0 = 0; j0 < N; j0 += kBwdChunk) {
    __syncthreads();
    load_rows(k_s, ldkv, k, a.ks.n, j0, kBwdChunk, N, D);
    load_rows(v_s, ldkv, v, a.vs.n, j0, kBwdChunk, N, D);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kBwdRowsPerWarp; ++u) {
      const int r = warp + kWarps * u, i = i0 + r, j = j0 + lane;
      if (i < N && j < N) {
        const Acc p_c = acc_exp(a.scale * dot_rows(q_s + r * D, k_s + lane * ldkv, D) - lse_c[u]);
        const Acc p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse[u]);
        const Acc dm = dot_rows(go_s + r * D, v_s + lane * ldkv, D);
        delta_c[u] = fma(p_c, dm, delta_c[u]);
        delta_p[u] = fma(p_p, dm, delta_p[u]);
      }
    }
  }
  Acc gate_part = Acc(0);  // this thread's share of sum(Delta_p - Delta_c)
#pragma unroll
  for (int u = 0; u < kBwdRowsPerWarp; ++u) {
    const int i = i0 + warp + kWarps * u;
    delta_c[u] = warp_sum(delta_c[u]);
    delta_p[u] = warp_sum(delta_p[u]);
    if (lane == 0 && i < N) {
      a.delta_c[bh * N + i] = delta_c[u];
      gate_part += delta_p[u] - delta_c[u];
    }
  }

  // Pass 2: dS, dZ; dQ = scale dS K; this thread's shares of dw.
  Acc dw0 = Acc(0), dw1 = Acc(0), dw2 = Acc(0);
  Acc acc[kBwdOutPerThread];
#pragma unroll
  for (int u = 0; u < kBwdOutPerThread; ++u) acc[u] = Acc(0);
  for (int j0 = 0; j0 < N; j0 += kBwdChunk) {
    __syncthreads();
    load_rows(k_s, ldkv, k, a.ks.n, j0, kBwdChunk, N, D);
    load_rows(v_s, ldkv, v, a.vs.n, j0, kBwdChunk, N, D);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kBwdRowsPerWarp; ++u) {
      const int r = warp + kWarps * u, i = i0 + r, j = j0 + lane;
      Acc ds = Acc(0);
      if (i < N && j < N) {
        const Offset o = grid_offset(i, j, a.cols);
        const Acc p_c = acc_exp(a.scale * dot_rows(q_s + r * D, k_s + lane * ldkv, D) - lse_c[u]);
        const Acc p_p = acc_exp(pos_logit(w, o) - plse[u]);
        const Acc dm = dot_rows(go_s + r * D, v_s + lane * ldkv, D);
        ds = (Acc(1) - s) * p_c * (dm - delta_c[u]);
        const Acc dz = s * p_p * (dm - delta_p[u]);
        dw0 = fma(dz, Acc(o.dx), dw0);
        dw1 = fma(dz, Acc(o.dy), dw1);
        dw2 = fma(dz, Acc(o.dx * o.dx + o.dy * o.dy), dw2);
      }
      ds_s[r * kBwdChunk + lane] = ds;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kBwdOutPerThread; ++u) {
      const int e = tid + kThreads * u;
      if (e < kBwdBlockM * D) {
        const int r = e / D, d = e % D;
        Acc x = acc[u];
        for (int jj = 0; jj < kBwdChunk; ++jj) x = fma(ds_s[r * kBwdChunk + jj], k_s[jj * ldkv + d], x);
        acc[u] = x;
      }
    }
  }
  T* dq = a.dq + b * a.dqs.b + h * a.dqs.h;
#pragma unroll
  for (int u = 0; u < kBwdOutPerThread; ++u) {
    const int e = tid + kThreads * u;
    if (e < kBwdBlockM * D) {
      const int r = e / D, d = e % D, i = i0 + r;
      if (i < N) dq[int64_t(i) * a.dqs.n + d] = from_acc<T>(a.scale * acc[u]);
    }
  }

  // This CTA's partial sums, reduced in a fixed order (ds_s is free scratch now).
  const Acc sums[kPartials] = {block_sum(dw0, ds_s), block_sum(dw1, ds_s), block_sum(dw2, ds_s),
                               block_sum(gate_part, ds_s)};
  if (tid == 0) {
    const int64_t num_partials = int64_t(a.B) * gridDim.x;
    Acc* out = a.partials + (int64_t(h) * num_partials + int64_t(b) * gridDim.x + qb) * kPartials;
    for (int c = 0; c < kPartials; ++c) out[c] = sums[c];
  }
}

// dK/dV kernel: one CTA per (key block of kBwdBlockN keys, h, b), looping over the queries in
// chunks of 32. Tile entry (query i0 + lane, key jl) belongs to warp jl % kWarps.
// Grid: (ceil(N / kBwdBlockN), H, B); block: kThreads; dynamic shared memory: dkdv_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dkdv_kernel(BwdArgs<T> a) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int N = a.N, D = a.D, ldq = D + 1, ldt = kBwdBlockN + 1;  // pads: conflict-free lane access
  Acc* k_s = reinterpret_cast<Acc*>(smem_raw);  // [kBwdBlockN][D]
  Acc* v_s = k_s + kBwdBlockN * D;              // [kBwdBlockN][D]
  Acc* q_s = v_s + kBwdBlockN * D;              // [kBwdChunk][D + 1]
  Acc* go_s = q_s + kBwdChunk * ldq;            // [kBwdChunk][D + 1]
  Acc* m_s = go_s + kBwdChunk * ldq;            // [kBwdChunk][kBwdBlockN + 1]  M[i][j]
  Acc* ds_s = m_s + kBwdChunk * ldt;            // [kBwdChunk][kBwdBlockN + 1]  dS[i][j]
  Acc* lse_s = ds_s + kBwdChunk * ldt;          // [kBwdChunk]
  Acc* plse_s = lse_s + kBwdChunk;              // [kBwdChunk]
  Acc* dc_s = plse_s + kBwdChunk;               // [kBwdChunk]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kBwdBlockN;
  const int64_t bh = int64_t(b) * a.H + h;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *go = hs.go, *k = hs.k, *v = hs.v;
  const Acc w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const Acc s = sigmoid(a.gating[h]);

  load_rows(k_s, D, k, a.ks.n, j0, kBwdBlockN, N, D);
  load_rows(v_s, D, v, a.vs.n, j0, kBwdBlockN, N, D);
  Acc dk[kBwdOutPerThread], dv[kBwdOutPerThread];
#pragma unroll
  for (int u = 0; u < kBwdOutPerThread; ++u) dk[u] = dv[u] = Acc(0);

  for (int i0 = 0; i0 < N; i0 += kBwdChunk) {
    __syncthreads();  // previous chunk consumed
    load_rows(q_s, ldq, q, a.qs.n, i0, kBwdChunk, N, D);
    load_rows(go_s, ldq, go, a.gos.n, i0, kBwdChunk, N, D);
    if (tid < kBwdChunk) {
      const int i = i0 + tid;
      lse_s[tid] = i < N ? a.lse[bh * N + i] : Acc(0);
      plse_s[tid] = i < N ? a.pos_lse[int64_t(h) * N + i] : Acc(0);
      dc_s[tid] = i < N ? a.delta_c[bh * N + i] : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kBwdBlockN / kWarps; ++u) {
      const int jl = warp + kWarps * u, j = j0 + jl, i = i0 + lane;
      Acc m = Acc(0), ds = Acc(0);
      if (i < N && j < N) {
        const Acc p_c = acc_exp(a.scale * dot_rows(q_s + lane * ldq, k_s + jl * D, D) - lse_s[lane]);
        const Acc p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse_s[lane]);
        const Acc dm = dot_rows(go_s + lane * ldq, v_s + jl * D, D);
        m = (Acc(1) - s) * p_c + s * p_p;
        ds = (Acc(1) - s) * p_c * (dm - dc_s[lane]);
      }
      m_s[lane * ldt + jl] = m;
      ds_s[lane * ldt + jl] = ds;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kBwdOutPerThread; ++u) {
      const int e = tid + kThreads * u;
      if (e < kBwdBlockN * D) {
        const int jl = e / D, d = e % D;
        Acc xk = dk[u], xv = dv[u];
        for (int il = 0; il < kBwdChunk; ++il) {
          xv = fma(m_s[il * ldt + jl], go_s[il * ldq + d], xv);
          xk = fma(ds_s[il * ldt + jl], q_s[il * ldq + d], xk);
        }
        dk[u] = xk;
        dv[u] = xv;
      }
    }
  }
  T* dkp = a.dk + b * a.dks.b + h * a.dks.h;
  T* dvp = a.dv + b * a.dvs.b + h * a.dvs.h;
#pragma unroll
  for (int u = 0; u < kBwdOutPerThread; ++u) {
    const int e = tid + kThreads * u;
    if (e < kBwdBlockN * D) {
      const int jl = e / D, d = e % D, j = j0 + jl;
      if (j < N) {
        dkp[int64_t(j) * a.dks.n + d] = from_acc<T>(a.scale * dk[u]);
        dvp[int64_t(j) * a.dvs.n + d] = from_acc<T>(dv[u]);
      }
    }
  }
}

template <typename Acc>
size_t dq_smem_bytes(int D) {
  return sizeof(Acc) * (2 * size_t(kBwdBlockM) * D + 2 * size_t(kBwdChunk) * (D + 1) + size_t(kBwdBlockM) * kBwdChunk);
}

template <typename Acc>
size_t dkdv_smem_bytes(int D) {
  return sizeof(Acc) * (2 * size_t(kBwdBlockN) * D + 2 * size_t(kBwdChunk) * (D + 1) +
                        2 * size_t(kBwdChunk) * (kBwdBlockN + 1) + 3 * size_t(kBwdChunk));
}

template <typename T>
cudaError_t bwd_simt_launch(const BwdArgs<T>& a, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  // The dK/dV kernel reads Delta_c, written by the dQ kernel: same stream, so in order.
  const cudaError_t err = launch_with_smem(gpsa_bwd_dq_kernel<T>, dim3(ceil_div(a.N, kBwdBlockM), a.H, a.B),
                                           dq_smem_bytes<Acc>(a.D), stream, a);
  if (err != cudaSuccess) return err;
  return launch_with_smem(gpsa_bwd_dkdv_kernel<T>, dim3(ceil_div(a.N, kBwdBlockN), a.H, a.B),
                          dkdv_smem_bytes<Acc>(a.D), stream, a);
}

template cudaError_t bwd_simt_launch<float>(const BwdArgs<float>&, cudaStream_t);
template cudaError_t bwd_simt_launch<double>(const BwdArgs<double>&, cudaStream_t);
template cudaError_t bwd_simt_launch<__half>(const BwdArgs<__half>&, cudaStream_t);
template cudaError_t bwd_simt_launch<__nv_bfloat16>(const BwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
