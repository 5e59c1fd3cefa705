// Product-key memory read on CUDA (interface and limits: product_key.h; semantics:
// l2m_kernels/ops/product_key/reference.py; the Triton version, l2m_kernels/ops/product_key/
// triton.py, has the same structure).
//
// Forward, three launches (each hands its results to the next through global memory), nothing of
// size T x n_sub:
//   1. product_key_half_select_kernel, grid (row blocks x B x H, 2 halves), 4 warps: the block's
//      query rows (one (batch, head), kQueriesPerWarp per warp) are staged in shared memory as
//      float32; the half's n_sub sub-keys stream through shared memory in tiles of kTileN and are
//      shared by all the block's queries. Each lane scores kKeysPerLane sub-keys of the tile
//      against each of its warp's queries (CUDA-core FMAs in full float32, one sequential chain
//      over d, then times scale: "dot, then scale"), and every query keeps its running top-k_sub
//      as in topk_read.cu: int64 sort keys (order-preserving image of the float32 score in the
//      high word, NaN canonicalised to a positive quiet NaN so it ranks above +inf as in
//      torch.sort; 2**31 - 1 - index in the low word, so ties go to the smaller index), sorted
//      descending across the lanes; a batch of 32 candidates is merged (bitonic sort + merge with
//      shuffles) only when one beats the current k_sub-th best (warp vote). The sorted lists are
//      written to a (B*H*T, 2, k_sub) scratch (scores float32, ids int32).
//   2. product_key_candidates_kernel, one warp per query row: the k_sub x k_sub candidates
//      s1[i] + s2[j] at slot i * n_sub + j, 32 j's (one per lane) at a time, merged into a running
//      top-k list the same way. Both halves are sorted descending and float addition is monotone,
//      so s1[i] + s2[j0] bounds every candidate (i, j >= j0) and every later row: when it is
//      strictly below the current k-th best score (strictly: a rounding tie could still win on
//      the slot) the rest of the row, or every later row, is skipped. Then softmax / lse in
//      float32 (as torch: a NaN makes the row NaN; an infinite maximum is not subtracted in the
//      logsumexp) and indices / weights / lse are written.
//   3. product_key_out_kernel, one warp per output row (b, h, t), or (b, t) with sum_heads
//      summing the heads in head order (deterministic, no atomics): out = sum_m w_m *
//      values[idx_m] in float32, lanes splitting Dv in chunks of 32 * (16-byte vector) columns,
//      16-byte loads when Dv and the values pointer allow it. Dv is unlimited.
//
// Backward:
//   product_key_bwd_rows_kernel, one warp per query row: dw_m = dweights_m + <dout, v_m> (the
//     values gradient scattered with float32 atomics, written as per-entry rows, or left to the
//     segment kernel), ds_m, dq, and the sub-key gradient scattered with atomics or ds stored.
//   product_key_segment_kernel (deterministic mode): one warp per destination row sums its
//     entries in the order the caller sorted them (a stable sort: ops/product_key/plan.py): once for the
//     2 * H * n_sub sub-key rows, once for the n_sub ** 2 value rows (dense only).
//
// Numerics: inputs converted to float32 on load, float32 arithmetic, IEEE expf/logf (no
// --use_fast_math: merge_common.cuh refuses it), outputs rounded once on store.
#include <cstdint>

#include "merge_common.cuh"  // to_float / from_float, load_chunk, MergeDtype
#include "product_key.h"

