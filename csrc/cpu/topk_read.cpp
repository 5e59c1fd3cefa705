// CPU kernels of the sparse top-k memory read (interface: topk_read.h, /work/notes/topk_cpu.md).
//
// Forward. The T x N score matrix is never formed. Work units are (batch, memory head, block of
// up to kUnitRows query rows); the query heads that share a memory head are stacked, as in the
// reference, so one pass over the keys serves all of them. A unit walks the existing slots in key
// tiles that stay in L2; against each tile, a register-blocked micro-kernel computes kRows keys x
// (kVecs SIMD vectors of queries) scores and compares them, still in registers, with each query's
// current k-th best score. Only the rare candidates that pass leave the registers, for a scalar
// offer to the query's sorted top-k list. Every score is one sequential FMA chain over
// d = 0 .. Dk - 1 of (scale * q)[d] and key[d] (scale folded into q and rounded, as the reference
// does), so it does not depend on where the query or the slot sits in a tile: the selection is a
// pure function of the inputs, whatever the tiling and the thread count.
//
// Selection order: descending score, ties by the smaller slot, NaN ranked like +inf. Each query
// sees its slots in increasing order, so a later candidate loses every tie: the register filter
// "not (score <= threshold)" (NaN passes, ties do not) and the list insertion rely on that.
//
// Backward. Phase 1, parallel over query rows: ds (B, H, T, k) and dq. Phase 2, per memory: a
// counting sort of the (row, j) entries by slot. Phase 3, parallel over slots: each slot's dkeys
// and dvalues row is the sum of its entries in (row, j) order. No atomics, no thread-count
// dependence: bitwise deterministic.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "topk_read.h"
#include "convert.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// Register tiles of the score micro-kernel (Lanes<acc_t>, simd.h: one lane per query).
#if L2M_SIMD_REGISTERS == 32
constexpr int kMaxVecs = 4;  // 32 zmm registers: 6 x 4 accumulators + 4 query vectors
constexpr int rows_for_vecs(int vecs) { return vecs >= 4 ? 6 : 12; }
#elif L2M_SIMD_REGISTERS == 16
constexpr int kMaxVecs = 2;  // 16 ymm registers: 4 x 2 accumulators + 2 query vectors
constexpr int rows_for_vecs(int vecs) { return vecs >= 2 ? 4 : 8; }
#else
constexpr int kMaxVecs = 2;
constexpr int rows_for_vecs(int /*vecs*/) { return 4; }
#endif

// Query rows per forward work unit: the unit's key tiles are reused by this many queries while in
// L2, and its top-k lists (kUnitRows * k entries) stay small.
constexpr int64_t kUnitRows = 256;
// Bytes of one key tile (keys of one tile x Dk, accumulation type): well inside L2.
constexpr int64_t kKeyTileBytes = 256 * 1024;

// Keys per tile: kKeyTileBytes worth, a multiple of the micro-kernel's key rows.
template <typename acc_t>
int64_t key_tile_slots(int64_t dim_k, int64_t micro_rows) {
  const int64_t key_bytes = static_cast<int64_t>(sizeof(acc_t)) * std::max<int64_t>(dim_k, 1);
  const int64_t fit = kKeyTileBytes / key_bytes;
  return std::max<int64_t>(1, fit / micro_rows) * micro_rows;
}

// ---- per-query top-k lists ----

// Rank of a score in the selection order: NaN ranks like +inf.
template <typename acc_t>
inline acc_t rank_of(acc_t score) {
  return std::isnan(score) ? std::numeric_limits<acc_t>::infinity() : score;
}

