// CPU masked_row_cosine (definition: kernels/reference.py): per row n of two (N, C)
// tensors, Σ a·b / max(‖a‖·‖b‖, eps), 0 on masked rows. Rows run in parallel; each row
// is reduced a chunk at a time in fp32 (vector lanes give pairwise-like partial sums)
// and the chunks are added in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/fp32_rows.h"
#include "cpu/isa.h"

namespace slimlm::cpu {
namespace {

// Below this many elements (of a and b) per thread, run serially (see masked_seq_stats.cpp).
constexpr int64_t kElementsPerThread = int64_t{1} << 22;

struct CosineProblem {
  int64_t rows, channels;
  double eps;
  const bool* mask;
  float* out;
};

template <typename IsaTag, typename T>
SLIMLM_INLINE void cosine_rows(IsaTag tag, const T* a, const T* b, const CosineProblem& p) {
  const int64_t grain = std::max<int64_t>(1, kElementsPerThread / std::max<int64_t>(1, 2 * p.channels));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    float scratch_a[rows::kChunk], scratch_b[rows::kChunk];
    for (int64_t n = begin; n < end; ++n) {
      if (p.mask != nullptr && !p.mask[n]) {
        p.out[n] = 0.0f;
        continue;
      }
      double dot = 0.0, sum_a = 0.0, sum_b = 0.0;
      for (int64_t start = 0; start < p.channels; start += rows::kChunk) {
        const int64_t count = std::min(rows::kChunk, p.channels - start);
        const float* va = rows::load(tag, a + n * p.channels + start, scratch_a, count);
        const float* vb = rows::load(tag, b + n * p.channels + start, scratch_b, count);
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
  });
}

template <typename T>
void cosine_scalar(const T* a, const T* b, const CosineProblem& p) { cosine_rows(rows::Scalar{}, a, b, p); }

#if SLIMLM_X86
template <typename T>
SLIMLM_TARGET_AVX2 void cosine_avx2(const T* a, const T* b, const CosineProblem& p) {
  cosine_rows(rows::Avx2{}, a, b, p);
}

template <typename T>
SLIMLM_TARGET_AVX512 void cosine_avx512(const T* a, const T* b, const CosineProblem& p) {
  cosine_rows(rows::Avx512{}, a, b, p);
}
#endif

template <typename T>
void cosine_dispatch(const T* a, const T* b, const CosineProblem& p) {
#if SLIMLM_X86
  switch (active_isa()) {
    case Isa::Avx512:
      return cosine_avx512(a, b, p);
    case Isa::Avx2:
      return cosine_avx2(a, b, p);
    default:
      break;
  }
#endif
  cosine_scalar(a, b, p);
}

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
  CosineProblem p{a.size(0), a.size(1), eps, mask_ptr, out.data_ptr<float>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "masked_row_cosine", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "masked_row_cosine: float64 runs on the reference");
    } else {
      cosine_dispatch(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), p);
    }
  });
  return out;
}

}  // namespace
}  // namespace slimlm::cpu

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("masked_row_cosine", &slimlm::cpu::masked_row_cosine_cpu); }
