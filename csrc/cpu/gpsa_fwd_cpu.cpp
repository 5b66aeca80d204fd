// gpsa_fwd_cpu: the fused GPSA forward on CPU (implements convit_kernels::gpsa_fwd).
//
// One task = (b, h, block of query rows). It computes the block's scaled logits against all N keys
// (one GEMM), turns each row into the mixed attention (1 - s) softmax + s P_pos in place, writes the
// row's log-sum-exp, and multiplies the block into V (one GEMM) straight into the (B, N, H, D) output.
// Nothing of size N x N outlives the task; P_pos is shared by the whole batch (gpsa_cpu.h).
#include "gpsa_cpu.h"

#include <cmath>

namespace convit_kernels::cpu {
namespace {

template <typename T>
void gpsa_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos_weight,
                     const at::Tensor& gating, int64_t rows, int64_t cols, double scale, at::Tensor& out,
                     at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const PosRows<T> pos = make_pos_rows<T>(pos_weight, rows, cols);
  const at::Tensor gate_t = at::sigmoid(gating).contiguous();
  const T* gate = gate_t.const_data_ptr<T>();
  // Whole rows of 256 queries make the GEMMs efficient; with few (b, h) pairs, smaller blocks give the
  // threads enough tasks. The choice depends on the shape only, so results do not depend on threads.
  const int64_t bq = block_rows(N, B * H >= 16 ? 256 : 64);
  const int64_t nblk = (N + bq - 1) / bq;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();  // (B, N, H, D) contiguous
  T* lp = lse.data_ptr<T>();  // (B, H, N) contiguous
  const T alpha = T(scale);

  at::parallel_for(0, B * H * nblk, 1, [&](int64_t begin, int64_t end) {
    c10::DataPtr buf = c10::GetCPUAllocator()->allocate(sizeof(T) * (bq * N + N));  // 64-byte aligned
    T* S = static_cast<T*>(buf.get());
    T* scratch = S + bq * N;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (H * nblk), h = (t / nblk) % H, i0 = (t % nblk) * bq;
      const int64_t m = std::min(bq, N - i0);
      const T* qb = qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      // S (m x N, row-major) = scale * Q_blk K^T, i.e. column-major S^T = K Q_blk^T.
      gemm(true, false, N, m, D, alpha, kb, k.stride(2), qb, q.stride(2), T(0), S, N);
      T* lrow = lp + (b * H + h) * N + i0;
      for (int64_t r = 0; r < m; ++r) {
        const T* pp = pos.get(h, i0 + r, scratch);
        lrow[r] = softmax_mix_row(S + r * N, pp, N, gate[h]);
      }
      // out_blk (m x D, row stride H * D) = M V, i.e. column-major out^T = V^T M^T.
      T* ob = op + ((b * N + i0) * H + h) * D;
      gemm(false, false, D, m, N, T(1), vb, v.stride(2), S, N, T(0), ob, H * D);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gpsa_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, const at::Tensor& pos_weight,
                                                const at::Tensor& gating, int64_t rows, int64_t cols, double scale) {
  check_common("gpsa_fwd", q_in, k_in, v_in, pos_weight, gating, rows, cols);
  TORCH_CHECK_VALUE(std::isfinite(scale), "gpsa_fwd: scale must be finite; got ", scale);
  const at::Tensor q = rows_usable(q_in), k = rows_usable(k_in), v = rows_usable(v_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options());  // acc dtype == q dtype for float32 / float64
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gpsa_fwd_cpu", [&] {
      gpsa_fwd_kernel<scalar_t>(q, k, v, pos_weight, gating, rows, cols, scale, out, lse);
    });
  }
  return {out.transpose(1, 2), lse};
}

}  // namespace convit_kernels::cpu
