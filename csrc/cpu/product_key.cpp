// CPU kernels of the product-key memory read (interface: product_key.h; semantics: SPEC section 2
// and l2m_kernels/ops/product_key/reference.py).
//
// Forward. Nothing of size T x n_sub (let alone T x n_sub ** 2) is formed. The sub-key tables are
// packed once per call, transposed per panel of kPanel sub-keys (panel[d][lane], acc type). Work
// units are (batch, block of up to kUnitRows queries, heads): one head per unit, or all heads
// when sum_heads, so the head sum stays inside one task. For each head and half, a unit walks the
// panels; against each panel (in L1), a register-blocked micro-kernel computes kRows queries x
// kPanel sub-keys of scores, each one sequential FMA chain over d = 0 .. Dh - 1 followed by the
// scale (dot first, then scale, as the reference), so a score does not depend on the tiling or
// the thread count. The unit's scores of one half (rows x n_sub, in L2) are then selected row by
// row: the smallest of k_sub group maxima bounds the k_sub-th best from below, the scores at or
// above it are collected with one vector compare per kWidth sub-keys, and the k_sub best of those
// are placed by rank (each one's count of larger scores: vector compares, no data-dependent
// branch). The two sorted halves are then combined: the pairs (i, j) with (i + 1)(j + 1) <= k,
// which hold the k best unless a sum ties the k-th, are placed by rank too (on a tie, or with a
// non-finite score: candidates (i, j) in order, pruned as soon as s1_i + s2_j, both halves
// descending so the sum is monotone, falls below the current k-th best). Then softmax, lse and
// the weighted sum of the k value rows (an embedding bag, the unit's rows * k value rows read in
// one sequence with prefetches a few rows ahead), per head or summed over heads in acc.
//
// Selection order: descending score; ties by the smaller sub-key (halves) or slot (candidates);
// NaN ranks above everything (torch.sort), NaNs among themselves by index. Both selections
// compare (score, id) in full (goes_before), so ties do not depend on the order of collection.
//
// Backward. Phase 1, parallel over query rows: ds per entry, grouped per distinct sub-key of
// each half (g = scale * sum ds, as the reference's scatter then matmul), and dq. Phase 2:
// dsubkeys, one task per sub-key summing its (query, g) contributions in query order (a counting
// sort per head and half). Phase 3: dvalues, dense (a counting sort of the entries by slot, one
// task per slot range, every row written) or coalesced (the same, per distinct slot read). No
// atomics, no thread-count dependence: bitwise deterministic.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "product_key.h"
#include "convert.h"
#include "simd.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// Asks for the cache lines of a row that is about to be read (value rows are random accesses).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* begin = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    __builtin_prefetch(begin + offset);
  }
}

// Register tiles of the sub-key score micro-kernel (Lanes<acc_t>, simd.h: one lane per sub-key).
#if L2M_SIMD_REGISTERS == 32
// 32 zmm registers: 8 x 2 accumulators, 2 sub-key vectors, 1 broadcast query value.
constexpr int kVecs = 2;
constexpr int kRows = 8;
#elif L2M_SIMD_REGISTERS == 16
// 16 ymm registers: 6 x 2 accumulators, 2 sub-key vectors, 1 broadcast query value.
constexpr int kVecs = 2;
constexpr int kRows = 6;
#else
constexpr int kVecs = 2;
constexpr int kRows = 4;
#endif

// sum_i a[i] * b[i] in a fixed order (two vector accumulators, then their lanes in order): fast
// and still bitwise reproducible.
template <typename acc_t>
inline acc_t dot_product(const acc_t* a, const acc_t* b, int64_t n) {
  using L = Lanes<acc_t>;
  constexpr int kWidth = L::kWidth;
  typename L::vec sum0 = L::zero(), sum1 = L::zero();
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    sum0 = L::fma(L::load(a + i), L::load(b + i), sum0);
    sum1 = L::fma(L::load(a + i + kWidth), L::load(b + i + kWidth), sum1);
  }
  for (; i + kWidth <= n; i += kWidth) {
    sum0 = L::fma(L::load(a + i), L::load(b + i), sum0);
  }
  alignas(64) acc_t lanes[2 * kWidth];
  L::store(lanes, sum0);
  L::store(lanes + kWidth, sum1);
  acc_t total = 0;
  for (int lane = 0; lane < 2 * kWidth; ++lane) {
    total += lanes[lane];
  }
  for (; i < n; ++i) {
    total += a[i] * b[i];
  }
  return total;
}

// Value rows the gathers (forward, and the backward's dweights) prefetch ahead of the one they read.
constexpr int64_t kGatherAhead = 4;

// Queries per forward work unit: their half of q (kUnitRows x Dh) stays in L1/L2 while each
// sub-key panel is reused by all of them.
constexpr int64_t kUnitRows = 32;

// ---- selection order ----

// NaN ranks above everything (torch.sort, descending); otherwise the larger score.
template <typename acc_t>
inline bool ranks_above(acc_t a, acc_t b) {
  return std::isnan(a) ? !std::isnan(b) : (!std::isnan(b) && a > b);
}
// A scored sub-key (halves) or slot (candidates).
template <typename acc_t>
struct Ranked {
  acc_t score;
  int64_t id;
};

