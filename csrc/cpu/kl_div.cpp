// CPU kl_div_fwd (definition: src/slimlm/kernels/reference.py, kl_div_fwd).
//
// Per row, with a = s/T, b = t/T, Q = softmax(a), P = softmax(b):
//   pass 0  maxima of s and t, and whether either row holds a NaN (the only pass that
//           reads DRAM); a row whose softmax is undefined (NaN, +inf, all −inf) is all NaN
//   pass 1  e_a = exp(a − max a), e_b = exp(b − max b) into a per-thread row buffer,
//           and their sums, hence both logsumexps
//   pass 2  the divergence terms, from q = e_a/Σe_a, p = e_b/Σe_b and
//           log p − log q = (t − s)/T + lse_a − lse_b (no log per element);
//           forward KL also writes its gradient (q − p)/T here
//   pass 3  reverse KL and JSD: the gradient c·q·(r − Σ q·r)/T (c = 1, or 1 − β) needs the
//           row's divergence first; r = log q − log p, or log q − log m, is kept from pass 2
//           (its sums are compensated: see there)
// Each element costs two exps, plus one exp and one log1p for the JSD. The row buffers
// are 2·V floats per thread, not per row; s, t, the buffers and the gradient row stay in
// L2 between passes, and while one row is computed the next is prefetched, so DRAM
// streams while the cores compute.

// GCC 12 reports its own AVX-512 intrinsics (`__m512 __Y = __Y;` in _mm512_undefined_*)
// as maybe-uninitialized once they are inlined through the flatten entry points.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>

#include "cpu/common/variants.h"
#include "cpu/common/vec_math.h"

namespace slimlm::cpu {
namespace {

enum class Divergence { kForward, kReverse, kJsd };

struct Problem {
  const void* student;
  const void* teacher;
  void* grad;  // null when only the loss is wanted
  float* loss;
  const int64_t* labels;  // null: every row counts
  int64_t ignore_index;
  int64_t cols;
  int64_t buffer_stride;  // floats between the two row buffers
  float inv_temperature;
  double scale;
  double beta;
  bool prefetch_next_row;
};

// The lane of `values` at the largest lane of `keys` (the first one, on ties).
template <class V>
float reduce_at_max(const V& keys, const V& values) {
  float key_lanes[V::kWidth];
  float value_lanes[V::kWidth];
  V::store(key_lanes, keys);
  V::store(value_lanes, values);
  int best = 0;
  for (int lane = 1; lane < V::kWidth; ++lane) {
    best = key_lanes[lane] > key_lanes[best] ? lane : best;
  }
  return value_lanes[best];
}

bool ignored(const Problem& problem, int64_t row) {
  return problem.labels != nullptr && problem.labels[row] == problem.ignore_index;
}

// Rows [begin, end) of one problem; `buffer` holds 2 · buffer_stride floats, 64-byte
// aligned. Stream: the gradient rows are 64-byte aligned and written with non-temporal
// stores (they are too large to be read back from cache).
template <class T, Divergence D, bool Stream>
struct DivergenceRows {
  static_assert(kIsVecStorage<T>);

