// Reading fp32/bf16/fp16 rows as fp32, for the plain-C++ reduction kernels of
// masked_seq_stats.cpp and masked_row_cosine.cpp. Those kernels write their loops in
// ordinary C++ and compile them once per instruction set with GCC target attributes
// (GCC auto-vectorises them, reductions through `omp simd`); only the fp16 conversion
// needs intrinsics, because GCC 12 does not vectorise `(float)_Float16`.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SLIMLM_X86 1
#define SLIMLM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define SLIMLM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SLIMLM_X86 0
#define SLIMLM_TARGET_AVX512
#define SLIMLM_TARGET_AVX2
#endif
#define SLIMLM_INLINE inline __attribute__((always_inline))

namespace slimlm::cpu::rows {

// Elements converted per call: the scratch row a kernel keeps in L1.
constexpr int64_t kChunk = 1024;

SLIMLM_INLINE float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// fp32 view of n (<= kChunk) elements at src: src itself for fp32, else `scratch` filled.
SLIMLM_INLINE const float* as_float(const float* src, float*, int64_t) { return src; }

SLIMLM_INLINE const float* as_float(const c10::BFloat16* src, float* scratch, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = bf16_to_float(bits[i]);
  }
  return scratch;
}

// The fp16 conversion differs per instruction set: Isa-tagged overloads below.
struct Scalar {};
struct Avx2 {};
struct Avx512 {};

SLIMLM_INLINE const float* half_as_float(Scalar, const c10::Half* src, float* scratch, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = static_cast<float>(src[i]);
  }
  return scratch;
}

#if SLIMLM_X86
// Not always_inline: GCC refuses to inline a target-specific function into the
// ISA-neutral body templates, so these are ordinary calls, one per chunk.
SLIMLM_TARGET_AVX2 inline const float* half_as_float(Avx2, const c10::Half* src, float* scratch, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) {
    scratch[i] = static_cast<float>(src[i]);
  }
  return scratch;
}

SLIMLM_TARGET_AVX512 inline const float* half_as_float(Avx512, const c10::Half* src, float* scratch, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // The zero-masked form: plain _mm512_cvtph_ps trips GCC 12's -Wmaybe-uninitialized.
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(scratch + i, _mm512_maskz_cvtph_ps(static_cast<__mmask16>(0xFFFF), halves));
  }
  for (; i < n; ++i) {
    scratch[i] = static_cast<float>(src[i]);
  }
  return scratch;
}
#endif

template <typename IsaTag, typename T>
SLIMLM_INLINE const float* load(IsaTag tag, const T* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return half_as_float(tag, src, scratch, n);
  } else {
    return as_float(src, scratch, n);
  }
}

}  // namespace slimlm::cpu::rows