// The output order: rank descending, then id ascending (a strict weak order, NaNs one class).
template <typename acc_t>
inline bool goes_before(const Ranked<acc_t>& a, const Ranked<acc_t>& b) {
  if (ranks_above(a.score, b.score)) {
    return true;
  }
  if (ranks_above(b.score, a.score)) {
    return false;
  }
  return a.id < b.id;
}

// Keeps the k best of the pairs pushed into a buffer of `capacity` (> k) entries: when the buffer
// fills, a selection (nth_element in the output order) keeps the k best, and the k-th of them
// becomes the bar. Amortised O(1) per push, against O(k) for a sorted insertion.
template <typename acc_t>
inline void keep_best(Ranked<acc_t>* entries, int64_t& count, int64_t k) {
  if (count > k) {
    std::nth_element(entries, entries + (k - 1), entries + count, goes_before<acc_t>);
    count = k;
  }
}
template <typename acc_t>
inline void sort_best(Ranked<acc_t>* entries, int64_t& count, int64_t k) {
  keep_best(entries, count, k);
  std::sort(entries, entries + count, goes_before<acc_t>);
}

// Entries above which place_by_rank (quadratic) leaves the selection to a sort.
constexpr int64_t kRankedMax = 256;

// The scores padded with -inf (which no score is) to whole vectors: room for kWidth - 1 more.
// Returns the padded count, for rank_counts.
template <typename acc_t>
inline int64_t pad_scores(acc_t* scores, int64_t c) {
  constexpr int W = Lanes<acc_t>::kWidth;
  const int64_t padded = (c + W - 1) / W * W;
  std::fill(scores + c, scores + padded, -std::numeric_limits<acc_t>::infinity());
  return padded;
}
// How many of the padded scores (no NaN) are larger than x, and how many at or above it: one
// vector compare each per kWidth scores.
struct RankCounts {
  int64_t above = 0, at_or_above = 0;
};
template <typename acc_t>
inline RankCounts rank_counts(const acc_t* padded_scores, int64_t padded, acc_t x) {
  using L = Lanes<acc_t>;
  const typename L::vec value = L::broadcast(x);
  RankCounts counts;
  for (int64_t j = 0; j < padded; j += L::kWidth) {
    const typename L::vec other = L::load(padded_scores + j);
    counts.above += __builtin_popcount(L::passes(other, value));
    counts.at_or_above += __builtin_popcount(L::at_or_above(other, value));
  }
  return counts;
}

// The min(k, c) best of c entries with no NaN, in the output order, into `out` (not `entries`),
// without sorting: entry i goes to its rank, the number of entries with a larger score
// (rank_counts). `scores` holds entries[i].score at i, with room for kWidth - 1 more; no branch
// depends on the order of the data: up to a few hundred entries, this costs less
// than a comparison sort's mispredictions. Returns false, with `out` undefined, for more than
// kRankedMax entries or when two scores are equal (the ids then decide: the caller sorts).
template <typename acc_t>
bool place_by_rank(acc_t* scores, const Ranked<acc_t>* entries, int64_t c, int64_t k,
                   Ranked<acc_t>* out) {
  if (c > kRankedMax) {
    return false;
  }
  const int64_t padded = pad_scores(scores, c);
  for (int64_t i = 0; i < c; ++i) {
    const RankCounts counts = rank_counts(scores, padded, scores[i]);
    if (counts.at_or_above - counts.above != 1) {  // another entry has this score
      return false;
    }
    if (counts.above < k) {
      out[counts.above] = entries[i];
    }
  }
  return true;
}

// Scores of kRowsHere query rows against one panel of kPanel sub-keys, stored (scaled) into
// `scores`, which points at the panel's first sub-key in row 0 (row r at scores + r * score_stride).
//   q_rows: row r's half-query at q_rows + r * q_stride, Dh values (acc, unscaled)
//   panel:  (Dh, kPanel) acc; lane i is the panel's i-th sub-key, lanes past num_sub are padding
template <typename acc_t, int kRowsHere>
inline void score_panel(const acc_t* q_rows, int64_t q_stride, int64_t dim_h, const acc_t* panel,
                        acc_t scale, acc_t* scores, int64_t score_stride) {
  using L = Lanes<acc_t>;
  using vec = typename L::vec;
  constexpr int kPanel = kVecs * L::kWidth;
  vec acc[kRowsHere][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < kRowsHere; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = L::zero();
    }
  }
  for (int64_t d = 0; d < dim_h; ++d) {
    vec sub_vecs[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      sub_vecs[v] = L::load(panel + d * kPanel + v * L::kWidth);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRowsHere; ++r) {
      const vec q_value = L::broadcast(q_rows[r * q_stride + d]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = L::fma(q_value, sub_vecs[v], acc[r][v]);
      }
    }
  }
  // Dot first, then the scale: the reference's (q_half @ subkeys^T) * scale.
  const vec scale_vec = L::broadcast(scale);
