// The CPU registration of convit_kernels::gpsa_fwd / gpsa_bwd (schemas in csrc/gpsa_ops.cpp) and the
// glue the two ops share; their argument checks are csrc/gpsa_checks.h, shared with the CUDA glue.
#include "gpsa_cpu.h"

#include <torch/library.h>

namespace convit_kernels::cpu {

at::Tensor rows_usable(const at::Tensor& t) {
  // The products need unit stride along D and a row stride of at least D.
  if (t.stride(3) == 1 && t.stride(2) >= t.size(3)) return t;
  return t.contiguous();
}

TORCH_LIBRARY_IMPL(convit_kernels, CPU, m) {
  m.impl("gpsa_fwd", &gpsa_fwd_cpu);
  m.impl("gpsa_bwd", &gpsa_bwd_cpu);
}

}  // namespace convit_kernels::cpu
