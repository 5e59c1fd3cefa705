// Local (causal, sliding-window) attention on CUDA (interface and limits: local_attention.h;
// semantics: l2m_kernels/ops/memory_attention/reference.py::local_attention_ref).
//
// FlashAttention on CUDA cores (SIMT, every dtype computed in the accumulation type: float32, or
// float64 for float64), no T x S matrix. A block of kWarps = 4 warps owns a tile of 32 rows
// (queries in the forward and dq kernels, keys in the dk/dv kernel); warp w owns rows
// 8w .. 8w + 7 and lane l the l-th column (key, or query) of the tile it faces, so a warp holds
// an 8 x 32 block of scores, one column per lane. Per tile pair:
//   scores: tile_scores stages both operands through shared memory, 32 feature columns at a time
//     (rows of the lane-indexed operand padded to 33 elements: conflict-free), and each lane runs
//     one sequential FMA chain over the features per score. The scores of a (query, key) pair are
//     bitwise the same in every kernel (fma(a, b, c) == fma(b, a, c)), so the backward recomputes
//     exactly the forward's probabilities.
//   accumulation: the warp writes its weights (P or dS) to shared memory, then accumulate_slice
//     stages the 32 rows they multiply (v, k, dout or q), one slice of kChunks * 32 feature
//     columns, and lane l accumulates columns l + 32 j of its warp's 8 rows in registers.
// Feature columns beyond one slice (D or Dv > 128, > 64 for float64) are served by more blocks,
// each recomputing the scores for its own slice of the output columns: any D and Dv, registers
// bounded, results identical for every slice.
//
// Masking: query at position p sees keys p - window < j <= p. Masked scores are replaced (select,
// not arithmetic) before use, so a non-finite k, q, v or dout at a masked position cannot reach
// a score; in the products weight x row a masked weight is an exact 0, which is harmless unless
// the staged row holds inf or NaN (0 * inf = NaN): each staged slice reports (one
// __syncthreads_or) whether it holds a non-finite value, and only then the block takes the slow
// path that adds the visible (row, column) pairs only (exact IEEE results for those).
//
// Kernels:
//   local_attention_fwd_kernel: one block per (b, h, query tile, Dv slice): online softmax over
//     the key tiles of the tile's window (running max per row, warp-uniform; per-lane partial
//     sums, reduced once at the end), out = acc / sum, lse = max + log(sum); a row with no visible
//     key (or only -inf scores): out 0, lse -inf.
//   local_attention_bwd_delta_kernel: delta = <dout, out> - dlse per row (one warp per row).
//   local_attention_bwd_dq_kernel: one block per (b, h, query tile, D slice): P = exp(s - lse),
//     dP = dout . v, dS = P (dP - delta), dq = scale * sum dS k.
//   local_attention_bwd_dkdv_kernel: one block per (b, kv head, key tile, column slice): for every
//     query head of the group and every query tile that sees the key tile, the transposed P and
//     dS (keys as rows), dv += P^T dout, dk += dS^T (scale q). Keys no query sees get zeros.
// No atomics anywhere: every output element is reduced by one thread in a fixed order (bitwise
// reproducible). Every __syncthreads sits in block-uniform control flow (loop bounds and branches
// depend on the block's tile only, or on __syncthreads_or results).
//
// Numerics: inputs converted to the accumulation type on load, q scaled once on load as the
// reference's (q * scale) @ k^T, IEEE expf/logf (no --use_fast_math: merge_common.cuh refuses
// it), outputs rounded once on store. Offsets are int64 (B * H * T * D may pass 2**31).
#include <cstdint>

#include "attention_common.cuh"
#include "local_attention.h"

