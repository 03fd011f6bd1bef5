// Math and loop helpers written once over any Vec (cpu/common/vec_scalar.h, vec_avx2.h,
// vec_avx512.h): exp and log1p polynomials accurate to ~1 ulp in fp32, row sweeps with a
// partial last vector, compensated sums, and the non-finite checks of a row.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/common/vec.h"

namespace slimlm::cpu::vec {

// e^x for any float x, within ~1 ulp: 0 for x <= -104 and -inf, gradual underflow
// below -87.3, +inf above 88.7, NaN -> 0 (the clamp's max returns its bound on NaN).
//   x = k·ln2 + r, |r| <= ln2/2, with ln2 split in two so k·ln2_hi is exact;
//   e^r = 1 + r + r²·Q(r), Q a degree-4 minimax fit of (e^r − 1 − r)/r² on
//   [−ln2/2, ln2/2] (relative error of e^r 4.3e-9 before rounding).
template <class V>
inline V exp(const V& x_in) {
  const V x = V::min(V::max(x_in, V::set1(-104.0f)), V::set1(89.0f));
  const V k = V::round(x * V::set1(1.44269504088896341f));
  V r = V::fma(k, V::set1(-0.693145751953125f), x);
  r = V::mul_add(k, V::set1(-1.42860682030941723212e-6f), r);
  V q = V::set1(1.389340265e-03f);
  q = V::mul_add(q, r, V::set1(8.370262571e-03f));
  q = V::mul_add(q, r, V::set1(4.166708887e-02f));
  q = V::mul_add(q, r, V::set1(1.666650623e-01f));
  q = V::mul_add(q, r, V::set1(4.999999702e-01f));
  const V e = V::mul_add(r * r, q, r) + V::set1(1.0f);
  return V::ldexp(e, k);
}

// log(1 + e) for e in [0, 1], within ~1 ulp:
//   log(1 + e) = 2·atanh(s), s = e / (2 + e) in [0, 1/3];
//   atanh(s) = s·(1 + z·R(z)), z = s², R a degree-3 minimax fit on [0, 1/9]
//   (relative error 4.5e-9 before rounding). No cancellation, no exponent split.
template <class V>
inline V log1p_unit(const V& e) {
  const V s = e / (e + V::set1(2.0f));
  const V z = s * s;
  V poly = V::set1(1.400641948e-01f);
  poly = V::mul_add(poly, z, V::set1(1.400081366e-01f));
  poly = V::mul_add(poly, z, V::set1(2.001076937e-01f));
  poly = V::mul_add(poly, z, V::set1(3.333320916e-01f));
  return (s + s) * V::mul_add(z, poly, V::set1(1.0f));
}

// Sum of many vectors: fp32 lanes, added into a double every kBlock vectors, so a block's
// lane sums round at most kBlock + log2(lanes) times (~1e-6 relative at worst) whatever the
// row length. Sums whose terms nearly cancel need their terms centred first (kl_div.cpp).
template <class V>
class BlockedSum {
 public:
  static constexpr int kBlock = 16;

  void add(const V& x) {
    lanes_ = lanes_ + x;
    if (++count_ == kBlock) {
      flush();
    }
  }
  double total() {
    flush();
    return total_;
  }

 private:
  void flush() {
    total_ += V::reduce_add(lanes_);
    lanes_ = V::zero();
    count_ = 0;
  }

  V lanes_ = V::zero();
  double total_ = 0.0;
  int count_ = 0;
};

// Whether softmax of a row is undefined (the reference gives NaN for the whole row): the row
// holds a NaN (has_nan, from V::mark_nan, since max() skips NaN) or a +inf, or every entry is
// -inf. A row with some -inf entries (a masked vocabulary) is fine.
inline bool softmax_undefined(float row_max, bool has_nan) { return has_nan || std::isinf(row_max); }

// Elements [i, i + n) of a row as a Vec: a full load, or a partial one (-inf filled).
template <class V, class T>
inline V load_n(const T* p, int n) {
  return n == V::kWidth ? V::load(p) : V::load_tail(p, n);
}

// Stores the first n lanes; Stream uses non-temporal stores for full vectors.
template <class V, bool Stream, class T>
inline void store_n(T* p, int n, const V& x) {
  if (n != V::kWidth) {
    V::store_tail(p, n, x);
  } else if constexpr (Stream) {
    V::stream(p, x);
  } else {
    V::store(p, x);
  }
}

// Calls body(i, n) over a row of `count` elements, a vector at a time: n = kWidth
// (a compile-time constant once inlined), then once with n < kWidth for the remainder.
template <class V, class Body>
inline void for_each_vec(int64_t count, Body&& body) {
  int64_t i = 0;
  for (; i + V::kWidth <= count; i += V::kWidth) {
    body(i, V::kWidth);
  }
  if (i < count) {
    body(i, static_cast<int>(count - i));
  }
}

// fp32 view of n elements at src: src itself for fp32, else `scratch` (n floats) filled.
template <class V>
inline const float* as_float(const float* src, float*, int64_t) {
  return src;
}
template <class V, class T>
inline const float* as_float(const T* src, float* scratch, int64_t n) {
  for_each_vec<V>(n, [&](int64_t i, int width) { store_n<V, false>(scratch + i, width, load_n<V>(src + i, width)); });
  return scratch;
}

}  // namespace slimlm::cpu::vec
