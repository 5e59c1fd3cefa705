// CPU kernels of the block memory reads (interface: block_memory.h; semantics:
// l2m_kernels/ops/block_memory/reference.py).
//
// The query rows of a (batch, kv head) pair g are the G * T rows of its G query heads, numbered
// m = gi * T + t as the reference groups them; in (B, H, T) order they are the contiguous rows
// (b * Hkv + g) * G * T + m, so a tile of them is a range.
//
// block_topk_fwd, scores: units (batch, kv head, tile of blocks). With R = 1 one unit per
// (batch, kv head) sums the group's scaled query rows once and scores each block with one dot
// product. With R > 1 a unit stages the valid representatives of its blocks transposed
// (D x blocks * R_pad, invalid ones as zeros), walks the G * T query rows in tiles of kReadRows,
// computes every row's scores against them with the gemm micro-kernel (tile_gemm.h), takes each
// row's maximum over the block's valid representatives (skipping the others, whatever they hold)
// and adds it to the block's score, rows in increasing order: the sums are bitwise independent of
// the thread count. Selection, one unit per (batch, kv head): the k first blocks in the order
// (NaN, then descending score, then smaller index), written in increasing block order.
//
// block_read_fwd: FlashAttention as local_attention.cpp. The K * S selected tokens of each (batch,
// kv head) pair (the blocks indices[b, g, :] in order, one pass per occurrence) are staged once per
// call, in tiles of kKeyTile tokens that may straddle blocks (keys transposed, values as rows).
// Units (batch, kv head, tile of up to kReadRows query rows) walk those tiles: S = (scale Q) K^T by
// the micro-kernel, an online softmax per row in the accumulation type (row sums kept as vectors of
// partial sums), O += P V. Nothing larger than one rows x kKeyTile score tile is formed. A pair of
// at most kDirectRows query rows (decoding) reads its tokens where they lie instead, one dot
// product per row and token.
//
// block_read_bwd: FlashAttention-2, one unit per (batch, kv head). The pair's tiles are staged once
// (keys transposed and as rows, values transposed); for each row tile and token tile,
// P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta) with delta = <dO, O> - dlse, dq += dS K
// (stored once the row tile is done), and dV^T += dO^T P, dK^T += (scale Q)^T dS accumulated per
// token tile in acc scratch. Then every block of the pair is stored once: zeros for blocks not
// selected, else the sum of its occurrences in index order, rounded once. A unit owns all its
// outputs and reduces them in a fixed order: the gradients are bitwise independent of the thread
// count.
//
// Invalid tokens (block_valid false) and padding columns of a tile are staged as zero keys and
// values and their probabilities and dS set to exactly zero, so that whatever their rows hold
// (NaN, inf) never reaches a result; a tile without a valid token is skipped. A row without any
// valid token gets out = 0, lse = -inf and zero gradients.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "block_memory.h"
#include "convert.h"
#include "tile_gemm.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// Query rows per tile, all grouped heads together: enough to reuse each staged key or
// representative tile, few enough that a unit's tiles stay in L2.
constexpr int64_t kReadRows = 128;
// Columns (blocks x padded representatives) per block-scoring unit, at least one block.
constexpr int64_t kScoreCols = 256;

// The sizes shared by the three launchers.
struct BlockGeometry {
  int64_t pairs;      // B * Hkv (batch, kv head) pairs
  int64_t kv_heads;
  int64_t group_rows;  // G * T query rows per pair
  int64_t num_blocks;
  int64_t block_size;  // S (R for block_topk_fwd)
  int64_t dim;
  int64_t dim_v;
  int64_t d_pad;  // dim and dim_v rounded up to the vector width
  int64_t dv_pad;
};

template <typename acc_t, typename Params>
BlockGeometry block_geometry(const Params& params, int64_t block_size, int64_t dim_v) {
  BlockGeometry g{};
  g.pairs = params.batch * params.kv_heads;
  g.kv_heads = params.kv_heads;
  g.group_rows = params.heads / params.kv_heads * params.seq_len;
  g.num_blocks = params.num_blocks;
  g.block_size = block_size;
  g.dim = params.dim;
  g.dim_v = dim_v;
  g.d_pad = round_up(params.dim, Simd<acc_t>::kWidth);
  g.dv_pad = round_up(dim_v, Simd<acc_t>::kWidth);
  return g;
}

// Rows [m0, m0 + rows) of pair `pair` of q (through `q_rows`), scaled, into a rows x d_pad tile.
template <typename scalar_t>
void load_query_tile(const scalar_t* q, const Rows& q_rows, const BlockGeometry& g, int64_t pair,
                     int64_t m0, int64_t rows, acc_type<scalar_t> scale,
                     acc_type<scalar_t>* staging, acc_type<scalar_t>* tile) {
  for (int64_t r = 0; r < rows; ++r) {
    load_padded(q + q_rows.offset(pair * g.group_rows + m0 + r), g.dim, g.d_pad, scale, staging,
                tile + r * g.d_pad);
  }
}

// ---- block_topk_fwd ----

