// Row-wise merge kernels of l2m-kernels, CPU backend: the plain parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs, mirroring the CUDA side (csrc/cuda). The interface is /work/notes/merge_kernels.md:
// every (R, D) pointer addresses rows * dim contiguous elements of `dtype`; every (R,) pointer
// addresses `rows` contiguous elements of the accumulation type (float64 for float64 input, else
// float32), except `gate`, which has `dtype`. Every output element is written.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace l2m::cpu {

// out = wa * out_a + wb * out_b, lse = logaddexp(lse_a, lse_b), per row.
struct MergeAttentionFwdParams {
  c10::ScalarType dtype;  // of out_a, out_b, out
  int64_t rows;
  int64_t dim;
  const void* out_a;  // (R, D) dtype
  const void* lse_a;  // (R,) acc
  const void* out_b;  // (R, D) dtype
  const void* lse_b;  // (R,) acc
  void* out;          // (R, D) dtype
  void* lse;          // (R,) acc
};

struct MergeAttentionBwdParams {
  c10::ScalarType dtype;  // of dout, out_a, out_b, d_out_a, d_out_b
  int64_t rows;
  int64_t dim;
  const void* dout;   // (R, D) dtype
  const void* dlse;   // (R,) acc
  const void* out_a;  // (R, D) dtype
  const void* lse_a;  // (R,) acc
  const void* out_b;  // (R, D) dtype
  const void* lse_b;  // (R,) acc
  const void* lse;    // (R,) acc, the forward's output
  void* d_out_a;      // (R, D) dtype
  void* d_lse_a;      // (R,) acc
  void* d_out_b;      // (R, D) dtype
  void* d_lse_b;      // (R,) acc
};

// out = g * out_mem + (1 - g) * out_local with g = sigmoid(gate), per row.
struct GatedMergeFwdParams {
  c10::ScalarType dtype;  // of every tensor
  int64_t rows;
  int64_t dim;
  const void* out_local;  // (R, D) dtype
  const void* out_mem;    // (R, D) dtype
  const void* gate;       // (R,) dtype, logits
  void* out;              // (R, D) dtype
};

struct GatedMergeBwdParams {
  c10::ScalarType dtype;  // of every tensor but d_gate
  int64_t rows;
  int64_t dim;
  const void* dout;       // (R, D) dtype
  const void* out_local;  // (R, D) dtype
  const void* out_mem;    // (R, D) dtype
  const void* gate;       // (R,) dtype, logits
  void* d_local;          // (R, D) dtype
  void* d_mem;            // (R, D) dtype
  void* d_gate;           // (R,) acc
};

// The launchers, compiled once per instruction-set variant into l2m::cpu::<variant> (isa.h).
// Declared for the kernel sources only: bindings.cpp reaches them through the dispatch table
// of kernels.h, so that no call bypasses the variant chosen at import.
#if defined(L2M_CPU_ISA)
inline namespace L2M_CPU_ISA {
// dtype must be Float, Double, Half or BFloat16 (checked again here: an unknown dtype throws).
void merge_attention_fwd(const MergeAttentionFwdParams& params);
void merge_attention_bwd(const MergeAttentionBwdParams& params);
void gated_merge_fwd(const GatedMergeFwdParams& params);
void gated_merge_bwd(const GatedMergeBwdParams& params);
}  // namespace L2M_CPU_ISA
#endif

}  // namespace l2m::cpu
