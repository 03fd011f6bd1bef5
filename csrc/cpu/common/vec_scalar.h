// One-lane Vec: the portable fallback, and the reference shape of the Vec interface
// (see cpu/common/vec.h). Semantics every Vec shares:
//   max(a, b) = a > b ? a : b   (so max(NaN, b) = b, as x86 maxps)
//   keep_where_positive(c, x) = c > 0 ? x : 0
//   select_greater(a, b, x, y) = a > b ? x : y
//   fma rounds once; mul_add may round twice (scalar) where that is harmless
//   mark_nan / any: a NaN seen anywhere in a row, even where max() skipped it
//   load_tail / store_tail touch only the first n < kWidth elements; load_tail fills
//   the other lanes with -inf.
//   stream stores bypass the caches and need a kWidth-element-aligned address; fence()
//   orders them before the caller returns.
#pragma once

#include <bit>
#include <cstdint>

#include "cpu/common/vec.h"

namespace slimlm::cpu::scalar {

struct Vec {
  static constexpr int kWidth = 1;
  float v;

  static Vec set1(float x) { return {x}; }
  static Vec zero() { return {0.0f}; }

  template <class T>
  static Vec load(const T* p) {
    return {static_cast<float>(*p)};
  }
  template <class T>
  static Vec load_tail(const T* p, int) {
    return load(p);
  }
  // c10's float -> bf16/fp16 conversions round to nearest even, as the vector paths do.
  template <class T>
  static void store(T* p, Vec x) {
    *p = static_cast<T>(x.v);
  }
  template <class T>
  static void store_tail(T* p, int, Vec x) {
    store(p, x);
  }
  template <class T>
  static void stream(T* p, Vec x) {
    store(p, x);
  }
  static void fence() {}

  // a·b + c rounded once, as the vector paths' fused multiply-add (so every variant rounds the
  // same operations where it matters): the product of two floats is exact in double. std::fma
  // would be a library call on x86-64 without -mfma.
  static Vec fma(Vec a, Vec b, Vec c) {
    return {static_cast<float>(static_cast<double>(a.v) * b.v + c.v)};
  }
  // a·b + c where one more rounding is harmless (polynomials): plain float arithmetic here, the
  // fused instruction on the vector paths. Half the cost of fma() in the scalar exp.
  static Vec mul_add(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  static Vec max(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
  static Vec min(Vec a, Vec b) { return {a.v < b.v ? a.v : b.v}; }
  static Vec abs(Vec a) { return {a.v < 0.0f ? -a.v : a.v}; }
  // Round to nearest even for |x| < 2^22: adding 1.5·2^23 leaves no fraction bits.
  static Vec round(Vec a) {
    constexpr float kShifter = 12582912.0f;
    return {(a.v + kShifter) - kShifter};
  }
  // x · 2^k for integral k in [-252, 254], as two exponent-field products so that
  // k beyond the normal exponent range still overflows to inf or underflows gradually.
  static Vec ldexp(Vec x, Vec k) {
    const int32_t exponent = static_cast<int32_t>(k.v);
    const int32_t half = exponent >> 1;
    const float first = std::bit_cast<float>(static_cast<uint32_t>(half + 127) << 23);
    const float second = std::bit_cast<float>(static_cast<uint32_t>(exponent - half + 127) << 23);
    return {x.v * first * second};
  }
  static Vec keep_where_positive(Vec condition, Vec x) { return {condition.v > 0.0f ? x.v : 0.0f}; }
  static Vec select_greater(Vec a, Vec b, Vec x, Vec y) { return {a.v > b.v ? x.v : y.v}; }

  // flags with the NaN lanes of x marked (any non-zero lane is marked); any(flags): one is.
  static Vec mark_nan(Vec flags, Vec x) { return {flags.v != 0.0f || x.v != x.v ? 1.0f : 0.0f}; }
  static bool any(Vec flags) { return flags.v != 0.0f; }
  static float reduce_add(Vec a) { return a.v; }
  static float reduce_max(Vec a) { return a.v; }
};

inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }

// The entry point that compiles Kernel::run<Vec> for any CPU (see cpu/common/vec.h).
template <class Kernel, class... Args>
__attribute__((flatten)) void invoke(Args... args) {
  Kernel::template run<Vec>(args...);
}

}  // namespace slimlm::cpu::scalar
