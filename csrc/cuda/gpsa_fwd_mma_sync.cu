// GPSA forward on the FlashAttention-2 instruction path, for fp16/bf16 with D % 16 == 0 on sm_80+
// and N <= kWholeRowMaxN (the ConViT shapes): mma.sync m16n8k16 with fp32 accumulation, operands
// by ldmatrix from padded shared memory, the scores and probabilities in registers in the
// accumulator layout (csrc/cuda/gpsa_mma.cuh), K and V loaded by cp.async. No torch header.
//
// One pass, two accumulators (benchmarks/NOTES.md, "The mma.sync path": the floors of the one-pass
// and two-pass designs). A CTA owns 64 query rows of one (b, h), warp w the 16 rows 16 w .. + 15;
// Q, and all keys' K and V rows, sit in shared memory (row stride D + 8: the 16-byte pad puts the 8
// rows of an ldmatrix on different banks). Loads: one cp.async group per key tile (group 0 also
// holds Q), waited for tile by tile, so the first tile's work overlaps the later tiles' loads.
// Per warp and key tile of kKeys keys, lane l holding rows g = l / 4 and g + 8, keys 2 (l % 4) + {0, 1}
// of every 8-key block (the C fragment):
// 1. S = Q K^T (Q fragments in registers, K by ldmatrix.x4: two 8-key blocks per load);
// 2. content branch, online: the rows' running max (over the lane, then its quad by two shuffles),
//    the content accumulator and the lane's partial row sum rescaled by 2^(m_old - m_new),
//    P_c = 2^(S |scale| log2 e - m) (one FFMA, one MUFU.EX2);
// 3. positional branch, already normalised by pos_lse and weighted by s:
//    s P_pos = 2^(tab[base_i + kidx_j] - pos_lse_i log2 e + log2 s) (one LDS, one FADD, one MUFU.EX2);
// 4. both converted in registers into A fragments (the C layout of two 8-key blocks is the A layout
//    of one 16-key step) and multiplied by V (ldmatrix.x4.trans, shared by both products):
//    acc_c += P_c V, acc_p += s P_pos V.
// End: out = (1 - s) acc_c / l + acc_p, lse = (m + log2 l) / log2 e. A negative scale flips the sign
// of the Q fragments (exact), so that the running max is taken on the raw scores.
// Grid: (ceil(N / kRows64), H, B); block: kThreads; dynamic shared memory: MmaSyncFwdSmem::total.
#include "gpsa_mma.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

struct MmaSyncFwdSmem {
  size_t q, k, v, tab, kidx, total;
  __host__ __device__ MmaSyncFwdSmem(int n16, int D) {
    const size_t ld = size_t(D) + 8, elem = 2;
    q = 0;                                          // [64][ld] T
    k = q + align128(kRows64 * ld * elem);          // [n16][ld] T
    v = k + align128(n16 * ld * elem);              // [n16][ld] T
    tab = v + align128(n16 * ld * elem);            // [(2 rows - 1)(2 cols - 1)] float
    kidx = tab + align128(kTabMax * sizeof(float));  // [n16] int
    total = kidx + align128(size_t(n16) * sizeof(int));
  }
};

