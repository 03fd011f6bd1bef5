// CPU masked_seq_stats (definition: kernels/reference.py): per sample b and channel
// (or group of channels) j, over the unmasked tokens s: Σ v, Σ |v|, Σ v², where v is the
// channel value or the L2 norm of a group. One task per (sample, channel tile); a tile's
// fp32 partial sums stay in L1 and are flushed into double totals every kFlush tokens,
// so long sequences keep fp32-reference accuracy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/fp32_rows.h"
#include "cpu/isa.h"

namespace slimlm::cpu {
namespace {

constexpr int64_t kTileValues = 512;  // channel values per tile: 3 fp32 partials of 2 KB each
constexpr int kFlush = 64;
// Below this many elements (16 MB of fp32) per thread, run serially: these kernels are
// memory-bound and cheap, and a parallel region's barrier costs more than it saves
// (measured on 2 shared cores: 8 ms of CPU spinning for 0.3 ms of work at 8x256x576).
constexpr int64_t kElementsPerThread = int64_t{1} << 22;

struct Problem {
  int64_t batch, seq, channels, group, groups;
  const bool* mask;  // (batch, seq) or null
  float* out;        // (3, batch, groups)
};

template <typename IsaTag, typename T>
SLIMLM_INLINE void stats_tile(IsaTag tag, const T* x, const Problem& p, int64_t b, int64_t first_value,
                              int64_t num_values) {
  const int64_t g = p.group;
  const int64_t width = num_values * g;
  float scratch[rows::kChunk];
  float part_sum[kTileValues], part_abs[kTileValues], part_sq[kTileValues];
  double total_sum[kTileValues] = {}, total_abs[kTileValues] = {}, total_sq[kTileValues] = {};
  auto flush = [&]() {
    for (int64_t j = 0; j < num_values; ++j) {
      total_sum[j] += part_sum[j];
      total_abs[j] += part_abs[j];
      total_sq[j] += part_sq[j];
      part_sum[j] = part_abs[j] = part_sq[j] = 0.0f;
    }
  };
  for (int64_t j = 0; j < num_values; ++j) {
    part_sum[j] = part_abs[j] = part_sq[j] = 0.0f;
  }
  int pending = 0;
  for (int64_t s = 0; s < p.seq; ++s) {
    if (p.mask != nullptr && !p.mask[b * p.seq + s]) {
      continue;  // padding is never read: NaN or garbage there cannot leak into the sums
    }
    // A tile is at most rows::kChunk elements (see per_tile below): one conversion per row.
    const float* v = rows::load(tag, x + (b * p.seq + s) * p.channels + first_value * g, scratch, width);
    if (g == 1) {
      for (int64_t j = 0; j < num_values; ++j) {
        part_sum[j] += v[j];
        part_abs[j] += std::fabs(v[j]);
        part_sq[j] += v[j] * v[j];
      }
    } else {
      for (int64_t j = 0; j < num_values; ++j) {
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < g; ++d) {
          squares += v[j * g + d] * v[j * g + d];
        }
        const float norm = std::sqrt(squares);
        part_sum[j] += norm;
        part_abs[j] += norm;
        part_sq[j] += squares;
      }
    }
    if (++pending == kFlush) {
      flush();
      pending = 0;
    }
  }
  flush();
  const int64_t plane = p.batch * p.groups;
  float* out = p.out + b * p.groups + first_value;
  for (int64_t j = 0; j < num_values; ++j) {
    out[j] = static_cast<float>(total_sum[j]);
    out[plane + j] = static_cast<float>(total_abs[j]);
    out[2 * plane + j] = static_cast<float>(total_sq[j]);
  }
}

template <typename IsaTag, typename T>
SLIMLM_INLINE void stats_all(IsaTag tag, const T* x, const Problem& p, int64_t values_per_tile) {
  const int64_t tiles = (p.groups + values_per_tile - 1) / values_per_tile;
  const int64_t elements_per_task = std::max<int64_t>(1, p.seq * values_per_tile * p.group);
  const int64_t grain = std::max<int64_t>(1, kElementsPerThread / elements_per_task);
  at::parallel_for(0, p.batch * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles;
      const int64_t first = (task % tiles) * values_per_tile;
      stats_tile(tag, x, p, b, first, std::min(values_per_tile, p.groups - first));
    }
  });
}

template <typename T>
void stats_scalar(const T* x, const Problem& p, int64_t per_tile) { stats_all(rows::Scalar{}, x, p, per_tile); }

#if SLIMLM_X86
template <typename T>
SLIMLM_TARGET_AVX2 void stats_avx2(const T* x, const Problem& p, int64_t per_tile) {
  stats_all(rows::Avx2{}, x, p, per_tile);
}

template <typename T>
SLIMLM_TARGET_AVX512 void stats_avx512(const T* x, const Problem& p, int64_t per_tile) {
  stats_all(rows::Avx512{}, x, p, per_tile);
}
#endif

template <typename T>
void stats_dispatch(const T* x, const Problem& p, int64_t per_tile) {
#if SLIMLM_X86
  switch (active_isa()) {
    case Isa::Avx512:
      return stats_avx512(x, p, per_tile);
    case Isa::Avx2:
      return stats_avx2(x, p, per_tile);
    default:
      break;
  }
#endif
  stats_scalar(x, p, per_tile);
}

at::Tensor masked_seq_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t group_size) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "masked_seq_stats: x must be a contiguous (B, S, C) tensor");
  TORCH_CHECK(group_size >= 1 && x.size(2) % group_size == 0, "masked_seq_stats: group_size must divide C");
  // A group's channels are reduced inside one scratch chunk, so a group may not exceed it.
  TORCH_CHECK(group_size <= rows::kChunk, "masked_seq_stats: group_size above ", rows::kChunk);
  const int64_t groups = x.size(2) / group_size;
  auto out = at::empty({3, x.size(0), groups}, x.options().dtype(at::kFloat));
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == x.size(0) * x.size(1),
                "masked_seq_stats: mask must be a contiguous bool (B, S) tensor");
    mask_ptr = mask->data_ptr<bool>();
  }
  if (out.numel() == 0) {
    return out;
  }
  Problem p{x.size(0), x.size(1), x.size(2), group_size, groups, mask_ptr, out.data_ptr<float>()};
  // A tile's elements fit one scratch chunk: kTileValues channels, or as many whole groups as fit.
  const int64_t per_tile = group_size == 1 ? kTileValues : rows::kChunk / group_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_seq_stats", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "masked_seq_stats: float64 runs on the reference");
    } else {
      stats_dispatch(x.data_ptr<scalar_t>(), p, per_tile);
    }
  });
  return out;
}

}  // namespace
}  // namespace slimlm::cpu

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("masked_seq_stats", &slimlm::cpu::masked_seq_stats_cpu); }
