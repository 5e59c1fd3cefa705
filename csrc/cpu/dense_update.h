// LM2-style gated dense memory update of l2m-kernels, CPU backend: parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: l2m_kernels/ops/memory_write/reference.py. The kernels are elementwise over
// the `numel` elements of the inputs' common broadcast shape (S0, S1, S2, S3). Either every input
// is contiguous of that shape (`strided` false: one flat range), or `strided` and each input is
// read where it lies through its DenseLayout: a stride-0 gate broadcast over the last dimension,
// or over any leading one, is not materialised. Outputs are contiguous of the broadcast shape,
// except the gradient of an input broadcast along the last dimension, which the backward may sum
// along it (row_sums); reducing gradients over the other broadcast dimensions is the Python
// launcher's job. `acc` below is float64 for float64 input, else float32.
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

namespace l2m::cpu {

// Where an input lies on the strided path: its rows over the leading (S0, S1, S2) dimensions
// (rows.h; row r = (i0 * S1 + i1) * S2 + i2) and its stride along S3, 1 or 0 (broadcast).
struct DenseLayout {
  Rows rows;
  int64_t step = 1;
};

// out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update), computed in acc and
// rounded once to dtype.
struct GatedDenseUpdateFwdParams {
  Dtype dtype;              // of every tensor
  int64_t numel;            // S0 * S1 * S2 * S3
  int64_t row_len;          // S3 (strided only)
  bool strided;             // inputs placed by their layouts (else contiguous of numel elements)
  const void* memory;       // dtype
  const void* update;       // dtype
  const void* input_gate;   // dtype, logits
  const void* forget_gate;  // dtype, logits
  DenseLayout memory_layout, update_layout, input_gate_layout, forget_gate_layout;
  void* out;                // (numel,) dtype, contiguous
};

// Elementwise gradients for dout = dL/dout, with sf = sigmoid(forget_gate),
// si = sigmoid(input_gate), th = tanh(update):
//   dmemory = dout * sf               dupdate = dout * si * (1 - th^2)
//   dinput_gate = dout * th * si * (1 - si)   dforget_gate = dout * memory * sf * (1 - sf)
// The gradients are stored in acc (float32 for half types): the launcher sums them over broadcast
// dimensions before rounding to the input dtype. With `strided`, the gradient of an input
// broadcast along the last dimension (step 0) may be summed along it in the kernel
// (row_sums[i]): one value per row, (S0 * S1 * S2,), in a fixed order (dense_update.cpp, RowSums).
struct GatedDenseUpdateBwdParams {
  Dtype dtype;  // of dout and the four inputs
  int64_t numel;
  int64_t row_len;
  bool strided;
  const void* dout;          // (numel,) dtype, contiguous
  const void* memory;        // dtype, as in the forward
  const void* update;
  const void* input_gate;
  const void* forget_gate;
  DenseLayout memory_layout, update_layout, input_gate_layout, forget_gate_layout;
  void* dmemory;             // (numel,) acc, or (numel / row_len,) with row_sums[0]
  void* dupdate;             // (numel,) acc, or (numel / row_len,) with row_sums[1]
  void* dinput_gate;         // (numel,) acc, or (numel / row_len,) with row_sums[2]
  void* dforget_gate;        // (numel,) acc, or (numel / row_len,) with row_sums[3]
  // memory, update, input_gate, forget_gate: its gradient holds one sum per row (strided only,
  // for an input whose layout has step 0).
  bool row_sums[4] = {false, false, false, false};
};

}  // namespace l2m::cpu
