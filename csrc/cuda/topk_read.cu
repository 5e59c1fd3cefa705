// Sparse top-k memory read on CUDA (interface and limits: topk_read.h; semantics:
// l2m_kernels/ops/topk_read/reference.py).
//
// Forward, no T x N buffer (in the spirit of faiss' WarpSelect), one or two kernels:
//   A block of kWarps warps owns kBlockRows consecutive query rows of one (batch, memory head):
//   the H / Hm query heads sharing a memory head are contiguous in q (B, H, T, Dk), so a memory
//   head owns R = (H / Hm) * T contiguous rows. The block's queries sit in shared memory; key
//   tiles of kTileN slots are streamed through shared memory and reused by every query of the
//   block. Scoring (score_tile, the same code in both kernels, so their keys are bit-identical):
//   - float16 / bfloat16: the (queries x slots) tile by tensor-core mma (nvcuda::wmma 16x16x16,
//     float32 accumulation; blocks of 8 rows pad the mma to 16 with zero rows) into a float32
//     score tile in shared memory; each warp reads back its queries' rows, times scale.
//   - float32: CUDA-core FMAs in full precision (rows padded by 4 floats so the per-lane float4
//     reads of different rows hit different banks): each lane scores kKeysPerLane slots
//     (n0 + c * 32 + lane) against each of its warp's kQueriesPerWarp queries, register-blocked
//     over queries x slots, one sequential FMA chain over d per score.
//   Either way a score depends only on its query and slot, not on where they sit in a tile.
//
//   Threshold pre-pass (topk_read_chunk_max_kernel, optional): the same blocks and scoring write
//   the maximum sort key of every (row, chunk of kTopkReadChunkSlots slots); the launcher takes
//   tau = the k-th largest chunk maximum of each row (a lower bound on the row's k-th best key:
//   exactly k chunks reach it). The selection kernel then starts each row's gate at tau - 1, so
//   an online top-k that would merge ~k * ln(N / k) times per query merges about k times.
//
//   Selection (topk_read_fwd_kernel): each warp keeps, per query, the running top list of K_PAD
//   (32..256, >= k) int64 sort keys, sorted descending, distributed over the lanes: element
//   i = r * 32 + lane is register r of lane `lane`. A sort key is the order-preserving int32
//   image of the float32 score in the high word (NaN first mapped to +inf, -0.0 to +0.0) and
//   2**31 - 1 - slot in the low word (as the Triton kernel), so "larger key" is exactly "higher
//   score, then smaller slot", the keys of one query are distinct, and non-existent slots get
//   INT64_MIN. A batch of 32 candidates (one per lane) is merged only when one of them beats the
//   query's gate, max(k-th best so far, tau - 1) (a warp vote): the candidates are bitonic-sorted
//   ascending across the lanes, the elementwise maximum with the last 32 list elements (the
//   list's other elements face INT64_MIN padding) leaves the K_PAD largest keys of both as a
//   bitonic sequence, and a bitonic merge sorts it descending (strides
//   >= 32 are register swaps inside a lane, < 32 are __shfl_xor_sync).
//
//   After the last tile the warp decodes its lists, forms the softmax / log-sum-exp over the k
//   winners and out = sum_j w_j * values[idx_j] (float32), lanes splitting Dv.
//
// Backward:
//   topk_read_bwd_rows_kernel: one warp per query row, lanes splitting the feature dimension.
//     Pass 1 over the row's k entries: dw_j = dweights_j + <dout, v_j> (warp butterfly sum) kept
//     in shared memory, and sum_j w_j dw_j; atomic mode also scatters w_j * dout into dvalues.
//     Pass 2: ds_j, dq = scale * sum_j ds_j key_j; atomic mode scatters scale * ds_j * q into
//     dkeys, deterministic mode stores ds_j.
//   topk_read_bwd_slot_kernel (deterministic mode): one warp per slot sums the slot's entries in
//     the order the caller sorted them (stable, by slot) and writes every slot row.
//
// Numerics: inputs converted to float32 on load (16-bit scores: exact products, float32
// accumulation in the tensor cores), float32 arithmetic, IEEE expf/logf (no
// --use_fast_math: merge_common.cuh refuses it), outputs rounded once on store.
#include <cstdint>
#include <type_traits>

#include <mma.h>

#include "merge_common.cuh"  // to_float / from_float, MergeDtype
#include "topk_read.h"

