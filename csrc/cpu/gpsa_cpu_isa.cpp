// The ISA level of the CPU kernels (CpuLevel in gpsa_cpu.h): which row kernels and transpose tiles
// run. Chosen once per process: the best level the CPU supports, or a lower one that the
// environment asks for (CONVIT_KERNELS_CPU_ISA), so that one machine can run and time every level
// below its own.
#include "gpsa_cpu.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace convit_kernels::cpu {
namespace {

const char* const kNames[] = {"portable", "avx2", "avx512"};

CpuLevel best_supported() {
#if CONVIT_HAVE_X86_ROWS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return CpuLevel::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuLevel::kAvx2;
#endif
  return CpuLevel::kPortable;
}

CpuLevel choose() {
  const CpuLevel best = best_supported();
  const char* isa = std::getenv("CONVIT_KERNELS_CPU_ISA");
  const char* portable = std::getenv("CONVIT_KERNELS_CPU_PORTABLE");  // the older switch: an alias
  std::string want = isa != nullptr ? std::string(isa) : "";
  if (want.empty() && portable != nullptr && std::string(portable) == "1") want = "portable";
  if (want.empty() || want == "best") return best;
  for (int l = 0; l <= int(CpuLevel::kAvx512); ++l) {
    if (want != kNames[l]) continue;
    if (l > int(best)) {
      TORCH_WARN("CONVIT_KERNELS_CPU_ISA=", want, " is above what this CPU supports; running at ", kNames[int(best)]);
      return best;
    }
    return CpuLevel(l);
  }
  TORCH_CHECK_VALUE(false, "CONVIT_KERNELS_CPU_ISA must be one of avx512, avx2, portable or best; got '", want, "'");
}

}  // namespace

CpuLevel cpu_level() {
  static const CpuLevel level = choose();  // retried on the next call if it threw
  return level;
}

std::string cpu_isa() { return kNames[int(cpu_level())]; }

std::vector<std::string> cpu_isa_levels() {
  std::vector<std::string> names;
  for (int l = 0; l <= int(best_supported()); ++l) names.emplace_back(kNames[l]);
  return names;
}

}  // namespace convit_kernels::cpu