// max over the columns of a row whose `keep` is 0 (the others are -inf: invalid or padding), NaN if
// one of those is NaN (as torch.amax), -inf if there is none; n a multiple of the vector width.
template <typename acc_t>
inline acc_t valid_max(const acc_t* row, const acc_t* keep, int64_t n) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int64_t W = Simd<acc_t>::kWidth;
  const vec neg_inf = vec{} - std::numeric_limits<acc_t>::infinity();
  vec best = neg_inf, nan = vec{};
  for (int64_t c = 0; c < n; c += W) {
    vec x = load_vec(row + c);
    x = load_vec(keep + c) == 0 ? x : neg_inf;
    nan = x != x ? x : nan;
    best = x > best ? x : best;
  }
  acc_t result = best[0];
  for (int64_t lane = 0; lane < W; ++lane) {
    result = best[lane] > result ? best[lane] : result;
    result = nan[lane] != nan[lane] ? nan[lane] : result;
  }
  return result;
}

// The representative validity of block n of batch b, R flags (all true without repr_valid).
inline void repr_flags(const BlockTopkFwdParams& params, int64_t b, int64_t n, bool* flags) {
  for (int64_t r = 0; r < params.num_reprs; ++r) {
    flags[r] = params.repr_valid == nullptr ||
               params.repr_valid[b * params.repr_valid_strides[0] +
                                 n * params.repr_valid_strides[1] + r];
  }
}

template <typename scalar_t>
const scalar_t* repr_block(const BlockTopkFwdParams& params, int64_t pair, int64_t n) {
  const int64_t b = pair / params.kv_heads, g = pair % params.kv_heads;
  return static_cast<const scalar_t*>(params.reprs) + b * params.reprs_strides[0] +
         g * params.reprs_strides[1] + n * params.reprs_strides[2];
}

// R = 1: scores[n] = (sum of the pair's scaled query rows) . reprs[n], in row order.
template <typename scalar_t>
void block_scores_single(const BlockTopkFwdParams& params, const BlockGeometry& g,
                         acc_type<scalar_t>* scores) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const auto* q = static_cast<const scalar_t*>(params.q);
  const acc_t scale = static_cast<acc_t>(params.scale);
  at::parallel_for(0, g.pairs, 1, [&](int64_t pair_begin, int64_t pair_end) {
    std::vector<acc_t> q_sum(g.d_pad), q_row(g.d_pad), staging(g.dim + 1);
    for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
      std::fill(q_sum.begin(), q_sum.end(), acc_t(0));
      for (int64_t m = 0; m < g.group_rows; ++m) {
        load_query_tile(q, params.q_rows, g, pair, m, 1, scale, staging.data(), q_row.data());
#pragma omp simd
        for (int64_t d = 0; d < g.dim; ++d) {
          q_sum[d] += q_row[d];
        }
      }
      const int64_t b = pair / g.kv_heads;
      for (int64_t n = 0; n < g.num_blocks; ++n) {
        bool valid = true;
        repr_flags(params, b, n, &valid);
        acc_t dot = 0;  // a sum over no query rows (T = 0) is 0, whatever the representative holds
        if (valid && g.group_rows > 0) {
          const acc_t* repr = load_row(repr_block<scalar_t>(params, pair, n), g.dim, staging.data());
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < g.dim; ++d) {
            dot += q_sum[d] * repr[d];
          }
        }
        scores[pair * g.num_blocks + n] = valid ? dot : kNegInf;
      }
    }
  });
}

// R > 1: units (pair, tile of blocks), rows x representatives by the micro-kernel.
template <typename scalar_t>
void block_scores_multi(const BlockTopkFwdParams& params, const BlockGeometry& g,
                        acc_type<scalar_t>* scores) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const auto* q = static_cast<const scalar_t*>(params.q);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t reprs = g.block_size, dim = g.dim, d_pad = g.d_pad;
  const int64_t r_pad = round_up(reprs, Simd<acc_t>::kWidth);
  const int64_t tile_blocks = std::max<int64_t>(1, kScoreCols / r_pad);
  const int64_t tiles = ceil_div(g.num_blocks, tile_blocks);

  at::parallel_for(0, g.pairs * tiles, 1, [&](int64_t unit_begin, int64_t unit_end) {
    const int64_t cols_cap = tile_blocks * r_pad;
    std::vector<acc_t> reprs_t(std::max<int64_t>(dim, 1) * cols_cap), q_tile(kReadRows * d_pad);
    std::vector<acc_t> tile_scores(kReadRows * cols_cap), sums(tile_blocks), keep(cols_cap);
    std::vector<acc_t> staging(dim + 1);
    const std::unique_ptr<bool[]> flags(new bool[tile_blocks * std::max<int64_t>(reprs, 1)]);
    const std::unique_ptr<bool[]> any_valid(new bool[tile_blocks]);
    bool* valid = flags.get();

    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t pair = unit / tiles, n0 = (unit % tiles) * tile_blocks;
      const int64_t nb = std::min(tile_blocks, g.num_blocks - n0), cols = nb * r_pad;
      const int64_t b = pair / g.kv_heads;
      std::fill(reprs_t.begin(), reprs_t.end(), acc_t(0));
      for (int64_t i = 0; i < nb; ++i) {
        bool* block_valid = valid + i * reprs;
        repr_flags(params, b, n0 + i, block_valid);
        any_valid[i] = std::any_of(block_valid, block_valid + reprs, [](bool v) { return v; });
        const scalar_t* block = repr_block<scalar_t>(params, pair, n0 + i);
        for (int64_t r = 0; r < r_pad; ++r) {
          keep[i * r_pad + r] = r < reprs && block_valid[r] ? acc_t(0)
                                                             : -std::numeric_limits<acc_t>::infinity();
        }
        for (int64_t r = 0; r < reprs; ++r) {
          if (block_valid[r]) {
            const acc_t* repr = load_row(block + r * dim, dim, staging.data());
            scatter_transposed(repr, dim, i * r_pad + r, reprs_t.data(), cols);
          }
        }
        sums[i] = 0;
      }

      for (int64_t m0 = 0; m0 < g.group_rows; m0 += kReadRows) {
        const int64_t rows = std::min(kReadRows, g.group_rows - m0);
        load_query_tile(q, params.q_rows, g, pair, m0, rows, scale, staging.data(), q_tile.data());
        gemm(rows, cols, dim, q_tile.data(), d_pad, reprs_t.data(), cols, tile_scores.data(), cols,
             /*accumulate=*/false);
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* s_row = tile_scores.data() + r * cols;
          for (int64_t i = 0; i < nb; ++i) {
            sums[i] += valid_max(s_row + i * r_pad, keep.data() + i * r_pad, r_pad);
          }
        }
      }
      for (int64_t i = 0; i < nb; ++i) {
        scores[pair * g.num_blocks + n0 + i] = any_valid[i] ? sums[i] : kNegInf;
      }
    }
  });
}