namespace l2m {
namespace cuda {
namespace {

#include "warp_list.cuh"  // device helpers, given internal linkage here

using detail::from_float;
using detail::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;                   // slots per key tile
constexpr int kKeysPerLane = kTileN / 32;    // slots each lane scores per tile
constexpr int kMaxDimPerLane = static_cast<int>(kTopkReadMaxDim / 32);  // feature registers
constexpr int kKeyRowPad = 4;                // floats of padding per key row in shared memory
constexpr int kStaticSmemLimit = 48 * 1024;

// Queries per warp: the lists take kQueriesPerWarp * K_PAD / 32 int64 registers per lane.
__host__ __device__ constexpr int queries_per_warp(int k_pad) { return k_pad <= 32 ? 8 : k_pad <= 64 ? 4 : 2; }


// ---------------------------------------------------------------------------------------------
// Sort keys (warp_list.cuh; see the file comment).

__device__ __forceinline__ long long encode_key(float score, long long slot) {
  if (score != score) score = INFINITY;  // NaN ranks like +inf
  if (score == 0.0f) score = 0.0f;       // -0.0 ties with +0.0
  return pack_key(__float_as_int(score), slot);
}


// ---------------------------------------------------------------------------------------------
// Forward: scoring (shared by the chunk-max pre-pass and the selection kernel, so that both see
// bit-identical keys), the pre-pass, the selection kernel.

// Shared-memory layout of a forward block (both kernels of one <T, kKPad> use the same one).
struct FwdLayout {
  int64_t rows_per_memory;  // R = (H / Hm) * T
  int64_t num_row_blocks;   // cdiv(R, kBlockRows)
  int64_t num_chunks;       // cdiv(N, kTopkReadChunkSlots) (pre-pass output columns)
  int q_stride;             // elements per query row in the query tile
  int key_stride;           // elements per slot row in the key tile
  int dim_k_pad;            // Dk rounded up: to 4 (float32), to 16 (16-bit, the mma depth)
  int key_offset;           // bytes from the start of shared memory to the key tile
  int score_offset;         // bytes to the score tile (16-bit only)
  int entry_offset;         // bytes to the per-warp winner lists (selection kernel only)
  int smem_bytes;           // total dynamic shared memory
};

constexpr int kScoreStride = kTileN + 4;  // floats per query row of the 16-bit score tile
constexpr int kTopkChunk = static_cast<int>(kTopkReadChunkSlots);
static_assert(kTopkChunk % kTileN == 0, "a chunk is a whole number of key tiles");

template <typename T>
struct FwdTraits {
  // float16 / bfloat16: tensor cores (16x16x16, float32 accumulation); float32: CUDA-core FMAs
  // in full precision (no TF32).
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
};

// Rows of the query tile: kBlockRows, or 16 (the mma height) for the 8-row blocks.
__host__ __device__ constexpr int mma_rows(int block_rows) {
  return block_rows < 16 ? 16 : block_rows;
}

inline int round_up_int(int64_t value, int64_t multiple) {
  return static_cast<int>((value + multiple - 1) / multiple * multiple);
}

template <typename T, int kKPad>
FwdLayout make_fwd_layout(const TopkReadFwdParams& params) {
  constexpr int kBlockRows = kWarps * queries_per_warp(kKPad);
  FwdLayout layout;
  layout.rows_per_memory = (params.heads / params.mem_heads) * params.seq_len;
  layout.num_row_blocks = (layout.rows_per_memory + kBlockRows - 1) / kBlockRows;
  layout.num_chunks = (params.num_slots + kTopkChunk - 1) / kTopkChunk;
  int q_bytes, key_bytes, score_bytes;
  if (FwdTraits<T>::kTensorCores) {
    // Strides of dim_k_pad + 8 elements: 16-byte rows offset by 4 banks, multiples of 8
    // elements (wmma's ldm), and every 16-row fragment 32-byte aligned.
    layout.dim_k_pad = round_up_int(params.dim_k, 16);
    layout.q_stride = layout.dim_k_pad + 8;
    layout.key_stride = layout.dim_k_pad + 8;
    q_bytes = mma_rows(kBlockRows) * layout.q_stride * static_cast<int>(sizeof(T));
    key_bytes = kTileN * layout.key_stride * static_cast<int>(sizeof(T));
    score_bytes = mma_rows(kBlockRows) * kScoreStride * static_cast<int>(sizeof(float));
  } else {
    // float32 rows padded by kKeyRowPad floats: per-lane float4 reads of different rows hit
    // different banks.
    layout.dim_k_pad = round_up_int(params.dim_k, 4);
    layout.q_stride = layout.dim_k_pad;
    layout.key_stride = layout.dim_k_pad + kKeyRowPad;
    q_bytes = kBlockRows * layout.q_stride * static_cast<int>(sizeof(float));
    key_bytes = kTileN * layout.key_stride * static_cast<int>(sizeof(float));
    score_bytes = 0;
  }
  // Sections 128-byte aligned (wmma wants 32).
  layout.key_offset = round_up_int(q_bytes, 128);
  layout.score_offset = layout.key_offset + round_up_int(key_bytes, 128);
  layout.entry_offset = layout.score_offset + round_up_int(score_bytes, 128);
  layout.smem_bytes = layout.entry_offset +
                      static_cast<int>((sizeof(long long) + sizeof(float)) * kWarps * kKPad);
  return layout;
}

// Which rows / memory / slots a forward block serves (block = (b * Hm + hm) * blocks + rb).
struct FwdBlock {
  int64_t bh;     // b * Hm + hm
  int64_t b;
  int64_t memory;  // index of the key / value memory
  int64_t row0;   // first row of the block within the memory head's R rows
  int64_t n_end;  // existing slots: [0, n_end)
};

__device__ __forceinline__ FwdBlock fwd_block(const TopkReadFwdParams& params,
                                              const FwdLayout& layout, int block_rows) {
  // 32-bit divisions (the launcher keeps the grid below 2**31): a 64-bit division is a
  // subroutine call whose saved registers ptxas puts in a stack frame.
  FwdBlock info;
  const unsigned block = blockIdx.x;
  const unsigned num_row_blocks = static_cast<unsigned>(layout.num_row_blocks);
  const unsigned bh32 = block / num_row_blocks;  // b * Hm + hm
  info.bh = bh32;
  const int64_t row_block = block - bh32 * num_row_blocks;
  info.b = bh32 / static_cast<unsigned>(params.mem_heads);
  info.memory = params.shared_memory ? info.bh - info.b * params.mem_heads : info.bh;
  info.row0 = row_block * block_rows;
  const int64_t N = params.num_slots;
  info.n_end = N;
  if (params.valid_len != nullptr) {
    const int64_t length = params.valid_len[info.b];
    info.n_end = length < 0 ? 0 : (length > N ? N : length);
  }
  return info;
}

// Stages the block's queries in shared memory: float32 with the scale folded in (as the
// reference's q.float() * scale), or the raw 16-bit values; rows past R, padding columns and
// (16-bit) the extra mma rows are 0. 16-bit: also zeroes the key tile's padding columns, which
// the tile loads never write. Callers __syncthreads before reading.
template <typename T, int kBlockRows>
__device__ __forceinline__ void stage_queries(unsigned char* smem, const FwdLayout& layout,
                                              const T* __restrict__ q, int64_t row0, int64_t R,
                                              int64_t dim_k, float scale, int warp, int lane) {
  if constexpr (FwdTraits<T>::kTensorCores) {
    T* q_tile = reinterpret_cast<T*>(smem);
    for (int i = warp; i < mma_rows(kBlockRows); i += kWarps) {
      const int64_t row = row0 + i;
      const bool exists = i < kBlockRows && row < R;
      for (int col = lane; col < layout.dim_k_pad; col += 32) {
        q_tile[i * layout.q_stride + col] =
            (exists && col < dim_k) ? q[row * dim_k + col] : from_float<T>(0.0f);
      }
    }
    T* key_tile = reinterpret_cast<T*>(smem + layout.key_offset);
    for (int r = warp; r < kTileN; r += kWarps) {
      for (int col = static_cast<int>(dim_k) + lane; col < layout.dim_k_pad; col += 32)
        key_tile[r * layout.key_stride + col] = from_float<T>(0.0f);
    }
  } else {
    float* q_tile = reinterpret_cast<float*>(smem);
    for (int i = warp; i < kBlockRows; i += kWarps) {
      const int64_t row = row0 + i;
      for (int col = lane; col < layout.dim_k_pad; col += 32) {
        float x = 0.0f;
        if (row < R && col < dim_k) x = to_float<T>(q[row * dim_k + col]) * scale;
        q_tile[i * layout.q_stride + col] = x;
      }
    }
  }
}

// Loads key tile [n0, n0 + kTileN) into shared memory (slots >= n_end as 0). The tile is a
// contiguous span of kTileN * Dk elements in global memory, copied by the whole block.
template <typename T>
__device__ __forceinline__ void load_key_tile(unsigned char* smem, const FwdLayout& layout,
                                              const T* __restrict__ keys, int64_t n0,
                                              int64_t n_end, int dim_k, bool vectorized) {
  const int thread = static_cast<int>(threadIdx.x);
  if constexpr (FwdTraits<T>::kTensorCores) {
    T* key_tile = reinterpret_cast<T*>(smem + layout.key_offset);
    if (vectorized) {  // dim_k % 8 == 0 (> 0) and 16-byte aligned keys: 16-byte copies
      const int vectors_per_row = dim_k >> 3;
      for (int v = thread; v < kTileN * vectors_per_row; v += kThreads) {
        const int r = v / vectors_per_row;
        const int col = (v - r * vectors_per_row) << 3;
        const int64_t slot = n0 + r;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (slot < n_end) x = *reinterpret_cast<const uint4*>(keys + slot * dim_k + col);
        *reinterpret_cast<uint4*>(key_tile + r * layout.key_stride + col) = x;
      }
    } else {
      for (int e = thread; e < kTileN * dim_k; e += kThreads) {
        const int r = e / dim_k;
        const int col = e - r * dim_k;
        const int64_t slot = n0 + r;
        key_tile[r * layout.key_stride + col] =
            slot < n_end ? keys[slot * dim_k + col] : from_float<T>(0.0f);
      }
    }
  } else {
    float* key_tile = reinterpret_cast<float*>(smem + layout.key_offset);
    const int warp = thread >> 5;
    const int lane = thread & 31;
    for (int r = warp; r < kTileN; r += kWarps) {
      const int64_t slot = n0 + r;
      const bool exists = slot < n_end;
      for (int col = lane; col < layout.dim_k_pad; col += 32) {
        float x = 0.0f;
        if (exists && col < dim_k) x = to_float<T>(keys[slot * dim_k + col]);
        key_tile[r * layout.key_stride + col] = x;
      }
    }
  }
}

// Scores of the current key tile: score[i][c] of the warp's query i and slot n0 + c * 32 + lane.
// Each score depends only on its query and its slot (not on where they sit in the tiles, nor on
// the kernel that asks), so the pre-pass and the selection kernel compute identical keys.
//   float32: (scale * q) . key, one sequential FMA chain over d in every lane.
//   16-bit: scale * (q . key): the block's (queries x slots) tile by tensor-core mma (float32
//     accumulation over 16-deep steps of d) into the shared score tile, then read back.
// Every thread of the block must call it (16-bit: it contains a __syncthreads).
template <typename T, int kBlockRows, int kQueriesPerWarp>
__device__ __forceinline__ void score_tile(unsigned char* smem, const FwdLayout& layout,
                                           float scale, int warp, int lane,
                                           float (&score)[kQueriesPerWarp][kKeysPerLane]) {
  if constexpr (FwdTraits<T>::kTensorCores) {
    constexpr int kRowFrags = mma_rows(kBlockRows) / 16;
    constexpr int kColFrags = kTileN / 16;
    static_assert(mma_rows(kBlockRows) % 16 == 0, "mma rows");
    const T* q_tile = reinterpret_cast<const T*>(smem);
    const T* key_tile = reinterpret_cast<const T*>(smem + layout.key_offset);
    float* score_tile_smem = reinterpret_cast<float*>(smem + layout.score_offset);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    for (int f = warp; f < kRowFrags * kColFrags; f += kWarps) {
      const int m = f / kColFrags;
      const int n = f - m * kColFrags;
      nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
      nvcuda::wmma::fill_fragment(acc, 0.0f);
      for (int d = 0; d < layout.dim_k_pad; d += 16) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> a;
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> b;
        nvcuda::wmma::load_matrix_sync(a, q_tile + m * 16 * layout.q_stride + d, layout.q_stride);
        nvcuda::wmma::load_matrix_sync(b, key_tile + n * 16 * layout.key_stride + d,
                                       layout.key_stride);
        nvcuda::wmma::mma_sync(acc, a, b, acc);
      }
      nvcuda::wmma::store_matrix_sync(score_tile_smem + m * 16 * kScoreStride + n * 16, acc,
                                      kScoreStride, nvcuda::wmma::mem_row_major);
    }
#else
    // Older architectures (not built by default): the same tile with CUDA-core FMAs.
    for (int e = static_cast<int>(threadIdx.x); e < mma_rows(kBlockRows) * kTileN;
         e += kThreads) {
      const int m = e / kTileN;
      const int n = e - m * kTileN;
      float acc = 0.0f;
      for (int d = 0; d < layout.dim_k_pad; ++d)
        acc = fmaf(to_float<T>(q_tile[m * layout.q_stride + d]),
                   to_float<T>(key_tile[n * layout.key_stride + d]), acc);
      score_tile_smem[m * kScoreStride + n] = acc;
    }
#endif
    __syncthreads();  // the score tile is complete
    const float* rows = score_tile_smem + warp * kQueriesPerWarp * kScoreStride + lane;
#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c) score[i][c] = rows[i * kScoreStride + c * 32] * scale;
    }
  } else {
    (void)scale;
    const float* q_rows =
        reinterpret_cast<const float*>(smem) + warp * kQueriesPerWarp * layout.q_stride;
    const float* key_rows =
        reinterpret_cast<const float*>(smem + layout.key_offset) + lane * layout.key_stride;
#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c) score[i][c] = 0.0f;
    }
    for (int d = 0; d < layout.dim_k_pad; d += 4) {
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
  }
}

// Whether the 16-bit key tiles can be copied in 16-byte vectors.
template <typename T>
__device__ __forceinline__ bool keys_vectorizable(const void* keys, int64_t dim_k) {
  return FwdTraits<T>::kTensorCores && dim_k > 0 && dim_k % 8 == 0 &&
         (reinterpret_cast<uintptr_t>(keys) & 15) == 0;
}

__device__ __forceinline__ long long warp_max_key(long long value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value = max_key(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// Pre-pass: chunk_max[row, ch] = the largest sort key of query row `row` over the slots
// [ch * C, (ch + 1) * C) (C = kTopkReadChunkSlots), INT64_MIN where none exists.
// Same grid, block and shared memory as topk_read_fwd_kernel<T, kKPad> (minus the winner lists).
// (Minimum 1 block per SM in the launch bounds, as for the selection kernel: with the default,
// ptxas spilled a few bytes of the float32 variants on sm_90.)
template <typename T, int kKPad>
__global__ void __launch_bounds__(kThreads, 1)
    topk_read_chunk_max_kernel(const TopkReadFwdParams params, const FwdLayout layout,
                               long long* __restrict__ chunk_max) {
  constexpr int kQueriesPerWarp = queries_per_warp(kKPad);
  constexpr int kBlockRows = kWarps * kQueriesPerWarp;
  extern __shared__ __align__(128) unsigned char topk_fwd_smem[];

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t R = layout.rows_per_memory;
  const int64_t N = params.num_slots;
  const int64_t dim_k = params.dim_k;
  const int64_t num_chunks = layout.num_chunks;
  const float scale = static_cast<float>(params.scale);
  const FwdBlock info = fwd_block(params, layout, kBlockRows);
  const T* __restrict__ q = static_cast<const T*>(params.q) + info.bh * R * dim_k;
  const T* __restrict__ keys = static_cast<const T*>(params.keys) + info.memory * N * dim_k;
  const bool vectorized = keys_vectorizable<T>(params.keys, dim_k);

  stage_queries<T, kBlockRows>(topk_fwd_smem, layout, q, info.row0, R, dim_k, scale, warp, lane);

  // This lane writes the chunk maxima of query `lane` of the warp (lanes < kQueriesPerWarp).
  const int64_t warp_row = info.row0 + warp * kQueriesPerWarp;  // within the memory head
  const bool writer = lane < kQueriesPerWarp && warp_row + lane < R;
  long long* out_row = chunk_max + (info.bh * R + warp_row + (writer ? lane : 0)) * num_chunks;

  int64_t chunk = 0;
  for (int64_t c0 = 0; c0 < info.n_end; c0 += kTopkChunk, ++chunk) {  // uniform over the block
    long long best[kQueriesPerWarp];
#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) best[i] = kKeyMissing;
    const int64_t c1 = c0 + kTopkChunk < info.n_end ? c0 + kTopkChunk : info.n_end;
    for (int64_t n0 = c0; n0 < c1; n0 += kTileN) {
      __syncthreads();  // the previous tiles are consumed (first time: the query tile is staged)
      load_key_tile<T>(topk_fwd_smem, layout, keys, n0, info.n_end, static_cast<int>(dim_k),
                       vectorized);
      __syncthreads();
      float score[kQueriesPerWarp][kKeysPerLane];
      score_tile<T, kBlockRows, kQueriesPerWarp>(topk_fwd_smem, layout, scale, warp, lane, score);
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c) {
        const int64_t slot = n0 + c * 32 + lane;
        if (slot < info.n_end) {
#pragma unroll
          for (int i = 0; i < kQueriesPerWarp; ++i)
            best[i] = max_key(best[i], encode_key(score[i][c], slot));
        }
      }
    }
    long long mine = kKeyMissing;  // the chunk maximum of query `lane`
#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) {
      const long long reduced = warp_max_key(best[i]);
      if (lane == i) mine = reduced;
    }
    if (writer) out_row[chunk] = mine;
  }
  // Chunks past n_end hold no existing slot.
  if (writer) {
    for (; chunk < num_chunks; ++chunk) out_row[chunk] = kKeyMissing;
  }
}

// Grid (num_row_blocks * B * Hm,), kThreads threads, layout.smem_bytes of dynamic shared memory.
// The minimum of 1 block per SM in the launch bounds lets ptxas use the registers it needs
// (~125-140); with the default it aimed at a register target and spilled a few bytes.
template <typename T, int kKPad>
__global__ void __launch_bounds__(kThreads, 1)
    topk_read_fwd_kernel(const TopkReadFwdParams params, const FwdLayout layout) {
  constexpr int kRegs = kKPad / 32;
  constexpr int kQueriesPerWarp = queries_per_warp(kKPad);
  constexpr int kBlockRows = kWarps * kQueriesPerWarp;
  extern __shared__ __align__(128) unsigned char topk_fwd_smem[];
  // [kWarps, kKPad] the winners of the warp's current query, for the value sum.
  long long* entry_slots = reinterpret_cast<long long*>(topk_fwd_smem + layout.entry_offset);
  float* entry_weights = reinterpret_cast<float*>(entry_slots + kWarps * kKPad);

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t R = layout.rows_per_memory;
  const int64_t N = params.num_slots;
  const int64_t dim_k = params.dim_k;
  const int64_t dim_v = params.dim_v;
  const int k = static_cast<int>(params.k);
  const float scale = static_cast<float>(params.scale);
  const FwdBlock info = fwd_block(params, layout, kBlockRows);
  const T* __restrict__ q = static_cast<const T*>(params.q) + info.bh * R * dim_k;
  const T* __restrict__ keys = static_cast<const T*>(params.keys) + info.memory * N * dim_k;
  const T* __restrict__ values = static_cast<const T*>(params.values) + info.memory * N * dim_v;
  const int64_t n_end = info.n_end;
  const int64_t row0 = info.row0;
  const bool vectorized = keys_vectorizable<T>(params.keys, dim_k);

  stage_queries<T, kBlockRows>(topk_fwd_smem, layout, q, row0, R, dim_k, scale, warp, lane);

  // Global row of the warp's first query; tau[row] (if given) lower-bounds the row's k-th best
  // key, so only candidates >= tau can enter the top k: the gate is max(k-th best, tau - 1).
  const int64_t warp_row = info.bh * R + row0 + warp * kQueriesPerWarp;
  const int64_t* __restrict__ tau = params.tau;
  long long top[kQueriesPerWarp][kRegs];  // per query: K_PAD keys, descending
  long long kth[kQueriesPerWarp];         // per query: the gate (k-th best so far, or tau - 1)
  bool row_valid[kQueriesPerWarp];
#pragma unroll
  for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
    for (int r = 0; r < kRegs; ++r) top[i][r] = kKeyMissing;
    row_valid[i] = row0 + warp * kQueriesPerWarp + i < R;
    kth[i] = kKeyMissing;
    if (tau != nullptr && row_valid[i]) {
      const long long floor = tau[warp_row + i];
      kth[i] = floor == kKeyMissing ? kKeyMissing : floor - 1;
    }
  }
  const int kth_reg = (k - 1) >> 5;
  const int kth_lane = (k - 1) & 31;

