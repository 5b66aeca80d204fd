// Warp-level tensor-core and async-copy primitives of the mma.sync kernels (sm_80+), one place for
// the inline PTX: mma.sync.aligned.m16n8k16 (fp16 / bf16 inputs, fp32 accumulation), ldmatrix
// (x1 / x2 / x4, with and without .trans) and cp.async (16 bytes, zero-fill, commit / wait groups).
// Under the CPU emulator (tests/cuda_emulator, CONVIT_CUDA_EMULATOR) the same calls are the
// emulator's warp-collective C++, with the PTX ISA's per-lane fragment layouts:
//   A (16 x 16, row):  a[r] holds (row g + 8 (r % 2), cols 2 t + 8 (r / 2) + {0, 1})
//   B (16 x 8, col):   b[r] holds (k 2 t + 8 r + {0, 1}, col g)
//   C, D (16 x 8 f32): c[i] is (row g + 8 (i / 2), col 2 t + i % 2)
// with g = lane / 4, t = lane % 4; the lower 16 bits of a register hold the lower column / k.
// ldmatrix m8n8: lanes 8 m .. 8 m + 7 give the row addresses of matrix m; register m of lane l
// receives (row l / 4, cols 2 (l % 4) + {0, 1}) of matrix m, or with .trans its transpose
// (rows 2 (l % 4) + {0, 1}, col l / 4).
#pragma once

#include "gpsa_common.cuh"

namespace convit_kernels {
namespace cuda {
namespace detail {

// Two fp32 values rounded to T and packed: lo in the lower 16 bits (one cvt on the device).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
#elif defined(CONVIT_CUDA_EMULATOR)
  return uint32_t(__float2half_rn(lo).bits) | uint32_t(__float2half_rn(hi).bits) << 16;
#else
  return 0u;  // nvcc's host pass: never called there
#endif
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
#elif defined(CONVIT_CUDA_EMULATOR)
  return uint32_t(__float2bfloat16_rn(lo).bits) | uint32_t(__float2bfloat16_rn(hi).bits) << 16;
#else
  return 0u;  // nvcc's host pass: never called there
#endif
}

// d += A B on one 16 x 8 x 16 tile (warp-collective; fragments as above).
template <typename T> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <> __device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::mma_m16n8k16(d, a, b, false);
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::mma_m16n8k16(d, a, b, true);
#endif
}

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix .x4 / .x2 / .x1 (.trans): `row` is this lane's row address (16-byte aligned, shared).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::ldmatrix(r, 4, false, row);
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::ldmatrix(r, 4, true, row);
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::ldmatrix(r, 2, false, row);
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::ldmatrix(r, 2, true, row);
#endif
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_addr(row)));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::ldmatrix(r, 1, false, row);
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_addr(row)));
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::ldmatrix(r, 1, true, row);
#endif
}

// cp.async of 16 bytes global -> shared (both 16-byte aligned), bypassing L1; valid == false
// writes 16 zero bytes and reads nothing (src must still be a valid address to form).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::cp_async_16(dst, src, valid);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::cp_async_commit();
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" :: "n"(kPending) : "memory");
#elif defined(CONVIT_CUDA_EMULATOR)
  emu::cp_async_wait(kPending);
#endif
}

// cp_async_wait with a run-time count (the number of key tiles is known at run time only); waiting
// for more groups than asked is always correct, so counts above 7 wait for all.
__device__ __forceinline__ void cp_async_wait_upto(int pending) {
  switch (pending) {
    case 7: cp_async_wait<7>(); break;
    case 6: cp_async_wait<6>(); break;
    case 5: cp_async_wait<5>(); break;
    case 4: cp_async_wait<4>(); break;
    case 3: cp_async_wait<3>(); break;
    case 2: cp_async_wait<2>(); break;
    case 1: cp_async_wait<1>(); break;
    default: cp_async_wait<0>(); break;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace convit_kernels
