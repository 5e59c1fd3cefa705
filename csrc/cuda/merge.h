// Merge ops on CUDA: parameter structs and launchers.
//
// Plain C++ on purpose: no torch headers, so the kernels build with nvcc alone (and can be checked
// on machines whose torch has no CUDA). The torch-facing code lives in bindings.cpp, which fills
// these structs from tensors, passes the current stream and turns a non-success return into an
// exception.
//
// Every launcher follows the low-level interface of notes/merge_kernels.md:
//   - rows R = B * H * T (rows >= 0; rows == 0 launches nothing), head_dim D >= 0;
//   - (R, D) tensors are contiguous in `dtype`; per-row lse / d_lse tensors are contiguous float32;
//     the gate of gated_merge is (R,) in `dtype`;
//   - all arithmetic is float32; half types are converted on load and rounded once on store;
//   - every element of every output is written; rows are independent (no atomics).
// Launchers return cudaSuccess, cudaErrorInvalidValue for bad sizes or an unsupported dtype, or
// the error of the launch itself (cudaGetLastError()). They never throw.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/params.h"

namespace l2m {
namespace cuda {

// Element type of the (R, D) tensors (and of the gate): l2m::Dtype (csrc/common/params.h) but
// float64, which is not served on CUDA: the Python layer refuses it before calling here.
using MergeDtype = l2m::Dtype;

// out = wa * out_a + wb * out_b with lse = logaddexp(lse_a, lse_b); see merge_attention_fwd.
struct MergeAttentionFwdParams : l2m::MergeAttentionFwdParams {};

struct MergeAttentionBwdParams : l2m::MergeAttentionBwdParams {};

// out = g * out_mem + (1 - g) * out_local with g = sigmoid(gate[row]).
struct GatedMergeFwdParams : l2m::GatedMergeFwdParams {};

struct GatedMergeBwdParams : l2m::GatedMergeBwdParams {};

cudaError_t merge_attention_fwd_launch(const MergeAttentionFwdParams& params, cudaStream_t stream);
cudaError_t merge_attention_bwd_launch(const MergeAttentionBwdParams& params, cudaStream_t stream);
cudaError_t gated_merge_fwd_launch(const GatedMergeFwdParams& params, cudaStream_t stream);
cudaError_t gated_merge_bwd_launch(const GatedMergeBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