namespace l2m {
namespace cuda {
namespace {

using attention::acc_type;
using attention::exp_acc;
using attention::from_acc;
using attention::log_acc;
using attention::negative_infinity;
using attention::to_acc;
using attention::warp_max;
using attention::warp_sum;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;                      // rows of a tile = columns a warp faces (lanes)
constexpr int kRowsPerWarp = kTile / kWarps;   // rows of a tile each warp owns
constexpr int kDotDepth = 32;                  // feature columns staged per score step
constexpr int kDotStride = kDotDepth + 1;      // lane l reads bank (l + d) % 32: no conflicts
static_assert(kTile == 32, "a tile's columns are the lanes of a warp");
static_assert(kRowsPerWarp * kWarps == kTile, "the warps share a tile's rows");
static_assert(kDotDepth % 4 == 0, "scores read the row operand in quads");

// Feature columns per slice: kChunks * 32, kChunks in {2, 4} (float32 accumulation) or 2
// (float64): the per-thread accumulators (8 rows x kChunks, twice in the dk/dv kernel) stay in
// registers.
template <typename T>
constexpr int max_chunks() {
  return sizeof(acc_type<T>) == 8 ? 2 : 4;
}

// Shared memory of a block: the warps' weights and one staging area used in turn by the score
// products (two 32 x 32 operand chunks) and by the accumulations (a 32-row slice).
template <typename acc_t, int kChunks, int kWeightSets>
struct SharedTiles {
  // weights[set][warp][i][c]: weight of the warp's row i against column c of the tile.
  acc_t weights[kWeightSets][kWarps][kRowsPerWarp][kTile];
  union Stage {
    struct Dot {
      acc_t rows[kTile][kDotDepth];      // indexed by the warp's rows (broadcast reads)
      acc_t columns[kTile][kDotStride];  // indexed by lane
    } dot;
    acc_t slice[kTile][kChunks * 32];  // rows multiplied by the weights, one column slice
  } stage;
};

template <typename acc_t>
struct Quad {
  acc_t x, y, z, w;
};

// Four consecutive elements from 16-byte aligned shared memory.
__device__ __forceinline__ Quad<float> load_quad(const float* p) {
  const float4 value = *reinterpret_cast<const float4*>(p);
  return {value.x, value.y, value.z, value.w};
}
__device__ __forceinline__ Quad<double> load_quad(const double* p) {
  const double2 low = *reinterpret_cast<const double2*>(p);
  const double2 high = *reinterpret_cast<const double2*>(p + 2);
  return {low.x, low.y, high.x, high.y};
}

// Which columns of a tile the warp's rows see: row i (of the warp's kRowsPerWarp) sees the
// columns c < n with lo <= c - (base + i) < hi, unless bit i of `dead` is set. Positions are ints
// (the launchers keep S <= 2**30).
struct Band {
  int base;       // column of the warp's row 0 on the band's reference diagonal
  int lo, hi;     // offsets from the diagonal that are seen, [lo, hi)
  int n;          // columns of the tile
  unsigned dead;  // rows that take no part at all