// The k best (score, slot) pairs seen so far for each query row of a unit, as arrays sorted in
// the output order (rank descending, then slot ascending). thresholds[row] is what the register
// filter compares against: NaN while fewer than k pairs are kept (everything passes), then the
// rank of the k-th.
//
// Insertion relies on each row seeing its slots in increasing order: a candidate ties-loses to
// every kept pair of equal rank, so its place is the number of kept pairs ranking at or above it
// (one vectorised count), and the pairs after it move one step (memmove). Measured faster than a
// binary heap (whose sift is a chain of unpredictable branches) at k = 32 and k = 256.
template <typename acc_t>
struct TopKLists {
  int64_t k = 0;
  acc_t* scores = nullptr;      // (rows, k), raw scores (NaN kept, ranked like +inf)
  int64_t* slots = nullptr;     // (rows, k)
  int64_t* counts = nullptr;    // (rows,)
  acc_t* thresholds = nullptr;  // (padded rows,)

  void offer(int64_t row, acc_t score, int64_t slot) {
    acc_t* kept_scores = scores + row * k;
    int64_t* kept_slots = slots + row * k;
    int64_t count = counts[row];
    const acc_t rank = rank_of(score);
    // !(kept < rank): kept ranks at or above the candidate (a NaN kept score ranks like +inf).
    using L = Lanes<acc_t>;
    const typename L::vec rank_vec = L::broadcast(rank);
    int64_t place = 0, j = 0;
    for (; j + L::kWidth <= count; j += L::kWidth) {
      place += __builtin_popcount(L::at_or_above(L::load(kept_scores + j), rank_vec));
    }
    for (; j < count; ++j) {
      place += !(kept_scores[j] < rank) ? 1 : 0;
    }
    if (place >= k) {
      return;
    }
    const int64_t moved = (count < k ? count : k - 1) - place;
    std::memmove(kept_scores + place + 1, kept_scores + place, moved * sizeof(acc_t));
    std::memmove(kept_slots + place + 1, kept_slots + place, moved * sizeof(int64_t));
    kept_scores[place] = score;
    kept_slots[place] = slot;
    if (count < k) {
      counts[row] = ++count;
    }
    if (count == k) {
      thresholds[row] = rank_of(kept_scores[k - 1]);
    }
  }
};

// Scores of kRows consecutive keys against kVecs * kWidth queries, then the filter and the offers.
//   key_rows:  (kRows, dim_k) acc, slots first_slot ..
//   q_block:   (dim_k, kVecs * kWidth) acc, scale folded in; lane i is unit row lane_base + i
//   live_lanes: lanes >= live_lanes are padding and never offered
template <typename acc_t, int kRows, int kVecs>
inline void score_and_offer(const acc_t* key_rows, int64_t dim_k, const acc_t* q_block,
                            TopKLists<acc_t>& lists, int64_t lane_base, int64_t live_lanes,
                            int64_t first_slot) {
  using L = Lanes<acc_t>;
  using vec = typename L::vec;
  constexpr int kBlock = kVecs * L::kWidth;
  vec acc[kRows][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = L::zero();
    }
  }
  for (int64_t d = 0; d < dim_k; ++d) {
    vec q_vecs[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      q_vecs[v] = L::load(q_block + d * kBlock + v * L::kWidth);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const vec key_value = L::broadcast(key_rows[r * dim_k + d]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = L::fma(key_value, q_vecs[v], acc[r][v]);
      }
    }
  }

  typename L::mask passed[kRows][kVecs];
  typename L::mask any_passed = 0;
  const acc_t* thresholds = lists.thresholds + lane_base;
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    const vec threshold = L::load(thresholds + v * L::kWidth);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      passed[r][v] = L::passes(acc[r][v], threshold);
      any_passed |= passed[r][v];
    }
  }
  if (__builtin_expect(any_passed == 0, 1)) {
    return;
  }
  alignas(64) acc_t scores[kRows][kBlock];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      L::store(&scores[r][v * L::kWidth], acc[r][v]);
    }
  }
  // Slots in increasing order per query; the offer re-checks against the current k-th best.
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      uint32_t bits = passed[r][v];
      while (bits) {
        const int lane = v * L::kWidth + __builtin_ctz(bits);
        bits &= bits - 1;
        if (lane < live_lanes) {
          lists.offer(lane_base + lane, scores[r][lane], first_slot + r);
        }
      }
    }
  }
}

