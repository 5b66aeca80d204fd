// Torch glue of the CUDA GPSA kernels: argument checks, allocations, the current stream, dtype
// dispatch, and the CUDA registration of convit_kernels::gpsa_fwd / gpsa_bwd (schemas in
// csrc/gpsa_ops.cpp). The kernels (gpsa_cuda.h's launchers, gpsa_launch.cu) see no torch type;
// the argument checks shared with the CPU glue are in csrc/gpsa_checks.h.
// Output layouts mirror the CPU kernels (csrc/cpu/): out and the grads of q, k, v are (B, H, N, D)
// views of contiguous (B, N, H, D) storage; lse (B, H, N) in the accumulation dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "gpsa_cuda.h"
#include "../gpsa_checks.h"

namespace convit_kernels::cuda {
namespace {

GpsaDtype to_gpsa_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return GpsaDtype::kFloat32;
    case at::kHalf: return GpsaDtype::kFloat16;
    case at::kBFloat16: return GpsaDtype::kBFloat16;
    case at::kDouble: return GpsaDtype::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "gpsa (CUDA kernel): q must be float32, float16, bfloat16 or float64; got ", t);
  return GpsaDtype::kFloat32;  // unreachable
}

Strides3 strides_of(const at::Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }

// The kernels read any strides with a unit last-dim stride.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// The checks every device shares (csrc/gpsa_checks.h), then this kernel's own limits.
void check_common(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& pos_weight, const at::Tensor& gating, int64_t rows, int64_t cols, double scale) {
  check_gpsa_args(op, at::kCUDA, q, k, v, pos_weight, gating, rows, cols, scale);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D <= kMaxHeadDim, op, " (CUDA kernel): head dim D must be <= ", kMaxHeadDim, "; got ", D);
  TORCH_CHECK_VALUE(B <= 65535 && H <= 65535 && N <= (int64_t(1) << 30), op,
                    " (CUDA kernel): B and H must be <= 65535 and N <= 2^30; got ", q.sizes());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA kernel): launch failed: ", cudaGetErrorString(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gpsa_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const at::Tensor& pos_weight_in,
                                                 const at::Tensor& gating_in, int64_t rows, int64_t cols,
                                                 double scale) {
  check_common("gpsa_fwd", q_in, k_in, v_in, pos_weight_in, gating_in, rows, cols, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor pos_weight = pos_weight_in.contiguous(), gating = gating_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  at::Tensor out_bnhd = at::empty({B, N, H, D}, q.options());
  at::Tensor out = out_bnhd.transpose(1, 2);
  at::Tensor lse = at::empty({B, H, N}, pos_weight.options());
  if (B == 0) return {out, lse};
  at::Tensor pos_lse = at::empty({H, N}, pos_weight.options());
  const int64_t frag_bytes = gpsa_fwd_pos_frag_bytes(int(H), int(N));
  at::Tensor pos_frag = at::empty({frag_bytes}, q.options().dtype(at::kByte));

  GpsaFwdParams p{};
  p.dtype = to_gpsa_dtype(q.scalar_type());
  p.B = int(B); p.H = int(H); p.N = int(N); p.D = int(D); p.rows = int(rows); p.cols = int(cols);
  p.scale = scale;
  p.q = q.const_data_ptr(); p.q_stride = strides_of(q);
  p.k = k.const_data_ptr(); p.k_stride = strides_of(k);
  p.v = v.const_data_ptr(); p.v_stride = strides_of(v);
  p.pos_weight = pos_weight.const_data_ptr();
  p.gating = gating.const_data_ptr();
  p.out = out.data_ptr(); p.out_stride = strides_of(out);
  p.lse = lse.data_ptr();
  p.pos_lse = pos_lse.data_ptr();
  p.pos_frag = frag_bytes > 0 ? pos_frag.data_ptr() : nullptr;
  check_launch("gpsa_fwd", gpsa_fwd_launch(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gpsa_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& pos_weight_in, const at::Tensor& gating_in, const at::Tensor& lse_in, int64_t rows,
    int64_t cols, double scale) {
  check_common("gpsa_bwd", q_in, k_in, v_in, pos_weight_in, gating_in, rows, cols, scale);
  check_gpsa_bwd_args(at::kCUDA, grad_out_in, lse_in, q_in, pos_weight_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor grad_out = last_dim_contiguous(grad_out_in);
  const at::Tensor pos_weight = pos_weight_in.contiguous(), gating = gating_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor gq = at::empty({B, N, H, D}, q.options()).transpose(1, 2);
  at::Tensor gk = at::empty({B, N, H, D}, q.options()).transpose(1, 2);
  at::Tensor gv = at::empty({B, N, H, D}, q.options()).transpose(1, 2);
  at::Tensor gw = at::empty({H, 3}, pos_weight.options());
  at::Tensor gg = at::empty({H}, gating.options());
  if (B == 0) {  // no terms: the parameter gradients are exact zeros
    gw.zero_();
    gg.zero_();
    return {gq, gk, gv, gw, gg};
  }
  const GpsaBwdWorkspace ws = gpsa_bwd_workspace_sizes(int(B), int(H), int(N));
  at::Tensor pos_lse = at::empty({ws.pos_lse}, pos_weight.options());
  at::Tensor delta_c = at::empty({ws.delta_c}, pos_weight.options());
  at::Tensor partials = at::empty({ws.partials}, pos_weight.options());

  GpsaBwdParams p{};
  p.dtype = to_gpsa_dtype(q.scalar_type());
  p.B = int(B); p.H = int(H); p.N = int(N); p.D = int(D); p.rows = int(rows); p.cols = int(cols);
  p.scale = scale;
  p.grad_out = grad_out.const_data_ptr(); p.grad_out_stride = strides_of(grad_out);
  p.q = q.const_data_ptr(); p.q_stride = strides_of(q);
  p.k = k.const_data_ptr(); p.k_stride = strides_of(k);
  p.v = v.const_data_ptr(); p.v_stride = strides_of(v);
  p.pos_weight = pos_weight.const_data_ptr();
  p.gating = gating.const_data_ptr();
  p.lse = lse.const_data_ptr();
  p.grad_q = gq.data_ptr(); p.grad_q_stride = strides_of(gq);
  p.grad_k = gk.data_ptr(); p.grad_k_stride = strides_of(gk);
  p.grad_v = gv.data_ptr(); p.grad_v_stride = strides_of(gv);
  p.grad_pos_weight = gw.data_ptr();
  p.grad_gating = gg.data_ptr();
  p.pos_lse = pos_lse.data_ptr();
  p.delta_c = delta_c.data_ptr();
  p.partials = partials.data_ptr();
  check_launch("gpsa_bwd", gpsa_bwd_launch(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {gq, gk, gv, gw, gg};
}

TORCH_LIBRARY_IMPL(convit_kernels, CUDA, m) {
  m.impl("gpsa_fwd", &gpsa_fwd_cuda);
  m.impl("gpsa_bwd", &gpsa_bwd_cuda);
}

}  // namespace convit_kernels::cuda
