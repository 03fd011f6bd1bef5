// CUDA kl_div_fwd (definition: src/slimlm/kernels/reference.py). One block per row, fp32
// math, Q = softmax(s/τ), P = softmax(t/τ):
//  - pass 1 streams both rows once for their max and Σ exp (online per thread, merged over
//    the block), and for the two KL directions the loss as well:
//    KL(P‖Q) = (E_P[t − s] − (max t − max s))/τ + log Z_s − log Z_t, where
//    Σ exp((t − max t)/τ)·(t − s) rescales like Z_t (reverse KL mirrors it);
//  - pass 2 writes the KL gradients, forward (Q − P)/τ and reverse
//    Q((s − t) − E_Q[s − t])/τ² (= Q(log Q − log P − L)/τ with the row constants cancelled
//    exactly), or accumulates the JSD's KL(P‖M) and KL(Q‖M);
//  - pass 3 (JSD) writes (1 − β) Q (log Q − log M − KL(Q‖M))/τ. All times `scale`.
// Traffic per row: KL reads s and t twice and writes the gradient once, JSD reads them three
// times. Each pass runs the opposite way to the one before, so it starts on what is still
// in L2; the gradient pass streams (evict-first) since nothing reads those lines again.
#include "cuda/kl_div.h"

#include "cuda/common.cuh"

#include <cmath>
#include <cstdint>

namespace slimlm::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr float kInf = __builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;

enum class Divergence { kForward, kReverse, kJsd };

// A row as [scalar head | 16-byte vectors | scalar tail]; the head brings the first vector
// to a 16-byte boundary. Without `vectorized` the whole row is head.
struct RowSplit {
  int64_t head, body_end;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t vocab, bool vectorized) {
  if (!vectorized) {
    return {vocab, vocab};
  }
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) & 15u);
  const int64_t to_boundary = misalign == 0 ? 0 : (16 - misalign) / static_cast<int64_t>(sizeof(T));
  const int64_t head = to_boundary < vocab ? to_boundary : vocab;
  return {head, head + (vocab - head) / Pack<T>::kLanes * Pack<T>::kLanes};
}

// Calls visit(s, t, out) on every element of a row, with s, t, out float[n] for n = kLanes
// (one 16-byte load per side) or n = 1 (the unaligned ends); the block's threads share the
// row in coalesced strides. kGradPass stores `out` to grad and marks the row's lines
// evict-first, since this is the last time the kernel touches them.
template <typename T, bool kGradPass, typename Visit>
__device__ __forceinline__ void sweep_row(const T* __restrict__ s, const T* __restrict__ t, T* __restrict__ grad,
                                          int64_t vocab, bool vectorized, bool backwards, Visit&& visit) {
  constexpr int kLanes = Pack<T>::kLanes;
  const RowSplit split = split_row(s, vocab, vectorized);
  const int64_t scalars = split.head + (vocab - split.body_end);
  for (int64_t i = threadIdx.x; i < scalars; i += blockDim.x) {
    const int64_t col = i < split.head ? i : split.body_end + (i - split.head);
    const float s_val[1] = {to_float(s[col])};
    const float t_val[1] = {to_float(t[col])};
    float out[1];
    visit(s_val, t_val, out);
    if constexpr (kGradPass) {
      grad[col] = from_float<T>(out[0]);
    }
  }
  const int64_t vectors = (split.body_end - split.head) / kLanes;
  const uint4* s_vec = reinterpret_cast<const uint4*>(s + split.head);
  const uint4* t_vec = reinterpret_cast<const uint4*>(t + split.head);
  uint4* g_vec = kGradPass ? reinterpret_cast<uint4*>(grad + split.head) : nullptr;
#pragma unroll 2
  for (int64_t k = threadIdx.x; k < vectors; k += blockDim.x) {
    const int64_t j = backwards ? vectors - 1 - k : k;
    float s_val[kLanes], t_val[kLanes], out[kLanes];
    if constexpr (kGradPass) {
      unpack<T>(__ldcs(s_vec + j), s_val);
      unpack<T>(__ldcs(t_vec + j), t_val);
    } else {
      unpack<T>(__ldg(s_vec + j), s_val);
      unpack<T>(__ldg(t_vec + j), t_val);
    }
    visit(s_val, t_val, out);
    if constexpr (kGradPass) {
      __stcs(g_vec + j, pack<T>(out));
    }
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* grad, int64_t vocab, bool vectorized) {
  constexpr int kLanes = Pack<T>::kLanes;
  const RowSplit split = split_row(grad, vocab, vectorized);
  const int64_t scalars = split.head + (vocab - split.body_end);
  for (int64_t i = threadIdx.x; i < scalars; i += blockDim.x) {
    grad[i < split.head ? i : split.body_end + (i - split.head)] = from_float<T>(0.0f);
  }
  uint4* g_vec = reinterpret_cast<uint4*>(grad + split.head);
  const int64_t vectors = (split.body_end - split.head) / kLanes;
  for (int64_t k = threadIdx.x; k < vectors; k += blockDim.x) {
    __stcs(g_vec + k, make_uint4(0u, 0u, 0u, 0u));  // +0.0 in every format
  }
}

struct MaxOp {
  static constexpr float kIdentity = -kInf;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Reduces N values over the block; every thread gets the same bits back (the butterfly
// adds the same pairs in every lane), so all threads agree on the row's statistics.
// `scratch` holds N * 32 floats; blockDim.x is a multiple of 32.
template <typename Op, int N>
__device__ __forceinline__ void block_allreduce(float (&values)[N], float* scratch) {
  const Op op;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      values[i] = op(values[i], __shfl_xor_sync(0xffffffffu, values[i], offset));
    }
  }
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      scratch[i * kWarp + warp] = values[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float value = lane < warps ? scratch[i * kWarp + lane] : Op::kIdentity;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    }
    values[i] = value;
  }
}