#pragma GCC unroll 16
  for (int r = 0; r < kRowsHere; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      L::store(scores + r * score_stride + v * L::kWidth, L::mul(acc[r][v], scale_vec));
    }
  }
}

// The k best (score, sub-key) pairs of one row's n half scores, in the output order into `out`
// (`best`: room for n entries, `select_buffer` for n + kWidth, `group_max` for 2k + kWidth).
// Without NaN: the maxima of G >= k groups (sub-keys i with i mod G = g) are the scores of G
// distinct sub-keys, so at least k scores are at or above the k-th largest of them (the bar), and
// the k best are among those: only they are collected (in increasing sub-key order, a mask per
// vector), then placed by rank (place_by_rank), or selected and sorted when there are many or two
// are equal. G = 2k where n >= 4k (a higher bar: about half as many collected, for a quadratic
// placement), else k (the bar is the smallest maximum). A row with a NaN (which ranks above
// everything) takes the full order on every score.
template <typename acc_t>
void select_half(const acc_t* scores, int64_t n, int64_t k, acc_t* group_max, acc_t* select_buffer,
                 Ranked<acc_t>* best, Ranked<acc_t>* out) {
  using L = Lanes<acc_t>;
  constexpr int W = L::kWidth;
  int nan_found = 0;
#pragma omp simd reduction(| : nan_found)
  for (int64_t i = 0; i < n; ++i) {
    nan_found |= scores[i] != scores[i];
  }
  acc_t bar = -std::numeric_limits<acc_t>::infinity();
  if (k < n && !nan_found) {
    const int64_t groups = n >= 4 * k ? 2 * k : k;
    std::copy(scores, scores + groups, group_max);
    for (int64_t base = groups; base < n; base += groups) {
      const int64_t width = std::min(groups, n - base);
#pragma omp simd
      for (int64_t g = 0; g < width; ++g) {
        const acc_t score = scores[base + g];
        group_max[g] = score > group_max[g] ? score : group_max[g];
      }
    }
    if (groups == k) {
      bar = *std::min_element(group_max, group_max + k);
    } else {  // the k-th largest maximum: the largest with k maxima at or above it
      const int64_t padded = pad_scores(group_max, groups);
      for (int64_t g = 0; g < groups; ++g) {
        const bool qualifies = rank_counts(group_max, padded, group_max[g]).at_or_above >= k;
        bar = qualifies && group_max[g] > bar ? group_max[g] : bar;
      }
    }
  }
  int64_t count = 0;
  if (!(bar > -std::numeric_limits<acc_t>::infinity())) {
    // k == n, a NaN (which ranks above everything) or a bar of -inf: the full order.
    for (int64_t i = 0; i < n; ++i) {
      best[i] = {scores[i], i};
    }
    count = n;
    sort_best(best, count, k);
    std::copy(best, best + k, out);
    return;
  }
  const typename L::vec bar_vec = L::broadcast(bar);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    uint32_t bits = L::at_or_above(L::load(scores + i), bar_vec);
    while (bits) {
      const int64_t id = i + __builtin_ctz(bits);
      bits &= bits - 1;
      select_buffer[count] = scores[id];
      best[count++] = {scores[id], id};
    }
  }
  for (; i < n; ++i) {
    if (scores[i] >= bar) {
      select_buffer[count] = scores[i];
      best[count++] = {scores[i], i};
    }
  }
  if (place_by_rank(select_buffer, best, count, k, out)) {
    return;
  }
  // Many candidates, or equal scores: the k-th largest value decides; of the scores equal to it,
  // the first ones (smaller sub-keys: `best` is in increasing id order) are kept, then sorted.
  std::nth_element(select_buffer, select_buffer + (k - 1), select_buffer + count, std::greater<acc_t>());
  const acc_t kth = select_buffer[k - 1];
  int64_t equal_quota = k;
  for (int64_t j = 0; j < count; ++j) {
    equal_quota -= best[j].score > kth ? 1 : 0;
  }
  int64_t kept = 0;
  for (int64_t j = 0; j < count; ++j) {
    if (best[j].score > kth || (best[j].score == kth && equal_quota-- > 0)) {
      best[kept++] = best[j];
    }
  }
  std::sort(best, best + kept, [](const Ranked<acc_t>& a, const Ranked<acc_t>& b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);  // no NaN here
  });
  std::copy(best, best + k, out);
}

