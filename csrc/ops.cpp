// Schemas of every slimlm op: one m.def per op, nothing else.
// Implementations register under the same names per device:
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>_binding.cpp (CUDA).
#include <torch/library.h>

TORCH_LIBRARY(slimlm, m) {
  // Fused distillation divergence over rows of logits (see kernels/reference.py):
  // returns (loss per row in fp32, d loss_row / d student in the student's dtype,
  // or an empty tensor when compute_grad is false). Both are multiplied by scale;
  // rows whose label equals ignore_index get loss 0 and a zero gradient.
  m.def(
      "kl_div_fwd(Tensor student, Tensor teacher, Tensor? labels, int ignore_index, "
      "float temperature, float beta, float scale, bool compute_grad) -> (Tensor, Tensor)");
  // Per-sample sequence sums of masked (B, S, C) activations, fp32 (3, B, C / group_size):
  // Σ v, Σ |v|, Σ v² over tokens with mask true, v = x (group_size 1) or the L2 norm of
  // each group of group_size channels (heads of a (B, S, H·D) tensor).
  m.def("masked_seq_stats(Tensor x, Tensor? mask, int group_size) -> Tensor");
  // Row-wise cosine of two (N, C) tensors, fp32 (N,): Σ a·b / max(‖a‖·‖b‖, eps), 0 where mask is false.
  m.def("masked_row_cosine(Tensor a, Tensor b, Tensor? mask, float eps) -> Tensor");
  // Sparse-teacher divergence over rows of logits (see kernels/reference.py topk_kl_fwd): the
  // teacher is (N, k) fp32 log-probs at (N, k) int64 vocabulary indices; renormalize picks the
  // tail handling (false: one tail bucket on both sides; true: renormalised top-k, forward KL).
  // Returns (loss per row in fp32, d loss_row / d student in the student's dtype or empty),
  // both multiplied by scale; rows whose label equals ignore_index get 0.
  m.def(
      "topk_kl_fwd(Tensor student, Tensor topk_logprobs, Tensor topk_indices, Tensor? labels, int ignore_index, "
      "float temperature, float beta, float scale, bool renormalize, bool compute_grad) -> (Tensor, Tensor)");
}