  for (int64_t n0 = 0; n0 < n_end; n0 += kTileN) {  // uniform over the block
    __syncthreads();  // the previous tile is consumed (first time: the query tile is staged)
    load_key_tile<T>(topk_fwd_smem, layout, keys, n0, n_end, static_cast<int>(dim_k), vectorized);
    __syncthreads();
    float score[kQueriesPerWarp][kKeysPerLane];
    score_tile<T, kBlockRows, kQueriesPerWarp>(topk_fwd_smem, layout, scale, warp, lane, score);

#pragma unroll
    for (int i = 0; i < kQueriesPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < kKeysPerLane; ++c) {
        const int64_t slot = n0 + c * 32 + lane;
        const long long candidate =
            (row_valid[i] && slot < n_end) ? encode_key(score[i][c], slot) : kKeyMissing;
        // Keys are distinct, so a candidate enters the top k iff it beats the k-th best (and,
        // with tau, is >= tau).
        if (__any_sync(kFullMask, candidate > kth[i])) {
          insert_candidates<kRegs>(top[i], candidate, lane);
          kth[i] = list_element<kRegs>(top[i], kth_reg, kth_lane);
          if (tau != nullptr) {  // rare (about k times per query): reload rather than hold
            const long long floor = tau[warp_row + i];
            if (floor != kKeyMissing) kth[i] = max_key(kth[i], floor - 1);
          }
        }
      }
    }
  }

  // Softmax over the k winners and the weighted sum of their values, query by query.
  float* __restrict__ weights = static_cast<float*>(params.weights);
  int64_t* __restrict__ indices = params.indices;
  T* __restrict__ out = static_cast<T*>(params.out);
  long long* warp_slots = entry_slots + warp * kKPad;
  float* warp_weights = entry_weights + warp * kKPad;
