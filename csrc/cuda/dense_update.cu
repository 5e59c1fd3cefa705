// LM2-style gated dense memory update on CUDA (interface: dense_update.h; semantics:
// gated_dense_update_ref in l2m_kernels/ops/memory_write/reference.py).
//
//   out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update)
//
// Elementwise and bound by memory bandwidth: a grid-stride loop over the flat index of the 4-D
// broadcast shape. Each input is read through its own strides, so broadcast gates ((B, Hm, N, 1),
// (Hm, 1, 1), ...) are never materialised; out, dout and the float32 gradients are contiguous and
// indexed by the flat index itself. Two index paths, chosen at launch:
//   - contiguous: every input's strides are those of a contiguous tensor of the shape (size-1
//     dimensions excepted), so all offsets are the flat index;
//   - strided: the flat index is split into four coordinates by three divisions by launch-time
//     divisors (IntDivider: a multiply-high instead of the int64 division subroutine).
// Every element is computed by the same code whatever the launch: bitwise deterministic.
//
// Numerics: float32; sigmoid and 1 - sigmoid each from exp of a non-positive number (no overflow,
// exactly 0 / 1 at huge |x|, no cancellation in 1 - sigmoid; a NaN logit gives NaN), IEEE tanhf
// (+-1 at huge |x|; merge_common.cuh refuses --use_fast_math).
#include <cstdint>
#include <type_traits>

#include "dense_update.h"
#include "int_divide.cuh"
#include "merge_common.cuh"  // to_float / from_float, sigmoid_pair, MergeDtype