// Softmax over the selected entries and the weighted sum of their values, for one query row.
// Mirrors masked_softmax_lse in the reference: a NaN score makes the row NaN; a row whose best
// score is -inf (or that has no entry) gets weights 0, lse = -inf; entries with index -1 are
// skipped entirely, selected entries always enter the value sum (weight 0 included).
template <typename scalar_t>
void finish_row(const acc_type<scalar_t>* sorted_scores, const int64_t* sorted_slots,
                int64_t count, int64_t k, const scalar_t* values_mem, int64_t dim_v,
                int64_t* indices_row, acc_type<scalar_t>* weights_row, acc_type<scalar_t>* lse_row,
                scalar_t* out_row, acc_type<scalar_t>* value_buffer, acc_type<scalar_t>* out_acc) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t row_max = kNegInf;
  for (int64_t j = 0; j < count; ++j) {
    const acc_t score = sorted_scores[j];
    if (std::isnan(score) || std::isnan(row_max)) {
      row_max = std::numeric_limits<acc_t>::quiet_NaN();
    } else if (score > row_max) {
      row_max = score;
    }
  }
  const bool row_empty = row_max == kNegInf;
  const acc_t shift = row_empty ? acc_t(0) : row_max;
  acc_t total = 0;
  for (int64_t j = 0; j < count; ++j) {
    weights_row[j] = std::exp(sorted_scores[j] - shift);
    total += weights_row[j];
  }
  if (row_empty) {
    total = 1;
  }
  for (int64_t j = 0; j < count; ++j) {
    weights_row[j] = weights_row[j] / total;
    indices_row[j] = sorted_slots[j];
  }
  for (int64_t j = count; j < k; ++j) {
    weights_row[j] = 0;
    indices_row[j] = -1;
  }
  *lse_row = row_empty ? kNegInf : shift + std::log(total);

  std::fill(out_acc, out_acc + dim_v, acc_t(0));
  for (int64_t j = 0; j < count; ++j) {
    const acc_t weight = weights_row[j];
    const acc_t* value = load_row(values_mem + sorted_slots[j] * dim_v, dim_v, value_buffer);
#pragma omp simd
    for (int64_t i = 0; i < dim_v; ++i) {
      out_acc[i] += weight * value[i];
    }
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(out_acc, out_acc + dim_v, out_row);
  } else {
    store_row(out_row, out_acc, dim_v);
  }
}

// A forward thread's buffers, sized once for units of up to kUnitRows query rows.
template <typename acc_t>
struct FwdScratch {
  std::vector<acc_t> q_packed;    // (blocks, Dk, block width): scale * q, transposed per block
  std::vector<acc_t> key_tile;    // (tile slots, Dk): half-type keys converted (unused otherwise)
  std::vector<acc_t> kept_scores;  // (unit rows, k)
  std::vector<int64_t> kept_slots;  // (unit rows, k)
  std::vector<int64_t> counts;      // (unit rows,)
  std::vector<acc_t> thresholds;    // (padded unit rows,)
  TopKLists<acc_t> lists;           // views of the four above
  std::vector<acc_t> q_row, value_row, out_acc;
};

// One forward unit: rows [row_begin, row_begin + rows) of the (group * T) query rows that read
// memory (batch, mem_head). Buffers are the calling thread's, sized for kUnitRows rows.
template <typename scalar_t, int kVecs>
struct FwdUnitRunner {
  using acc_t = acc_type<scalar_t>;
  using L = Lanes<acc_t>;
  static constexpr int kBlock = kVecs * L::kWidth;
  static constexpr int kRows = rows_for_vecs(kVecs);