#pragma unroll
  for (int i = 0; i < kQueriesPerWarp; ++i) {
    if (!row_valid[i]) continue;  // uniform over the warp
    const int64_t row = warp_row + i;  // global row (b, h, t)

    float score[kRegs];
    long long slot[kRegs];  // -1 for missing entries
    bool live[kRegs];       // an existing slot at a position < k
    float row_max = -INFINITY;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const DecodedKey decoded = decode_key(top[i][r]);
      live[r] = decoded.exists && r * 32 + lane < k;
      score[r] = decoded.score;
      slot[r] = decoded.exists ? decoded.index : -1;
      if (live[r]) row_max = fmaxf(row_max, decoded.score);
    }
    // A NaN score was ranked (and decodes) as +inf: exp(inf - inf) = NaN below makes the row NaN
    // exactly as the reference's NaN does. A row whose best is -inf (or that has no entry) gets
    // weights 0 and lse = -inf.
    row_max = warp_max(row_max);
    const bool empty = row_max == -INFINITY;
    const float shift = empty ? 0.0f : row_max;
    float exp_terms[kRegs];
    float total = 0.0f;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      exp_terms[r] = live[r] ? expf(score[r] - shift) : 0.0f;
      total += exp_terms[r];
    }
    total = warp_sum(total);
    if (empty) total = 1.0f;
    float weight[kRegs];
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      weight[r] = live[r] ? exp_terms[r] / total : 0.0f;
      const int position = r * 32 + lane;
      if (position < k) {
        indices[row * k + position] = slot[r];
        weights[row * k + position] = weight[r];
        warp_slots[position] = slot[r];
        warp_weights[position] = weight[r];
      }
    }
    __syncwarp();  // warp_slots / warp_weights complete
    if (lane == 0) static_cast<float*>(params.lse)[row] = empty ? -INFINITY : shift + logf(total);

    // out = sum_j w_j * values[idx_j]; every selected entry enters (weight 0 included, as in
    // the reference), entries with index -1 do not.
    float out_acc[kMaxDimPerLane];
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) out_acc[c] = 0.0f;
    for (int j = 0; j < k; ++j) {
      const long long entry_slot = warp_slots[j];
      if (entry_slot < 0) break;  // uniform; missing entries come last
      const float entry_weight = warp_weights[j];
      const T* value_row = values + entry_slot * dim_v;
#pragma unroll
      for (int c = 0; c < kMaxDimPerLane; ++c) {
        const int col = lane + 32 * c;
        if (col < dim_v) out_acc[c] = fmaf(entry_weight, to_float<T>(value_row[col]), out_acc[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) {
      const int col = lane + 32 * c;
      if (col < dim_v) out[row * dim_v + col] = from_float<T>(out_acc[c]);
    }
    __syncwarp();  // the next query rewrites warp_slots / warp_weights
  }
}

template <typename T, int kKPad, typename Kernel>
cudaError_t prepare_fwd_kernel(Kernel kernel, const FwdLayout& layout) {
  if (layout.smem_bytes > kStaticSmemLimit) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                layout.smem_bytes);
  }
  return cudaSuccess;
}

