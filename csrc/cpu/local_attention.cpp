// CPU kernels of the local (causal, sliding-window) attention (interface: local_attention.h).
//
// FlashAttention on the CPU: no T x S score matrix is ever formed. Work units are
// (batch, kv head, block of queries), the block holding the queries of every query head that shares
// the kv head, so each K/V tile is converted once and reused by all of them while it sits in L1/L2.
// A unit walks its visible key range in tiles of kKeyTile keys: scores = Q K^T for the tile (a
// register-blocked micro-kernel), an online softmax per row in the accumulation type (float32;
// float64 for float64 input), and O += P V. Only keys p - window < j <= p are visible to the
// query at position p; the masked part of a tile is set to exactly zero before it can be
// multiplied with anything, and a tile whose V (or, in the backward, K / dO / Q) holds a non-finite
// value is reduced over each row's visible columns only, so that a NaN or inf a query cannot see
// never reaches its result (0 * inf would).
//
// Backward (FlashAttention-2): delta_i = <dout_i, out_i> - dlse_i (a pre-pass), then
//   pass 1, parallel over query blocks: recompute S and P = exp(S - lse), dP = dO V^T,
//           dS = P * (dP - delta), dq += dS K;
//   pass 2, parallel over key blocks: for every query that sees the block, recompute S^T, P^T and
//           dS^T the same way, dv += P^T dO, dk += dS^T (scale q).
// Each output row is owned by one unit and reduced in a fixed order: no atomics, no per-thread
// partial sums, bitwise identical results for any thread count.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "local_attention.h"
#include "convert.h"
#include "tile_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// Tiles of kKeyTile (tile_gemm.h) keys in the forward and backward pass 1, key blocks and query
// tiles of as many in pass 2.
// Query rows per forward / pass-1 unit, all grouped heads together: enough to reuse each K/V tile,
// few enough that the unit's tiles stay in L1/L2 and that masking wastes little of a tile.
constexpr int64_t kUnitRows = 64;

// The i-th of n blocks in the order 0, n-1, 1, n-2, ...: causal units differ in cost (early
// queries see fewer keys, early keys are seen by more queries), and at::parallel_for hands each
// thread a contiguous range of units, so alternating cheap and costly ones balances the threads.
inline int64_t folded(int64_t i, int64_t n) {
  return (i % 2 == 0) ? i / 2 : n - 1 - i / 2;
}

// C[r] += sum over d in [first[r], last[r]) of A[r, d] * B[d]: the product restricted to each row's
// visible columns, for the rare tiles whose B holds a non-finite value at a position some row must
// not see (masked A entries are exact zeros, but 0 * inf = NaN).
template <typename acc_t>
void gemm_visible(int64_t rows, int64_t cols, const int64_t* first, const int64_t* last,
                  const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t* c, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* c_row = c + r * ldc;
    for (int64_t d = first[r]; d < last[r]; ++d) {
      const acc_t a_value = a[r * lda + d];
      const acc_t* b_row = b + d * ldb;
#pragma omp simd
      for (int64_t col = 0; col < cols; ++col) {
        c_row[col] += a_value * b_row[col];
      }
    }
  }
}

// C[rows x cols] += A[rows x depth] * B[depth x cols] for an A whose row r is zero outside its
// visible columns [first[r], last[r]): the whole product, or, when B holds a non-finite value, the
// product over each row's visible columns only (gemm_visible).
template <typename acc_t>
void gemm_masked(int64_t rows, int64_t cols, int64_t depth, const int64_t* first,
                 const int64_t* last, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                 acc_t* c, int64_t ldc) {
  if (all_finite(b, depth * ldb)) {
    gemm(rows, cols, depth, a, lda, b, ldb, c, ldc, /*accumulate=*/true);
  } else {
    gemm_visible(rows, cols, first, last, a, lda, b, ldb, c, ldc);
  }
}

// ---- geometry ----

