// Sparse-teacher (top-k) distillation divergence on CPU: loss rows and student gradient.
// The math and its reference are in src/slimlm/kernels/topk_kl.py and reference.py.
// Per row: pass 1 reads the logits once for max and sum of exp; the k-sized bookkeeping
// runs in double; pass 2 writes the dense softmax part of the gradient (the row is still
// in L2 from pass 1) and the k indices are patched after it. The dense loops are compiled
// once per instruction set (target attributes) and chosen at run time by active_isa().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/isa.h"

namespace slimlm::cpu {
namespace {

#define SLIMLM_INLINE inline __attribute__((always_inline))

constexpr double kTiny = std::numeric_limits<float>::min();  // tail clamp, as the fp32 reference

// exp(x) for x <= 0, 0 below -87 (also for -inf). Branch-free and without float→int
// conversions (which block vectorisation under trapping math): Cody-Waite reduction with
// the 1.5·2^23 rounding trick and Cephes' polynomial (~1 ulp).
SLIMLM_INLINE float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float shifted = clamped * 1.44269504088896341f + 12582912.0f;  // round(x·log2 e) in the low bits
  const float k = shifted - 12582912.0f;
  const int32_t k_int = std::bit_cast<int32_t>(shifted) - 0x4B400000;
  const float r = (clamped - k * 0.693359375f) + k * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float two_k = std::bit_cast<float>((k_int + 127) << 23);
  return y * two_k * static_cast<float>(x >= -87.0f);
}

// Conversions between storage type and float. BFloat16 works on the bits (round to nearest
// even on stores, as c10 does for finite values) so the loops vectorise; c10's do not.
template <typename scalar_t>
SLIMLM_INLINE scalar_t store_as(float value) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = std::bit_cast<uint32_t>(value);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(value);
  }
}

template <typename scalar_t>
SLIMLM_INLINE float load_float(scalar_t value) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return std::bit_cast<float>(static_cast<uint32_t>(value.x) << 16);
  } else {
    return static_cast<float>(value);
  }
}

struct Args {
  const void* student;
  const float* logprobs;
  const int64_t* indices;
  const int64_t* labels;  // nullptr: every row counts
  int64_t vocab;
  int64_t k;
  int64_t ignore_index;
  double inv_temperature;
  double beta;
  double scale;
  bool renormalize;
  float* loss;
  void* grad;  // nullptr: no gradient
  std::atomic<bool>* bad_index;
};

// One bucket's divergence term and ∂D/∂q (see the module docstring of kernels/topk_kl.py).
struct Term {
  double loss;
  double dq;
};

SLIMLM_INLINE Term bucket_term(double p, double q, double lp, double lq, double beta) {
  if (beta == 0.0) {
    return {p > 0 ? p * (lp - lq) : 0.0, q > 0 ? -p / q : 0.0};
  }
  if (beta == 1.0) {
    return {q > 0 ? q * (lq - lp) : 0.0, lq - lp + 1.0};
  }
  const double a = std::log(beta) + lp;
  const double b = std::log1p(-beta) + lq;
  const double hi = std::max(a, b);
  const double lm = std::isinf(hi) ? hi : hi + std::log1p(std::exp(std::min(a, b) - hi));
  const double loss = beta * (p > 0 ? p * (lp - lm) : 0.0) + (1.0 - beta) * (q > 0 ? q * (lq - lm) : 0.0);
  return {loss, (1.0 - beta) * (lq - lm)};
}

template <typename scalar_t>
SLIMLM_INLINE void one_row(const Args& a, int64_t row) {
  const scalar_t* __restrict s = static_cast<const scalar_t*>(a.student) + row * a.vocab;
  scalar_t* __restrict grad = a.grad ? static_cast<scalar_t*>(a.grad) + row * a.vocab : nullptr;
  const float* lp = a.logprobs + row * a.k;
  const int64_t* idx = a.indices + row * a.k;
  const int64_t vocab = a.vocab;
  if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
    a.loss[row] = 0.0f;
    if (grad) {
      std::fill(grad, grad + vocab, scalar_t(0));
    }
    return;
  }
  for (int64_t i = 0; i < a.k; ++i) {
    if (idx[i] < 0 || idx[i] >= vocab) {
      a.bad_index->store(true);
      a.loss[row] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
  }

  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t u = 0; u < vocab; ++u) {
    row_max = std::max(row_max, load_float(s[u]));
  }
  const float inv_t = static_cast<float>(a.inv_temperature);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t u = 0; u < vocab; ++u) {
    sum += exp_nonpositive((load_float(s[u]) - row_max) * inv_t);
  }
  const double log_sum = std::log(static_cast<double>(sum));
  auto log_q_at = [&](int64_t i) {
    return (static_cast<double>(load_float(s[idx[i]])) - row_max) * a.inv_temperature - log_sum;
  };

  // k-sized bookkeeping: loss, c = Σ w_i, and the tail's ∂D/∂q (0 when the tail is clamped).
  double loss = 0.0;
  double c = 0.0;
  double tail_dq = 0.0;
  double log_p_norm = 0.0;
  if (a.renormalize) {
    double hi = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < a.k; ++i) hi = std::max(hi, static_cast<double>(lp[i]));
    double total = 0.0;
    for (int64_t i = 0; i < a.k; ++i) total += std::exp(lp[i] - hi);
    log_p_norm = hi + std::log(total);
    for (int64_t i = 0; i < a.k; ++i) {
      const double lpn = lp[i] - log_p_norm;
      const double p = std::exp(lpn);
      loss += p > 0 ? p * (lpn - log_q_at(i)) : 0.0;
      c -= p;
    }
  } else {
    double sum_p = 0.0, sum_q = 0.0;
    for (int64_t i = 0; i < a.k; ++i) {
      sum_p += std::exp(static_cast<double>(lp[i]));
      sum_q += std::exp(log_q_at(i));
    }
    const double q_tail = std::max(1.0 - sum_q, kTiny);
    const double p_tail = std::max(1.0 - sum_p, kTiny);
    const Term tail = bucket_term(p_tail, q_tail, std::log(p_tail), std::log(q_tail), a.beta);
    loss = tail.loss;
    tail_dq = 1.0 - sum_q > kTiny ? tail.dq : 0.0;
    for (int64_t i = 0; i < a.k; ++i) {
      const double lq = log_q_at(i);
      const double q = std::exp(lq);
      const Term term = bucket_term(std::exp(static_cast<double>(lp[i])), q, lp[i], lq, a.beta);
      loss += term.loss;
      c += q > 0 ? q * (term.dq - tail_dq) : 0.0;
    }
  }
  a.loss[row] = static_cast<float>(a.scale * loss);
  if (!grad) {
    return;
  }

  const double step = a.scale * a.inv_temperature;
  const float dense = static_cast<float>(-step * c / sum);
