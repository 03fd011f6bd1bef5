// CUDA topk_kl_fwd (definition: src/slimlm/kernels/reference.py), torch-free: raw pointers
// and a stream. The tensor glue is topk_kl_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slimlm::cuda {

// One launch over `rows` contiguous rows of `vocab` student logits and a teacher given as
// its top-k log-probabilities at vocabulary indices.
struct TopKKLProblem {
  int64_t rows;
  int64_t vocab;
  int64_t k;
  const float* logprobs;   // (rows, k) log softmax(teacher / τ) at the indices
  const int64_t* indices;  // (rows, k), in [0, vocab) and distinct per row
  const int64_t* labels;   // (rows,), or nullptr when every row counts
  int64_t ignore_index;    // rows whose label equals it get loss 0 and a zero gradient
  float temperature;       // τ > 0
  float beta;              // 0: KL(P‖Q), 1: KL(Q‖P), between: JSD(β) over the k + 1 buckets
  float scale;             // multiplies the loss and the gradient
  bool renormalize;        // renormalised top-k (forward KL) instead of the tail bucket
  float* loss_rows;        // (rows,) fp32 output; NaN on a row with an index out of range
};

// Writes p.loss_rows and, unless `grad` is nullptr, d(Σ loss_rows)/d student into `grad`.
// T is float, __nv_bfloat16 or __half (instantiated in topk_kl.cu).
template <typename T>
cudaError_t topk_kl_fwd(const T* student, T* grad, const TopKKLProblem& p, cudaStream_t stream);

}  // namespace slimlm::cuda
