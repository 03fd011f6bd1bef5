// Tensor glue of the CUDA kl_div_fwd (kl_div.cu): checks the invariants the Python layer
// guarantees, allocates the outputs, picks the device and stream, calls the launcher.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/kl_div.h"

namespace slimlm::cuda {
namespace {

template <typename T, typename Scalar>
cudaError_t launch_as(const at::Tensor& student, const at::Tensor& teacher, at::Tensor& grad, bool compute_grad,
                      const KLDivProblem& problem) {
  // at::BFloat16 / at::Half and __nv_bfloat16 / __half share their bits.
  return kl_div_fwd<T>(reinterpret_cast<const T*>(student.const_data_ptr<Scalar>()),
                       reinterpret_cast<const T*>(teacher.const_data_ptr<Scalar>()),
                       compute_grad ? reinterpret_cast<T*>(grad.mutable_data_ptr<Scalar>()) : nullptr, problem,
                       c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                                   double temperature, double beta, double scale, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous() && teacher.is_contiguous() &&
                  student.sizes() == teacher.sizes() && student.scalar_type() == teacher.scalar_type() &&
                  student.device() == teacher.device(),
              "kl_div_fwd: student and teacher must be contiguous (N, V) tensors of one dtype and device");
  TORCH_CHECK(temperature > 0.0 && beta >= 0.0 && beta <= 1.0, "kl_div_fwd: need temperature > 0 and beta in [0, 1]");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0);

  at::Tensor labels_long;
  if (labels.has_value()) {
    TORCH_CHECK(labels->numel() == rows && labels->device() == student.device() && !labels->is_floating_point(),
                "kl_div_fwd: labels must be an integer tensor with one entry per row on ", student.device());
    // The kernel reads int64; other integer labels are widened here (N values, cheap).
    labels_long = labels->to(at::kLong).contiguous();
  }

  auto loss = at::empty({rows}, student.options().dtype(at::kFloat));
  auto grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  const KLDivProblem problem{rows,
                             student.size(1),
                             labels_long.defined() ? labels_long.const_data_ptr<int64_t>() : nullptr,
                             ignore_index,
                             static_cast<float>(temperature),
                             static_cast<float>(beta),
                             static_cast<float>(scale),
                             loss.mutable_data_ptr<float>()};

  cudaError_t status = cudaSuccess;
  switch (student.scalar_type()) {
    case at::kFloat:
      status = launch_as<float, float>(student, teacher, grad, compute_grad, problem);
      break;
    case at::kBFloat16:
      status = launch_as<__nv_bfloat16, at::BFloat16>(student, teacher, grad, compute_grad, problem);
      break;
    case at::kHalf:
      status = launch_as<__half, at::Half>(student, teacher, grad, compute_grad, problem);
      break;
    default:
      TORCH_CHECK(false, "kl_div_fwd: CUDA kernel takes float32, bfloat16 or float16, got ", student.scalar_type());
  }
  TORCH_CHECK(status == cudaSuccess, "kl_div_fwd: CUDA launch failed: ", cudaGetErrorString(status));
  return {loss, grad};
}

}  // namespace
}  // namespace slimlm::cuda

TORCH_LIBRARY_IMPL(slimlm, CUDA, m) { m.impl("kl_div_fwd", &slimlm::cuda::kl_div_fwd_cuda); }