  template <class V>
  static void run(const Problem& problem, int64_t begin, int64_t end, float* buffer) {
    using vec::BlockedSum;
    using vec::for_each_vec;
    using vec::load_n;
    using vec::store_n;
    constexpr int64_t kLineElements = 64 / sizeof(T);
    const int64_t cols = problem.cols;
    float* const exp_a = buffer;
    float* const exp_b = buffer + problem.buffer_stride;
    const V inv_t = V::set1(problem.inv_temperature);
    const float grad_scale = static_cast<float>(problem.scale) * problem.inv_temperature;

    for (int64_t row = begin; row < end; ++row) {
      const T* s = static_cast<const T*>(problem.student) + row * cols;
      const T* t = static_cast<const T*>(problem.teacher) + row * cols;
      T* g = problem.grad != nullptr ? static_cast<T*>(problem.grad) + row * cols : nullptr;
      if (ignored(problem, row)) {
        problem.loss[row] = 0.0f;
        if (g != nullptr) {
          for_each_vec<V>(cols, [&](int64_t i, int n) { store_n<V, Stream>(g + i, n, V::zero()); });
        }
        continue;
      }

      // Pass 0.
      V max_s = V::set1(-std::numeric_limits<float>::infinity());
      V max_t = max_s;
      V nan_seen = V::zero();
      V t_at_max_s = V::zero();  // reverse KL: the teacher's logit where the student's is largest
      for_each_vec<V>(cols, [&](int64_t i, int n) {
        const V s_i = load_n<V>(s + i, n);
        const V t_i = load_n<V>(t + i, n);
        if constexpr (D == Divergence::kReverse) {
          t_at_max_s = V::select_greater(s_i, max_s, t_i, t_at_max_s);
        }
        max_s = V::max(s_i, max_s);
        max_t = V::max(t_i, max_t);
        nan_seen = V::mark_nan(V::mark_nan(nan_seen, s_i), t_i);
      });
      const float row_max_s = V::reduce_max(max_s);
      const float row_max_t = V::reduce_max(max_t);
      const bool has_nan = V::any(nan_seen);
      if (vec::softmax_undefined(row_max_s, has_nan) || vec::softmax_undefined(row_max_t, has_nan)) {
        // NaN, +inf or an all -inf row on either side: the whole row is NaN, as in the reference.
        const float nan = std::numeric_limits<float>::quiet_NaN();
        problem.loss[row] = nan;
        if (g != nullptr) {
          for_each_vec<V>(cols, [&](int64_t i, int n) { store_n<V, Stream>(g + i, n, V::set1(nan)); });
        }
        continue;
      }
      const float max_a = row_max_s * problem.inv_temperature;
      const float max_b = row_max_t * problem.inv_temperature;

      // Pass 1.
      const bool prefetch = problem.prefetch_next_row && row + 1 < end && !ignored(problem, row + 1);
      const V shift_a = V::set1(-max_a);
      const V shift_b = V::set1(-max_b);
      BlockedSum<V> sum_a, sum_b;
      for_each_vec<V>(cols, [&](int64_t i, int n) {
        if (prefetch && i % kLineElements == 0) {
          __builtin_prefetch(s + cols + i, 0, 2);
          __builtin_prefetch(t + cols + i, 0, 2);
        }
        const V ea = vec::exp(V::fma(load_n<V>(s + i, n), inv_t, shift_a));
        const V eb = vec::exp(V::fma(load_n<V>(t + i, n), inv_t, shift_b));
        V::store(exp_a + i, ea);
        V::store(exp_b + i, eb);
        sum_a.add(ea);
        sum_b.add(eb);
      });
      const double total_a = sum_a.total();
      const double total_b = sum_b.total();
      const V inv_sum_a = V::set1(static_cast<float>(1.0 / total_a));
      const V inv_sum_b = V::set1(static_cast<float>(1.0 / total_b));
      const V lse_gap = V::set1(static_cast<float>((max_a + std::log(total_a)) - (max_b + std::log(total_b))));
      // log p − log q at elements [i, i + n).
      auto log_p_over_q = [&](int64_t i, int n) {
        return V::fma(load_n<V>(t + i, n) - load_n<V>(s + i, n), inv_t, lse_gap);
      };

      // Pass 2 (and 3).
      if constexpr (D == Divergence::kForward) {
        BlockedSum<V> kl;
        const V coef = V::set1(grad_scale);
        for_each_vec<V>(cols, [&](int64_t i, int n) {
          const V p = V::load(exp_b + i) * inv_sum_b;
          kl.add(V::keep_where_positive(p, p * log_p_over_q(i, n)));
          if (g != nullptr) {
            const V q = V::load(exp_a + i) * inv_sum_a;
            store_n<V, Stream>(g + i, n, (q - p) * coef);
          }
        });
        problem.loss[row] = static_cast<float>(problem.scale * kl.total());
      } else {
        // Reverse KL and JSD: r = log q − log (p or m) per element, less a constant c, kept in
        // exp_b (its element i is read just before), then the gradient coef · q · (r − r̄),
        // r̄ = Σ q·r / Σ q (dividing by the computed Σ q, 1 but for rounding, keeps the
        // normaliser's rounding out of r − r̄). For reverse KL |r| can be large where q is
        // large (a token the student is sure of and the teacher is not: r ~ 90), and r − r̄
        // then cancels all but the last few bits of two fp32 numbers; so r is computed
        // relative to its value where the student's logit is largest, in one rounding:
        //   r − c = fma(s − t, 1/τ, −k_hi) − k_lo,  k = (s − t)/τ at argmax s, in double.
        // JSD's log q − log m is at most −log(1 − β) and needs no centring (c = 0).
        double centred_total;  // Σ q·(r − c)
        BlockedSum<V> q_mass;
        float coef;
        if constexpr (D == Divergence::kReverse) {
          const float t_at = reduce_at_max(max_s, t_at_max_s);
          const double k =
              std::isfinite(t_at) ? (static_cast<double>(row_max_s) - t_at) * problem.inv_temperature : 0.0;
          const float k_hi = static_cast<float>(k);
          const V neg_k_hi = V::set1(-k_hi);
          const V k_lo = V::set1(static_cast<float>(k - k_hi));
          BlockedSum<V> kl;
          for_each_vec<V>(cols, [&](int64_t i, int n) {
            const V q = V::load(exp_a + i) * inv_sum_a;
            const V r = V::fma(load_n<V>(s + i, n) - load_n<V>(t + i, n), inv_t, neg_k_hi) - k_lo;
            kl.add(V::keep_where_positive(q, q * r));
            q_mass.add(q);
            V::store(exp_b + i, r);
          });
          // r = (s − t)/τ − (lse_a − lse_b), so the constant taken off is c = k − (lse_a − lse_b).
          const double lse_diff = (max_a + std::log(total_a)) - (max_b + std::log(total_b));
          centred_total = kl.total();
          problem.loss[row] = static_cast<float>(problem.scale * (centred_total + (k - lse_diff) * q_mass.total()));
          coef = grad_scale;
        } else {
          // u = log(βp) − log((1−β)q): log p − log m = −log β − softplus(−u) and
          // log q − log m = −log(1−β) − softplus(u), softplus(±u) = max(±u, 0) + log1p(e^−|u|):
          // exact where p or q is 0 (u = ∓inf), and never the log of a sum.
          const double log_beta = std::log(problem.beta);
          const double log_rest = std::log1p(-problem.beta);
          const V u_shift = V::set1(static_cast<float>(log_beta - log_rest));
          const V neg_log_beta = V::set1(static_cast<float>(-log_beta));
          const V neg_log_rest = V::set1(static_cast<float>(-log_rest));
          BlockedSum<V> kl_p, kl_q;
          for_each_vec<V>(cols, [&](int64_t i, int n) {
            const V p = V::load(exp_b + i) * inv_sum_b;
            const V q = V::load(exp_a + i) * inv_sum_a;
            const V u = log_p_over_q(i, n) + u_shift;
            const V log1p_term = vec::log1p_unit(vec::exp(V::zero() - V::abs(u)));
            const V log_p_over_m = neg_log_beta - (V::max(V::zero() - u, V::zero()) + log1p_term);
            const V log_q_over_m = neg_log_rest - (V::max(u, V::zero()) + log1p_term);
            kl_p.add(V::keep_where_positive(p, p * log_p_over_m));
            kl_q.add(V::keep_where_positive(q, q * log_q_over_m));
            q_mass.add(q);
            V::store(exp_b + i, log_q_over_m);
          });
          centred_total = kl_q.total();
          const double beta = problem.beta;
          problem.loss[row] = static_cast<float>(problem.scale * (beta * kl_p.total() + (1.0 - beta) * centred_total));
          coef = static_cast<float>(problem.scale * (1.0 - beta)) * problem.inv_temperature;
        }
        if (g != nullptr) {
          // r̄ − c as a float pair (hi + lo), so r − r̄ rounds once, not twice.
          const double mean = centred_total / q_mass.total();
          const float mean_hi = static_cast<float>(mean);
          const V mean_hi_v = V::set1(mean_hi);
          const V mean_lo_v = V::set1(static_cast<float>(mean - mean_hi));
          const V coef_v = V::set1(coef);
          for_each_vec<V>(cols, [&](int64_t i, int n) {
            const V q = V::load(exp_a + i) * inv_sum_a;
            const V centred = (V::load(exp_b + i) - mean_hi_v) - mean_lo_v;
            store_n<V, Stream>(g + i, n, V::keep_where_positive(q, q * centred) * coef_v);
          });
        }
      }
    }
    if constexpr (Stream) {
      V::fence();
    }
  }
};

using RowsFn = void (*)(const Problem&, int64_t, int64_t, float*);

template <class T, Divergence D>
RowsFn rows_fn(Isa isa, bool stream) {
  return stream ? variant<DivergenceRows<T, D, true>, const Problem&, int64_t, int64_t, float*>(isa)
                : variant<DivergenceRows<T, D, false>, const Problem&, int64_t, int64_t, float*>(isa);
}

template <class T>
RowsFn rows_fn(Isa isa, Divergence divergence, bool stream) {
  switch (divergence) {
    case Divergence::kForward:
      return rows_fn<T, Divergence::kForward>(isa, stream);
    case Divergence::kReverse:
      return rows_fn<T, Divergence::kReverse>(isa, stream);
    default:
      return rows_fn<T, Divergence::kJsd>(isa, stream);
  }
}

// A gradient at least this large cannot stay cached until it is read: it is written with
// non-temporal stores (a cached write would first read each line from DRAM) into
// huge pages (see advise_huge_pages).
constexpr int64_t kLargeGradBytes = int64_t{16} << 20;
// The next row is prefetched while a row is computed when the two rows' working sets
// fit this many times L2: lines that spill from L2 are still found in L3. Measured on a
// 1 MB-L2 EPYC: 15% less CPU time at 1.1x L2 (V = 49152 fp32), no gain at 3x.
constexpr double kPrefetchL2Multiple = 2.0;

int64_t l2_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{1} << 20;
  }();
  return bytes;
#else
  return int64_t{1} << 20;
#endif
}

