// Per-thread scratch memory of the CPU kernels (see thread_scratch in gpsa_cpu.h).
#include "gpsa_cpu.h"

#include <algorithm>

namespace convit_kernels::cpu {

void* thread_scratch(size_t bytes) {
  thread_local c10::DataPtr buffer;
  thread_local size_t capacity = 0;
  if (bytes > capacity || buffer.get() == nullptr) {
    buffer = c10::GetCPUAllocator()->allocate(std::max<size_t>(bytes, 64));  // 64-byte aligned
    capacity = bytes;
  }
  return buffer.get();
}

}  // namespace convit_kernels::cpu
