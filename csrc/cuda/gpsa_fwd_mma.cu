// GPSA forward on tensor cores (WMMA m16n16k16, fp32 accumulation) for fp16/bf16 with D % 16 == 0
// on sm_80+: the tiled online-softmax kernel (any N), taken where the mma.sync whole-row forward
// (gpsa_fwd_mma_sync.cu) does not apply: N > 256, or a device whose shared memory per block is
// too small for the whole row. The outputs of the SIMT kernels of gpsa_fwd_simt.cu. No torch header.
//
// Tiled kernel (the online-softmax forward of gpsa_fwd_tiled_kernel). CTA: 16 query rows of one (b, h); keys in chunks of 64. Per chunk:
// 1. S (16 x 64) = Q K^T, warp w computing the 16 x 16 tile of keys 16 w .. 16 w + 15;
// 2. one warp per row (rows warp + 4 u): running max m and sum l of the content branch,
//    P_c = exp(S - m_new) and the (already normalised) positional probabilities, both rounded to
//    T, and the rescale factor alpha = exp(m_old - m_new) of the row;
// 3. output tile t (columns 16 t ..) for warp t % 4: the positional product accumulates in a
//    fragment across chunks; the content product of this chunk goes through shared memory, where
//    acc_c = acc_c * alpha + P_c V (a WMMA fragment cannot be scaled row by row).
// End: out = (1 - s) acc_c / l + s acc_p; lse = m + log l.
// Grid: (ceil(N / 16), H, B); block: kThreads; dynamic shared memory: TiledMmaLayout::total.
#include "gpsa_common.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

constexpr int kTiledMmaChunk = 64;                       // keys per chunk: one 16-key tile per warp
constexpr int kTiledMmaTiles = kMaxHeadDim / 16 / kWarps;  // output tiles per warp at D = 128: 2
static_assert(kBlockM == 16, "one WMMA tile covers the CTA's query rows");
static_assert(kTiledMmaChunk == 16 * kWarps, "one 16-key tile per warp");
static_assert(kTiledMmaTiles * 16 * kWarps == kMaxHeadDim, "output tiles cover D = 128");

