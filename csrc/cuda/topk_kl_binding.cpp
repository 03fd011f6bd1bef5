// Tensor glue of the CUDA topk_kl_fwd (topk_kl.cu): checks the invariants the Python layer
// guarantees, allocates the outputs, picks the device and stream, calls the launcher.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/topk_kl.h"

namespace slimlm::cuda {
namespace {

template <typename T, typename Scalar>
cudaError_t launch_as(const at::Tensor& student, at::Tensor& grad, bool compute_grad, const TopKKLProblem& problem) {
  // at::BFloat16 / at::Half and __nv_bfloat16 / __half share their bits.
  return topk_kl_fwd<T>(reinterpret_cast<const T*>(student.const_data_ptr<Scalar>()),
                        compute_grad ? reinterpret_cast<T*>(grad.mutable_data_ptr<Scalar>()) : nullptr, problem,
                        c10::cuda::getCurrentCUDAStream());
}

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

  cudaError_t status = cudaSuccess;
  switch (student.scalar_type()) {
    case at::kFloat:
      status = launch_as<float, float>(student, grad, compute_grad, problem);
      break;
    case at::kBFloat16:
      status = launch_as<__nv_bfloat16, at::BFloat16>(student, grad, compute_grad, problem);
      break;
    case at::kHalf:
      status = launch_as<__half, at::Half>(student, grad, compute_grad, problem);
      break;
    default:
      TORCH_CHECK(false, "topk_kl_fwd: CUDA kernel takes float32, bfloat16 or float16, got ", student.scalar_type());
  }
  TORCH_CHECK(status == cudaSuccess, "topk_kl_fwd: CUDA launch failed: ", cudaGetErrorString(status));
  return {loss, grad};
}

}  // namespace
}  // namespace slimlm::cuda

TORCH_LIBRARY_IMPL(slimlm, CUDA, m) { m.impl("topk_kl_fwd", &slimlm::cuda::topk_kl_fwd_cuda); }
