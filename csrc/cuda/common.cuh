// What the CUDA kernels share (device code, torch-free): fp32 <-> storage conversions and
// 16-byte packs of logits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace slimlm::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// fp32 to a storage type, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}

// 16 bytes of logits as fp32 lanes, and single elements for the unaligned ends of a row.
template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kLanes = 4;
  static __device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kLanes]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&in)[kLanes]) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  }
};

// The 16-bit formats: two values per 32-bit word, the lower address in the low half.
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kLanes = 8;
  static __device__ __forceinline__ void unpack_word(uint32_t word, float& lo, float& hi) {
    lo = __uint_as_float(word << 16);
    hi = __uint_as_float(word & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack_word(float lo, float hi) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return static_cast<uint32_t>(__bfloat16_as_ushort(pair.x)) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(pair.y)) << 16);
  }
};

template <>
struct Pack<__half> {
  static constexpr int kLanes = 8;
  static __device__ __forceinline__ void unpack_word(uint32_t word, float& lo, float& hi) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack_word(float lo, float hi) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    return static_cast<uint32_t>(__half_as_ushort(pair.x)) | (static_cast<uint32_t>(__half_as_ushort(pair.y)) << 16);
  }
};

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[Pack<T>::kLanes]) {
  if constexpr (Pack<T>::kLanes == 4) {
    Pack<T>::unpack(raw, out);
  } else {
    Pack<T>::unpack_word(raw.x, out[0], out[1]);
    Pack<T>::unpack_word(raw.y, out[2], out[3]);
    Pack<T>::unpack_word(raw.z, out[4], out[5]);
    Pack<T>::unpack_word(raw.w, out[6], out[7]);
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&in)[Pack<T>::kLanes]) {
  if constexpr (Pack<T>::kLanes == 4) {
    return Pack<T>::pack(in);
  } else {
    return make_uint4(Pack<T>::pack_word(in[0], in[1]), Pack<T>::pack_word(in[2], in[3]),
                      Pack<T>::pack_word(in[4], in[5]), Pack<T>::pack_word(in[6], in[7]));
  }
}

}  // namespace slimlm::cuda
