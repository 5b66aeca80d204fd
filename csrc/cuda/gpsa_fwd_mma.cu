// GPSA forward on tensor cores (WMMA m16n16k16, fp32 accumulation) for fp16/bf16 with D % 16 == 0
// on sm_80+: the 64-row whole-row kernel (N <= 256, where its shared memory fits) and the tiled
// online-softmax kernel (any N; used for N > 256), chosen by fwd_mma_launch at the end. The outputs
// of the SIMT kernels of gpsa_fwd_simt.cu. No torch header.
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

// Whole-row forward on tensor cores, for fp16/bf16 with D % 16 == 0 (sm_80+), N <= 256: the
// ConViT shapes. A CTA owns 64 query rows of one (b, h), warp w the 16 rows 16 w .. 16 w + 15, so
// K and V are read from L2 once per 64 rows; all keys' K and V rows sit in shared memory at once
// (row stride D + 8 elements: the 16-byte pad puts the rows of a WMMA tile on different banks).
// Setup, per CTA (batch-independent, a few hundred entries): the per-head positional logit table
// tab[(dy + rows - 1) (2 cols - 1) + dx + cols - 1] = log2(e) w . (dx, dy, dx^2 + dy^2), and per
// key kidx[j] = row(j) (2 cols - 1) + col(j), so that the logit of (i, j) is tab[base_i + kidx[j]]:
// one add and one shared load per element, no integer division.
// Per warp, WMMA m16n16k16 with fp32 accumulation, Q fragments held in registers, and lane l owning
// row l / 2, columns 8 (l % 2) .. + 7 of every 16 x 16 tile (read back from a per-warp scratch
// tile, as WMMA fragments are opaque):
// 1. pass 1 over 16-key tiles: S = Q K^T, the running row max and sum of the content softmax in
//    registers (exp2, log2(e) folded into the scale);
// 2. pass 2: S again, M = (1 - s) P_c + s P_pos from registers (P_pos = 2^(tab - pos_lse log2 e),
//    the weights folded into the exponents),
//    rounded to T once (as flash attention rounds P) into a per-warp 16 x 16 tile, O += M V.
// No CTA barrier after the loads: a warp whose rows all lie past N leaves.
// Grid: (ceil(N / kRows64), H, B); block: kThreads; dynamic shared memory: Rows64Smem::total.
struct Rows64Smem {
  size_t q, k, v, scr, p, tab, kidx, total;
  __host__ __device__ Rows64Smem(int n16, int D, size_t elem) {
    const size_t ld = size_t(D) + 8;
    q = 0;                                                      // [64][ld] T
    k = q + align128(kRows64 * ld * elem);                      // [n16][ld] T
    v = k + align128(n16 * ld * elem);                          // [n16][ld] T
    scr = v + align128(n16 * ld * elem);                        // kWarps x [16][kScrLd] float
    p = scr + kWarps * align128(16 * kScrLd * sizeof(float));   // kWarps x [16][kPLd] T
    tab = p + kWarps * align128(16 * kPLd * elem);              // [(2 rows - 1)(2 cols - 1)] float
    kidx = tab + align128(kTabMax * sizeof(float));             // [n16] int
    total = kidx + align128(size_t(n16) * sizeof(int));
  }
};

// Pass 1 on one 16 x 16 score tile: the lane's 8 scores of its row into the running (max, sum),
// both in log2 units. kMasked: the last tile, whose keys at or past N drop out.
template <bool kMasked>
__device__ __forceinline__ void rows64_tile_stats(const float* scr, int r, int c0, int key0, int N, float sl2,
                                                  float& m, float& l) {
  float x[8];
  float mt = m;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    x[c] = scr[r * kScrLd + c0 + c] * sl2;
    if (kMasked && key0 + c >= N) x[c] = -INFINITY;
    mt = fmaxf(mt, x[c]);
  }
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < 8; ++c) sum += fast_exp2(x[c] - mt);
  l = l * fast_exp2(m - mt) + sum;
  m = mt;
}

