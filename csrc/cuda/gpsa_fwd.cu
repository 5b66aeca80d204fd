// GPSA forward on CUDA: the positional softmax statistics, the whole-row kernel (N <= 256) and
// the tiled online-softmax kernel (N > 256). No torch header: see gpsa_cuda.h for the contract.
//
// Per (b, h) and query row i, with s = sigmoid(gating[h]) and z_ij = w_h . (dx, dy, dx^2 + dy^2):
//   out_i = sum_j ((1 - s) softmax_j(scale q_i . k_j) + s softmax_j(z_ij)) v_j
//   lse_i = logsumexp_j(scale q_i . k_j)
#include "gpsa_common.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

constexpr int kKeyChunk = 32;  // keys staged in shared memory at a time (one per lane)
constexpr int kRowsPerWarp = kBlockM / kWarps;                   // 4
constexpr int kOutPerThread = kBlockM * kMaxHeadDim / kThreads;  // 16 (r, d) outputs per thread at most

static_assert(kKeyChunk == 32, "a score tile row is one warp wide");
static_assert(kBlockM % kWarps == 0, "rows are dealt to warps evenly");

// One warp per (h, query row i): pos_lse[h, i] = logsumexp_j z_ij, two passes over the keys.
// Grid: (ceil(N / kWarps), H); block: kThreads.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) gpsa_pos_lse_kernel(const Acc* __restrict__ pos_weight, int N, int cols,
                                                                Acc* __restrict__ pos_lse) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int h = blockIdx.y;
  const int i = blockIdx.x * kWarps + warp;
  if (i >= N) return;  // warp-uniform: no shuffle below is left half-populated
  const Acc w[3] = {pos_weight[h * 3 + 0], pos_weight[h * 3 + 1], pos_weight[h * 3 + 2]};
  Acc m = neg_inf<Acc>();
  for (int j = lane; j < N; j += 32) m = fmax(m, pos_logit(w, grid_offset(i, j, cols)));
  m = warp_max(m);  // finite: key j = 0 exists
  Acc l = Acc(0);
  for (int j = lane; j < N; j += 32) l += acc_exp(pos_logit(w, grid_offset(i, j, cols)) - m);
  l = warp_sum(l);
  if (lane == 0) pos_lse[int64_t(h) * N + i] = m + acc_log(l);
}

// Whole-row forward: one CTA holds the scores of its kBlockM query rows against all N keys.
// 1. S = scale Q K^T into shared memory, K staged in chunks of 32 keys;
// 2. per row (one warp per row), the exact content softmax and the positional softmax (from
//    pos_lse), mixed in place: S[r, j] <- (1 - s) P_c + s P_pos;
// 3. out = S @ V, V staged in chunks; each thread owns up to kOutPerThread (row, d) outputs.
// Grid: (ceil(N / kBlockM), H, B); block: kThreads; dynamic shared memory: wholerow_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_wholerow_kernel(FwdArgs<T> a) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int N = a.N, D = a.D, ldkv = D + 1;  // +1 pad: lanes read different keys' rows conflict-free
  const int n_pad = ceil_div(N, kKeyChunk) * kKeyChunk;
  Acc* q_s = reinterpret_cast<Acc*>(smem_raw);  // [kBlockM][D]
  Acc* kv_s = q_s + kBlockM * D;                // [kKeyChunk][D + 1], K then V
  Acc* p_s = kv_s + kKeyChunk * ldkv;           // [kBlockM][n_pad], scores then mixed probabilities

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBlockM;
  const T* q = a.q + b * a.qs.b + h * a.qs.h;
  const T* k = a.k + b * a.ks.b + h * a.ks.h;
  const T* v = a.v + b * a.vs.b + h * a.vs.h;
  const Acc w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const Acc s = sigmoid(a.gating[h]);

  load_rows(q_s, D, q, a.qs.n, i0, kBlockM, N, D);  // rows past N are zeros: finite, never written

  // 1. content scores; tile entry (r, j0 + lane) belongs to warp r % kWarps
  for (int j0 = 0; j0 < n_pad; j0 += kKeyChunk) {
    __syncthreads();  // kv_s is free (and q_s loaded)
    load_rows(kv_s, ldkv, k, a.ks.n, j0, kKeyChunk, N, D);
    __syncthreads();
    for (int u = 0; u < kRowsPerWarp; ++u) {
      const int r = warp + kWarps * u, j = j0 + lane;
      p_s[r * n_pad + j] = j < N ? a.scale * dot_rows(q_s + r * D, kv_s + lane * ldkv, D) : neg_inf<Acc>();
    }
  }
  __syncthreads();

  // 2. both softmaxes, exact, and the mix; the same warp owns the row as in step 1
  for (int u = 0; u < kRowsPerWarp; ++u) {
    const int r = warp + kWarps * u, i = i0 + r;
    Acc* row = p_s + r * n_pad;
    Acc m = neg_inf<Acc>();
    for (int j = lane; j < n_pad; j += 32) m = fmax(m, row[j]);
    m = warp_max(m);  // finite: key 0 is valid
    Acc l = Acc(0);
    for (int j = lane; j < n_pad; j += 32) l += acc_exp(row[j] - m);  // exp(-inf) = 0 for padding
    l = warp_sum(l);
    const Acc inv_l = Acc(1) / l;
    const Acc plse = i < N ? a.pos_lse[int64_t(h) * N + i] : Acc(0);
    for (int j = lane; j < n_pad; j += 32) {
      Acc mix = Acc(0);
      if (i < N && j < N) {
        const Acc p_c = acc_exp(row[j] - m) * inv_l;
        const Acc p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse);
        mix = (Acc(1) - s) * p_c + s * p_p;
      }
      row[j] = mix;
    }
    if (lane == 0 && i < N) a.lse[(int64_t(b) * a.H + h) * N + i] = m + acc_log(l);
  }

  // 3. out = mixed probabilities @ V
  Acc acc[kOutPerThread];
