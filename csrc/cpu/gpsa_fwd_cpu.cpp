// gpsa_fwd_cpu: the fused GPSA forward on CPU (implements convit_kernels::gpsa_fwd).
//
// One task = (b, h, block of query rows). It computes the block's scaled logits against all N keys
// (one product with scale K^T, copied once per (b, h)), turns each row into the mixed attention
// (1 - s) softmax + s P_pos in place, writes the row's log-sum-exp, and multiplies the block into V
// (one product) straight into the (B, N, H, D) output.
// Nothing of size N x N outlives the task; P_pos is shared by the whole batch (gpsa_cpu.h).
#include "gpsa_cpu.h"

#include "../gpsa_checks.h"

#include <ATen/OpMathType.h>

#include <cmath>

namespace convit_kernels::cpu {
namespace {

template <typename T>
void gpsa_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos_weight,
                     const at::Tensor& gating, int64_t rows, int64_t cols, double scale, at::Tensor& out,
                     at::Tensor& lse) {
  // A: the accumulation type (float for float / half / bfloat16, double for double). Half and bfloat16
  // blocks are staged as float (K and V once per (b, h), Q and out per block).
  using A = at::opmath_type<T>;
  constexpr bool kStage = !std::is_same_v<T, A>;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const PosRows<A> pos = make_pos_rows<A>(pos_weight, rows, cols, /*with_means=*/false);
  const at::Tensor gate_t = at::sigmoid(gating).contiguous();
  const A* gate = gate_t.const_data_ptr<A>();
  // Whole rows of 256 queries make the GEMMs efficient; with few (b, h) pairs, smaller blocks give the
  // threads enough tasks. The choice depends on the shape only, so results do not depend on threads.
  const int64_t bq = block_rows(N, B * H >= 16 ? 256 : 64);
  const int64_t nblk = (N + bq - 1) / bq;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();  // (B, N, H, D) contiguous
  A* lp = lse.data_ptr<A>();  // (B, H, N) contiguous
  const A alpha = A(scale);
  const int64_t st = kStage ? 1 : 0;  // staging (half / bfloat16 only)

  parallel_tasks(B * H * nblk, [&](const auto& claim) {
    // S (bq x N), scale K^T (D x N), a positional row, staged V, Q_blk and out_blk.
    const auto [S, kT, scratch, v_st, q_st, o_st] =
        thread_scratch_arrays<A, 6>({bq * N, D * N, N, st * N * D, st * bq * D, st * bq * D});
    int64_t staged_bh = -1;
    std::pair<const A*, int64_t> va;
    for (int64_t t = claim(); t >= 0; t = claim()) {
      const int64_t b = t / (H * nblk), h = (t / nblk) % H, i0 = (t % nblk) * bq;
      const int64_t m = std::min(bq, N - i0);
      if (b * H + h != staged_bh) {
        // The scale is folded into K^T, here and in the backward's recompute (bitwise the same logits).
        transpose_copy(kp + b * k.stride(0) + h * k.stride(1), N, D, k.stride(2), kT, N, alpha);
        va = as_acc(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), N, D, v_st);
        staged_bh = b * H + h;
      }
      const auto qa = as_acc(qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2), q.stride(2), m, D, q_st);
      matmul(m, N, D, qa.first, qa.second, kT, N, S, N, false);  // S (m x N) = Q_blk (scale K^T)
      A* lrow = lp + (b * H + h) * N + i0;
      for (int64_t r = 0; r < m; ++r) {
        const A* pp = pos.get(h, i0 + r, scratch);
        lrow[r] = softmax_mix_row(S + r * N, pp, N, gate[h]);
      }
      // out_blk (m x D, row stride H * D) = M V.
      T* ob = op + ((b * N + i0) * H + h) * D;
      if constexpr (kStage) {
        matmul(m, D, N, S, N, va.first, va.second, o_st, D, false);
        store_rows(o_st, m, D, ob, H * D);
      } else {
        matmul(m, D, N, S, N, va.first, va.second, ob, H * D, false);
      }
    }
    matmul_release();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gpsa_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, const at::Tensor& pos_weight,
                                                const at::Tensor& gating, int64_t rows, int64_t cols, double scale) {
  check_gpsa_args("gpsa_fwd", at::kCPU, q_in, k_in, v_in, pos_weight, gating, rows, cols, scale);
  const at::Tensor q = rows_usable(q_in), k = rows_usable(k_in), v = rows_usable(v_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, N}, pos_weight.options());  // the accumulation dtype
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gpsa_fwd_cpu", [&] {
      gpsa_fwd_kernel<scalar_t>(q, k, v, pos_weight, gating, rows, cols, scale, out, lse);
    });
  }
  return {out.transpose(1, 2), lse};
}

}  // namespace convit_kernels::cpu
