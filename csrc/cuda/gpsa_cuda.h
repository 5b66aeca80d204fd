// Launchers of the fused GPSA CUDA kernels: plain C++ (raw pointers, strides, sizes, a stream).
//
// No torch header here or in the .cu files, so nvcc compiles them on a machine without a CUDA
// build of torch (tests/test_cuda_compile.py). gpsa_cuda.cpp is the torch glue that calls these.
//
// Conventions shared by every launcher:
//   q, k, v, grad_out, grad_q, grad_k, grad_v, out: logical (B, H, N, D) tensors addressed as
//     ptr[b * stride_b + h * stride_h + n * stride_n + d]: any strides, last dim contiguous.
//   lse: (B, H, N) contiguous, the content-softmax log-sum-exp of the scaled logits.
//   pos_weight: (H, 3) contiguous; gating: (H,) contiguous (the raw gating_param).
//   "acc" dtype: float64 for float64 inputs, float32 otherwise. lse, pos_weight, gating,
//     grad_pos_weight, grad_gating and every workspace are in the acc dtype.
// Every launcher returns cudaSuccess or the error of its first failing launch (the caller checks).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace convit_kernels {
namespace cuda {

enum class GpsaDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Largest head dim the kernels accept (register arrays are sized for it).
constexpr int kMaxHeadDim = 128;
// N up to this takes the forward whole-row path; larger N the tiled online-softmax path.
constexpr int kWholeRowMaxN = 256;

struct Strides3 {
  int64_t b, h, n;  // element strides of the B, H, N dims; the D dim has stride 1
};

struct GpsaFwdParams {
  GpsaDtype dtype;
  int B, H, N, D, rows, cols;
  double scale;
  const void* q; Strides3 q_stride;
  const void* k; Strides3 k_stride;
  const void* v; Strides3 v_stride;
  const void* pos_weight;  // (H, 3), acc dtype
  const void* gating;      // (H,), acc dtype
  void* out; Strides3 out_stride;  // q's dtype
  void* lse;                       // (B, H, N), acc dtype
  void* pos_lse;  // workspace (H, N), acc dtype: the positional softmax log-sum-exp
  // workspace of gpsa_fwd_pos_frag_bytes(H, N) bytes, 16-byte aligned (may be null where that is 0):
  // the mma.sync forward's batch-independent s P_pos, in q's dtype, in mma A-fragment order
  void* pos_frag;
};

// Bytes of GpsaFwdParams::pos_frag: H x ceil16(N)^2 16-bit values for N <= kWholeRowMaxN, else 0.
int64_t gpsa_fwd_pos_frag_bytes(int H, int N);

struct GpsaBwdParams {
  GpsaDtype dtype;
  int B, H, N, D, rows, cols;
  double scale;
  const void* grad_out; Strides3 grad_out_stride;
  const void* q; Strides3 q_stride;
  const void* k; Strides3 k_stride;
  const void* v; Strides3 v_stride;
  const void* pos_weight;  // (H, 3), acc dtype
  const void* gating;      // (H,), acc dtype
  const void* lse;         // (B, H, N), acc dtype, from the forward
  void* grad_q; Strides3 grad_q_stride;
  void* grad_k; Strides3 grad_k_stride;
  void* grad_v; Strides3 grad_v_stride;
  void* grad_pos_weight;   // (H, 3), acc dtype
  void* grad_gating;       // (H,), acc dtype
  // Workspaces, acc dtype, sizes from gpsa_bwd_workspace_sizes.
  void* pos_lse;   // (H, N)
  void* delta_c;   // (B, H, N): rowsum(P_content * dM) = grad_out . o_content
  void* partials;  // (H, num_partials, 4): per-CTA sums of dZ*dx, dZ*dy, dZ*(dx^2+dy^2), Delta_p - Delta_c
};

struct GpsaBwdWorkspace {
  int64_t pos_lse, delta_c, partials;  // element counts
};

GpsaBwdWorkspace gpsa_bwd_workspace_sizes(int B, int H, int N);

// Validates the sizes (D <= kMaxHeadDim, grid limits); returns nullptr or a message for the caller.
const char* gpsa_check_sizes(int B, int H, int N, int D, int rows, int cols);

// The positional softmax statistics, once per call (they do not depend on the batch):
// pos_lse[h, i] = logsumexp_j(pos_weight[h] . r_ij). pos_weight, pos_lse: float or double.
cudaError_t gpsa_pos_lse_launch(GpsaDtype dtype, const void* pos_weight, int H, int N, int rows, int cols,
                                void* pos_lse, cudaStream_t stream);

cudaError_t gpsa_fwd_launch(const GpsaFwdParams& p, cudaStream_t stream);
cudaError_t gpsa_bwd_launch(const GpsaBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace convit_kernels
