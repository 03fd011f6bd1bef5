// Tensor glue of the CUDA kl_div_fwd (kl_div.cu): checks the invariants the Python layer
// guarantees, allocates the outputs, picks the device and stream, calls the launcher.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/binding.h"
#include "cuda/kl_div.h"

namespace slimlm::cuda {
namespace {

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

  const cudaError_t status = visit_storage(student.scalar_type(), "kl_div_fwd", [&](auto storage) {
    using T = typename decltype(storage)::type;
    return kl_div_fwd<T>(data_as<const T>(student), data_as<const T>(teacher), compute_grad ? data_as<T>(grad) : nullptr,
                         problem, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(status == cudaSuccess, "kl_div_fwd: CUDA launch failed: ", cudaGetErrorString(status));
  return {loss, grad};
}

}  // namespace
}  // namespace slimlm::cuda

TORCH_LIBRARY_IMPL(slimlm, CUDA, m) { m.impl("kl_div_fwd", &slimlm::cuda::kl_div_fwd_cuda); }