// Pass 2 on one tile: the lane's 8 mixed probabilities, rounded to T, into the probability tile.
// The weights are folded into the exponents: (1 - s) P_c = 2^(x - m + log2((1 - s) / l)) and
// s P_pos = 2^(z - pos_lse + log2 s) (log2 e units; s = 0 or 1 give 2^-inf = 0), so an element
// costs one FFMA, one FADD, two MUFU.EX2 and one FADD. Keys at or past N get 0 (kMasked).
// tab_i = tab + base_i: the row's view of the table.
template <typename T, bool kMasked>
__device__ __forceinline__ void rows64_tile_mix(const float* scr, T* pt, const float* tab_i, const int* kidx, int r,
                                                int c0, int key0, int N, float sl2, float off_c, float off_p) {
  alignas(16) T vals[8];
  alignas(16) int kk[8];  // 8 key offsets: two 16-byte loads (key0 is a multiple of 8)
  *reinterpret_cast<uint4*>(kk) = *reinterpret_cast<const uint4*>(kidx + key0);
  *reinterpret_cast<uint4*>(kk + 4) = *reinterpret_cast<const uint4*>(kidx + key0 + 4);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float p_c = fast_exp2(fmaf(scr[r * kScrLd + c0 + c], sl2, off_c));
    const float p_p = fast_exp2(tab_i[kk[c]] + off_p);
    float mix = p_c + p_p;
    if (kMasked && key0 + c >= N) mix = 0.0f;
    vals[c] = from_acc<T>(mix);
  }
  *reinterpret_cast<uint4*>(pt + r * kPLd + c0) = *reinterpret_cast<const uint4*>(vals);
}

template <typename T, int kSteps>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_rows64_mma_kernel(FwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];  // WMMA: 32-byte aligned tiles
  const int N = a.N, D = a.D, ld = D + 8, n16 = ceil_div(N, 16) * 16, k_steps = D / 16;
  const int cols2 = 2 * a.cols - 1;
  const Rows64Smem lay(n16, D, sizeof(T));
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  float* tab = reinterpret_cast<float*>(smem_raw + lay.tab);
  int* kidx = reinterpret_cast<int*>(smem_raw + lay.kidx);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kRows64;
  const HeadSlice<T> hs = head_slice(a, b, h);
  const T *q = hs.q, *k = hs.k, *v = hs.v;
  const float w0 = a.pos_weight[h * 3 + 0] * kLog2e, w1 = a.pos_weight[h * 3 + 1] * kLog2e,
              w2 = a.pos_weight[h * 3 + 2] * kLog2e;
  const float s = sigmoid(a.gating[h]);

  // Setup: the table, the key offsets, Q, K, V. Integer division here only, per table entry / key.
  build_pos_table(tab, w0, w1, w2, a.rows, a.cols);
  for (int j = tid; j < n16; j += kThreads) kidx[j] = j < N ? (j / a.cols) * cols2 + j % a.cols : 0;
  load_rows_ld(q_t, ld, q, a.qs.n, i0, kRows64, N, D);  // rows past N: zeros, finite, never written
  load_rows_ld(k_t, ld, k, a.ks.n, 0, n16, N, D);       // keys past N: zeros, masked below
  load_rows_ld(v_t, ld, v, a.vs.n, 0, n16, N, D);       // zeros: a masked key adds 0 * 0
  __syncthreads();
  const int row0 = i0 + 16 * warp;
  if (row0 >= N) return;  // warp-uniform; no CTA barrier follows

  float* scr = reinterpret_cast<float*>(smem_raw + lay.scr + warp * align128(16 * kScrLd * sizeof(float)));
  T* pt = reinterpret_cast<T*>(smem_raw + lay.p + warp * align128(16 * kPLd * sizeof(T)));
  const T* qw = q_t + 16 * warp * ld;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kSteps];
