// CUDA kl_div_fwd (definition: src/slimlm/kernels/reference.py), torch-free: raw pointers
// and a stream. The tensor glue is kl_div_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slimlm::cuda {

// One launch over `rows` contiguous rows of `vocab` logits.
struct KLDivProblem {
  int64_t rows;
  int64_t vocab;
  const int64_t* labels;  // (rows,), or nullptr when every row counts
  int64_t ignore_index;   // rows whose label equals it get loss 0 and a zero gradient
  float temperature;      // τ > 0
  float beta;             // 0: KL(P‖Q), 1: KL(Q‖P), between: JSD(β)
  float scale;            // multiplies the loss and the gradient
  float* loss_rows;       // (rows,) fp32 output
};

// Writes p.loss_rows and, unless `grad` is nullptr, d(Σ loss_rows)/d student into `grad`.
// T is float, __nv_bfloat16 or __half (explicitly instantiated in kl_div.cu). Returns the
// launch's error (cudaSuccess when it was queued on `stream`).
template <typename T>
cudaError_t kl_div_fwd(const T* student, const T* teacher, T* grad, const KLDivProblem& p, cudaStream_t stream);

}  // namespace slimlm::cuda
