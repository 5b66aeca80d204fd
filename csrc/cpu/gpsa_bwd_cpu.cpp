// gpsa_bwd_cpu: the fused GPSA backward on CPU (implements convit_kernels::gpsa_bwd).
//
// One task = (b, h). It walks its query blocks in order; for each block it recomputes the scaled
// logits (one product) and P_c = exp(S - lse), forms dM = g V^T (one product), and per row turns them
// into dS_c and the mixed attention M (bwd_row). Then dQ_blk = scale dS_c K is written, and
// dK^T += scale Q_blk^T dS_c, dV^T += g_blk^T M accumulate in the task's buffers, stored transposed
// into dK and dV after its last block. Each (b, h) is owned by one task and its blocks are summed in
// a fixed order; dL/dpos_weight and dL/dgating come from per-(b, h) partial sums reduced over b in a
// fixed order afterwards. So the result is bitwise the same for every thread count and every repeat
// (no atomics).
#include "gpsa_cpu.h"

#include "../gpsa_checks.h"

#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

namespace convit_kernels::cpu {
namespace {

template <typename T>
void gpsa_bwd_kernel(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& pos_weight, const at::Tensor& gating, const at::Tensor& lse, int64_t rows,
                     int64_t cols, double scale, at::Tensor& gq, at::Tensor& gk, at::Tensor& gv, at::Tensor& gw,
                     at::Tensor& gg) {
  // A: the accumulation type; half / bfloat16 blocks are staged as float (see gpsa_fwd_cpu.cpp).
  using A = at::opmath_type<T>;
  constexpr bool kStage = !std::is_same_v<T, A>;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const PosRows<A> pos = make_pos_rows<A>(pos_weight, rows, cols, /*with_means=*/true);
  const at::Tensor gate_t = at::sigmoid(gating).contiguous();
  const A* gate = gate_t.const_data_ptr<A>();
  const int64_t bq = block_rows(N, 256);  // blocks are sequential within a task: as large as caches allow
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  const A* lp = lse.const_data_ptr<A>();
  T* gqp = gq.data_ptr<T>();  // (B, N, H, D) contiguous, like gk and gv
  T* gkp = gk.data_ptr<T>();
  T* gvp = gv.data_ptr<T>();
  std::vector<double> partial(B * H * 4, 0.0);  // per (b, h): dL/dw (3), sum_i (delta_p - delta_c)
  const A alpha = A(scale);
  const int64_t ld = H * D;
  const int64_t st = kStage ? 1 : 0;  // staging (half / bfloat16 only)

  parallel_tasks(B * H, [&](const auto& claim) {
    // S (bq x N) and scale K^T (D x N) first, placed as in the forward; dM (bq x N); V^T, dK^T, dV^T
    // (D x N each); Q_blk^T and g_blk^T (D x bq each); a positional row; staged K, Q_blk, g_blk, dQ_blk.
    const auto [S, kT, dM, vT, dkT, dvT, qT, gT, scratch, k_st, q_st, g_st, dq_st] = thread_scratch_arrays<A, 13>(
        {bq * N, D * N, bq * N, D * N, D * N, D * N, D * bq, D * bq, N, st * N * D, st * bq * D, st * bq * D,
         st * bq * D});
    A rbar_st[3];
    for (int64_t t = claim(); t >= 0; t = claim()) {
      const int64_t b = t / H, h = t % H;
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      transpose_copy(kb, N, D, k.stride(2), kT, N, alpha);  // as in the forward: bitwise the same logits
      transpose_copy(vb, N, D, v.stride(2), vT, N, A(1));
      const auto ka = as_acc(kb, k.stride(2), N, D, k_st);
      double* acc = partial.data() + t * 4;
      for (int64_t i0 = 0; i0 < N; i0 += bq) {
        const int64_t m = std::min(bq, N - i0);
        const T* qb = qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
        const T* gb = gp + b * g.stride(0) + h * g.stride(1) + i0 * g.stride(2);
        const auto qa = as_acc(qb, q.stride(2), m, D, q_st);
        const auto ga = as_acc(gb, g.stride(2), m, D, g_st);
        matmul(m, N, D, qa.first, qa.second, kT, N, S, N, false);  // S = Q_blk (scale K^T)
        matmul(m, N, D, ga.first, ga.second, vT, N, dM, N, false);  // dM = g_blk V^T
        const A* lrow = lp + (b * H + h) * N + i0;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          const A* pp = pos.get(h, i, scratch);
          const A* rbar = pos.mean(h, i, pp, rbar_st);
          bwd_row(S + r * N, lrow[r], pp, rbar, dM + r * N, pos.colj, pos.rowj, pos.colj[i], pos.rowj[i], N,
                  gate[h], alpha, acc);
        }
        // S now holds scale dS_c, dM holds M.
        T* dqb = gqp + ((b * N + i0) * H + h) * D;
        if constexpr (kStage) {
          matmul(m, D, N, S, N, ka.first, ka.second, dq_st, D, false);  // dQ_blk = (scale dS_c) K
          store_rows(dq_st, m, D, dqb, ld);
        } else {
          matmul(m, D, N, S, N, ka.first, ka.second, dqb, ld, false);  // dQ_blk = (scale dS_c) K
        }
        transpose_copy(qb, m, D, q.stride(2), qT, m, A(1));
        transpose_copy(gb, m, D, g.stride(2), gT, m, A(1));
        matmul(D, N, m, qT, m, S, N, dkT, N, i0 > 0);   // dK^T += Q_blk^T (scale dS_c)
        matmul(D, N, m, gT, m, dM, N, dvT, N, i0 > 0);  // dV^T += g_blk^T M
      }
      transpose_copy(dkT, D, N, N, gkp + (b * N * H + h) * D, ld, A(1));
      transpose_copy(dvT, D, N, N, gvp + (b * N * H + h) * D, ld, A(1));
    }
    matmul_release();
  });

