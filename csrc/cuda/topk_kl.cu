// Sparse-teacher divergence on CUDA: one block per row (math: src/slimlm/kernels/topk_kl.py).
// Pass 1: online max and Σ exp((s − max)/τ) per thread, combined across the block.
// k-sized bookkeeping in fp64 (the tail 1 − Σ cancels): tail bucket, loss, c = Σ w_i.
// Pass 2: the dense gradient −scale/τ · c · q_u, then, after a barrier, the k entries.
#include <cfloat>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/topk_kl.h"

namespace slimlm::cuda {
namespace {

constexpr int kThreads = 256;  // 80 registers, no spills on sm_90 (512 spills)
constexpr int kWarps = kThreads / 32;
constexpr double kTiny = FLT_MIN;  // tail clamp, as the fp32 reference

// Running (max, Σ exp((x − max)·inv_t)) pairs; -inf maxima stay exact (no -inf − -inf).
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b, float inv_t) {
  const float hi = fmaxf(a.max, b.max);
  if (hi == -INFINITY) {
    return {hi, 0.0f};
  }
  return {hi, a.sum * __expf((a.max - hi) * inv_t) + b.sum * __expf((b.max - hi) * inv_t)};
}

__device__ MaxSum block_max_sum(MaxSum value, float inv_t, MaxSum* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, value.max, offset), __shfl_xor_sync(0xffffffffu, value.sum, offset)};
    value = combine(value, other, inv_t);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) shared[warp] = value;
  __syncthreads();
  MaxSum total = shared[0];
  for (int w = 1; w < kWarps; ++w) total = combine(total, shared[w], inv_t);
  __syncthreads();
  return total;
}

// Σ over the block of up to two doubles at once; every thread gets the totals.
__device__ double2 block_sum2(double2 value, double2* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value.x += __shfl_xor_sync(0xffffffffu, value.x, offset);
    value.y += __shfl_xor_sync(0xffffffffu, value.y, offset);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) shared[warp] = value;
  __syncthreads();
  double2 total = make_double2(0.0, 0.0);
  for (int w = 0; w < kWarps; ++w) {
    total.x += shared[w].x;
    total.y += shared[w].y;
  }
  __syncthreads();
  return total;
}

struct Term {
  double loss;
  double dq;
};

// One bucket's divergence term and ∂D/∂q (see topk_kl.py).
__device__ Term bucket_term(double p, double q, double log_p, double log_q, double beta) {
  if (beta == 0.0) {
    return {p > 0 ? p * (log_p - log_q) : 0.0, q > 0 ? -p / q : 0.0};
  }
  if (beta == 1.0) {
    return {q > 0 ? q * (log_q - log_p) : 0.0, q > 0 ? log_q - log_p + 1.0 : 0.0};
  }
  const double a = log(beta) + log_p;
  const double b = log1p(-beta) + log_q;
  const double hi = fmax(a, b);
  const double log_m = isinf(hi) ? hi : hi + log1p(exp(fmin(a, b) - hi));
  const double loss = beta * (p > 0 ? p * (log_p - log_m) : 0.0) + (1.0 - beta) * (q > 0 ? q * (log_q - log_m) : 0.0);
  return {loss, q > 0 ? (1.0 - beta) * (log_q - log_m) : 0.0};
}

