// Product-key memory read of l2m-kernels, CPU backend: the plain parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: l2m_kernels/ops/product_key/reference.py. Every pointer addresses a
// contiguous tensor except q and dout, whose rows are placed by a Rows (rows.h); `acc` below is float64 for float64 input, else float32; Dh is
// Dk / 2. Every output element is written.
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

namespace l2m::cpu {

// Per query (b, h, t): half scores s1_i = (q[:Dh] . subkeys[h, 0, i]) * scale and
// s2_j = (q[Dh:] . subkeys[h, 1, j]) * scale (dot first, then the scale, as the reference); the
// k_sub best of each half (ties: smaller sub-key; NaN ranks above everything, as torch.sort);
// candidates (i, j) with score s1_i + s2_j and slot i * n_sub + j; the k best (ties: smaller
// slot); weights = softmax, lse = logsumexp, out = sum_m weights_m * values[slot_m], summed over
// heads (in acc, rounded once) when sum_heads.
struct ProductKeyFwdParams : l2m::ProductKeyFwdParams {
  Rows q_rows;  // where q's rows start
};

// Gradients of the read for the given selection:
//   dw_m = dweights_m + <dout, v_m>;  ds_m = w_m * (dw_m - sum_n w_n dw_n) + w_m * dlse
//   g1_i = scale * sum_{m: i_m = i} ds_m (likewise g2_j); dq[:Dh] = sum_i g1_i subkeys[h, 0, i],
//   dq[Dh:] = sum_j g2_j subkeys[h, 1, j]; dsubkeys[h, 0, i] = sum over queries of g1_i q[:Dh]
//   (likewise half 1); dvalues[slot_m] += w_m * dout (dout of (b, t) when sum_heads).
// dvalues is dense (n_sub ** 2, Dv), every row written, or with sparse_grad coalesced: one row per
// distinct slot read, (U, Dv), where entry m adds to row value_rows[m] (the caller maps each slot
// to its rank among the distinct slots), so the gradient's memory grows with the rows touched, not
// with n_sub ** 2. Reductions run in a fixed order (per sub-key and per slot or row, over the
// queries in order): bitwise deterministic whatever the thread count.
struct ProductKeyBwdParams : l2m::ProductKeyBwdParams {
  Rows dout_rows;  // over (B, H, T); head stride 0 with sum_heads
  Rows q_rows;
  void* dsubkeys;  // like subkeys
  void* dvalues;   // like values, or (num_value_rows, Dv) with sparse_grad
  // sparse_grad: entry m adds w_m * dout to dvalues row value_rows[m] ((B, H, T, k), each in
  // [0, num_value_rows)): one row per distinct slot.
  const int64_t* value_rows;
  int64_t num_value_rows;
  // (B * H * T * k,): the entries m sorted by their dvalues row (indices[m], or value_rows[m] with
  // sparse_grad), those of one row in increasing m: the order in which each row is summed.
  const int64_t* entry_order;
};

}  // namespace l2m::cpu
