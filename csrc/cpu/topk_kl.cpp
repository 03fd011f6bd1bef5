// Sparse-teacher (top-k) distillation divergence on CPU: loss rows and student gradient.
// The math and its reference are in src/slimlm/kernels/topk_kl.py and reference.py.
// Per row: pass 0 reads the logits once for the max (and whether the row holds a NaN);
// pass 1 sums exp over the row (now in L2); the k-sized bookkeeping runs in double; pass 2
// writes the dense softmax part of the gradient and the k indices are patched after it.
// The dense passes are one template over the Vec of cpu/common/vec.h, compiled per instruction set
// and chosen at run time by active_isa(), like kl_div.cpp.

// GCC 12 reports its own AVX-512 intrinsics as maybe-uninitialized once inlined (kl_div.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/common/variants.h"
#include "cpu/common/vec_math.h"

namespace slimlm::cpu {
namespace {

constexpr double kTiny = std::numeric_limits<float>::min();  // tail clamp, as the fp32 reference

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

inline Term bucket_term(double p, double q, double lp, double lq, double beta) {
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

// Rows [begin, end) of student storage type T.
template <class T>
struct TopkRows {
  static_assert(kIsVecStorage<T>);

  template <class V>
  static void run(const Args& a, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      one_row<V>(a, row);
    }
  }

  template <class V>
  static void one_row(const Args& a, int64_t row) {
    using vec::for_each_vec;
    using vec::load_n;
    using vec::store_n;
    const T* s = static_cast<const T*>(a.student) + row * a.vocab;
    T* grad = a.grad ? static_cast<T*>(a.grad) + row * a.vocab : nullptr;
    const float* lp = a.logprobs + row * a.k;
    const int64_t* idx = a.indices + row * a.k;
    const int64_t vocab = a.vocab;
    auto fill_grad = [&](float value) {
      if (grad) {
        for_each_vec<V>(vocab, [&](int64_t i, int n) { store_n<V, false>(grad + i, n, V::set1(value)); });
      }
    };
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      a.loss[row] = 0.0f;
      fill_grad(0.0f);
      return;
    }
    for (int64_t i = 0; i < a.k; ++i) {
      if (idx[i] < 0 || idx[i] >= vocab) {
        a.bad_index->store(true);
        a.loss[row] = std::numeric_limits<float>::quiet_NaN();
        return;
      }
    }

    // Pass 0.
    V max_v = V::set1(-std::numeric_limits<float>::infinity());
    V nan_seen = V::zero();
    for_each_vec<V>(vocab, [&](int64_t i, int n) {
      const V x = load_n<V>(s + i, n);
      max_v = V::max(x, max_v);
      nan_seen = V::mark_nan(nan_seen, x);
    });
    const float row_max = V::reduce_max(max_v);
    bool undefined = vec::softmax_undefined(row_max, V::any(nan_seen));
    for (int64_t i = 0; i < a.k && !undefined; ++i) {
      undefined = std::isnan(lp[i]) || lp[i] == std::numeric_limits<float>::infinity();
    }
    if (undefined) {
      // A NaN, +inf or all -inf student row, or a NaN/+inf teacher log-prob: the row is NaN.
      const float nan = std::numeric_limits<float>::quiet_NaN();
      a.loss[row] = nan;
      fill_grad(nan);
      return;
    }

    // Pass 1: e_u = exp((s_u − max)/τ) and their sum.
    const float inv_t = static_cast<float>(a.inv_temperature);
    const V inv_t_v = V::set1(inv_t);
    const V shift = V::set1(-row_max * inv_t);
    auto exp_at = [&](int64_t i, int n) { return vec::exp(V::fma(load_n<V>(s + i, n), inv_t_v, shift)); };
    vec::BlockedSum<V> sum_e;
    for_each_vec<V>(vocab, [&](int64_t i, int n) { sum_e.add(exp_at(i, n)); });
    const double sum = sum_e.total();
    const double log_sum = std::log(sum);
    auto log_q_at = [&](int64_t i) {
      return (static_cast<double>(static_cast<float>(s[idx[i]])) - row_max) * a.inv_temperature - log_sum;
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

    // Pass 2: the dense part −step·c·q_u, then the k indices.
    const double step = a.scale * a.inv_temperature;
    const V dense = V::set1(static_cast<float>(-step * c / sum));
    for_each_vec<V>(vocab, [&](int64_t i, int n) { store_n<V, false>(grad + i, n, dense * exp_at(i, n)); });
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
      grad[idx[i]] = static_cast<T>(static_cast<float>(step * (w - c * q)));
    }
  }
};

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
  std::atomic<bool> bad_index{false};
  void (*run_rows)(const Args&, int64_t, int64_t) = nullptr;
  const Isa isa = active_isa();
  visit_storage(student.scalar_type(), "topk_kl_fwd",
                [&](auto storage) { run_rows = variant<TopkRows<decltype(storage)>, const Args&, int64_t, int64_t>(isa); });
  const Args args{student.data_ptr(), logprobs.data_ptr<float>(), indices.data_ptr<int64_t>(),
                  labels.has_value() ? label_tensor.data_ptr<int64_t>() : nullptr, vocab, logprobs.size(1),
                  ignore_index, 1.0 / temperature, beta, scale, renormalize, loss.data_ptr<float>(),
                  compute_grad ? grad.data_ptr() : nullptr, &bad_index};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { run_rows(args, begin, end); });
  TORCH_CHECK(!bad_index.load(), "topk_kl_fwd: an index is outside [0, ", vocab, ")");
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimlm, CPU, m) {
  m.impl("topk_kl_fwd", &topk_kl_fwd_cpu);
}

}  // namespace slimlm::cpu
