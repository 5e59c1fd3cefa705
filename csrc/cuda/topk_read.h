// Sparse top-k memory read on CUDA (SPEC section 1): parameter structs and launchers.
//
// Plain C++ like merge.h: no torch headers, so the kernels build with nvcc alone. The bindings
// (csrc/common/binding.h) validate the tensors, the plan and scratch tensors that the Python
// launchers make (l2m_kernels/ops/topk_read/plan.py) included, fill these structs and turn a
// non-success return into an exception.
//
// Semantics: exactly l2m_kernels/ops/topk_read/reference.py (see also the module docstring of
// l2m_kernels/ops/topk_read/triton.py): per query the k best existing slots by descending score
// (ties: smaller slot; NaN ranks like +inf; an existing slot scoring -inf keeps its index with
// weight 0), missing entries index -1 / weight 0, no existing slot: out = 0, lse = -inf.
// Scores: float32 inputs (scale * q) . key on CUDA cores (full float32, no TF32); float16/bfloat16
// scale * (q . key) on tensor cores with float32 accumulation.
//
// Layout: every pointer addresses a contiguous tensor. q (B, H, T, Dk); keys (B, Hm, N, Dk) or
// shared (Hm, N, Dk); values the same leading shape with last size Dv; H % Hm == 0 and query head
// h reads memory head h / (H / Hm). float64 is not served on CUDA.
//
// Limits (the launchers return cudaErrorInvalidValue beyond them): 1 <= k <= min(N, 256),
// 0 <= Dk, Dv <= 256 (kTopkReadMaxDim), N <= 2**31 (the sort key holds the slot in 31 bits),
// B * H * T < 2**31 query rows (the forward's grid and the backward's 32-bit row divisions),
// Hm >= 1 and H % Hm == 0. Launchers never throw; they return cudaSuccess, the
// error of a CUDA call they made, or cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "merge.h"  // MergeDtype

namespace l2m {
namespace cuda {

constexpr int64_t kTopkReadMaxK = 256;
constexpr int64_t kTopkReadMaxDim = 256;           // largest Dk and Dv
constexpr int64_t kTopkReadMaxSlots = 2147483648;  // 2**31

// Forward: writes out, indices, weights, lse (every element).
struct TopkReadFwdParams : l2m::TopkReadFwdParams {
  // Optional (nullptr: none): per query row (B*H*T,) a lower bound tau on its k-th best sort
  // key (INT64_MIN: no bound); candidates below it are skipped without a merge. Correct for any
  // tau <= the row's true k-th best key; the k-th largest of the pre-pass's chunk maxima is one.
  const int64_t* tau = nullptr;
};

// Backward of the read for a given selection. Per query row (entries whose index is outside
// [0, N), e.g. -1, contribute nothing):
//   dw_j = dweights_j + <dout, v_j>;  ds_j = w_j * (dw_j - sum_i w_i dw_i + dlse)
//   dq = scale * sum_j ds_j key_j;  dkeys[idx_j] += scale * ds_j * q;  dvalues[idx_j] += w_j * dout
// (shared memories sum the slot gradients over the batch too). dq is always written directly.
//
// deterministic == false: the slot gradients are scattered with float32 atomicAdd into
// dkeys_acc / dvalues_acc, float32 buffers shaped like keys / values that the caller zeroed (for
// float32 inputs they may be dkeys / dvalues themselves; else the caller casts them afterwards).
// ds, entry_order, entry_rows, run_starts, dkeys, dvalues are not used.
//
// deterministic == true: no floating-point atomics, bitwise reproducible. The first kernel stores
// ds (B*H*T*k float32 scratch, 0 for entries that contribute nothing); then one warp per slot of
// the M * N slots (M = Hm for shared memories, else B * Hm) sums the entries of its run in the
// order given, and writes every row of dkeys / dvalues (zeros for untouched slots). The caller
// provides the grouping:
//   entry_order (E = B*H*T*k,): flat entry ids (row * k + j) sorted stably by memory * N + slot,
//       entries that contribute nothing last;
//   entry_rows (E,): entry_order / k;
//   run_starts (M * N + 1,): entry_order[run_starts[s] : run_starts[s + 1]] are the entries of
//       slot s = memory * N + slot.
// dkeys_acc, dvalues_acc are not used.
struct TopkReadBwdParams : l2m::TopkReadBwdParams {};

cudaError_t topk_read_fwd_launch(const TopkReadFwdParams& params, cudaStream_t stream);

// Threshold pre-pass of the forward. Sort key of (query, slot): the order-preserving int32 image
// of the float32 score (NaN as +inf, -0.0 as +0.0) in the high word, 2**31 - 1 - slot in the low
// word; keys of one row are distinct and "larger" is "better". Writes chunk_max (B*H*T,
// topk_read_num_chunks(N)) int64: the largest key of the row over the slots
// [c * kTopkReadChunkSlots, (c + 1) * kTopkReadChunkSlots), INT64_MIN where no slot exists
// (valid_len). The scores are computed by the same code as topk_read_fwd_launch's (for the same
// params, dtype and k), so the keys are bit-identical; with n_chunks >= k, the k-th largest
// chunk maximum of a row is a valid tau (exactly k chunks reach it, each with a distinct key).
// params.tau, out, indices, weights, lse and values are not used.
constexpr int64_t kTopkReadChunkSlots = 128;
int64_t topk_read_num_chunks(int64_t num_slots);
cudaError_t topk_read_chunk_max_launch(const TopkReadFwdParams& params, int64_t* chunk_max,
                                       cudaStream_t stream);
// Runs both kernels of the deterministic mode, or the single kernel of the atomic mode.
cudaError_t topk_read_bwd_launch(const TopkReadBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