#pragma unroll
  for (int t = 0; t < kSteps; ++t)
    if (t < k_steps) wmma::load_matrix_sync(qf[t], qw + 16 * t, ld);

  // S tile of keys j0 .. j0 + 15 into the scratch tile; the __syncwarp before the store: every
  // lane is done reading the previous tile (scores and, in pass 2, the probability tile's MMA).
  auto score_tile = [&](int j0) {
    AccFrag acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < k_steps) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;  // (c, n) = K[j0 + n][16 t + c]
        wmma::load_matrix_sync(kf, k_t + j0 * ld + 16 * t, ld);
        wmma::mma_sync(acc, qf[t], kf, acc);
      }
    }
    __syncwarp();
    wmma::store_matrix_sync(scr, acc, kScrLd, wmma::mem_row_major);
    __syncwarp();
  };

  const int r = lane / 2, c0 = (lane % 2) * 8, i = row0 + r;
  const int ic = i < N ? i : N - 1;  // rows past N: any valid geometry, never written
  const int base = (a.rows - 1 - ic / a.cols) * cols2 + (a.cols - 1 - ic % a.cols);
  const float neg_plse2 = -a.pos_lse[int64_t(h) * N + ic] * kLog2e;
  const float sl2 = a.scale * kLog2e;

  // 1. content softmax statistics; a finite start keeps 2^(m - mt) finite for a lane whose 8 keys
  //    of a tile are all masked
  float m = -1e30f, l = 0.0f;
  for (int j0 = 0; j0 < n16; j0 += 16) {
    score_tile(j0);
    if (j0 + 16 <= N) rows64_tile_stats<false>(scr, r, c0, j0 + c0, N, sl2, m, l);
    else rows64_tile_stats<true>(scr, r, c0, j0 + c0, N, sl2, m, l);
  }
  const float m_row = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));  // the two lanes of row r
  l *= fast_exp2(m - m_row);
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  const float off_c = log2f((1.0f - s) / l) - m_row, off_p = neg_plse2 + log2f(s);

  // 2. mixed probabilities and O = M V
  AccFrag o[kSteps];
#pragma unroll
  for (int t = 0; t < kSteps; ++t) wmma::fill_fragment(o[t], 0.0f);
  for (int j0 = 0; j0 < n16; j0 += 16) {
    score_tile(j0);
    if (j0 + 16 <= N)
      rows64_tile_mix<T, false>(scr, pt, tab + base, kidx, r, c0, j0 + c0, N, sl2, off_c, off_p);
    else
      rows64_tile_mix<T, true>(scr, pt, tab + base, kidx, r, c0, j0 + c0, N, sl2, off_c, off_p);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;  // M[r][j0 + c]
    wmma::load_matrix_sync(pf, pt, kPLd);
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < k_steps) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;  // V[j0 + c][16 t + n]
        wmma::load_matrix_sync(vf, v_t + j0 * ld + 16 * t, ld);
        wmma::mma_sync(o[t], pf, vf, o[t]);
      }
    }
  }
  if (c0 == 0 && i < N) a.lse[(int64_t(b) * a.H + h) * N + i] = (m_row + log2f(l)) / kLog2e;

  // Output, one 16 x 16 tile at a time through the scratch tile.
  T* out = a.out + b * a.os.b + h * a.os.h;
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    if (t < k_steps) {
      __syncwarp();
      wmma::store_matrix_sync(scr, o[t], kScrLd, wmma::mem_row_major);
      __syncwarp();
      if (i < N)
        for (int c = 0; c < 8; ++c) out[int64_t(i) * a.os.n + 16 * t + c0 + c] = from_acc<T>(scr[r * kScrLd + c0 + c]);
    }
  }
#else
  __trap();  // launched only on sm_80+ (see fwd_typed in gpsa_launch.cu)
#endif
}

template <typename T>
cudaError_t fwd_mma_launch(const FwdArgs<T>& a, cudaStream_t stream) {
  const size_t smem = Rows64Smem(ceil_div(a.N, 16) * 16, a.D, sizeof(T)).total;
  if (a.N <= kWholeRowMaxN && smem <= device_max_smem_optin()) {  // else the tiled kernel (any N)
    const dim3 grid64(ceil_div(a.N, kRows64), a.H, a.B);
    if (a.D <= 64) return launch_with_smem(gpsa_fwd_rows64_mma_kernel<T, 4>, grid64, smem, stream, a);
    return launch_with_smem(gpsa_fwd_rows64_mma_kernel<T, 8>, grid64, smem, stream, a);
  }
  const dim3 grid(ceil_div(a.N, kBlockM), a.H, a.B);
  return launch_with_smem(gpsa_fwd_tiled_mma_kernel<T>, grid, TiledMmaLayout(a.D, sizeof(T)).total, stream, a);
}

template cudaError_t fwd_mma_launch<__half>(const FwdArgs<__half>&, cudaStream_t);
template cudaError_t fwd_mma_launch<__nv_bfloat16>(const FwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