struct Geometry {
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;
  int64_t group;        // query heads per kv head
  int64_t seq_len;      // T
  int64_t context_len;  // S
  int64_t offset;       // S - T: position of query 0
  int64_t window;       // in [0, S]: keys p - window < j <= p
  int64_t dim;
  int64_t dim_v;
  int64_t d_pad;  // dim and dim_v rounded up to the vector width: the rows of the tiles
  int64_t dv_pad;
};

template <typename acc_t, typename Params>
Geometry geometry_of(const Params& params) {
  Geometry g{};
  g.batch = params.batch;
  g.heads = params.heads;
  g.kv_heads = params.kv_heads;
  g.group = params.heads / params.kv_heads;
  g.seq_len = params.seq_len;
  g.context_len = params.context_len;
  g.offset = params.context_len - params.seq_len;
  // A window of S or more sees every key j <= p; clamping keeps the index arithmetic small.
  g.window = std::clamp<int64_t>(params.window, 0, params.context_len);
  g.dim = params.dim;
  g.dim_v = params.dim_v;
  g.d_pad = round_up(params.dim, Simd<acc_t>::kWidth);
  g.dv_pad = round_up(params.dim_v, Simd<acc_t>::kWidth);
  return g;
}

// Unit `unit` of the num_blocks units of each (batch, kv head), blocks in the folded order.
struct UnitCoords {
  int64_t head_group;  // b * Hkv + hkv
  int64_t block;
  int64_t b;
  int64_t hkv;
  int64_t kv_base;  // row of the kv head's key 0 in k and v
};

inline UnitCoords unit_coords(const Geometry& g, int64_t unit, int64_t num_blocks) {
  const int64_t head_group = unit / num_blocks;
  return {head_group, folded(unit % num_blocks, num_blocks), head_group / g.kv_heads,
          head_group % g.kv_heads, head_group * g.context_len};
}

// The forward / pass-1 units: (batch, kv head, block of block_q queries), a unit holding its
// block's queries of every query head that shares the kv head.
struct QueryBlocks {
  int64_t block_q;     // queries of one head per unit
  int64_t num_blocks;  // units per (batch, kv head)
  int64_t rows_cap;    // rows of a full unit
  int64_t units;
};

inline QueryBlocks query_blocks(const Geometry& g) {
  const int64_t block_q = std::max<int64_t>(1, kUnitRows / std::max<int64_t>(g.group, 1));
  const int64_t num_blocks = ceil_div(g.seq_len, block_q);
  return {block_q, num_blocks, g.group * block_q, g.batch * g.kv_heads * num_blocks};
}

// One such unit: its row r = gi * nq + i is query t0 + i of query head hkv * group + gi.
struct QueryUnit : UnitCoords {
  int64_t t0;
  int64_t nq;         // queries of each head
  int64_t rows;       // group * nq
  int64_t key_begin;  // [key_begin, key_end): the keys some query of the unit sees
  int64_t key_end;

  int64_t query(int64_t r) const { return t0 + r % nq; }
  // Row r's row (b, h, t) in q, dout, out.
  int64_t row(const Geometry& g, int64_t r) const {
    return (b * g.heads + hkv * g.group + r / nq) * g.seq_len + query(r);
  }
};

inline QueryUnit query_unit(const Geometry& g, const QueryBlocks& blocks, int64_t unit) {
  QueryUnit u;
  static_cast<UnitCoords&>(u) = unit_coords(g, unit, blocks.num_blocks);
  u.t0 = u.block * blocks.block_q;
  u.nq = std::min(blocks.block_q, g.seq_len - u.t0);
  u.rows = g.group * u.nq;
  u.key_begin = std::max<int64_t>(0, g.offset + u.t0 - g.window + 1);
  u.key_end = g.offset + u.t0 + u.nq;
  return u;
}

// Columns [first, last) of a key tile starting at key j0 (nk keys) visible to the query at
// position `position`.
inline void visible_keys(int64_t position, int64_t window, int64_t j0, int64_t nk, int64_t* first,
                         int64_t* last) {
  const int64_t begin = std::max<int64_t>(position - window + 1 - j0, 0);
  const int64_t end = std::min<int64_t>(position + 1 - j0, nk);
  *first = begin;
  *last = std::max(begin, end);
}

