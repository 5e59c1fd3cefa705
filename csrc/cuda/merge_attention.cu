// merge_attention on CUDA: combine two partial attention results over disjoint key sets.
//
// Forward, per row (float32):
//   lse = logaddexp(lse_a, lse_b)  (both -inf -> -inf)
//   wa = exp(lse_a - lse), wb = exp(lse_b - lse)  (a side with lse = -inf has weight exactly 0)
//   out = wa * out_a + wb * out_b
// Backward, per row:
//   pa = <dout, out_a>, pb = <dout, out_b>, mixed = wa * pa + wb * pb
//   d_out_a = wa * dout, d_out_b = wb * dout
//   d_lse_a = wa * (dlse + pa - mixed), d_lse_b = wb * (dlse + pb - mixed)
//           (computed as wa * (dlse + wb * (pa - pb)) and wb * (dlse - wa * (pa - pb)))
// Both passes read each input once and write each output once; see merge_common.cuh for the
// row/group layout.
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
using detail::merge_weight;
using detail::merged_lse;
using detail::row_span;
using detail::RowSpan;
using detail::store_chunk;

template <typename T>
__global__ void __launch_bounds__(detail::kThreadsPerBlock)
    merge_attention_fwd_kernel(MergeAttentionFwdParams params, int group_log2, bool vectorised) {
  const T* __restrict__ out_a = static_cast<const T*>(params.out_a);
  const T* __restrict__ out_b = static_cast<const T*>(params.out_b);
  const float* __restrict__ lse_a = static_cast<const float*>(params.lse_a);
  const float* __restrict__ lse_b = static_cast<const float*>(params.lse_b);
  T* __restrict__ out = static_cast<T*>(params.out);
  float* __restrict__ lse = static_cast<float*>(params.lse);
  const int64_t rows = params.rows;
  const int64_t head_dim = params.head_dim;
  const GroupCoords g = group_coords(group_log2);

  for (int64_t row = int64_t{blockIdx.x} * g.groups_per_block + g.group_in_block; row < rows;
       row += int64_t{gridDim.x} * g.groups_per_block) {
    const float row_lse_a = __ldg(&lse_a[row]);
    const float row_lse_b = __ldg(&lse_b[row]);
    const float row_lse = merged_lse(row_lse_a, row_lse_b);
    const float weight_a = merge_weight(row_lse_a, row_lse);
    const float weight_b = merge_weight(row_lse_b, row_lse);
    if (g.lane == 0) lse[row] = row_lse;

    const int64_t row_offset = row * head_dim;
    const RowSpan span = row_span(out_a + row_offset, head_dim, vectorised);
    for_each_chunk<T>(span, head_dim, g.lane, g.group_size, [&](auto width, int64_t col) {
      constexpr int N = decltype(width)::value;
      float values_a[N], values_b[N], merged[N];  // [N]
      load_chunk<T, N>(out_a + row_offset + col, values_a);
      load_chunk<T, N>(out_b + row_offset + col, values_b);
#pragma unroll
      for (int i = 0; i < N; ++i) merged[i] = weight_a * values_a[i] + weight_b * values_b[i];
      store_chunk<T, N>(out + row_offset + col, merged);
    });
  }
}

