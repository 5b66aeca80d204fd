// A tiny CPU emulator of the CUDA features the GPSA kernels use, so that the .cu sources run (and
// are checked against the reference) on a machine without a GPU: tests/test_cuda_emulated.py.
//
// Each CTA runs its threads as cooperative fibers (ucontext) in one OS thread, CTAs one after the
// other. __syncthreads and warp shuffles are real barriers: a thread stops there until every
// thread of its block / warp arrives, so a missing barrier or a wrong lane index shows up as a
// wrong result. Dynamic shared memory starts filled with NaN bytes, so reading shared memory that
// was never written poisons the output. fp16/bf16 are real 16-bit types (round to nearest even);
// WMMA tiles are computed whole by every lane (fp32 FMA). mma.sync m16n8k16 and ldmatrix are
// warp-collective with the PTX ISA's per-lane fragment layouts (each lane publishes its registers or
// row address, the warp meets at a barrier, each lane takes what the layout gives it), so a wrong
// lane mapping in a kernel gives a wrong result. cp.async copies are held per thread and land only
// at the cp.async.wait_group that completes their group, so a missing wait (or a missing barrier
// after it) reads NaN. Not emulated: memory-model races between unsynchronised threads, the order
// of the tensor cores' internal sums.
// Force-included (g++ -include) ahead of the kernels; cuda_runtime.h & co. are empty stand-ins.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <deque>
#include <functional>
#include <type_traits>
#include <vector>

using std::exp;
using std::fma;
using std::fmax;
using std::log;
using std::max;
using std::min;

#define CONVIT_CUDA_EMULATOR 1

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

struct alignas(8) int2 {
  int x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
// An sm_90 device (the tensor-core paths are taken) with 227 KB of opt-in shared memory per block;
// EMU_MAX_SMEM_OPTIN (bytes) overrides that, e.g. to take the paths a smaller GPU gets.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = 9;
    return cudaSuccess;
  }
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    const char* env = std::getenv("EMU_MAX_SMEM_OPTIN");
    *value = env != nullptr ? std::atoi(env) : 227 * 1024;
    return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

// 16-bit floats with the storage and round-to-nearest-even of the real types (torch tensors of
// float16 / bfloat16 are passed straight in).
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return float(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = _Float16(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t(0x7fc0)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

namespace emu {

struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
  std::vector<AsyncCopy> cp_open;               // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> cp_groups;  // committed, oldest first, not yet landed
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
  std::vector<uint32_t> xchg;   // kXchg words per thread: a warp-collective's registers
  std::vector<const void*> xptr;  // one row address per thread (ldmatrix)
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
  s.xchg.assign(size_t(nthreads) * 8, 0u);
  s.xptr.assign(nthreads, nullptr);
  s.smem.assign(smem_bytes + 64, 0xFF);  // NaN bytes: unwritten shared memory poisons the result
  s.body = &body;
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.stack.resize(kStack);
    f.tid = dim3(t, 0, 0);
    f.done = false;
    f.cp_open.clear();  // copies never waited for do not land
    f.cp_groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Round-robin passes, alternating forward and reverse thread order, so that a missing barrier
  // is exposed whichever side of it (lower or higher warp) runs first.
  for (long pass = 0;; ++pass) {
    bool any = false;
    for (unsigned n = 0; n < nthreads; ++n) {
      Fiber& f = s.fibers[pass % 2 == 0 ? n : nthreads - 1 - n];
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
// A real barrier of the calling thread's warp (all 32 lanes must arrive, as the full mask requires).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emu: only full-warp __syncwarp is emulated\n");
    std::abort();
  }
  emu::wait(emu::state().warps[threadIdx.x / 32]);
}

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

// WMMA m16n16k16: every lane holds the whole tile (the real fragment is spread over the warp; the
// API is warp-collective and opaque, so the results are the same). Pointer alignment and leading
// dimensions are checked as the hardware requires them.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emu: only m16n16k16");
  float x[16 * 16];  // x[row * 16 + col] of the tile (A: 16 x K, B: K x 16, C: 16 x 16)
};

inline float emu_value(__half h) { return __half2float(h); }
inline float emu_value(__nv_bfloat16 h) { return __bfloat162float(h); }
inline float emu_value(float f) { return f; }

inline void emu_check(const void* p, unsigned ld, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * elem) % 16 != 0) {
    std::fprintf(stderr, "emu: %s: pointer %p not 32-byte aligned or ld %u not a multiple of 16 bytes\n", what, p,
                 ld);
    std::abort();
  }
}

template <typename F>
inline void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  emu_check(p, ld, sizeof(T), "load_matrix_sync");
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = emu_value(row ? p[r * ld + c] : p[c * ld + r]);
}