  static void run(const TopkReadFwdParams& p, int64_t batch, int64_t mem_head, int64_t row_begin,
                  int64_t rows, FwdScratch<acc_t>& scratch) {
    TopKLists<acc_t>& lists = scratch.lists;
    const int64_t dim_k = p.dim_k, dim_v = p.dim_v, num_slots = p.num_slots, k = p.k;
    const int64_t group = p.heads / p.mem_heads;
    const int64_t memory = p.shared_memory ? mem_head : batch * p.mem_heads + mem_head;
    const auto* keys_mem = static_cast<const scalar_t*>(p.keys) + memory * num_slots * dim_k;
    const auto* values_mem = static_cast<const scalar_t*>(p.values) + memory * num_slots * dim_v;
    // Global query row of unit row 0: (b, h = mem_head * group + g, t) flattened, g * T + t =
    // row_begin.
    const int64_t first_row = (batch * p.heads + mem_head * group) * p.seq_len + row_begin;
    int64_t existing = num_slots;
    if (p.valid_len != nullptr) {
      existing = std::min<int64_t>(std::max<int64_t>(p.valid_len[batch], 0), num_slots);
    }

    // Pack (scale * q) transposed per block of kBlock rows: q_packed[block][d][lane].
    const int64_t blocks = (rows + kBlock - 1) / kBlock;
    const acc_t scale = static_cast<acc_t>(p.scale);
    const auto* q = static_cast<const scalar_t*>(p.q);
    acc_t* q_row_acc = scratch.q_row.data();
    for (int64_t block = 0; block < blocks; ++block) {
      acc_t* packed = scratch.q_packed.data() + block * dim_k * kBlock;
      for (int lane = 0; lane < kBlock; ++lane) {
        const int64_t row = block * kBlock + lane;
        if (row < rows) {
          const acc_t* q_row = load_row(q + p.q_rows.offset(first_row + row), dim_k, q_row_acc);
          for (int64_t d = 0; d < dim_k; ++d) {
            packed[d * kBlock + lane] = q_row[d] * scale;
          }
        } else {
          for (int64_t d = 0; d < dim_k; ++d) {
            packed[d * kBlock + lane] = 0;
          }
        }
      }
    }
    const acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
    const acc_t kInf = std::numeric_limits<acc_t>::infinity();
    for (int64_t row = 0; row < blocks * kBlock; ++row) {
      // NaN: a list with fewer than k pairs takes every candidate. Padding lanes: +inf lets only
      // NaN through, and those are dropped by the live-lane test.
      lists.thresholds[row] = row < rows ? kNaN : kInf;
    }
    std::fill(lists.counts, lists.counts + rows, int64_t(0));

    const int64_t tile_slots = key_tile_slots<acc_t>(dim_k, kRows);
    for (int64_t tile_begin = 0; tile_begin < existing; tile_begin += tile_slots) {
      const int64_t tile_rows = std::min(tile_slots, existing - tile_begin);
      const acc_t* key_tile;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        key_tile = keys_mem + tile_begin * dim_k;
      } else {
        to_acc(keys_mem + tile_begin * dim_k, scratch.key_tile.data(), tile_rows * dim_k);
        key_tile = scratch.key_tile.data();
      }
      for (int64_t block = 0; block < blocks; ++block) {
        const acc_t* q_block = scratch.q_packed.data() + block * dim_k * kBlock;
        const int64_t lane_base = block * kBlock;
        const int64_t live_lanes = std::min<int64_t>(kBlock, rows - lane_base);
        int64_t r = 0;
        for (; r + kRows <= tile_rows; r += kRows) {
          score_and_offer<acc_t, kRows, kVecs>(key_tile + r * dim_k, dim_k, q_block, lists,
                                               lane_base, live_lanes, tile_begin + r);
        }
        for (; r < tile_rows; ++r) {
          score_and_offer<acc_t, 1, kVecs>(key_tile + r * dim_k, dim_k, q_block, lists,
                                           lane_base, live_lanes, tile_begin + r);
        }
      }
    }

    // The lists are already in the output order.
    auto* out = static_cast<scalar_t*>(p.out);
    auto* weights = static_cast<acc_t*>(p.weights);
    auto* lse = static_cast<acc_t*>(p.lse);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t count = lists.counts[row];
      const int64_t global_row = first_row + row;
      finish_row<scalar_t>(lists.scores + row * k, lists.slots + row * k, count, k, values_mem,
                           dim_v,
                           p.indices + global_row * k, weights + global_row * k, lse + global_row,
                           out + global_row * dim_v, scratch.value_row.data(),
                           scratch.out_acc.data());
    }
  }
};