// combine_halves' first try, for halves whose scores are all finite: the candidates (a, b) with
// (a + 1)(b + 1) <= k (the staircase), placed by rank into `out`. A pair outside it has at least
// k others of at least its sum (every (a', b') <= (a, b): the sum is monotone in both), so it can
// only join the k best by tying the k-th best's sum with a smaller slot: the staircase's k best
// are the answer unless the first excluded pair of some row reaches their k-th sum. Returns false
// when it cannot tell (a tie, or a staircase of more than kRankedMax pairs), leaving `out`
// undefined. `scores` and `entries`: room for kRankedMax (+ kWidth) entries.
template <typename acc_t>
bool combine_staircase(const Ranked<acc_t>* half1, const Ranked<acc_t>* half2, int64_t k_sub,
                       int64_t num_sub, int64_t k, acc_t* scores, Ranked<acc_t>* entries,
                       Ranked<acc_t>* out) {
  const auto row_width = [&](int64_t a) { return std::min(k_sub, k / (a + 1)); };
  int64_t count = 0;
  for (int64_t a = 0; a < k_sub && row_width(a) > 0; ++a) {
    const int64_t width = row_width(a);
    if (count + width > kRankedMax) {
      return false;
    }
    const acc_t s1 = half1[a].score;
    const int64_t slot_base = half1[a].id * num_sub;
    for (int64_t b = 0; b < width; ++b) {
      const acc_t score = s1 + half2[b].score;
      scores[count] = score;
      entries[count++] = {score, slot_base + half2[b].id};
    }
  }
  if (count < k || !place_by_rank(scores, entries, count, k, out)) {
    return false;
  }
  const acc_t kth = out[k - 1].score;
  for (int64_t a = 0; a < k_sub; ++a) {
    const int64_t width = row_width(a);
    if (width < k_sub && half1[a].score + half2[width].score >= kth) {
      return false;
    }
  }
  return true;
}

// The k best of the k_sub x k_sub candidates half1[a] + half2[b] (slot id1 * n_sub + id2),
// sorted in the output order into `buffer` (capacity > k entries). Both halves are sorted
// descending; when every half score is finite, the sum is non-increasing along a and along b
// (rounding is monotone), so once a selection has set the bar (the k-th best kept), a row stops at
// the first sum below it, and the walk stops at the first row whose best sum is below it. Sums
// equal to the bar are still pushed: the smaller slot wins those.
template <typename acc_t>
void combine_halves(const Ranked<acc_t>* half1, const Ranked<acc_t>* half2, int64_t k_sub,
                    int64_t num_sub, int64_t k, Ranked<acc_t>* buffer, int64_t capacity,
                    acc_t* rank_scores, Ranked<acc_t>* rank_entries) {
  const bool all_finite = std::isfinite(half1[0].score) &&
                          std::isfinite(half1[k_sub - 1].score) &&
                          std::isfinite(half2[0].score) && std::isfinite(half2[k_sub - 1].score);
  if (all_finite &&
      combine_staircase(half1, half2, k_sub, num_sub, k, rank_scores, rank_entries, buffer)) {
    return;
  }
  int64_t count = 0;
  acc_t bar = -std::numeric_limits<acc_t>::infinity();  // nothing pruned until a selection
  for (int64_t a = 0; a < k_sub; ++a) {
    const acc_t s1 = half1[a].score;
    const int64_t slot_base = half1[a].id * num_sub;
    if (all_finite && s1 + half2[0].score < bar) {
      break;
    }
    for (int64_t b = 0; b < k_sub; ++b) {
      const acc_t score = s1 + half2[b].score;
      if (all_finite && score < bar) {
        break;
      }
      buffer[count++] = {score, slot_base + half2[b].id};
      if (count == capacity) {
        keep_best(buffer, count, k);
        if (all_finite) {
          bar = buffer[k - 1].score;
        }
      }
    }
  }
  sort_best(buffer, count, k);
}

// Softmax and logsumexp of one query's k selected scores, as torch.softmax / torch.logsumexp:
// a NaN score makes the row NaN; an infinite maximum is not subtracted in the logsumexp.
template <typename acc_t>
void softmax_lse(const acc_t* scores, int64_t k, acc_t* weights, acc_t* lse) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    if (std::isnan(scores[j]) || std::isnan(row_max)) {
      row_max = std::numeric_limits<acc_t>::quiet_NaN();
    } else if (scores[j] > row_max) {
      row_max = scores[j];
    }
  }
  acc_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    weights[j] = std::exp(scores[j] - row_max);
    total += weights[j];
  }
  for (int64_t j = 0; j < k; ++j) {
    weights[j] = weights[j] / total;
  }
  if (std::isinf(row_max)) {
    acc_t shifted_total = 0;
    for (int64_t j = 0; j < k; ++j) {
      shifted_total += std::exp(scores[j]);
    }
    *lse = std::log(shifted_total);
  } else {
    *lse = std::log(total) + row_max;
  }
}

// ---- forward ----

// A forward thread's buffers, sized once for units of up to kUnitRows queries.
template <typename acc_t>
struct FwdScratch {
  std::vector<acc_t> q_block;  // (padded rows, Dk): the unit's queries of one head, unscaled
  std::vector<acc_t> half_scores;          // (padded rows, padded n_sub): one half's scores
  std::vector<acc_t> group_max;            // (2 k_sub + kWidth,)
  std::vector<acc_t> select_buffer;        // (n_sub + kWidth,)
  std::vector<Ranked<acc_t>> selection;    // (n_sub,): one row's collected scores
  std::vector<Ranked<acc_t>> half_best[2];  // (rows, k_sub): each row's k_sub best per half
  std::vector<Ranked<acc_t>> candidates;  // (candidate capacity,)
  std::vector<acc_t> rank_scores;          // (kRankedMax + kWidth,): combine_staircase
  std::vector<Ranked<acc_t>> rank_entries;  // (kRankedMax,)
  std::vector<acc_t> scores;              // (k,)
  std::vector<acc_t> value_row, out_acc, head_sum;  // head_sum: (rows, Dv) with sum_heads
};