// Launches a forward kernel (the selection or the pre-pass) of <T, kKPad> on its layout's blocks:
// kernel(params, layout, extra...).
template <typename T, int kKPad, typename Kernel, typename... Extra>
cudaError_t launch_fwd_blocks(const TopkReadFwdParams& params, Kernel kernel, cudaStream_t stream,
                              Extra... extra) {
  const FwdLayout layout = make_fwd_layout<T, kKPad>(params);
  const int64_t blocks = layout.num_row_blocks * params.batch * params.mem_heads;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const cudaError_t status = prepare_fwd_kernel<T, kKPad>(kernel, layout);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(blocks), kThreads, layout.smem_bytes, stream>>>(params, layout,
                                                                                 extra...);
  return cudaGetLastError();
}

template <typename T, int kKPad>
cudaError_t launch_fwd(const TopkReadFwdParams& params, cudaStream_t stream) {
  return launch_fwd_blocks<T, kKPad>(params, topk_read_fwd_kernel<T, kKPad>, stream);
}

template <typename T, int kKPad>
cudaError_t launch_chunk_max(const TopkReadFwdParams& params, int64_t* chunk_max,
                             cudaStream_t stream) {
  return launch_fwd_blocks<T, kKPad>(params, topk_read_chunk_max_kernel<T, kKPad>, stream,
                                     reinterpret_cast<long long*>(chunk_max));
}

