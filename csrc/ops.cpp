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
}
