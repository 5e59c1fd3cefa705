// The dispatch table of the CPU kernels: every launcher of the op headers, one table per
// instruction-set variant (isa.h). bindings.cpp calls the kernels only through the table of the
// variant chosen at import.
#pragma once

#include "block_memory.h"
#include "dense_update.h"
#include "local_attention.h"
#include "memory_attention.h"
#include "memory_store.h"
#include "memory_write.h"
#include "merge.h"
#include "product_key.h"
#include "topk_read.h"

// X(launcher, params struct) for every launcher; the table's fields and each variant's entries
// come from this one list.
#define L2M_CPU_KERNELS(X)                             \
  X(merge_attention_fwd, MergeAttentionFwdParams)      \
  X(merge_attention_bwd, MergeAttentionBwdParams)      \
  X(gated_merge_fwd, GatedMergeFwdParams)              \
  X(gated_merge_bwd, GatedMergeBwdParams)              \
  X(topk_read_fwd, TopkReadFwdParams)                  \
  X(topk_read_bwd, TopkReadBwdParams)                  \
  X(product_key_fwd, ProductKeyFwdParams)              \
  X(product_key_bwd, ProductKeyBwdParams)              \
  X(gated_memory_write_fwd, GatedMemoryWriteFwdParams) \
  X(gated_memory_write_bwd, GatedMemoryWriteBwdParams) \
  X(local_attention_fwd, LocalAttentionFwdParams)      \
  X(local_attention_bwd, LocalAttentionBwdParams)      \
  X(memory_read_weights, MemoryReadWeightsParams)      \
  X(gated_dense_update_fwd, GatedDenseUpdateFwdParams) \
  X(gated_dense_update_bwd, GatedDenseUpdateBwdParams) \
  X(block_topk_fwd, BlockTopkFwdParams)                \
  X(block_read_fwd, BlockReadFwdParams)                \
  X(block_read_bwd, BlockReadBwdParams)                \
  X(int8_topk_fwd, Int8TopkParams)                     \
  X(block_candidates_topk_fwd, BlockCandidatesParams)  \
  X(topk_values_read_fwd, TopkValuesReadParams)

namespace l2m::cpu {

struct KernelTable {
#define L2M_CPU_KERNEL_POINTER(launcher, Params) void (*launcher)(const Params&);
  L2M_CPU_KERNELS(L2M_CPU_KERNEL_POINTER)
#undef L2M_CPU_KERNEL_POINTER
};

// The launchers, compiled once per instruction-set variant into l2m::cpu::<variant> (isa.h) and
// declared from the same list; each takes Float, Double, Half or BFloat16 (another dtype throws).
// Declared for the kernel sources only: bindings.cpp reaches them through the table of the
// variant chosen at import, so that no call bypasses it.
#if defined(L2M_CPU_ISA)
inline namespace L2M_CPU_ISA {
#define L2M_CPU_KERNEL_DECLARATION(launcher, Params) void launcher(const Params& params);
L2M_CPU_KERNELS(L2M_CPU_KERNEL_DECLARATION)
#undef L2M_CPU_KERNEL_DECLARATION
}  // namespace L2M_CPU_ISA
#endif

// Each variant's table (kernel_table.cpp). setup.py tells bindings.cpp which variants it built
// and linked; the others are declared but never referenced.
namespace isa_default {
extern const KernelTable kernel_table;
}
namespace isa_avx2 {
extern const KernelTable kernel_table;
}
namespace isa_avx512 {
extern const KernelTable kernel_table;
}

}  // namespace l2m::cpu