template <typename scalar_t, int kVecs>
void topk_read_fwd_vecs(const TopkReadFwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  using Runner = FwdUnitRunner<scalar_t, kVecs>;
  constexpr int64_t kBlock = Runner::kBlock;
  const int64_t group = p.heads / p.mem_heads;
  const int64_t rows_per_memory = group * p.seq_len;
  const int64_t units_per_memory = (rows_per_memory + kUnitRows - 1) / kUnitRows;
  const int64_t num_units = p.batch * p.mem_heads * units_per_memory;
  const int64_t dim_k = p.dim_k, dim_v = p.dim_v, k = p.k;
  const int64_t unit_capacity = std::min(kUnitRows, rows_per_memory);
  const int64_t padded_rows = (unit_capacity + kBlock - 1) / kBlock * kBlock;
  const int64_t tile_slots = key_tile_slots<acc_t>(dim_k, Runner::kRows);

  at::parallel_for(0, num_units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    FwdScratch<acc_t> scratch;
    scratch.q_packed.resize(padded_rows * dim_k);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      scratch.key_tile.resize(std::min(tile_slots, p.num_slots) * dim_k);
    }
    scratch.kept_scores.resize(unit_capacity * k);
    scratch.kept_slots.resize(unit_capacity * k);
    scratch.counts.resize(unit_capacity);
    scratch.thresholds.resize(padded_rows);
    scratch.lists.k = k;
    scratch.lists.scores = scratch.kept_scores.data();
    scratch.lists.slots = scratch.kept_slots.data();
    scratch.lists.counts = scratch.counts.data();
    scratch.lists.thresholds = scratch.thresholds.data();
    scratch.q_row.resize(dim_k);
    scratch.value_row.resize(dim_v);
    scratch.out_acc.resize(dim_v);
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t memory = unit / units_per_memory;
      const int64_t row_begin = (unit % units_per_memory) * kUnitRows;
      const int64_t rows = std::min(kUnitRows, rows_per_memory - row_begin);
      Runner::run(p, memory / p.mem_heads, memory % p.mem_heads, row_begin, rows, scratch);
    }
  });
}

template <typename scalar_t>
void topk_read_fwd_impl(const TopkReadFwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  if (p.batch == 0 || p.heads == 0 || p.seq_len == 0) {
    return;
  }
  // Narrower query blocks for few query rows per memory (decoding), so padding lanes waste less.
  const int64_t rows_per_memory = (p.heads / p.mem_heads) * p.seq_len;
  constexpr int64_t kWidth = Lanes<acc_t>::kWidth;
  if (kMaxVecs >= 4 && rows_per_memory > 2 * kWidth) {
    topk_read_fwd_vecs<scalar_t, kMaxVecs>(p);
  } else if (rows_per_memory > kWidth) {
    topk_read_fwd_vecs<scalar_t, 2>(p);
  } else {
    topk_read_fwd_vecs<scalar_t, 1>(p);
  }
}

// ---- backward ----

