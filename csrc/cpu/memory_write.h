// Gated memory writes of l2m-kernels, CPU backend: the plain parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: SPEC section 3 and l2m_kernels/ops/memory_write/reference.py. The leading
// (B, Hm) or (B,) dimensions are numbered as G "memories" (G = B * Hm, or B; g = b * Hm + h).
// Every pointer addresses a contiguous tensor except weights, add and erase: in models they are
// projections viewed as (B, T, Hm, D) and transposed, slices or broadcasts, so their (g, t) rows
// are placed by a Rows (rows.h; rows numbered g * T + t, the (B, T, .) form read as
// (B, 1, T, .)) and read where they lie, so they must not overlap an output (bindings.cpp checks).
// `acc` below is float64 for float64 input, else float32.
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

namespace l2m::cpu {

// Per memory g, for p = t * kw + j in increasing order, with s = indices[g, p] >= 0:
//   out[g, s] = out[g, s] * (1 - weights[g, p] * erase[g, t]) + weights[g, p] * add[g, t]
// computed in acc and rounded once per slot, after its last write. out starts as a copy of memory
// (or is memory itself: in place, where only written slots are stored to).
struct GatedMemoryWriteFwdParams : l2m::GatedMemoryWriteFwdParams {
  Rows weight_rows, add_rows, erase_rows;  // where the (g, t) rows of weights, add, erase start
};

// Gradients of the forward for dnew = dL/dout (all outputs have dtype and are contiguous):
//   dmemory (G, N, D), dweights (G, T, kw), dadd (G, T, D), derase (G, T, erase_dim).
// Each written slot's chain is recomputed forward from memory, then walked in reverse:
//   dw = dm . (add - e * m_prev),  dadd += w * dm,  derase += -w * m_prev * dm (summed over D when
//   erase_dim == 1),  dm <- (1 - w * e) * dm.
// Skipped entries (-1) get zero gradients. The per-step sums over j run in j order: bitwise
// deterministic, independent of the thread count.
struct GatedMemoryWriteBwdParams : l2m::GatedMemoryWriteBwdParams {
  Rows weight_rows, add_rows, erase_rows;
  void* dadd;    // (G, T, D) dtype, contiguous
  void* derase;  // (G, T, erase_dim) dtype, contiguous
};

}  // namespace l2m::cpu