#pragma unroll
  for (int u = 0; u < kOutPerThread; ++u) acc[u] = Acc(0);
  for (int j0 = 0; j0 < n_pad; j0 += kKeyChunk) {
    __syncthreads();  // step 2 done / previous V chunk consumed
    load_rows(kv_s, ldkv, v, a.vs.n, j0, kKeyChunk, N, D);  // keys past N: zeros (their weights are 0 too)
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kOutPerThread; ++u) {
      const int e = tid + kThreads * u;
      if (e < kBlockM * D) {
        const int r = e / D, d = e % D;
        const Acc* prow = p_s + r * n_pad + j0;
        Acc x = acc[u];
        for (int jj = 0; jj < kKeyChunk; ++jj) x = fma(prow[jj], kv_s[jj * ldkv + d], x);
        acc[u] = x;
      }
    }
  }
  T* out = a.out + b * a.os.b + h * a.os.h;
#pragma unroll
  for (int u = 0; u < kOutPerThread; ++u) {
    const int e = tid + kThreads * u;
    if (e < kBlockM * D) {
      const int r = e / D, d = e % D, i = i0 + r;
      if (i < N) out[int64_t(i) * a.os.n + d] = from_acc<T>(acc[u]);
    }
  }
}

// Tiled forward for any N: the content branch by online softmax over chunks of 32 keys (running
// row max m and sum l, the accumulator rescaled when m grows), the positional branch already
// normalised (pos_lse), accumulated apart; out = (1 - s) acc_c / l + s acc_p at the end.
// Grid: (ceil(N / kBlockM), H, B); block: kThreads; dynamic shared memory: tiled_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_tiled_kernel(FwdArgs<T> a) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int N = a.N, D = a.D, ldkv = D + 1;
  Acc* q_s = reinterpret_cast<Acc*>(smem_raw);  // [kBlockM][D]
  Acc* k_s = q_s + kBlockM * D;                 // [kKeyChunk][D + 1]
  Acc* v_s = k_s + kKeyChunk * ldkv;            // [kKeyChunk][D + 1]
  Acc* pc_s = v_s + kKeyChunk * ldkv;           // [kBlockM][kKeyChunk] exp(S - m_new)
  Acc* pp_s = pc_s + kBlockM * kKeyChunk;       // [kBlockM][kKeyChunk] positional probabilities
  Acc* alpha_s = pp_s + kBlockM * kKeyChunk;    // [kBlockM] rescale of this chunk; then 1 / l
  Acc* m_s = alpha_s + kBlockM;                 // [kBlockM] final row max

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBlockM;
  const T* q = a.q + b * a.qs.b + h * a.qs.h;
  const T* k = a.k + b * a.ks.b + h * a.ks.h;
  const T* v = a.v + b * a.vs.b + h * a.vs.h;
  const Acc w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const Acc s = sigmoid(a.gating[h]);

  // Row state, held (identically) by every lane of the warp that owns row r = warp + kWarps * u.
  Acc m_run[kRowsPerWarp], l_run[kRowsPerWarp], plse[kRowsPerWarp];