// Columns [first, last) of a query tile (queries at positions p0, p0 + 1, ..., nq of them) that
// see key j: j <= p <= j + window - 1.
inline void visible_queries(int64_t key, int64_t window, int64_t p0, int64_t nq, int64_t* first,
                            int64_t* last) {
  const int64_t begin = std::max<int64_t>(key - p0, 0);
  const int64_t end = std::min<int64_t>(key + window - p0, nq);
  *first = begin;
  *last = std::max(begin, end);
}

// ---- forward ----

template <typename scalar_t>
void local_attention_fwd_impl(const LocalAttentionFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const Geometry g = geometry_of<acc_type<scalar_t>>(params);
  const auto* q = static_cast<const scalar_t*>(params.q);
  const auto* k = static_cast<const scalar_t*>(params.k);
  const auto* v = static_cast<const scalar_t*>(params.v);
  auto* out = static_cast<scalar_t*>(params.out);
  auto* lse = static_cast<acc_t*>(params.lse);
  const acc_t scale = static_cast<acc_t>(params.scale);

  const int64_t dim = g.dim, dim_v = g.dim_v, d_pad = g.d_pad, dv_pad = g.dv_pad;
  const QueryBlocks blocks = query_blocks(g);
  const int64_t rows_cap = blocks.rows_cap;

  at::parallel_for(0, blocks.units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    std::vector<acc_t> q_rows(rows_cap * d_pad), keys_t(std::max<int64_t>(dim, 1) * kKeys);
    std::vector<acc_t> values(kKeys * dv_pad), scores(rows_cap * kKeys), acc_out(rows_cap * dv_pad);
    std::vector<acc_t> row_max(rows_cap), row_sum(rows_cap), staging(std::max(dim, dim_v) + 1);
    std::vector<int64_t> first(rows_cap), last(rows_cap), position(rows_cap);
    std::vector<acc_t> out_row(dv_pad + 1);

    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const QueryUnit u = query_unit(g, blocks, unit);
      const int64_t rows = u.rows;

      // q scaled once, as the reference scales q before the matmul.
      for (int64_t r = 0; r < rows; ++r) {
        load_padded(q + params.q_rows.offset(u.row(g, r)), dim, d_pad, scale, staging.data(),
                    q_rows.data() + r * d_pad);
        position[r] = g.offset + u.query(r);
        row_max[r] = kNegInf;
        row_sum[r] = 0;
      }
      std::fill(acc_out.begin(), acc_out.begin() + rows * dv_pad, acc_t(0));

      for (int64_t j0 = u.key_begin; j0 < u.key_end; j0 += kKeys) {
        const int64_t nk = std::min(kKeys, u.key_end - j0);
        if (nk < kKeys) {
          std::fill(keys_t.begin(), keys_t.end(), acc_t(0));
          std::fill(values.begin() + nk * dv_pad, values.end(), acc_t(0));
        }
        for (int64_t c = 0; c < nk; ++c) {
          const acc_t* key =
              load_row(k + params.k_rows.offset(u.kv_base + j0 + c), dim, staging.data());
          scatter_transposed(key, dim, c, keys_t.data(), kKeys);
          load_padded(v + params.v_rows.offset(u.kv_base + j0 + c), dim_v, dv_pad, acc_t(1),
                      staging.data(), values.data() + c * dv_pad);
        }
        for (int64_t r = 0; r < rows; ++r) {
          visible_keys(position[r], g.window, j0, nk, &first[r], &last[r]);
        }

        gemm(rows, kKeys, dim, q_rows.data(), d_pad, keys_t.data(), kKeys, scores.data(), kKeys,
             /*accumulate=*/false);

        // Online softmax: P = exp(S - running max), rescale the running sum and output.
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s_row = scores.data() + r * kKeys;
          const int64_t begin = first[r], end = last[r];
          if (begin >= end) {
            std::fill(s_row, s_row + kKeys, acc_t(0));
            continue;
          }
          acc_t tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
          for (int64_t c = begin; c < end; ++c) {
            tile_max = std::max(tile_max, s_row[c]);
          }
          // A NaN score is not caught by these comparisons; it reaches exp below and makes the
          // row's sum (hence out and lse) NaN, as in the reference.
          const SoftmaxStep<acc_t> step = softmax_step(row_max[r], tile_max);
          acc_t tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
          for (int64_t c = 0; c < kKeys; ++c) {
            const acc_t e = exp_acc(s_row[c] - step.shift);
            const acc_t prob = (c >= begin && c < end) ? e : acc_t(0);
            s_row[c] = prob;
            tile_sum += prob;
          }
          row_sum[r] = row_sum[r] * step.correction + tile_sum;
          row_max[r] = step.new_max;
          rescale_row(acc_out.data() + r * dv_pad, dv_pad, step.correction);
        }

        gemm_masked(rows, dv_pad, nk, first.data(), last.data(), scores.data(), kKeys,
                    values.data(), dv_pad, acc_out.data(), dv_pad);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = u.row(g, r);
        store_softmax_row(acc_out.data() + r * dv_pad, dim_v, row_sum[r], row_max[r],
                          out_row.data(), out + row * dim_v, lse + row);
      }
    }
  });
}