// indices[pair, :k] = the k first blocks by (NaN, descending score, smaller index), increasing.
template <typename acc_t>
void select_blocks(const BlockTopkFwdParams& params, const BlockGeometry& g,
                   const acc_t* scores) {
  const int64_t k = params.k, num_blocks = g.num_blocks;
  at::parallel_for(0, g.pairs, 1, [&](int64_t pair_begin, int64_t pair_end) {
    std::vector<int64_t> order(num_blocks);
    for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
      const acc_t* s = scores + pair * num_blocks;
      std::iota(order.begin(), order.end(), int64_t(0));
      const auto before = [s](int64_t a, int64_t b) {
        const bool nan_a = std::isnan(s[a]), nan_b = std::isnan(s[b]);
        if (nan_a || nan_b) {
          return nan_a && (!nan_b || a < b);
        }
        return s[a] > s[b] || (s[a] == s[b] && a < b);
      };
      std::nth_element(order.begin(), order.begin() + k, order.end(), before);
      std::sort(order.begin(), order.begin() + k);
      std::copy(order.begin(), order.begin() + k, params.indices + pair * k);
    }
  });
}

template <typename scalar_t>
void block_topk_fwd_impl(const BlockTopkFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const BlockGeometry g = block_geometry<acc_t>(params, params.num_reprs, 0);
  auto* scores = static_cast<acc_t*>(params.scores);
  if (params.num_reprs == 0) {  // no representative at all: every block scores -inf
    std::fill(scores, scores + g.pairs * g.num_blocks, -std::numeric_limits<acc_t>::infinity());
  } else if (params.num_reprs == 1) {
    block_scores_single<scalar_t>(params, g, scores);
  } else {
    block_scores_multi<scalar_t>(params, g, scores);
  }
  select_blocks(params, g, scores);
}

// ---- block_read_fwd / block_read_bwd ----

// Where the selected tokens of one (batch, kv head) pair lie: token j of the K * S is token j % S
// of block indices[j / S].
template <typename scalar_t, typename Params>
struct Selection {
  Selection(const Params& params, const BlockGeometry& g, int64_t pair)
      : params(params), g(g), b(pair / g.kv_heads), indices(params.indices + pair * params.num_selected) {
    const int64_t head = pair % g.kv_heads;
    keys = static_cast<const scalar_t*>(params.block_keys) + b * params.key_strides[0] +
           head * params.key_strides[1];
    values = static_cast<const scalar_t*>(params.block_values) + b * params.value_strides[0] +
             head * params.value_strides[1];
  }

  bool valid(int64_t j) const {
    const int64_t n = indices[j / g.block_size];
    return params.block_valid == nullptr ||
           params.block_valid[b * params.valid_strides[0] + n * params.valid_strides[1] +
                              j % g.block_size];
  }
  const scalar_t* key(int64_t j) const {
    return keys + indices[j / g.block_size] * params.key_strides[2] + (j % g.block_size) * g.dim;
  }
  const scalar_t* value(int64_t j) const {
    return values + indices[j / g.block_size] * params.value_strides[2] +
           (j % g.block_size) * g.dim_v;
  }

  const Params& params;
  const BlockGeometry& g;
  int64_t b;
  const int64_t* indices;
  const scalar_t* keys;
  const scalar_t* values;
};

// A staged tile of kKeyTile tokens: keys transposed (D x kKeyTile) and, where asked for, as rows
// (kKeyTile x d_pad), values as rows (kKeyTile x dv_pad) or transposed (Dv x kKeyTile); `live[c]`
// whether column c is a valid token. Invalid and padding columns are zeros.
template <typename acc_t>
struct TokenTile {
  acc_t* keys_t;
  acc_t* key_rows;    // or null
  acc_t* value_rows;  // or null
  acc_t* values_t;    // or null
  bool* live;
};

