// Torch-free launchers of the masked reduction kernels (masked_seq_stats.cu,
// masked_row_cosine.cu); definitions of the ops in src/slimlm/kernels/reference.py.
// Pointers are device pointers to contiguous data; kernels run on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace slimlm::cuda {

// T is float, __nv_bfloat16 or __half (explicitly instantiated in the .cu files), as for
// every slimlm CUDA launcher.

// x (batch, seq, channels), mask (batch, seq) or null, out fp32 (3, batch, channels / group).
template <typename T>
cudaError_t masked_seq_stats(const T* x, const bool* mask, float* out, int64_t batch, int64_t seq, int64_t channels,
                             int64_t group, cudaStream_t stream);

// a, b (rows, channels), mask (rows,) or null, out fp32 (rows,).
template <typename T>
cudaError_t masked_row_cosine(const T* a, const T* b, const bool* mask, float* out, int64_t rows, int64_t channels,
                              float eps, cudaStream_t stream);

}  // namespace slimlm::cuda