// ---- backward ----

// The backward's tensors, typed.
template <typename scalar_t>
struct BwdTensors {
  using acc_t = acc_type<scalar_t>;

  explicit BwdTensors(const LocalAttentionBwdParams& params)
      : dout(static_cast<const scalar_t*>(params.dout)),
        q(static_cast<const scalar_t*>(params.q)),
        k(static_cast<const scalar_t*>(params.k)),
        v(static_cast<const scalar_t*>(params.v)),
        out(static_cast<const scalar_t*>(params.out)),
        dlse(static_cast<const acc_t*>(params.dlse)),
        lse(static_cast<const acc_t*>(params.lse)),
        dq(static_cast<scalar_t*>(params.dq)),
        dk(static_cast<scalar_t*>(params.dk)),
        dv(static_cast<scalar_t*>(params.dv)) {}

  const scalar_t* dout;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* out;
  const acc_t* dlse;
  const acc_t* lse;
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
};

// delta_i = <dout_i, out_i> - dlse_i for every query row.
template <typename scalar_t>
std::vector<acc_type<scalar_t>> backward_deltas(const LocalAttentionBwdParams& params,
                                                const BwdTensors<scalar_t>& tensors) {
  using acc_t = acc_type<scalar_t>;
  const int64_t num_rows = params.batch * params.heads * params.seq_len, dim_v = params.dim_v;
  const scalar_t* dout = tensors.dout;
  const scalar_t* out = tensors.out;
  const acc_t* dlse = tensors.dlse;
  std::vector<acc_t> delta(num_rows);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim_v, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> dout_buffer(dim_v + 1), out_buffer(dim_v + 1);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const acc_t* d = load_row(dout + params.dout_rows.offset(row), dim_v, dout_buffer.data());
      const acc_t* o = load_row(out + row * dim_v, dim_v, out_buffer.data());
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < dim_v; ++e) {
        dot += d[e] * o[e];
      }
      delta[row] = dot - dlse[row];
    }
  });
  return delta;
}