template <typename T, int kSteps, int kKeys>
__global__ void __launch_bounds__(kThreads) gpsa_fwd_mma_sync_kernel(FwdArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kBlocks = kKeys / 8;  // 8-key blocks per tile
  const int N = a.N, D = a.D, ld = D + 8, n16 = ceil_div(N, 16) * 16, k_steps = D / 16;
  const MmaSyncFwdSmem lay(n16, D);
  T* q_t = reinterpret_cast<T*>(smem_raw + lay.q);
  T* k_t = reinterpret_cast<T*>(smem_raw + lay.k);
  T* v_t = reinterpret_cast<T*>(smem_raw + lay.v);
  float* tab = reinterpret_cast<float*>(smem_raw + lay.tab);
  int* kidx = reinterpret_cast<int*>(smem_raw + lay.kidx);

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
  // Meanwhile the per-head positional table and the key offsets (integer division here only).
  const float w0 = a.pos_weight[h * 3 + 0] * kLog2e, w1 = a.pos_weight[h * 3 + 1] * kLog2e,
              w2 = a.pos_weight[h * 3 + 2] * kLog2e;
  build_pos_table(tab, w0, w1, w2, a.rows, a.cols);
  for (int j = tid; j < n16; j += kThreads) kidx[j] = j < N ? pos_kidx(j, a.cols) : 0;

  const int row0 = i0 + 16 * warp;
  const bool active = row0 < N;  // warp-uniform; an idle warp still meets the CTA barriers
  const float s = sigmoid(a.gating[h]);
  const float sl2 = fabsf(a.scale) * kLog2e;
  const uint32_t flip = a.scale < 0.0f ? 0x80008000u : 0u;  // negates both 16-bit halves
  int base[2];
  float off_p[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + g + 8 * r, ic = i < N ? i : N - 1;  // rows past N: any valid geometry
    base[r] = pos_base(ic, a.rows, a.cols);
    off_p[r] = log2f(s) - a.pos_lse[int64_t(h) * N + ic] * kLog2e;
  }

  uint32_t qa[kSteps][4];
  float m_r[2] = {-1e30f, -1e30f}, l_r[2] = {0.0f, 0.0f};  // raw-score max (finite start), partial sums
  float oc[2 * kSteps][4], op[2 * kSteps][4];
#pragma unroll
  for (int dn = 0; dn < 2 * kSteps; ++dn)
#pragma unroll
    for (int x = 0; x < 4; ++x) oc[dn][x] = op[dn][x] = 0.0f;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait_upto(n_tiles - 1 - t);  // this thread's copies of tiles 0 .. t have landed
    __syncthreads();                      // and everyone's (the table and kidx too, on t = 0)
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

    // 3-4. per 16-key step: both probabilities into A fragments, then M V on both accumulators
#pragma unroll
    for (int kk = 0; kk < kBlocks / 2; ++kk) {
      if (j0 + 16 * kk < N) {
        uint32_t pc[4], pp[4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int nb = 2 * kk + half, jb = j0 + 8 * nb + 2 * tg;
          const int2 kx = *reinterpret_cast<const int2*>(kidx + jb);
          float c[4], z[4];
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            c[x] = fast_exp2(fmaf(sc[nb][x], sl2, ms[x / 2]));
            z[x] = fast_exp2(tab[base[x / 2] + (x & 1 ? kx.y : kx.x)] + off_p[x / 2]);
          }
          if (tail) {
#pragma unroll
            for (int x = 0; x < 4; ++x)
              if (jb + (x & 1) >= N) c[x] = z[x] = 0.0f;
          }
          l_r[0] += c[0] + c[1];
          l_r[1] += c[2] + c[3];
          pc[2 * half] = pack2<T>(c[0], c[1]);  // row g: a0 (keys 0-7) / a2 (keys 8-15)
          pc[2 * half + 1] = pack2<T>(c[2], c[3]);  // row g + 8: a1 / a3
          pp[2 * half] = pack2<T>(z[0], z[1]);
          pp[2 * half + 1] = pack2<T>(z[2], z[3]);
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
  return N <= kWholeRowMaxN && D % 16 == 0 && MmaSyncFwdSmem(ceil_div(N, 16) * 16, D).total <= device_max_smem_optin();
}

template <typename T>
cudaError_t fwd_mma_sync_launch(const FwdArgs<T>& a, cudaStream_t stream) {
  const size_t smem = MmaSyncFwdSmem(ceil_div(a.N, 16) * 16, a.D).total;
  const dim3 grid(ceil_div(a.N, kRows64), a.H, a.B);
  if (a.D <= 64) return launch_with_smem(gpsa_fwd_mma_sync_kernel<T, 4, 64>, grid, smem, stream, a);
  return launch_with_smem(gpsa_fwd_mma_sync_kernel<T, 8, 32>, grid, smem, stream, a);
}

template cudaError_t fwd_mma_sync_launch<__half>(const FwdArgs<__half>&, cudaStream_t);
template cudaError_t fwd_mma_sync_launch<__nv_bfloat16>(const FwdArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
