// Device helpers shared by the merge kernels (merge_attention.cu, gated_merge.cu).
//
// All merge ops are memory-bound row ops: each row of D elements is read once from every input and
// written once to every output, with a few per-row scalars. A row is served by a "group" of
// 1..32 consecutive lanes of one warp (a power of two, chosen at launch from D), so that short rows
// still give coalesced warp-wide accesses and long rows are split along D. Along a row, elements
// are moved in 16-byte vectors where the pointers allow it, with scalar head and tail elements.
//
// No torch headers here (see merge.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "merge.h"

#if defined(__USE_FAST_MATH__)
// --use_fast_math turns expf/log1pf into approximations and flushes denormals; the merge weights
// must match the float64 reference to ~1e-6 and NaN/-inf rows must keep their exact meaning.
#error "l2m merge kernels must not be built with --use_fast_math"
#endif

// The one dtype dispatch of the launchers, as mamba's DISPATCH_ITYPE_*: returns
// launch<T>(args...) for the element type T of `dtype` (float, __half, __nv_bfloat16; float64 is
// not served by these kernels), else cudaErrorInvalidValue.
#define L2M_CUDA_DISPATCH(dtype, launch, ...)                   \
  switch (dtype) {                                              \
    case ::l2m::Dtype::kFloat32:                                \
      return launch<float>(__VA_ARGS__);                        \
    case ::l2m::Dtype::kFloat16:                                \
      return launch<__half>(__VA_ARGS__);                       \
    case ::l2m::Dtype::kBFloat16:                               \
      return launch<__nv_bfloat16>(__VA_ARGS__);                \
    default:                                                    \
      return cudaErrorInvalidValue;                             \
  }

namespace l2m {
namespace cuda {
namespace detail {

constexpr int kThreadsPerBlock = 256;  // a multiple of the warp size: groups never straddle warps
constexpr int kMaxGroupLog2 = 5;       // at most one warp per row
constexpr unsigned kFullWarpMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc.).

// Both conversions of one element type.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float value) { return value; }
  static __device__ __forceinline__ float from_float(float value) { return value; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
  static __device__ __forceinline__ __half from_float(float value) {
    return __float2half_rn(value);
  }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 value) {
    return __bfloat162float(value);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float value) {
    return __float2bfloat16_rn(value);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T value) {
  return Convert<T>::to_float(value);
}

template <typename T>
__device__ __forceinline__ T from_float(float value) {
  return Convert<T>::from_float(value);
}

// ---------------------------------------------------------------------------------------------
// Chunks: N consecutive elements moved with one load/store (N == 1, or N * sizeof(T) == 16),
// converted to / from float32.

template <typename T>
struct VectorWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
};

template <typename T>
__device__ __forceinline__ T from_bits(uint32_t bits);
template <>
__device__ __forceinline__ __half from_bits<__half>(uint32_t bits) {
  return __ushort_as_half(static_cast<unsigned short>(bits));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t bits) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(bits));
}

// One 16-byte load: through the read-only path (__ldg) when kReadOnly, else an ordinary load (for
// data the kernel itself writes).
template <bool kReadOnly, typename Vector>
__device__ __forceinline__ Vector load_16(const Vector* src) {
  if constexpr (kReadOnly) {
    return __ldg(src);
  } else {
    return *src;
  }
}

// The N elements of one 16-byte vector of T at src, as float32.
template <bool kReadOnly, typename T, int N>
__device__ __forceinline__ void load_vector(const T* src, float (&dst)[N]) {
  if constexpr (sizeof(T) == 4) {
    static_assert(N == 4, "a float vector is 4 elements");
    const float4 vector = load_16<kReadOnly>(reinterpret_cast<const float4*>(src));
    dst[0] = vector.x;
    dst[1] = vector.y;
    dst[2] = vector.z;
    dst[3] = vector.w;
  } else {
    static_assert(sizeof(T) == 2 && N == 8, "a 16-bit vector is 8 elements");
    const uint4 vector = load_16<kReadOnly>(reinterpret_cast<const uint4*>(src));
    const uint32_t words[4] = {vector.x, vector.y, vector.z, vector.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: the low half is the lower address
      dst[2 * i] = to_float<T>(from_bits<T>(words[i] & 0xffffu));
      dst[2 * i + 1] = to_float<T>(from_bits<T>(words[i] >> 16));
    }
  }
}

// Inputs are read through the read-only path (__ldg); vectors as one float4 / uint4.
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* __restrict__ src, float (&dst)[N]) {
  if constexpr (N == 1) {
    dst[0] = to_float<T>(__ldg(src));
  } else {
    load_vector<true>(src, dst);
  }
}

__device__ __forceinline__ uint32_t bits_of(__half value) { return __half_as_ushort(value); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 value) {
  return __bfloat16_as_ushort(value);
}