template <typename T>
struct Args {
  const T* student;
  T* grad;
  TopKKLProblem p;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_kl_fwd_kernel(const Args<T> a) {
  __shared__ MaxSum shared_max_sum[kWarps];
  __shared__ double2 shared_sums[kWarps];
  __shared__ int bad_index;
  __shared__ int undefined;  // a NaN/+inf student logit or teacher log-prob: the row is NaN
  const int64_t row = blockIdx.x;
  const int64_t vocab = a.p.vocab;
  const int64_t k = a.p.k;
  const T* s = a.student + row * vocab;
  T* grad = a.grad != nullptr ? a.grad + row * vocab : nullptr;
  const float* log_p = a.p.logprobs + row * k;
  const int64_t* idx = a.p.indices + row * k;

  if (a.p.labels != nullptr && a.p.labels[row] == a.p.ignore_index) {
    if (threadIdx.x == 0) a.p.loss_rows[row] = 0.0f;
    if (grad != nullptr) {
      for (int64_t u = threadIdx.x; u < vocab; u += kThreads) grad[u] = from_float<T>(0.0f);
    }
    return;
  }
  if (threadIdx.x == 0) {
    bad_index = 0;
    undefined = 0;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += kThreads) {
    if (idx[i] < 0 || idx[i] >= vocab) bad_index = 1;
    if (isnan(log_p[i]) || log_p[i] == INFINITY) undefined = 1;
  }
  __syncthreads();
  if (bad_index) {
    if (threadIdx.x == 0) a.p.loss_rows[row] = NAN;
    return;
  }

  const float inv_t = 1.0f / a.p.temperature;
  MaxSum local{-INFINITY, 0.0f};
  for (int64_t u = threadIdx.x; u < vocab; u += kThreads) {
    const float x = to_float(s[u]);
    if (isnan(x) || x == INFINITY) undefined = 1;
    local = combine(local, MaxSum{x, 1.0f}, inv_t);
  }
  const MaxSum row_stats = block_max_sum(local, inv_t, shared_max_sum);  // synchronises `undefined` too
  if (undefined || row_stats.max == -INFINITY) {
    // An undefined student softmax (NaN, +inf, all -inf) or teacher log-prob: NaN, as in the reference.
    if (threadIdx.x == 0) a.p.loss_rows[row] = NAN;
    if (grad != nullptr) {
      for (int64_t u = threadIdx.x; u < vocab; u += kThreads) grad[u] = from_float<T>(NAN);
    }
    return;
  }
  const double log_sum = log(static_cast<double>(row_stats.sum));
  const double inv_td = 1.0 / static_cast<double>(a.p.temperature);
  auto log_q_at = [&](int64_t i) { return (static_cast<double>(to_float(s[idx[i]])) - row_stats.max) * inv_td - log_sum; };

  // Sums over the k entries: (Σ p, Σ q) for the tail, or (max, Σ exp) of the log-probs to renormalise.
  double log_p_norm = 0.0, tail_dq = 0.0, loss = 0.0;
  if (a.p.renormalize) {
    double2 hi = make_double2(-INFINITY, 0.0);
    for (int64_t i = threadIdx.x; i < k; i += kThreads) hi.x = fmax(hi.x, static_cast<double>(log_p[i]));
    for (int offset = 16; offset > 0; offset /= 2) hi.x = fmax(hi.x, __shfl_xor_sync(0xffffffffu, hi.x, offset));
    if (threadIdx.x % 32 == 0) shared_sums[threadIdx.x / 32] = hi;
    __syncthreads();
    double p_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) p_max = fmax(p_max, shared_sums[w].x);
    __syncthreads();
    double2 total = make_double2(0.0, 0.0);
    for (int64_t i = threadIdx.x; i < k; i += kThreads) total.x += exp(log_p[i] - p_max);
    total = block_sum2(total, shared_sums);
    log_p_norm = p_max + log(total.x);
  } else {
    double2 sums = make_double2(0.0, 0.0);
    for (int64_t i = threadIdx.x; i < k; i += kThreads) {
      sums.x += exp(static_cast<double>(log_p[i]));
      sums.y += exp(log_q_at(i));
    }
    sums = block_sum2(sums, shared_sums);
    const double p_tail = fmax(1.0 - sums.x, kTiny);
    const double q_tail = fmax(1.0 - sums.y, kTiny);
    const Term tail = bucket_term(p_tail, q_tail, log(p_tail), log(q_tail), a.p.beta);
    loss = tail.loss;
    tail_dq = 1.0 - sums.y > kTiny ? tail.dq : 0.0;
  }
  // w_i = q_i · (∂D/∂q_i − ∂D/∂q_tail), or −P'_i when renormalised.
  auto weight_at = [&](int64_t i, double q, double log_q, double* term_loss) {
    if (a.p.renormalize) {
      const double log_pn = log_p[i] - log_p_norm;
      const double pn = exp(log_pn);
      *term_loss = pn > 0 ? pn * (log_pn - log_q) : 0.0;
      return -pn;
    }
    const Term term = bucket_term(exp(static_cast<double>(log_p[i])), q, log_p[i], log_q, a.p.beta);
    *term_loss = term.loss;
    return q > 0 ? q * (term.dq - tail_dq) : 0.0;
  };
  double2 loss_c = make_double2(0.0, 0.0);
  for (int64_t i = threadIdx.x; i < k; i += kThreads) {
    const double log_q = log_q_at(i);
    double term_loss;
    loss_c.y += weight_at(i, exp(log_q), log_q, &term_loss);
    loss_c.x += term_loss;
  }
  loss_c = block_sum2(loss_c, shared_sums);
  const double c = loss_c.y;
  if (threadIdx.x == 0) a.p.loss_rows[row] = static_cast<float>(a.p.scale * (loss + loss_c.x));
  if (grad == nullptr) return;

  const double step = static_cast<double>(a.p.scale) * inv_td;
  const float dense = static_cast<float>(-step * c / row_stats.sum);
  for (int64_t u = threadIdx.x; u < vocab; u += kThreads) {
    grad[u] = from_float<T>(dense * __expf((to_float(s[u]) - row_stats.max) * inv_t));
  }
  // The k entries overwrite values other threads of this block just wrote.
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += kThreads) {
    const double log_q = log_q_at(i);
    const double q = exp(log_q);
    double unused;
    const double w = weight_at(i, q, log_q, &unused);
    grad[idx[i]] = from_float<T>(static_cast<float>(step * (w - c * q)));
  }
}

}  // namespace

template <typename T>
cudaError_t topk_kl_fwd(const T* student, T* grad, const TopKKLProblem& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const Args<T> args{student, grad, p};
  topk_kl_fwd_kernel<T><<<static_cast<unsigned int>(p.rows), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template cudaError_t topk_kl_fwd<float>(const float*, float*, const TopKKLProblem&, cudaStream_t);
template cudaError_t topk_kl_fwd<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, const TopKKLProblem&, cudaStream_t);
template cudaError_t topk_kl_fwd<__half>(const __half*, __half*, const TopKKLProblem&, cudaStream_t);

}  // namespace slimlm::cuda