#pragma unroll
  for (int u = 0; u < kRowsPerWarp; ++u) {
    const int i = i0 + warp + kWarps * u;
    m_run[u] = neg_inf<Acc>();
    l_run[u] = Acc(0);
    plse[u] = i < N ? a.pos_lse[int64_t(h) * N + i] : Acc(0);
  }
  Acc acc_c[kOutPerThread], acc_p[kOutPerThread];
#pragma unroll
  for (int u = 0; u < kOutPerThread; ++u) acc_c[u] = acc_p[u] = Acc(0);

  load_rows(q_s, D, q, a.qs.n, i0, kBlockM, N, D);
  for (int j0 = 0; j0 < N; j0 += kKeyChunk) {
    __syncthreads();  // previous chunk consumed
    load_rows(k_s, ldkv, k, a.ks.n, j0, kKeyChunk, N, D);
    load_rows(v_s, ldkv, v, a.vs.n, j0, kKeyChunk, N, D);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) {
      const int r = warp + kWarps * u, i = i0 + r, j = j0 + lane;
      const Acc sv = j < N ? a.scale * dot_rows(q_s + r * D, k_s + lane * ldkv, D) : neg_inf<Acc>();
      const Acc m_new = fmax(m_run[u], warp_max(sv));  // finite: key j0 < N is valid
      const Acc p = acc_exp(sv - m_new);
      const Acc alpha = acc_exp(m_run[u] - m_new);  // 0 on the first chunk (m_run = -inf)
      l_run[u] = l_run[u] * alpha + warp_sum(p);
      m_run[u] = m_new;
      pc_s[r * kKeyChunk + lane] = p;
      pp_s[r * kKeyChunk + lane] =
          (i < N && j < N) ? acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse[u]) : Acc(0);
      if (lane == 0) alpha_s[r] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kOutPerThread; ++u) {
      const int e = tid + kThreads * u;
      if (e < kBlockM * D) {
        const int r = e / D, d = e % D;
        Acc xc = acc_c[u] * alpha_s[r], xp = acc_p[u];
        for (int jj = 0; jj < kKeyChunk; ++jj) {
          const Acc vv = v_s[jj * ldkv + d];
          xc = fma(pc_s[r * kKeyChunk + jj], vv, xc);
          xp = fma(pp_s[r * kKeyChunk + jj], vv, xp);
        }
        acc_c[u] = xc;
        acc_p[u] = xp;
      }
    }
  }
  __syncthreads();  // alpha_s is read above; reuse it for 1 / l
#pragma unroll
  for (int u = 0; u < kRowsPerWarp; ++u) {
    const int r = warp + kWarps * u, i = i0 + r;
    if (lane == 0) {
      alpha_s[r] = Acc(1) / l_run[u];
      m_s[r] = m_run[u];
      if (i < N) a.lse[(int64_t(b) * a.H + h) * N + i] = m_run[u] + acc_log(l_run[u]);
    }
  }
  __syncthreads();
  T* out = a.out + b * a.os.b + h * a.os.h;
#pragma unroll
  for (int u = 0; u < kOutPerThread; ++u) {
    const int e = tid + kThreads * u;
    if (e < kBlockM * D) {
      const int r = e / D, d = e % D, i = i0 + r;
      if (i < N) out[int64_t(i) * a.os.n + d] = from_acc<T>((Acc(1) - s) * acc_c[u] * alpha_s[r] + s * acc_p[u]);
    }
  }
}