namespace l2m {
namespace cuda {
namespace {

#include "warp_list.cuh"  // device helpers, given internal linkage here

using detail::from_float;
using detail::load_chunk;
using detail::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;                 // sub-keys per shared-memory tile
constexpr int kKeysPerLane = kTileN / 32;  // sub-keys each lane scores per tile
constexpr int kKeyRowPad = 4;              // floats of padding per sub-key row in shared memory
constexpr int kMaxHalfDimPerLane = static_cast<int>(kProductKeyMaxDimK / 2 / 32);  // 8
constexpr int kChunkPerLane = 8;           // columns per lane per chunk in the row loops
constexpr int kStaticSmemLimit = 48 * 1024;

// Queries per warp of the half selection: the lists take kQueriesPerWarp * K_PAD / 32 int64
// registers per lane (as topk_read.cu).
__host__ __device__ constexpr int queries_per_warp(int k_pad) {
  return k_pad <= 32 ? 8 : k_pad <= 64 ? 4 : 2;
}


// ---------------------------------------------------------------------------------------------
// Sort keys (warp_list.cuh), NaN unlike topk_read.cu: NaN becomes the positive quiet NaN
// 0x7fc00000, whose image lies above +inf's, so NaN ranks first (torch.sort, descending) and NaNs
// among themselves by index; decoding gives NaN back. -0.0 ties with +0.0.

__device__ __forceinline__ long long encode_key(float score, long long index) {
  int bits = __float_as_int(score);
  if (score != score) bits = 0x7fc00000;
  if (score == 0.0f) bits = 0;
  return pack_key(bits, index);
}

inline int round_up_int(int64_t value, int64_t multiple) {
  return static_cast<int>((value + multiple - 1) / multiple * multiple);
}

// Blocks for a grid-stride loop over `units` warps' worth of work (capped; the kernels stride).
inline unsigned stride_grid(int64_t units) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  const int64_t blocks = (units + kWarps - 1) / kWarps;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---------------------------------------------------------------------------------------------
// Forward 1: the top-k_sub of each half.

struct SelectLayout {
  int64_t num_row_blocks;  // cdiv(T, kBlockRows)
  int half_dim;            // Dh
  int half_dim_pad;        // Dh rounded up to 4 (float4 reads)
  int q_stride;            // floats per staged query row
  int key_stride;          // floats per staged sub-key row (padded: fewer bank conflicts)
  int key_offset;          // bytes to the sub-key tile
  int smem_bytes;
};

// Rows first .. first + tile_rows - 1 of a (count, dim) matrix of T with row stride src_stride,
// as float32 into a shared-memory tile of `padded` columns (row stride tile_stride); rows past
// `count` and columns past `dim` are 0. The block's warps take the rows round-robin.
template <typename T>
__device__ __forceinline__ void stage_rows(float* tile, int tile_rows, int tile_stride, int padded,
                                           const T* src, int64_t first, int64_t count,
                                           int64_t src_stride, int dim, int warp, int lane) {
  for (int i = warp; i < tile_rows; i += kWarps) {
    const int64_t row = first + i;
    for (int col = lane; col < padded; col += 32) {
      float x = 0.0f;
      if (row < count && col < dim) x = to_float<T>(src[row * src_stride + col]);
      tile[i * tile_stride + col] = x;
    }
  }
}

template <int kKsPad>
SelectLayout make_select_layout(const ProductKeyFwdParams& params) {
  constexpr int kBlockRows = kWarps * queries_per_warp(kKsPad);
  SelectLayout layout;
  layout.num_row_blocks = (params.seq_len + kBlockRows - 1) / kBlockRows;
  layout.half_dim = static_cast<int>(params.dim_k / 2);
  layout.half_dim_pad = round_up_int(layout.half_dim, 4);
  layout.q_stride = layout.half_dim_pad;
  layout.key_stride = layout.half_dim_pad + kKeyRowPad;
  const int q_bytes = kBlockRows * layout.q_stride * static_cast<int>(sizeof(float));
  const int key_bytes = kTileN * layout.key_stride * static_cast<int>(sizeof(float));
  layout.key_offset = round_up_int(q_bytes, 128);
  layout.smem_bytes = layout.key_offset + round_up_int(key_bytes, 128);
  return layout;
}

// Grid (num_row_blocks * B * H, 2), kThreads threads, layout.smem_bytes dynamic shared memory.
// (Minimum 1 block per SM in the launch bounds, as topk_read_fwd_kernel: the lists need the
// registers.)
template <typename T, int kKsPad>
__global__ void __launch_bounds__(kThreads, 1)
    product_key_half_select_kernel(const ProductKeyFwdParams params, const SelectLayout layout) {
  constexpr int kRegs = kKsPad / 32;
  constexpr int kQueriesPerWarp = queries_per_warp(kKsPad);
  constexpr int kBlockRows = kWarps * kQueriesPerWarp;
  extern __shared__ __align__(128) unsigned char select_smem[];
  float* q_tile = reinterpret_cast<float*>(select_smem);                         // [rows, Dh]
  float* key_tile = reinterpret_cast<float*>(select_smem + layout.key_offset);  // [kTileN, Dh]

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int half = static_cast<int>(blockIdx.y);  // 0 or 1
  const int64_t T_len = params.seq_len;
  const int64_t H = params.heads;
  const int64_t n_sub = params.n_sub;
  const int64_t dim_k = params.dim_k;
  const int half_dim = layout.half_dim;
  const int k_sub = static_cast<int>(params.k_sub);
  const float scale = static_cast<float>(params.scale);
  // 32-bit divisions (the launcher keeps the grid below 2**31).
  const unsigned num_row_blocks = static_cast<unsigned>(layout.num_row_blocks);
  const unsigned bh32 = blockIdx.x / num_row_blocks;  // b * H + h
  const int64_t bh = bh32;
  const int64_t h = bh32 % static_cast<unsigned>(H);
  const int64_t row0 = int64_t{blockIdx.x - bh32 * num_row_blocks} * kBlockRows;  // within T
  const T* __restrict__ q = static_cast<const T*>(params.q) + bh * T_len * dim_k + half * half_dim;
  const T* __restrict__ subkeys =
      static_cast<const T*>(params.subkeys) + (h * 2 + half) * n_sub * half_dim;

  // Queries as float32 (unscaled: the scale multiplies the dot product); padding is 0.
  stage_rows(q_tile, kBlockRows, layout.q_stride, layout.half_dim_pad, q, row0, T_len, dim_k,
             half_dim, warp, lane);

  long long top[kQueriesPerWarp][kRegs];  // per query: K_PAD keys, descending
  long long kth[kQueriesPerWarp];         // per query: the k_sub-th best so far
  bool row_valid[kQueriesPerWarp];
#pragma unroll
  for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
    for (int r = 0; r < kRegs; ++r) top[i][r] = kKeyMissing;
    kth[i] = kKeyMissing;
    row_valid[i] = row0 + warp * kQueriesPerWarp + i < T_len;
  }
  const int kth_reg = (k_sub - 1) >> 5;
  const int kth_lane = (k_sub - 1) & 31;

