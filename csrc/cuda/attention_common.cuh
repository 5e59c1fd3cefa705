// Device helpers shared by the local attention (local_attention.cu) and the memory-read weights
// (memory_attention.cu) of the CUDA memory_attention backend: the accumulation type of each input
// dtype (float32; float64 for float64), conversions, and warp reductions in that type.
//
// No torch headers here (see merge.h).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "local_attention.h"  // AttentionDtype
#include "merge_common.cuh"   // detail::to_float / from_float (explicit 16-bit intrinsics)

namespace l2m {
namespace cuda {
namespace attention {

constexpr unsigned kFullWarpMask = 0xffffffffu;

// Accumulation type: float64 for float64 inputs, float32 otherwise.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

template <typename T>
__device__ __forceinline__ acc_type<T> to_acc(T value) {
  return detail::to_float<T>(value);
}
template <>
__device__ __forceinline__ double to_acc<double>(double value) {
  return value;
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> value) {
  return detail::from_float<T>(value);
}
template <>
__device__ __forceinline__ double from_acc<double>(double value) {
  return value;
}

// IEEE exp / log in the accumulation type (no --use_fast_math: merge_common.cuh refuses it).
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return static_cast<acc_t>(-INFINITY);
}

// xor butterfly: every lane ends with the same bits (a + b == b + a), in a fixed order.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

// fmax ignores a NaN operand; callers let a NaN score reach exp instead (see the kernels).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value = max_acc(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  return value;
}

// Calls launch(T{}) with the element type T of `dtype` (float, __half, __nv_bfloat16, double) and
// returns its result; cudaErrorInvalidValue for an unknown dtype. Host side, for the launchers.
template <typename Launch>
cudaError_t dispatch_dtype(AttentionDtype dtype, Launch&& launch) {
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return launch(float{});
    case AttentionDtype::kFloat16:
      return launch(__half{});
    case AttentionDtype::kBFloat16:
      return launch(__nv_bfloat16{});
    case AttentionDtype::kFloat64:
      return launch(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace attention
}  // namespace cuda
}  // namespace l2m