template <typename scalar_t>
void topk_read_bwd_impl(const TopkReadBwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = p.batch, heads = p.heads, seq_len = p.seq_len, mem_heads = p.mem_heads;
  const int64_t num_slots = p.num_slots, dim_k = p.dim_k, dim_v = p.dim_v, k = p.k;
  const int64_t group = heads / mem_heads;
  const int64_t num_rows = batch * heads * seq_len;
  const int64_t num_memories = p.shared_memory ? mem_heads : batch * mem_heads;
  const acc_t scale = static_cast<acc_t>(p.scale);

  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* dweights = static_cast<const acc_t*>(p.dweights);
  const auto* dlse = static_cast<const acc_t*>(p.dlse);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* keys = static_cast<const scalar_t*>(p.keys);
  const auto* values = static_cast<const scalar_t*>(p.values);
  const int64_t* indices = p.indices;
  const auto* weights = static_cast<const acc_t*>(p.weights);
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dkeys = static_cast<scalar_t*>(p.dkeys);
  auto* dvalues = static_cast<scalar_t*>(p.dvalues);

  auto memory_of_row = [&](int64_t row) {
    const int64_t b = row / (heads * seq_len);
    const int64_t mem_head = (row / seq_len) % heads / group;
    return p.shared_memory ? mem_head : b * mem_heads + mem_head;
  };

  // Phase 1: ds per (row, j) and dq per row.
  std::vector<acc_t> score_grads(num_rows * k);
  const int64_t widest = std::max<int64_t>(dim_k, dim_v);
  const int64_t rows_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(k * widest, 1));
  at::parallel_for(0, num_rows, rows_per_task, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> dout_buffer(dim_v), row_buffer(widest), dq_acc(dim_k), weight_grads(k);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t memory = memory_of_row(row);
      const scalar_t* keys_mem = keys + memory * num_slots * dim_k;
      const scalar_t* values_mem = values + memory * num_slots * dim_v;
      const int64_t* row_indices = indices + row * k;
      const acc_t* row_weights = weights + row * k;
      const acc_t* grad_out = load_row(dout + p.dout_rows.offset(row), dim_v, dout_buffer.data());
      acc_t weighted_sum = 0;  // sum_i w_i dw_i
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = row_indices[j];
        if (slot < 0) {
          continue;
        }
        const acc_t* value = load_row(values_mem + slot * dim_v, dim_v, row_buffer.data());
        acc_t dot = 0;
        for (int64_t i = 0; i < dim_v; ++i) {
          dot += grad_out[i] * value[i];
        }
        weight_grads[j] = dweights[row * k + j] + dot;
        weighted_sum += row_weights[j] * weight_grads[j];
      }
      const acc_t grad_lse = dlse[row];
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = row_indices[j];
        if (slot < 0) {
          score_grads[row * k + j] = 0;
          continue;
        }
        const acc_t w = row_weights[j];
        const acc_t ds = w * (weight_grads[j] - weighted_sum) + w * grad_lse;
        score_grads[row * k + j] = ds;
        const acc_t* key = load_row(keys_mem + slot * dim_k, dim_k, row_buffer.data());