// An infinite divergence term stays infinite even when its weight's rescale underflows to 0.
__device__ __forceinline__ float rescale(float acc, float factor) { return acc == kInf ? acc : acc * factor; }

// log M = logaddexp(log β + log P, log(1 − β) + log Q). Where P = Q = 0 it gives 0, a finite
// stand-in: those entries are weighted by P = Q = 0. __logf's absolute error on [1, 2] is
// below 2^-21.4, and the result only enters the loss and gradient multiplied by P or Q ≤ 1.
__device__ __forceinline__ float log_mixture(float log_p, float log_q, float log_beta, float log_1m_beta) {
  const float x1 = log_p + log_beta;
  const float x2 = log_q + log_1m_beta;
  const float hi = fmaxf(x1, x2) == -kInf ? 0.0f : fmaxf(x1, x2);
  return hi + __logf(1.0f + exp2f((fminf(x1, x2) - hi) * kLog2e));
}

template <typename T>
struct Args {
  const T* student;
  const T* teacher;
  T* grad;  // nullptr: loss only
  const int64_t* labels;
  int64_t ignore_index;
  int64_t rows;
  int64_t vocab;
  float inv_temperature;
  float exp2_scale;  // log2(e)/τ: exp((x − m)/τ) = exp2((x − m)·exp2_scale)
  float beta;
  float log_beta;
  float log_1m_beta;
  float scale;
  float* loss_rows;
  bool vectorized;  // student, teacher and grad share their offset modulo 16 bytes
};

// Per-thread online statistics of pass 1; `cross` is Σ w·(w − o) over the side w that
// weights the KL (teacher for forward, student for reverse), o the other side.
struct Running {
  float s_max = -kInf, s_sum = 0.0f, t_max = -kInf, t_sum = 0.0f, cross = 0.0f;
  float poisoned = 0.0f;  // 1 once a NaN or +inf is seen (fmaxf skips NaN, so it is tracked apart)
};

__device__ __forceinline__ bool poisons_softmax(float x) { return isnan(x) || x == kInf; }