template <typename T>
cudaError_t launch_fwd_for_k(const TopkReadFwdParams& params, cudaStream_t stream) {
  return with_list_length(params.k,
                          [&](auto k_pad) { return launch_fwd<T, k_pad.value>(params, stream); });
}

// The pre-pass must use the block layout (K_PAD) of the selection kernel it serves.
template <typename T>
cudaError_t launch_chunk_max_for_k(const TopkReadFwdParams& params, int64_t* chunk_max,
                                   cudaStream_t stream) {
  return with_list_length(params.k, [&](auto k_pad) {
    return launch_chunk_max<T, k_pad.value>(params, chunk_max, stream);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Grid-stride over query rows, one warp per row.
// (Minimum 1 block per SM in the launch bounds, as for the forward: without it ptxas capped the
// atomic variant at 80 registers on sm_90 and spilled.)
template <typename T, bool kDeterministic>
__global__ void __launch_bounds__(kThreads, 1) topk_read_bwd_rows_kernel(const TopkReadBwdParams params) {
  __shared__ float dw_scratch[kWarps][kTopkReadMaxK];  // dw_j of the warp's current row

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t R = (params.heads / params.mem_heads) * params.seq_len;
  const int64_t mem_heads = params.mem_heads;
  const int64_t N = params.num_slots;
  const int64_t dim_k = params.dim_k;
  const int64_t dim_v = params.dim_v;
  const int k = static_cast<int>(params.k);
  const float scale = static_cast<float>(params.scale);
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const T* __restrict__ q = static_cast<const T*>(params.q);
  float* dw_row = dw_scratch[warp];

  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    // 32-bit divisions (rows < 2**31, checked by the launcher): see topk_read_fwd_kernel.
    const unsigned bh32 = static_cast<unsigned>(row) / static_cast<unsigned>(R);
    const int64_t bh = bh32;
    const int64_t memory =
        params.shared_memory ? int64_t{bh32 % static_cast<unsigned>(mem_heads)} : bh;
    const T* __restrict__ keys = static_cast<const T*>(params.keys) + memory * N * dim_k;
    const T* __restrict__ values = static_cast<const T*>(params.values) + memory * N * dim_v;
    const int64_t* row_indices = params.indices + row * k;
    const float* row_weights = static_cast<const float*>(params.weights) + row * k;
    const float* row_dweights = static_cast<const float*>(params.dweights) + row * k;

    float dout_row[kMaxDimPerLane], q_row[kMaxDimPerLane];
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) {
      const int col = lane + 32 * c;
      dout_row[c] = col < dim_v ? to_float<T>(dout[row * dim_v + col]) : 0.0f;
      q_row[c] = col < dim_k ? to_float<T>(q[row * dim_k + col]) : 0.0f;
    }

    // Pass 1: dw_j and sum_j w_j dw_j (identical in every lane).
    float weighted_dw = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int64_t slot = row_indices[j];
      float dw = 0.0f;
      if (slot >= 0 && slot < N) {  // uniform over the warp
        const float weight = row_weights[j];
        const T* value_row = values + slot * dim_v;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kMaxDimPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < dim_v) {
            dot = fmaf(dout_row[c], to_float<T>(value_row[col]), dot);
            if (!kDeterministic) {
              atomicAdd(params.dvalues_acc + (memory * N + slot) * dim_v + col,
                        weight * dout_row[c]);
            }
          }
        }
        dw = row_dweights[j] + warp_sum(dot);
        weighted_dw += weight * dw;
      }
      if (lane == 0) dw_row[j] = dw;
    }
    __syncwarp();

    // Pass 2: ds_j, dq, and the dkeys scatter (atomic) or ds (deterministic).
    const float dlse = static_cast<const float*>(params.dlse)[row];
    float dq_acc[kMaxDimPerLane];
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) dq_acc[c] = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int64_t slot = row_indices[j];
      float ds = 0.0f;
      if (slot >= 0 && slot < N) {  // uniform over the warp
        ds = row_weights[j] * (dw_row[j] - weighted_dw + dlse);
        const T* key_row = keys + slot * dim_k;
        const float scaled_ds = scale * ds;
#pragma unroll
        for (int c = 0; c < kMaxDimPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < dim_k) {
            dq_acc[c] = fmaf(ds, to_float<T>(key_row[col]), dq_acc[c]);
            if (!kDeterministic) {
              atomicAdd(params.dkeys_acc + (memory * N + slot) * dim_k + col, scaled_ds * q_row[c]);
            }
          }
        }
      }
      if (kDeterministic && lane == 0) params.ds[row * k + j] = ds;
    }
    T* __restrict__ dq = static_cast<T*>(params.dq);
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) {
      const int col = lane + 32 * c;
      if (col < dim_k) dq[row * dim_k + col] = from_float<T>(scale * dq_acc[c]);
    }
    __syncwarp();  // dw_row is rewritten for the next row
  }
}

