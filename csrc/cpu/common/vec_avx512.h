// Sixteen-lane Vec for AVX-512 F/BW/VL/DQ (interface and semantics: cpu/common/vec_scalar.h).
#pragma once

#include "cpu/common/vec.h"

#if SLIMLM_VEC_X86
#include <limits>

SLIMLM_VEC_TARGET_AVX512_BEGIN
namespace slimlm::cpu::avx512 {

namespace detail {

inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// fp32 -> bf16 bits, rounding to nearest even; a NaN stays a quiet NaN (the rounding add
// could otherwise carry a NaN payload into the sign bit).
inline __m256i narrow_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

inline __m256i narrow_half(__m512 x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT); }

}  // namespace detail

struct Vec {
  static constexpr int kWidth = 16;
  __m512 v;

  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec zero() { return {_mm512_setzero_ps()}; }

  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {
    return {detail::widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static Vec load(const c10::Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static Vec load_tail(const float* p, int n) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), detail::first_lanes(n), p)};
  }
  static Vec load_tail(const c10::BFloat16* p, int n) {
    const __m256i fill = _mm256_set1_epi16(static_cast<short>(kBf16NegInf));
    return {detail::widen_bf16(_mm256_mask_loadu_epi16(fill, detail::first_lanes(n), p))};
  }
  static Vec load_tail(const c10::Half* p, int n) {
    const __m256i fill = _mm256_set1_epi16(static_cast<short>(kHalfNegInf));
    return {_mm512_cvtph_ps(_mm256_mask_loadu_epi16(fill, detail::first_lanes(n), p))};
  }

  static void store(float* p, Vec x) { _mm512_storeu_ps(p, x.v); }
  static void store(c10::BFloat16* p, Vec x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), detail::narrow_bf16(x.v));
  }
  static void store(c10::Half* p, Vec x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), detail::narrow_half(x.v)); }
  static void store_tail(float* p, int n, Vec x) { _mm512_mask_storeu_ps(p, detail::first_lanes(n), x.v); }
  static void store_tail(c10::BFloat16* p, int n, Vec x) {
    _mm256_mask_storeu_epi16(p, detail::first_lanes(n), detail::narrow_bf16(x.v));
  }
  static void store_tail(c10::Half* p, int n, Vec x) {
    _mm256_mask_storeu_epi16(p, detail::first_lanes(n), detail::narrow_half(x.v));
  }
  static void stream(float* p, Vec x) { _mm512_stream_ps(p, x.v); }
  static void stream(c10::BFloat16* p, Vec x) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), detail::narrow_bf16(x.v));
  }
  static void stream(c10::Half* p, Vec x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), detail::narrow_half(x.v)); }
  static void fence() { _mm_sfence(); }

  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec mul_add(Vec a, Vec b, Vec c) { return fma(a, b, c); }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  static Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
  static Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // vscalefps: x · 2^k with correct overflow and gradual underflow for any k.
  static Vec ldexp(Vec x, Vec k) { return {_mm512_scalef_ps(x.v, k.v)}; }
  static Vec keep_where_positive(Vec condition, Vec x) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(condition.v, _mm512_setzero_ps(), _CMP_GT_OQ), x.v)};
  }

  static Vec select_greater(Vec a, Vec b, Vec x, Vec y) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ), y.v, x.v)};
  }
  static Vec mark_nan(Vec flags, Vec x) {
    const __m512i nan_lanes = _mm512_movm_epi32(_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q));
    return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(flags.v), nan_lanes))};
  }
  static bool any(Vec flags) {
    const __m512i bits = _mm512_castps_si512(flags.v);
    return _mm512_test_epi32_mask(bits, bits) != 0;
  }
  static float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
  static float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }
};

inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }

// The entry point that compiles Kernel::run<Vec> for AVX-512 (see cpu/common/vec.h).
template <class Kernel, class... Args>
__attribute__((flatten)) void invoke(Args... args) {
  Kernel::template run<Vec>(args...);
}

}  // namespace slimlm::cpu::avx512
SLIMLM_VEC_TARGET_END

#endif  // SLIMLM_VEC_X86
