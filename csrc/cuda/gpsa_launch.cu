// The launchers of gpsa_cuda.h: argument sizes, the path each call takes, and the kernels every
// path shares (the positional softmax statistics, the backward's reduction of the partial sums).
// No torch header. The paths:
//   forward:  fp16/bf16 with D % 16 == 0 on sm_80+: the mma.sync whole-row kernel for
//             N <= kWholeRowMaxN (gpsa_fwd_mma_sync.cu), the WMMA tiled kernel for larger N or
//             where shared memory is short (gpsa_fwd_mma.cu); otherwise the SIMT kernels
//             (gpsa_fwd_simt.cu: whole-row for N <= kWholeRowMaxN, tiled beyond).
//   backward: the same split (gpsa_bwd_mma.cu, gpsa_bwd_simt.cu): a dQ kernel that also writes the
//             partial sums of dw and dg, a dK/dV kernel, then gpsa_bwd_reduce_kernel here.
#include "gpsa_common.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

// One warp per (h, query row i): pos_lse[h, i] = logsumexp_j z_ij, two passes over the keys.
// Grid: (ceil(N / kWarps), H); block: kThreads.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) gpsa_pos_lse_kernel(const Acc* __restrict__ pos_weight, int N, int cols,
                                                                Acc* __restrict__ pos_lse) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int h = blockIdx.y;
  const int i = blockIdx.x * kWarps + warp;
  if (i >= N) return;  // warp-uniform: no shuffle below is left half-populated
  const Acc w[3] = {pos_weight[h * 3 + 0], pos_weight[h * 3 + 1], pos_weight[h * 3 + 2]};
  Acc m = neg_inf<Acc>();
  for (int j = lane; j < N; j += 32) m = fmax(m, pos_logit(w, grid_offset(i, j, cols)));
  m = warp_max(m);  // finite: key j = 0 exists
  Acc l = Acc(0);
  for (int j = lane; j < N; j += 32) l += acc_exp(pos_logit(w, grid_offset(i, j, cols)) - m);
  l = warp_sum(l);
  if (lane == 0) pos_lse[int64_t(h) * N + i] = m + acc_log(l);
}

// One CTA per head: grad_pos_weight[h] and grad_gating[h] from the per-CTA partial sums of the
// dQ kernel, each thread adding a fixed strided subset, then a fixed tree. Grid: (H); block: kThreads.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) gpsa_bwd_reduce_kernel(const Acc* __restrict__ partials,
                                                                   int64_t num_partials,
                                                                   const Acc* __restrict__ gating,
                                                                   Acc* __restrict__ grad_pos_weight,
                                                                   Acc* __restrict__ grad_gating) {
  __shared__ Acc scratch[kThreads];
  const int h = blockIdx.x;
  const Acc* part = partials + int64_t(h) * num_partials * kPartials;
  for (int c = 0; c < kPartials; ++c) {
    Acc x = Acc(0);
    for (int64_t p = threadIdx.x; p < num_partials; p += kThreads) x += part[p * kPartials + c];
    const Acc total = block_sum(x, scratch);
    if (threadIdx.x == 0) {
      if (c < 3) {
        grad_pos_weight[h * 3 + c] = total;
      } else {
        const Acc s = sigmoid(gating[h]);
        grad_gating[h] = s * (Acc(1) - s) * total;
      }
    }
  }
}

template <typename T>
cudaError_t fwd_typed(const GpsaFwdParams& p, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const GpsaDtype acc_dtype = sizeof(Acc) == 8 ? GpsaDtype::kFloat64 : GpsaDtype::kFloat32;
  cudaError_t err = gpsa_pos_lse_launch(acc_dtype, p.pos_weight, p.H, p.N, p.rows, p.cols, p.pos_lse, stream);
  if (err != cudaSuccess) return err;
  FwdArgs<T> a;
  a.q = static_cast<const T*>(p.q); a.qs = p.q_stride;
  a.k = static_cast<const T*>(p.k); a.ks = p.k_stride;
  a.v = static_cast<const T*>(p.v); a.vs = p.v_stride;
  a.pos_weight = static_cast<const Acc*>(p.pos_weight);
  a.gating = static_cast<const Acc*>(p.gating);
  a.out = static_cast<T*>(p.out); a.os = p.out_stride;
  a.lse = static_cast<Acc*>(p.lse);
  a.pos_lse = static_cast<const Acc*>(p.pos_lse);
  a.pos_frag = p.pos_frag;
  a.B = p.B; a.H = p.H; a.N = p.N; a.D = p.D; a.rows = p.rows; a.cols = p.cols;
  a.scale = Acc(p.scale);
  if constexpr (sizeof(T) == 2) {  // WMMA takes fp16 / bf16 operands only
    if (p.D % 16 == 0 && device_is_sm80_or_newer()) {
      if (p.pos_frag != nullptr && fwd_mma_sync_takes(p.N, p.D)) return fwd_mma_sync_launch<T>(a, stream);
      return fwd_mma_launch<T>(a, stream);
    }
  }
  return fwd_simt_launch<T>(a, stream);
}

