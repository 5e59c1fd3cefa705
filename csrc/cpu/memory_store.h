// Reads of l2m_kernels.memory.MemoryStore, CPU backend: the plain parameter structs and launchers
// of the exact top-k selection over int8 keys (int8_topk_fwd, int8_topk.cpp) and of the exact
// top-k selection within per-row lists of blocks (block_candidates_topk_fwd, store_read.cpp).
//
// Both kernels select only: they return, per query row, the k best scores and their slot ids.
// A third one (topk_values_read_fwd, store_read.cpp) reads a selection: the softmax weights of the
// k selected scores, their log-sum-exp and the weighted sum of the selected value rows, which it
// dequantises itself (int8 or float8 values with per-entry scales), O(rows x k x Dv) work.
//
// Selection order, as every top-k of the package: descending score, ties to the smaller slot, NaN
// ranked like +inf (NaN scores first, among them the smaller slot first). Fewer than k candidates:
// the missing entries have score -inf and slot -1. Scores are accumulated in float64 (float64
// products of a float32 query and an int8 or float32 key are exact) and written rounded to float32;
// the ranking uses the float64 value. Every output element is written; the results do not depend
// on the thread count.
#pragma once

#include <cstdint>

namespace l2m {

// Exact top-k over int8 keys. The score of slot n for row r of memory head h is
//   s = sum_d q[h, r, d] * keys[h, n, d]         (float64 accumulation)
// where q already carries the softmax scale and the keys' per-channel scales, so the int8 key is
// used as stored. The kernel may skip a slot only when a bound proves it cannot enter the top-k:
// the result equals the brute-force ranking of every s.
//
// Refinement (q_refine set): the int8 keys only filter, and the score of slot n for row r is
//   s = sum_d q_refine[h, r, d] * refine_keys[h, n, d]         (float64 accumulation)
// against float32 keys (e.g. the originals the int8 keys quantise). The caller guarantees, for
// every slot, |s - sum_d q[h, r, d] * keys[h, n, d]| <= slack[h, r]; the kernel widens its bounds
// by the slack, and the result equals the brute-force ranking of every s. A row whose slack is
// not finite is scored exactly slot by slot.
struct Int8TopkParams {
  int64_t heads;  // Hm
  int64_t rows;   // R query rows per memory head
  int64_t slots;  // N: slots [0, N) of every head are scored
  int64_t dim;    // D
  int64_t k;      // >= 1 (k > N: the entries past N are -inf / -1)
  const float* q;           // (Hm, R, D) contiguous float32
  const int8_t* keys;       // slot n of head h at keys + h * key_strides[0] + n * key_strides[1];
  int64_t key_strides[2];   //   its D bytes contiguous
  const int32_t* key_abs;   // (Hm, N) contiguous: sum_d |keys[h, n, d]|
  const int32_t* key_sum;   // (Hm, N) contiguous: sum_d keys[h, n, d]
  float* scores;            // (Hm, R, k)
  int64_t* indices;         // (Hm, R, k)
  // Refinement (optional; q_refine == nullptr: off).
  const float* q_refine;       // (Hm, R, D) contiguous float32: the rescoring query
  const float* refine_keys;    // slot n of head h at refine_keys + h * refine_strides[0] +
  int64_t refine_strides[2];   //   n * refine_strides[1], its D floats contiguous
  const float* slack;          // (Hm, R) contiguous, >= 0: the bound on |s - int8 score|
};

// Exact top-k within each row's blocks. A staging buffer holds U blocks of S key rows (float32 or
// int8); row r of memory head h reads the blocks blocks[h, r, 0 .. KB) (-1: none), each block u
// holding block_len[u] valid rows whose slot ids are block_slot[u] + 0 .. block_len[u) - 1. The
// score of a key row is sum_d q[h, r, d] * key[d] (float64 accumulation; int8 keys as stored).
// A row's blocks are given in increasing block_slot order, and the blocks' slot ranges do not
// overlap, so the row sees its slots in increasing order.
struct BlockCandidatesParams {
  bool int8_keys;  // keys are int8, else float32
  int64_t heads;   // Hm
  int64_t rows;    // R
  int64_t num_blocks;  // U blocks in the staging buffer
  int64_t block_size;  // S
  int64_t dim;         // D
  int64_t num_selected;  // KB blocks per row
  int64_t k;
  const float* q;             // (Hm, R, D) contiguous
  const void* keys;           // (U, Hm, S, D) contiguous, float32 or int8
  const int64_t* blocks;      // (Hm, R, KB) contiguous, in [-1, U)
  const int64_t* block_slot;  // (U,) slot id of each block's first row
  const int64_t* block_len;   // (U,) valid rows of each block, in [0, S]
  float* scores;              // (Hm, R, k)
  int64_t* indices;           // (Hm, R, k)
};

// How the value rows of topk_values_read_fwd are stored.
enum class StoredValues : int {
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat64,   // read as float32 (rounded once)
  kInt8,      // value = v8 * value_scale[h, n]
  kFloat8E4M3,  // the bytes of float8_e4m3fn; value = fp8 * value_scale[h, n]
};

// The read of a selection. Per row (h, r), over the live entries j (indices[h, r, j] >= 0):
//   m = max_j scores[j];  e_j = exp(scores[j] - m);  weights[j] = e_j / sum e;
//   lse = m + log(sum e);  out = sum_j weights[j] * value(h, indices[h, r, j])
// in float32 (the weights summed in entry order, out accumulated over j in entry order). Dead
// entries get weight 0; a row with no live entry (or only -inf scores) gets weights 0, lse = -inf
// and out = 0; a NaN among the live scores makes the row's weights and lse NaN (and out NaN).
struct TopkValuesReadParams {
  int64_t heads;  // Hm
  int64_t rows;   // R
  int64_t k;
  int64_t slots;  // N (the indices are in [-1, N))
  int64_t dim;    // Dv
  const float* scores;     // (Hm, R, k) contiguous
  const int64_t* indices;  // (Hm, R, k) contiguous
  StoredValues value_type;
  const void* values;         // row n of head h at values + h * value_strides[0] +
  int64_t value_strides[2];   //   n * value_strides[1] (elements), its Dv elements contiguous
  const float* value_scale;   // int8 / float8: (Hm, N), [h, n] at h * value_scale_strides[0] +
  int64_t value_scale_strides[2];  //   n * value_scale_strides[1]; else nullptr
  float* out;      // (Hm, R, Dv) contiguous
  float* weights;  // (Hm, R, k) contiguous
  float* lse;      // (Hm, R) contiguous
};

}  // namespace l2m

#include "isa.h"

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {

void int8_topk_fwd(const Int8TopkParams& params);
void block_candidates_topk_fwd(const BlockCandidatesParams& params);
void topk_values_read_fwd(const TopkValuesReadParams& params);

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