// Deterministic mode: grid-stride over the M * N slots, one warp per slot.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_read_bwd_slot_kernel(const TopkReadBwdParams params, const int64_t total_slots) {
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t dim_k = params.dim_k;
  const int64_t dim_v = params.dim_v;
  const float scale = static_cast<float>(params.scale);
  const T* __restrict__ q = static_cast<const T*>(params.q);
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  T* __restrict__ dkeys = static_cast<T*>(params.dkeys);
  T* __restrict__ dvalues = static_cast<T*>(params.dvalues);

  for (int64_t slot = int64_t{blockIdx.x} * kWarps + warp; slot < total_slots;
       slot += int64_t{gridDim.x} * kWarps) {
    const int64_t entry_begin = params.run_starts[slot];
    const int64_t entry_end = params.run_starts[slot + 1];
    float dkey_acc[kMaxDimPerLane], dvalue_acc[kMaxDimPerLane];
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) {
      dkey_acc[c] = 0.0f;
      dvalue_acc[c] = 0.0f;
    }
    for (int64_t e = entry_begin; e < entry_end; ++e) {  // the caller's (stable) order
      const int64_t entry = params.entry_order[e];
      const int64_t row = params.entry_rows[e];
      const float ds = params.ds[entry];
      const float weight = static_cast<const float*>(params.weights)[entry];
#pragma unroll
      for (int c = 0; c < kMaxDimPerLane; ++c) {
        const int col = lane + 32 * c;
        if (col < dim_k) dkey_acc[c] = fmaf(ds, to_float<T>(q[row * dim_k + col]), dkey_acc[c]);
        if (col < dim_v)
          dvalue_acc[c] = fmaf(weight, to_float<T>(dout[row * dim_v + col]), dvalue_acc[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < kMaxDimPerLane; ++c) {
      const int col = lane + 32 * c;
      if (col < dim_k) dkeys[slot * dim_k + col] = from_float<T>(scale * dkey_acc[c]);
      if (col < dim_v) dvalues[slot * dim_v + col] = from_float<T>(dvalue_acc[c]);
    }
  }
}

// Blocks for a grid-stride loop over `units` warps' worth of work (capped; the kernels stride).
inline unsigned stride_grid(int64_t units) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  const int64_t blocks = (units + kWarps - 1) / kWarps;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T>
cudaError_t launch_bwd(const TopkReadBwdParams& params, cudaStream_t stream) {
  const int64_t rows = params.batch * params.heads * params.seq_len;
  if (rows > 0) {
    if (params.deterministic) {
      topk_read_bwd_rows_kernel<T, true><<<stride_grid(rows), kThreads, 0, stream>>>(params);
    } else {
      topk_read_bwd_rows_kernel<T, false><<<stride_grid(rows), kThreads, 0, stream>>>(params);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  if (params.deterministic) {
    const int64_t memories = params.shared_memory ? params.mem_heads
                                                  : params.batch * params.mem_heads;
    const int64_t total_slots = memories * params.num_slots;
    if (total_slots > 0) {
      topk_read_bwd_slot_kernel<T><<<stride_grid(total_slots), kThreads, 0, stream>>>(
          params, total_slots);
      return cudaGetLastError();
    }
  }
  return cudaSuccess;
}

template <typename Params>
bool valid_common_sizes(const Params& params) {
  if (params.batch < 0 || params.heads < 0 || params.seq_len < 0 || params.mem_heads < 1 ||
      params.num_slots < 0 || params.dim_k < 0 || params.dim_v < 0)
    return false;
  if (params.heads % params.mem_heads != 0) return false;
  if (params.dim_k > kTopkReadMaxDim || params.dim_v > kTopkReadMaxDim) return false;
  if (params.num_slots > kTopkReadMaxSlots) return false;
  return params.k >= 1 && params.k <= kTopkReadMaxK;
}

}  // namespace

cudaError_t topk_read_fwd_launch(const TopkReadFwdParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seq_len == 0) {
    return (params.batch >= 0 && params.heads >= 0 && params.seq_len >= 0) ? cudaSuccess
                                                                           : cudaErrorInvalidValue;
  }
  if (!valid_common_sizes(params) || params.k > params.num_slots) return cudaErrorInvalidValue;
  if (params.q == nullptr || params.keys == nullptr || params.out == nullptr ||
      params.indices == nullptr || params.weights == nullptr || params.lse == nullptr ||
      (params.values == nullptr && params.dim_v > 0))
    return cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_fwd_for_k, params, stream);
}