// Pass 1: dq, parallel over (batch, kv head, query block) units as in the forward.
template <typename scalar_t>
void local_attention_bwd_dq(const LocalAttentionBwdParams& params, const Geometry& g,
                            const BwdTensors<scalar_t>& tensors, const acc_type<scalar_t>* delta) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* q = tensors.q;
  const scalar_t* k = tensors.k;
  const scalar_t* v = tensors.v;
  const scalar_t* dout = tensors.dout;
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t dim = g.dim, dim_v = g.dim_v, d_pad = g.d_pad, dv_pad = g.dv_pad;
  const QueryBlocks blocks = query_blocks(g);
  const int64_t rows_cap = blocks.rows_cap;

  at::parallel_for(0, blocks.units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    std::vector<acc_t> q_rows(rows_cap * d_pad), dout_rows(rows_cap * dv_pad);
    std::vector<acc_t> keys_t(std::max<int64_t>(dim, 1) * kKeys), key_rows(kKeys * d_pad);
    std::vector<acc_t> values_t(std::max<int64_t>(dim_v, 1) * kKeys);
    std::vector<acc_t> scores(rows_cap * kKeys), dprobs(rows_cap * kKeys), dq_acc(rows_cap * d_pad);
    std::vector<acc_t> row_lse(rows_cap), row_delta(rows_cap), staging(std::max(dim, dim_v) + 1);
    std::vector<acc_t> dq_row(d_pad + 1);
    std::vector<int64_t> first(rows_cap), last(rows_cap), position(rows_cap);

    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const QueryUnit u = query_unit(g, blocks, unit);
      const int64_t rows = u.rows;

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = u.row(g, r);
        load_padded(q + params.q_rows.offset(row), dim, d_pad, scale, staging.data(),
                    q_rows.data() + r * d_pad);
        load_padded(dout + params.dout_rows.offset(row), dim_v, dv_pad, acc_t(1), staging.data(),
                    dout_rows.data() + r * dv_pad);
        row_lse[r] = tensors.lse[row];
        row_delta[r] = delta[row];
        position[r] = g.offset + u.query(r);
      }
      std::fill(dq_acc.begin(), dq_acc.begin() + rows * d_pad, acc_t(0));

      for (int64_t j0 = u.key_begin; j0 < u.key_end; j0 += kKeys) {
        const int64_t nk = std::min(kKeys, u.key_end - j0);
        if (nk < kKeys) {
          std::fill(keys_t.begin(), keys_t.end(), acc_t(0));
          std::fill(values_t.begin(), values_t.end(), acc_t(0));
          std::fill(key_rows.begin() + nk * d_pad, key_rows.end(), acc_t(0));
        }
        for (int64_t c = 0; c < nk; ++c) {
          acc_t* key_row = key_rows.data() + c * d_pad;
          load_padded(k + params.k_rows.offset(u.kv_base + j0 + c), dim, d_pad, acc_t(1),
                      staging.data(), key_row);
          scatter_transposed(key_row, dim, c, keys_t.data(), kKeys);
          const acc_t* value =
              load_row(v + params.v_rows.offset(u.kv_base + j0 + c), dim_v, staging.data());
          scatter_transposed(value, dim_v, c, values_t.data(), kKeys);
        }
        for (int64_t r = 0; r < rows; ++r) {
          visible_keys(position[r], g.window, j0, nk, &first[r], &last[r]);
        }

        gemm(rows, kKeys, dim, q_rows.data(), d_pad, keys_t.data(), kKeys, scores.data(), kKeys,
             /*accumulate=*/false);
        gemm(rows, kKeys, dim_v, dout_rows.data(), dv_pad, values_t.data(), kKeys,
             dprobs.data(), kKeys, /*accumulate=*/false);

        // dS = P * (dP - delta) on the visible columns, exact zeros elsewhere (stored in scores).
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s_row = scores.data() + r * kKeys;
          const acc_t* dp_row = dprobs.data() + r * kKeys;
          const int64_t begin = first[r], end = last[r];
          const acc_t row_lse_r = row_lse[r], row_delta_r = row_delta[r];
          if (begin >= end || row_lse_r == kNegInf) {
            std::fill(s_row, s_row + kKeys, acc_t(0));
            if (begin < end) {  // visible, but the row's softmax is empty: P = 0
              first[r] = last[r] = 0;
            }
            continue;
          }
#pragma omp simd
          for (int64_t c = 0; c < kKeys; ++c) {
            const acc_t prob = exp_acc(s_row[c] - row_lse_r);
            const acc_t ds = prob * (dp_row[c] - row_delta_r);
            s_row[c] = (c >= begin && c < end) ? ds : acc_t(0);
          }
        }

        gemm_masked(rows, d_pad, nk, first.data(), last.data(), scores.data(), kKeys,
                    key_rows.data(), d_pad, dq_acc.data(), d_pad);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = u.row(g, r);
        const acc_t* acc_row = dq_acc.data() + r * d_pad;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) {
          dq_row[d] = acc_row[d] * scale;
        }
        store_row(tensors.dq + row * dim, dq_row.data(), dim);
      }
    }
  });
}