template <typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[m * 16 + k], b.x[k * 16 + n], acc);
      out[m * 16 + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld,
                              layout_t layout) {
  emu_check(p, ld, sizeof(float), "store_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda

// ---- mma.sync m16n8k16, ldmatrix, cp.async (called by csrc/cuda/gpsa_mma.cuh) ----
namespace emu {

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{uint16_t(bits)}) : __half2float(__half{uint16_t(bits)});
}

inline bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const std::vector<unsigned char>& m = state().smem;
  return c >= m.data() && c + bytes <= m.data() + m.size();
}

// d += A B, A 16 x 16 and B 16 x 8 of fp16 / bf16, fp32 accumulation in k order. Each lane
// rebuilds its rows of A and its columns of B from the lanes the PTX fragment layout names.
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], bool bf16) {
  State& s = state();
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  wait(s.warps[warp]);  // every lane has read the previous collective
  for (int r = 0; r < 4; ++r) s.xchg[t * 8 + r] = a[r];
  for (int r = 0; r < 2; ++r) s.xchg[t * 8 + 4 + r] = b[r];
  wait(s.warps[warp]);  // every lane has written this one
  const uint32_t* w = &s.xchg[size_t(warp) * 32 * 8];
  auto a_at = [&](int row, int col) {  // A[row][col]: lane 4 (row % 8) + (col % 8) / 2, reg (row / 8) + 2 (col / 8)
    const uint32_t reg = w[(4 * (row % 8) + (col % 8) / 2) * 8 + (row / 8) + 2 * (col / 8)];
    return half_bits_to_float(col % 2 ? reg >> 16 : reg & 0xffffu, bf16);
  };
  auto b_at = [&](int k, int col) {  // B[k][col]: lane 4 col + (k % 8) / 2, reg k / 8
    const uint32_t reg = w[(4 * col + (k % 8) / 2) * 8 + 4 + k / 8];
    return half_bits_to_float(k % 2 ? reg >> 16 : reg & 0xffffu, bf16);
  };
  const int g = int(lane / 4), tg = int(lane % 4);
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * tg + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(a_at(row, k), b_at(k, col), acc);
    d[i] = acc;
  }
}

// ldmatrix.m8n8.x{1,2,4}[.trans].b16: lanes 8 m .. 8 m + 7 address the rows of matrix m (16-byte
// aligned, in shared memory); register m of lane l gets (row l / 4, cols 2 (l % 4) + {0, 1}), or
// with trans (rows 2 (l % 4) + {0, 1}, col l / 4).
inline void ldmatrix(uint32_t* r, int num, bool trans, const void* row) {
  State& s = state();
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  wait(s.warps[warp]);
  s.xptr[t] = row;
  if (int(lane) < 8 * num && (reinterpret_cast<uintptr_t>(row) % 16 != 0 || !in_smem(row, 16))) {
    std::fprintf(stderr, "emu: ldmatrix row address %p of lane %u not 16-byte aligned shared memory\n", row, lane);
    std::abort();
  }
  wait(s.warps[warp]);
  const void* const* rows = &s.xptr[size_t(warp) * 32];
  auto elem = [&](int m, int rr, int cc) {  // matrix m, row rr, col cc
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(rows[8 * m + rr]) + 2 * cc, 2);
    return uint32_t(v);
  };
  for (int m = 0; m < num; ++m) {
    if (!trans)
      r[m] = elem(m, lane / 4, 2 * (lane % 4)) | elem(m, lane / 4, 2 * (lane % 4) + 1) << 16;
    else
      r[m] = elem(m, 2 * (lane % 4), lane / 4) | elem(m, 2 * (lane % 4) + 1, lane / 4) << 16;
  }
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_smem(dst, 16) ||
      (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    std::fprintf(stderr, "emu: cp.async dst %p / src %p not 16-byte aligned (or dst not shared)\n", dst, src);
    std::abort();
  }
  AsyncCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  if (valid) std::memcpy(c.data, src, 16);
  else std::memset(c.data, 0, 16);
  state().current->cp_open.push_back(c);
}
inline void cp_async_commit() {
  Fiber& f = *state().current;
  f.cp_groups.push_back(std::move(f.cp_open));
  f.cp_open.clear();
}
inline void cp_async_wait(int pending) {
  Fiber& f = *state().current;
  // Before landing anything, let the other threads run some round-robin passes, more for higher
  // warps: a lower warp that reads a higher warp's bytes without a barrier after the wait (its own
  // warp-collectives take about two passes) then reads them before they land.
  if (int(f.cp_groups.size()) > pending)
    for (unsigned pass = 0; pass < 1 + 3 * (threadIdx.x / 32); ++pass) yield();
  while (int(f.cp_groups.size()) > pending) {
    for (const AsyncCopy& c : f.cp_groups.front()) std::memcpy(c.dst, c.data, 16);
    f.cp_groups.pop_front();
  }
}

}  // namespace emu
