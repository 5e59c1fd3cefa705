// Product-key memory read on CUDA (SPEC section 2, issue 4): parameter structs and launchers.
//
// Plain C++ like merge.h / topk_read.h: no torch headers. The bindings (csrc/common/binding.h)
// validate the tensors, the scratch buffers and, for the deterministic backward, the grouping of
// the entries by destination row included (both made by the Python launchers:
// l2m_kernels/ops/product_key/plan.py), fill these structs and turn a non-success return into an
// exception. Launchers never throw; they return cudaSuccess, the error of a CUDA call they made,
// or cudaErrorInvalidValue (bad sizes, null pointers, or a limit below exceeded).
//
// Semantics: exactly l2m_kernels/ops/product_key/reference.py. Per query row (b, h, t):
//   s1 = (q[:Dh] . subkeys[h, 0]) * scale, s2 = (q[Dh:] . subkeys[h, 1]) * scale (Dh = Dk / 2,
//   float32 dot, then the scale); the k_sub best of each half (ties: smaller sub-key index; NaN
//   ranks like +inf); the candidates (i, j) with score s1_i + s2_j at slot i * n_sub + j; the k
//   best candidates (ties: smaller slot); weights = softmax, lse = logsumexp (float32),
//   out = sum_m weights_m * values[indices_m] (float32), summed over heads in head order with
//   sum_heads.
//
// Layout: every pointer addresses a contiguous tensor. q (B, H, T, Dk); subkeys (H, 2, n_sub, Dh);
// values (n_sub ** 2, Dv); out (B, H, T, Dv) or (B, T, Dv) with sum_heads. float64 is not served.
//
// Limits: 1 <= k <= kProductKeyMaxK, 1 <= k_sub <= min(n_sub, kProductKeyMaxKSub),
// k <= k_sub ** 2, Dk even and <= kProductKeyMaxDimK, n_sub ** 2 < 2**31 (the int64 sort key holds
// the slot in its low 31 bits), B * H * T < 2**31 query rows; Dv is unlimited.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "merge.h"  // MergeDtype

namespace l2m {
namespace cuda {

constexpr int64_t kProductKeyMaxK = 256;
constexpr int64_t kProductKeyMaxKSub = 256;
constexpr int64_t kProductKeyMaxDimK = 512;
constexpr int64_t kProductKeyMaxSlots = 2147483647;  // n_sub ** 2 < 2**31

// Forward: writes out, indices, weights, lse (every element). Three kernels:
//   1. half selection: half_scores / half_ids (B*H*T, 2, k_sub) scratch, sorted descending;
//   2. candidate top-k: indices, weights, lse;
//   3. out = the weighted gather-sum of value rows (heads summed in order with sum_heads).
struct ProductKeyFwdParams : l2m::ProductKeyFwdParams {
  float* half_scores;  // scratch (B*H*T, 2, k_sub) float32
  int32_t* half_ids;   // scratch (B*H*T, 2, k_sub) int32
};

// Backward for a given selection. Per query row and entry m with slot idx_m = i_m * n_sub + j_m
// (dout of the row is dout[b, h, t], or dout[b, t] with sum_heads; entries whose index is outside
// [0, n_sub ** 2) contribute nothing — they never come from our forward, and are skipped rather
// than read or written out of bounds):
//   dw_m = dweights_m + <dout, values[idx_m]>;  ds_m = w_m * (dw_m - sum_l w_l dw_l + dlse)
//   dq[:Dh] = scale * sum_m ds_m subkeys[h, 0, i_m];  dq[Dh:] = scale * sum_m ds_m subkeys[h, 1, j_m]
//   dsubkeys[h, 0, i_m] += scale * ds_m * q[:Dh];     dsubkeys[h, 1, j_m] += scale * ds_m * q[Dh:]
//   dvalues[idx_m] += w_m * dout
// dq is always written directly. Modes:
//   sparse_grad: dvalues_rows (B*H*T*k, Dv) dtype gets the row w_m * dout of every entry (all
//     entries, whatever their index), no reduction.
//   atomic (deterministic == false): scale * ds * q_half and (dense) w * dout are scattered with
//     float32 atomicAdd into dsubkeys_acc / dvalues_acc, float32, zeroed by the caller.
//   deterministic: ds (B*H*T*k,) float32 scratch is stored; then product_key_segment_launch sums
//     the entries per destination row in the order the caller sorted them (no float atomics).
struct ProductKeyBwdParams : l2m::ProductKeyBwdParams {
  float* dsubkeys_acc;  // atomic mode: like subkeys, float32, zeroed by the caller
  float* dvalues_acc;   // atomic dense mode: like values, float32, zeroed by the caller
  void* dvalues_rows;   // sparse_grad: (B*H*T*k, Dv) dtype, written
  float* ds;            // deterministic mode: (B*H*T*k,) float32 scratch, written
};

cudaError_t product_key_fwd_launch(const ProductKeyFwdParams& params, cudaStream_t stream);
// The per-row kernel of the backward (dq; dw/ds; atomics or ds; sparse rows).
cudaError_t product_key_bwd_launch(const ProductKeyBwdParams& params, cudaStream_t stream);

// Deterministic segment reduction (no float atomics), one warp per destination row:
//   dst[s, c] = scale * sum_{e in [run_starts[s], run_starts[s+1])} coef[entry_coef[e]] *
//               src[entry_src[e], c]        for s < num_dst, c < dim (dst rows without entries: 0)
// summed in the order e. The caller guarantees 0 <= entry_coef[e] < num_coef and
// 0 <= entry_src[e] < num_src (they are built from arange/sort, not from user data); the kernel
// still skips entries outside those ranges. dst is written in full.
struct ProductKeySegmentParams {
  MergeDtype dtype;  // of src and dst
  int64_t num_dst;
  int64_t num_src;
  int64_t num_coef;
  int64_t dim;
  double scale;
  const void* src;            // (num_src, dim) dtype
  const float* coef;          // (num_coef,)
  const int64_t* entry_coef;  // (E,)
  const int64_t* entry_src;   // (E,)
  const int64_t* run_starts;  // (num_dst + 1,), nondecreasing, run_starts[num_dst] <= E
  void* dst;                  // (num_dst, dim) dtype, written
};

cudaError_t product_key_segment_launch(const ProductKeySegmentParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