// Stages tokens [j0, j0 + nk) of `sel`; returns whether one of them is valid.
template <typename scalar_t, typename Params>
bool stage_tokens(const Selection<scalar_t, Params>& sel, int64_t j0, int64_t nk,
                  const TokenTile<acc_type<scalar_t>>& tile, acc_type<scalar_t>* staging) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  const BlockGeometry& g = sel.g;
  bool any = false;
  for (int64_t c = 0; c < kKeys; ++c) {
    tile.live[c] = c < nk && sel.valid(j0 + c);
    any = any || tile.live[c];
  }
  if (!any) {
    return false;
  }
  std::fill(tile.keys_t, tile.keys_t + g.dim * kKeys, acc_t(0));
  if (tile.values_t != nullptr) {
    std::fill(tile.values_t, tile.values_t + g.dim_v * kKeys, acc_t(0));
  }
  for (int64_t c = 0; c < kKeys; ++c) {
    if (!tile.live[c]) {
      if (tile.key_rows != nullptr) {
        std::fill(tile.key_rows + c * g.d_pad, tile.key_rows + (c + 1) * g.d_pad, acc_t(0));
      }
      if (tile.value_rows != nullptr) {
        std::fill(tile.value_rows + c * g.dv_pad, tile.value_rows + (c + 1) * g.dv_pad, acc_t(0));
      }
      continue;
    }
    const acc_t* key = load_row(sel.key(j0 + c), g.dim, staging);
    scatter_transposed(key, g.dim, c, tile.keys_t, kKeys);
    if (tile.key_rows != nullptr) {
      std::copy(key, key + g.dim, tile.key_rows + c * g.d_pad);
      std::fill(tile.key_rows + c * g.d_pad + g.dim, tile.key_rows + (c + 1) * g.d_pad, acc_t(0));
    }
    if (tile.value_rows != nullptr) {
      load_padded(sel.value(j0 + c), g.dim_v, g.dv_pad, acc_t(1), staging,
                  tile.value_rows + c * g.dv_pad);
    }
    if (tile.values_t != nullptr) {
      const acc_t* value = load_row(sel.value(j0 + c), g.dim_v, staging);
      scatter_transposed(value, g.dim_v, c, tile.values_t, kKeys);
    }
  }
  return true;
}

// Every tile of some (batch, kv head) pairs, staged once and read by every tile of query rows:
// per tile the parts `TileParts` names (elements per tile; 0: not staged), in a TokenTile.
struct TileParts {
  int64_t keys_t, key_rows, value_rows, values_t;
  int64_t total() const { return keys_t + key_rows + value_rows + values_t; }
};

template <typename acc_t>
struct StagedTiles {
  StagedTiles(const TileParts& parts, int64_t tiles)
      : parts(parts), data(tiles * parts.total()), live(new bool[tiles * kKeyTile<acc_t>]),
        any(tiles), all_live(tiles) {}

  TokenTile<acc_t> tile(int64_t t) {
    acc_t* base = data.data() + t * parts.total();
    const auto part = [&base](int64_t n) {
      acc_t* start = n ? base : nullptr;
      base += n;
      return start;
    };
    acc_t* keys_t = part(parts.keys_t);
    acc_t* key_rows = part(parts.key_rows);
    acc_t* value_rows = part(parts.value_rows);
    acc_t* values_t = part(parts.values_t);
    return {keys_t, key_rows, value_rows, values_t, live.get() + t * kKeyTile<acc_t>};
  }

  // Stages tile t of `sel` into staged tile `slot`; any[slot]: whether it holds a valid token.
  template <typename scalar_t, typename Params>
  void stage(const Selection<scalar_t, Params>& sel, int64_t tokens, int64_t t, int64_t slot,
             acc_t* staging) {
    const int64_t j0 = t * kKeyTile<acc_t>;
    const TokenTile<acc_t> staged = tile(slot);
    any[slot] = stage_tokens(sel, j0, std::min(kKeyTile<acc_t>, tokens - j0), staged, staging);
    all_live[slot] = std::all_of(staged.live, staged.live + kKeyTile<acc_t>, [](bool on) { return on; });
  }

  TileParts parts;
  std::vector<acc_t> data;
  std::unique_ptr<bool[]> live;
  std::vector<char> any, all_live;  // per tile: some column / every column is a valid token
};

// Whether the scaled query row q_row (D values) scores NaN against a valid token of the staged
// tiles [first, first + count): told apart from a score of +inf only where the row's maximum is
// +inf, which the online softmax cannot (both make its sum NaN).
template <typename acc_t>
bool row_has_nan(StagedTiles<acc_t>& staged, int64_t first, int64_t count, const acc_t* q_row,
                 int64_t dim) {
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  for (int64_t t = first; t < first + count; ++t) {
    const TokenTile<acc_t> tile = staged.tile(t);
    for (int64_t c = 0; c < kKeys; ++c) {
      acc_t dot = 0;
      for (int64_t d = 0; d < dim; ++d) {
        dot += q_row[d] * tile.keys_t[d * kKeys + c];
      }
      if (tile.live[c] && std::isnan(dot)) {
        return true;
      }
    }
  }
  return false;
}

// The largest and the sum of the lanes of a vector.
template <typename acc_t>
inline acc_t lanes_max(typename Simd<acc_t>::vec v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
  }