// Vectors are stored with __stwb (an ordinary write-back st.global.v4 in inline PTX): through a
// plain pointer store nvcc 13 split them into 2- or 4-byte stores inside these kernels.
template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* __restrict__ dst, const float (&src)[N]) {
  if constexpr (N == 1) {
    *dst = from_float<T>(src[0]);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(N == 4, "a float vector is 4 elements");
    __stwb(reinterpret_cast<float4*>(dst), make_float4(src[0], src[1], src[2], src[3]));
  } else {
    static_assert(sizeof(T) == 2 && N == 8, "a 16-bit vector is 8 elements");
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      words[i] = bits_of(from_float<T>(src[2 * i])) |
                 (bits_of(from_float<T>(src[2 * i + 1])) << 16);  // little endian: low half first
    }
    __stwb(reinterpret_cast<uint4*>(dst), make_uint4(words[0], words[1], words[2], words[3]));
  }
}

// How one row's elements split: [0, head) scalars up to the first 16-byte boundary,
// `vectors` 16-byte vectors, then scalars [tail_start, D).
struct RowSpan {
  int64_t head;
  int64_t vectors;
  int64_t tail_start;
};

// `row_start` is the row's address in any one of the (R, D) tensors: the launcher only picks the
// vector path when all of them sit at the same offset modulo 16 bytes, so one split fits all.
template <typename T>
__device__ __forceinline__ RowSpan row_span(const T* row_start, int64_t head_dim, bool vectorised) {
  constexpr int kVec = VectorWidth<T>::value;
  if (!vectorised) return RowSpan{head_dim, 0, head_dim};
  const int misalignment =
      static_cast<int>((reinterpret_cast<uintptr_t>(row_start) & 15u) / sizeof(T));
  int64_t head = (kVec - misalignment) & (kVec - 1);
  head = head < head_dim ? head : head_dim;
  const int64_t vectors = (head_dim - head) / kVec;
  return RowSpan{head, vectors, head + vectors * kVec};
}

// Calls fn(std::integral_constant<int, N>{}, offset) for every chunk of the row this lane owns;
// lanes of a group take chunks round-robin, so a warp's accesses are contiguous.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_chunk(const RowSpan& span, int64_t head_dim, int lane,
                                               int group_size, Fn&& fn) {
  constexpr int kVec = VectorWidth<T>::value;
  for (int64_t i = lane; i < span.head; i += group_size) fn(std::integral_constant<int, 1>{}, i);
  for (int64_t v = lane; v < span.vectors; v += group_size)
    fn(std::integral_constant<int, kVec>{}, span.head + v * kVec);
  for (int64_t i = span.tail_start + lane; i < head_dim; i += group_size)
    fn(std::integral_constant<int, 1>{}, i);
}