template <typename T>
cudaError_t bwd_typed(const GpsaBwdParams& p, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const GpsaDtype acc_dtype = sizeof(Acc) == 8 ? GpsaDtype::kFloat64 : GpsaDtype::kFloat32;
  cudaError_t err = gpsa_pos_lse_launch(acc_dtype, p.pos_weight, p.H, p.N, p.rows, p.cols, p.pos_lse, stream);
  if (err != cudaSuccess) return err;
  BwdArgs<T> a;
  a.go = static_cast<const T*>(p.grad_out); a.gos = p.grad_out_stride;
  a.q = static_cast<const T*>(p.q); a.qs = p.q_stride;
  a.k = static_cast<const T*>(p.k); a.ks = p.k_stride;
  a.v = static_cast<const T*>(p.v); a.vs = p.v_stride;
  a.pos_weight = static_cast<const Acc*>(p.pos_weight);
  a.gating = static_cast<const Acc*>(p.gating);
  a.lse = static_cast<const Acc*>(p.lse);
  a.pos_lse = static_cast<const Acc*>(p.pos_lse);
  a.dq = static_cast<T*>(p.grad_q); a.dqs = p.grad_q_stride;
  a.dk = static_cast<T*>(p.grad_k); a.dks = p.grad_k_stride;
  a.dv = static_cast<T*>(p.grad_v); a.dvs = p.grad_v_stride;
  a.delta_c = static_cast<Acc*>(p.delta_c);
  a.partials = static_cast<Acc*>(p.partials);
  a.B = p.B; a.H = p.H; a.N = p.N; a.D = p.D; a.rows = p.rows; a.cols = p.cols;
  a.scale = Acc(p.scale);

  bool tensor_cores = false;
  if constexpr (sizeof(T) == 2) tensor_cores = p.D % 16 == 0 && device_is_sm80_or_newer();
  if (tensor_cores) {
    if constexpr (sizeof(T) == 2) err = bwd_mma_launch<T>(a, stream);
  } else {
    err = bwd_simt_launch<T>(a, stream);
  }
  if (err != cudaSuccess) return err;
  // One partial per dQ CTA: 64 query rows in the whole-row tensor-core kernel, kBwdBlockM otherwise.
  const int rows_per_cta = tensor_cores && bwd_mma_takes_rows64(p.N, p.D, sizeof(T)) ? kRows64 : kBwdBlockM;
  const int64_t num_partials = int64_t(p.B) * ceil_div(p.N, rows_per_cta);
  gpsa_bwd_reduce_kernel<Acc><<<p.H, kThreads, 0, stream>>>(a.partials, num_partials, a.gating,
                                                            static_cast<Acc*>(p.grad_pos_weight),
                                                            static_cast<Acc*>(p.grad_gating));
  return cudaGetLastError();
}

}  // namespace detail

const char* gpsa_check_sizes(int B, int H, int N, int D, int rows, int cols) {
  if (B < 0 || H < 1 || N < 1 || D < 1) return "gpsa cuda: need B >= 0 and H, N, D >= 1";
  if (D > kMaxHeadDim) return "gpsa cuda: head dim D must be <= 128";
  if (rows < 1 || cols < 1 || int64_t(rows) * cols != N) return "gpsa cuda: rows * cols must equal N";
  if (H > 65535 || B > 65535) return "gpsa cuda: B and H must each be <= 65535 (CUDA grid limits)";
  return nullptr;
}

cudaError_t gpsa_pos_lse_launch(GpsaDtype dtype, const void* pos_weight, int H, int N, int rows, int cols,
                                void* pos_lse, cudaStream_t stream) {
  (void)rows;  // the grid geometry needs only cols (row-major patches)
  const dim3 grid(detail::ceil_div(N, detail::kWarps), H);
  if (dtype == GpsaDtype::kFloat64)
    detail::gpsa_pos_lse_kernel<double><<<grid, detail::kThreads, 0, stream>>>(
        static_cast<const double*>(pos_weight), N, cols, static_cast<double*>(pos_lse));
  else
    detail::gpsa_pos_lse_kernel<float><<<grid, detail::kThreads, 0, stream>>>(
        static_cast<const float*>(pos_weight), N, cols, static_cast<float*>(pos_lse));
  return cudaGetLastError();
}

cudaError_t gpsa_fwd_launch(const GpsaFwdParams& p, cudaStream_t stream) {
  if (gpsa_check_sizes(p.B, p.H, p.N, p.D, p.rows, p.cols) != nullptr) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  switch (p.dtype) {
    case GpsaDtype::kFloat32: return detail::fwd_typed<float>(p, stream);
    case GpsaDtype::kFloat16: return detail::fwd_typed<__half>(p, stream);
    case GpsaDtype::kBFloat16: return detail::fwd_typed<__nv_bfloat16>(p, stream);
    case GpsaDtype::kFloat64: return detail::fwd_typed<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t gpsa_fwd_pos_frag_bytes(int H, int N) {
  if (N > kWholeRowMaxN) return 0;
  const int64_t n16 = detail::ceil_div(N, 16) * 16;
  return int64_t(H) * n16 * n16 * 2;
}

GpsaBwdWorkspace gpsa_bwd_workspace_sizes(int B, int H, int N) {
  GpsaBwdWorkspace ws;
  ws.pos_lse = int64_t(H) * N;
  ws.delta_c = int64_t(B) * H * N;
  ws.partials = int64_t(H) * B * detail::ceil_div(N, detail::kBwdBlockM) * detail::kPartials;
  return ws;
}

cudaError_t gpsa_bwd_launch(const GpsaBwdParams& p, cudaStream_t stream) {
  if (gpsa_check_sizes(p.B, p.H, p.N, p.D, p.rows, p.cols) != nullptr) return cudaErrorInvalidValue;
  if (p.B == 0) {  // no batch: the parameter gradients are exact zeros, written by the glue
    return cudaSuccess;
  }
  switch (p.dtype) {
    case GpsaDtype::kFloat32: return detail::bwd_typed<float>(p, stream);
    case GpsaDtype::kFloat16: return detail::bwd_typed<__half>(p, stream);
    case GpsaDtype::kBFloat16: return detail::bwd_typed<__nv_bfloat16>(p, stream);
    case GpsaDtype::kFloat64: return detail::bwd_typed<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace convit_kernels
