// A tiny CPU emulator of the CUDA features the GPSA kernels use, so that the .cu sources run (and
// are checked against the reference) on a machine without a GPU: tests/test_cuda_emulated.py.
//
// Each CTA runs its threads as cooperative fibers (ucontext) in one OS thread, CTAs one after the
// other. __syncthreads and warp shuffles are real barriers: a thread stops there until every
// thread of its block / warp arrives, so a missing barrier or a wrong lane index shows up as a
// wrong result. Dynamic shared memory starts filled with NaN bytes, so reading shared memory that
// was never written poisons the output. Not emulated: fp16/bf16 rounding (the types hold a float;
// only float32 and float64 are checked), memory-model races between unsynchronised threads.
// Force-included (g++ -include) ahead of the kernels; cuda_runtime.h & co. are empty stand-ins.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <vector>

using std::exp;
using std::fma;
using std::fmax;
using std::log;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // static __shared__ arrays: one copy, CTAs run one at a time

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct EmuStream* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct __half { float f; };
struct __nv_bfloat16 { float f; };
inline float __half2float(__half h) { return h.f; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.f; }
inline __half __float2half_rn(float f) { return __half{f}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{f}; }

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
};

struct Barrier {
  int count = 0, arrived = 0;
  long generation = 0;
};

struct State {
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::vector<Fiber> fibers;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<double> shuffle;  // one slot per thread (values up to 8 bytes)
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
  dim3 block_idx, grid_dim, block_dim;
};
inline State& state() {
  static State s;
  return s;
}

inline void yield() { swapcontext(&state().current->ctx, &state().scheduler); }

inline void wait(Barrier& b) {
  const long gen = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  s.current->done = true;
  swapcontext(&s.current->ctx, &s.scheduler);
}

inline void run_block(const std::function<void()>& body, unsigned nthreads, size_t smem_bytes) {
  State& s = state();
  constexpr size_t kStack = 256 * 1024;
  s.fibers.resize(nthreads);
  s.block = Barrier{int(nthreads), 0, 0};
  s.warps.assign((nthreads + 31) / 32, Barrier{});
  for (unsigned w = 0; w < s.warps.size(); ++w) s.warps[w].count = int(std::min(32u, nthreads - 32 * w));
  s.shuffle.assign(nthreads, 0.0);
  s.smem.assign(smem_bytes + 64, 0xFF);  // NaN bytes: unwritten shared memory poisons the result
  s.body = &body;
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.stack.resize(kStack);
    f.tid = dim3(t, 0, 0);
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool any = false;
    for (Fiber& f : s.fibers) {
      if (f.done) continue;
      any = true;
      s.current = &f;
      swapcontext(&s.scheduler, &f.ctx);
    }
    if (!any) break;
  }
  s.current = nullptr;
}

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    State& s = state();
    s.grid_dim = grid;
    s.block_dim = block;
    const std::function<void()> body = [&]() { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          s.block_idx = dim3(x, y, z);
          run_block(body, block.x, smem);
        }
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<Kernel>{kernel, grid, block, smem};
}

inline unsigned char* dynamic_smem() {
  // 64-byte aligned start inside the block's buffer
  uintptr_t p = reinterpret_cast<uintptr_t>(state().smem.data());
  return reinterpret_cast<unsigned char*>((p + 63) & ~uintptr_t(63));
}

}  // namespace emu

#define threadIdx (emu::state().current->tid)
#define blockIdx (emu::state().block_idx)
#define gridDim (emu::state().grid_dim)
#define blockDim (emu::state().block_dim)

inline void __syncthreads() { emu::wait(emu::state().block); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emu: only full-warp shuffles are emulated\n");
    std::abort();
  }
  emu::State& s = emu::state();
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  emu::wait(s.warps[warp]);  // every lane has read the previous shuffle
  std::memcpy(&s.shuffle[t], &value, sizeof(T));
  emu::wait(s.warps[warp]);  // every lane has written this one
  T out;
  std::memcpy(&out, &s.shuffle[warp * 32 + (lane ^ unsigned(lane_mask))], sizeof(T));
  return out;
}
