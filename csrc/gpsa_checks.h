// Argument checks of the convit_kernels ops (schemas in gpsa_ops.cpp), shared by every kernel's torch
// glue so that a bad call fails with the same error on every device. Torch headers only (no CUDA):
// the CPU glue (cpu/gpsa_fwd_cpu.cpp, cpu/gpsa_bwd_cpu.cpp) and the CUDA glue (cuda/gpsa_cuda.cpp)
// both include it. A kernel adds its own limits (the CUDA one: head dim, grid sizes) after these.
//
// Errors name the op and the argument: ValueError (TORCH_CHECK_VALUE) for shapes, devices and values,
// TypeError (TORCH_CHECK_TYPE) for dtypes.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

namespace convit_kernels {

// `t` (called `name`) must be on the kernel's device type and on q's device.
inline void check_gpsa_device(const char* op, c10::DeviceType kernel_device, const char* name, const at::Tensor& t,
                              const at::Tensor& q) {
  const std::string dev = c10::DeviceTypeName(kernel_device);
  TORCH_CHECK_VALUE(t.device().type() == kernel_device, op, " (", dev, " kernel): ", name, " must be a ", dev,
                    " tensor; got ", t.device());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on the device of q (", q.device(), "); got ",
                    t.device());
}

// The arguments shared by gpsa_fwd and gpsa_bwd: q, k, v (B, H, N, D) of one floating dtype (float64,
// float32, float16, bfloat16) on the kernel's device; pos_weight (H, 3) and gating (H,) in the
// accumulation dtype (float64 for float64 inputs, else float32) on the same device;
// rows * cols == N; a finite scale.
inline void check_gpsa_args(const char* op, c10::DeviceType kernel_device, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& pos_weight, const at::Tensor& gating, int64_t rows,
                            int64_t cols, double scale) {
  const std::pair<const char*, const at::Tensor*> qkv[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : qkv) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must have shape (B, H, N, D); got ", t->sizes());
    check_gpsa_device(op, kernel_device, name, *t, q);
  }
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, " (",
                   c10::DeviceTypeName(kernel_device), " kernel): q must be float64, float32, float16 or bfloat16; got ",
                   dt);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have the shape of q ",
                    q.sizes(), "; got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have the dtype of q (", dt,
                   "); got ", k.scalar_type(), " and ", v.scalar_type());
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(H >= 1 && N >= 1 && D >= 1, op, ": q must have H, N and D >= 1; got ", q.sizes());
  TORCH_CHECK_VALUE(rows >= 1 && cols >= 1 && rows * cols == N, op, ": rows * cols must equal N = ", N,
                    "; got rows=", rows, ", cols=", cols);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const std::pair<const char*, const at::Tensor*> params[] = {{"pos_weight", &pos_weight}, {"gating", &gating}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK_TYPE(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation dtype of ", dt,
                     " inputs); got ", t->scalar_type());
    check_gpsa_device(op, kernel_device, name, *t, q);
  }
  TORCH_CHECK_VALUE(pos_weight.dim() == 2 && pos_weight.size(0) == H && pos_weight.size(1) == 3, op,
                    ": pos_weight must have shape (H, 3) = (", H, ", 3); got ", pos_weight.sizes());
  TORCH_CHECK_VALUE(gating.dim() == 1 && gating.size(0) == H, op, ": gating must have shape (H,) = (", H, ",); got ",
                    gating.sizes());
}

// What gpsa_bwd takes besides check_gpsa_args' arguments (call that first): grad_out of q's shape,
// dtype and device; lse (B, H, N) in pos_weight's dtype (the accumulation dtype) on q's device.
inline void check_gpsa_bwd_args(c10::DeviceType kernel_device, const at::Tensor& grad_out, const at::Tensor& lse,
                                const at::Tensor& q, const at::Tensor& pos_weight) {
  const char* op = "gpsa_bwd";
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), op, ": grad_out must have the shape of q ", q.sizes(), "; got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type(), op, ": grad_out must have the dtype of q (",
                   q.scalar_type(), "); got ", grad_out.scalar_type());
  check_gpsa_device(op, kernel_device, "grad_out", grad_out, q);
  check_gpsa_device(op, kernel_device, "lse", lse, q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N, op,
                    ": lse must have shape (B, H, N) = (", B, ", ", H, ", ", N, "); got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == pos_weight.scalar_type(), op, ": lse must be ", pos_weight.scalar_type(),
                   "; got ", lse.scalar_type());
}

}  // namespace convit_kernels
