// GPSA backward on tensor cores (WMMA m16n16k16, fp32 accumulation) for fp16/bf16 with
// D % 16 == 0 on sm_80+. Same algebra, outputs, workspaces and partial sums as the SIMT kernels of
// gpsa_bwd.cu (see its header for the formulas); no atomics, every sum in a fixed order.
// Operands live in shared memory in T; the probabilities M and dS are rounded to T once before
// their matmuls (as flash attention does); all elementwise math and the dw / dg partials are fp32.
#include "gpsa_common.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

constexpr int kMmaChunk = 64;  // keys (dQ kernel) / queries (dK/dV kernel) per staged chunk: 16 per warp
constexpr int kMmaMaxTiles = kMaxHeadDim / 16 / kWarps;  // output tiles of 16 columns per warp at D = 128: 2
static_assert(kBwdBlockM == 16 && kBwdBlockN == 16, "one WMMA tile covers the CTA's rows");
static_assert(kMmaChunk == 16 * kWarps, "one 16-wide tile per warp");
static_assert(kMmaMaxTiles * 16 * kWarps == kMaxHeadDim, "output tiles cover D = 128");

// ---- dQ kernel ----
// CTA: 16 query rows of one (b, h). Keys in chunks of 64, warp w owning keys 16 w .. 16 w + 15 of
// the chunk for the score tiles; rows r = warp + 4 u for the elementwise work (lanes over keys);
// output tile t (columns 16 t ..) of dQ for warp t % 4.
// Grid: (ceil(N / 16), H, B); block: kThreads; dynamic shared memory: DqLayout::total.
struct DqLayout {
  size_t q, go, k, v, s, dm, ds, o, total;
  __host__ __device__ DqLayout(int D, size_t elem) {
    q = 0;                                                           // [16][D] T
    go = q + align128(size_t(kBwdBlockM) * D * elem);                // [16][D] T
    k = go + align128(size_t(kBwdBlockM) * D * elem);                // [64][D] T
    v = k + align128(size_t(kMmaChunk) * D * elem);                  // [64][D] T
    s = v + align128(size_t(kMmaChunk) * D * elem);                  // [16][64] float: Q K^T (unscaled)
    dm = s + align128(size_t(kBwdBlockM) * kMmaChunk * sizeof(float));   // [16][64] float: dO V^T
    ds = dm + align128(size_t(kBwdBlockM) * kMmaChunk * sizeof(float));  // [16][64] T: dS
    o = ds + align128(size_t(kBwdBlockM) * kMmaChunk * elem);        // [16][D] float: dQ; block_sum scratch
    total = o + align128(size_t(kBwdBlockM) * D * sizeof(float));
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dq_mma_kernel(BwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D;
  const DqLayout lay(D, sizeof(T));
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* go_t = reinterpret_cast<T*>(smem_raw + lay.go);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  float* s_f = reinterpret_cast<float*>(smem_raw + lay.s);
  float* dm_f = reinterpret_cast<float*>(smem_raw + lay.dm);
  T* ds_t = reinterpret_cast<T*>(smem_raw + lay.ds);
  float* o_f = reinterpret_cast<float*>(smem_raw + lay.o);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, qb = blockIdx.x, i0 = qb * kBwdBlockM;
  const int64_t bh = int64_t(b) * a.H + h;
  const T* q = a.q + b * a.qs.b + h * a.qs.h;
  const T* go = a.go + b * a.gos.b + h * a.gos.h;
  const T* k = a.k + b * a.ks.b + h * a.ks.h;
  const T* v = a.v + b * a.vs.b + h * a.vs.h;
  const float w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const float s = sigmoid(a.gating[h]);
  constexpr int kRows = kBwdBlockM / kWarps;  // 4 rows per warp in the elementwise steps
  constexpr int kPerLane = kMmaChunk / 32;    // 2 keys per lane per row

  float lse_c[kRows], plse[kRows], delta_c[kRows], delta_p[kRows];
  for (int u = 0; u < kRows; ++u) {
    const int i = i0 + warp + kWarps * u;
    lse_c[u] = i < N ? a.lse[bh * N + i] : 0.0f;
    plse[u] = i < N ? a.pos_lse[int64_t(h) * N + i] : 0.0f;
    delta_c[u] = delta_p[u] = 0.0f;  // per-lane partial sums during pass 1
  }
  load_rows_raw(q_t, q, a.qs.n, i0, kBwdBlockM, N, D);
  load_rows_raw(go_t, go, a.gos.n, i0, kBwdBlockM, N, D);

  // Stages K, V rows j0 .. j0 + 63 and computes the raw score and dM tiles of this chunk.
  auto score_tiles = [&](int j0) {
    __syncthreads();  // k_t, v_t, s_f, dm_f, ds_t free
    load_rows_raw(k_t, k, a.ks.n, j0, kMmaChunk, N, D);
    load_rows_raw(v_t, v, a.vs.n, j0, kMmaChunk, N, D);
    __syncthreads();
    AccFrag st, dmt;
    wmma::fill_fragment(st, 0.0f);
    wmma::fill_fragment(dmt, 0.0f);
    mma_rows_dot_rows(st, q_t, k_t + 16 * warp * D, D);    // S[r][16 w + c] = q_r . k_c
    mma_rows_dot_rows(dmt, go_t, v_t + 16 * warp * D, D);  // dM[r][16 w + c] = g_r . v_c
    wmma::store_matrix_sync(s_f + 16 * warp, st, kMmaChunk, wmma::mem_row_major);
    wmma::store_matrix_sync(dm_f + 16 * warp, dmt, kMmaChunk, wmma::mem_row_major);
    __syncthreads();
  };

  // Pass 1: Delta_c = rowsum(P_c dM), Delta_p = rowsum(P_p dM).
  for (int j0 = 0; j0 < N; j0 += kMmaChunk) {
    score_tiles(j0);
    for (int u = 0; u < kRows; ++u) {
      const int r = warp + kWarps * u, i = i0 + r;
      for (int x = 0; x < kPerLane; ++x) {
        const int jc = lane + 32 * x, j = j0 + jc;
        if (i < N && j < N) {
          const float p_c = acc_exp(a.scale * s_f[r * kMmaChunk + jc] - lse_c[u]);
          const float p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse[u]);
          const float dm = dm_f[r * kMmaChunk + jc];
          delta_c[u] = fma(p_c, dm, delta_c[u]);
          delta_p[u] = fma(p_p, dm, delta_p[u]);
        }
      }
    }
  }
  float gate_part = 0.0f;  // this thread's share of sum(Delta_p - Delta_c)
  for (int u = 0; u < kRows; ++u) {
    const int i = i0 + warp + kWarps * u;
    delta_c[u] = warp_sum(delta_c[u]);
    delta_p[u] = warp_sum(delta_p[u]);
    if (lane == 0 && i < N) {
      a.delta_c[bh * N + i] = delta_c[u];
      gate_part += delta_p[u] - delta_c[u];
    }
  }

  // Pass 2: dS (rounded to T), the dw shares, dQ += dS K on tensor cores.
  float dw0 = 0.0f, dw1 = 0.0f, dw2 = 0.0f;
  AccFrag dq_acc[kMmaMaxTiles];
  for (int slot = 0; slot < kMmaMaxTiles; ++slot) wmma::fill_fragment(dq_acc[slot], 0.0f);
  for (int j0 = 0; j0 < N; j0 += kMmaChunk) {
    score_tiles(j0);
    for (int u = 0; u < kRows; ++u) {
      const int r = warp + kWarps * u, i = i0 + r;
      for (int x = 0; x < kPerLane; ++x) {
        const int jc = lane + 32 * x, j = j0 + jc;
        float ds = 0.0f;
        if (i < N && j < N) {
          const Offset o = grid_offset(i, j, a.cols);
          const float p_c = acc_exp(a.scale * s_f[r * kMmaChunk + jc] - lse_c[u]);
          const float p_p = acc_exp(pos_logit(w, o) - plse[u]);
          const float dm = dm_f[r * kMmaChunk + jc];
          ds = (1.0f - s) * p_c * (dm - delta_c[u]);
          const float dz = s * p_p * (dm - delta_p[u]);
          dw0 = fma(dz, float(o.dx), dw0);
          dw1 = fma(dz, float(o.dy), dw1);
          dw2 = fma(dz, float(o.dx * o.dx + o.dy * o.dy), dw2);
        }
        ds_t[r * kMmaChunk + jc] = from_acc<T>(ds);
      }
    }
    __syncthreads();
#pragma unroll
    for (int slot = 0; slot < kMmaMaxTiles; ++slot) {
      const int t = warp + kWarps * slot;
      if (t >= D / 16) continue;  // warp-uniform
      for (int kk = 0; kk < kMmaChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;  // dS[r][16 kk + c]
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;  // K[16 kk + c][16 t + n]
        wmma::load_matrix_sync(fa, ds_t + 16 * kk, kMmaChunk);
        wmma::load_matrix_sync(fb, k_t + 16 * kk * D + 16 * t, D);
        wmma::mma_sync(dq_acc[slot], fa, fb, dq_acc[slot]);
      }
    }
  }
#pragma unroll
  for (int slot = 0; slot < kMmaMaxTiles; ++slot) {
    const int t = warp + kWarps * slot;
    if (t < D / 16) wmma::store_matrix_sync(o_f + 16 * t, dq_acc[slot], D, wmma::mem_row_major);
  }
  __syncthreads();
  T* dq = a.dq + b * a.dqs.b + h * a.dqs.h;
  for (int e = tid; e < kBwdBlockM * D; e += kThreads) {
    const int r = e / D, d = e % D, i = i0 + r;
    if (i < N) dq[int64_t(i) * a.dqs.n + d] = from_acc<T>(a.scale * o_f[r * D + d]);
  }

  // This CTA's partial sums, reduced in a fixed order (s_f is free scratch: 1024 >= kThreads floats).
  const float sums[kPartials] = {block_sum(dw0, s_f), block_sum(dw1, s_f), block_sum(dw2, s_f),
                                 block_sum(gate_part, s_f)};
  if (tid == 0) {
    const int64_t num_partials = int64_t(a.B) * gridDim.x;
    float* out = a.partials + (int64_t(h) * num_partials + int64_t(b) * gridDim.x + qb) * kPartials;
    for (int c = 0; c < kPartials; ++c) out[c] = sums[c];
  }
#else
  __trap();  // launched only on sm_80+ (see bwd_typed)
#endif
}

// ---- dK/dV kernel ----
// CTA: 16 keys of one (b, h). Queries in chunks of 64, warp w owning queries 16 w .. 16 w + 15 of
// the chunk for the score tiles (stored transposed-free as [query][key]); elementwise entries
// (query e / 16, key e % 16); output tile t of dK and of dV for warp t % 4.
// Grid: (ceil(N / 16), H, B); block: kThreads; dynamic shared memory: DkdvLayout::total.
struct DkdvLayout {
  size_t k, v, q, go, s, dm, m, ds, rows, o, total;
  __host__ __device__ DkdvLayout(int D, size_t elem) {
    k = 0;                                                                // [16][D] T
    v = k + align128(size_t(kBwdBlockN) * D * elem);                      // [16][D] T
    q = v + align128(size_t(kBwdBlockN) * D * elem);                      // [64][D] T
    go = q + align128(size_t(kMmaChunk) * D * elem);                      // [64][D] T
    s = go + align128(size_t(kMmaChunk) * D * elem);                      // [64][16] float: Q K^T
    dm = s + align128(size_t(kMmaChunk) * kBwdBlockN * sizeof(float));    // [64][16] float: dO V^T
    m = dm + align128(size_t(kMmaChunk) * kBwdBlockN * sizeof(float));    // [64][16] T: M
    ds = m + align128(size_t(kMmaChunk) * kBwdBlockN * elem);             // [64][16] T: dS
    rows = ds + align128(size_t(kMmaChunk) * kBwdBlockN * elem);          // 3 x [64] float: lse, pos_lse, Delta_c
    o = rows + align128(3 * size_t(kMmaChunk) * sizeof(float));           // [16][D] float: dK, then dV
    total = o + align128(size_t(kBwdBlockN) * D * sizeof(float));
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dkdv_mma_kernel(BwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D;
  const DkdvLayout lay(D, sizeof(T));
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* go_t = reinterpret_cast<T*>(smem_raw + lay.go);
  float* s_f = reinterpret_cast<float*>(smem_raw + lay.s);
  float* dm_f = reinterpret_cast<float*>(smem_raw + lay.dm);
  T* m_t = reinterpret_cast<T*>(smem_raw + lay.m);
  T* ds_t = reinterpret_cast<T*>(smem_raw + lay.ds);
  float* lse_s = reinterpret_cast<float*>(smem_raw + lay.rows);
  float* plse_s = lse_s + kMmaChunk;
  float* dc_s = plse_s + kMmaChunk;
  float* o_f = reinterpret_cast<float*>(smem_raw + lay.o);

  const int tid = threadIdx.x, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kBwdBlockN;
  const int64_t bh = int64_t(b) * a.H + h;
  const T* q = a.q + b * a.qs.b + h * a.qs.h;
  const T* go = a.go + b * a.gos.b + h * a.gos.h;
  const T* k = a.k + b * a.ks.b + h * a.ks.h;
  const T* v = a.v + b * a.vs.b + h * a.vs.h;
  const float w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const float s = sigmoid(a.gating[h]);

  load_rows_raw(k_t, k, a.ks.n, j0, kBwdBlockN, N, D);
  load_rows_raw(v_t, v, a.vs.n, j0, kBwdBlockN, N, D);
  AccFrag dk_acc[kMmaMaxTiles], dv_acc[kMmaMaxTiles];
  for (int slot = 0; slot < kMmaMaxTiles; ++slot) {
    wmma::fill_fragment(dk_acc[slot], 0.0f);
    wmma::fill_fragment(dv_acc[slot], 0.0f);
  }

  for (int c0 = 0; c0 < N; c0 += kMmaChunk) {
    __syncthreads();  // previous chunk consumed (and k_t, v_t loaded)
    load_rows_raw(q_t, q, a.qs.n, c0, kMmaChunk, N, D);
    load_rows_raw(go_t, go, a.gos.n, c0, kMmaChunk, N, D);
    for (int x = tid; x < kMmaChunk; x += kThreads) {
      const int i = c0 + x;
      lse_s[x] = i < N ? a.lse[bh * N + i] : 0.0f;
      plse_s[x] = i < N ? a.pos_lse[int64_t(h) * N + i] : 0.0f;
      dc_s[x] = i < N ? a.delta_c[bh * N + i] : 0.0f;
    }
    __syncthreads();
    {
      AccFrag st, dmt;
      wmma::fill_fragment(st, 0.0f);
      wmma::fill_fragment(dmt, 0.0f);
      mma_rows_dot_rows(st, q_t + 16 * warp * D, k_t, D);    // S[16 w + r][c] = q_r . k_c
      mma_rows_dot_rows(dmt, go_t + 16 * warp * D, v_t, D);  // dM[16 w + r][c] = g_r . v_c
      wmma::store_matrix_sync(s_f + 16 * warp * kBwdBlockN, st, kBwdBlockN, wmma::mem_row_major);
      wmma::store_matrix_sync(dm_f + 16 * warp * kBwdBlockN, dmt, kBwdBlockN, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kMmaChunk * kBwdBlockN; e += kThreads) {
      const int il = e / kBwdBlockN, jl = e % kBwdBlockN, i = c0 + il, j = j0 + jl;
      float m = 0.0f, ds = 0.0f;
      if (i < N && j < N) {
        const float p_c = acc_exp(a.scale * s_f[e] - lse_s[il]);
        const float p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse_s[il]);
        m = (1.0f - s) * p_c + s * p_p;
        ds = (1.0f - s) * p_c * (dm_f[e] - dc_s[il]);
      }
      m_t[e] = from_acc<T>(m);
      ds_t[e] = from_acc<T>(ds);
    }
    __syncthreads();
    // dV[c][16 t + n] += sum_i M[i][c] dO[i][16 t + n]; dK likewise with dS and Q. The A operands
    // are M^T and dS^T: (c, i) = m_t[i * 16 + c], i.e. column-major with ld 16.
#pragma unroll
    for (int slot = 0; slot < kMmaMaxTiles; ++slot) {
      const int t = warp + kWarps * slot;
      if (t >= D / 16) continue;  // warp-uniform
      for (int kk = 0; kk < kMmaChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fm, fds;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fgo, fq;
        wmma::load_matrix_sync(fm, m_t + 16 * kk * kBwdBlockN, kBwdBlockN);
        wmma::load_matrix_sync(fds, ds_t + 16 * kk * kBwdBlockN, kBwdBlockN);
        wmma::load_matrix_sync(fgo, go_t + 16 * kk * D + 16 * t, D);
        wmma::load_matrix_sync(fq, q_t + 16 * kk * D + 16 * t, D);
        wmma::mma_sync(dv_acc[slot], fm, fgo, dv_acc[slot]);
        wmma::mma_sync(dk_acc[slot], fds, fq, dk_acc[slot]);
      }
    }
  }

  T* dkp = a.dk + b * a.dks.b + h * a.dks.h;
  T* dvp = a.dv + b * a.dvs.b + h * a.dvs.h;
  for (int pass = 0; pass < 2; ++pass) {  // 0: dK (times scale), 1: dV
    __syncthreads();                      // o_f free
#pragma unroll
    for (int slot = 0; slot < kMmaMaxTiles; ++slot) {
      const int t = warp + kWarps * slot;
      if (t >= D / 16) continue;
      if (pass == 0)
        wmma::store_matrix_sync(o_f + 16 * t, dk_acc[slot], D, wmma::mem_row_major);
      else
        wmma::store_matrix_sync(o_f + 16 * t, dv_acc[slot], D, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kBwdBlockN * D; e += kThreads) {
      const int jl = e / D, d = e % D, j = j0 + jl;
      if (j >= N) continue;
      if (pass == 0)
        dkp[int64_t(j) * a.dks.n + d] = from_acc<T>(a.scale * o_f[e]);
      else
        dvp[int64_t(j) * a.dvs.n + d] = from_acc<T>(o_f[e]);
    }
  }
#else
  __trap();  // launched only on sm_80+ (see bwd_typed)
#endif
}

template <typename T>
cudaError_t bwd_mma_launch(const BwdArgs<T>& a, cudaStream_t stream) {
  // The dK/dV kernel reads Delta_c, written by the dQ kernel: same stream, so in order.
  cudaError_t err = launch_with_smem(gpsa_bwd_dq_mma_kernel<T>, dim3(ceil_div(a.N, kBwdBlockM), a.H, a.B),
                                     DqLayout(a.D, sizeof(T)).total, stream, a);
  if (err != cudaSuccess) return err;
  return launch_with_smem(gpsa_bwd_dkdv_mma_kernel<T>, dim3(ceil_div(a.N, kBwdBlockN), a.H, a.B),
                          DkdvLayout(a.D, sizeof(T)).total, stream, a);
}

template cudaError_t bwd_mma_launch<__half>(const BwdArgs<__half>&, cudaStream_t);
template cudaError_t bwd_mma_launch<__nv_bfloat16>(const BwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
