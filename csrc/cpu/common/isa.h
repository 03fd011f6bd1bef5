// Run-time choice of the CPU instruction set for the hand-vectorised kernels.
// Kernels are compiled once per instruction set with GCC target attributes, so
// the extension needs no -march flag and runs on any x86-64 (or other) CPU.
#pragma once

namespace slimlm::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best instruction set this CPU (and this build) can run.
Isa best_isa();

// The variant the kernels run: SLIMLM_CPU_ISA (scalar|avx2|avx512) when set, else best_isa().
// Read on every call so tests can force each path. A value that is not one of the three, or a
// set this CPU lacks, is an error (Python checks first, in slimlm.kernels.cpu_isa, with a
// ValueError; this is the guard below it).
Isa active_isa();

const char* isa_name(Isa isa);

}  // namespace slimlm::cpu