// First-touch page faults of a fresh gradient cost more than the kernel: 65k faults
// (~95 ms of system time here) for a 256 MB gradient in 4 KB pages, ~15 ms in 2 MB pages.
// The advice covers the 2 MB-aligned inside of the buffer, which belongs to it alone; where
// transparent huge pages are off it changes nothing.
void advise_huge_pages(const at::Tensor& buffer) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (start + buffer.nbytes()) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                                  double temperature, double beta, double scale, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), "kl_div_fwd: expects two (N, V) tensors of one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "kl_div_fwd: student and teacher dtypes differ");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "kl_div_fwd: expects contiguous logits");
  TORCH_CHECK(temperature > 0.0 && beta >= 0.0 && beta <= 1.0, "kl_div_fwd: needs temperature > 0 and beta in [0, 1]");
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  TORCH_CHECK(cols > 0, "kl_div_fwd: expects a non-empty vocabulary");

  at::Tensor flat_labels;
  if (labels.has_value()) {
    TORCH_CHECK(labels->numel() == rows, "kl_div_fwd: expects one label per row");
    flat_labels = labels->reshape({rows}).to(at::kLong).contiguous();
  }
  at::Tensor loss = at::empty({rows}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(student, at::MemoryFormat::Contiguous) : at::empty({0}, student.options());
  if (rows == 0) {
    return {loss, grad};
  }
  const bool large_grad = compute_grad && static_cast<int64_t>(grad.nbytes()) >= kLargeGradBytes;
  if (large_grad) {
    advise_huge_pages(grad);
  }

  const int64_t element_bytes = student.element_size();
  // Room for a full last vector of the widest Vec, and 64-byte aligned row buffers.
  const int64_t buffer_stride = (cols + 15) / 16 * 16;
  Problem problem{student.data_ptr(),
                  teacher.data_ptr(),
                  compute_grad ? grad.data_ptr() : nullptr,
                  loss.data_ptr<float>(),
                  flat_labels.defined() ? flat_labels.data_ptr<int64_t>() : nullptr,
                  ignore_index,
                  cols,
                  buffer_stride,
                  static_cast<float>(1.0 / temperature),
                  scale,
                  beta,
                  false};
  const int64_t row_bytes = cols * element_bytes;
  const bool stream =
      large_grad && row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(grad.data_ptr()) % 64 == 0;
  // Current s, t, both fp32 buffers, a cached gradient row, and the next s, t.
  const int64_t working_set = 4 * row_bytes + 2 * buffer_stride * 4 + (compute_grad && !stream ? row_bytes : 0);
  problem.prefetch_next_row = working_set <= kPrefetchL2Multiple * l2_cache_bytes();

  const Divergence divergence =
      beta == 0.0 ? Divergence::kForward : (beta == 1.0 ? Divergence::kReverse : Divergence::kJsd);
  const Isa isa = active_isa();
  RowsFn run_rows = nullptr;
  visit_storage(student.scalar_type(), "kl_div_fwd",
                [&](auto storage) { run_rows = rows_fn<decltype(storage)>(isa, divergence, stream); });

  // About 16k elements per task keeps short rows from spawning threads for nothing.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float, FreeDeleter> buffer(
        static_cast<float*>(std::aligned_alloc(64, 2 * buffer_stride * sizeof(float))));
    TORCH_CHECK(buffer != nullptr, "kl_div_fwd: out of memory for a row buffer");
    run_rows(problem, begin, end, buffer.get());
  });
  return {loss, grad};
}

}  // namespace
}  // namespace slimlm::cpu

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("kl_div_fwd", &slimlm::cpu::kl_div_fwd_cpu); }
