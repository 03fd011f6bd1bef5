// CPU masked_row_cosine (definition: kernels/reference.py): per row n of two (N, C)
// tensors, Σ a·b / max(‖a‖·‖b‖, eps), 0 on masked rows. Rows run in parallel; each row
// is reduced a chunk at a time in fp32 (vector lanes give pairwise-like partial sums)
// and the chunks are added in double.
// GCC 12 reports its own AVX-512 intrinsics as maybe-uninitialized once inlined (kl_div.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/common/variants.h"
#include "cpu/common/vec_math.h"

namespace slimlm::cpu {
namespace {

// Below this many elements (of a and b) per thread, run serially (see masked_seq_stats.cpp).
constexpr int64_t kElementsPerThread = int64_t{1} << 22;
// Elements converted to fp32 at a time: the scratch rows stay in L1.
constexpr int64_t kChunk = 1024;

struct CosineProblem {
  const void* a;
  const void* b;
  int64_t rows, channels;
  double eps;
  const bool* mask;
  float* out;
};

// Rows [begin, end); the fp32 loops are plain C++, vectorised by the compiler for the
// instruction set of the entry they are inlined into (cpu/common/variants.h).
template <class T>
struct CosineRows {
  template <class V>
  static void run(const CosineProblem& p, int64_t begin, int64_t end) {
    float scratch_a[kChunk], scratch_b[kChunk];
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    for (int64_t n = begin; n < end; ++n) {
      if (p.mask != nullptr && !p.mask[n]) {
        p.out[n] = 0.0f;
        continue;
      }
      double dot = 0.0, sum_a = 0.0, sum_b = 0.0;
      for (int64_t start = 0; start < p.channels; start += kChunk) {
        const int64_t count = std::min(kChunk, p.channels - start);
        const float* va = vec::as_float<V>(a + n * p.channels + start, scratch_a, count);
        const float* vb = vec::as_float<V>(b + n * p.channels + start, scratch_b, count);
        float chunk_dot = 0.0f, chunk_a = 0.0f, chunk_b = 0.0f;
#pragma omp simd reduction(+ : chunk_dot, chunk_a, chunk_b)
        for (int64_t i = 0; i < count; ++i) {
          chunk_dot += va[i] * vb[i];
          chunk_a += va[i] * va[i];
          chunk_b += vb[i] * vb[i];
        }
        dot += chunk_dot;
        sum_a += chunk_a;
        sum_b += chunk_b;
      }
      p.out[n] = static_cast<float>(dot / std::max(std::sqrt(sum_a) * std::sqrt(sum_b), p.eps));
    }
  }
};

at::Tensor masked_row_cosine_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& mask,
                                 double eps) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes() &&
                  a.scalar_type() == b.scalar_type(),
              "masked_row_cosine: a and b must be contiguous (N, C) tensors of one dtype");
  auto out = at::empty({a.size(0)}, a.options().dtype(at::kFloat));
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == a.size(0),
                "masked_row_cosine: mask must be a contiguous bool (N,) tensor");
    mask_ptr = mask->data_ptr<bool>();
  }
  if (out.numel() == 0) {
    return out;
  }
  CosineProblem p{a.data_ptr(), b.data_ptr(), a.size(0), a.size(1), eps, mask_ptr, out.data_ptr<float>()};
  const Isa isa = active_isa();
  visit_storage(a.scalar_type(), "masked_row_cosine", [&](auto storage) {
    const auto rows = variant<CosineRows<decltype(storage)>, const CosineProblem&, int64_t, int64_t>(isa);
    const int64_t grain = std::max<int64_t>(1, kElementsPerThread / std::max<int64_t>(1, 2 * p.channels));
    at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { rows(p, begin, end); });
  });
  return out;
}

}  // namespace
}  // namespace slimlm::cpu

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("masked_row_cosine", &slimlm::cpu::masked_row_cosine_cpu); }