#pragma omp simd
  for (int64_t u = 0; u < vocab; ++u) {
    grad[u] = store_as<scalar_t>(dense * exp_nonpositive((load_float(s[u]) - row_max) * inv_t));
  }
  for (int64_t i = 0; i < a.k; ++i) {
    const double lq = log_q_at(i);
    const double q = std::exp(lq);
    double w;
    if (a.renormalize) {
      w = -std::exp(lp[i] - log_p_norm);
    } else {
      const Term term = bucket_term(std::exp(static_cast<double>(lp[i])), q, lp[i], lq, a.beta);
      w = q > 0 ? q * (term.dq - tail_dq) : 0.0;
    }
    grad[idx[i]] = store_as<scalar_t>(static_cast<float>(step * (w - c * q)));
  }
}

template <typename scalar_t>
SLIMLM_INLINE void rows_impl(const Args& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    one_row<scalar_t>(a, row);
  }
}

// The same body compiled per instruction set; no -march flag needed anywhere.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SLIMLM_TOPK_VARIANT(NAME, TARGET)                              \
  template <typename scalar_t>                                         \
  TARGET void NAME(const Args& a, int64_t begin, int64_t end) {        \
    rows_impl<scalar_t>(a, begin, end);                                \
  }
SLIMLM_TOPK_VARIANT(rows_avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))))
SLIMLM_TOPK_VARIANT(rows_avx2, __attribute__((target("avx2,fma,f16c"))))
#undef SLIMLM_TOPK_VARIANT
#endif

template <typename scalar_t>
void rows_scalar(const Args& a, int64_t begin, int64_t end) {
  rows_impl<scalar_t>(a, begin, end);
}

template <typename scalar_t>
void run_rows(const Args& a, int64_t begin, int64_t end, Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::Avx512) {
    return rows_avx512<scalar_t>(a, begin, end);
  }
  if (isa == Isa::Avx2) {
    return rows_avx2<scalar_t>(a, begin, end);
  }
#endif
  rows_scalar<scalar_t>(a, begin, end);
}

std::tuple<at::Tensor, at::Tensor> topk_kl_fwd_cpu(const at::Tensor& student, const at::Tensor& logprobs,
                                                   const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                                   int64_t ignore_index, double temperature, double beta, double scale,
                                                   bool renormalize, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "topk_kl_fwd: student must be a contiguous (N, V) tensor");
  TORCH_CHECK(logprobs.dim() == 2 && logprobs.size(0) == student.size(0) && logprobs.is_contiguous() &&
                  logprobs.scalar_type() == at::kFloat,
              "topk_kl_fwd: logprobs must be contiguous fp32 (N, k)");
  TORCH_CHECK(indices.sizes() == logprobs.sizes() && indices.is_contiguous() && indices.scalar_type() == at::kLong,
              "topk_kl_fwd: indices must be contiguous int64 with the logprobs' shape");
  const int64_t rows = student.size(0);
  const int64_t vocab = student.size(1);
  at::Tensor label_tensor;
  if (labels.has_value()) {
    label_tensor = labels->contiguous();
    TORCH_CHECK(label_tensor.scalar_type() == at::kLong && label_tensor.numel() == rows,
                "topk_kl_fwd: labels must be int64 (N,)");
  }
  at::Tensor loss = at::empty({rows}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  TORCH_CHECK(student.scalar_type() != at::kDouble, "topk_kl_fwd: fp64 runs the Python reference, not this kernel");
  std::atomic<bool> bad_index{false};
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "topk_kl_fwd_cpu", [&] {
    const Args args{student.data_ptr(), logprobs.data_ptr<float>(), indices.data_ptr<int64_t>(),
                    labels.has_value() ? label_tensor.data_ptr<int64_t>() : nullptr, vocab, logprobs.size(1),
                    ignore_index, 1.0 / temperature, beta, scale, renormalize, loss.data_ptr<float>(),
                    compute_grad ? grad.data_ptr() : nullptr, &bad_index};
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { run_rows<scalar_t>(args, begin, end, isa); });
  });
  TORCH_CHECK(!bad_index.load(), "topk_kl_fwd: an index is outside [0, ", vocab, ")");
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimlm, CPU, m) {
  m.impl("topk_kl_fwd", &topk_kl_fwd_cpu);
}

}  // namespace slimlm::cpu