#endif
  acc_t result = v[0];
  for (int64_t lane = 1; lane < Simd<acc_t>::kWidth; ++lane) {
    result = v[lane] > result ? v[lane] : result;
  }
  return result;
}

template <typename acc_t>
inline acc_t lanes_sum(typename Simd<acc_t>::vec v) {
  acc_t result = 0;
  for (int64_t lane = 0; lane < Simd<acc_t>::kWidth; ++lane) {
    result += v[lane];
  }
  return result;
}

// The maximum of a row of kKeyTile scores, a vector of lanes at a time (a NaN is passed over, as
// std::max does; it reaches the row's sum through exp).
template <typename acc_t>
inline acc_t tile_max_of(const acc_t* row) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int64_t W = Simd<acc_t>::kWidth;
  vec best = load_vec(row);
  for (int64_t c = W; c < kKeyTile<acc_t>; c += W) {
    const vec x = load_vec(row + c);
    best = x > best ? x : best;
  }
  return lanes_max<acc_t>(best);
}

// At most this many bytes of staged tiles at once in the forward (pairs are staged in rounds).
constexpr int64_t kStagedBytes = int64_t{64} << 20;

// Query rows per (batch, kv head) up to which the forward reads the selected tokens where they lie,
// one dot product per row and token, instead of staging them for the micro-kernel (decoding: one
// query per head, whose staging would cost more than its products).
constexpr int64_t kDirectRows = 8;

// The forward for few rows: per (batch, kv head), the rows' scores over every selected token (the
// tokens that do not exist: -inf), their maximum passing over NaN, P = exp(S - max) and the sums,
// then out = P V / sum; the same results as the tiled path up to rounding, and the same rules for
// empty rows (out 0, lse -inf), NaN and +inf scores.
template <typename scalar_t>
void block_read_fwd_direct(const BlockReadFwdParams& params, const BlockGeometry& g, int64_t tokens) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const auto* q = static_cast<const scalar_t*>(params.q);
  auto* out = static_cast<scalar_t*>(params.out);
  auto* lse = static_cast<acc_t*>(params.lse);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t rows = g.group_rows, dim = g.dim, dim_v = g.dim_v;

  at::parallel_for(0, g.pairs, 1, [&](int64_t pair_begin, int64_t pair_end) {
    std::vector<acc_t> q_tile(rows * g.d_pad), scores(rows * std::max<int64_t>(tokens, 1));
    std::vector<acc_t> acc_out(rows * g.dv_pad), staging(std::max(dim, dim_v) + 1);
    std::vector<acc_t> row_max(rows), row_sum(rows);
    std::vector<char> row_nan(rows);
    std::vector<char> live(std::max<int64_t>(tokens, 1));
    for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
      const Selection<scalar_t, BlockReadFwdParams> sel(params, g, pair);
      load_query_tile(q, params.q_rows, g, pair, 0, rows, scale, staging.data(), q_tile.data());
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_nan.begin(), row_nan.end(), 0);
      for (int64_t j = 0; j < tokens; ++j) {
        live[j] = sel.valid(j);
        if (!live[j]) {
          continue;
        }
        const acc_t* key = load_row(sel.key(j), dim, staging.data());
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* q_row = q_tile.data() + r * g.d_pad;
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) {
            dot += q_row[d] * key[d];
          }
          scores[r * tokens + j] = dot;
          row_max[r] = dot > row_max[r] ? dot : row_max[r];
          row_nan[r] |= dot != dot;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t shift = row_max[r] == kNegInf ? acc_t(0) : row_max[r];
        acc_t sum = 0;
        for (int64_t j = 0; j < tokens; ++j) {
          acc_t& s = scores[r * tokens + j];
          s = live[j] ? exp_acc(s - shift) : acc_t(0);
          sum += s;
        }
        row_sum[r] = sum;
      }
      std::fill(acc_out.begin(), acc_out.end(), acc_t(0));
      for (int64_t j = 0; j < tokens; ++j) {
        if (!live[j]) {
          continue;
        }
        const acc_t* value = load_row(sel.value(j), dim_v, staging.data());
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t p = scores[r * tokens + j];
          acc_t* o = acc_out.data() + r * g.dv_pad;
#pragma omp simd
          for (int64_t e = 0; e < dim_v; ++e) {
            o[e] += p * value[e];
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = pair * rows + r;
        store_softmax_row(acc_out.data() + r * g.dv_pad, dim_v, row_sum[r], row_max[r], staging.data(),
                          out + row * dim_v, lse + row);
        if (row_max[r] == kInf && !row_nan[r]) {
          lse[row] = kInf;  // a score of +inf and none NaN: lse +inf (out is NaN, inf / inf)
        }
      }
    }
  });
}