  // Fixed-order reduction over the batch.
  const at::Tensor sig = gate_t.to(at::kDouble);
  const double* s = sig.const_data_ptr<double>();
  A* gwp = gw.data_ptr<A>();
  A* ggp = gg.data_ptr<A>();
  for (int64_t h = 0; h < H; ++h) {
    double w0 = 0, w1 = 0, w2 = 0, dg = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double* a = partial.data() + (b * H + h) * 4;
      w0 += a[0];
      w1 += a[1];
      w2 += a[2];
      dg += a[3];
    }
    gwp[3 * h] = A(w0);
    gwp[3 * h + 1] = A(w1);
    gwp[3 * h + 2] = A(w2);
    ggp[h] = A(s[h] * (1.0 - s[h]) * dg);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gpsa_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& pos_weight, const at::Tensor& gating, const at::Tensor& lse, int64_t rows, int64_t cols,
    double scale) {
  check_gpsa_args("gpsa_bwd", at::kCPU, q_in, k_in, v_in, pos_weight, gating, rows, cols, scale);
  check_gpsa_bwd_args(at::kCPU, grad_out, lse, q_in, pos_weight);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const at::Tensor q = rows_usable(q_in), k = rows_usable(k_in), v = rows_usable(v_in);
  const at::Tensor g = rows_usable(grad_out);
  const at::Tensor l = lse.contiguous();
  at::Tensor gq = at::empty({B, N, H, D}, q.options());
  at::Tensor gk = at::empty({B, N, H, D}, q.options());
  at::Tensor gv = at::empty({B, N, H, D}, q.options());
  at::Tensor gw = at::empty({H, 3}, pos_weight.options());
  at::Tensor gg = at::empty({H}, gating.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gpsa_bwd_cpu", [&] {
    gpsa_bwd_kernel<scalar_t>(g, q, k, v, pos_weight, gating, l, rows, cols, scale, gq, gk, gv, gw, gg);
  });
  return {gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2), gw, gg};
}

}  // namespace convit_kernels::cpu
