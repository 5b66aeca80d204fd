// gpsa_bwd_cpu: the fused GPSA backward on CPU (implements convit_kernels::gpsa_bwd).
//
// One task = (b, h). It walks its query blocks in order; for each block it recomputes the scaled
// logits (one GEMM) and P_c = exp(S - lse), forms dM = g V^T (one GEMM), and per row turns them into
// dS_c and the mixed attention M (bwd_row). Then dQ_blk = scale dS_c K is written, and
// dK += scale dS_c^T Q_blk, dV += M^T g_blk accumulate in the task's own rows of the outputs. Each
// (b, h) is owned by one task and its blocks are summed in a fixed order; dL/dpos_weight and
// dL/dgating come from per-(b, h) partial sums reduced over b in a fixed order afterwards. So the
// result is bitwise the same for every thread count and every repeat (no atomics).
#include "gpsa_cpu.h"

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
  // A: the accumulation type; half / bfloat16 blocks are staged as float (see gpsa_fwd_cpu.cpp), and
  // their dK, dV accumulate in float until the task's last block.
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
  const int64_t staged = kStage ? 4 * N * D + 3 * bq * D : 0;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    c10::DataPtr buf = c10::GetCPUAllocator()->allocate(sizeof(A) * (2 * bq * N + N + staged));  // 64-byte aligned
    A* S = static_cast<A*>(buf.get());
    A* dM = S + bq * N;
    A* scratch = dM + bq * N;
    A* k_st = scratch + N;  // staging (half / bfloat16 only)
    A* v_st = k_st + N * D;
    A* dk_st = v_st + N * D;
    A* dv_st = dk_st + N * D;
    A* q_st = dv_st + N * D;
    A* g_st = q_st + bq * D;
    A* dq_st = g_st + bq * D;
    A rbar_st[3];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, h = t % H;
      const auto ka = as_acc(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), N, D, k_st);
      const auto va = as_acc(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), N, D, v_st);
      T* dkb = gkp + (b * N * H + h) * D;
      T* dvb = gvp + (b * N * H + h) * D;
      A* dka;
      A* dva;
      int64_t ldkv;
      if constexpr (kStage) {
        dka = dk_st, dva = dv_st, ldkv = D;
      } else {
        dka = dkb, dva = dvb, ldkv = ld;
      }
      double* acc = partial.data() + t * 4;
      for (int64_t i0 = 0; i0 < N; i0 += bq) {
        const int64_t m = std::min(bq, N - i0);
        const auto qa = as_acc(qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2), q.stride(2), m, D, q_st);
        const auto ga = as_acc(gp + b * g.stride(0) + h * g.stride(1) + i0 * g.stride(2), g.stride(2), m, D, g_st);
        // S = scale Q_blk K^T and dM = g_blk V^T (row-major m x N; column-major: K Q^T, V g^T).
        gemm(true, false, N, m, D, alpha, ka.first, ka.second, qa.first, qa.second, A(0), S, N);
        gemm(true, false, N, m, D, A(1), va.first, va.second, ga.first, ga.second, A(0), dM, N);
        const A* lrow = lp + (b * H + h) * N + i0;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          const A* pp = pos.get(h, i, scratch);
          const A* rbar = pos.mean(h, i, pp, rbar_st);
          bwd_row(S + r * N, lrow[r], pp, rbar, dM + r * N, pos.colj, pos.rowj, pos.colj[i], pos.rowj[i], N,
                  gate[h], acc);
        }
        // S now holds dS_c, dM holds M.
        T* dqb = gqp + ((b * N + i0) * H + h) * D;
        const A beta = i0 == 0 ? A(0) : A(1);
        if constexpr (kStage) {
          gemm(false, false, D, m, N, alpha, ka.first, ka.second, S, N, A(0), dq_st, D);  // dQ^T = K^T dS^T
          store_rows(dq_st, m, D, dqb, ld);
        } else {
          gemm(false, false, D, m, N, alpha, ka.first, ka.second, S, N, A(0), dqb, ld);  // dQ^T = K^T dS^T
        }
        gemm(false, true, D, N, m, alpha, qa.first, qa.second, S, N, beta, dka, ldkv);   // dK^T += Q^T dS
        gemm(false, true, D, N, m, A(1), ga.first, ga.second, dM, N, beta, dva, ldkv);   // dV^T += g^T M
      }
      if constexpr (kStage) {
        store_rows(dka, N, D, dkb, ld);
        store_rows(dva, N, D, dvb, ld);
      }
    }
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
  check_common("gpsa_bwd", q_in, k_in, v_in, pos_weight, gating, rows, cols);
  TORCH_CHECK_VALUE(std::isfinite(scale), "gpsa_bwd: scale must be finite; got ", scale);
  TORCH_CHECK_VALUE(grad_out.sizes() == q_in.sizes(), "gpsa_bwd: grad_out must have the shape of q ", q_in.sizes(),
                    "; got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q_in.scalar_type(), "gpsa_bwd: grad_out must have the dtype of q (",
                   q_in.scalar_type(), "); got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device().is_cpu() && lse.device().is_cpu(),
                    "gpsa_bwd (CPU kernel): grad_out and lse must be CPU tensors");
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N,
                    "gpsa_bwd: lse must have shape (B, H, N) = (", B, ", ", H, ", ", N, "); got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == pos_weight.scalar_type(), "gpsa_bwd: lse must be ",
                   pos_weight.scalar_type(), "; got ", lse.scalar_type());
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
