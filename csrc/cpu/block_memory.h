// Block memory reads of l2m-kernels, CPU backend: the plain parameter structs and launchers of the
// block selection (block_topk_fwd) and the read of the selected blocks (block_read_fwd/bwd).
//
// The launchers know nothing about at::Tensor: bindings.cpp validates tensors and fills these
// structs. Semantics: l2m_kernels/ops/block_memory/reference.py. q and dout are placed by a Rows
// (rows.h), the block tensors by the strides in the params (params.h); every other pointer
// addresses a contiguous tensor. `acc` is float64 for float64 input, else float32. Every output
// element is written.
#pragma once

#include <cstdint>

#include "../common/params.h"

#include "rows.h"

// The parameters of the block memory kernels. They live here rather than in params.h because only
// the CPU backend serves these ops.
namespace l2m {

// ---- block memory (l2m_kernels/ops/block_memory: B batch, H query heads, Hkv kv heads with
// H % Hkv == 0, T queries, NB blocks of S tokens with R representatives each, D / Dv features) ----
//
// The block tensors (reprs, block_keys, block_values: (B, Hkv, NB, ., .)) have contiguous last two
// dimensions; those of dimensions 0-2 are given (a window of a larger buffer along NB). The
// validity masks (B, NB, .) bool have a contiguous last dimension; null: every entry valid.

// scores[b, g, n] = scale * sum_{h in group g, t} max_{valid r} q[b, h, t] . reprs[b, g, n, r]
// (-inf for a block without a valid representative), then the k best blocks per (b, g): NaN first,
// then descending score, ties to the smaller index; written in increasing block order.
struct BlockTopkFwdParams {
  Dtype dtype;         // of q, reprs
  int64_t batch;       // B
  int64_t heads;       // H
  int64_t kv_heads;    // Hkv
  int64_t seq_len;     // T
  int64_t num_blocks;  // NB
  int64_t num_reprs;   // R
  int64_t dim;         // D
  int64_t k;           // in [0, NB]
  double scale;
  const void* q;                  // (B, H, T, D) dtype
  const void* reprs;              // (B, Hkv, NB, R, D) dtype
  const bool* repr_valid;         // (B, NB, R) or null
  int64_t reprs_strides[3];       // element strides of reprs' dimensions 0-2
  int64_t repr_valid_strides[2];  // of repr_valid's dimensions 0-1
  int64_t* indices;               // (B, Hkv, k)
  void* scores;                   // (B, Hkv, NB) acc
};

// Per query row (b, h, t) of kv head g: softmax attention over the valid tokens of the blocks
// indices[b, g, 0..K) (a repeated block counts once per occurrence); a row without a valid token
// gets out = 0 and lse = -inf.
struct BlockReadFwdParams {
  Dtype dtype;  // of q, block_keys, block_values, out
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;
  int64_t seq_len;
  int64_t num_blocks;
  int64_t block_size;    // S
  int64_t dim;           // D
  int64_t dim_v;         // Dv
  int64_t num_selected;  // K
  double scale;
  const void* q;             // (B, H, T, D) dtype
  const void* block_keys;    // (B, Hkv, NB, S, D) dtype
  const void* block_values;  // (B, Hkv, NB, S, Dv) dtype
  const int64_t* indices;    // (B, Hkv, K) in [0, NB)
  const bool* block_valid;   // (B, NB, S) or null
  int64_t key_strides[3];    // element strides of block_keys' dimensions 0-2
  int64_t value_strides[3];  // of block_values'
  int64_t valid_strides[2];  // of block_valid's dimensions 0-1
  void* out;                 // (B, H, T, Dv) dtype
  void* lse;                 // (B, H, T) acc
};

// Gradients, FlashAttention-2 style (as LocalAttentionBwdParams); dkeys and dvalues are written in
// full, zero for blocks no query reads, the sum over the occurrences of a repeated block.
struct BlockReadBwdParams {
  Dtype dtype;  // of dout, q, block_keys, block_values, out, dq, dkeys, dvalues
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;
  int64_t seq_len;
  int64_t num_blocks;
  int64_t block_size;
  int64_t dim;
  int64_t dim_v;
  int64_t num_selected;
  double scale;
  const void* dout;          // (B, H, T, Dv) dtype
  const void* dlse;          // (B, H, T) acc
  const void* q;             // (B, H, T, D) dtype
  const void* block_keys;    // (B, Hkv, NB, S, D) dtype
  const void* block_values;  // (B, Hkv, NB, S, Dv) dtype
  const int64_t* indices;    // (B, Hkv, K)
  const bool* block_valid;   // (B, NB, S) or null
  int64_t key_strides[3];
  int64_t value_strides[3];
  int64_t valid_strides[2];
  const void* out;  // (B, H, T, Dv) dtype, the forward's
  const void* lse;  // (B, H, T) acc, the forward's
  void* dq;         // (B, H, T, D) dtype
  void* dkeys;      // (B, Hkv, NB, S, D) dtype, contiguous
  void* dvalues;    // (B, Hkv, NB, S, Dv) dtype, contiguous
};

}  // namespace l2m

namespace l2m::cpu {

struct BlockTopkFwdParams : l2m::BlockTopkFwdParams {
  Rows q_rows;
};

struct BlockReadFwdParams : l2m::BlockReadFwdParams {
  Rows q_rows;
};

// Gradients are reduced in a fixed order per (batch, kv head): bitwise independent of the thread
// count.
struct BlockReadBwdParams : l2m::BlockReadBwdParams {
  Rows dout_rows, q_rows;
};

}  // namespace l2m::cpu
