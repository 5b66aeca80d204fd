// GPSA forward on CUDA cores (SIMT), every dtype: the whole-row kernel (N <= 256) and the tiled
// online-softmax kernel (N > 256). fp16/bf16 with D % 16 == 0 on sm_80+ take the tensor-core kernels
// of gpsa_fwd_mma.cu instead (the choice: gpsa_launch.cu). No torch header: see gpsa_cuda.h.
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
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *k = hs.k, *v = hs.v;
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
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *k = hs.k, *v = hs.v;
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
cudaError_t fwd_simt_launch(const FwdArgs<T>& a, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const dim3 grid(ceil_div(a.N, kBlockM), a.H, a.B);
  if (a.N <= kWholeRowMaxN)
    return launch_with_smem(gpsa_fwd_wholerow_kernel<T>, grid, wholerow_smem_bytes<Acc>(a.N, a.D), stream, a);
  return launch_with_smem(gpsa_fwd_tiled_kernel<T>, grid, tiled_smem_bytes<Acc>(a.D), stream, a);
}

template cudaError_t fwd_simt_launch<float>(const FwdArgs<float>&, cudaStream_t);
template cudaError_t fwd_simt_launch<double>(const FwdArgs<double>&, cudaStream_t);
template cudaError_t fwd_simt_launch<__half>(const FwdArgs<__half>&, cudaStream_t);
template cudaError_t fwd_simt_launch<__nv_bfloat16>(const FwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
