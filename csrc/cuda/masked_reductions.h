// Torch-free launchers of the masked reduction kernels (masked_seq_stats.cu,
// masked_row_cosine.cu); definitions of the ops in src/slimlm/kernels/reference.py.
// Pointers are device pointers to contiguous data; kernels run on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace slimlm::cuda {

enum class ElementType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// x (batch, seq, channels) of `type`, mask (batch, seq) or null, out fp32 (3, batch, channels / group).
cudaError_t masked_seq_stats(const void* x, ElementType type, const bool* mask, float* out, int64_t batch,
                             int64_t seq, int64_t channels, int64_t group, cudaStream_t stream);

// a, b (rows, channels) of `type`, mask (rows,) or null, out fp32 (rows,).
cudaError_t masked_row_cosine(const void* a, const void* b, ElementType type, const bool* mask, float* out,
                              int64_t rows, int64_t channels, float eps, cudaStream_t stream);

}  // namespace slimlm::cuda
