// Short fp32 vectors for the hand-vectorised CPU kernels, one struct per instruction set:
//   scalar::Vec (cpu/common/vec_scalar.h, 1 lane, portable), avx2::Vec (cpu/common/vec_avx2.h, 8 lanes,
//   AVX2+FMA+F16C), avx512::Vec (cpu/common/vec_avx512.h, 16 lanes, AVX-512 F/BW/VL/DQ).
// This header holds what they share.
// Every Vec has the same static interface (load/store of fp32, bf16 and fp16 storage,
// arithmetic, masks, reductions), so a kernel is written once as a template over Vec
// (with vec_math.h for exp and log) and instantiated per instruction set.
//
// How one template is compiled for several instruction sets without -march flags:
// each Vec is defined inside a `#pragma GCC target` region, so its members may use that
// set's intrinsics, and each region also defines `invoke<Kernel>(args...)`, a
// `flatten` entry point carrying the same target. Flatten inlines the whole kernel
// template, Vec members included, into that entry, so the kernel is compiled for the
// entry's instruction set; the kernel templates themselves carry no target and are never
// called out of line. The CPU is checked once per call (cpu/common/isa.h) before an entry is
// picked, so the extension runs on any x86-64.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

// The x86 vector paths need GCC's target pragmas; other compilers and architectures
// build the scalar path only (active_isa() may still report AVX; kernels then run scalar).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIMLM_VEC_X86 1
#include <immintrin.h>
#define SLIMLM_VEC_TARGET_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,fma\")")
#define SLIMLM_VEC_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define SLIMLM_VEC_TARGET_END _Pragma("GCC pop_options")
#else
#define SLIMLM_VEC_X86 0
#endif

namespace slimlm::cpu {

// Storage types a Vec loads from and stores to (fp32 lanes in registers).
template <class T>
inline constexpr bool kIsVecStorage =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Bit patterns of -inf, the fill of partial loads: neutral for max, and exp(-inf) = 0.
inline constexpr uint16_t kBf16NegInf = 0xFF80;
inline constexpr uint16_t kHalfNegInf = 0xFC00;

}  // namespace slimlm::cpu