namespace l2m {
namespace cuda {
namespace {

using detail::from_float;
using detail::sigmoid_pair;
using detail::to_float;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // the loops stride beyond

// How the flat index maps to each input's element offset.
struct DenseIndexing {
  IntDivider size3, size2, size1;  // divisors: the sizes of dimensions 3, 2, 1
};

__device__ __forceinline__ int64_t strided_offset(const StridedOperand& operand,
                                                  const uint64_t (&coords)[4]) {
  return static_cast<int64_t>(coords[0]) * operand.strides[0] +
         static_cast<int64_t>(coords[1]) * operand.strides[1] +
         static_cast<int64_t>(coords[2]) * operand.strides[2] +
         static_cast<int64_t>(coords[3]) * operand.strides[3];
}

__device__ __forceinline__ void split_index(int64_t index, const DenseIndexing& indexing,
                                            uint64_t (&coords)[4]) {
  uint64_t rest = indexing.size3.divmod(static_cast<uint64_t>(index), coords[3]);
  rest = indexing.size2.divmod(rest, coords[2]);
  coords[0] = indexing.size1.divmod(rest, coords[1]);
}

// Element offsets of the four inputs for flat index `index`.
template <bool kContiguous, typename Params>
__device__ __forceinline__ void input_offsets(const Params& params, const DenseIndexing& indexing,
                                              int64_t index, int64_t (&offsets)[4]) {
  if constexpr (kContiguous) {
#pragma unroll
    for (int i = 0; i < 4; ++i) offsets[i] = index;
  } else {
    uint64_t coords[4];
    split_index(index, indexing, coords);
    offsets[0] = strided_offset(params.memory, coords);
    offsets[1] = strided_offset(params.update, coords);
    offsets[2] = strided_offset(params.input_gate, coords);
    offsets[3] = strided_offset(params.forget_gate, coords);
  }
}

template <typename T>
__device__ __forceinline__ float load_input(const StridedOperand& operand, int64_t offset) {
  return to_float<T>(__ldg(static_cast<const T*>(operand.data) + offset));
}

template <typename T, bool kContiguous>
__global__ void __launch_bounds__(kThreads)
    gated_dense_update_fwd_kernel(const GatedDenseUpdateFwdParams params,
                                  const DenseIndexing indexing, int64_t numel) {
  T* __restrict__ out = static_cast<T*>(params.out);
  for (int64_t index = int64_t{blockIdx.x} * kThreads + threadIdx.x; index < numel;
       index += int64_t{gridDim.x} * kThreads) {
    int64_t offsets[4];
    input_offsets<kContiguous>(params, indexing, index, offsets);
    const float memory = load_input<T>(params.memory, offsets[0]);
    const float update = load_input<T>(params.update, offsets[1]);
    float input_gate, input_gate_complement, forget_gate, forget_gate_complement;
    sigmoid_pair(load_input<T>(params.input_gate, offsets[2]), input_gate, input_gate_complement);
    sigmoid_pair(load_input<T>(params.forget_gate, offsets[3]), forget_gate,
                 forget_gate_complement);
    out[index] = from_float<T>(forget_gate * memory + input_gate * tanhf(update));
  }
}

template <typename T, bool kContiguous>
__global__ void __launch_bounds__(kThreads)
    gated_dense_update_bwd_kernel(const GatedDenseUpdateBwdParams params,
                                  const DenseIndexing indexing, int64_t numel) {
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  float* __restrict__ dmemory = params.dmemory;
  float* __restrict__ dupdate = params.dupdate;
  float* __restrict__ dinput_gate = params.dinput_gate;
  float* __restrict__ dforget_gate = params.dforget_gate;
  for (int64_t index = int64_t{blockIdx.x} * kThreads + threadIdx.x; index < numel;
       index += int64_t{gridDim.x} * kThreads) {
    int64_t offsets[4];
    input_offsets<kContiguous>(params, indexing, index, offsets);
    const float grad = to_float<T>(__ldg(dout + index));
    const float memory = load_input<T>(params.memory, offsets[0]);
    const float tanh_update = tanhf(load_input<T>(params.update, offsets[1]));
    float input_gate, input_gate_complement, forget_gate, forget_gate_complement;
    sigmoid_pair(load_input<T>(params.input_gate, offsets[2]), input_gate, input_gate_complement);
    sigmoid_pair(load_input<T>(params.forget_gate, offsets[3]), forget_gate,
                 forget_gate_complement);
    dmemory[index] = grad * forget_gate;
    dupdate[index] = grad * input_gate * (1.0f - tanh_update * tanh_update);
    dinput_gate[index] = grad * tanh_update * input_gate * input_gate_complement;
    dforget_gate[index] = grad * memory * forget_gate * forget_gate_complement;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The strides of a contiguous tensor of `sizes`, ignoring dimensions of size 1 (any stride there
// addresses the same elements).
inline bool has_contiguous_strides(const StridedOperand& operand, const int64_t (&sizes)[4]) {
  int64_t expected = 1;
  for (int d = 3; d >= 0; --d) {
    if (sizes[d] != 1 && operand.strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

template <typename Params>
inline bool all_contiguous(const Params& params) {
  return has_contiguous_strides(params.memory, params.sizes) &&
         has_contiguous_strides(params.update, params.sizes) &&
         has_contiguous_strides(params.input_gate, params.sizes) &&
         has_contiguous_strides(params.forget_gate, params.sizes);
}

template <typename Params>
inline bool valid_operands(const Params& params) {
  return params.memory.data != nullptr && params.update.data != nullptr &&
         params.input_gate.data != nullptr && params.forget_gate.data != nullptr;
}

// numel of `sizes`, or -1 for a negative size.
inline int64_t element_count(const int64_t (&sizes)[4]) {
  int64_t count = 1;
  for (int d = 0; d < 4; ++d) {
    if (sizes[d] < 0) return -1;
    count *= sizes[d];
  }
  return count;
}

inline unsigned element_grid(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

inline DenseIndexing make_indexing(const int64_t (&sizes)[4]) {
  return DenseIndexing{IntDivider::make(sizes[3]), IntDivider::make(sizes[2]),
                       IntDivider::make(sizes[1])};
}

// Launches, over numel elements, the kernel kernel_of(contiguous) returns for the operands'
// layout (passed as std::bool_constant, so that it can name its template argument).
template <typename Params, typename KernelOf>
cudaError_t launch_elements(const Params& params, int64_t numel, cudaStream_t stream,
                            KernelOf&& kernel_of) {
  const DenseIndexing indexing = make_indexing(params.sizes);
  const auto kernel =
      all_contiguous(params) ? kernel_of(std::true_type{}) : kernel_of(std::false_type{});
  kernel<<<element_grid(numel), kThreads, 0, stream>>>(params, indexing, numel);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const GatedDenseUpdateFwdParams& params, int64_t numel,
                       cudaStream_t stream) {
  return launch_elements(params, numel, stream, [](auto contiguous) {
    return gated_dense_update_fwd_kernel<T, contiguous.value>;
  });
}

template <typename T>
cudaError_t launch_bwd(const GatedDenseUpdateBwdParams& params, int64_t numel,
                       cudaStream_t stream) {
  return launch_elements(params, numel, stream, [](auto contiguous) {
    return gated_dense_update_bwd_kernel<T, contiguous.value>;
  });
}

}  // namespace

cudaError_t gated_dense_update_fwd_launch(const GatedDenseUpdateFwdParams& params,
                                          cudaStream_t stream) {
  const int64_t numel = element_count(params.sizes);
  if (numel < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;  // no launch with an empty grid
  if (!valid_operands(params) || params.out == nullptr) return cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_fwd, params, numel, stream);
}

cudaError_t gated_dense_update_bwd_launch(const GatedDenseUpdateBwdParams& params,
                                          cudaStream_t stream) {
  const int64_t numel = element_count(params.sizes);
  if (numel < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  if (!valid_operands(params) || params.dout == nullptr || params.dmemory == nullptr ||
      params.dupdate == nullptr || params.dinput_gate == nullptr || params.dforget_gate == nullptr)
    return cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_bwd, params, numel, stream);
}

}  // namespace cuda
}  // namespace l2m