  __device__ __forceinline__ bool sees(int i, int c) const {
    const int from_diagonal = c - base - i;
    return c < n && from_diagonal >= lo && from_diagonal < hi && ((dead >> i) & 1u) == 0;
  }
};

// s[i] = sum_d rows[8 warp + i][d] * columns[lane][d] over d < depth: rows r < row_count of
// row_src (times row_factor) against rows c < column_count of column_src (times column_factor),
// both blocks of consecutive rows of `depth` elements; missing rows count as zeros. One
// sequential FMA chain over d per score. Every thread of the block must call it (it
// synchronizes; the stage area is free when it returns only after the caller's next barrier).
template <typename T, typename Shared>
__device__ __forceinline__ void tile_scores(Shared& smem, const T* __restrict__ row_src,
                                            int row_count, acc_type<T> row_factor,
                                            const T* __restrict__ column_src, int column_count,
                                            acc_type<T> column_factor, int depth, int warp,
                                            int lane, acc_type<T> (&s)[kRowsPerWarp]) {
  using acc_t = acc_type<T>;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) s[i] = acc_t(0);
  for (int d0 = 0; d0 < depth; d0 += kDotDepth) {
    __syncthreads();  // the previous users of the stage area are done
    for (int e = static_cast<int>(threadIdx.x); e < kTile * kDotDepth; e += kThreads) {
      const int r = e / kDotDepth;
      const int c = e - r * kDotDepth;
      const int d = d0 + c;
      const int64_t offset = int64_t{r} * depth + d;
      acc_t row_value = acc_t(0);
      acc_t column_value = acc_t(0);
      if (d < depth) {
        if (r < row_count) row_value = to_acc<T>(row_src[offset]) * row_factor;
        if (r < column_count) column_value = to_acc<T>(column_src[offset]) * column_factor;
      }
      smem.stage.dot.rows[r][c] = row_value;
      smem.stage.dot.columns[r][c] = column_value;
    }
    __syncthreads();
    const acc_t* column = smem.stage.dot.columns[lane];
#pragma unroll 1
    for (int d = 0; d < kDotDepth; d += 4) {
      const acc_t b0 = column[d], b1 = column[d + 1], b2 = column[d + 2], b3 = column[d + 3];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const Quad<acc_t> a = load_quad(&smem.stage.dot.rows[warp * kRowsPerWarp + i][d]);
        s[i] = fma(a.x, b0, s[i]);
        s[i] = fma(a.y, b1, s[i]);
        s[i] = fma(a.z, b2, s[i]);
        s[i] = fma(a.w, b3, s[i]);
      }
    }
  }
}

// acc[i][j] += sum_c weights[set][warp][i][c] * slice[c][lane + 32 j], the slice holding columns
// [col0, col0 + kChunks * 32) of rows c < count of src (consecutive rows of `width` elements,
// times factor), zeros elsewhere. The sum over c is sequential. When a staged value is not
// finite, only the pairs the band sees are added. Every thread of the block must call it; the
// warp's weights must be written before the call (its first barrier publishes them).
template <typename T, int kChunks, typename Shared>
__device__ __forceinline__ void accumulate_slice(Shared& smem, int set, const T* __restrict__ src,
                                                 int count, int width, int col0,
                                                 acc_type<T> factor, const Band& band,
                                                 int warp, int lane,
                                                 acc_type<T> (&acc)[kRowsPerWarp][kChunks]) {
  using acc_t = acc_type<T>;
  constexpr int kCols = kChunks * 32;
  __syncthreads();  // the stage area is free and every warp's weights are visible
  bool nonfinite = false;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kCols; e += kThreads) {
    const int r = e / kCols;
    const int c = e - r * kCols;
    const int col = col0 + c;
    acc_t value = acc_t(0);
    if (r < count && col < width) {
      value = to_acc<T>(src[int64_t{r} * width + col]) * factor;
      nonfinite |= !isfinite(value);
    }
    smem.stage.slice[r][c] = value;
  }
  nonfinite = __syncthreads_or(nonfinite) != 0;  // block-uniform
  const acc_t(*weights)[kTile] = smem.weights[set][warp];
  if (!nonfinite) {
    // Masked weights are exact zeros against finite values: no test per pair.
#pragma unroll 1
    for (int c = 0; c < kTile; c += 4) {
      acc_t value[4][kChunks];
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
#pragma unroll
        for (int j = 0; j < kChunks; ++j) value[cc][j] = smem.stage.slice[c + cc][lane + 32 * j];
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const Quad<acc_t> w = load_quad(&weights[i][c]);
#pragma unroll
        for (int j = 0; j < kChunks; ++j) {
          acc[i][j] = fma(w.x, value[0][j], acc[i][j]);
          acc[i][j] = fma(w.y, value[1][j], acc[i][j]);
          acc[i][j] = fma(w.z, value[2][j], acc[i][j]);
          acc[i][j] = fma(w.w, value[3][j], acc[i][j]);
        }
      }
    }
  } else {
#pragma unroll 1
    for (int c = 0; c < kTile; ++c) {
      acc_t value[kChunks];
#pragma unroll
      for (int j = 0; j < kChunks; ++j) value[j] = smem.stage.slice[c][lane + 32 * j];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        if (band.sees(i, c)) {  // warp-uniform
          const acc_t w = weights[i][c];
#pragma unroll
          for (int j = 0; j < kChunks; ++j) acc[i][j] = fma(w, value[j], acc[i][j]);
        }
      }
    }
  }
}

// Launch geometry, computed once on the host. Positions and feature counts are ints: the
// launchers refuse H, S, D or Dv above kLocalAttentionMaxExtent (2**30).
struct Geometry {
  int group;            // H / Hkv
  int offset;           // S - T: position of query 0
  int window;           // clamped to [0, S]: keys p - window < j <= p
  unsigned num_tiles;   // row tiles per head (query tiles; key tiles in the dk/dv kernel)
  unsigned num_slices;  // column slices per tile (>= 1)
};

// Block -> (head, tile, slice), block = (head * num_tiles + tile) * num_slices + slice. 32-bit
// divisions: the launchers keep the grid below 2**31 (a 64-bit division is a subroutine call).
struct BlockCoords {
  unsigned head;  // b * H + h, or b * Hkv + hkv
  unsigned tile;
  unsigned slice;
};

__device__ __forceinline__ BlockCoords block_coords(const Geometry& geometry) {
  const unsigned block = blockIdx.x;
  BlockCoords coords;
  const unsigned head_tile = block / geometry.num_slices;
  coords.slice = block - head_tile * geometry.num_slices;
  coords.head = head_tile / geometry.num_tiles;
  coords.tile = head_tile - coords.head * geometry.num_tiles;
  return coords;
}

// The place of a query-tile block (forward, dq): its rows, kv head and column slice.
struct QueryTile {
  BlockCoords coords;  // head = b * H + h
  unsigned kv_head;    // b * Hkv + the head's kv head
  int T_len, S_len, D, Dv;
  int t0;              // the tile's first query
  int nq;              // queries in the tile (<= kTile)
  int col0;            // the slice's first column
  int64_t row0;        // global row of the tile's query 0
};

