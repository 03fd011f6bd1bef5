// Run-time choice of the CPU instruction set for the hand-vectorised kernels.
// Kernels are compiled once per instruction set with GCC target attributes, so
// the extension needs no -march flag and runs on any x86-64 (or other) CPU.
#pragma once

#include <string>

namespace slimlm::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best instruction set this CPU supports, lowered by SLIMLM_CPU_ISA
// (scalar|avx2|avx512) when set; read on every call so tests can force each path.
Isa active_isa();

const char* isa_name(Isa isa);

}  // namespace slimlm::cpu