template <typename scalar_t>
struct FwdRunner {
  using acc_t = acc_type<scalar_t>;
  using L = Lanes<acc_t>;
  static constexpr int kPanel = kVecs * L::kWidth;

  const ProductKeyFwdParams& p;
  const acc_t* packed;  // (H, 2, panels, Dh, kPanel)
  int64_t num_panels;

  // Queries t_begin .. t_begin + rows of batch element b, heads h_begin .. h_end.
  void run(int64_t b, int64_t t_begin, int64_t rows, int64_t h_begin, int64_t h_end,
           FwdScratch<acc_t>& scratch) const {
    const int64_t dim_k = p.dim_k, dim_h = p.dim_k / 2, dim_v = p.dim_v, k = p.k;
    const int64_t k_sub = p.k_sub, num_sub = p.n_sub, heads = p.heads, seq_len = p.seq_len;
    const int64_t padded_rows = (rows + kRows - 1) / kRows * kRows;
    const acc_t scale = static_cast<acc_t>(p.scale);
    const auto* q = static_cast<const scalar_t*>(p.q);
    const auto* values = static_cast<const scalar_t*>(p.values);
    auto* out = static_cast<scalar_t*>(p.out);
    auto* weights = static_cast<acc_t*>(p.weights);
    auto* lse = static_cast<acc_t*>(p.lse);
    acc_t* q_block = scratch.q_block.data();

    for (int64_t h = h_begin; h < h_end; ++h) {
      const int64_t first_row = (b * heads + h) * seq_len + t_begin;  // flat (b, h, t) row
      for (int64_t r = 0; r < rows; ++r) {  // rows of any strides (a copy for float / double)
        to_acc(q + p.q_rows.offset(first_row + r), q_block + r * dim_k, dim_k);
      }
      std::fill(q_block + rows * dim_k, q_block + padded_rows * dim_k, acc_t(0));

      // Per half: every score of the unit's rows (panel by panel, each panel in L1 while the rows
      // walk it), then each row's k_sub best.
      const int64_t score_stride = num_panels * kPanel;
      acc_t* half_scores = scratch.half_scores.data();
      for (int half = 0; half < 2; ++half) {
        const acc_t* half_packed = packed + (h * 2 + half) * num_panels * dim_h * kPanel;
        const acc_t* q_half = q_block + half * dim_h;
        for (int64_t panel = 0; panel < num_panels; ++panel) {
          const acc_t* panel_data = half_packed + panel * dim_h * kPanel;
          for (int64_t r = 0; r < padded_rows; r += kRows) {
            score_panel<acc_t, kRows>(q_half + r * dim_k, dim_k, dim_h, panel_data, scale,
                                      half_scores + r * score_stride + panel * kPanel, score_stride);
          }
        }
        Ranked<acc_t>* selection = scratch.selection.data();
        for (int64_t r = 0; r < rows; ++r) {
          select_half(half_scores + r * score_stride, num_sub, k_sub, scratch.group_max.data(),
                      scratch.select_buffer.data(), selection,
                      scratch.half_best[half].data() + r * k_sub);
        }
      }

      // Every row's k slots and weights first, then the gather over the unit's rows * k value rows
      // in one sequence, prefetched kGatherAhead rows ahead across query boundaries (random rows
      // of a table far larger than the caches: the misses, not the arithmetic, set the pace).
      Ranked<acc_t>* candidates = scratch.candidates.data();
      acc_t* scores = scratch.scores.data();
      for (int64_t r = 0; r < rows; ++r) {
        combine_halves(scratch.half_best[0].data() + r * k_sub, scratch.half_best[1].data() + r * k_sub,
                       k_sub, num_sub, k, candidates, static_cast<int64_t>(scratch.candidates.size()),
                       scratch.rank_scores.data(), scratch.rank_entries.data());
        const int64_t row = first_row + r;
        int64_t* row_slots = p.indices + row * k;
        for (int64_t j = 0; j < k; ++j) {
          scores[j] = candidates[j].score;
          row_slots[j] = candidates[j].id;
        }
        softmax_lse(scores, k, weights + row * k, lse + row);
      }

      const int64_t* unit_slots = p.indices + first_row * k;  // (rows, k), contiguous
      const int64_t reads = rows * k;
      for (int64_t e = 0; e < std::min(reads, kGatherAhead); ++e) {
        prefetch_row(values + unit_slots[e] * dim_v, dim_v);
      }
      acc_t* out_acc = scratch.out_acc.data();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = first_row + r;
        const acc_t* row_weights = weights + row * k;
        std::fill(out_acc, out_acc + dim_v, acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = r * k + j;
          if (e + kGatherAhead < reads) {
            prefetch_row(values + unit_slots[e + kGatherAhead] * dim_v, dim_v);
          }
          const acc_t weight = row_weights[j];
          const acc_t* value = load_row(values + unit_slots[e] * dim_v, dim_v, scratch.value_row.data());
#pragma omp simd
          for (int64_t i = 0; i < dim_v; ++i) {
            out_acc[i] += weight * value[i];
          }
        }
        if (p.sum_heads) {
          acc_t* head_sum = scratch.head_sum.data() + r * dim_v;
          if (h == h_begin) {
            std::copy(out_acc, out_acc + dim_v, head_sum);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < dim_v; ++i) {
              head_sum[i] += out_acc[i];
            }
          }
        } else {
          store_row(out + row * dim_v, out_acc, dim_v);
        }
      }
    }
    if (p.sum_heads) {
      for (int64_t r = 0; r < rows; ++r) {
        store_row(out + (b * seq_len + t_begin + r) * dim_v, scratch.head_sum.data() + r * dim_v,
                  dim_v);
      }
    }
  }
};

