// Sparse top-k memory read of l2m-kernels, CPU backend: the plain parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: l2m_kernels/ops/topk_read/reference.py. Every pointer addresses a contiguous
// tensor except q and dout, whose rows are placed by a Rows (rows.h); `acc` below is float64 for
// float64 input, else float32. Every output element is written.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "rows.h"

namespace l2m::cpu {

// Per query (b, h, t): scores s_n = (scale * q) . keys[n] over the existing slots n < valid_len[b]
// (memory head h / (heads / mem_heads)); the k best by descending score (ties: smaller slot; NaN
// ranks like +inf); weights = softmax, lse = logsumexp, out = sum_j weights_j * values[slot_j].
struct TopkReadFwdParams {
  c10::ScalarType dtype;  // of q, keys, values, out
  int64_t batch;          // B
  int64_t heads;          // H
  int64_t seq_len;        // T
  int64_t mem_heads;      // Hm, H % Hm == 0
  int64_t num_slots;      // N
  int64_t dim_k;          // Dk
  int64_t dim_v;          // Dv
  int64_t k;              // 1 <= k <= N
  bool shared_memory;     // keys/values are (Hm, N, D), used by every batch element
  double scale;
  const void* q;             // (B, H, T, Dk) dtype, rows at q_rows
  Rows q_rows;
  const void* keys;          // (B, Hm, N, Dk) or (Hm, N, Dk) dtype
  const void* values;        // (B, Hm, N, Dv) or (Hm, N, Dv) dtype
  const int64_t* valid_len;  // (B,) or nullptr (every slot exists); clamped to [0, N]
  void* out;                 // (B, H, T, Dv) dtype
  int64_t* indices;          // (B, H, T, k); -1 for missing entries
  void* weights;             // (B, H, T, k) acc
  void* lse;                 // (B, H, T) acc
};

// Gradients of the read for the given selection (rows j with index -1 contribute nothing):
//   dw_j = dweights_j + <dout, v_j>;  ds_j = w_j * (dw_j - sum_i w_i dw_i) + w_j * dlse
//   dq = scale * sum_j ds_j key_j;  dkeys[idx_j] += ds_j * (scale * q);  dvalues[idx_j] += w_j dout
// Slot gradients are reduced per slot in a fixed order (bitwise deterministic, independent of the
// thread count); shared memories sum over the batch too.
struct TopkReadBwdParams {
  c10::ScalarType dtype;  // of dout, q, keys, values, dq, dkeys, dvalues
  int64_t batch;
  int64_t heads;
  int64_t seq_len;
  int64_t mem_heads;
  int64_t num_slots;
  int64_t dim_k;
  int64_t dim_v;
  int64_t k;
  bool shared_memory;
  double scale;
  const void* dout;        // (B, H, T, Dv) dtype, rows at dout_rows
  Rows dout_rows;
  const void* dweights;    // (B, H, T, k) acc
  const void* dlse;        // (B, H, T) acc
  const void* q;           // (B, H, T, Dk) dtype, rows at q_rows
  Rows q_rows;
  const void* keys;        // (B, Hm, N, Dk) or (Hm, N, Dk) dtype
  const void* values;      // (B, Hm, N, Dv) or (Hm, N, Dv) dtype
  const int64_t* indices;  // (B, H, T, k), each in [-1, N)
  const void* weights;     // (B, H, T, k) acc
  void* dq;                // (B, H, T, Dk) dtype, contiguous
  void* dkeys;             // like keys
  void* dvalues;           // like values
};

// The launchers, compiled once per instruction-set variant into l2m::cpu::<variant> (isa.h).
// Declared for the kernel sources only: bindings.cpp reaches them through the dispatch table
// of kernels.h, so that no call bypasses the variant chosen at import.
#if defined(L2M_CPU_ISA)
inline namespace L2M_CPU_ISA {
// dtype must be Float, Double, Half or BFloat16 (checked again here: an unknown dtype throws).
void topk_read_fwd(const TopkReadFwdParams& params);
void topk_read_bwd(const TopkReadBwdParams& params);
}  // namespace L2M_CPU_ISA
#endif

}  // namespace l2m::cpu
