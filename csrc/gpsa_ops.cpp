// The convit_kernels op library: the schemas of the fused GPSA ops, shared by every kernel
// (CPU: csrc/cpu/, CUDA: csrc/cuda/, registered there with TORCH_LIBRARY_IMPL), and the Python
// module stub that lets `import convit_kernels._C` load them.
//
//   gpsa_fwd(q, k, v, pos_weight, gating, rows, cols, scale) -> (out, lse)
//   gpsa_bwd(grad_out, q, k, v, pos_weight, gating, lse, rows, cols, scale)
//       -> (grad_q, grad_k, grad_v, grad_pos_weight, grad_gating)
//
// q, k, v, grad_out: (B, H, N, D), last dim contiguous. out and the grads of q, k, v: (B, H, N, D)
// views of contiguous (B, N, H, D) storage. lse: (B, H, N) in the accumulation dtype (float64 for
// float64 inputs, else float32), as are pos_weight (H, 3), gating (H,) and their gradients.
// pos_bias never reaches the kernels: it cancels in the softmax (its gradient is zero).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

extern "C" {
// `import convit_kernels._C` only needs a module object; loading the library runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace convit_kernels::cpu {
std::string cpu_isa();                      // csrc/cpu/gpsa_cpu_isa.cpp
std::vector<std::string> cpu_isa_levels();  // csrc/cpu/gpsa_cpu_isa.cpp
}

namespace {
bool built_with_cuda() {
#ifdef CONVIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(convit_kernels, m) {
  m.def("gpsa_fwd(Tensor q, Tensor k, Tensor v, Tensor pos_weight, Tensor gating, int rows, int cols, "
        "float scale) -> (Tensor out, Tensor lse)");
  m.def("gpsa_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor pos_weight, Tensor gating, Tensor lse, "
        "int rows, int cols, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
        "Tensor grad_pos_weight, Tensor grad_gating)");
  // Whether this build compiled the CUDA kernels (CONVIT_WITH_CUDA).
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // The ISA level the CPU ops run at ("avx512", "avx2" or "portable"; csrc/cpu/gpsa_cpu.h), and the
  // levels this CPU and build can run (CONVIT_KERNELS_CPU_ISA picks one of them).
  m.def("cpu_isa() -> str", &convit_kernels::cpu::cpu_isa);
  m.def("cpu_isa_levels() -> str[]", &convit_kernels::cpu::cpu_isa_levels);
}