template <int kCols, typename Params>
__device__ __forceinline__ QueryTile query_tile(const Params& params, const Geometry& geometry) {
  QueryTile tile;
  tile.coords = block_coords(geometry);
  const unsigned heads = static_cast<unsigned>(params.heads);
  const unsigned b = tile.coords.head / heads;
  tile.kv_head = b * static_cast<unsigned>(params.kv_heads) +
                 (tile.coords.head - b * heads) / static_cast<unsigned>(geometry.group);
  tile.T_len = static_cast<int>(params.seq_len);
  tile.S_len = static_cast<int>(params.context_len);
  tile.D = static_cast<int>(params.dim);
  tile.Dv = static_cast<int>(params.dim_v);
  tile.t0 = static_cast<int>(tile.coords.tile) * kTile;
  tile.nq = tile.T_len - tile.t0 < kTile ? tile.T_len - tile.t0 : kTile;
  tile.col0 = static_cast<int>(tile.coords.slice) * kCols;
  tile.row0 = int64_t{tile.coords.head} * tile.T_len + tile.t0;
  return tile;
}

// One block per SM is the minimum ptxas plans for: the kernels hold 8 rows x (1 or 2) x kChunks
// accumulators per thread and use ~115-245 registers (nvcc 13, sm_80 / sm_90); a tighter bound
// (3 blocks per SM: 168) made them spill.
constexpr int kMinBlocksPerSm = 1;

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    local_attention_fwd_kernel(const LocalAttentionFwdParams params, const Geometry geometry) {
  using acc_t = acc_type<T>;
  constexpr int kCols = kChunks * 32;
  __shared__ __align__(16) SharedTiles<acc_t, kChunks, 1> smem;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const acc_t neg_inf = negative_infinity<acc_t>();

  const auto [coords, kv_head, T_len, S_len, D, Dv, t0, nq, col0, row0] =
      query_tile<kCols>(params, geometry);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const T* __restrict__ q_rows = static_cast<const T*>(params.q) + row0 * D;
  const T* __restrict__ k_head = static_cast<const T*>(params.k) + int64_t{kv_head} * S_len * D;
  const T* __restrict__ v_head = static_cast<const T*>(params.v) + int64_t{kv_head} * S_len * Dv;

  const int window = geometry.window;
  const int position0 = geometry.offset + t0;  // position of the tile's query 0
  const int key_begin = position0 - window + 1 > 0 ? position0 - window + 1 : 0;
  const int key_end = window > 0 ? position0 + nq : key_begin;
  // Row i, the query at position p = position0 + 8 warp + i, sees column c, the key j0 + c, when
  // p - window < j0 + c <= p: 1 - window <= c - (p - j0) < 1.
  Band band;
  band.lo = 1 - window;
  band.hi = 1;
  band.dead = 0u;

  acc_t row_max[kRowsPerWarp], row_sum[kRowsPerWarp];  // row_sum: this lane's share
  acc_t acc[kRowsPerWarp][kChunks];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    row_max[i] = neg_inf;
    row_sum[i] = acc_t(0);
#pragma unroll
    for (int j = 0; j < kChunks; ++j) acc[i][j] = acc_t(0);
  }

  for (int j0 = key_begin; j0 < key_end; j0 += kTile) {  // block-uniform
    const int nk = key_end - j0 < kTile ? key_end - j0 : kTile;
    acc_t s[kRowsPerWarp];
    tile_scores<T>(smem, q_rows, nq, scale, k_head + int64_t{j0} * D, nk, acc_t(1), D, warp, lane,
                   s);
    band.base = position0 - j0 + warp * kRowsPerWarp;
    band.n = nk;
    __syncwarp();  // every lane is done reading the warp's previous weights
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const bool visible = band.sees(i, lane);
      // fmax skips a NaN score: it reaches exp below and makes the row's sum (hence out and
      // lse) NaN, as in the reference.
      const acc_t tile_max = warp_max(visible ? s[i] : neg_inf);
      const acc_t old_max = row_max[i];
      const acc_t new_max = tile_max > old_max ? tile_max : old_max;
      const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;
      const acc_t correction = old_max == neg_inf ? acc_t(0) : exp_acc(old_max - new_max);
      const acc_t prob = visible ? exp_acc(s[i] - shift) : acc_t(0);
      row_sum[i] = row_sum[i] * correction + prob;
      row_max[i] = new_max;
      if (correction != acc_t(1)) {  // warp-uniform
#pragma unroll
        for (int j = 0; j < kChunks; ++j) acc[i][j] *= correction;
      }
      smem.weights[0][warp][i][lane] = prob;
    }
    accumulate_slice<T, kChunks>(smem, 0, v_head + int64_t{j0} * Dv, nk, Dv, col0, acc_t(1), band,
                                 warp, lane, acc);
  }

  T* __restrict__ out = static_cast<T*>(params.out);
  acc_t* __restrict__ lse = static_cast<acc_t*>(params.lse);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const acc_t total = warp_sum(row_sum[i]);
    const int r = warp * kRowsPerWarp + i;
    if (r < nq) {
      const int64_t row = row0 + r;
      // total == 0: no visible key, or only -inf scores: out = 0 (0 * NaN stays NaN), lse = -inf.
      const acc_t inverse = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int col = col0 + lane + 32 * j;
        if (col < Dv) out[row * Dv + col] = from_acc<T>(acc[i][j] * inverse);
      }
      if (coords.slice == 0 && lane == 0) {
        lse[row] = total == acc_t(0) ? neg_inf : row_max[i] + log_acc(total);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

// delta = <dout, out> - dlse per query row; grid-stride, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    local_attention_bwd_delta_kernel(const LocalAttentionBwdParams params) {
  using acc_t = acc_type<T>;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t Dv = params.dim_v;
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const T* __restrict__ out = static_cast<const T*>(params.out);
  const acc_t* __restrict__ dlse = static_cast<const acc_t*>(params.dlse);
  acc_t* __restrict__ delta = static_cast<acc_t*>(params.delta);
  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    acc_t dot = acc_t(0);
    for (int64_t col = lane; col < Dv; col += 32)
      dot = fma(to_acc<T>(dout[row * Dv + col]), to_acc<T>(out[row * Dv + col]), dot);
    dot = warp_sum(dot);
    if (lane == 0) delta[row] = dot - dlse[row];
  }
}

