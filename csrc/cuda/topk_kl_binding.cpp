// Tensor glue of the CUDA topk_kl_fwd (topk_kl.cu): checks the invariants the Python layer
// guarantees, allocates the outputs, picks the device and stream, calls the launcher.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/binding.h"
#include "cuda/topk_kl.h"

namespace slimlm::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_kl_fwd_cuda(const at::Tensor& student, const at::Tensor& logprobs,
                                                    const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                                    int64_t ignore_index, double temperature, double beta,
                                                    double scale, bool renormalize, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "topk_kl_fwd: student must be a contiguous (N, V) tensor");
  TORCH_CHECK(logprobs.dim() == 2 && logprobs.size(0) == student.size(0) && logprobs.is_contiguous() &&
                  logprobs.scalar_type() == at::kFloat && logprobs.device() == student.device(),
              "topk_kl_fwd: logprobs must be contiguous fp32 (N, k) on the student's device");
  TORCH_CHECK(indices.sizes() == logprobs.sizes() && indices.is_contiguous() && indices.scalar_type() == at::kLong &&
                  indices.device() == student.device(),
              "topk_kl_fwd: indices must be contiguous int64 with the logprobs' shape and device");
  TORCH_CHECK(temperature > 0.0 && beta >= 0.0 && beta <= 1.0, "topk_kl_fwd: need temperature > 0 and beta in [0, 1]");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0);

  at::Tensor labels_long;
  if (labels.has_value()) {
    TORCH_CHECK(labels->numel() == rows && labels->device() == student.device() && !labels->is_floating_point(),
                "topk_kl_fwd: labels must be an integer tensor with one entry per row on ", student.device());
    labels_long = labels->to(at::kLong).contiguous();
  }

  auto loss = at::empty({rows}, student.options().dtype(at::kFloat));
  auto grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  const TopKKLProblem problem{rows,
                              student.size(1),
                              logprobs.size(1),
                              logprobs.const_data_ptr<float>(),
                              indices.const_data_ptr<int64_t>(),
                              labels_long.defined() ? labels_long.const_data_ptr<int64_t>() : nullptr,
                              ignore_index,
                              static_cast<float>(temperature),
                              static_cast<float>(beta),
                              static_cast<float>(scale),
                              renormalize,
                              loss.mutable_data_ptr<float>()};

  const cudaError_t status = visit_storage(student.scalar_type(), "topk_kl_fwd", [&](auto storage) {
    using T = typename decltype(storage)::type;
    return topk_kl_fwd<T>(data_as<const T>(student), compute_grad ? data_as<T>(grad) : nullptr, problem,
                          c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(status == cudaSuccess, "topk_kl_fwd: CUDA launch failed: ", cudaGetErrorString(status));
  return {loss, grad};
}

}  // namespace
}  // namespace slimlm::cuda

TORCH_LIBRARY_IMPL(slimlm, CUDA, m) { m.impl("topk_kl_fwd", &slimlm::cuda::topk_kl_fwd_cuda); }