struct TiledMmaLayout {
  size_t q, k, v, s, pc, pp, alpha, linv, oc, tmp, total;
  __host__ __device__ TiledMmaLayout(int D, size_t elem) {
    q = 0;                                                              // [16][D] T
    k = q + align128(size_t(kBlockM) * D * elem);                       // [64][D] T
    v = k + align128(size_t(kTiledMmaChunk) * D * elem);                // [64][D] T
    s = v + align128(size_t(kTiledMmaChunk) * D * elem);                // [16][64] float: Q K^T (unscaled)
    pc = s + align128(size_t(kBlockM) * kTiledMmaChunk * sizeof(float));  // [16][64] T: exp(S - m_new)
    pp = pc + align128(size_t(kBlockM) * kTiledMmaChunk * elem);        // [16][64] T: positional probs
    alpha = pp + align128(size_t(kBlockM) * kTiledMmaChunk * elem);     // [16] float
    linv = alpha + align128(size_t(kBlockM) * sizeof(float));           // [16] float: 1 / l at the end
    oc = linv + align128(size_t(kBlockM) * sizeof(float));              // [16][D] float: content accumulator
    tmp = oc + align128(size_t(kBlockM) * D * sizeof(float));           // [16][D] float: a chunk's P_c V
    total = tmp + align128(size_t(kBlockM) * D * sizeof(float));
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_tiled_mma_kernel(FwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D;
  const TiledMmaLayout lay(D, sizeof(T));
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  float* s_f = reinterpret_cast<float*>(smem_raw + lay.s);
  T* pc_t = reinterpret_cast<T*>(smem_raw + lay.pc);
  T* pp_t = reinterpret_cast<T*>(smem_raw + lay.pp);
  float* alpha_s = reinterpret_cast<float*>(smem_raw + lay.alpha);
  float* linv_s = reinterpret_cast<float*>(smem_raw + lay.linv);
  float* oc_f = reinterpret_cast<float*>(smem_raw + lay.oc);
  float* tmp_f = reinterpret_cast<float*>(smem_raw + lay.tmp);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBlockM;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *k = hs.k, *v = hs.v;
  const float w[3] = {a.pos_weight[h * 3 + 0], a.pos_weight[h * 3 + 1], a.pos_weight[h * 3 + 2]};
  const float s = sigmoid(a.gating[h]);
  constexpr int kRows = kBlockM / kWarps;            // 4 rows per warp in step 2
  constexpr int kPerLane = kTiledMmaChunk / 32;      // 2 keys per lane per row

  // Row state, held identically by every lane of the warp owning row r = warp + kWarps * u.
  // The rows' grid coordinates, once: the positional logit below needs no division per element.
  float m_run[kRows], l_run[kRows], plse[kRows];
  int row_i[kRows], col_i[kRows];
  for (int u = 0; u < kRows; ++u) {
    const int i = i0 + warp + kWarps * u;
    m_run[u] = neg_inf<float>();
    l_run[u] = 0.0f;
    plse[u] = i < N ? a.pos_lse[int64_t(h) * N + i] : 0.0f;
    row_i[u] = i / a.cols;
    col_i[u] = i % a.cols;
  }
  AccFrag acc_p[kTiledMmaTiles];
#pragma unroll
  for (int slot = 0; slot < kTiledMmaTiles; ++slot) wmma::fill_fragment(acc_p[slot], 0.0f);
  for (int e = tid; e < kBlockM * D; e += kThreads) oc_f[e] = 0.0f;  // alpha = 0 on chunk 1: no NaN * 0
  load_rows_raw(q_t, q, a.qs.n, i0, kBlockM, N, D);  // rows past N are zeros: finite, never written

  for (int j0 = 0; j0 < N; j0 += kTiledMmaChunk) {
    __syncthreads();  // previous chunk consumed (and q_t, oc_f ready)
    load_rows_raw(k_t, k, a.ks.n, j0, kTiledMmaChunk, N, D);
    load_rows_raw(v_t, v, a.vs.n, j0, kTiledMmaChunk, N, D);  // keys past N: zeros (weights 0 too)
    __syncthreads();
    {  // 1. raw scores of this chunk
      AccFrag st;
      wmma::fill_fragment(st, 0.0f);
      mma_rows_dot_rows(st, q_t, k_t + 16 * warp * D, D);  // S[r][16 w + c] = q_r . k_c
      wmma::store_matrix_sync(s_f + 16 * warp, st, kTiledMmaChunk, wmma::mem_row_major);
    }
    __syncthreads();
    // 2. online softmax statistics and this chunk's probabilities; the lane's keys' grid
    //    coordinates once per chunk (one division per key, shared by the warp's kRows rows)
    int row_j[kPerLane], col_j[kPerLane];
    for (int x = 0; x < kPerLane; ++x) {
      const int j = j0 + lane + 32 * x;
      row_j[x] = j / a.cols;
      col_j[x] = j % a.cols;
    }
    for (int u = 0; u < kRows; ++u) {
      const int r = warp + kWarps * u, i = i0 + r;
      float sv[kPerLane];
      float cmax = neg_inf<float>();
      for (int x = 0; x < kPerLane; ++x) {
        const int jc = lane + 32 * x, j = j0 + jc;
        sv[x] = j < N ? a.scale * s_f[r * kTiledMmaChunk + jc] : neg_inf<float>();
        cmax = fmax(cmax, sv[x]);
      }
      const float m_new = fmax(m_run[u], warp_max(cmax));  // finite: key j0 < N is valid
      const float alpha = acc_exp(m_run[u] - m_new);        // 0 on the first chunk (m_run = -inf)
      float psum = 0.0f;
      for (int x = 0; x < kPerLane; ++x) {
        const int jc = lane + 32 * x, j = j0 + jc;
        const float p = acc_exp(sv[x] - m_new);  // 0 for masked keys
        psum += p;
        pc_t[r * kTiledMmaChunk + jc] = from_acc<T>(p);
        const Offset o{col_j[x] - col_i[u], row_j[x] - row_i[u]};
        const float pp = (i < N && j < N) ? acc_exp(pos_logit(w, o) - plse[u]) : 0.0f;
        pp_t[r * kTiledMmaChunk + jc] = from_acc<T>(pp);
      }
      l_run[u] = l_run[u] * alpha + warp_sum(psum);
      m_run[u] = m_new;
      if (lane == 0) alpha_s[r] = alpha;
    }
    __syncthreads();
    // 3. P V for both branches
#pragma unroll
    for (int slot = 0; slot < kTiledMmaTiles; ++slot) {
      const int t = warp + kWarps * slot;
      if (t >= D / 16) continue;  // warp-uniform
      AccFrag cc;
      wmma::fill_fragment(cc, 0.0f);
      for (int kk = 0; kk < kTiledMmaChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fc, fp;  // P[r][16 kk + c]
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;      // V[16 kk + c][16 t + n]
        wmma::load_matrix_sync(fc, pc_t + 16 * kk, kTiledMmaChunk);
        wmma::load_matrix_sync(fp, pp_t + 16 * kk, kTiledMmaChunk);
        wmma::load_matrix_sync(fv, v_t + 16 * kk * D + 16 * t, D);
        wmma::mma_sync(cc, fc, fv, cc);
        wmma::mma_sync(acc_p[slot], fp, fv, acc_p[slot]);
      }
      wmma::store_matrix_sync(tmp_f + 16 * t, cc, D, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kBlockM * D; e += kThreads) oc_f[e] = oc_f[e] * alpha_s[e / D] + tmp_f[e];
  }

  for (int u = 0; u < kRows; ++u) {
    const int r = warp + kWarps * u, i = i0 + r;
    if (lane == 0) {
      linv_s[r] = 1.0f / l_run[u];
      if (i < N) a.lse[(int64_t(b) * a.H + h) * N + i] = m_run[u] + acc_log(l_run[u]);
    }
  }
  __syncthreads();  // tmp_f consumed; linv_s written
#pragma unroll
  for (int slot = 0; slot < kTiledMmaTiles; ++slot) {
    const int t = warp + kWarps * slot;
    if (t < D / 16) wmma::store_matrix_sync(tmp_f + 16 * t, acc_p[slot], D, wmma::mem_row_major);
  }
  __syncthreads();
  T* out = a.out + b * a.os.b + h * a.os.h;
  for (int e = tid; e < kBlockM * D; e += kThreads) {
    const int r = e / D, d = e % D, i = i0 + r;
    if (i < N) out[int64_t(i) * a.os.n + d] = from_acc<T>((1.0f - s) * oc_f[e] * linv_s[r] + s * tmp_f[e]);
  }
#else
  __trap();  // launched only on sm_80+ (see fwd_typed in gpsa_launch.cu)
#endif
}

template <typename T>
cudaError_t fwd_mma_launch(const FwdArgs<T>& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.N, kBlockM), a.H, a.B);
  return launch_with_smem(gpsa_fwd_tiled_mma_kernel<T>, grid, TiledMmaLayout(a.D, sizeof(T)).total, stream, a);
}

template cudaError_t fwd_mma_launch<__half>(const FwdArgs<__half>&, cudaStream_t);
template cudaError_t fwd_mma_launch<__nv_bfloat16>(const FwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