template <typename scalar_t>
void block_read_fwd_impl(const BlockReadFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  using vec = typename Simd<acc_t>::vec;
  constexpr int64_t W = Simd<acc_t>::kWidth;
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const BlockGeometry g = block_geometry<acc_t>(params, params.block_size, params.dim_v);
  const auto* q = static_cast<const scalar_t*>(params.q);
  auto* out = static_cast<scalar_t*>(params.out);
  auto* lse = static_cast<acc_t*>(params.lse);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t dim = g.dim, dim_v = g.dim_v, d_pad = g.d_pad, dv_pad = g.dv_pad;
  const int64_t tokens = params.num_selected * g.block_size;
  const int64_t row_tiles = ceil_div(g.group_rows, kReadRows);
  if (g.group_rows <= kDirectRows) {
    block_read_fwd_direct<scalar_t>(params, g, tokens);
    return;
  }

  const int64_t tiles = ceil_div(tokens, kKeys);
  const TileParts parts{std::max<int64_t>(dim, 1) * kKeys, 0, kKeys * dv_pad, 0};
  const int64_t round = std::clamp<int64_t>(
      kStagedBytes / (static_cast<int64_t>(sizeof(acc_t)) * std::max<int64_t>(1, tiles * parts.total())), 1,
      g.pairs);
  StagedTiles<acc_t> staged(parts, round * tiles);

  for (int64_t p0 = 0; p0 < g.pairs; p0 += round) {
    const int64_t pairs = std::min(round, g.pairs - p0);
    // Each selected token converted (and its key transposed) once, for every tile of query rows.
    at::parallel_for(0, pairs * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> staging(std::max(dim, dim_v) + 1);
      for (int64_t slot = begin; slot < end; ++slot) {
        const Selection<scalar_t, BlockReadFwdParams> sel(params, g, p0 + slot / tiles);
        staged.stage(sel, tokens, slot % tiles, slot, staging.data());
      }
    });

    at::parallel_for(0, pairs * row_tiles, 1, [&](int64_t unit_begin, int64_t unit_end) {
      std::vector<acc_t> q_tile(kReadRows * d_pad), scores(kReadRows * kKeys);
      std::vector<acc_t> acc_out(kReadRows * dv_pad), out_row(dv_pad + 1);
      // row_sums: per row a vector of partial sums, added up once the row is done.
      std::vector<acc_t> row_max(kReadRows), row_sums(kReadRows * W), staging(std::max(dim, dim_v) + 1);

      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t pair = p0 + unit / row_tiles, m0 = (unit % row_tiles) * kReadRows;
        const int64_t rows = std::min(kReadRows, g.group_rows - m0);
        load_query_tile(q, params.q_rows, g, pair, m0, rows, scale, staging.data(), q_tile.data());
        std::fill(row_max.begin(), row_max.end(), kNegInf);
        std::fill(row_sums.begin(), row_sums.end(), acc_t(0));
        std::fill(acc_out.begin(), acc_out.begin() + rows * dv_pad, acc_t(0));

        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t slot = (pair - p0) * tiles + t;
          if (!staged.any[slot]) {
            continue;
          }
          const TokenTile<acc_t> tile = staged.tile(slot);
          const bool* live = tile.live;
          gemm(rows, kKeys, dim, q_tile.data(), d_pad, tile.keys_t, kKeys, scores.data(), kKeys,
               /*accumulate=*/false);
          if (!staged.all_live[slot]) {  // padding: its scores -inf, so exp gives exact zeros
            for (int64_t r = 0; r < rows; ++r) {
              for (int64_t c = 0; c < kKeys; ++c) {
                scores[r * kKeys + c] = live[c] ? scores[r * kKeys + c] : kNegInf;
              }
            }
          }
          // Online softmax: P = exp(S - running max), the running sum and output rescaled. A NaN
          // score passes the maximum and makes the row's sum (hence out and lse) NaN.
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s_row = scores.data() + r * kKeys;
            const SoftmaxStep<acc_t> step = softmax_step(row_max[r], tile_max_of(s_row));
#pragma omp simd
            for (int64_t c = 0; c < kKeys; ++c) {
              s_row[c] = exp_acc(s_row[c] - step.shift);
            }
            vec sum = load_vec(row_sums.data() + r * W) * step.correction;
            for (int64_t c = 0; c < kKeys; c += W) {
              sum += load_vec(s_row + c);
            }
            store_vec(row_sums.data() + r * W, sum);
            row_max[r] = step.new_max;
            rescale_row(acc_out.data() + r * dv_pad, dv_pad, step.correction);
          }
          gemm(rows, dv_pad, kKeys, scores.data(), kKeys, tile.value_rows, dv_pad, acc_out.data(),
               dv_pad, /*accumulate=*/true);
        }

        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = pair * g.group_rows + m0 + r;
          const acc_t row_sum = lanes_sum<acc_t>(load_vec(row_sums.data() + r * W));
          store_softmax_row(acc_out.data() + r * dv_pad, dim_v, row_sum, row_max[r],
                            out_row.data(), out + row * dim_v, lse + row);
          if (row_max[r] == std::numeric_limits<acc_t>::infinity() &&
              !row_has_nan(staged, (pair - p0) * tiles, tiles, q_tile.data() + r * d_pad, dim)) {
            lse[row] = row_max[r];  // a score of +inf and none NaN: lse +inf (out is NaN, inf / inf)
          }
        }
      }
    });
  }
}

