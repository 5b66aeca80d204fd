// GPSA backward on tensor cores (WMMA m16n16k16, fp32 accumulation) for fp16/bf16 with
// D % 16 == 0 on sm_80+. Same algebra, outputs, workspaces and partial sums as the SIMT kernels of
// gpsa_bwd_simt.cu (see its header for the formulas); no atomics, every sum in a fixed order.
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
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *go = hs.go, *k = hs.k, *v = hs.v;
  const float w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const float s = sigmoid(a.gating[h]);
  constexpr int kRows = kBwdBlockM / kWarps;  // 4 rows per warp in the elementwise steps
  constexpr int kPerLane = kMmaChunk / 32;    // 2 keys per lane per row

  // Grid coordinates of the warp's rows once and of the lane's keys once per chunk: the positional
  // logit needs no division per element.
  float lse_c[kRows], plse[kRows], delta_c[kRows], delta_p[kRows];
  int row_i[kRows], col_i[kRows], row_j[kPerLane], col_j[kPerLane];
  auto key_coords = [&](int j0) {
    for (int x = 0; x < kPerLane; ++x) {
      const int j = j0 + lane + 32 * x;
      row_j[x] = j / a.cols;
      col_j[x] = j % a.cols;
    }
  };
  for (int u = 0; u < kRows; ++u) {
    const int i = i0 + warp + kWarps * u;
    row_i[u] = i / a.cols;
    col_i[u] = i % a.cols;
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
    key_coords(j0);
    for (int u = 0; u < kRows; ++u) {
      const int r = warp + kWarps * u, i = i0 + r;
      for (int x = 0; x < kPerLane; ++x) {
        const int jc = lane + 32 * x, j = j0 + jc;
        if (i < N && j < N) {
          const float p_c = acc_exp(a.scale * s_f[r * kMmaChunk + jc] - lse_c[u]);
          const Offset o{col_j[x] - col_i[u], row_j[x] - row_i[u]};
          const float p_p = acc_exp(pos_logit(w, o) - plse[u]);
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
    key_coords(j0);
    for (int u = 0; u < kRows; ++u) {
      const int r = warp + kWarps * u, i = i0 + r;
      for (int x = 0; x < kPerLane; ++x) {
        const int jc = lane + 32 * x, j = j0 + jc;
        float ds = 0.0f;
        if (i < N && j < N) {
          const Offset o{col_j[x] - col_i[u], row_j[x] - row_i[u]};
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
    rows = ds + align128(size_t(kMmaChunk) * kBwdBlockN * elem);          // 3 x [64] float: lse, pos_lse, Delta_c;
                                                                          // 2 x [64] int: the queries' row, col
    o = rows + align128(5 * size_t(kMmaChunk) * sizeof(float));           // [16][D] float: dK, then dV
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
  int* qrow_s = reinterpret_cast<int*>(dc_s + kMmaChunk);
  int* qcol_s = qrow_s + kMmaChunk;
  float* o_f = reinterpret_cast<float*>(smem_raw + lay.o);

  const int tid = threadIdx.x, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kBwdBlockN;
  const int64_t bh = int64_t(b) * a.H + h;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *go = hs.go, *k = hs.k, *v = hs.v;
  const float w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const float s = sigmoid(a.gating[h]);

  // The thread's key is the same in every chunk below (e % kBwdBlockN = tid % kBwdBlockN): its grid
  // coordinates once; the queries' are staged with each chunk. No division per element.
  static_assert(kThreads % kBwdBlockN == 0, "a thread keeps its key column across the elementwise loop");
  const int row_j = (j0 + tid % kBwdBlockN) / a.cols, col_j = (j0 + tid % kBwdBlockN) % a.cols;
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
      qrow_s[x] = i / a.cols;
      qcol_s[x] = i % a.cols;
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
        const Offset o{col_j - qcol_s[il], row_j - qrow_s[il]};
        const float p_p = acc_exp(pos_logit(w, o) - plse_s[il]);
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

// ==== Whole-row backward (N <= kWholeRowMaxN): 64 rows per CTA, the positional table ====
// The structure of the rows64 forward (gpsa_fwd_mma.cu): all N keys' (or queries') operand rows in
// shared memory (row stride D + 8), 16 rows per warp with their Q / dO (or K / V) fragments in
// registers, no CTA barrier in the main loops, 2^x with log2(e) folded into the scales, the
// positional logit from the per-head table (no integer division per element), and the weights
// folded into the exponents: (1 - s) P_c = 2^(S scale log2 e - lse log2 e + log2(1 - s)) and
// s P_pos = 2^(tab - pos_lse log2 e + log2 s).
// The probabilities are recomputed three times, as before (dQ pass 1 for Delta, dQ pass 2, dK/dV):
// without the forward's output (not an input of gpsa_bwd) Delta_c = rowsum(P_c dM) needs its own
// pass before any dS, and dQ (a sum over keys) and dK/dV (sums over queries) are each written once
// by one CTA, without atomics.

struct BwdRows64Smem {
  size_t a, g, k, v, scr, tile, tab, kidx, kcol, krow, red, total;
  // a / g: the CTA's own 64 rows (Q, dO in the dQ kernel; K, V in the dK/dV kernel); k / v: all
  // n16 rows of the other side (K, V; or Q, dO). Per-row int/float arrays of n16 entries.
  __host__ __device__ BwdRows64Smem(int n16, int D, size_t elem) {
    const size_t ld = size_t(D) + 8;
    a = 0;
    g = a + align128(kRows64 * ld * elem);
    k = g + align128(kRows64 * ld * elem);
    v = k + align128(n16 * ld * elem);
    scr = v + align128(n16 * ld * elem);                              // kWarps x 2 x [16][kScrLd] float
    tile = scr + 2 * kWarps * align128(16 * kScrLd * sizeof(float));  // kWarps x 2 x [16][kPLd] T
    tab = tile + 2 * kWarps * align128(16 * kPLd * elem);
    kidx = tab + align128(kTabMax * sizeof(float));                   // [n16] int
    kcol = kidx + align128(size_t(n16) * sizeof(float));              // [n16] float
    krow = kcol + align128(size_t(n16) * sizeof(float));              // [n16] float
    red = krow + align128(size_t(n16) * sizeof(float));  // [max(kThreads, n16)] float: sums; Delta_c per query
    total = red + align128(size_t(n16 > kThreads ? n16 : kThreads) * sizeof(float));
  }
};

// acc = A_w B^T over D: A_w's fragments in registers, B = 16 rows of `rows` (row stride ld).
template <typename T, int kSteps>
__device__ __forceinline__ void rows64_tile_dot(AccFrag& acc,
                                                const wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>* af,
                                                const T* rows, int ld, int k_steps) {
  wmma::fill_fragment(acc, 0.0f);
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    if (t < k_steps) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;  // (c, n) = rows[n][16 t + c]
      wmma::load_matrix_sync(bf, rows + 16 * t, ld);
      wmma::mma_sync(acc, af[t], bf, acc);
    }
  }
}

// dQ kernel, pass 1 on one tile: the lane's 8 (P_c dM, P_p dM) products into (dc, dp).
template <bool kMasked>
__device__ __forceinline__ void dq64_tile_delta(const float* s_scr, const float* dm_scr, const float* tab_i,
                                                const int* kidx, int r, int c0, int key0, int N, float sl2,
                                                float off_c, float off_p, float& dc, float& dp) {
  alignas(16) int kk[8];
  *reinterpret_cast<uint4*>(kk) = *reinterpret_cast<const uint4*>(kidx + key0);
  *reinterpret_cast<uint4*>(kk + 4) = *reinterpret_cast<const uint4*>(kidx + key0 + 4);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float p_c = fast_exp2(fmaf(s_scr[r * kScrLd + c0 + c], sl2, off_c));
    float p_p = fast_exp2(tab_i[kk[c]] + off_p);
    if (kMasked && key0 + c >= N) p_c = p_p = 0.0f;
    const float dm = dm_scr[r * kScrLd + c0 + c];
    dc = fmaf(p_c, dm, dc);
    dp = fmaf(p_p, dm, dp);
  }
}

// dQ kernel, pass 2 on one tile: dS = (1 - s) P_c (dM - Delta_c) rounded to T into the tile, and
// dZ = s P_p (dM - Delta_p) times (dx, dy, dx^2 + dy^2) into the lane's dw sums.
template <typename T, bool kMasked>
__device__ __forceinline__ void dq64_tile_ds(const float* s_scr, const float* dm_scr, T* ds_tile, const float* tab_i,
                                             const int* kidx, const float* kcol, const float* krow, int r, int c0,
                                             int key0, int N, float sl2, float off_c, float off_p, float dc, float dp,
                                             float col_i, float row_i, float& dw0, float& dw1, float& dw2) {
  alignas(16) int kk[8];
  alignas(16) float kc[8], kr[8];
  alignas(16) T vals[8];
  *reinterpret_cast<uint4*>(kk) = *reinterpret_cast<const uint4*>(kidx + key0);
  *reinterpret_cast<uint4*>(kk + 4) = *reinterpret_cast<const uint4*>(kidx + key0 + 4);
  *reinterpret_cast<uint4*>(kc) = *reinterpret_cast<const uint4*>(kcol + key0);
  *reinterpret_cast<uint4*>(kc + 4) = *reinterpret_cast<const uint4*>(kcol + key0 + 4);
  *reinterpret_cast<uint4*>(kr) = *reinterpret_cast<const uint4*>(krow + key0);
  *reinterpret_cast<uint4*>(kr + 4) = *reinterpret_cast<const uint4*>(krow + key0 + 4);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float dm = dm_scr[r * kScrLd + c0 + c];
    float ds = fast_exp2(fmaf(s_scr[r * kScrLd + c0 + c], sl2, off_c)) * (dm - dc);
    float dz = fast_exp2(tab_i[kk[c]] + off_p) * (dm - dp);
    if (kMasked && key0 + c >= N) ds = dz = 0.0f;
    const float dx = kc[c] - col_i, dy = kr[c] - row_i;
    dw0 = fmaf(dz, dx, dw0);
    dw1 = fmaf(dz, dy, dw1);
    dw2 = fmaf(dz, fmaf(dx, dx, dy * dy), dw2);
    vals[c] = from_acc<T>(ds);
  }
  *reinterpret_cast<uint4*>(ds_tile + r * kPLd + c0) = *reinterpret_cast<const uint4*>(vals);
}

// dQ kernel: CTA = 64 query rows of one (b, h). Pass 1: Delta_c, Delta_p (written: Delta_c);
// pass 2: dS, dQ += dS K, the dw shares; then the CTA's partial sums in a fixed order.
// Grid: (ceil(N / kRows64), H, B); block: kThreads; dynamic shared memory: BwdRows64Smem::total.
template <typename T, int kSteps>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dq_rows64_kernel(BwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D, ld = D + 8, n16 = ceil_div(N, 16) * 16, k_steps = D / 16;
  const BwdRows64Smem lay(n16, D, sizeof(T));
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.a);
  T* go_t = reinterpret_cast<T*>(smem_raw + lay.g);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  float* tab = reinterpret_cast<float*>(smem_raw + lay.tab);
  int* kidx = reinterpret_cast<int*>(smem_raw + lay.kidx);
  float* kcol = reinterpret_cast<float*>(smem_raw + lay.kcol);
  float* krow = reinterpret_cast<float*>(smem_raw + lay.krow);
  float* red = reinterpret_cast<float*>(smem_raw + lay.red);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, qb = blockIdx.x, i0 = qb * kRows64;
  const int64_t bh = int64_t(b) * a.H + h;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *go = hs.go, *k = hs.k, *v = hs.v;
  const float s = sigmoid(a.gating[h]);
  build_pos_table(tab, a.pos_weight[h * 3 + 0] * kLog2e, a.pos_weight[h * 3 + 1] * kLog2e,
                  a.pos_weight[h * 3 + 2] * kLog2e, a.rows, a.cols);
  for (int j = tid; j < n16; j += kThreads) {
    const bool in = j < N;
    kidx[j] = in ? pos_kidx(j, a.cols) : 0;
    kcol[j] = in ? float(j % a.cols) : 0.0f;
    krow[j] = in ? float(j / a.cols) : 0.0f;
  }
  load_rows_ld(q_t, ld, q, a.qs.n, i0, kRows64, N, D);
  load_rows_ld(go_t, ld, go, a.gos.n, i0, kRows64, N, D);
  load_rows_ld(k_t, ld, k, a.ks.n, 0, n16, N, D);
  load_rows_ld(v_t, ld, v, a.vs.n, 0, n16, N, D);
  __syncthreads();

  const int row0 = i0 + 16 * warp;
  const int r = lane / 2, c0 = (lane % 2) * 8, i = row0 + r;
  float dw0 = 0.0f, dw1 = 0.0f, dw2 = 0.0f, gate_part = 0.0f;
  if (row0 < N) {  // warp-uniform; the warps past N still join the partial sums below
    float* s_scr = reinterpret_cast<float*>(smem_raw + lay.scr + 2 * warp * align128(16 * kScrLd * sizeof(float)));
    float* dm_scr = s_scr + align128(16 * kScrLd * sizeof(float)) / sizeof(float);
    T* ds_tile = reinterpret_cast<T*>(smem_raw + lay.tile + 2 * warp * align128(16 * kPLd * sizeof(T)));
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kSteps], gf[kSteps];
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < k_steps) {
        wmma::load_matrix_sync(qf[t], q_t + 16 * warp * ld + 16 * t, ld);
        wmma::load_matrix_sync(gf[t], go_t + 16 * warp * ld + 16 * t, ld);
      }
    }
    // S and dM tiles of keys j0 .. j0 + 15 into the scratch tiles (see score_tile in gpsa_fwd_mma.cu).
    auto score_tiles = [&](int j0) {
      AccFrag st, dmt;
      rows64_tile_dot<T, kSteps>(st, qf, k_t + j0 * ld, ld, k_steps);
      rows64_tile_dot<T, kSteps>(dmt, gf, v_t + j0 * ld, ld, k_steps);
      __syncwarp();
      wmma::store_matrix_sync(s_scr, st, kScrLd, wmma::mem_row_major);
      wmma::store_matrix_sync(dm_scr, dmt, kScrLd, wmma::mem_row_major);
      __syncwarp();
    };
    const int ic = i < N ? i : N - 1;  // rows past N: any valid geometry, never written
    const float* tab_i = tab + pos_base(ic, a.rows, a.cols);
    const float sl2 = a.scale * kLog2e;
    const float lse2 = a.lse[bh * N + ic] * kLog2e, plse2 = a.pos_lse[int64_t(h) * N + ic] * kLog2e;

    // Pass 1: Delta_c, Delta_p (the unweighted probabilities)
    float dc = 0.0f, dp = 0.0f;
    for (int j0 = 0; j0 < n16; j0 += 16) {
      score_tiles(j0);
      if (j0 + 16 <= N) dq64_tile_delta<false>(s_scr, dm_scr, tab_i, kidx, r, c0, j0 + c0, N, sl2, -lse2, -plse2, dc, dp);
      else dq64_tile_delta<true>(s_scr, dm_scr, tab_i, kidx, r, c0, j0 + c0, N, sl2, -lse2, -plse2, dc, dp);
    }
    dc += __shfl_xor_sync(0xffffffffu, dc, 1);  // the two lanes of row r, fixed order
    dp += __shfl_xor_sync(0xffffffffu, dp, 1);
    if (c0 == 0 && i < N) {
      a.delta_c[bh * N + i] = dc;
      gate_part = dp - dc;
    }

    // Pass 2: dS, dQ, the dw shares (weights folded into the exponents)
    const float off_c = log2f(1.0f - s) - lse2, off_p = log2f(s) - plse2;
    const float col_i = float(ic % a.cols), row_i = float(ic / a.cols);
    AccFrag dq_acc[kSteps];
#pragma unroll
    for (int t = 0; t < kSteps; ++t) wmma::fill_fragment(dq_acc[t], 0.0f);
    for (int j0 = 0; j0 < n16; j0 += 16) {
      score_tiles(j0);
      if (j0 + 16 <= N)
        dq64_tile_ds<T, false>(s_scr, dm_scr, ds_tile, tab_i, kidx, kcol, krow, r, c0, j0 + c0, N, sl2, off_c, off_p,
                               dc, dp, col_i, row_i, dw0, dw1, dw2);
      else
        dq64_tile_ds<T, true>(s_scr, dm_scr, ds_tile, tab_i, kidx, kcol, krow, r, c0, j0 + c0, N, sl2, off_c, off_p,
                              dc, dp, col_i, row_i, dw0, dw1, dw2);
      __syncwarp();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> dsf;  // dS[r][j0 + c]
      wmma::load_matrix_sync(dsf, ds_tile, kPLd);
#pragma unroll
      for (int t = 0; t < kSteps; ++t) {
        if (t < k_steps) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> kf;  // K[j0 + c][16 t + n]
          wmma::load_matrix_sync(kf, k_t + j0 * ld + 16 * t, ld);
          wmma::mma_sync(dq_acc[t], dsf, kf, dq_acc[t]);
        }
      }
    }
    if (i >= N) dw0 = dw1 = dw2 = 0.0f;  // rows past N: their dZ is not part of the gradient
    T* dq = a.dq + b * a.dqs.b + h * a.dqs.h;
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < k_steps) {
        __syncwarp();
        wmma::store_matrix_sync(s_scr, dq_acc[t], kScrLd, wmma::mem_row_major);
        __syncwarp();
        if (i < N)
          for (int c = 0; c < 8; ++c)
            dq[int64_t(i) * a.dqs.n + 16 * t + c0 + c] = from_acc<T>(a.scale * s_scr[r * kScrLd + c0 + c]);
      }
    }
  }

  // This CTA's partial sums, reduced in a fixed order.
  const float sums[kPartials] = {block_sum(dw0, red), block_sum(dw1, red), block_sum(dw2, red),
                                 block_sum(gate_part, red)};
  if (tid == 0) {
    const int64_t num_partials = int64_t(a.B) * gridDim.x;
    float* out = a.partials + (int64_t(h) * num_partials + int64_t(b) * gridDim.x + qb) * kPartials;
    for (int c = 0; c < kPartials; ++c) out[c] = sums[c];
  }
