// Sparse top-k memory read of l2m-kernels, CPU backend: the plain parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: l2m_kernels/ops/topk_read/reference.py. Every pointer addresses a contiguous
// tensor except q and dout, whose rows are placed by a Rows (rows.h); `acc` below is float64 for
// float64 input, else float32. Every output element is written.
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

namespace l2m::cpu {

// Per query (b, h, t): scores s_n = (scale * q) . keys[n] over the existing slots n < valid_len[b]
// (memory head h / (heads / mem_heads)); the k best by descending score (ties: smaller slot; NaN
// ranks like +inf); weights = softmax, lse = logsumexp, out = sum_j weights_j * values[slot_j].
struct TopkReadFwdParams : l2m::TopkReadFwdParams {
  Rows q_rows;  // where q's rows start
};

// Gradients of the read for the given selection (rows j with index -1 contribute nothing):
//   dw_j = dweights_j + <dout, v_j>;  ds_j = w_j * (dw_j - sum_i w_i dw_i) + w_j * dlse
//   dq = scale * sum_j ds_j key_j;  dkeys[idx_j] += ds_j * (scale * q);  dvalues[idx_j] += w_j dout
// Slot gradients are reduced per slot in a fixed order (bitwise deterministic, independent of the
// thread count); shared memories sum over the batch too.
struct TopkReadBwdParams : l2m::TopkReadBwdParams {
  Rows dout_rows;  // where dout's rows start
  Rows q_rows;
};

}  // namespace l2m::cpu