// dq = scale * sum_j dS_ij k_j per query tile and D slice.
template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    local_attention_bwd_dq_kernel(const LocalAttentionBwdParams params, const Geometry geometry) {
  using acc_t = acc_type<T>;
  constexpr int kCols = kChunks * 32;
  __shared__ __align__(16) SharedTiles<acc_t, kChunks, 1> smem;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const acc_t neg_inf = negative_infinity<acc_t>();

  const auto [coords, kv_head, T_len, S_len, D, Dv, t0, nq, col0, row0] =
      query_tile<kCols>(params, geometry);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const T* __restrict__ q_rows = static_cast<const T*>(params.q) + row0 * D;
  const T* __restrict__ dout_rows = static_cast<const T*>(params.dout) + row0 * Dv;
  const T* __restrict__ k_head = static_cast<const T*>(params.k) + int64_t{kv_head} * S_len * D;
  const T* __restrict__ v_head = static_cast<const T*>(params.v) + int64_t{kv_head} * S_len * Dv;
  const acc_t* __restrict__ lse = static_cast<const acc_t*>(params.lse) + row0;
  const acc_t* __restrict__ delta = static_cast<const acc_t*>(params.delta) + row0;

  const int window = geometry.window;
  const int position0 = geometry.offset + t0;
  const int key_begin = position0 - window + 1 > 0 ? position0 - window + 1 : 0;
  const int key_end = window > 0 ? position0 + nq : key_begin;
  Band band;  // as in the forward
  band.lo = 1 - window;
  band.hi = 1;
  band.dead = 0u;

  acc_t row_lse[kRowsPerWarp], row_delta[kRowsPerWarp];
  acc_t acc[kRowsPerWarp][kChunks];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    row_lse[i] = r < nq ? lse[r] : neg_inf;
    row_delta[i] = r < nq ? delta[r] : acc_t(0);
    // An empty softmax (lse = -inf, or a row past T) has P = 0 everywhere: it takes no part.
    if (row_lse[i] == neg_inf) band.dead |= 1u << i;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) acc[i][j] = acc_t(0);
  }

  for (int j0 = key_begin; j0 < key_end; j0 += kTile) {  // block-uniform
    const int nk = key_end - j0 < kTile ? key_end - j0 : kTile;
    acc_t s[kRowsPerWarp], dp[kRowsPerWarp];
    tile_scores<T>(smem, q_rows, nq, scale, k_head + int64_t{j0} * D, nk, acc_t(1), D, warp, lane,
                   s);
    tile_scores<T>(smem, dout_rows, nq, acc_t(1), v_head + int64_t{j0} * Dv, nk, acc_t(1), Dv,
                   warp, lane, dp);
    band.base = position0 - j0 + warp * kRowsPerWarp;
    band.n = nk;
    __syncwarp();  // every lane is done reading the warp's previous weights
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const acc_t prob = exp_acc(s[i] - row_lse[i]);
      smem.weights[0][warp][i][lane] =
          band.sees(i, lane) ? prob * (dp[i] - row_delta[i]) : acc_t(0);
    }
    accumulate_slice<T, kChunks>(smem, 0, k_head + int64_t{j0} * D, nk, D, col0, acc_t(1), band,
                                 warp, lane, acc);
  }

  T* __restrict__ dq = static_cast<T*>(params.dq);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r < nq) {
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int col = col0 + lane + 32 * j;
        if (col < D) dq[(row0 + r) * D + col] = from_acc<T>(acc[i][j] * scale);
      }
    }
  }
}