// One row of the backward's tile: in `probs` the scores S, in `dscores` dP on entry; on return
// P = exp(S - lse) and dS = P (dP - delta) where `keep` is 0 and the row has a softmax (lse > -inf),
// exact zeros elsewhere.
template <typename acc_t>
inline void softmax_grad_row(acc_t* probs, acc_t* dscores, const acc_t* keep, acc_t lse, acc_t delta) {
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  if (lse == -std::numeric_limits<acc_t>::infinity()) {
    std::fill(probs, probs + kKeys, acc_t(0));
    std::fill(dscores, dscores + kKeys, acc_t(0));
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < kKeys; ++c) {
    const bool on = keep[c] == acc_t(0);
    const acc_t prob = exp_acc(probs[c] - lse);
    probs[c] = on ? prob : acc_t(0);
    dscores[c] = on ? prob * (dscores[c] - delta) : acc_t(0);
  }
}

// The scratch of one backward unit, reused across the units a thread runs.
template <typename acc_t>
struct BwdScratch {
  BwdScratch(const BlockGeometry& g, int64_t tokens)
      : q_tile(kReadRows * g.d_pad),
        dout_tile(kReadRows * g.dv_pad),
        q_t(std::max<int64_t>(g.dim, 1) * kReadRows),
        dout_t(std::max<int64_t>(g.dim_v, 1) * kReadRows),
        dq_acc(kReadRows * g.d_pad),
        probs(kReadRows * kKeyTile<acc_t>),
        dscores(kReadRows * kKeyTile<acc_t>),
        dk_acc(round_up(tokens, kKeyTile<acc_t>) * g.dim),
        dv_acc(round_up(tokens, kKeyTile<acc_t>) * g.dim_v),
        keep(kKeyTile<acc_t>),
        row_lse(kReadRows),
        row_delta(kReadRows),
        staging(std::max(g.dim, g.dim_v) + 1),
        out_row(std::max(g.d_pad, g.dv_pad) + 1) {}

  // q_t, dout_t: the row tile transposed (D x kReadRows, Dv x kReadRows), the left operands of
  // dk^T += q^T dS and dv^T += dout^T P; dk_acc, dv_acc: per key tile dk^T (D x kKeyTile) and
  // dv^T (Dv x kKeyTile).
  std::vector<acc_t> q_tile, dout_tile, q_t, dout_t, dq_acc;
  std::vector<acc_t> probs, dscores, dk_acc, dv_acc, keep;
  std::vector<acc_t> row_lse, row_delta, staging, out_row;
};

// Stores the pair's dkeys and dvalues: per block the sum of its occurrences' rows of dk_acc and
// dv_acc in index order (zero for a block not selected), rounded once.
template <typename scalar_t>
void store_block_grads(const BlockReadBwdParams& params, const BlockGeometry& g, int64_t pair,
                       BwdScratch<acc_type<scalar_t>>& scratch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t selected = params.num_selected, size = g.block_size;
  const int64_t* indices = params.indices + pair * selected;
  auto* dkeys = static_cast<scalar_t*>(params.dkeys) + pair * g.num_blocks * size * g.dim;
  auto* dvalues = static_cast<scalar_t*>(params.dvalues) + pair * g.num_blocks * size * g.dim_v;
  // The occurrences sorted by block, those of one block in index order.
  std::vector<int64_t> order(selected);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [indices](int64_t a, int64_t b) { return indices[a] < indices[b]; });
  acc_t* sum = scratch.out_row.data();
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  // Token j's gradient is column j % kKeys of its key tile's (width x kKeys) transposed sums.
  const auto store = [&](scalar_t* dst, const std::vector<acc_t>& acc, int64_t width,
                         int64_t first, int64_t last, int64_t s) {
    std::fill(sum, sum + width, acc_t(0));
    for (int64_t i = first; i < last; ++i) {
      const int64_t j = order[i] * size + s;
      const acc_t* column = acc.data() + (j / kKeys) * width * kKeys + j % kKeys;
      for (int64_t e = 0; e < width; ++e) {
        sum[e] += column[e * kKeys];
      }
    }
    store_row(dst, sum, width);
  };
  int64_t first = 0;
  for (int64_t n = 0; n < g.num_blocks; ++n) {
    int64_t last = first;
    while (last < selected && indices[order[last]] == n) {
      ++last;
    }
    for (int64_t s = 0; s < size; ++s) {
      store(dkeys + (n * size + s) * g.dim, scratch.dk_acc, g.dim, first, last, s);
      store(dvalues + (n * size + s) * g.dim_v, scratch.dv_acc, g.dim_v, first, last, s);
    }
    first = last;
  }
}

