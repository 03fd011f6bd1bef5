// CPU masked_seq_stats (definition: kernels/reference.py): per sample b and channel
// (or group of channels) j, over the unmasked tokens s: Σ v, Σ |v|, Σ v², where v is the
// channel value or the L2 norm of a group. One task per (sample, channel tile); a tile's
// fp32 partial sums stay in L1 and are flushed into double totals every kFlush tokens,
// so long sequences keep fp32-reference accuracy.
// GCC 12 reports its own AVX-512 intrinsics as maybe-uninitialized once inlined (kl_div.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/common/variants.h"
#include "cpu/common/vec_math.h"

namespace slimlm::cpu {
namespace {

constexpr int64_t kTileValues = 512;  // channel values per tile: 3 fp32 partials of 2 KB each
constexpr int64_t kChunk = 1024;      // elements of a tile's row converted to fp32 at a time (L1)
constexpr int kFlush = 64;
// Below this many elements (16 MB of fp32) per thread, run serially: these kernels are
// memory-bound and cheap, and a parallel region's barrier costs more than it saves
// (measured on 2 shared cores: 8 ms of CPU spinning for 0.3 ms of work at 8x256x576).
constexpr int64_t kElementsPerThread = int64_t{1} << 22;

struct Problem {
  const void* x;
  int64_t batch, seq, channels, group, groups, values_per_tile, tiles;
  const bool* mask;  // (batch, seq) or null
  float* out;        // (3, batch, groups)
};

template <class V, class T>
inline void stats_tile(const T* x, const Problem& p, int64_t b, int64_t first_value, int64_t num_values) {
  const int64_t g = p.group;
  const int64_t width = num_values * g;
  float scratch[kChunk];
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
    // A tile is at most kChunk elements (see per_tile below): one conversion per row.
    const float* v = vec::as_float<V>(x + (b * p.seq + s) * p.channels + first_value * g, scratch, width);
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

// Tasks [begin, end) of (sample, channel tile); the fp32 loops are plain C++, vectorised by
// the compiler for the instruction set of the entry they are inlined into (variants.h).
template <class T>
struct StatsTiles {
  template <class V>
  static void run(const Problem& p, int64_t begin, int64_t end) {
    const T* x = static_cast<const T*>(p.x);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.tiles;
      const int64_t first = (task % p.tiles) * p.values_per_tile;
      stats_tile<V>(x, p, b, first, std::min(p.values_per_tile, p.groups - first));
    }
  }
};

at::Tensor masked_seq_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t group_size) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "masked_seq_stats: x must be a contiguous (B, S, C) tensor");
  TORCH_CHECK(group_size >= 1 && x.size(2) % group_size == 0, "masked_seq_stats: group_size must divide C");
  // A group's channels are reduced inside one scratch chunk, so a group may not exceed it.
  TORCH_CHECK(group_size <= kChunk, "masked_seq_stats: group_size above ", kChunk);
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
  // A tile's elements fit one scratch chunk: kTileValues channels, or as many whole groups as fit.
  const int64_t per_tile = group_size == 1 ? kTileValues : kChunk / group_size;
  const int64_t tiles = (groups + per_tile - 1) / per_tile;
  Problem p{x.data_ptr(), x.size(0), x.size(1), x.size(2), group_size, groups, per_tile, tiles, mask_ptr,
            out.data_ptr<float>()};
  const int64_t elements_per_task = std::max<int64_t>(1, p.seq * per_tile * group_size);
  const int64_t grain = std::max<int64_t>(1, kElementsPerThread / elements_per_task);
  const Isa isa = active_isa();
  visit_storage(x.scalar_type(), "masked_seq_stats", [&](auto storage) {
    const auto tasks = variant<StatsTiles<decltype(storage)>, const Problem&, int64_t, int64_t>(isa);
    at::parallel_for(0, p.batch * tiles, grain, [&](int64_t begin, int64_t end) { tasks(p, begin, end); });
  });
  return out;
}

}  // namespace
}  // namespace slimlm::cpu

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("masked_seq_stats", &slimlm::cpu::masked_seq_stats_cpu); }