// Whole-row forward on tensor cores, for fp16/bf16 with D % 16 == 0 (sm_80+): the structure of
// gpsa_fwd_wholerow_kernel with both matmuls as WMMA m16n16k16 (fp32 accumulation), so D = 48 is
// three 16-wide k steps, no padding to 64. Q, K, V and the mixed probabilities live in shared
// memory in T (the probabilities rounded to T once, as flash attention rounds P), scores and the
// output tile in fp32.
// 1. S (16 x n_pad, fp32) = Q K^T: keys in chunks of 64, warp w computes the 16 x 16 tile of keys
//    j0 + 16 w .. j0 + 16 w + 15 over D / 16 k steps;
// 2. one warp per row (as before): scale, mask, both softmaxes, the mix, rounded to T into p_t;
// 3. out (16 x D) = P V: output tile t (columns 16 t .. 16 t + 15) belongs to warp t % 4, which
//    accumulates it over all keys, 16 per k step.
// Grid: (ceil(N / kBlockM), H, B); block: kThreads; dynamic shared memory: mma_smem_layout().total.
constexpr int kMmaKeyChunk = 64;                     // keys per staged K / V chunk: 16 per warp
constexpr int kMmaMaxOutTiles = kMaxHeadDim / 16 / kWarps;  // output tiles per warp at D = 128: 2
static_assert(kBlockM == 16, "one WMMA tile covers the CTA's query rows");
static_assert(kMmaKeyChunk == 16 * kWarps, "one 16-key tile per warp in step 1");
static_assert(kMmaMaxOutTiles * 16 * kWarps == kMaxHeadDim, "output tiles cover D = 128");

