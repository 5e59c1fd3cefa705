// gated_merge on CUDA: blend local attention and a memory read with one gate logit per row.
//
// Forward, per row (float32):  g = sigmoid(gate);  out = g * out_mem + (1 - g) * out_local
// Backward, per row:           d_local = (1 - g) * dout;  d_mem = g * dout
//                              d_gate = g * (1 - g) * <dout, out_mem - out_local>
// g and 1 - g are each computed without cancellation (sigmoid_pair). Both passes read each input
// once and write each output once; see merge_common.cuh for the row/group layout.
#include "merge_common.cuh"

namespace l2m {
namespace cuda {
namespace {

using detail::for_each_chunk;
using detail::group_coords;
using detail::group_sum;
using detail::GroupCoords;
using detail::LaunchPlan;
using detail::load_chunk;
using detail::row_span;
using detail::RowSpan;
using detail::sigmoid_pair;
using detail::store_chunk;
using detail::to_float;

template <typename T>
__global__ void __launch_bounds__(detail::kThreadsPerBlock)
    gated_merge_fwd_kernel(GatedMergeFwdParams params, int group_log2, bool vectorised) {
  const T* __restrict__ out_local = static_cast<const T*>(params.out_local);
  const T* __restrict__ out_mem = static_cast<const T*>(params.out_mem);
  const T* __restrict__ gate = static_cast<const T*>(params.gate);
  T* __restrict__ out = static_cast<T*>(params.out);
  const int64_t rows = params.rows;
  const int64_t head_dim = params.head_dim;
  const GroupCoords g = group_coords(group_log2);

  for (int64_t row = int64_t{blockIdx.x} * g.groups_per_block + g.group_in_block; row < rows;
       row += int64_t{gridDim.x} * g.groups_per_block) {
    float mem_weight, local_weight;
    sigmoid_pair(to_float<T>(__ldg(&gate[row])), mem_weight, local_weight);

    const int64_t row_offset = row * head_dim;
    const RowSpan span = row_span(out_local + row_offset, head_dim, vectorised);
    for_each_chunk<T>(span, head_dim, g.lane, g.group_size, [&](auto width, int64_t col) {
      constexpr int N = decltype(width)::value;
      float local[N], memory[N], blended[N];  // [N]
      load_chunk<T, N>(out_local + row_offset + col, local);
      load_chunk<T, N>(out_mem + row_offset + col, memory);
#pragma unroll
      for (int i = 0; i < N; ++i) blended[i] = mem_weight * memory[i] + local_weight * local[i];
      store_chunk<T, N>(out + row_offset + col, blended);
    });
  }
}

template <typename T>
__global__ void __launch_bounds__(detail::kThreadsPerBlock)
    gated_merge_bwd_kernel(GatedMergeBwdParams params, int group_log2, bool vectorised) {
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const T* __restrict__ out_local = static_cast<const T*>(params.out_local);
  const T* __restrict__ out_mem = static_cast<const T*>(params.out_mem);
  const T* __restrict__ gate = static_cast<const T*>(params.gate);
  T* __restrict__ d_local = static_cast<T*>(params.d_local);
  T* __restrict__ d_mem = static_cast<T*>(params.d_mem);
  float* __restrict__ d_gate = static_cast<float*>(params.d_gate);
  const int64_t rows = params.rows;
  const int64_t head_dim = params.head_dim;
  const GroupCoords g = group_coords(group_log2);

  // Block-uniform loop bound: every lane of a warp must reach the shuffles in group_sum.
  for (int64_t row_base = int64_t{blockIdx.x} * g.groups_per_block; row_base < rows;
       row_base += int64_t{gridDim.x} * g.groups_per_block) {
    const int64_t row = row_base + g.group_in_block;
    const bool active = row < rows;
    float mem_weight = 0.0f, local_weight = 0.0f;
    float dot_diff = 0.0f;  // this lane's share of <dout, out_mem - out_local>
    if (active) {
      sigmoid_pair(to_float<T>(__ldg(&gate[row])), mem_weight, local_weight);
      const int64_t row_offset = row * head_dim;
      const RowSpan span = row_span(dout + row_offset, head_dim, vectorised);
      for_each_chunk<T>(span, head_dim, g.lane, g.group_size, [&](auto width, int64_t col) {
        constexpr int N = decltype(width)::value;
        float grad[N], local[N], memory[N], grad_local[N], grad_mem[N];  // [N]
        load_chunk<T, N>(dout + row_offset + col, grad);
        load_chunk<T, N>(out_local + row_offset + col, local);
        load_chunk<T, N>(out_mem + row_offset + col, memory);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          dot_diff += grad[i] * (memory[i] - local[i]);
          grad_local[i] = local_weight * grad[i];
          grad_mem[i] = mem_weight * grad[i];
        }
        store_chunk<T, N>(d_local + row_offset + col, grad_local);
        store_chunk<T, N>(d_mem + row_offset + col, grad_mem);
      });
    }
    dot_diff = group_sum(dot_diff, g.group_size);
    if (active && g.lane == 0) d_gate[row] = mem_weight * local_weight * dot_diff;
  }
}

template <typename T>
struct LaunchFwd {
  static cudaError_t run(const GatedMergeFwdParams& params, cudaStream_t stream) {
    const void* const row_pointers[] = {params.out_local, params.out_mem, params.out};
    return detail::launch_rows<T, gated_merge_fwd_kernel<T>>(params, row_pointers, stream);
  }
};

template <typename T>
struct LaunchBwd {
  static cudaError_t run(const GatedMergeBwdParams& params, cudaStream_t stream) {
    const void* const row_pointers[] = {params.dout, params.out_local, params.out_mem, params.d_local,
                                        params.d_mem};
    return detail::launch_rows<T, gated_merge_bwd_kernel<T>>(params, row_pointers, stream);
  }
};

}  // namespace

cudaError_t gated_merge_fwd_launch(const GatedMergeFwdParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype<LaunchFwd>(params, stream);
}

cudaError_t gated_merge_bwd_launch(const GatedMergeBwdParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype<LaunchBwd>(params, stream);
}

}  // namespace cuda
}  // namespace l2m