template <typename scalar_t>
void block_read_bwd_impl(const BlockReadBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kKeys = kKeyTile<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const BlockGeometry g = block_geometry<acc_t>(params, params.block_size, params.dim_v);
  const auto* q = static_cast<const scalar_t*>(params.q);
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  const auto* out = static_cast<const scalar_t*>(params.out);
  const auto* lse = static_cast<const acc_t*>(params.lse);
  const auto* dlse = static_cast<const acc_t*>(params.dlse);
  auto* dq = static_cast<scalar_t*>(params.dq);
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t dim = g.dim, dim_v = g.dim_v, d_pad = g.d_pad, dv_pad = g.dv_pad;
  const int64_t tokens = params.num_selected * g.block_size;

  const int64_t tiles = ceil_div(tokens, kKeys);
  const TileParts parts{std::max<int64_t>(dim, 1) * kKeys, kKeys * d_pad, 0,
                        std::max<int64_t>(dim_v, 1) * kKeys};

  at::parallel_for(0, g.pairs, 1, [&](int64_t pair_begin, int64_t pair_end) {
    BwdScratch<acc_t> w(g, tokens);
    StagedTiles<acc_t> staged(parts, tiles);

    for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
      const Selection<scalar_t, BlockReadBwdParams> sel(params, g, pair);
      std::fill(w.dk_acc.begin(), w.dk_acc.end(), acc_t(0));
      std::fill(w.dv_acc.begin(), w.dv_acc.end(), acc_t(0));
      // Each selected token converted (and transposed) once, for every tile of query rows.
      for (int64_t t = 0; t < tiles; ++t) {
        staged.stage(sel, tokens, t, t, w.staging.data());
      }

      for (int64_t m0 = 0; m0 < g.group_rows; m0 += kReadRows) {
        const int64_t rows = std::min(kReadRows, g.group_rows - m0);
        load_query_tile(q, params.q_rows, g, pair, m0, rows, scale, w.staging.data(),
                        w.q_tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = pair * g.group_rows + m0 + r;
          acc_t* d = w.dout_tile.data() + r * dv_pad;
          load_padded(dout + params.dout_rows.offset(row), dim_v, dv_pad, acc_t(1),
                      w.staging.data(), d);
          const acc_t* o = load_row(out + row * dim_v, dim_v, w.staging.data());
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < dim_v; ++e) {
            dot += d[e] * o[e];
          }
          w.row_delta[r] = dot - dlse[row];
          w.row_lse[r] = lse[row];
        }
        std::fill(w.dq_acc.begin(), w.dq_acc.begin() + rows * d_pad, acc_t(0));
        // The tile's q (scaled) and dout transposed, once for every key tile.
        std::fill(w.q_t.begin(), w.q_t.end(), acc_t(0));
        std::fill(w.dout_t.begin(), w.dout_t.end(), acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          scatter_transposed(w.q_tile.data() + r * d_pad, dim, r, w.q_t.data(), kReadRows);
          scatter_transposed(w.dout_tile.data() + r * dv_pad, dim_v, r, w.dout_t.data(), kReadRows);
        }

        for (int64_t t = 0; t < tiles; ++t) {
          if (!staged.any[t]) {
            continue;
          }
          const TokenTile<acc_t> tile = staged.tile(t);
          for (int64_t c = 0; c < kKeys; ++c) {
            w.keep[c] = tile.live[c] ? acc_t(0) : kNegInf;
          }
          gemm(rows, kKeys, dim, w.q_tile.data(), d_pad, tile.keys_t, kKeys, w.probs.data(), kKeys,
               /*accumulate=*/false);
          gemm(rows, kKeys, dim_v, w.dout_tile.data(), dv_pad, tile.values_t, kKeys,
               w.dscores.data(), kKeys, /*accumulate=*/false);

          // P = exp(S - lse) and dS = P (dP - delta) on the live columns of rows with a softmax,
          // exact zeros elsewhere (row-major: the right operands of every product below).
          for (int64_t r = 0; r < rows; ++r) {
            softmax_grad_row(w.probs.data() + r * kKeys, w.dscores.data() + r * kKeys, w.keep.data(),
                             w.row_lse[r], w.row_delta[r]);
          }

          gemm(rows, d_pad, kKeys, w.dscores.data(), kKeys, tile.key_rows, d_pad, w.dq_acc.data(),
               d_pad, /*accumulate=*/true);
          gemm(dim_v, kKeys, rows, w.dout_t.data(), kReadRows, w.probs.data(), kKeys,
               w.dv_acc.data() + t * dim_v * kKeys, kKeys, /*accumulate=*/true);
          gemm(dim, kKeys, rows, w.q_t.data(), kReadRows, w.dscores.data(), kKeys,
               w.dk_acc.data() + t * dim * kKeys, kKeys, /*accumulate=*/true);
        }

        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* acc_row = w.dq_acc.data() + r * d_pad;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            w.out_row[d] = acc_row[d] * scale;
          }
          store_row(dq + (pair * g.group_rows + m0 + r) * dim, w.out_row.data(), dim);
        }
      }
      store_block_grads<scalar_t>(params, g, pair, w);
    }
  });
}

}  // namespace

void block_topk_fwd(const BlockTopkFwdParams& params) {
  TORCH_CHECK_VALUE(params.kv_heads >= 1 && params.heads % params.kv_heads == 0 &&
                        params.k >= 0 && params.k <= params.num_blocks,
                    "block_topk_fwd: inconsistent sizes");
  L2M_DISPATCH_FLOATING(params, "block_topk_fwd", block_topk_fwd_impl);
}

void block_read_fwd(const BlockReadFwdParams& params) {
  TORCH_CHECK_VALUE(params.kv_heads >= 1 && params.heads % params.kv_heads == 0,
                    "block_read_fwd: inconsistent sizes");
  L2M_DISPATCH_FLOATING(params, "block_read_fwd", block_read_fwd_impl);
}

void block_read_bwd(const BlockReadBwdParams& params) {
  TORCH_CHECK_VALUE(params.kv_heads >= 1 && params.heads % params.kv_heads == 0,
                    "block_read_bwd: inconsistent sizes");
  L2M_DISPATCH_FLOATING(params, "block_read_bwd", block_read_bwd_impl);
}

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