// Pass 2: dk and dv, parallel over (batch, kv head, key block) units; each unit visits every
// query (of every grouped head) that sees one of its keys, in tiles of kKeyTile queries.
template <typename scalar_t>
void local_attention_bwd_dkv(const LocalAttentionBwdParams& params, const Geometry& g,
                             const BwdTensors<scalar_t>& tensors,
                             const acc_type<scalar_t>* delta) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  constexpr int64_t kQueries = kKeyTile<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* q = tensors.q;
  const scalar_t* dout = tensors.dout;
  const acc_t scale = static_cast<acc_t>(params.scale);

  const int64_t dim = g.dim, dim_v = g.dim_v, d_pad = g.d_pad, dv_pad = g.dv_pad;
  const int64_t num_blocks = ceil_div(g.context_len, kKeys);
  const int64_t units = g.batch * g.kv_heads * num_blocks;

  at::parallel_for(0, units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    std::vector<acc_t> key_rows(kKeys * d_pad), value_rows(kKeys * dv_pad);
    std::vector<acc_t> q_tile(kQueries * d_pad), q_tile_t(std::max<int64_t>(dim, 1) * kQueries);
    std::vector<acc_t> dout_tile(kQueries * dv_pad);
    std::vector<acc_t> dout_tile_t(std::max<int64_t>(dim_v, 1) * kQueries);
    std::vector<acc_t> probs(kKeys * kQueries), dscores(kKeys * kQueries);
    std::vector<acc_t> dk_acc(kKeys * d_pad), dv_acc(kKeys * dv_pad);
    std::vector<acc_t> tile_lse(kQueries), tile_delta(kQueries), staging(std::max(dim, dim_v) + 1);
    std::vector<int64_t> first(kKeys), last(kKeys);

    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const UnitCoords u = unit_coords(g, unit, num_blocks);
      const int64_t b = u.b, hkv = u.hkv, kv_base = u.kv_base;
      const int64_t j0 = u.block * kKeys, nk = std::min(kKeys, g.context_len - j0);

      for (int64_t r = 0; r < nk; ++r) {
        load_padded(tensors.k + params.k_rows.offset(kv_base + j0 + r), dim, d_pad, acc_t(1),
                    staging.data(), key_rows.data() + r * d_pad);
        load_padded(tensors.v + params.v_rows.offset(kv_base + j0 + r), dim_v, dv_pad, acc_t(1),
                    staging.data(), value_rows.data() + r * dv_pad);
      }
      std::fill(dk_acc.begin(), dk_acc.begin() + nk * d_pad, acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + nk * dv_pad, acc_t(0));

      // Queries seeing a key of [j0, j0 + nk): positions p in [j0, j0 + nk - 1 + window - 1].
      const int64_t t_begin = std::max<int64_t>(0, j0 - g.offset);
      const int64_t t_end = std::min<int64_t>(g.seq_len, j0 + nk - 1 + g.window - g.offset);
      for (int64_t gi = 0; gi < g.group; ++gi) {
        const int64_t row_base = (b * g.heads + hkv * g.group + gi) * g.seq_len;
        for (int64_t t0 = t_begin; t0 < t_end; t0 += kQueries) {
          const int64_t nq = std::min(kQueries, t_end - t0);
          if (nq < kQueries) {
            std::fill(q_tile_t.begin(), q_tile_t.end(), acc_t(0));
            std::fill(dout_tile_t.begin(), dout_tile_t.end(), acc_t(0));
            std::fill(q_tile.begin() + nq * d_pad, q_tile.end(), acc_t(0));
            std::fill(dout_tile.begin() + nq * dv_pad, dout_tile.end(), acc_t(0));
          }
          for (int64_t c = 0; c < kQueries; ++c) {
            if (c < nq) {
              const int64_t row = row_base + t0 + c;
              acc_t* q_row = q_tile.data() + c * d_pad;
              acc_t* dout_row = dout_tile.data() + c * dv_pad;
              load_padded(q + params.q_rows.offset(row), dim, d_pad, scale, staging.data(), q_row);
              load_padded(dout + params.dout_rows.offset(row), dim_v, dv_pad, acc_t(1),
                          staging.data(), dout_row);
              scatter_transposed(q_row, dim, c, q_tile_t.data(), kQueries);
              scatter_transposed(dout_row, dim_v, c, dout_tile_t.data(), kQueries);
              tile_lse[c] = tensors.lse[row];
              tile_delta[c] = delta[row];
            } else {
              tile_lse[c] = kNegInf;
              tile_delta[c] = 0;
            }
          }
          for (int64_t r = 0; r < nk; ++r) {
            visible_queries(j0 + r, g.window, g.offset + t0, nq, &first[r], &last[r]);
          }

          gemm(nk, kQueries, dim, key_rows.data(), d_pad, q_tile_t.data(), kQueries,
               probs.data(), kQueries, /*accumulate=*/false);
          gemm(nk, kQueries, dim_v, value_rows.data(), dv_pad, dout_tile_t.data(), kQueries,
               dscores.data(), kQueries, /*accumulate=*/false);

          // P^T and dS^T on the visible (key, query) pairs, exact zeros elsewhere; queries whose
          // softmax is empty (lse = -inf) contribute nothing.
          for (int64_t r = 0; r < nk; ++r) {
            acc_t* p_row = probs.data() + r * kQueries;
            acc_t* ds_row = dscores.data() + r * kQueries;
            const int64_t begin = first[r], end = last[r];
            if (begin >= end) {
              std::fill(p_row, p_row + kQueries, acc_t(0));
              std::fill(ds_row, ds_row + kQueries, acc_t(0));
              continue;
            }
#pragma omp simd
            for (int64_t c = 0; c < kQueries; ++c) {
              const acc_t query_lse = tile_lse[c];
              const bool live = c >= begin && c < end && query_lse != kNegInf;
              const acc_t prob = live ? exp_acc(p_row[c] - query_lse) : acc_t(0);
              const acc_t ds = prob * (ds_row[c] - tile_delta[c]);
              p_row[c] = prob;
              ds_row[c] = live ? ds : acc_t(0);
            }
          }

          gemm_masked(nk, dv_pad, nq, first.data(), last.data(), probs.data(), kQueries,
                      dout_tile.data(), dv_pad, dv_acc.data(), dv_pad);
          gemm_masked(nk, d_pad, nq, first.data(), last.data(), dscores.data(), kQueries,
                      q_tile.data(), d_pad, dk_acc.data(), d_pad);
        }
      }

      for (int64_t r = 0; r < nk; ++r) {
        store_row(tensors.dk + (kv_base + j0 + r) * dim, dk_acc.data() + r * d_pad, dim);
        store_row(tensors.dv + (kv_base + j0 + r) * dim_v, dv_acc.data() + r * dv_pad, dim_v);
      }
    }
  });
}

template <typename scalar_t>
void local_attention_bwd_impl(const LocalAttentionBwdParams& params) {
  const Geometry g = geometry_of<acc_type<scalar_t>>(params);
  const BwdTensors<scalar_t> tensors(params);
  const auto delta = backward_deltas(params, tensors);
  local_attention_bwd_dq(params, g, tensors, delta.data());
  local_attention_bwd_dkv(params, g, tensors, delta.data());
}

}  // namespace

void local_attention_fwd(const LocalAttentionFwdParams& params) {
  TORCH_CHECK_VALUE(params.kv_heads >= 1 && params.heads % params.kv_heads == 0 &&
                        params.context_len >= params.seq_len,
                    "local_attention_fwd: inconsistent sizes");
  L2M_DISPATCH_FLOATING(params, "local_attention_fwd", local_attention_fwd_impl);
}

void local_attention_bwd(const LocalAttentionBwdParams& params) {
  TORCH_CHECK_VALUE(params.kv_heads >= 1 && params.heads % params.kv_heads == 0 &&
                        params.context_len >= params.seq_len,
                    "local_attention_bwd: inconsistent sizes");
  L2M_DISPATCH_FLOATING(params, "local_attention_bwd", local_attention_bwd_impl);
}

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