  for (int64_t n0 = 0; n0 < n_sub; n0 += kTileN) {  // uniform over the block
    __syncthreads();  // the previous tile is consumed (first time: the queries are staged)
    stage_rows(key_tile, kTileN, layout.key_stride, layout.half_dim_pad, subkeys, n0, n_sub,
               half_dim, half_dim, warp, lane);
    __syncthreads();

    // score[i][c]: query i of the warp against sub-key n0 + c * 32 + lane.
    float score[kQueriesPerWarp][kKeysPerLane];
#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c) score[i][c] = 0.0f;
    }
    const float* q_rows = q_tile + warp * kQueriesPerWarp * layout.q_stride;
    const float* key_rows = key_tile + lane * layout.key_stride;
    for (int d = 0; d < layout.half_dim_pad; d += 4) {
      float4 key_vec[kKeysPerLane];
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c)
        key_vec[c] = *reinterpret_cast<const float4*>(key_rows + c * 32 * layout.key_stride + d);
#pragma unroll
      for (int i = 0; i < kQueriesPerWarp; ++i) {
        const float4 q_vec = *reinterpret_cast<const float4*>(q_rows + i * layout.q_stride + d);
#pragma unroll
        for (int c = 0; c < kKeysPerLane; ++c) {
          score[i][c] = fmaf(q_vec.x, key_vec[c].x, score[i][c]);
          score[i][c] = fmaf(q_vec.y, key_vec[c].y, score[i][c]);
          score[i][c] = fmaf(q_vec.z, key_vec[c].z, score[i][c]);
          score[i][c] = fmaf(q_vec.w, key_vec[c].w, score[i][c]);
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c) {
        const int64_t sub = n0 + c * 32 + lane;
        const long long candidate = (row_valid[i] && sub < n_sub)
                                        ? encode_key(score[i][c] * scale, sub)
                                        : kKeyMissing;
        // Keys are distinct: a candidate enters the top k_sub iff it beats the k_sub-th best.
        if (__any_sync(kFullMask, candidate > kth[i])) {
          insert_candidates<kRegs>(top[i], candidate, lane);
          kth[i] = list_element<kRegs>(top[i], kth_reg, kth_lane);
        }
      }
    }
  }

