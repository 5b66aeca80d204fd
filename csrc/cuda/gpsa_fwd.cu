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
  const T* q = a.q + b * a.qs.b + h * a.qs.h;
  const T* k = a.k + b * a.ks.b + h * a.ks.h;
  const T* v = a.v + b * a.vs.b + h * a.vs.h;
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
      const size_t smem = Rows64Smem(ceil_div(p.N, 16) * 16, p.D, sizeof(T)).total;
      if (p.N <= kWholeRowMaxN && smem <= device_max_smem_optin()) {  // else the tiled kernel (any N)
        const dim3 grid64(ceil_div(p.N, kRows64), p.H, p.B);
        if (p.D <= 64) return launch_with_smem(gpsa_fwd_rows64_mma_kernel<T, 4>, grid64, smem, stream, a);
        return launch_with_smem(gpsa_fwd_rows64_mma_kernel<T, 8>, grid64, smem, stream, a);
      }
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