// dk, dv per key tile and column slice (columns of dk below D, of dv below Dv).
template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    local_attention_bwd_dkdv_kernel(const LocalAttentionBwdParams params, const Geometry geometry) {
  using acc_t = acc_type<T>;
  constexpr int kCols = kChunks * 32;
  __shared__ __align__(16) SharedTiles<acc_t, kChunks, 2> smem;  // sets: P^T, dS^T
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const acc_t neg_inf = negative_infinity<acc_t>();

  const BlockCoords coords = block_coords(geometry);  // head = b * Hkv + hkv
  const unsigned kv_heads = static_cast<unsigned>(params.kv_heads);
  const unsigned b = coords.head / kv_heads;
  const unsigned kv_head = coords.head - b * kv_heads;
  const int group = geometry.group;
  const int T_len = static_cast<int>(params.seq_len);
  const int S_len = static_cast<int>(params.context_len);
  const int D = static_cast<int>(params.dim);
  const int Dv = static_cast<int>(params.dim_v);
  const int j0 = static_cast<int>(coords.tile) * kTile;
  const int nk = S_len - j0 < kTile ? S_len - j0 : kTile;
  const int col0 = static_cast<int>(coords.slice) * kCols;
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t key_row0 = int64_t{coords.head} * S_len + j0;  // global row of the tile's key 0
  const T* __restrict__ k_rows = static_cast<const T*>(params.k) + key_row0 * D;
  const T* __restrict__ v_rows = static_cast<const T*>(params.v) + key_row0 * Dv;
  const T* __restrict__ q = static_cast<const T*>(params.q);
  const T* __restrict__ dout = static_cast<const T*>(params.dout);
  const acc_t* __restrict__ lse = static_cast<const acc_t*>(params.lse);
  const acc_t* __restrict__ delta = static_cast<const acc_t*>(params.delta);
  const bool has_dk_columns = col0 < D;  // block-uniform
  const bool has_dv_columns = col0 < Dv;

  acc_t dk_acc[kRowsPerWarp][kChunks], dv_acc[kRowsPerWarp][kChunks];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      dk_acc[i][j] = acc_t(0);
      dv_acc[i][j] = acc_t(0);
    }
  }

  // The queries that see a key of [j0, j0 + nk) sit at positions [j0, j0 + nk - 1 + window - 1].
  const int offset = geometry.offset, window = geometry.window;
  const int t_begin = j0 - offset > 0 ? j0 - offset : 0;
  const int t_last = j0 + nk - 1 + window - offset;  // one past the last such query (< 2**31)
  const int t_end = window > 0 ? (t_last < T_len ? t_last : T_len) : t_begin;
  // Row i, the key j = j0 + 8 warp + i, is seen by column c, the query at position
  // p = offset + t0 + c, when j <= p < j + window: 0 <= c - (j - offset - t0) < window.
  Band band;
  band.lo = 0;
  band.hi = window;
  band.dead = 0u;
  for (int g = 0; g < group; ++g) {
    const int64_t head_row0 =
        (int64_t{b} * params.heads + int64_t{kv_head} * group + g) * T_len;
    for (int t0 = t_begin; t0 < t_end; t0 += kTile) {  // block-uniform
      const int nq = t_end - t0 < kTile ? t_end - t0 : kTile;
      const int64_t row0 = head_row0 + t0;
      const T* q_rows = q + row0 * D;
      const T* dout_rows = dout + row0 * Dv;
      acc_t s[kRowsPerWarp], dp[kRowsPerWarp];  // row: key 8 warp + i; column: query `lane`
      tile_scores<T>(smem, k_rows, nk, acc_t(1), q_rows, nq, scale, D, warp, lane, s);
      tile_scores<T>(smem, v_rows, nk, acc_t(1), dout_rows, nq, acc_t(1), Dv, warp, lane, dp);
      const acc_t query_lse = lane < nq ? lse[row0 + lane] : neg_inf;
      const acc_t query_delta = lane < nq ? delta[row0 + lane] : acc_t(0);
      band.base = j0 - offset - t0 + warp * kRowsPerWarp;
      band.n = nq;
      __syncwarp();  // every lane is done reading the warp's previous weights
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const bool live = band.sees(i, lane) && query_lse != neg_inf;
        const acc_t prob = live ? exp_acc(s[i] - query_lse) : acc_t(0);
        smem.weights[0][warp][i][lane] = prob;
        smem.weights[1][warp][i][lane] = live ? prob * (dp[i] - query_delta) : acc_t(0);
      }
      if (has_dv_columns) {
        accumulate_slice<T, kChunks>(smem, 0, dout_rows, nq, Dv, col0, acc_t(1), band, warp, lane,
                                     dv_acc);
      }
      if (has_dk_columns) {
        accumulate_slice<T, kChunks>(smem, 1, q_rows, nq, D, col0, scale, band, warp, lane,
                                     dk_acc);
      }
    }
  }

  T* __restrict__ dk = static_cast<T*>(params.dk);
  T* __restrict__ dv = static_cast<T*>(params.dv);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r < nk) {
      const int64_t row = key_row0 + r;
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int col = col0 + lane + 32 * j;
        if (col < D) dk[row * D + col] = from_acc<T>(dk_acc[i][j]);
        if (col < Dv) dv[row * Dv + col] = from_acc<T>(dv_acc[i][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

constexpr int64_t kMaxExtent = kLocalAttentionMaxExtent;  // largest H, S, D, Dv (int indices)
constexpr int64_t kMaxGridBlocks = 0x7fffffffLL;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Params>
bool valid_sizes(const Params& params) {
  return params.batch >= 0 && params.heads >= 0 && params.kv_heads >= 1 &&
         params.heads % params.kv_heads == 0 && params.seq_len >= 0 &&
         params.context_len >= params.seq_len && params.dim >= 0 && params.dim_v >= 0 &&
         params.heads <= kMaxExtent && params.context_len <= kMaxExtent &&
         params.dim <= kMaxExtent && params.dim_v <= kMaxExtent;
}

// Geometry with `num_tiles` row tiles per head and slices of kCols feature columns covering
// `columns` (at least one slice).
template <typename Params>
Geometry make_geometry(const Params& params, int64_t num_tiles, int64_t columns, int kCols) {
  Geometry geometry;
  geometry.group = static_cast<int>(params.heads / params.kv_heads);
  geometry.offset = static_cast<int>(params.context_len - params.seq_len);
  // A window of S or more sees every key j <= p; clamping keeps the index arithmetic small.
  geometry.window = static_cast<int>(
      params.window < 0 ? 0 : (params.window > params.context_len ? params.context_len
                                                                  : params.window));
  geometry.num_tiles = static_cast<unsigned>(num_tiles);
  geometry.num_slices = static_cast<unsigned>(columns > kCols ? ceil_div(columns, kCols) : 1);
  return geometry;
}

// Blocks of a grid over `heads` x `num_tiles` x slices of kCols columns covering `columns`;
// -1 when it reaches 2**31.
inline int64_t grid_blocks(int64_t heads, int64_t num_tiles, int64_t columns, int kCols) {
  if (heads == 0 || num_tiles == 0) return 0;
  const int64_t per_head = num_tiles * (columns > kCols ? ceil_div(columns, kCols) : 1);
  if (heads > kMaxGridBlocks / per_head) return -1;
  return heads * per_head;
}

// Slices of 64 columns when they suffice (and always for float64), else of 128.
template <typename T>
constexpr bool use_wide_slices(int64_t columns) {
  return max_chunks<T>() == 4 && columns > 64;
}

template <typename T, int kChunks>
cudaError_t launch_fwd_kernel(const LocalAttentionFwdParams& params, cudaStream_t stream) {
  const int64_t tiles = ceil_div(params.seq_len, kTile);
  const int64_t blocks =
      grid_blocks(params.batch * params.heads, tiles, params.dim_v, kChunks * 32);
  if (blocks < 0) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  local_attention_fwd_kernel<T, kChunks><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      params, make_geometry(params, tiles, params.dim_v, kChunks * 32));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const LocalAttentionFwdParams& params, cudaStream_t stream) {
  if constexpr (max_chunks<T>() == 4) {
    if (use_wide_slices<T>(params.dim_v)) return launch_fwd_kernel<T, 4>(params, stream);
  }
  return launch_fwd_kernel<T, 2>(params, stream);
}

// Blocks for a grid-stride loop over `rows` rows, one warp each (capped; the kernel strides).
inline unsigned stride_grid(int64_t rows) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  const int64_t blocks = ceil_div(rows, kWarps);
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T, int kChunks>
void launch_dq_kernel(const LocalAttentionBwdParams& params, int64_t blocks, cudaStream_t stream) {
  local_attention_bwd_dq_kernel<T, kChunks><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      params, make_geometry(params, ceil_div(params.seq_len, kTile), params.dim, kChunks * 32));
}

template <typename T, int kChunks>
void launch_dkdv_kernel(const LocalAttentionBwdParams& params, int64_t columns, int64_t blocks,
                        cudaStream_t stream) {
  local_attention_bwd_dkdv_kernel<T, kChunks>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          params,
          make_geometry(params, ceil_div(params.context_len, kTile), columns, kChunks * 32));
}

