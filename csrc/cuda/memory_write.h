// Gated memory writes on CUDA (SPEC section 3): parameter structs and launchers.
//
// Plain C++ like merge.h: no torch headers. bindings.cpp validates the tensors, fills these
// structs (the plan arrays come from l2m_kernels/ops/memory_write/plan.py), and turns a
// non-success return into an exception. Launchers never throw; they return cudaSuccess, the error
// of the launch (cudaGetLastError()), or cudaErrorInvalidValue (bad sizes, a null pointer or an
// unknown dtype).
//
// Semantics: exactly l2m_kernels/ops/memory_write/reference.py. The leading (B, Hm) or (B,)
// dimensions are flattened into G memories; P = T * kw writes per memory, E = G * P entries, the
// entry of write (g, t, j) is e = g * P + t * kw + j. Per memory g, for p = t * kw + j in
// increasing order, with s = indices[g, p] >= 0:
//   M[g, s] <- M[g, s] * (1 - weights[e] * erase[g, t]) + weights[e] * add[g, t]
// computed in float32 with the reference's operation order and roundings (each product, the
// difference and the sum rounded to float32: no fused multiply-add), rounded once per slot to
// `dtype` after its last write.
//
// The plan (write_plan): `order` (E,) int64 holds the entry ids sorted by (g, slot), stably,
// skipped entries (-1) last; `run_length` (E,) int32 holds, at the first sorted position of each
// touched slot, that slot's number of writes, 0 elsewhere. One warp owns one run (one slot): no
// races, no atomics, the results are a pure function of the inputs (bitwise deterministic).
//
// Robustness against a wrong plan or wrong indices (the Python layer checks the indices; checking
// them here would need a device synchronisation): a run whose first entry names a slot outside
// [0, N), entry ids outside [0, E) and runs reaching past E are skipped or cut. Nothing is read or
// written out of bounds; the results of such a call are unspecified.
//
// Layout: every pointer addresses a contiguous tensor. float64 is not served (the Python layer
// refuses it). Sizes are int64 throughout (G * N * D may pass 2**31).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "merge.h"  // MergeDtype

namespace l2m {
namespace cuda {

// Forward: stores the written slots of `out` only. `out` holds a copy of `memory` (out of place)
// or is `memory` itself (in place: each slot is read before it is written, by the same warp).
struct GatedMemoryWriteFwdParams : l2m::GatedMemoryWriteFwdParams {};

// Backward for dnew = dL/dout. Each run recomputes its chain forward from `memory`, keeping the
// state before each write (m_prev) in the entry's add_parts row, then walks it in reverse:
//   dweights[e] = sum_d dm * (add - e * m_prev)       (stored in dtype, one writer per entry)
//   add_parts[e] = w * dm                              (float32, per entry; the caller sums the kw
//                                                       entries of a step)
//   erase_parts[e] = -w * m_prev * dm, or its sum over D when erase_dim == 1
//   dm <- (1 - w * e) * dm;  dmemory[slot] = the final dm (dtype)
// The caller passes dmemory as a copy of dnew (only written slots are stored), dweights,
// add_parts and erase_parts zeroed (skipped entries are not written). dweight_partial is float32
// scratch of E elements (no initial value needed) holding the running sum over D of an entry's
// dweight when D spans several column chunks of a warp.
struct GatedMemoryWriteBwdParams : l2m::GatedMemoryWriteBwdParams {
  float* add_parts;        // (E, D) float32
  float* erase_parts;      // (E, erase_dim) float32
  float* dweight_partial;  // (E,) float32 scratch
};

cudaError_t gated_memory_write_fwd_launch(const GatedMemoryWriteFwdParams& params,
                                          cudaStream_t stream);
cudaError_t gated_memory_write_bwd_launch(const GatedMemoryWriteBwdParams& params,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