#pragma omp simd
        for (int64_t d = 0; d < dim_k; ++d) {
          dq_acc[d] += ds * key[d];
        }
      }
      for (int64_t d = 0; d < dim_k; ++d) {
        dq_acc[d] *= scale;
      }
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::copy(dq_acc.begin(), dq_acc.end(), dq + row * dim_k);
      } else {
        store_row(dq + row * dim_k, dq_acc.data(), dim_k);
      }
    }
  });

  // Phase 2: per memory, the (row, j) entries grouped by slot, in increasing (row, j) order.
  // slot_begin[memory * (N + 1) + n] .. [.. + n + 1] delimit slot n's run in entries.
  std::vector<int64_t> slot_begin(num_memories * (num_slots + 1), 0);
  std::vector<int64_t> memory_entry_begin(num_memories + 1, 0);
  // The query rows that read memory m: for every batch element b it serves, the group * T
  // consecutive rows starting at (b * H + mem_head * group) * T.
  const int64_t rows_per_memory = group * seq_len;
  auto for_rows_of_memory = [&](int64_t memory, auto&& fn) {
    const int64_t mem_head = memory % mem_heads;
    const int64_t b_begin = p.shared_memory ? 0 : memory / mem_heads;
    const int64_t b_end = p.shared_memory ? batch : b_begin + 1;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t first = (b * heads + mem_head * group) * seq_len;
      for (int64_t row = first; row < first + rows_per_memory; ++row) {
        fn(row);
      }
    }
  };
  // Counts (parallel over memories), then the entry offsets, then the fill.
  at::parallel_for(0, num_memories, 1, [&](int64_t memory_begin, int64_t memory_end) {
    for (int64_t memory = memory_begin; memory < memory_end; ++memory) {
      int64_t* counts = slot_begin.data() + memory * (num_slots + 1);
      for_rows_of_memory(memory, [&](int64_t row) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = indices[row * k + j];
          if (slot >= 0) {
            ++counts[slot + 1];
          }
        }
      });
      std::partial_sum(counts, counts + num_slots + 1, counts);
    }
  });
  for (int64_t memory = 0; memory < num_memories; ++memory) {
    memory_entry_begin[memory + 1] =
        memory_entry_begin[memory] + slot_begin[memory * (num_slots + 1) + num_slots];
  }
  std::vector<int64_t> entries(memory_entry_begin[num_memories]);
  at::parallel_for(0, num_memories, 1, [&](int64_t memory_begin, int64_t memory_end) {
    for (int64_t memory = memory_begin; memory < memory_end; ++memory) {
      const int64_t* offsets = slot_begin.data() + memory * (num_slots + 1);
      int64_t* memory_entries = entries.data() + memory_entry_begin[memory];
      std::vector<int64_t> fill(offsets, offsets + num_slots);
      for_rows_of_memory(memory, [&](int64_t row) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = indices[row * k + j];
          if (slot >= 0) {
            memory_entries[fill[slot]++] = row * k + j;
          }
        }
      });
    }
  });

  // Phase 3: one task per slot owns its dkeys and dvalues rows.
  const int64_t total_slots = num_memories * num_slots;
  const int64_t slots_per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim_k + dim_v, 1));
  at::parallel_for(0, total_slots, slots_per_task, [&](int64_t slot_begin_id, int64_t slot_end_id) {
    std::vector<acc_t> dkey_acc(dim_k), dvalue_acc(dim_v), q_buffer(dim_k), dout_buffer(dim_v);
    for (int64_t memory_slot = slot_begin_id; memory_slot < slot_end_id; ++memory_slot) {
      const int64_t memory = memory_slot / num_slots, slot = memory_slot % num_slots;
      const int64_t* offsets = slot_begin.data() + memory * (num_slots + 1);
      const int64_t* memory_entries = entries.data() + memory_entry_begin[memory];
      std::fill(dkey_acc.begin(), dkey_acc.end(), acc_t(0));
      std::fill(dvalue_acc.begin(), dvalue_acc.end(), acc_t(0));
      for (int64_t e = offsets[slot]; e < offsets[slot + 1]; ++e) {
        const int64_t entry = memory_entries[e];
        const int64_t row = entry / k;
        const acc_t ds = score_grads[entry];
        const acc_t w = weights[entry];
        const acc_t* q_row = load_row(q + p.q_rows.offset(row), dim_k, q_buffer.data());
        const acc_t* grad_out = load_row(dout + p.dout_rows.offset(row), dim_v, dout_buffer.data());
        // d score / d key = scale * q, rounded to the accumulation type as in the forward.
#pragma omp simd
        for (int64_t d = 0; d < dim_k; ++d) {
          dkey_acc[d] += ds * (q_row[d] * scale);
        }
#pragma omp simd
        for (int64_t i = 0; i < dim_v; ++i) {
          dvalue_acc[i] += w * grad_out[i];
        }
      }
      const int64_t key_offset = memory_slot * dim_k, value_offset = memory_slot * dim_v;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::copy(dkey_acc.begin(), dkey_acc.end(), dkeys + key_offset);
        std::copy(dvalue_acc.begin(), dvalue_acc.end(), dvalues + value_offset);
      } else {
        store_row(dkeys + key_offset, dkey_acc.data(), dim_k);
        store_row(dvalues + value_offset, dvalue_acc.data(), dim_v);
      }
    }
  });
}

}  // namespace

L2M_CPU_LAUNCHER(topk_read_fwd, TopkReadFwdParams, topk_read_fwd_impl)
L2M_CPU_LAUNCHER(topk_read_bwd, TopkReadBwdParams, topk_read_bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