template <typename T>
cudaError_t launch_bwd(const LocalAttentionBwdParams& params, cudaStream_t stream) {
  // Both grids are checked before anything is launched: a refused call writes nothing.
  const bool wide_dq = use_wide_slices<T>(params.dim);
  const int64_t dq_blocks = grid_blocks(params.batch * params.heads,
                                        ceil_div(params.seq_len, kTile), params.dim,
                                        wide_dq ? 128 : 64);
  const int64_t columns = params.dim > params.dim_v ? params.dim : params.dim_v;
  const bool wide_dkdv = use_wide_slices<T>(columns);
  const int64_t dkdv_blocks = grid_blocks(params.batch * params.kv_heads,
                                          ceil_div(params.context_len, kTile), columns,
                                          wide_dkdv ? 128 : 64);
  if (dq_blocks < 0 || dkdv_blocks < 0) return cudaErrorInvalidValue;

  const int64_t rows = params.batch * params.heads * params.seq_len;
  if (rows > 0) {
    local_attention_bwd_delta_kernel<T><<<stride_grid(rows), kThreads, 0, stream>>>(params);
    if (wide_dq) {
      launch_dq_kernel<T, max_chunks<T>()>(params, dq_blocks, stream);
    } else {
      launch_dq_kernel<T, 2>(params, dq_blocks, stream);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  // Runs without queries too: dk and dv are zero then.
  if (dkdv_blocks > 0) {
    if (wide_dkdv) {
      launch_dkdv_kernel<T, max_chunks<T>()>(params, columns, dkdv_blocks, stream);
    } else {
      launch_dkdv_kernel<T, 2>(params, columns, dkdv_blocks, stream);
    }
  }
  return cudaGetLastError();
}

// A pointer the kernels need: non-null unless its tensor has no elements (size 0 along `size`).
inline bool present(const void* pointer, int64_t size) { return pointer != nullptr || size == 0; }

}  // namespace

cudaError_t local_attention_fwd_launch(const LocalAttentionFwdParams& params,
                                       cudaStream_t stream) {
  if (!valid_sizes(params)) return cudaErrorInvalidValue;
  if (params.batch * params.heads * params.seq_len == 0) return cudaSuccess;
  const int64_t D = params.dim, Dv = params.dim_v;
  if (!present(params.q, D) || !present(params.k, D) || !present(params.v, Dv) ||
      !present(params.out, Dv) || params.lse == nullptr)
    return cudaErrorInvalidValue;
  return attention::dispatch_dtype(params.dtype, [&](auto tag) {
    return launch_fwd<decltype(tag)>(params, stream);
  });
}

cudaError_t local_attention_bwd_launch(const LocalAttentionBwdParams& params,
                                       cudaStream_t stream) {
  if (!valid_sizes(params)) return cudaErrorInvalidValue;
  if (params.batch * params.kv_heads * params.context_len == 0) return cudaSuccess;
  // Tensors without elements may have no storage (nullptr); the kernels never touch them.
  const int64_t rows = params.batch * params.heads * params.seq_len;
  const int64_t D = params.dim, Dv = params.dim_v;
  if (!present(params.k, D) || !present(params.dk, D) || !present(params.v, Dv) ||
      !present(params.dv, Dv))
    return cudaErrorInvalidValue;
  if (rows > 0 && (!present(params.q, D) || !present(params.dq, D) ||
                   !present(params.dout, Dv) || !present(params.out, Dv) ||
                   params.dlse == nullptr || params.lse == nullptr || params.delta == nullptr))
    return cudaErrorInvalidValue;
  return attention::dispatch_dtype(params.dtype, [&](auto tag) {
    return launch_bwd<decltype(tag)>(params, stream);
  });
}

}  // namespace cuda
}  // namespace l2m
