// Local (causal, optionally sliding-window) attention on CUDA, the local half of memory_attention
// (SPEC section 5): parameter structs and launchers.
//
// Plain C++ like merge.h: no torch headers, so the kernels build with nvcc alone. The bindings
// (csrc/common/binding.h) validate the tensors, the backward's scratch (delta) included, which the
// Python launcher allocates, fill these structs and turn a non-success return into an exception. Semantics: the cpu header csrc/cpu/local_attention.h and
// l2m_kernels/ops/memory_attention/reference.py::local_attention_ref. Every pointer addresses a
// contiguous tensor; `acc` below is float64 for float64 input, else float32. Every output element
// is written.
//
// Geometry: query t (of T) sits at position p = S - T + t of the context of S >= T keys and sees
// the keys j with p - window < j <= p (window <= 0: no key at all; callers pass window = S, or any
// larger value, for "no window"). Query head h uses kv head h / (H / Hkv).
//
// Limits (the launchers return cudaErrorInvalidValue beyond them): sizes >= 0, Hkv >= 1,
// H % Hkv == 0, S >= T; H, S, D, Dv <= 2**30 (kLocalAttentionMaxExtent: positions and feature
// indices are ints, element offsets int64); fewer than 2**31 thread blocks per kernel (about
// B * H * T / 32 * ceil(max(D, Dv) / 128)). Feature columns are processed in slices of at most
// 128 (64 for float64), so any D and Dv within those limits is served. Launchers never throw;
// they return cudaSuccess, the error of a CUDA call they made, or cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/params.h"

namespace l2m {
namespace cuda {

constexpr int64_t kLocalAttentionMaxExtent = int64_t{1} << 30;  // largest H, S, D, Dv

// Element type of the attention tensors: l2m::Dtype (csrc/common/params.h). Unlike the merge and
// read kernels, the local attention and the read-weight helper also serve float64 (accumulated in
// float64).
using AttentionDtype = l2m::Dtype;

// Per query row (b, h, t), with s_j = (scale * q) . k_j over the visible keys j:
//   lse = logsumexp_j s_j,  out = sum_j exp(s_j - lse) v_j;
// a row with no visible key (or only -inf scores) gets out = 0 and lse = -inf. A non-finite k or v
// at a position the query cannot see never reaches its output.
struct LocalAttentionFwdParams : l2m::LocalAttentionFwdParams {};

// Gradients, FlashAttention-2 style: with P_ij = exp(s_ij - lse_i) and
// delta_i = <dout_i, out_i> - dlse_i,
//   dS_ij = P_ij * (<dout_i, v_j> - delta_i);  dq_i = scale * sum_j dS_ij k_j;
//   dk_j = sum_i dS_ij (scale * q_i);  dv_j = sum_i P_ij dout_i.
// Only delta_i depends on `out`: any (dout, out) pair with the same <dout_i, out_i> gives the same
// gradients (memory_attention passes the merged output with the merge-weighted dout).
// Three kernels: delta per row; dq per query tile (over the key tiles it sees); dk and dv per key
// tile (over every query, of every grouped head, that sees it). No atomics: each output element
// is reduced by one thread in a fixed order, so the gradients are bitwise reproducible.
struct LocalAttentionBwdParams : l2m::LocalAttentionBwdParams {};

cudaError_t local_attention_fwd_launch(const LocalAttentionFwdParams& params, cudaStream_t stream);
cudaError_t local_attention_bwd_launch(const LocalAttentionBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