#else
  __trap();  // launched only on sm_80+ (see bwd_typed)
#endif
}

// dK/dV kernel, one tile of [key][query]: M^T and dS^T rounded to T into the two tiles. The
// per-query offsets carry the weights and -inf for queries past N (their terms vanish).
template <typename T>
__device__ __forceinline__ void dkdv64_tile(const float* s_scr, const float* dm_scr, T* m_tile, T* ds_tile,
                                            const float* tab_j, const int* qbase, const float* qoff_c,
                                            const float* qoff_p, const float* qdc, int r, int c0, int q0,
                                            float sl2) {
  alignas(16) int qb[8];
  alignas(16) float oc[8], op[8], dcv[8];
  alignas(16) T mv[8], dsv[8];
  *reinterpret_cast<uint4*>(qb) = *reinterpret_cast<const uint4*>(qbase + q0);
  *reinterpret_cast<uint4*>(qb + 4) = *reinterpret_cast<const uint4*>(qbase + q0 + 4);
  *reinterpret_cast<uint4*>(oc) = *reinterpret_cast<const uint4*>(qoff_c + q0);
  *reinterpret_cast<uint4*>(oc + 4) = *reinterpret_cast<const uint4*>(qoff_c + q0 + 4);
  *reinterpret_cast<uint4*>(op) = *reinterpret_cast<const uint4*>(qoff_p + q0);
  *reinterpret_cast<uint4*>(op + 4) = *reinterpret_cast<const uint4*>(qoff_p + q0 + 4);
  *reinterpret_cast<uint4*>(dcv) = *reinterpret_cast<const uint4*>(qdc + q0);
  *reinterpret_cast<uint4*>(dcv + 4) = *reinterpret_cast<const uint4*>(qdc + q0 + 4);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float pc = fast_exp2(fmaf(s_scr[r * kScrLd + c0 + c], sl2, oc[c]));  // (1 - s) P_c
    const float pp = fast_exp2(tab_j[qb[c]] + op[c]);                          // s P_pos
    mv[c] = from_acc<T>(pc + pp);
    dsv[c] = from_acc<T>(pc * (dm_scr[r * kScrLd + c0 + c] - dcv[c]));
  }
  *reinterpret_cast<uint4*>(m_tile + r * kPLd + c0) = *reinterpret_cast<const uint4*>(mv);
  *reinterpret_cast<uint4*>(ds_tile + r * kPLd + c0) = *reinterpret_cast<const uint4*>(dsv);
}