// Shared-memory carve-up of the MMA kernel; every region starts on a 128-byte boundary (WMMA needs
// 32-byte aligned tile pointers).
struct MmaSmem {
  size_t q, kv, s, p, o, total;
};
__host__ __device__ inline MmaSmem mma_smem_layout(int n_pad, int D, size_t elem) {
  MmaSmem m;
  m.q = 0;                                                        // [kBlockM][D] T
  m.kv = m.q + align128(size_t(kBlockM) * D * elem);              // [kMmaKeyChunk][D] T
  m.s = m.kv + align128(size_t(kMmaKeyChunk) * D * elem);         // [kBlockM][n_pad] float
  m.p = m.s + align128(size_t(kBlockM) * n_pad * sizeof(float));  // [kBlockM][n_pad] T
  m.o = m.p + align128(size_t(kBlockM) * n_pad * elem);           // [kBlockM][D] float
  m.total = m.o + align128(size_t(kBlockM) * D * sizeof(float));
  return m;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_wholerow_mma_kernel(FwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D;
  const int n_pad = ceil_div(N, kMmaKeyChunk) * kMmaKeyChunk;
  const MmaSmem lay = mma_smem_layout(n_pad, D, sizeof(T));
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* kv_t = reinterpret_cast<T*>(smem_raw + lay.kv);
  float* s_f = reinterpret_cast<float*>(smem_raw + lay.s);
  T* p_t = reinterpret_cast<T*>(smem_raw + lay.p);
  float* o_f = reinterpret_cast<float*>(smem_raw + lay.o);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBlockM;
  const T* q = a.q + b * a.qs.b + h * a.qs.h;
  const T* k = a.k + b * a.ks.b + h * a.ks.h;
  const T* v = a.v + b * a.vs.b + h * a.vs.h;
  const float w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const float s = sigmoid(a.gating[h]);
  const int k_steps = D / 16;

  load_rows_raw(q_t, q, a.qs.n, i0, kBlockM, N, D);  // rows past N are zeros: finite, never written

  // 1. raw scores Q K^T (scale and mask come in step 2)
  for (int j0 = 0; j0 < n_pad; j0 += kMmaKeyChunk) {
    __syncthreads();  // kv_t is free (and q_t loaded)
    load_rows_raw(kv_t, k, a.ks.n, j0, kMmaKeyChunk, N, D);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < k_steps; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa;  // Q[r][16 kk + c]
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;  // K^T: (c, n) = K[16 w + n][16 kk + c]
      wmma::load_matrix_sync(qa, q_t + 16 * kk, D);
      wmma::load_matrix_sync(kb, kv_t + 16 * warp * D + 16 * kk, D);
      wmma::mma_sync(acc, qa, kb, acc);
    }
    wmma::store_matrix_sync(s_f + j0 + 16 * warp, acc, n_pad, wmma::mem_row_major);
  }
  __syncthreads();

  // 2. per row: both softmaxes, exact, mixed; rounded to T once
  for (int u = 0; u < kRowsPerWarp; ++u) {
    const int r = warp + kWarps * u, i = i0 + r;
    const float* row = s_f + r * n_pad;
    float m = neg_inf<float>();
    for (int j = lane; j < N; j += 32) m = fmax(m, a.scale * row[j]);
    m = warp_max(m);  // finite: key 0 is valid
    float l = 0.0f;
    for (int j = lane; j < N; j += 32) l += acc_exp(a.scale * row[j] - m);
    l = warp_sum(l);
    const float inv_l = 1.0f / l;
    const float plse = i < N ? a.pos_lse[int64_t(h) * N + i] : 0.0f;
    for (int j = lane; j < n_pad; j += 32) {
      float mix = 0.0f;
      if (i < N && j < N) {
        const float p_c = acc_exp(a.scale * row[j] - m) * inv_l;
        const float p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse);
        mix = (1.0f - s) * p_c + s * p_p;
      }
      p_t[r * n_pad + j] = from_acc<T>(mix);
    }
    if (lane == 0 && i < N) a.lse[(int64_t(b) * a.H + h) * N + i] = m + acc_log(l);
  }

  // 3. out = P V; output tile t = warp + kWarps * slot
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> out_acc[kMmaMaxOutTiles];
  for (int slot = 0; slot < kMmaMaxOutTiles; ++slot) wmma::fill_fragment(out_acc[slot], 0.0f);
  for (int j0 = 0; j0 < n_pad; j0 += kMmaKeyChunk) {
    __syncthreads();  // step 2 done / previous V chunk consumed
    load_rows_raw(kv_t, v, a.vs.n, j0, kMmaKeyChunk, N, D);  // keys past N: zeros (their weights are 0 too)
    __syncthreads();
    for (int slot = 0; slot < kMmaMaxOutTiles; ++slot) {
      const int t = warp + kWarps * slot;
      if (t >= k_steps) break;  // warp-uniform
      for (int kk = 0; kk < kMmaKeyChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;  // P[r][j0 + 16 kk + c]
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;  // V[j0 + 16 kk + c][16 t + n]
        wmma::load_matrix_sync(pa, p_t + j0 + 16 * kk, n_pad);
        wmma::load_matrix_sync(vb, kv_t + 16 * kk * D + 16 * t, D);
        wmma::mma_sync(out_acc[slot], pa, vb, out_acc[slot]);
      }
    }
  }
  for (int slot = 0; slot < kMmaMaxOutTiles; ++slot) {
    const int t = warp + kWarps * slot;
    if (t < k_steps) wmma::store_matrix_sync(o_f + 16 * t, out_acc[slot], D, wmma::mem_row_major);
  }
  __syncthreads();
  T* out = a.out + b * a.os.b + h * a.os.h;
  for (int e = tid; e < kBlockM * D; e += kThreads) {
    const int r = e / D, d = e % D, i = i0 + r;
    if (i < N) out[int64_t(i) * a.os.n + d] = from_acc<T>(o_f[r * D + d]);
  }
#else
  __trap();  // launched only on sm_80+ (see fwd_typed)
#endif
}

template <typename Acc>
size_t wholerow_smem_bytes(int N, int D) {
  const int n_pad = ceil_div(N, kKeyChunk) * kKeyChunk;
  return sizeof(Acc) * (size_t(kBlockM) * D + size_t(kKeyChunk) * (D + 1) + size_t(kBlockM) * n_pad);
}

template <typename Acc>
size_t tiled_smem_bytes(int D) {
  return sizeof(Acc) * (size_t(kBlockM) * D + 2 * size_t(kKeyChunk) * (D + 1) + 2 * size_t(kBlockM) * kKeyChunk +
                        2 * size_t(kBlockM));
}