template <typename T, Divergence kKind>
__global__ void __launch_bounds__(kMaxThreads) kl_div_fwd_kernel(const Args<T> a) {
  __shared__ float scratch[3 * kWarp];
  const float inv_t = a.inv_temperature;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t offset = row * a.vocab;
    const T* s = a.student + offset;
    const T* t = a.teacher + offset;
    T* grad = a.grad != nullptr ? a.grad + offset : nullptr;
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (threadIdx.x == 0) {
        a.loss_rows[row] = 0.0f;
      }
      if (grad != nullptr) {
        zero_row(grad, a.vocab, a.vectorized);
      }
      continue;
    }

    Running run;
    sweep_row<T, false>(s, t, nullptr, a.vocab, a.vectorized, false, [&](const auto& sv, const auto& tv, auto&) {
      constexpr int n = sizeof(sv) / sizeof(sv[0]);
      float s_chunk = -kInf, t_chunk = -kInf;
#pragma unroll
      for (int i = 0; i < n; ++i) {
        s_chunk = fmaxf(s_chunk, sv[i]);
        t_chunk = fmaxf(t_chunk, tv[i]);
        run.poisoned = poisons_softmax(sv[i]) || poisons_softmax(tv[i]) ? 1.0f : run.poisoned;
      }
      if (s_chunk > run.s_max) {  // rare after the first chunks: the exp of a rescale is paid seldom
        const float factor = exp2f((run.s_max - s_chunk) * a.exp2_scale);
        run.s_sum *= factor;
        if constexpr (kKind == Divergence::kReverse) {
          run.cross = rescale(run.cross, factor);
        }
        run.s_max = s_chunk;
      }
      if (t_chunk > run.t_max) {
        const float factor = exp2f((run.t_max - t_chunk) * a.exp2_scale);
        run.t_sum *= factor;
        if constexpr (kKind == Divergence::kForward) {
          run.cross = rescale(run.cross, factor);
        }
        run.t_max = t_chunk;
      }
      // A max still at -inf means every value so far is -inf: shift by 0 so exp gives 0, not NaN.
      const float s_shift = run.s_max == -kInf ? 0.0f : run.s_max;
      const float t_shift = run.t_max == -kInf ? 0.0f : run.t_max;
#pragma unroll
      for (int i = 0; i < n; ++i) {
        const float s_term = exp2f((sv[i] - s_shift) * a.exp2_scale);
        const float t_term = exp2f((tv[i] - t_shift) * a.exp2_scale);
        run.s_sum += s_term;
        run.t_sum += t_term;
        if constexpr (kKind == Divergence::kForward) {
          run.cross += t_term > 0.0f ? t_term * (tv[i] - sv[i]) : 0.0f;
        } else if constexpr (kKind == Divergence::kReverse) {
          run.cross += s_term > 0.0f ? s_term * (sv[i] - tv[i]) : 0.0f;
        }
      }
    });

    float maxima[3] = {run.s_max, run.t_max, run.poisoned};
    block_allreduce<MaxOp>(maxima, scratch);
    const float s_max = maxima[0], t_max = maxima[1];
    if (maxima[2] > 0.0f || s_max == -kInf || t_max == -kInf) {
      // NaN, +inf or an all -inf row on either side: the row is NaN, as in the reference.
      const float nan = __int_as_float(0x7fc00000);
      if (threadIdx.x == 0) {
        a.loss_rows[row] = nan;
      }
      if (grad != nullptr) {
        sweep_row<T, true>(s, t, grad, a.vocab, a.vectorized, false, [&](const auto& sv, const auto&, auto& out) {
          constexpr int n = sizeof(sv) / sizeof(sv[0]);
#pragma unroll
          for (int i = 0; i < n; ++i) {
            out[i] = nan;
          }
        });
      }
      continue;
    }
    const float s_factor = run.s_max == -kInf ? 0.0f : exp2f((run.s_max - s_max) * a.exp2_scale);
    const float t_factor = run.t_max == -kInf ? 0.0f : exp2f((run.t_max - t_max) * a.exp2_scale);
    float sums[3] = {run.s_sum * s_factor, run.t_sum * t_factor,
                     rescale(run.cross, kKind == Divergence::kForward ? t_factor : s_factor)};
    block_allreduce<SumOp>(sums, scratch);
    const float log_zs = logf(sums[0]);
    const float log_zt = logf(sums[1]);
    const float grad_scale = a.scale * inv_t;

    if constexpr (kKind == Divergence::kForward) {
      const float divergence = (sums[2] / sums[1] - (t_max - s_max)) * inv_t + (log_zs - log_zt);
      if (threadIdx.x == 0) {
        a.loss_rows[row] = divergence * a.scale;
      }
      if (grad != nullptr) {
        sweep_row<T, true>(s, t, grad, a.vocab, a.vectorized, true, [&](const auto& sv, const auto& tv, auto& out) {
          constexpr int n = sizeof(sv) / sizeof(sv[0]);
#pragma unroll
          for (int i = 0; i < n; ++i) {
            const float q = exp2f(((sv[i] - s_max) * inv_t - log_zs) * kLog2e);
            const float p = exp2f(((tv[i] - t_max) * inv_t - log_zt) * kLog2e);
            out[i] = (q - p) * grad_scale;
          }
        });
      }
    } else if constexpr (kKind == Divergence::kReverse) {
      const float mean_gap = sums[2] / sums[0];  // E_Q[s − t]
      const float divergence = (mean_gap - (s_max - t_max)) * inv_t + (log_zt - log_zs);
      if (threadIdx.x == 0) {
        a.loss_rows[row] = divergence * a.scale;
      }
      if (grad != nullptr) {
        const float gap_scale = grad_scale * inv_t;
        sweep_row<T, true>(s, t, grad, a.vocab, a.vectorized, true, [&](const auto& sv, const auto& tv, auto& out) {
          constexpr int n = sizeof(sv) / sizeof(sv[0]);
#pragma unroll
          for (int i = 0; i < n; ++i) {
            const float q = exp2f(((sv[i] - s_max) * inv_t - log_zs) * kLog2e);
            out[i] = q > 0.0f ? q * ((sv[i] - tv[i]) - mean_gap) * gap_scale : 0.0f;
          }
        });
      }
    } else {
      float kl[2] = {0.0f, 0.0f};  // KL(P‖M), KL(Q‖M)
      sweep_row<T, false>(s, t, nullptr, a.vocab, a.vectorized, true, [&](const auto& sv, const auto& tv, auto&) {
        constexpr int n = sizeof(sv) / sizeof(sv[0]);
#pragma unroll
        for (int i = 0; i < n; ++i) {
          const float log_q = (sv[i] - s_max) * inv_t - log_zs;
          const float log_p = (tv[i] - t_max) * inv_t - log_zt;
          const float log_m = log_mixture(log_p, log_q, a.log_beta, a.log_1m_beta);
          const float p = exp2f(log_p * kLog2e);
          const float q = exp2f(log_q * kLog2e);
          kl[0] += p > 0.0f ? p * (log_p - log_m) : 0.0f;
          kl[1] += q > 0.0f ? q * (log_q - log_m) : 0.0f;
        }
      });
      block_allreduce<SumOp>(kl, scratch);
      if (threadIdx.x == 0) {
        a.loss_rows[row] = (a.beta * kl[0] + (1.0f - a.beta) * kl[1]) * a.scale;
      }
      if (grad != nullptr) {
        const float kl_qm = kl[1];
        const float jsd_scale = (1.0f - a.beta) * grad_scale;
        sweep_row<T, true>(s, t, grad, a.vocab, a.vectorized, false, [&](const auto& sv, const auto& tv, auto& out) {
          constexpr int n = sizeof(sv) / sizeof(sv[0]);
#pragma unroll
          for (int i = 0; i < n; ++i) {
            const float log_q = (sv[i] - s_max) * inv_t - log_zs;
            const float log_p = (tv[i] - t_max) * inv_t - log_zt;
            const float q = exp2f(log_q * kLog2e);
            out[i] = q > 0.0f ? q * (log_q - log_mixture(log_p, log_q, a.log_beta, a.log_1m_beta) - kl_qm) * jsd_scale
                              : 0.0f;
          }
        });
      }
    }
  }
}

