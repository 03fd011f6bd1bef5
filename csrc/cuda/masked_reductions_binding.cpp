// Tensor glue of the CUDA masked reductions (masked_seq_stats.cu, masked_row_cosine.cu):
// checks the invariants the Python layer guarantees, picks the stream, calls the launchers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/binding.h"
#include "cuda/masked_reductions.h"

namespace slimlm::cuda {
namespace {

const bool* mask_pointer(const std::optional<at::Tensor>& mask, int64_t numel, const at::Tensor& like,
                         const char* op) {
  if (!mask.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == numel &&
                  mask->device() == like.device(),
              op, ": mask must be a contiguous bool tensor with ", numel, " elements on ", like.device());
  return mask->data_ptr<bool>();
}

at::Tensor masked_seq_stats_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t group_size) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "masked_seq_stats: x must be a contiguous (B, S, C) tensor");
  TORCH_CHECK(group_size >= 1 && x.size(2) % group_size == 0, "masked_seq_stats: group_size must divide C");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool* mask_ptr = mask_pointer(mask, x.size(0) * x.size(1), x, "masked_seq_stats");
  auto out = at::empty({3, x.size(0), x.size(2) / group_size}, x.options().dtype(at::kFloat));
  const cudaError_t status = visit_storage(x.scalar_type(), "masked_seq_stats", [&](auto storage) {
    using T = typename decltype(storage)::type;
    return masked_seq_stats<T>(data_as<const T>(x), mask_ptr, out.data_ptr<float>(), x.size(0), x.size(1), x.size(2),
                               group_size, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(status == cudaSuccess, "masked_seq_stats: CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

at::Tensor masked_row_cosine_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& mask,
                                  double eps) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes() &&
                  a.scalar_type() == b.scalar_type() && a.device() == b.device(),
              "masked_row_cosine: a and b must be contiguous (N, C) tensors of one dtype and device");
  const c10::cuda::CUDAGuard guard(a.device());
  const bool* mask_ptr = mask_pointer(mask, a.size(0), a, "masked_row_cosine");
  auto out = at::empty({a.size(0)}, a.options().dtype(at::kFloat));
  const cudaError_t status = visit_storage(a.scalar_type(), "masked_row_cosine", [&](auto storage) {
    using T = typename decltype(storage)::type;
    return masked_row_cosine<T>(data_as<const T>(a), data_as<const T>(b), mask_ptr, out.data_ptr<float>(), a.size(0),
                                a.size(1), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(status == cudaSuccess, "masked_row_cosine: CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace
}  // namespace slimlm::cuda

TORCH_LIBRARY_IMPL(slimlm, CUDA, m) {
  m.impl("masked_seq_stats", &slimlm::cuda::masked_seq_stats_cuda);
  m.impl("masked_row_cosine", &slimlm::cuda::masked_row_cosine_cuda);
}
