// The one way a CPU kernel is run: a struct with `template <class V> static void run(...)`,
// compiled once per instruction set through each Vec's flatten entry (see vec.h) and
// picked at run time, and the storage types it is instantiated for.
#pragma once

#include <ATen/ATen.h>

#include "cpu/common/isa.h"
#include "cpu/common/vec.h"
#include "cpu/common/vec_avx2.h"
#include "cpu/common/vec_avx512.h"
#include "cpu/common/vec_scalar.h"

namespace slimlm::cpu {

// Kernel::run<Vec> compiled for `isa`, as a plain function pointer.
template <class Kernel, class... Args>
auto variant(Isa isa) -> void (*)(Args...) {
#if SLIMLM_VEC_X86
  if (isa == Isa::Avx512) {
    return &avx512::invoke<Kernel, Args...>;
  }
  if (isa == Isa::Avx2) {
    return &avx2::invoke<Kernel, Args...>;
  }
#endif
  return &scalar::invoke<Kernel, Args...>;
}

// Calls body(T{}) with T the storage type of `type` (float, c10::BFloat16 or c10::Half); any
// other dtype is an error naming `op` (the Python layer runs fp64 on the reference).
template <class Body>
void visit_storage(at::ScalarType type, const char* op, Body&& body) {
  switch (type) {
    case at::kFloat:
      return body(float{});
    case at::kBFloat16:
      return body(c10::BFloat16{});
    case at::kHalf:
      return body(c10::Half{});
    default:
      TORCH_CHECK(false, op, ": expects float32, bfloat16 or float16, got ", type);
  }
}

}  // namespace slimlm::cpu
