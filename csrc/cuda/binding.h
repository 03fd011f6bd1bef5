// What the CUDA bindings (*_binding.cpp: tensor glue, host code) share: the one switch from a
// tensor's dtype to the CUDA storage type its launcher is instantiated for.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace slimlm::cuda {

// Calls body(std::type_identity<T>{}) with T = float, __nv_bfloat16 or __half for a float32,
// bfloat16 or float16 tensor (at::BFloat16 / at::Half share those types' bits); any other
// dtype is an error naming `op`.
template <class Body>
decltype(auto) visit_storage(at::ScalarType type, const char* op, Body&& body) {
  switch (type) {
    case at::kFloat:
      return body(std::type_identity<float>{});
    case at::kBFloat16:
      return body(std::type_identity<__nv_bfloat16>{});
    case at::kHalf:
      return body(std::type_identity<__half>{});
    default:
      TORCH_CHECK(false, op, ": CUDA kernel takes float32, bfloat16 or float16, got ", type);
  }
}

// A tensor's data as the CUDA storage type T (nullptr for an undefined or empty tensor).
template <class T>
T* data_as(const at::Tensor& tensor) {
  return tensor.defined() && tensor.numel() > 0 ? reinterpret_cast<T*>(tensor.data_ptr()) : nullptr;
}

}  // namespace slimlm::cuda
