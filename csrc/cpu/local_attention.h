// Local (causal, optionally sliding-window) attention of l2m-kernels, CPU backend: the plain
// parameter structs and launchers, the local half of memory_attention.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: l2m_kernels/ops/memory_attention/reference.py::local_attention_ref. Every
// pointer addresses a contiguous tensor except q, k, v and dout, whose rows are placed by a Rows
// (rows.h); `acc` below is float64 for float64 input, else float32. Every output element is
// written.
//
// Geometry: query t (of T) sits at position p = S - T + t of the context of S >= T keys and sees
// the keys j with p - window < j <= p (window <= 0 here: no key at all; callers pass
// window = S, or any larger value, for "no window").
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

namespace l2m::cpu {

// Per query row (b, h, t), with kv head h / (heads / kv_heads) and s_j = (scale * q) . k_j:
//   lse = logsumexp_j s_j,  out = sum_j exp(s_j - lse) v_j   over the visible keys j;
// a row with no visible key (or only -inf scores) gets out = 0 and lse = -inf. A non-finite k or v
// at a position the query cannot see never reaches its output.
struct LocalAttentionFwdParams : l2m::LocalAttentionFwdParams {
  Rows q_rows, k_rows, v_rows;  // where the rows of q, k, v start
};

// Gradients, FlashAttention-2 style: with P_ij = exp(s_ij - lse_i) and
// delta_i = <dout_i, out_i> - dlse_i,
//   dS_ij = P_ij * (<dout_i, v_j> - delta_i);  dq_i = scale * sum_j dS_ij k_j;
//   dk_j = sum_i dS_ij (scale * q_i);  dv_j = sum_i P_ij dout_i.
// Only delta_i depends on `out`: any (dout, out) pair with the same <dout_i, out_i> gives the same
// gradients (memory_attention passes the merged output with the merge-weighted dout).
// dq is computed per query block, dk and dv per key block (a second pass): no atomics, no
// per-thread partial sums, so every gradient is bitwise independent of the thread count.
struct LocalAttentionBwdParams : l2m::LocalAttentionBwdParams {
  Rows dout_rows, q_rows, k_rows, v_rows;
};

}  // namespace l2m::cpu
