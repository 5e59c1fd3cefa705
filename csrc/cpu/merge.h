// Row-wise merge kernels of l2m-kernels, CPU backend: the plain parameter structs and launchers.
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs, mirroring the CUDA side (csrc/cuda). The interface is /work/notes/merge_kernels.md:
// every (R, D) pointer addresses rows * dim contiguous elements of `dtype`; every (R,) pointer
// addresses `rows` contiguous elements of the accumulation type (float64 for float64 input, else
// float32), except `gate`, which has `dtype`. Every output element is written.
#pragma once

#include <cstdint>

#include "../common/params.h"

namespace l2m::cpu {

// out = wa * out_a + wb * out_b, lse = logaddexp(lse_a, lse_b), per row.
struct MergeAttentionFwdParams : l2m::MergeAttentionFwdParams {};

struct MergeAttentionBwdParams : l2m::MergeAttentionBwdParams {};

// out = g * out_mem + (1 - g) * out_local with g = sigmoid(gate), per row.
struct GatedMergeFwdParams : l2m::GatedMergeFwdParams {};

struct GatedMergeBwdParams : l2m::GatedMergeBwdParams {};

}  // namespace l2m::cpu
