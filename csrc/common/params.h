// The parameters of every op's kernels, one plain struct per launcher, shared by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda): sizes, the storage dtype, the scale and one pointer
// per tensor. Plain C++17 without torch headers, so the kernels build with nvcc or a host compiler
// alone; the bindings (csrc/common/binding.h) check the tensors and fill these structs.
//
// Each backend derives its launchers' structs from these and adds only what it alone reads: the
// CPU kernels the row layouts of operands read where they lie (csrc/cpu/rows.h: the strides of
// q, dout, k, v, write operands); the CUDA kernels their scratch buffers. Fields that only one
// backend reads but that sit inside the CUDA kernels' layout stay here, marked "(CUDA)": the
// CUDA kernels take these structs by value, and the order of their fields is the order of the
// kernels' parameter space.
//
// Shapes: B batch, H query heads, T queries, Hm memory heads (H % Hm == 0; query head h reads
// memory head h / (H / Hm)), N slots, Dk / Dv key / value features, k entries per query. Tensors
// are contiguous unless a backend's derived struct places them; `acc` is float64 for float64
// storage, else float32 (CUDA serves float64 for the attention ops only). Every output element is
// written. Semantics: l2m_kernels/ops/<op>/reference.py.
#pragma once

#include <cstdint>

namespace l2m {

// Storage dtype of an op's floating tensors.
enum class Dtype : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

// ---- merges (R = B * H * T rows of D features) ----

// out = wa * out_a + wb * out_b, lse = logaddexp(lse_a, lse_b), per row.
struct MergeAttentionFwdParams {
  const void* out_a;  // (R, D) dtype
  const void* lse_a;  // (R,) acc
  const void* out_b;  // (R, D) dtype
  const void* lse_b;  // (R,) acc
  void* out;          // (R, D) dtype
  void* lse;          // (R,) acc
  int64_t rows;
  int64_t head_dim;
  Dtype dtype;
};

struct MergeAttentionBwdParams {
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
  int64_t rows;
  int64_t head_dim;
  Dtype dtype;
};

// out = g * out_mem + (1 - g) * out_local with g = sigmoid(gate), per row.
struct GatedMergeFwdParams {
  const void* out_local;  // (R, D) dtype
  const void* out_mem;    // (R, D) dtype
  const void* gate;       // (R,) dtype, logits
  void* out;              // (R, D) dtype
  int64_t rows;
  int64_t head_dim;
  Dtype dtype;
};

struct GatedMergeBwdParams {
  const void* dout;       // (R, D) dtype
  const void* out_local;  // (R, D) dtype
  const void* out_mem;    // (R, D) dtype
  const void* gate;       // (R,) dtype, logits
  void* d_local;          // (R, D) dtype
  void* d_mem;            // (R, D) dtype
  void* d_gate;           // (R,) acc
  int64_t rows;
  int64_t head_dim;
  Dtype dtype;
};

// ---- sparse top-k memory read ----

// Per query (b, h, t): scores s_n = (scale * q) . keys[n] over the existing slots n < valid_len[b];
// the k best by descending score (ties: smaller slot; NaN ranks like +inf); weights = softmax,
// lse = logsumexp, out = sum_j weights_j * values[slot_j]; missing entries index -1, weight 0.
struct TopkReadFwdParams {
  Dtype dtype;          // of q, keys, values, out
  int64_t batch;        // B
  int64_t heads;        // H
  int64_t seq_len;      // T
  int64_t mem_heads;    // Hm
  int64_t num_slots;    // N
  int64_t dim_k;        // Dk
  int64_t dim_v;        // Dv
  int64_t k;            // 1 <= k <= min(N, 256)
  bool shared_memory;   // keys/values are (Hm, N, D), used by every batch element
  double scale;
  const void* q;             // (B, H, T, Dk) dtype
  const void* keys;          // (B, Hm, N, Dk) or (Hm, N, Dk) dtype
  const void* values;        // (B, Hm, N, Dv) or (Hm, N, Dv) dtype
  const int64_t* valid_len;  // (B,) or nullptr (every slot exists); clamped to [0, N]
  void* out;                 // (B, H, T, Dv) dtype
  int64_t* indices;          // (B, H, T, k)
  void* weights;             // (B, H, T, k) acc
  void* lse;                 // (B, H, T) acc
};

// Gradients of the read for a given selection (entries whose index is outside [0, N), e.g. -1,
// contribute nothing):
//   dw_j = dweights_j + <dout, v_j>;  ds_j = w_j * (dw_j - sum_i w_i dw_i + dlse)
//   dq = scale * sum_j ds_j key_j;  dkeys[idx_j] += ds_j * (scale * q);  dvalues[idx_j] += w_j dout
// Shared memories sum the slot gradients over the batch too.
struct TopkReadBwdParams {
  Dtype dtype;  // of dout, q, keys, values, dq, dkeys, dvalues
  int64_t batch;
  int64_t heads;
  int64_t seq_len;
  int64_t mem_heads;
  int64_t num_slots;
  int64_t dim_k;
  int64_t dim_v;
  int64_t k;
  bool shared_memory;
  bool deterministic;  // (CUDA) fixed-order slot sums, else float32 atomics; the CPU always is
  double scale;
  const void* dout;        // (B, H, T, Dv) dtype
  const void* dweights;    // (B, H, T, k) acc
  const void* dlse;        // (B, H, T) acc
  const void* q;           // (B, H, T, Dk) dtype
  const void* keys;        // (B, Hm, N, Dk) or (Hm, N, Dk) dtype
  const void* values;      // (B, Hm, N, Dv) or (Hm, N, Dv) dtype
  const int64_t* indices;  // (B, H, T, k)
  const void* weights;     // (B, H, T, k) acc
  void* dq;                // like q
  // (CUDA) the two modes' buffers, see csrc/cuda/topk_read.h.
  float* dkeys_acc;            // atomic: like keys, float32, zeroed by the caller
  float* dvalues_acc;          // atomic: like values, float32, zeroed by the caller
  float* ds;                   // deterministic: (B*H*T*k,) scratch
  const int64_t* entry_order;  // deterministic: (E,) entries sorted by slot
  const int64_t* entry_rows;   // deterministic: (E,) entry_order / k
  const int64_t* run_starts;   // deterministic: (M * N + 1,) each slot's first sorted entry
  void* dkeys;                 // like keys, dtype (CUDA: deterministic mode only)
  void* dvalues;               // like values, dtype (CUDA: deterministic mode only)
};

// The read's softmax weights recomputed at a given selection (the memory_attention backward),
// per query row and entry j with slot n_j:
//   w_j = exp(<scale * q, keys[n_j]> - lse)   (0 for slots outside [0, N), e.g. -1)
//   dots = sum_j w_j <dout, values[n_j]>      (when dout and dots are given)
//   out  = sum_j w_j values[n_j]              (when out is given)
struct MemoryReadWeightsParams {
  Dtype dtype;  // of q, keys, values, dout, out
  int64_t batch;
  int64_t heads;
  int64_t seq_len;
  int64_t mem_heads;
  int64_t num_slots;
  int64_t dim_k;
  int64_t dim_v;
  int64_t k;
  bool shared_memory;
  double scale;
  const void* q;           // (B, H, T, Dk) dtype
  const void* keys;        // (B, Hm, N, Dk) or (Hm, N, Dk) dtype
  const void* values;      // (B, Hm, N, Dv) or (Hm, N, Dv) dtype
  const int64_t* indices;  // (B, H, T, k)
  const void* lse;         // (B, H, T) acc, the read's log-sum-exp
  const void* dout;        // (B, H, T, Dv) dtype, or nullptr
  void* weights;           // (B, H, T, k) acc
  void* dots;              // (B, H, T) acc, or nullptr (required with dout)
  void* out;               // (B, H, T, Dv) dtype, or nullptr
};

// ---- product-key memory read (n_sub sub-keys per half, slots n_sub ** 2) ----

// Per query row (b, h, t): s1 = (q[:Dh] . subkeys[h, 0]) * scale, s2 = (q[Dh:] . subkeys[h, 1])
// * scale (Dh = Dk / 2); the k_sub best of each half; the candidates (i, j) with score s1_i + s2_j
// at slot i * n_sub + j; the k best candidates (ties: smaller slot; NaN ranks like +inf);
// weights = softmax, lse = logsumexp, out = sum_m weights_m * values[indices_m], summed over heads
// with sum_heads.
struct ProductKeyFwdParams {
  Dtype dtype;      // of q, subkeys, values, out
  int64_t batch;    // B
  int64_t heads;    // H
  int64_t seq_len;  // T
  int64_t dim_k;    // Dk, even
  int64_t n_sub;    // sub-keys per half
  int64_t dim_v;    // Dv
  int64_t k;        // 1 <= k <= k_sub ** 2
  int64_t k_sub;    // 1 <= k_sub <= n_sub
  bool sum_heads;
  double scale;
  const void* q;        // (B, H, T, Dk) dtype
  const void* subkeys;  // (H, 2, n_sub, Dk / 2) dtype
  const void* values;   // (n_sub ** 2, Dv) dtype
  void* out;            // (B, H, T, Dv) or, with sum_heads, (B, T, Dv) dtype
  int64_t* indices;     // (B, H, T, k)
  void* weights;        // (B, H, T, k) acc
  void* lse;            // (B, H, T) acc
};

// Gradients for a given selection, per entry m with slot idx_m = i_m * n_sub + j_m (dout of the
// row is dout[b, h, t], or dout[b, t] with sum_heads):
//   dw_m = dweights_m + <dout, values[idx_m]>;  ds_m = w_m * (dw_m - sum_l w_l dw_l + dlse)
//   dq[:Dh] = scale * sum_m ds_m subkeys[h, 0, i_m]; dq[Dh:] = scale * sum_m ds_m subkeys[h, 1, j_m]
//   dsubkeys[h, 0, i_m] += scale * ds_m * q[:Dh];    dsubkeys[h, 1, j_m] += scale * ds_m * q[Dh:]
//   dvalues[idx_m] += w_m * dout    (sparse_grad: one row per entry instead, see the backends)
struct ProductKeyBwdParams {
  Dtype dtype;  // of dout, q, subkeys, values, dq, dsubkeys, dvalues
  int64_t batch;
  int64_t heads;
  int64_t seq_len;
  int64_t dim_k;
  int64_t n_sub;
  int64_t dim_v;
  int64_t k;
  bool sum_heads;
  bool sparse_grad;
  bool deterministic;  // (CUDA) fixed-order segment sums, else float32 atomics; the CPU always is
  double scale;
  const void* dout;        // (B, H, T, Dv) or (B, T, Dv) dtype
  const void* dweights;    // (B, H, T, k) acc
  const void* dlse;        // (B, H, T) acc
  const void* q;           // (B, H, T, Dk) dtype
  const void* subkeys;     // (H, 2, n_sub, Dh) dtype
  const void* values;      // (n_sub ** 2, Dv) dtype
  const int64_t* indices;  // (B, H, T, k)
  const void* weights;     // (B, H, T, k) acc
  void* dq;                // like q
};

// ---- gated memory writes (G memories of N slots of D features; T steps of kw writes) ----

// Per memory g, for p = t * kw + j in increasing order, with s = indices[g, p] >= 0 (-1: no write):
//   M[g, s] <- M[g, s] * (1 - weights[g, p] * erase[g, t]) + weights[g, p] * add[g, t]
struct GatedMemoryWriteFwdParams {
  Dtype dtype;              // of memory, weights, add, erase, out
  bool indices_int32;       // indices are int32 (else int64)
  int64_t groups;           // G
  int64_t num_slots;        // N
  int64_t dim;              // D
  int64_t steps;            // T
  int64_t writes_per_step;  // kw
  int64_t erase_dim;        // 1 (one gate per step, broadcast over D) or D
  const void* memory;       // (G, N, D) dtype
  const void* indices;      // (G, T, kw) int32 / int64, each in [-1, N)
  const void* weights;      // (G, T, kw) dtype
  const void* add;          // (G, T, D) dtype
  const void* erase;        // (G, T, erase_dim) dtype
  const int64_t* order;       // (CUDA) (E,) the write plan, csrc/cuda/memory_write.h
  const int32_t* run_length;  // (CUDA) (E,) the write plan
  void* out;                // (G, N, D) dtype; may be `memory` itself (in place)
};

// Gradients for dnew = dL/dout: dmemory and dweights here; the backends store the gradients of
// add and erase differently (derived structs).
struct GatedMemoryWriteBwdParams {
  Dtype dtype;
  bool indices_int32;
  int64_t groups;
  int64_t num_slots;
  int64_t dim;
  int64_t steps;
  int64_t writes_per_step;
  int64_t erase_dim;
  const void* dnew;           // (G, N, D) dtype
  const void* memory;         // (G, N, D) dtype, the forward's input
  const void* indices;        // (G, T, kw)
  const void* weights;        // (G, T, kw) dtype
  const void* add;            // (G, T, D) dtype
  const void* erase;          // (G, T, erase_dim) dtype
  const int64_t* order;       // (CUDA) (E,)
  const int32_t* run_length;  // (CUDA) (E,)
  void* dmemory;              // (G, N, D) dtype
  void* dweights;             // (G, T, kw) dtype
};

// ---- local attention (the local half of memory_attention) ----

// Query t (of T) sits at position p = S - T + t of a context of S >= T keys and sees the keys j
// with p - window < j <= p; query head h uses kv head h / (H / Hkv). Per query row, with
// s_j = (scale * q) . k_j over the visible keys: lse = logsumexp_j s_j, out = sum_j exp(s_j - lse)
// v_j; a row with no visible key gets out = 0 and lse = -inf.
struct LocalAttentionFwdParams {
  Dtype dtype;          // of q, k, v, out
  int64_t batch;        // B
  int64_t heads;        // H
  int64_t kv_heads;     // Hkv, H % Hkv == 0
  int64_t seq_len;      // T
  int64_t context_len;  // S >= T
  int64_t dim;          // D
  int64_t dim_v;        // Dv
  int64_t window;       // keys p - window < j <= p; >= S means no window; <= 0 sees nothing
  double scale;
  const void* q;  // (B, H, T, D) dtype
  const void* k;  // (B, Hkv, S, D) dtype
  const void* v;  // (B, Hkv, S, Dv) dtype
  void* out;      // (B, H, T, Dv) dtype
  void* lse;      // (B, H, T) acc
};

// Gradients, FlashAttention-2 style: with P_ij = exp(s_ij - lse_i) and
// delta_i = <dout_i, out_i> - dlse_i,
//   dS_ij = P_ij * (<dout_i, v_j> - delta_i);  dq_i = scale * sum_j dS_ij k_j;
//   dk_j = sum_i dS_ij (scale * q_i);  dv_j = sum_i P_ij dout_i.
struct LocalAttentionBwdParams {
  Dtype dtype;  // of dout, q, k, v, out, dq, dk, dv
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;
  int64_t seq_len;
  int64_t context_len;
  int64_t dim;
  int64_t dim_v;
  int64_t window;
  double scale;
  const void* dout;  // (B, H, T, Dv) dtype
  const void* dlse;  // (B, H, T) acc
  const void* q;     // (B, H, T, D) dtype
  const void* k;     // (B, Hkv, S, D) dtype
  const void* v;     // (B, Hkv, S, Dv) dtype
  const void* out;   // (B, H, T, Dv) dtype
  const void* lse;   // (B, H, T) acc, the forward's
  void* delta;       // (CUDA) (B, H, T) acc scratch, written and read by the launcher's kernels
  void* dq;          // like q
  void* dk;          // like k (zero at keys no query sees)
  void* dv;          // like v
};

}  // namespace l2m