// dK/dV kernel: CTA = 64 keys of one (b, h), warp w the keys 16 w .. 16 w + 15, all queries' Q and
// dO rows in shared memory. Per 16-query tile: S^T = K Q^T, dM^T = V dO^T, then M^T and dS^T,
// dV += M^T dO, dK += dS^T Q. Reads Delta_c (the dQ kernel's).
// Grid: (ceil(N / kRows64), H, B); block: kThreads; dynamic shared memory: BwdRows64Smem::total.
template <typename T, int kSteps>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_dkdv_rows64_kernel(BwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D, ld = D + 8, n16 = ceil_div(N, 16) * 16, k_steps = D / 16;
  const BwdRows64Smem lay(n16, D, sizeof(T));
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.a);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.g);
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* go_t = reinterpret_cast<T*>(smem_raw + lay.v);
  float* tab = reinterpret_cast<float*>(smem_raw + lay.tab);
  int* qbase = reinterpret_cast<int*>(smem_raw + lay.kidx);
  float* qoff_c = reinterpret_cast<float*>(smem_raw + lay.kcol);
  float* qoff_p = reinterpret_cast<float*>(smem_raw + lay.krow);
  float* qdc = reinterpret_cast<float*>(smem_raw + lay.red);  // [n16]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kRows64;
  const int64_t bh = int64_t(b) * a.H + h;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *go = hs.go, *k = hs.k, *v = hs.v;
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
  load_rows_ld(k_t, ld, k, a.ks.n, j0, kRows64, N, D);
  load_rows_ld(v_t, ld, v, a.vs.n, j0, kRows64, N, D);
  load_rows_ld(q_t, ld, q, a.qs.n, 0, n16, N, D);
  load_rows_ld(go_t, ld, go, a.gos.n, 0, n16, N, D);
  __syncthreads();
  const int key0 = j0 + 16 * warp;
  if (key0 >= N) return;  // warp-uniform; no CTA barrier follows

  float* s_scr = reinterpret_cast<float*>(smem_raw + lay.scr + 2 * warp * align128(16 * kScrLd * sizeof(float)));
  float* dm_scr = s_scr + align128(16 * kScrLd * sizeof(float)) / sizeof(float);
  T* m_tile = reinterpret_cast<T*>(smem_raw + lay.tile + 2 * warp * align128(16 * kPLd * sizeof(T)));
  T* ds_tile = m_tile + align128(16 * kPLd * sizeof(T)) / sizeof(T);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> kf[kSteps], vf[kSteps];
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    if (t < k_steps) {
      wmma::load_matrix_sync(kf[t], k_t + 16 * warp * ld + 16 * t, ld);
      wmma::load_matrix_sync(vf[t], v_t + 16 * warp * ld + 16 * t, ld);
    }
  }
  const int r = lane / 2, c0 = (lane % 2) * 8, j = key0 + r;
  const int jc = j < N ? j : N - 1;  // keys past N: any valid geometry, never written
  const float* tab_j = tab + pos_kidx(jc, a.cols);
  const float sl2 = a.scale * kLog2e;
  AccFrag dk_acc[kSteps], dv_acc[kSteps];
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    wmma::fill_fragment(dk_acc[t], 0.0f);
    wmma::fill_fragment(dv_acc[t], 0.0f);
  }
  for (int i0 = 0; i0 < n16; i0 += 16) {
    AccFrag st, dmt;
    rows64_tile_dot<T, kSteps>(st, kf, q_t + i0 * ld, ld, k_steps);    // S^T[key][query]
    rows64_tile_dot<T, kSteps>(dmt, vf, go_t + i0 * ld, ld, k_steps);  // dM^T[key][query]
    __syncwarp();  // the previous tile's reads (scratch and the M / dS tiles' MMAs) are done
    wmma::store_matrix_sync(s_scr, st, kScrLd, wmma::mem_row_major);
    wmma::store_matrix_sync(dm_scr, dmt, kScrLd, wmma::mem_row_major);
    __syncwarp();
    dkdv64_tile(s_scr, dm_scr, m_tile, ds_tile, tab_j, qbase, qoff_c, qoff_p, qdc, r, c0, i0 + c0, sl2);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> mf, dsf;  // [key][i0 + c]
    wmma::load_matrix_sync(mf, m_tile, kPLd);
    wmma::load_matrix_sync(dsf, ds_tile, kPLd);
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < k_steps) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> gb, qbf;  // rows i0 + c, cols 16 t + n
        wmma::load_matrix_sync(gb, go_t + i0 * ld + 16 * t, ld);
        wmma::load_matrix_sync(qbf, q_t + i0 * ld + 16 * t, ld);
        wmma::mma_sync(dv_acc[t], mf, gb, dv_acc[t]);
        wmma::mma_sync(dk_acc[t], dsf, qbf, dk_acc[t]);
      }
    }
  }
  T* dkp = a.dk + b * a.dks.b + h * a.dks.h;
  T* dvp = a.dv + b * a.dvs.b + h * a.dvs.h;
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    if (t < k_steps) {
      __syncwarp();
      wmma::store_matrix_sync(s_scr, dk_acc[t], kScrLd, wmma::mem_row_major);
      wmma::store_matrix_sync(dm_scr, dv_acc[t], kScrLd, wmma::mem_row_major);
      __syncwarp();
      if (j < N) {
        for (int c = 0; c < 8; ++c) {
          dkp[int64_t(j) * a.dks.n + 16 * t + c0 + c] = from_acc<T>(a.scale * s_scr[r * kScrLd + c0 + c]);
          dvp[int64_t(j) * a.dvs.n + 16 * t + c0 + c] = from_acc<T>(dm_scr[r * kScrLd + c0 + c]);
        }
      }
    }
  }
