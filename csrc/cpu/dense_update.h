// LM2-style gated dense memory update of l2m-kernels, CPU backend: parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: SPEC section 3 and l2m_kernels/ops/memory_write/reference.py. The kernels
// are purely elementwise over `numel` elements of same-shape contiguous tensors; broadcasting (and
// reducing gradients back to broadcast inputs) is the Python launcher's job. `acc` below is
// float64 for float64 input, else float32.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace l2m::cpu {

// out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update), computed in acc and
// rounded once to dtype.
struct GatedDenseUpdateFwdParams {
  c10::ScalarType dtype;    // of every tensor
  int64_t numel;
  const void* memory;       // (numel,) dtype
  const void* update;       // (numel,) dtype
  const void* input_gate;   // (numel,) dtype, logits
  const void* forget_gate;  // (numel,) dtype, logits
  void* out;                // (numel,) dtype
};

// Elementwise gradients for dout = dL/dout, with sf = sigmoid(forget_gate),
// si = sigmoid(input_gate), th = tanh(update):
//   dmemory = dout * sf               dupdate = dout * si * (1 - th^2)
//   dinput_gate = dout * th * si * (1 - si)   dforget_gate = dout * memory * sf * (1 - sf)
// The gradients are stored in acc (float32 for half types): the launcher sums them over broadcast
// dimensions before rounding to the input dtype.
struct GatedDenseUpdateBwdParams {
  c10::ScalarType dtype;  // of dout and the four inputs
  int64_t numel;
  const void* dout;          // (numel,) dtype
  const void* memory;        // (numel,) dtype
  const void* update;        // (numel,) dtype
  const void* input_gate;    // (numel,) dtype
  const void* forget_gate;   // (numel,) dtype
  void* dmemory;             // (numel,) acc
  void* dupdate;             // (numel,) acc
  void* dinput_gate;         // (numel,) acc
  void* dforget_gate;        // (numel,) acc
};

// The launchers, compiled once per instruction-set variant into l2m::cpu::<variant> (isa.h).
// Declared for the kernel sources only: bindings.cpp reaches them through the dispatch table
// of kernels.h, so that no call bypasses the variant chosen at import.
#if defined(L2M_CPU_ISA)
inline namespace L2M_CPU_ISA {
// dtype must be Float, Double, Half or BFloat16 (an unknown dtype throws).
void gated_dense_update_fwd(const GatedDenseUpdateFwdParams& params);
void gated_dense_update_bwd(const GatedDenseUpdateBwdParams& params);
}  // namespace L2M_CPU_ISA
#endif

}  // namespace l2m::cpu