template <typename scalar_t>
void product_key_fwd_impl(const ProductKeyFwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  using Runner = FwdRunner<scalar_t>;
  constexpr int64_t kPanel = Runner::kPanel;
  const int64_t batch = p.batch, heads = p.heads, seq_len = p.seq_len;
  if (batch == 0 || heads == 0 || seq_len == 0) {
    return;
  }
  const int64_t dim_h = p.dim_k / 2, num_sub = p.n_sub, k = p.k, k_sub = p.k_sub;
  const int64_t num_panels = (num_sub + kPanel - 1) / kPanel;

  // Sub-key tables in acc, transposed per panel: packed[h][half][panel][d][lane], zero padding.
  std::vector<acc_t> packed(heads * 2 * num_panels * dim_h * kPanel);
  const auto* subkeys = static_cast<const scalar_t*>(p.subkeys);
  at::parallel_for(0, heads * 2 * num_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_buffer(dim_h);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t table = task / num_panels, panel = task % num_panels;
      acc_t* dst = packed.data() + task * dim_h * kPanel;
      for (int64_t lane = 0; lane < kPanel; ++lane) {
        const int64_t sub = panel * kPanel + lane;
        if (sub < num_sub) {
          const acc_t* src =
              load_row(subkeys + (table * num_sub + sub) * dim_h, dim_h, row_buffer.data());
          for (int64_t d = 0; d < dim_h; ++d) {
            dst[d * kPanel + lane] = src[d];
          }
        } else {
          for (int64_t d = 0; d < dim_h; ++d) {
            dst[d * kPanel + lane] = 0;
          }
        }
      }
    }
  });

  // Units: (b, query block, head) or, with sum_heads, (b, query block) over every head. Blocks
  // shrink when there would be too few units to keep every thread busy.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t head_units = p.sum_heads ? 1 : heads;
  int64_t unit_rows = kUnitRows;
  while (unit_rows >= 2 * kRows && batch * head_units * ((seq_len + unit_rows - 1) / unit_rows) <
                                  4 * threads) {
    unit_rows /= 2;
  }
  const int64_t blocks_per_seq = (seq_len + unit_rows - 1) / unit_rows;
  const int64_t num_units = batch * head_units * blocks_per_seq;
  const int64_t capacity = std::min(unit_rows, seq_len);
  const int64_t padded_capacity = (capacity + kRows - 1) / kRows * kRows;
  const Runner runner{p, packed.data(), num_panels};

  at::parallel_for(0, num_units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    FwdScratch<acc_t> scratch;
    scratch.q_block.resize(padded_capacity * p.dim_k);
    scratch.half_scores.resize(padded_capacity * num_panels * kPanel);
    scratch.group_max.resize(2 * k_sub + Lanes<acc_t>::kWidth);
    scratch.selection.resize(num_sub);
    scratch.select_buffer.resize(num_sub + Lanes<acc_t>::kWidth);
    for (int half = 0; half < 2; ++half) {
      scratch.half_best[half].resize(capacity * k_sub);
    }
    scratch.candidates.resize(2 * k);
    scratch.rank_scores.resize(kRankedMax + Lanes<acc_t>::kWidth);
    scratch.rank_entries.resize(kRankedMax);
    scratch.scores.resize(k);
    scratch.value_row.resize(p.dim_v);
    scratch.out_acc.resize(p.dim_v);
    if (p.sum_heads) {
      scratch.head_sum.resize(capacity * p.dim_v);
    }
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t block = unit % blocks_per_seq;
      const int64_t head_unit = (unit / blocks_per_seq) % head_units;
      const int64_t b = unit / (blocks_per_seq * head_units);
      const int64_t t_begin = block * unit_rows;
      const int64_t rows = std::min(unit_rows, seq_len - t_begin);
      if (p.sum_heads) {
        runner.run(b, t_begin, rows, 0, heads, scratch);
      } else {
        runner.run(b, t_begin, rows, head_unit, head_unit + 1, scratch);
      }
    }
  });
}