template <typename T>
cudaError_t fwd_typed(const GpsaFwdParams& p, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const GpsaDtype acc_dtype = sizeof(Acc) == 8 ? GpsaDtype::kFloat64 : GpsaDtype::kFloat32;
  cudaError_t err = gpsa_pos_lse_launch(acc_dtype, p.pos_weight, p.H, p.N, p.rows, p.cols, p.pos_lse, stream);
  if (err != cudaSuccess) return err;
  FwdArgs<T> a;
  a.q = static_cast<const T*>(p.q); a.qs = p.q_stride;
  a.k = static_cast<const T*>(p.k); a.ks = p.k_stride;
  a.v = static_cast<const T*>(p.v); a.vs = p.v_stride;
  a.pos_weight = static_cast<const Acc*>(p.pos_weight);
  a.gating = static_cast<const Acc*>(p.gating);
  a.out = static_cast<T*>(p.out); a.os = p.out_stride;
  a.lse = static_cast<Acc*>(p.lse);
  a.pos_lse = static_cast<const Acc*>(p.pos_lse);
  a.B = p.B; a.H = p.H; a.N = p.N; a.D = p.D; a.rows = p.rows; a.cols = p.cols;
  a.scale = Acc(p.scale);
  const dim3 grid(ceil_div(p.N, kBlockM), p.H, p.B);
  if constexpr (sizeof(T) == 2) {  // WMMA takes fp16 / bf16 operands only
    if (p.D % 16 == 0 && device_is_sm80_or_newer()) {
      if (p.N <= kWholeRowMaxN)
        return launch_with_smem(gpsa_fwd_wholerow_mma_kernel<T>, grid,
                                mma_smem_layout(ceil_div(p.N, kMmaKeyChunk) * kMmaKeyChunk, p.D, sizeof(T)).total,
                                stream, a);
      return fwd_tiled_mma_launch<T>(a, grid, stream);
    }
  }
  if (p.N <= kWholeRowMaxN)
    return launch_with_smem(gpsa_fwd_wholerow_kernel<T>, grid, wholerow_smem_bytes<Acc>(p.N, p.D), stream, a);
  return launch_with_smem(gpsa_fwd_tiled_kernel<T>, grid, tiled_smem_bytes<Acc>(p.D), stream, a);
}

}  // namespace detail

const char* gpsa_check_sizes(int B, int H, int N, int D, int rows, int cols) {
  if (B < 0 || H < 1 || N < 1 || D < 1) return "gpsa cuda: need B >= 0 and H, N, D >= 1";
  if (D > kMaxHeadDim) return "gpsa cuda: head dim D must be <= 128";
  if (rows < 1 || cols < 1 || int64_t(rows) * cols != N) return "gpsa cuda: rows * cols must equal N";
  if (H > 65535 || B > 65535) return "gpsa cuda: B and H must each be <= 65535 (CUDA grid limits)";
  return nullptr;
}

cudaError_t gpsa_pos_lse_launch(GpsaDtype dtype, const void* pos_weight, int H, int N, int rows, int cols,
                                void* pos_lse, cudaStream_t stream) {
  (void)rows;  // the grid geometry needs only cols (row-major patches)
  const dim3 grid(detail::ceil_div(N, detail::kWarps), H);
  if (dtype == GpsaDtype::kFloat64)
    detail::gpsa_pos_lse_kernel<double><<<grid, detail::kThreads, 0, stream>>>(
        static_cast<const double*>(pos_weight), N, cols, static_cast<double*>(pos_lse));
  else
    detail::gpsa_pos_lse_kernel<float><<<grid, detail::kThreads, 0, stream>>>(
        static_cast<const float*>(pos_weight), N, cols, static_cast<float*>(pos_lse));
  return cudaGetLastError();
}

cudaError_t gpsa_fwd_launch(const GpsaFwdParams& p, cudaStream_t stream) {
  if (gpsa_check_sizes(p.B, p.H, p.N, p.D, p.rows, p.cols) != nullptr) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  switch (p.dtype) {
    case GpsaDtype::kFloat32: return detail::fwd_typed<float>(p, stream);
    case GpsaDtype::kFloat16: return detail::fwd_typed<__half>(p, stream);
    case GpsaDtype::kBFloat16: return detail::fwd_typed<__nv_bfloat16>(p, stream);
    case GpsaDtype::kFloat64: return detail::fwd_typed<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace convit_kernels
