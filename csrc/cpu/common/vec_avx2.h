// Eight-lane Vec for AVX2 + FMA + F16C (interface and semantics: cpu/common/vec_scalar.h).
#pragma once

#include "cpu/common/vec.h"

#if SLIMLM_VEC_X86
#include <cstring>
#include <limits>

SLIMLM_VEC_TARGET_AVX2_BEGIN
namespace slimlm::cpu::avx2 {

namespace detail {

inline __m256 widen_bf16(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// fp32 -> bf16 bits, rounding to nearest even; a NaN stays a quiet NaN (the rounding add
// could otherwise carry a NaN payload into the sign bit).
inline __m128i narrow_bf16(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
  // packus works within 128-bit halves: [r0-3 r0-3 | r4-7 r4-7]; keep qwords 0 and 2.
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

}  // namespace detail

struct Vec {
  static constexpr int kWidth = 8;
  __m256 v;

  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec zero() { return {_mm256_setzero_ps()}; }

  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {
    return {detail::widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static Vec load(const c10::Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  // AVX2 has no 16-bit masked loads: go through a small buffer, as the tail is once per row.
  template <class T>
  static Vec load_tail(const T* p, int n) {
    T buffer[kWidth];
    for (T& item : buffer) {
      item = static_cast<T>(-std::numeric_limits<float>::infinity());
    }
    std::memcpy(buffer, p, sizeof(T) * n);
    return load(buffer);
  }

  static void store(float* p, Vec x) { _mm256_storeu_ps(p, x.v); }
  static void store(c10::BFloat16* p, Vec x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), detail::narrow_bf16(x.v)); }
  static void store(c10::Half* p, Vec x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
  template <class T>
  static void store_tail(T* p, int n, Vec x) {
    T buffer[kWidth];
    store(buffer, x);
    std::memcpy(p, buffer, sizeof(T) * n);
  }
  static void stream(float* p, Vec x) { _mm256_stream_ps(p, x.v); }
  static void stream(c10::BFloat16* p, Vec x) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), detail::narrow_bf16(x.v)); }
  static void stream(c10::Half* p, Vec x) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void fence() { _mm_sfence(); }

  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec mul_add(Vec a, Vec b, Vec c) { return fma(a, b, c); }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  static Vec abs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
  static Vec round(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // x · 2^k for integral k in [-252, 254], in two exponent-field products (see scalar::Vec).
  static Vec ldexp(Vec x, Vec k) {
    const __m256i exponent = _mm256_cvtps_epi32(k.v);
    const __m256i half = _mm256_srai_epi32(exponent, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 second =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(exponent, half), bias), 23));
    return {_mm256_mul_ps(_mm256_mul_ps(x.v, first), second)};
  }
  static Vec keep_where_positive(Vec condition, Vec x) {
    return {_mm256_and_ps(_mm256_cmp_ps(condition.v, _mm256_setzero_ps(), _CMP_GT_OQ), x.v)};
  }

  static Vec select_greater(Vec a, Vec b, Vec x, Vec y) {
    return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ))};
  }
  static Vec mark_nan(Vec flags, Vec x) { return {_mm256_or_ps(flags.v, _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q))}; }
  static bool any(Vec flags) { return _mm256_movemask_ps(flags.v) != 0; }
  static float reduce_add(Vec a) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
  }
  static float reduce_max(Vec a) {
    __m128 top = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    top = _mm_max_ps(top, _mm_movehl_ps(top, top));
    return _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
  }
};

inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }

// The entry point that compiles Kernel::run<Vec> for AVX2 (see cpu/common/vec.h).
template <class Kernel, class... Args>
__attribute__((flatten)) void invoke(Args... args) {
  Kernel::template run<Vec>(args...);
}

}  // namespace slimlm::cpu::avx2
SLIMLM_VEC_TARGET_END

#endif  // SLIMLM_VEC_X86