#else
  __trap();  // launched only on sm_80+ (see bwd_typed)
#endif
}

bool bwd_mma_takes_rows64(int N, int D, size_t elem) {
  return N <= kWholeRowMaxN && BwdRows64Smem(ceil_div(N, 16) * 16, D, elem).total <= device_max_smem_optin();
}

template <typename T>
cudaError_t bwd_mma_launch(const BwdArgs<T>& a, cudaStream_t stream) {
  if (bwd_mma_takes_rows64(a.N, a.D, sizeof(T))) {  // whole-row; the dK/dV kernel reads the dQ kernel's Delta_c
    const dim3 grid(ceil_div(a.N, kRows64), a.H, a.B);
    const size_t smem = BwdRows64Smem(ceil_div(a.N, 16) * 16, a.D, sizeof(T)).total;
    cudaError_t err = a.D <= 64 ? launch_with_smem(gpsa_bwd_dq_rows64_kernel<T, 4>, grid, smem, stream, a)
                                : launch_with_smem(gpsa_bwd_dq_rows64_kernel<T, 8>, grid, smem, stream, a);
    if (err != cudaSuccess) return err;
    if (bwd_dkdv_mma_sync_takes(a.N, a.D)) return bwd_dkdv_mma_sync_launch<T>(a, stream);  // mma.sync path
    return a.D <= 64 ? launch_with_smem(gpsa_bwd_dkdv_rows64_kernel<T, 4>, grid, smem, stream, a)
                     : launch_with_smem(gpsa_bwd_dkdv_rows64_kernel<T, 8>, grid, smem, stream, a);
  }
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
