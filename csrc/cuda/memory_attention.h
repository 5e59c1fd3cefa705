// Helper of the CUDA memory_attention backward (l2m_kernels/ops/memory_attention/cuda.py): the
// softmax weights of a top-k memory read recomputed at a given selection, plus what the merge's
// backward needs from the read, without recomputing the read itself (whose scoring of all N slots
// dominates the forward). Same contract as the cpu one (csrc/cpu/memory_attention.h).
//
// Plain C++ like merge.h: no torch headers. bindings.cpp validates the tensors and fills the
// struct. Every pointer addresses a contiguous tensor; `acc` is float64 for float64 input, else
// float32. Limits (the launcher returns cudaErrorInvalidValue beyond them): Dk, Dv <= 256 (as the
// CUDA top-k read), B * H * T < 2**31 query rows, Hm >= 1 and H % Hm == 0. The launcher never
// throws; it returns cudaSuccess, the error of the launch, or cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "local_attention.h"  // AttentionDtype

namespace l2m {
namespace cuda {

constexpr int64_t kMemoryReadWeightsMaxDim = 256;  // largest Dk and Dv

// Per query row (b, h, t), memory head h / (heads / mem_heads), entries j with slot n_j:
//   w_j = exp(<scale * q, keys[n_j]> - lse)      (0 for entries whose slot is outside [0, N),
//                                                  e.g. -1; such slots are never read)
//   dots = sum_j w_j <dout, values[n_j]>         (when dout and dots are given)
//   out  = sum_j w_j values[n_j]                 (when out is given)
// One warp per row, rows independent, sums in a fixed order: deterministic.
struct MemoryReadWeightsParams : l2m::MemoryReadWeightsParams {};

cudaError_t memory_read_weights_launch(const MemoryReadWeightsParams& params,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
