// C entry points of the emulated CUDA GPSA launchers, called through ctypes by
// tests/test_cuda_emulated.py. Sizes: {B, H, N, D, rows, cols}; strides: (b, h, n) triples.
#include <vector>

#include "gpsa_cuda.h"
#include "gpsa_mma.cuh"

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
  // the positional-fragment workspace, NaN-filled (0xFF bytes) as torch's empty may leave it
  std::vector<uint4> frag((gpsa_fwd_pos_frag_bytes(p.H, p.N) + 15) / 16, make_uint4(~0u, ~0u, ~0u, ~0u));
  p.pos_frag = frag.empty() ? nullptr : frag.data();
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

// ---- the warp primitives of gpsa_mma.cuh, one warp, for tests/test_cuda_emulated.py ----

// d (32 lanes x 4) += A B from per-lane fragments a (32 x 4 registers) and b (32 x 2).
void emu_test_mma(int bf16, const uint32_t* a, const uint32_t* b, float* d) {
  auto kernel = [](int is_bf16, const uint32_t* fa, const uint32_t* fb, float* fd) {
    const int lane = threadIdx.x;
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = fd[lane * 4 + i];
    if (is_bf16) detail::mma16816<__nv_bfloat16>(acc, fa + lane * 4, fb + lane * 2);
    else detail::mma16816<__half>(acc, fa + lane * 4, fb + lane * 2);
    for (int i = 0; i < 4; ++i) fd[lane * 4 + i] = acc[i];
  };
  emu::launch(+kernel, dim3(1), dim3(32))(bf16, a, b, d);
}

// ldmatrix of `num` 8 x 8 b16 matrices with lane l addressing row row_of_lane[l] of `rows`
// (n_rows x 8 values, copied to shared memory); out: 32 lanes x 4 registers.
void emu_test_ldmatrix(int num, int trans, const uint16_t* rows, int n_rows, const int* row_of_lane, uint32_t* out) {
  auto kernel = [](int n, int tr, const uint16_t* src, int count, const int* lane_row, uint32_t* dst) {
    uint16_t* sm = reinterpret_cast<uint16_t*>(emu::dynamic_smem());
    const int lane = threadIdx.x;
    for (int e = lane; e < count * 8; e += 32) sm[e] = src[e];
    __syncwarp();
    uint32_t r[4] = {0u, 0u, 0u, 0u};
    const void* row = sm + 8 * lane_row[lane];
    if (n == 4) tr ? detail::ldmatrix_x4_trans(r, row) : detail::ldmatrix_x4(r, row);
    if (n == 2) tr ? detail::ldmatrix_x2_trans(r, row) : detail::ldmatrix_x2(r, row);
    if (n == 1) tr ? detail::ldmatrix_x1_trans(r, row) : detail::ldmatrix_x1(r, row);
    for (int m = 0; m < 4; ++m) dst[lane * 4 + m] = r[m];
  };
  emu::launch(+kernel, dim3(1), dim3(32), size_t(n_rows) * 16)(num, trans, rows, n_rows, row_of_lane, out);
}

// The operand path of the mma.sync kernels on one tile: D (16 x 8, fp32) = A B with A (16 x 16,
// row-major) through ldmatrix.x4 and B through ldmatrix.x2, from B^T rows (bt: 8 x 16, as K is
// stored) or, with trans, from B rows (b: 16 x 8, as V is stored) with .trans.
void emu_test_ldsm_mma(int bf16, int trans, const uint16_t* a, const uint16_t* b, float* d) {
  auto kernel = [](int is_bf16, int tr, const uint16_t* ga, const uint16_t* gb, float* gd) {
    uint16_t* sa = reinterpret_cast<uint16_t*>(emu::dynamic_smem());  // [16][24]: padded rows
    uint16_t* sb = sa + 16 * 24;                                      // [16][24]
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    for (int e = lane; e < 256; e += 32) sa[(e / 16) * 24 + e % 16] = ga[e];
    for (int e = lane; e < 128; e += 32) {
      if (tr) sb[(e / 8) * 24 + e % 8] = gb[e];    // B[k][n], 16 rows of 8
      else sb[(e / 16) * 24 + e % 16] = gb[e];     // B^T[n][k], 8 rows of 16
    }
    __syncwarp();
    uint32_t fa[4], fb[2];
    detail::ldmatrix_x4(fa, sa + ((lane & 7) + ((lane >> 3) & 1) * 8) * 24 + (lane >> 4) * 8);
    if (tr) detail::ldmatrix_x2_trans(fb, sb + ((lane & 7) + ((lane >> 3) & 1) * 8) * 24);
    else detail::ldmatrix_x2(fb, sb + (lane & 7) * 24 + ((lane >> 3) & 1) * 8);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (is_bf16) detail::mma16816<__nv_bfloat16>(acc, fa, fb);
    else detail::mma16816<__half>(acc, fa, fb);
    for (int i = 0; i < 4; ++i) gd[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
  };
  emu::launch(+kernel, dim3(1), dim3(32), size_t(2 * 16 * 24 * 2))(bf16, trans, a, b, d);
}

// cp.async: every lane copies 16 bytes of src into shared memory in two groups (lanes' first and
// second halves of the 32 x 16 bytes); seen[0 / 1 / 2]: the shared bytes after wait_group 2 (no
// group landed yet), wait_group 1 (the first landed), wait_group 0; copies of lanes with
// zero_lane[l] != 0 write zeros.
void emu_test_cp_async(const unsigned char* src, const int* zero_lane, unsigned char* seen) {
  auto kernel = [](const unsigned char* g, const int* zl, unsigned char* out) {
    unsigned char* sm = emu::dynamic_smem();
    const int lane = threadIdx.x;
    for (int e = lane; e < 1024; e += 32) sm[e] = 0xAB;
    __syncwarp();
    detail::cp_async_16(sm + 16 * lane, g + 16 * lane, zl[lane] == 0);
    detail::cp_async_commit();
    detail::cp_async_16(sm + 512 + 16 * lane, g + 512 + 16 * lane, zl[lane] == 0);
    detail::cp_async_commit();
    detail::cp_async_wait<2>();
    __syncwarp();
    for (int e = lane; e < 1024; e += 32) out[e] = sm[e];
    __syncwarp();
    detail::cp_async_wait<1>();
    __syncwarp();
    for (int e = lane; e < 1024; e += 32) out[1024 + e] = sm[e];
    __syncwarp();
    detail::cp_async_wait<0>();
    __syncwarp();
    for (int e = lane; e < 1024; e += 32) out[2048 + e] = sm[e];
  };
  emu::launch(+kernel, dim3(1), dim3(32), 1024)(src, zero_lane, seen);
}

}  // extern "C"
