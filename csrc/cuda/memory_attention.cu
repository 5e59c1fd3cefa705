// CUDA helper of the memory_attention backward (interface and limits: memory_attention.h).
//
// One warp per query row (grid-stride): the row's scaled query (and dout) sit in registers, lane l
// holding features l + 32 c; for each of the row's k entries the warp reads one key row (score by
// a warp butterfly sum, weight) and one value row (dot with dout, and/or the weighted sum).
// B·H·T·k·(Dk + Dv) work, against the B·H·T·N·Dk of the read's scoring.
//
// Numerics: inputs converted to the accumulation type (float32; float64 for float64) on load, the
// query scaled once as the read scores (scale * q) . key, IEEE exp, outputs rounded once.
#include <cstdint>

#include "attention_common.cuh"
#include "memory_attention.h"

namespace l2m {
namespace cuda {
namespace {

using attention::acc_type;
using attention::exp_acc;
using attention::from_acc;
using attention::to_acc;
using attention::warp_sum;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxDimPerLane = static_cast<int>(kMemoryReadWeightsMaxDim / 32);

template <typename T>
__global__ void __launch_bounds__(kThreads)
    memory_read_weights_kernel(const MemoryReadWeightsParams params) {
  using acc_t = acc_type<T>;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t N = params.num_slots;
  const int64_t dim_k = params.dim_k, dim_v = params.dim_v;
  const int64_t k = params.k;
  const unsigned seq_len = static_cast<unsigned>(params.seq_len);
  const unsigned heads = static_cast<unsigned>(params.heads);
  const unsigned group = static_cast<unsigned>(params.heads / params.mem_heads);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const T* __restrict__ q = static_cast<const T*>(params.q);
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const acc_t* __restrict__ lse = static_cast<const acc_t*>(params.lse);
  acc_t* __restrict__ weights = static_cast<acc_t*>(params.weights);
  acc_t* __restrict__ dots = static_cast<acc_t*>(params.dots);
  T* __restrict__ out = static_cast<T*>(params.out);
  const bool with_dout = dout != nullptr;  // uniform
  const bool with_out = out != nullptr;

  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    // 32-bit divisions (rows < 2**31, checked by the launcher).
    const unsigned bh = static_cast<unsigned>(row) / seq_len;
    const unsigned b = bh / heads;
    const unsigned memory_head = (bh - b * heads) / group;
    const int64_t memory =
        params.shared_memory ? int64_t{memory_head} : int64_t{b} * params.mem_heads + memory_head;
    const T* __restrict__ keys = static_cast<const T*>(params.keys) + memory * N * dim_k;
    const T* __restrict__ values = static_cast<const T*>(params.values) + memory * N * dim_v;

    acc_t q_row[kMaxDimPerLane], dout_row[kMaxDimPerLane], out_acc[kMaxDimPerLane];
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) {
      const int col = lane + 32 * c;
      q_row[c] = col < dim_k ? to_acc<T>(q[row * dim_k + col]) * scale : acc_t(0);
      dout_row[c] = (with_dout && col < dim_v) ? to_acc<T>(dout[row * dim_v + col]) : acc_t(0);
      out_acc[c] = acc_t(0);
    }
    const acc_t row_lse = lse[row];
    acc_t dot_sum = acc_t(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t slot = params.indices[row * k + j];
      acc_t weight = acc_t(0);
      if (slot >= 0 && slot < N) {  // warp-uniform
        const T* key_row = keys + slot * dim_k;
        acc_t score = acc_t(0);
#pragma unroll
        for (int c = 0; c < kMaxDimPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < dim_k) score = fma(q_row[c], to_acc<T>(key_row[col]), score);
        }
        weight = exp_acc(warp_sum(score) - row_lse);
        const T* value_row = values + slot * dim_v;
        acc_t value_dot = acc_t(0);
#pragma unroll
        for (int c = 0; c < kMaxDimPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < dim_v) {
            const acc_t value = to_acc<T>(value_row[col]);
            value_dot = fma(dout_row[c], value, value_dot);
            out_acc[c] = fma(weight, value, out_acc[c]);
          }
        }
        if (with_dout) dot_sum = fma(weight, warp_sum(value_dot), dot_sum);
      }
      if (lane == 0) weights[row * k + j] = weight;
    }
    if (with_dout && lane == 0) dots[row] = dot_sum;
    if (with_out) {
#pragma unroll
      for (int c = 0; c < kMaxDimPerLane; ++c) {
        const int col = lane + 32 * c;
        if (col < dim_v) out[row * dim_v + col] = from_acc<T>(out_acc[c]);
      }
    }
  }
}

template <typename T>
cudaError_t launch(const MemoryReadWeightsParams& params, cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  memory_read_weights_kernel<T>
      <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(
          params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t memory_read_weights_launch(const MemoryReadWeightsParams& params,
                                       cudaStream_t stream) {
  if (params.batch < 0 || params.heads < 0 || params.seq_len < 0 || params.mem_heads < 1 ||
      params.heads % params.mem_heads != 0 || params.num_slots < 0 || params.dim_k < 0 ||
      params.dim_v < 0 || params.k < 0 || params.dim_k > kMemoryReadWeightsMaxDim ||
      params.dim_v > kMemoryReadWeightsMaxDim)
    return cudaErrorInvalidValue;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (params.dout != nullptr && params.dots == nullptr) return cudaErrorInvalidValue;
  if (params.lse == nullptr || (params.k > 0 && (params.indices == nullptr ||
                                                 params.weights == nullptr)) ||
      (params.q == nullptr && params.dim_k > 0))
    return cudaErrorInvalidValue;
  return attention::dispatch_dtype(params.dtype, [&](auto tag) {
    return launch<decltype(tag)>(params, stream);
  });
}

}  // namespace cuda
}  // namespace l2m
