// Helper of the cpu memory_attention backward (l2m_kernels/ops/memory_attention/cpu.py): the
// softmax weights of a top-k memory read recomputed at a given selection, plus what the merge's
// backward needs from the read, without recomputing the read itself (whose scoring of all N slots
// dominates the forward).
//
// The launcher knows nothing about at::Tensor: bindings.cpp validates tensors and fills the struct.
// Every pointer addresses a contiguous tensor except q and dout, whose rows are placed by a Rows;
// `acc` is float64 for float64 input, else float32.
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

namespace l2m::cpu {

// Per query row (b, h, t), memory head h / (heads / mem_heads), entries j with slot n_j >= 0:
//   w_j = exp(<scale * q, keys[n_j]> - lse)      (0 for entries with slot -1)
//   dots = sum_j w_j <dout, values[n_j]>         (when dout and dots are given)
//   out  = sum_j w_j values[n_j]                 (when out is given)
// Rows are independent (deterministic); entries with slot -1 are never read.
struct MemoryReadWeightsParams : l2m::MemoryReadWeightsParams {
  Rows q_rows;     // where q's rows start
  Rows dout_rows;  // where dout's rows start (with dout)
};

}  // namespace l2m::cpu