// ---- backward ----

template <typename scalar_t>
void product_key_bwd_impl(const ProductKeyBwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = p.batch, heads = p.heads, seq_len = p.seq_len, dim_k = p.dim_k;
  const int64_t dim_h = dim_k / 2, num_sub = p.n_sub, dim_v = p.dim_v, k = p.k;
  const int64_t num_rows = batch * heads * seq_len;
  const int64_t num_slots = num_sub * num_sub;
  const acc_t scale = static_cast<acc_t>(p.scale);

  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* dweights = static_cast<const acc_t*>(p.dweights);
  const auto* dlse = static_cast<const acc_t*>(p.dlse);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* subkeys = static_cast<const scalar_t*>(p.subkeys);
  const auto* values = static_cast<const scalar_t*>(p.values);
  const int64_t* indices = p.indices;
  const auto* weights = static_cast<const acc_t*>(p.weights);
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dsubkeys = static_cast<scalar_t*>(p.dsubkeys);
  auto* dvalues = static_cast<scalar_t*>(p.dvalues);

  // dout row of flat query row (b, h, t).
  auto dout_offset = [&](int64_t row) { return p.dout_rows.offset(row); };

  // Phase 1: per row and half, the distinct sub-keys (in order of first appearance) with
  // g = scale * sum of their entries' ds; and dq.
  std::vector<int64_t> group_ids(num_rows * 2 * k);
  std::vector<acc_t> group_grads(num_rows * 2 * k);
  std::vector<int64_t> group_counts(num_rows * 2);
  const int64_t widest = std::max<int64_t>(dim_h, dim_v);
  const int64_t rows_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(k * widest, 1));
  at::parallel_for(0, num_rows, rows_per_task, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> dout_buffer(dim_v), row_buffer(widest), dq_acc(dim_k), weight_grads(k);
    std::vector<int64_t> position(num_sub, -1);  // sub-key -> its group in the current row
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t h = (row / seq_len) % heads;
      const int64_t* row_indices = indices + row * k;
      const acc_t* row_weights = weights + row * k;
      const acc_t* grad_out = load_row(dout + dout_offset(row), dim_v, dout_buffer.data());
      acc_t weighted_sum = 0;  // sum_j w_j dw_j
      for (int64_t j = 0; j < k; ++j) {
        // As the forward's gather: kGatherAhead value rows ahead, into the task's next rows.
        const int64_t ahead = row * k + j + kGatherAhead;
        if (ahead < row_end * k) {
          prefetch_row(values + indices[ahead] * dim_v, dim_v);
        }
        const acc_t* value = load_row(values + row_indices[j] * dim_v, dim_v, row_buffer.data());
        weight_grads[j] = dweights[row * k + j] + dot_product(grad_out, value, dim_v);
        weighted_sum += row_weights[j] * weight_grads[j];
      }
      const acc_t grad_lse = dlse[row];
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      for (int half = 0; half < 2; ++half) {
        int64_t* ids = group_ids.data() + (row * 2 + half) * k;
        acc_t* grads = group_grads.data() + (row * 2 + half) * k;
        int64_t count = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = row_indices[j];
          const int64_t sub = half == 0 ? slot / num_sub : slot % num_sub;
          const acc_t w = row_weights[j];
          const acc_t ds = w * (weight_grads[j] - weighted_sum) + w * grad_lse;
          if (position[sub] < 0) {
            position[sub] = count;
            ids[count] = sub;
            grads[count] = ds;
            ++count;
          } else {
            grads[position[sub]] += ds;
          }
        }
        group_counts[row * 2 + half] = count;
        const scalar_t* table = subkeys + (h * 2 + half) * num_sub * dim_h;
        acc_t* dq_half = dq_acc.data() + half * dim_h;
        for (int64_t g = 0; g < count; ++g) {
          position[ids[g]] = -1;
          grads[g] *= scale;  // d/d(q . subkey) of (q . subkey) * scale
          const acc_t grad = grads[g];
          const acc_t* sub_row = load_row(table + ids[g] * dim_h, dim_h, row_buffer.data());
#pragma omp simd
          for (int64_t d = 0; d < dim_h; ++d) {
            dq_half[d] += grad * sub_row[d];
          }
        }
      }
      store_row(dq + row * dim_k, dq_acc.data(), dim_k);
    }
  });

  // Phase 2: dsubkeys. Per table (h, half), a counting sort of the groups by sub-key, over the
  // rows of head h in (b, t) order; then one task per sub-key row.
  const int64_t num_tables = heads * 2;
  std::vector<int64_t> sub_begin(num_tables * (num_sub + 1), 0);
  std::vector<int64_t> table_entry_begin(num_tables + 1, 0);
  auto for_groups_of_table = [&](int64_t table, auto&& fn) {
    const int64_t h = table / 2, half = table % 2;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t < seq_len; ++t) {
        const int64_t row = (b * heads + h) * seq_len + t;
        const int64_t group_base = (row * 2 + half) * k;
        const int64_t count = group_counts[row * 2 + half];
        for (int64_t g = 0; g < count; ++g) {
          fn(group_base + g);
        }
      }
    }
  };
  at::parallel_for(0, num_tables, 1, [&](int64_t table_begin, int64_t table_end) {
    for (int64_t table = table_begin; table < table_end; ++table) {
      int64_t* counts = sub_begin.data() + table * (num_sub + 1);
      for_groups_of_table(table, [&](int64_t group) { ++counts[group_ids[group] + 1]; });
      std::partial_sum(counts, counts + num_sub + 1, counts);
    }
  });
  for (int64_t table = 0; table < num_tables; ++table) {
    table_entry_begin[table + 1] =
        table_entry_begin[table] + sub_begin[table * (num_sub + 1) + num_sub];
  }
  std::vector<int64_t> sub_entries(table_entry_begin[num_tables]);
  at::parallel_for(0, num_tables, 1, [&](int64_t table_begin, int64_t table_end) {
    for (int64_t table = table_begin; table < table_end; ++table) {
      const int64_t* offsets = sub_begin.data() + table * (num_sub + 1);
      int64_t* entries = sub_entries.data() + table_entry_begin[table];
      std::vector<int64_t> fill(offsets, offsets + num_sub);
      for_groups_of_table(table, [&](int64_t group) { entries[fill[group_ids[group]]++] = group; });
    }
  });
  const int64_t subs_per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim_h, 1));
  at::parallel_for(0, num_tables * num_sub, subs_per_task, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dsub_acc(dim_h), q_buffer(dim_h);
    for (int64_t table_sub = begin; table_sub < end; ++table_sub) {
      const int64_t table = table_sub / num_sub, sub = table_sub % num_sub, half = table % 2;
      const int64_t* offsets = sub_begin.data() + table * (num_sub + 1);
      const int64_t* entries = sub_entries.data() + table_entry_begin[table];
      std::fill(dsub_acc.begin(), dsub_acc.end(), acc_t(0));
      for (int64_t e = offsets[sub]; e < offsets[sub + 1]; ++e) {
        const int64_t group = entries[e];
        const int64_t row = group / (2 * k);
        const acc_t grad = group_grads[group];
        const acc_t* q_half =
            load_row(q + p.q_rows.offset(row) + half * dim_h, dim_h, q_buffer.data());
#pragma omp simd
        for (int64_t d = 0; d < dim_h; ++d) {
          dsub_acc[d] += grad * q_half[d];
        }
      }
      store_row(dsubkeys + table_sub * dim_h, dsub_acc.data(), dim_h);
    }
  });

  // Phase 3: dvalues, one row per slot (dense) or per distinct slot read (sparse_grad), in row
  // order: entry_order lists the entries by their row, each row's in increasing entry order, so
  // each task finds its first entry by bisection, sums every row of its range in that fixed order
  // and writes it once (streamed: rows no entry adds to are zeros).
  const int64_t num_entries = num_rows * k;
  const int64_t* entry_row = p.sparse_grad ? p.value_rows : indices;
  const int64_t* entry_order = p.entry_order;
  const int64_t num_out_rows = p.sparse_grad ? p.num_value_rows : num_slots;
  auto row_at = [&](int64_t position) { return entry_row[entry_order[position]]; };
  const bool stream = stream_stores_enabled();
  at::parallel_for(0, num_out_rows, 256, [&](int64_t begin, int64_t end) {
    int64_t position = 0;
    for (int64_t count = num_entries; count > 0;) {  // the first position of a row >= begin
      const int64_t half = count / 2;
      if (row_at(position + half) < begin) {
        position += half + 1;
        count -= half + 1;
      } else {
        count = half;
      }
    }
    std::vector<acc_t> dout_buffer(dim_v), dvalue_acc(dim_v);
    for (int64_t out_row = begin; out_row < end; ++out_row) {
      std::fill(dvalue_acc.begin(), dvalue_acc.end(), acc_t(0));
      for (; position < num_entries && row_at(position) == out_row; ++position) {
        const int64_t entry = entry_order[position];
        if (position + kGatherAhead < num_entries) {
          prefetch_row(dout + dout_offset(entry_order[position + kGatherAhead] / k), dim_v);
        }
        const acc_t* grad_out = load_row(dout + dout_offset(entry / k), dim_v, dout_buffer.data());
        const acc_t w = weights[entry];
#pragma omp simd
        for (int64_t i = 0; i < dim_v; ++i) {
          dvalue_acc[i] += w * grad_out[i];
        }
      }
      if (stream) {
        stream_row(dvalues + out_row * dim_v, dvalue_acc.data(), dim_v);
      } else {
        store_row(dvalues + out_row * dim_v, dvalue_acc.data(), dim_v);
      }
    }
    stream_fence();
  });
}

}  // namespace

L2M_CPU_LAUNCHER(product_key_fwd, ProductKeyFwdParams, product_key_fwd_impl)
L2M_CPU_LAUNCHER(product_key_bwd, ProductKeyBwdParams, product_key_bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