// Sum over the lanes of one group (a power-of-two block of lanes): xor butterflies stay inside the
// group, give every lane the same bits and a fixed order (deterministic). Every lane of the warp
// must call it (full mask), active row or not.
__device__ __forceinline__ float group_sum(float value, int group_size) {
  for (int offset = group_size >> 1; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

// Where this thread sits: its lane in the row group and the group's index in the block.
struct GroupCoords {
  int group_size;
  int lane;
  int group_in_block;
  int groups_per_block;
};

__device__ __forceinline__ GroupCoords group_coords(int group_log2) {
  GroupCoords c;
  c.group_size = 1 << group_log2;
  c.lane = static_cast<int>(threadIdx.x) & (c.group_size - 1);
  c.group_in_block = static_cast<int>(threadIdx.x) >> group_log2;
  c.groups_per_block = static_cast<int>(blockDim.x) >> group_log2;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Per-row scalar math (float32, IEEE expf/log1pf).

// logaddexp with the interface's guards: both -inf -> -inf; NaN in either propagates (the
// comparison picks the other side as max, and |la - lb| is NaN).
__device__ __forceinline__ float merged_lse(float lse_a, float lse_b) {
  if (lse_a == -INFINITY && lse_b == -INFINITY) return -INFINITY;
  const float lse_max = lse_a > lse_b ? lse_a : lse_b;  // not fmaxf: it would drop a NaN
  // A +inf side (and no NaN) gives +inf: expf(-|inf - inf|) would make it NaN.
  if (lse_max == INFINITY && lse_a == lse_a && lse_b == lse_b) return INFINITY;
  return lse_max + log1pf(expf(-fabsf(lse_a - lse_b)));
}

// Weight of one side in the merged softmax; an empty side (-inf) contributes exactly nothing.
__device__ __forceinline__ float merge_weight(float side_lse, float lse) {
  return side_lse == -INFINITY ? 0.0f : expf(side_lse - lse);
}

// g = sigmoid(x) and 1 - g, each computed without cancellation or overflow (exp of a non-positive
// number only); a NaN logit gives NaN for both.
__device__ __forceinline__ void sigmoid_pair(float logit, float& gate, float& one_minus_gate) {
  if (logit >= 0.0f) {
    const float e = expf(-logit);
    const float inv = 1.0f / (1.0f + e);
    gate = inv;
    one_minus_gate = e * inv;
  } else {
    const float e = expf(logit);  // NaN lands here too
    const float inv = 1.0f / (1.0f + e);
    gate = e * inv;
    one_minus_gate = inv;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: launch planning.

struct LaunchPlan {
  unsigned grid;
  int group_log2;
  bool vectorised;
};

// The vector path is taken only when every (R, D) pointer has the same offset modulo 16 bytes
// (then all rows of all tensors split at the same element) and is naturally aligned.
template <typename T, int kPointers>
inline bool same_16_byte_phase(const void* const (&pointers)[kPointers]) {
  const uintptr_t phase = reinterpret_cast<uintptr_t>(pointers[0]) & 15u;
  for (int i = 0; i < kPointers; ++i) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(pointers[i]);
    if ((address & 15u) != phase || address % sizeof(T) != 0) return false;
  }
  return true;
}

// Resident blocks of `kernel` per SM, computed once per kernel (the occupancy query is not free,
// and the answer depends only on the compiled kernel and the architecture).
// kKernel is a template argument, not a parameter, so that each kernel has its own cache.
template <auto kKernel>
inline cudaError_t resident_blocks_per_sm(int* blocks_per_sm) {
  static std::atomic<int> cached{0};  // 0: not computed yet; racing first calls compute the same
  int value = cached.load(std::memory_order_relaxed);
  if (value == 0) {
    const cudaError_t status =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&value, kKernel, kThreadsPerBlock, 0);
    if (status != cudaSuccess) return status;
    if (value < 1) value = 1;
    cached.store(value, std::memory_order_relaxed);
  }
  *blocks_per_sm = value;
  return cudaSuccess;
}

// rows > 0 is required. Picks the group size from D and caps the grid at one wave of resident
// blocks (the kernels stride over rows), which keeps gridDim.x far below its 2**31 - 1 limit for
// any row count.
template <typename T, auto kKernel, int kPointers>
inline cudaError_t plan_launch(int64_t rows, int64_t head_dim,
                               const void* const (&row_pointers)[kPointers], LaunchPlan* plan) {
  constexpr int kVec = VectorWidth<T>::value;
  plan->vectorised = same_16_byte_phase<T>(row_pointers);
  const int64_t units_per_row = plan->vectorised ? (head_dim + kVec - 1) / kVec : head_dim;
  int group_log2 = 0;
  while (group_log2 < kMaxGroupLog2 && (int64_t{1} << group_log2) < units_per_row) ++group_log2;
  plan->group_log2 = group_log2;

  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  int sm_count = 0;
  status = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  int blocks_per_sm = 0;
  status = resident_blocks_per_sm<kKernel>(&blocks_per_sm);
  if (status != cudaSuccess) return status;

  const int64_t groups_per_block = kThreadsPerBlock >> group_log2;
  const int64_t blocks_needed = (rows + groups_per_block - 1) / groups_per_block;
  int64_t blocks_resident = int64_t{sm_count} * blocks_per_sm;
  if (blocks_resident < 1) blocks_resident = 1;
  plan->grid = static_cast<unsigned>(blocks_needed < blocks_resident ? blocks_needed
                                                                      : blocks_resident);
  return cudaSuccess;
}

inline bool valid_sizes(int64_t rows, int64_t head_dim) { return rows >= 0 && head_dim >= 0; }

// Plans and launches one row kernel, kKernel(params, group_log2, vectorised), on `stream`.
template <typename T, auto kKernel, typename Params, int kPointers>
inline cudaError_t launch_rows(const Params& params, const void* const (&row_pointers)[kPointers],
                               cudaStream_t stream) {
  LaunchPlan plan;
  const cudaError_t status =
      plan_launch<T, kKernel>(params.rows, params.head_dim, row_pointers, &plan);
  if (status != cudaSuccess) return status;
  kKernel<<<plan.grid, kThreadsPerBlock, 0, stream>>>(params, plan.group_log2, plan.vectorised);
  return cudaGetLastError();
}

// The body of every *_launch entry point: checks sizes, launches nothing for R == 0 (an empty
// grid is a launch error), and runs Launch<T>::run(params, stream) for the runtime dtype.
template <template <typename> class Launch, typename Params>
inline cudaError_t dispatch_dtype(const Params& params, cudaStream_t stream) {
  if (!valid_sizes(params.rows, params.head_dim)) return cudaErrorInvalidValue;
  if (params.rows == 0) return cudaSuccess;
  switch (params.dtype) {
    case MergeDtype::kFloat32:
      return Launch<float>::run(params, stream);
    case MergeDtype::kFloat16:
      return Launch<__half>::run(params, stream);
    case MergeDtype::kBFloat16:
      return Launch<__nv_bfloat16>::run(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace cuda
}  // namespace l2m
