// LM2-style gated dense memory update on CUDA (SPEC section 3): parameter structs and launchers.
//
// Plain C++ like merge.h: no torch headers. bindings.cpp validates the tensors and fills these
// structs. Semantics: l2m_kernels/ops/memory_write/reference.py (gated_dense_update_ref).
//
// The kernels are elementwise over a 4-D broadcast shape `sizes`: every input is read through
// its own int64 element strides (0 along broadcast dimensions, any value otherwise), so the
// Python launcher passes expanded views without materialising them; out, dout and the gradients
// are contiguous tensors of that shape. All arithmetic is float32 (inputs converted on load,
// outputs rounded once on store); gradients are stored in float32 and reduced to each input's
// shape by the caller. Launchers never throw; they return cudaSuccess, the launch's error, or
// cudaErrorInvalidValue (negative sizes, a null pointer, an unknown dtype).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "merge.h"  // MergeDtype

namespace l2m {
namespace cuda {

// An input read at element offset sum_i index_i * strides[i] from `data`.
struct StridedOperand {
  const void* data;
  int64_t strides[4];
};

// out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update).
struct GatedDenseUpdateFwdParams {
  MergeDtype dtype;  // of the four inputs and out
  int64_t sizes[4];  // the broadcast shape
  StridedOperand memory;
  StridedOperand update;
  StridedOperand input_gate;   // logits
  StridedOperand forget_gate;  // logits
  void* out;                   // contiguous `sizes`, dtype
};

// With sf = sigmoid(forget_gate), si = sigmoid(input_gate), th = tanh(update), g = dout:
//   dmemory = g * sf                   dupdate = g * si * (1 - th * th)
//   dinput_gate = g * th * si * (1 - si)   dforget_gate = g * memory * sf * (1 - sf)
struct GatedDenseUpdateBwdParams {
  MergeDtype dtype;  // of dout and the four inputs
  int64_t sizes[4];
  const void* dout;  // contiguous `sizes`, dtype
  StridedOperand memory;
  StridedOperand update;
  StridedOperand input_gate;
  StridedOperand forget_gate;
  float* dmemory;       // contiguous `sizes`, float32
  float* dupdate;       // contiguous `sizes`, float32
  float* dinput_gate;   // contiguous `sizes`, float32
  float* dforget_gate;  // contiguous `sizes`, float32
};

cudaError_t gated_dense_update_fwd_launch(const GatedDenseUpdateFwdParams& params,
                                          cudaStream_t stream);
cudaError_t gated_dense_update_bwd_launch(const GatedDenseUpdateBwdParams& params,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace l2m