int64_t topk_read_num_chunks(int64_t num_slots) {
  return num_slots <= 0 ? 0 : (num_slots + kTopkReadChunkSlots - 1) / kTopkReadChunkSlots;
}

cudaError_t topk_read_chunk_max_launch(const TopkReadFwdParams& params, int64_t* chunk_max,
                                       cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seq_len == 0) {
    return (params.batch >= 0 && params.heads >= 0 && params.seq_len >= 0) ? cudaSuccess
                                                                           : cudaErrorInvalidValue;
  }
  if (!valid_common_sizes(params) || params.k > params.num_slots) return cudaErrorInvalidValue;
  if (params.q == nullptr || params.keys == nullptr || chunk_max == nullptr)
    return cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_chunk_max_for_k, params, chunk_max, stream);
}

cudaError_t topk_read_bwd_launch(const TopkReadBwdParams& params, cudaStream_t stream) {
  if (!valid_common_sizes(params)) return cudaErrorInvalidValue;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (rows > 0 && (params.dout == nullptr || params.dweights == nullptr ||
                   params.dlse == nullptr || params.q == nullptr || params.indices == nullptr ||
                   params.weights == nullptr || params.dq == nullptr))
    return cudaErrorInvalidValue;
  if (params.deterministic) {
    if (params.ds == nullptr || params.entry_order == nullptr || params.entry_rows == nullptr ||
        params.run_starts == nullptr || params.dkeys == nullptr || params.dvalues == nullptr)
      return cudaErrorInvalidValue;
  } else if (rows > 0 && (params.dkeys_acc == nullptr || params.dvalues_acc == nullptr)) {
    return cudaErrorInvalidValue;
  }
  L2M_CUDA_DISPATCH(params.dtype, launch_bwd, params, stream);
}

}  // namespace cuda
}  // namespace l2m
