// C entry points of the emulated CUDA GPSA launchers, called through ctypes by
// tests/test_cuda_emulated.py. Sizes: {B, H, N, D, rows, cols}; strides: (b, h, n) triples.
#include "gpsa_cuda.h"

using namespace convit_kernels::cuda;

namespace {
Strides3 triple(const int64_t* s) { return Strides3{s[0], s[1], s[2]}; }
}  // namespace

extern "C" {

void emu_bwd_workspace(int B, int H, int N, int64_t* sizes3) {
  const GpsaBwdWorkspace ws = gpsa_bwd_workspace_sizes(B, H, N);
  sizes3[0] = ws.pos_lse;
  sizes3[1] = ws.delta_c;
  sizes3[2] = ws.partials;
}

// strides: q, k, v, out (12 values)
int emu_gpsa_fwd(int dtype, const int* sz, double scale, const void* q, const void* k, const void* v,
                 const int64_t* strides, const void* pos_weight, const void* gating, void* out, void* lse,
                 void* pos_lse) {
  GpsaFwdParams p{};
  p.dtype = GpsaDtype(dtype);
  p.B = sz[0]; p.H = sz[1]; p.N = sz[2]; p.D = sz[3]; p.rows = sz[4]; p.cols = sz[5];
  p.scale = scale;
  p.q = q; p.q_stride = triple(strides + 0);
  p.k = k; p.k_stride = triple(strides + 3);
  p.v = v; p.v_stride = triple(strides + 6);
  p.out = out; p.out_stride = triple(strides + 9);
  p.pos_weight = pos_weight; p.gating = gating; p.lse = lse; p.pos_lse = pos_lse;
  return int(gpsa_fwd_launch(p, nullptr));
}

// strides: grad_out, q, k, v, grad_q, grad_k, grad_v (21 values)
int emu_gpsa_bwd(int dtype, const int* sz, double scale, const void* grad_out, const void* q, const void* k,
                 const void* v, const int64_t* strides, const void* pos_weight, const void* gating,
                 const void* lse, void* grad_q, void* grad_k, void* grad_v, void* grad_pos_weight,
                 void* grad_gating, void* pos_lse, void* delta_c, void* partials) {
  GpsaBwdParams p{};
  p.dtype = GpsaDtype(dtype);
  p.B = sz[0]; p.H = sz[1]; p.N = sz[2]; p.D = sz[3]; p.rows = sz[4]; p.cols = sz[5];
  p.scale = scale;
  p.grad_out = grad_out; p.grad_out_stride = triple(strides + 0);
  p.q = q; p.q_stride = triple(strides + 3);
  p.k = k; p.k_stride = triple(strides + 6);
  p.v = v; p.v_stride = triple(strides + 9);
  p.grad_q = grad_q; p.grad_q_stride = triple(strides + 12);
  p.grad_k = grad_k; p.grad_k_stride = triple(strides + 15);
  p.grad_v = grad_v; p.grad_v_stride = triple(strides + 18);
  p.pos_weight = pos_weight; p.gating = gating; p.lse = lse;
  p.grad_pos_weight = grad_pos_weight; p.grad_gating = grad_gating;
  p.pos_lse = pos_lse; p.delta_c = delta_c; p.partials = partials;
  return int(gpsa_bwd_launch(p, nullptr));
}

}  // extern "C"
