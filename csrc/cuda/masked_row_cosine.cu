// CUDA masked_row_cosine: one warp per row of two (rows, channels) tensors; lanes stride
// the channels (coalesced) keeping fp32 sums of a·b, a², b², reduced with shuffles.
// Masked rows write 0 without loading.
#include "cuda/common.cuh"
#include "cuda/masked_reductions.h"

namespace slimlm::cuda {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    row_cosine_kernel(const T* __restrict__ a, const T* __restrict__ b, const bool* __restrict__ mask,
                      float* __restrict__ out, int64_t rows, int64_t channels, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) {
    return;
  }
  if (mask != nullptr && !mask[row]) {
    if (lane == 0) {
      out[row] = 0.0f;
    }
    return;
  }
  const T* row_a = a + row * channels;
  const T* row_b = b + row * channels;
  float dot = 0.0f, sum_a = 0.0f, sum_b = 0.0f;
  for (int64_t c = lane; c < channels; c += 32) {
    const float va = to_float(row_a[c]);
    const float vb = to_float(row_b[c]);
    dot += va * vb;
    sum_a += va * va;
    sum_b += vb * vb;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    sum_a += __shfl_xor_sync(0xffffffffu, sum_a, offset);
    sum_b += __shfl_xor_sync(0xffffffffu, sum_b, offset);
  }
  if (lane == 0) {
    out[row] = dot / fmaxf(sqrtf(sum_a) * sqrtf(sum_b), eps);
  }
}

template <typename T>
cudaError_t launch(const T* a, const T* b, const bool* mask, float* out, int64_t rows, int64_t channels, float eps,
                   cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  row_cosine_kernel<T><<<blocks, kRowsPerBlock * 32, 0, stream>>>(a, b, mask, out, rows, channels, eps);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t masked_row_cosine(const T* a, const T* b, const bool* mask, float* out, int64_t rows, int64_t channels,
                              float eps, cudaStream_t stream) {
  if (rows == 0) {
    return cudaSuccess;
  }
  return launch(a, b, mask, out, rows, channels, eps, stream);
}

#define SLIMLM_INSTANTIATE(T)                                                                                       \
  template cudaError_t masked_row_cosine<T>(const T*, const T*, const bool*, float*, int64_t, int64_t, float, \
                                            cudaStream_t);
SLIMLM_INSTANTIATE(float)
SLIMLM_INSTANTIATE(__nv_bfloat16)
SLIMLM_INSTANTIATE(__half)
#undef SLIMLM_INSTANTIATE

}  // namespace slimlm::cuda
