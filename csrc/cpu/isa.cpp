#include "cpu/common/isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "cpu/common/vec.h"

namespace slimlm::cpu {

namespace {

Isa detected_isa() {
#if SLIMLM_VEC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    return Isa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::Avx2;
  }
#endif
  return Isa::Scalar;
}

}  // namespace

Isa best_isa() {
  static const Isa best = detected_isa();
  return best;
}

Isa active_isa() {
  const Isa best = best_isa();
  const char* forced = std::getenv("SLIMLM_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') {
    return best;
  }
  Isa wanted;
  if (std::strcmp(forced, "scalar") == 0) {
    wanted = Isa::Scalar;
  } else if (std::strcmp(forced, "avx2") == 0) {
    wanted = Isa::Avx2;
  } else if (std::strcmp(forced, "avx512") == 0) {
    wanted = Isa::Avx512;
  } else {
    TORCH_CHECK(false, "SLIMLM_CPU_ISA must be scalar, avx2 or avx512, got '", forced, "'");
  }
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), "SLIMLM_CPU_ISA=", forced,
              ": this CPU (or build) runs at most ", isa_name(best));
  return wanted;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace slimlm::cpu