template <typename T, Divergence kKind>
cudaError_t launch(const Args<T>& args, int threads, cudaStream_t stream) {
  // Rows beyond the grid limit are grid-strided; a block per row otherwise.
  const int64_t max_blocks = 0x7fffffff;
  const auto blocks = static_cast<unsigned>(args.rows < max_blocks ? args.rows : max_blocks);
  kl_div_fwd_kernel<T, kKind><<<blocks, threads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t kl_div_fwd(const T* student, const T* teacher, T* grad, const KLDivProblem& p, cudaStream_t stream) {
  if (p.rows == 0) {
    return cudaSuccess;
  }
  // Enough threads that each makes at least ~4 vector steps per pass: short rows do not
  // leave most of a 512-thread block idle, long rows get the widest block.
  constexpr int kLanes = Pack<T>::kLanes;
  int threads = 128;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kLanes * 4 < p.vocab) {
    threads *= 2;
  }
  // Every row sits at the same byte offset modulo 16 in all three arrays exactly when the
  // base pointers do (rows share one stride), so one head length serves all three.
  const auto address = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  const bool vectorized = (address(student) - address(teacher)) % 16 == 0 &&
                          (grad == nullptr || (address(student) - address(grad)) % 16 == 0);
  const double beta = p.beta;
  const bool jsd = beta > 0.0 && beta < 1.0;
  Args<T> args{student,
               teacher,
               grad,
               p.labels,
               p.ignore_index,
               p.rows,
               p.vocab,
               static_cast<float>(1.0 / p.temperature),
               static_cast<float>(M_LOG2E / p.temperature),
               p.beta,
               jsd ? static_cast<float>(std::log(beta)) : 0.0f,
               jsd ? static_cast<float>(std::log1p(-beta)) : 0.0f,
               p.scale,
               p.loss_rows,
               vectorized};
  if (beta == 0.0) {
    return launch<T, Divergence::kForward>(args, threads, stream);
  }
  if (beta == 1.0) {
    return launch<T, Divergence::kReverse>(args, threads, stream);
  }
  return launch<T, Divergence::kJsd>(args, threads, stream);
}

template cudaError_t kl_div_fwd<float>(const float*, const float*, float*, const KLDivProblem&, cudaStream_t);
template cudaError_t kl_div_fwd<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*,
                                               const KLDivProblem&, cudaStream_t);
template cudaError_t kl_div_fwd<__half>(const __half*, const __half*, __half*, const KLDivProblem&, cudaStream_t);

}  // namespace slimlm::cuda