  // The sorted lists (k_sub <= n_sub: every position < k_sub holds an existing sub-key).
#pragma unroll
  for (int i = 0; i < kQueriesPerWarp; ++i) {
    if (!row_valid[i]) continue;
    const int64_t row = bh * T_len + row0 + warp * kQueriesPerWarp + i;  // global (b, h, t)
    float* scores_out = params.half_scores + (row * 2 + half) * k_sub;
    int32_t* ids_out = params.half_ids + (row * 2 + half) * k_sub;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const int position = r * 32 + lane;
      if (position < k_sub) {
        const DecodedKey decoded = decode_key(top[i][r]);
        scores_out[position] = decoded.score;
        ids_out[position] = static_cast<int32_t>(decoded.exists ? decoded.index : 0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward 2: the k best candidates, softmax, lse.

// Grid-stride over the B*H*T query rows, one warp per row.
template <int kKPad>
__global__ void __launch_bounds__(kThreads)
    product_key_candidates_kernel(const ProductKeyFwdParams params) {
  constexpr int kRegs = kKPad / 32;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t n_sub = params.n_sub;
  const int k = static_cast<int>(params.k);
  const int k_sub = static_cast<int>(params.k_sub);
  const int kth_reg = (k - 1) >> 5;
  const int kth_lane = (k - 1) & 31;

  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    const float* __restrict__ s1 = params.half_scores + row * 2 * k_sub;
    const float* __restrict__ s2 = s1 + k_sub;
    const int32_t* __restrict__ id1 = params.half_ids + row * 2 * k_sub;
    const int32_t* __restrict__ id2 = id1 + k_sub;

    long long top[kRegs];
#pragma unroll
    for (int r = 0; r < kRegs; ++r) top[r] = kKeyMissing;
    long long kth = kKeyMissing;
    float kth_score = 0.0f;  // valid once kth != kKeyMissing
    const float s2_first = s2[0];

    for (int i = 0; i < k_sub; ++i) {  // uniform over the warp
      const float s1_i = s1[i];
      // Every candidate of this and every later row is <= s1[i] + s2[0] (sorted halves,
      // monotone addition; a NaN bound compares false and prunes nothing).
      if (kth != kKeyMissing && s1_i + s2_first < kth_score) break;
      const long long slot_base = static_cast<long long>(id1[i]) * n_sub;
      for (int j0 = 0; j0 < k_sub; j0 += 32) {
        if (kth != kKeyMissing && s1_i + s2[j0] < kth_score) break;
        const int j = j0 + lane;
        const long long candidate =
            j < k_sub ? encode_key(s1_i + s2[j], slot_base + id2[j]) : kKeyMissing;
        if (__any_sync(kFullMask, candidate > kth)) {
          insert_candidates<kRegs>(top, candidate, lane);
          kth = list_element<kRegs>(top, kth_reg, kth_lane);
          if (kth != kKeyMissing) kth_score = decode_key(kth).score;
        }
      }
    }

    // Softmax / logsumexp over the k winners, as torch: the list is sorted descending with NaN
    // first, so its first element is the row maximum (NaN if any score is NaN).
    float score[kRegs];
    long long slot[kRegs];
    bool live[kRegs];  // an existing candidate at a position < k (always, as k <= k_sub ** 2)
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const DecodedKey decoded = decode_key(top[r]);
      live[r] = decoded.exists && r * 32 + lane < k;
      score[r] = decoded.score;
      slot[r] = decoded.exists ? decoded.index : -1;
    }
    const DecodedKey first = decode_key(__shfl_sync(kFullMask, top[0], 0));
    const float row_max = first.exists ? first.score : -INFINITY;
    const bool infinite_max = isinf(row_max);
    float total = 0.0f, unshifted_total = 0.0f;
    float exp_terms[kRegs];
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      exp_terms[r] = live[r] ? expf(score[r] - row_max) : 0.0f;
      total += exp_terms[r];
      if (infinite_max && live[r]) unshifted_total += expf(score[r]);
    }
    total = warp_sum(total);
    int64_t* __restrict__ indices = params.indices + row * k;
    float* __restrict__ weights = static_cast<float*>(params.weights) + row * k;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const int position = r * 32 + lane;
      if (position < k) {
        indices[position] = slot[r];
        weights[position] = live[r] ? exp_terms[r] / total : 0.0f;
      }
    }
    float lse;
    if (infinite_max) {
      lse = logf(warp_sum(unshifted_total));
    } else {
      lse = row_max + logf(total);
    }
    if (lane == 0) static_cast<float*>(params.lse)[row] = lse;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward 3: out = sum_m w_m * values[idx_m] (summed over heads in order with sum_heads).

// Grid-stride over the output rows, one warp per row. kVector: Dv % kVec == 0 and 16-byte
// aligned values, so each lane loads kVec contiguous columns with one 16-byte load; else lanes
// take columns lane + 32 * u.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) product_key_out_kernel(const ProductKeyFwdParams params) {
  constexpr int kVec = kVector ? detail::VectorWidth<T>::value : kChunkPerLane;
  constexpr int kChunkCols = 32 * kVec;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t T_len = params.seq_len;
  const int64_t H = params.heads;
  const int64_t dim_v = params.dim_v;
  const int64_t num_slots = params.n_sub * params.n_sub;
  const int k = static_cast<int>(params.k);
  const bool sum_heads = params.sum_heads;
  const int64_t out_rows = sum_heads ? params.batch * T_len : params.batch * H * T_len;
  const int64_t heads_per_row = sum_heads ? H : 1;
  const T* __restrict__ values = static_cast<const T*>(params.values);
  T* __restrict__ out = static_cast<T*>(params.out);

  for (int64_t out_row = int64_t{blockIdx.x} * kWarps + warp; out_row < out_rows;
       out_row += int64_t{gridDim.x} * kWarps) {
    // First query row read into this output row, and the stride between heads.
    int64_t first_row = out_row, head_stride = 0;
    if (sum_heads) {
      const int64_t b = out_row / T_len;
      const int64_t t = out_row - b * T_len;
      first_row = b * H * T_len + t;
      head_stride = T_len;
    }
    for (int64_t c0 = 0; c0 < dim_v; c0 += kChunkCols) {
      float total[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) total[u] = 0.0f;
      for (int64_t hh = 0; hh < heads_per_row; ++hh) {  // head order, as the reference's sum
        const int64_t row = first_row + hh * head_stride;
        const int64_t* row_indices = params.indices + row * k;
        const float* row_weights = static_cast<const float*>(params.weights) + row * k;
        float head_acc[kVec];
#pragma unroll
        for (int u = 0; u < kVec; ++u) head_acc[u] = 0.0f;
        for (int m = 0; m < k; ++m) {
          const int64_t slot = row_indices[m];
          if (slot < 0 || slot >= num_slots) continue;  // uniform; never from our forward
          const float weight = row_weights[m];
          const T* value_row = values + slot * dim_v;
          if constexpr (kVector) {
            const int64_t col = c0 + lane * kVec;
            if (col < dim_v) {
              float chunk[kVec];
              load_chunk<T, kVec>(value_row + col, chunk);
#pragma unroll
              for (int u = 0; u < kVec; ++u) head_acc[u] = fmaf(weight, chunk[u], head_acc[u]);
            }
          } else {
#pragma unroll
            for (int u = 0; u < kVec; ++u) {
              const int64_t col = c0 + u * 32 + lane;
              if (col < dim_v)
                head_acc[u] = fmaf(weight, to_float<T>(value_row[col]), head_acc[u]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kVec; ++u) total[u] += head_acc[u];
      }
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const int64_t col = kVector ? c0 + lane * kVec + u : c0 + u * 32 + lane;
        if (col < dim_v) out[out_row * dim_v + col] = from_float<T>(total[u]);
      }
    }
  }
}

template <typename T, int kKsPad>
cudaError_t launch_select(const ProductKeyFwdParams& params, cudaStream_t stream) {
  const SelectLayout layout = make_select_layout<kKsPad>(params);
  const int64_t blocks = layout.num_row_blocks * params.batch * params.heads;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  auto kernel = product_key_half_select_kernel<T, kKsPad>;
  if (layout.smem_bytes > kStaticSmemLimit) {
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, layout.smem_bytes);
    if (status != cudaSuccess) return status;
  }
  kernel<<<dim3(static_cast<unsigned>(blocks), 2), kThreads, layout.smem_bytes, stream>>>(params,
                                                                                          layout);
  return cudaGetLastError();
}

cudaError_t launch_candidates(const ProductKeyFwdParams& params, cudaStream_t stream) {
  const unsigned grid = stride_grid(params.batch * params.heads * params.seq_len);
  if (params.k <= 32) {
    product_key_candidates_kernel<32><<<grid, kThreads, 0, stream>>>(params);
  } else if (params.k <= 64) {
    product_key_candidates_kernel<64><<<grid, kThreads, 0, stream>>>(params);
  } else if (params.k <= 128) {
    product_key_candidates_kernel<128><<<grid, kThreads, 0, stream>>>(params);
  } else {
    product_key_candidates_kernel<256><<<grid, kThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const ProductKeyFwdParams& params, cudaStream_t stream) {
  const int64_t rows = params.batch * params.heads * params.seq_len;
  if (rows > 0) {
    cudaError_t status = with_list_length(params.k_sub, [&](auto k_pad) {
      return launch_select<T, k_pad.value>(params, stream);
    });
    if (status != cudaSuccess) return status;
    status = launch_candidates(params, stream);
    if (status != cudaSuccess) return status;
  }
  const int64_t out_rows = params.sum_heads ? params.batch * params.seq_len : rows;
  if (out_rows <= 0 || params.dim_v == 0) return cudaSuccess;
  constexpr int kVec = detail::VectorWidth<T>::value;
  const bool vector = params.dim_v % kVec == 0 &&
                      (reinterpret_cast<uintptr_t>(params.values) & 15) == 0;
  if (vector) {
    product_key_out_kernel<T, true><<<stride_grid(out_rows), kThreads, 0, stream>>>(params);
  } else {
    product_key_out_kernel<T, false><<<stride_grid(out_rows), kThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Grid-stride over the B*H*T query rows, one warp per row; lanes split Dv (strided loops, any
// Dv) and each half of Dk (Dh <= 256: kMaxHalfDimPerLane registers per half).
// (Minimum 1 block per SM in the launch bounds: with the default ptxas spilled 8 bytes of the
// float32 variant on sm_80.)
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    product_key_bwd_rows_kernel(const ProductKeyBwdParams params) {
  __shared__ float dw_scratch[kWarps][kProductKeyMaxK];  // dw_m of the warp's current row

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t T_len = params.seq_len;
  const int64_t H = params.heads;
  const int64_t rows = params.batch * H * T_len;
  const int64_t n_sub = params.n_sub;
  const int64_t num_slots = n_sub * n_sub;
  const int64_t dim_k = params.dim_k;
  const int64_t half_dim = dim_k / 2;
  const int64_t dim_v = params.dim_v;
  const int k = static_cast<int>(params.k);
  const float scale = static_cast<float>(params.scale);
  const bool atomic = !params.deterministic;
  const bool sparse = params.sparse_grad;
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const T* __restrict__ q = static_cast<const T*>(params.q);
  const T* __restrict__ values = static_cast<const T*>(params.values);
  float* dw_row = dw_scratch[warp];

  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    // 32-bit divisions (rows < 2**31, checked by the launcher).
    const unsigned bh32 = static_cast<unsigned>(row) / static_cast<unsigned>(T_len);
    const int64_t t = row - int64_t{bh32} * T_len;
    const int64_t h = bh32 % static_cast<unsigned>(H);
    const int64_t b = bh32 / static_cast<unsigned>(H);
    const T* dout_row = dout + (params.sum_heads ? b * T_len + t : row) * dim_v;
    const T* __restrict__ subkeys0 = static_cast<const T*>(params.subkeys) + h * 2 * n_sub * half_dim;
    const T* __restrict__ subkeys1 = subkeys0 + n_sub * half_dim;
    const int64_t* row_indices = params.indices + row * k;
    const float* row_weights = static_cast<const float*>(params.weights) + row * k;
    const float* row_dweights = static_cast<const float*>(params.dweights) + row * k;

    // Pass 1: dw_m (identical in every lane), sum_m w_m dw_m, and the values gradient.
    float weighted_dw = 0.0f;
    for (int m = 0; m < k; ++m) {
      const int64_t slot = row_indices[m];
      const bool live = slot >= 0 && slot < num_slots;  // uniform over the warp
      const float weight = row_weights[m];
      if (sparse) {  // every entry gets its row w_m * dout (as the reference's rows)
        T* grad_row = static_cast<T*>(params.dvalues_rows) + (row * k + m) * dim_v;
        for (int64_t col = lane; col < dim_v; col += 32)
          grad_row[col] = from_float<T>(weight * to_float<T>(dout_row[col]));
      }
      float dw = 0.0f;
      if (live) {
        const T* value_row = values + slot * dim_v;
        float dot = 0.0f;
        for (int64_t col = lane; col < dim_v; col += 32) {
          const float g = to_float<T>(dout_row[col]);
          dot = fmaf(g, to_float<T>(value_row[col]), dot);
          if (atomic && !sparse) atomicAdd(params.dvalues_acc + slot * dim_v + col, weight * g);
        }
        dw = row_dweights[m] + warp_sum(dot);
        weighted_dw += weight * dw;
      }
      if (lane == 0) dw_row[m] = dw;
    }
    __syncwarp();

    // Pass 2: ds_m, dq, and the sub-key gradient (atomics) or ds (deterministic).
    const float dlse = static_cast<const float*>(params.dlse)[row];
    const T* q_row = q + row * dim_k;
    float q0[kMaxHalfDimPerLane], q1[kMaxHalfDimPerLane];
    float dq0[kMaxHalfDimPerLane], dq1[kMaxHalfDimPerLane];
#pragma unroll
    for (int u = 0; u < kMaxHalfDimPerLane; ++u) {
      const int64_t col = lane + 32 * u;
      q0[u] = col < half_dim ? to_float<T>(q_row[col]) : 0.0f;
      q1[u] = col < half_dim ? to_float<T>(q_row[half_dim + col]) : 0.0f;
      dq0[u] = 0.0f;
      dq1[u] = 0.0f;
    }
    for (int m = 0; m < k; ++m) {
      const int64_t slot = row_indices[m];
      float ds = 0.0f;
      if (slot >= 0 && slot < num_slots) {  // uniform over the warp
        ds = row_weights[m] * (dw_row[m] - weighted_dw + dlse);
        const int64_t sub0 = slot / n_sub;
        const int64_t sub1 = slot - sub0 * n_sub;
        const T* key0 = subkeys0 + sub0 * half_dim;
        const T* key1 = subkeys1 + sub1 * half_dim;
        const float scaled_ds = scale * ds;
#pragma unroll
        for (int u = 0; u < kMaxHalfDimPerLane; ++u) {
          const int64_t col = lane + 32 * u;
          if (col < half_dim) {
            dq0[u] = fmaf(ds, to_float<T>(key0[col]), dq0[u]);
            dq1[u] = fmaf(ds, to_float<T>(key1[col]), dq1[u]);
            if (atomic) {
              float* acc0 = params.dsubkeys_acc + (h * 2 * n_sub + sub0) * half_dim;
              float* acc1 = params.dsubkeys_acc + ((h * 2 + 1) * n_sub + sub1) * half_dim;
              atomicAdd(acc0 + col, scaled_ds * q0[u]);
              atomicAdd(acc1 + col, scaled_ds * q1[u]);
            }
          }
        }
      }
      if (!atomic && lane == 0) params.ds[row * k + m] = ds;
    }
    T* __restrict__ dq_row = static_cast<T*>(params.dq) + row * dim_k;
#pragma unroll
    for (int u = 0; u < kMaxHalfDimPerLane; ++u) {
      const int64_t col = lane + 32 * u;
      if (col < half_dim) {
        dq_row[col] = from_float<T>(scale * dq0[u]);
        dq_row[half_dim + col] = from_float<T>(scale * dq1[u]);
      }
    }
    __syncwarp();  // dw_row is rewritten for the next row
  }
}

// Deterministic segment sums: grid-stride over the destination rows, one warp per row, columns
// in chunks of 32 * kChunkPerLane (any dim), entries in the caller's order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    product_key_segment_kernel(const ProductKeySegmentParams params) {
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t dim = params.dim;
  const float scale = static_cast<float>(params.scale);
  const T* __restrict__ src = static_cast<const T*>(params.src);
  T* __restrict__ dst = static_cast<T*>(params.dst);

  for (int64_t dst_row = int64_t{blockIdx.x} * kWarps + warp; dst_row < params.num_dst;
       dst_row += int64_t{gridDim.x} * kWarps) {
    const int64_t entry_begin = params.run_starts[dst_row];
    const int64_t entry_end = params.run_starts[dst_row + 1];
    for (int64_t c0 = 0; c0 < dim; c0 += 32 * kChunkPerLane) {
      float acc[kChunkPerLane];
#pragma unroll
      for (int u = 0; u < kChunkPerLane; ++u) acc[u] = 0.0f;
      for (int64_t e = entry_begin; e < entry_end; ++e) {  // the caller's (stable) order
        const int64_t coef_index = params.entry_coef[e];
        const int64_t src_row = params.entry_src[e];
        if (coef_index < 0 || coef_index >= params.num_coef || src_row < 0 ||
            src_row >= params.num_src)
          continue;  // uniform; never happens with the caller's arrays
        const float coef = params.coef[coef_index];
        const T* src_values = src + src_row * dim;
#pragma unroll
        for (int u = 0; u < kChunkPerLane; ++u) {
          const int64_t col = c0 + u * 32 + lane;
          if (col < dim) acc[u] = fmaf(coef, to_float<T>(src_values[col]), acc[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kChunkPerLane; ++u) {
        const int64_t col = c0 + u * 32 + lane;
        if (col < dim) dst[dst_row * dim + col] = from_float<T>(scale * acc[u]);
      }
    }
  }
}

// The backward kernels, one launch each (for L2M_CUDA_DISPATCH).
template <typename T>
cudaError_t launch_bwd_rows(const ProductKeyBwdParams& params, unsigned grid, cudaStream_t stream) {
  product_key_bwd_rows_kernel<T><<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_segment(const ProductKeySegmentParams& params, unsigned grid,
                           cudaStream_t stream) {
  product_key_segment_kernel<T><<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

bool valid_sizes(int64_t batch, int64_t heads, int64_t seq_len, int64_t dim_k, int64_t n_sub,
                 int64_t dim_v) {
  if (batch < 0 || heads < 0 || seq_len < 0 || dim_k < 0 || dim_v < 0 || n_sub < 1) return false;
  if (dim_k % 2 != 0 || dim_k > kProductKeyMaxDimK) return false;
  if (n_sub > 46340) return false;  // n_sub ** 2 < 2**31 (46341 ** 2 > 2**31 - 1)
  if (n_sub * n_sub > kProductKeyMaxSlots) return false;
  // B * H * T < 2**31 query rows (32-bit row divisions and grids).
  if (batch > 0 && heads > 0 && seq_len > 0) {
    if (batch > 0x7fffffffLL || heads > 0x7fffffffLL || seq_len > 0x7fffffffLL) return false;
    if (batch * heads > 0x7fffffffLL || batch * heads * seq_len > 0x7fffffffLL) return false;
  }
  if (batch > 0x7fffffffLL || seq_len > 0x7fffffffLL || batch * seq_len > 0x7fffffffLL) {
    return false;
  }
  return true;
}

}  // namespace

cudaError_t product_key_fwd_launch(const ProductKeyFwdParams& params, cudaStream_t stream) {
  if (!valid_sizes(params.batch, params.heads, params.seq_len, params.dim_k, params.n_sub,
                   params.dim_v))
    return cudaErrorInvalidValue;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t out_rows = params.sum_heads ? params.batch * params.seq_len : rows;
  if (rows == 0 && out_rows == 0) return cudaSuccess;
  if (params.k < 1 || params.k > kProductKeyMaxK || params.k_sub < 1 ||
      params.k_sub > kProductKeyMaxKSub || params.k_sub > params.n_sub ||
      params.k > params.k_sub * params.k_sub)
    return cudaErrorInvalidValue;
  if (out_rows > 0 && params.dim_v > 0 && (params.values == nullptr || params.out == nullptr))
    return cudaErrorInvalidValue;
  if (rows > 0 && ((params.dim_k > 0 && (params.q == nullptr || params.subkeys == nullptr)) ||
                   params.indices == nullptr || params.weights == nullptr ||
                   params.lse == nullptr || params.half_scores == nullptr ||
                   params.half_ids == nullptr))
    return cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_fwd, params, stream);
}

cudaError_t product_key_bwd_launch(const ProductKeyBwdParams& params, cudaStream_t stream) {
  if (!valid_sizes(params.batch, params.heads, params.seq_len, params.dim_k, params.n_sub,
                   params.dim_v))
    return cudaErrorInvalidValue;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  if (rows == 0) return cudaSuccess;
  if (params.k < 1 || params.k > kProductKeyMaxK) return cudaErrorInvalidValue;
  // Pointers of tensors without elements may be null (Dk == 0 or Dv == 0).
  if (params.dweights == nullptr || params.dlse == nullptr || params.indices == nullptr ||
      params.weights == nullptr ||
      (params.dim_k > 0 && (params.q == nullptr || params.subkeys == nullptr ||
                            params.dq == nullptr)) ||
      (params.dim_v > 0 && (params.dout == nullptr || params.values == nullptr)))
    return cudaErrorInvalidValue;
  if (params.deterministic ? params.ds == nullptr : params.dsubkeys_acc == nullptr)
    return cudaErrorInvalidValue;
  if (params.sparse_grad ? (params.dvalues_rows == nullptr && params.dim_v > 0)
                         : (!params.deterministic && params.dvalues_acc == nullptr &&
                            params.dim_v > 0))
    return cudaErrorInvalidValue;
  const unsigned grid = stride_grid(rows);
  L2M_CUDA_DISPATCH(params.dtype, launch_bwd_rows, params, grid, stream);
}

cudaError_t product_key_segment_launch(const ProductKeySegmentParams& params,
                                       cudaStream_t stream) {
  if (params.num_dst < 0 || params.num_src < 0 || params.num_coef < 0 || params.dim < 0)
    return cudaErrorInvalidValue;
  if (params.num_dst == 0 || params.dim == 0) return cudaSuccess;
  if (params.run_starts == nullptr || params.dst == nullptr ||
      (params.num_src > 0 && params.src == nullptr) ||
      (params.num_coef > 0 && params.coef == nullptr))
    return cudaErrorInvalidValue;
  // With no entries at all the arrays may be empty (nullptr); the runs are then all empty.
  const unsigned grid = stride_grid(params.num_dst);
  L2M_CUDA_DISPATCH(params.dtype, launch_segment, params, grid, stream);
}

}  // namespace cuda
}  // namespace l2m