template <typename T>
__global__ void __launch_bounds__(detail::kThreadsPerBlock)
    merge_attention_bwd_kernel(MergeAttentionBwdParams params, int group_log2, bool vectorised) {
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const T* __restrict__ out_a = static_cast<const T*>(params.out_a);
  const T* __restrict__ out_b = static_cast<const T*>(params.out_b);
  const float* __restrict__ dlse = static_cast<const float*>(params.dlse);
  const float* __restrict__ lse_a = static_cast<const float*>(params.lse_a);
  const float* __restrict__ lse_b = static_cast<const float*>(params.lse_b);
  const float* __restrict__ lse = static_cast<const float*>(params.lse);
  T* __restrict__ d_out_a = static_cast<T*>(params.d_out_a);
  T* __restrict__ d_out_b = static_cast<T*>(params.d_out_b);
  float* __restrict__ d_lse_a = static_cast<float*>(params.d_lse_a);
  float* __restrict__ d_lse_b = static_cast<float*>(params.d_lse_b);
  const int64_t rows = params.rows;
  const int64_t head_dim = params.head_dim;
  const GroupCoords g = group_coords(group_log2);

  // The loop bound is uniform over the block (row_base), not per group, so that every lane of a
  // warp reaches the shuffles in group_sum even when its own row is past the end.
  for (int64_t row_base = int64_t{blockIdx.x} * g.groups_per_block; row_base < rows;
       row_base += int64_t{gridDim.x} * g.groups_per_block) {
    const int64_t row = row_base + g.group_in_block;
    const bool active = row < rows;
    float weight_a = 0.0f, weight_b = 0.0f;
    float dot_a = 0.0f, dot_b = 0.0f;  // this lane's share of <dout, out_a>, <dout, out_b>
    if (active) {
      const float row_lse = __ldg(&lse[row]);
      weight_a = merge_weight(__ldg(&lse_a[row]), row_lse);
      weight_b = merge_weight(__ldg(&lse_b[row]), row_lse);
      const int64_t row_offset = row * head_dim;
      const RowSpan span = row_span(dout + row_offset, head_dim, vectorised);
      for_each_chunk<T>(span, head_dim, g.lane, g.group_size, [&](auto width, int64_t col) {
        constexpr int N = decltype(width)::value;
        float grad[N], values_a[N], values_b[N], grad_a[N], grad_b[N];  // [N]
        load_chunk<T, N>(dout + row_offset + col, grad);
        load_chunk<T, N>(out_a + row_offset + col, values_a);
        load_chunk<T, N>(out_b + row_offset + col, values_b);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          dot_a += grad[i] * values_a[i];
          dot_b += grad[i] * values_b[i];
          grad_a[i] = weight_a * grad[i];
          grad_b[i] = weight_b * grad[i];
        }
        store_chunk<T, N>(d_out_a + row_offset + col, grad_a);
        store_chunk<T, N>(d_out_b + row_offset + col, grad_b);
      });
    }
    dot_a = group_sum(dot_a, g.group_size);
    dot_b = group_sum(dot_b, g.group_size);
    if (active && g.lane == 0) {
      // dot_a - mixed == weight_b * (dot_a - dot_b) since weight_a + weight_b == 1 (also when a
      // side is empty; both empty gives 0 through the outer weight either way). This form skips
      // the rounding of `mixed` at the scale of |dot_a|, which dominated when the result is small.
      const float row_dlse = __ldg(&dlse[row]);
      const float dot_diff = dot_a - dot_b;
      d_lse_a[row] = weight_a * (row_dlse + weight_b * dot_diff);
      d_lse_b[row] = weight_b * (row_dlse - weight_a * dot_diff);
    }
  }
}

template <typename T>
struct LaunchFwd {
  static cudaError_t run(const MergeAttentionFwdParams& params, cudaStream_t stream) {
    const void* const row_pointers[] = {params.out_a, params.out_b, params.out};
    return detail::launch_rows<T, merge_attention_fwd_kernel<T>>(params, row_pointers, stream);
  }
};

template <typename T>
struct LaunchBwd {
  static cudaError_t run(const MergeAttentionBwdParams& params, cudaStream_t stream) {
    const void* const row_pointers[] = {params.dout, params.out_a, params.out_b, params.d_out_a,
                                        params.d_out_b};
    return detail::launch_rows<T, merge_attention_bwd_kernel<T>>(params, row_pointers, stream);
  }
};

}  // namespace

cudaError_t merge_attention_fwd_launch(const MergeAttentionFwdParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype<LaunchFwd>(params, stream);
}

cudaError_t merge_attention_bwd_launch(const MergeAttentionBwdParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype<LaunchBwd>(params, stream);
}

}  // namespace cuda
}  // namespace l2m
