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
// the thread count. Still in registers, the scores are compared with each query's current bar
// (the k_sub-th best kept); only the ones that pass are pushed into the query's buffer of 2 k_sub
// entries, which a selection cuts back to the k_sub best whenever it fills (amortised O(1) per
// push). The two sorted halves are then combined: candidates (i, j) in order, pruned as soon as
// s1_i + s2_j (both halves descending, so the sum is monotone) falls below the current k-th best;
// then softmax, lse and the weighted sum of the k value rows (an embedding bag), per head or
// summed over heads in acc.
//
// Selection order: descending score; ties by the smaller sub-key (halves) or slot (candidates);
// NaN ranks above everything (torch.sort), NaNs among themselves by index. Each half sees its
// sub-keys in increasing order, so a later one loses every tie with a kept one: the register
// filter "not (score <= bar)" (NaN passes, ties do not) and the selection rely on that.
// Candidates arrive in no slot order, so their selection compares (score, slot) in full.
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

// Queries per forward work unit: their half of q (kUnitRows x Dh) stays in L1/L2 while each
// sub-key panel is reused by all of them.
constexpr int64_t kUnitRows = 32;

// ---- selection order ----

// NaN ranks above everything (torch.sort, descending); otherwise the larger score.
template <typename acc_t>
inline bool ranks_above(acc_t a, acc_t b) {
  return std::isnan(a) ? !std::isnan(b) : (!std::isnan(b) && a > b);
}
// What the register filter compares with: a kept NaN ranks like +inf there (only NaN passes).
template <typename acc_t>
inline acc_t filter_rank(acc_t score) {
  return std::isnan(score) ? std::numeric_limits<acc_t>::infinity() : score;
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

// The k_sub best (score, sub-key) pairs of one half for each query row of a unit. Each row sees
// its sub-keys in increasing order, so a later one loses every tie with a kept one: once a
// selection has kept k, thresholds[row] = filter rank of the k-th, and only scores that pass
// "not (score <= threshold)" (NaN included) are pushed. Before that it is NaN: everything passes.
template <typename acc_t>
struct HalfLists {
  int64_t k = 0;
  int64_t capacity = 0;          // buffer entries per row, > k
  Ranked<acc_t>* entries = nullptr;  // (rows, capacity)
  int64_t* counts = nullptr;     // (rows,)
  acc_t* thresholds = nullptr;   // (rows,)

  // Padding rows get +inf: only NaN scores pass their filter, and those are never offered.
  void reset(int64_t rows, int64_t padded_rows) {
    std::fill(counts, counts + padded_rows, int64_t(0));
    std::fill(thresholds, thresholds + rows, std::numeric_limits<acc_t>::quiet_NaN());
    std::fill(thresholds + rows, thresholds + padded_rows,
              std::numeric_limits<acc_t>::infinity());
  }

  acc_t* select_buffer = nullptr;  // (capacity,) scratch for the selection

  void offer(int64_t row, acc_t score, int64_t id) {
    Ranked<acc_t>* row_entries = entries + row * capacity;
    int64_t& count = counts[row];
    row_entries[count++] = {score, id};
    if (count == capacity) {
      thresholds[row] = compact(row_entries, count);
    }
  }

  // Keeps the k best of a full buffer, still in increasing id order; returns the new threshold.
  // Without NaN, the pushes arrive in id order, so the k-th largest score value (a plain float
  // selection) decides: keep every larger score and, of the scores equal to it, the first ones.
  acc_t compact(Ranked<acc_t>* row_entries, int64_t& count) {
    bool has_nan = false;
    for (int64_t i = 0; i < count; ++i) {
      select_buffer[i] = row_entries[i].score;
      has_nan |= std::isnan(row_entries[i].score);
    }
    if (has_nan) {  // rare (NaN rows): the full order, then back to id order
      keep_best(row_entries, count, k);
      const acc_t kth = row_entries[k - 1].score;
      std::sort(row_entries, row_entries + count,
                [](const Ranked<acc_t>& a, const Ranked<acc_t>& b) { return a.id < b.id; });
      return filter_rank(kth);
    }
    std::nth_element(select_buffer, select_buffer + (k - 1), select_buffer + count,
                     std::greater<acc_t>());
    const acc_t kth = select_buffer[k - 1];
    int64_t equal_quota = k;
    for (int64_t i = 0; i < count; ++i) {
      equal_quota -= row_entries[i].score > kth ? 1 : 0;
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      const acc_t score = row_entries[i].score;
      if (score > kth || (score == kth && equal_quota-- > 0)) {
        row_entries[kept++] = row_entries[i];
      }
    }
    count = kept;
    return kth;
  }

  // The row's k best, sorted in the output order.
  const Ranked<acc_t>* finish(int64_t row) {
    Ranked<acc_t>* row_entries = entries + row * capacity;
    sort_best(row_entries, counts[row], k);
    return row_entries;
  }
};

// Scores of kRowsHere query rows against one panel of kPanel sub-keys, then the filter and the
// offers.
//   q_rows: row r's half-query at q_rows + r * q_stride, Dh values (acc, unscaled)
//   panel:  (Dh, kPanel) acc; lane i is sub-key first_sub + i, lanes >= live_lanes are padding
//   rows >= live_rows are padding: scored, never offered
template <typename acc_t, int kRowsHere>
inline void score_panel(const acc_t* q_rows, int64_t q_stride, int64_t dim_h, const acc_t* panel,
                        acc_t scale, HalfLists<acc_t>& lists, int64_t first_row,
                        int64_t live_rows, int64_t first_sub, int live_lanes) {
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
  uint32_t passed[kRowsHere][kVecs];
  uint32_t any_passed = 0;
#pragma GCC unroll 16
  for (int r = 0; r < kRowsHere; ++r) {
    const vec threshold = L::broadcast(lists.thresholds[first_row + r]);
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = L::mul(acc[r][v], scale_vec);
      passed[r][v] = L::passes(acc[r][v], threshold);
      any_passed |= passed[r][v];
    }
  }
  if (__builtin_expect(any_passed == 0, 1)) {
    return;
  }
  alignas(64) acc_t scores[kRowsHere][kPanel];
  for (int r = 0; r < kRowsHere; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      L::store(&scores[r][v * L::kWidth], acc[r][v]);
    }
  }
  // Sub-keys in increasing order per query; the offer re-checks against the current k-th best.
  for (int r = 0; r < kRowsHere; ++r) {
    if (first_row + r >= live_rows) {
      break;
    }
    for (int v = 0; v < kVecs; ++v) {
      uint32_t bits = passed[r][v];
      while (bits) {
        const int lane = v * L::kWidth + __builtin_ctz(bits);
        bits &= bits - 1;
        if (lane < live_lanes) {
          lists.offer(first_row + r, scores[r][lane], first_sub + lane);
        }
      }
    }
  }
}

// The k best of the k_sub x k_sub candidates half1[a] + half2[b] (slot id1 * n_sub + id2),
// sorted in the output order into `buffer` (capacity > k entries). Both halves are sorted
// descending; when every half score is finite, the sum is non-increasing along a and along b
// (rounding is monotone), so once a selection has set the bar (the k-th best kept), a row stops at
// the first sum below it, and the walk stops at the first row whose best sum is below it. Sums
// equal to the bar are still pushed: the smaller slot wins those.
template <typename acc_t>
void combine_halves(const Ranked<acc_t>* half1, const Ranked<acc_t>* half2, int64_t k_sub,
                    int64_t num_sub, int64_t k, Ranked<acc_t>* buffer, int64_t capacity) {
  const bool all_finite = std::isfinite(half1[0].score) &&
                          std::isfinite(half1[k_sub - 1].score) &&
                          std::isfinite(half2[0].score) && std::isfinite(half2[k_sub - 1].score);
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
  std::vector<Ranked<acc_t>> half_entries[2];
  std::vector<int64_t> half_counts[2];
  std::vector<acc_t> half_thresholds[2];
  std::vector<acc_t> select_buffers[2];
  HalfLists<acc_t> lists[2];
  std::vector<Ranked<acc_t>> candidates;  // (candidate capacity,)
  std::vector<int64_t> slots;             // (k,)
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

      for (int half = 0; half < 2; ++half) {
        HalfLists<acc_t>& lists = scratch.lists[half];
        lists.reset(rows, padded_rows);
        const acc_t* half_packed = packed + (h * 2 + half) * num_panels * dim_h * kPanel;
        const acc_t* q_half = q_block + half * dim_h;
        for (int64_t panel = 0; panel < num_panels; ++panel) {
          const acc_t* panel_data = half_packed + panel * dim_h * kPanel;
          const int64_t first_sub = panel * kPanel;
          const int live_lanes = static_cast<int>(std::min<int64_t>(kPanel, num_sub - first_sub));
          for (int64_t r = 0; r < padded_rows; r += kRows) {
            score_panel<acc_t, kRows>(q_half + r * dim_k, dim_k, dim_h, panel_data, scale, lists,
                                      r, rows, first_sub, live_lanes);
          }
        }
      }

      Ranked<acc_t>* candidates = scratch.candidates.data();
      int64_t* slots = scratch.slots.data();
      acc_t* scores = scratch.scores.data();
      for (int64_t r = 0; r < rows; ++r) {
        combine_halves(scratch.lists[0].finish(r), scratch.lists[1].finish(r), k_sub, num_sub, k,
                       candidates, static_cast<int64_t>(scratch.candidates.size()));
        for (int64_t j = 0; j < k; ++j) {
          scores[j] = candidates[j].score;
          slots[j] = candidates[j].id;
        }
        const int64_t row = first_row + r;
        std::memcpy(p.indices + row * k, slots, k * sizeof(int64_t));
        acc_t* row_weights = weights + row * k;
        softmax_lse(scores, k, row_weights, lse + row);

        // Embedding bag: this head's read, in acc.
        acc_t* out_acc = scratch.out_acc.data();
        std::fill(out_acc, out_acc + dim_v, acc_t(0));
        prefetch_row(values + slots[0] * dim_v, dim_v);
        for (int64_t j = 0; j < k; ++j) {
          if (j + 1 < k) {
            prefetch_row(values + slots[j + 1] * dim_v, dim_v);  // random rows: hide the miss
          }
          const acc_t weight = row_weights[j];
          const acc_t* value = load_row(values + slots[j] * dim_v, dim_v, scratch.value_row.data());
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
    // Selection buffers: four times the kept count, so a selection (O(capacity)) runs at most once
    // per 3 k pushes: fewer selections save more than the bar, rising later, costs in pushes.
    const int64_t half_capacity = 4 * k_sub;
    for (int half = 0; half < 2; ++half) {
      scratch.half_entries[half].resize(padded_capacity * half_capacity);
      scratch.half_counts[half].resize(padded_capacity);
      scratch.half_thresholds[half].resize(padded_capacity);
      HalfLists<acc_t>& lists = scratch.lists[half];
      lists.k = k_sub;
      lists.capacity = half_capacity;
      lists.entries = scratch.half_entries[half].data();
      lists.counts = scratch.half_counts[half].data();
      lists.thresholds = scratch.half_thresholds[half].data();
      scratch.select_buffers[half].resize(half_capacity);
      lists.select_buffer = scratch.select_buffers[half].data();
    }
    scratch.candidates.resize(2 * k);
    scratch.slots.resize(k);
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
        if (j + 1 < k) {
          prefetch_row(values + row_indices[j + 1] * dim_v, dim_v);
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

  // Phase 3: dvalues, one row per slot (dense) or per distinct slot read (sparse_grad): every row
  // is written, zeros where no entry adds to it; each row sums its entries in increasing entry
  // order.
  const int64_t num_entries = num_rows * k;
  const int64_t* entry_row = p.sparse_grad ? p.value_rows : indices;
  const int64_t num_out_rows = p.sparse_grad ? p.num_value_rows : num_slots;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // Storage is the acc type: one task per row range zeroes it, then walks every entry in order
    // and adds those that land in its range, straight into dvalues (no sort needed).
    at::parallel_for(0, num_out_rows, 4096, [&](int64_t begin, int64_t end) {
      std::fill_n(dvalues + begin * dim_v, (end - begin) * dim_v, scalar_t(0));
      std::vector<acc_t> dout_buffer(dim_v);
      for (int64_t entry = 0; entry < num_entries; ++entry) {
        const int64_t out_row = entry_row[entry];
        if (out_row < begin || out_row >= end) {
          continue;
        }
        const acc_t* grad_out = load_row(dout + dout_offset(entry / k), dim_v, dout_buffer.data());
        const acc_t w = weights[entry];
        acc_t* dst = dvalues + out_row * dim_v;
#pragma omp simd
        for (int64_t i = 0; i < dim_v; ++i) {
          dst[i] += w * grad_out[i];
        }
      }
    });
  } else {
    // Half types: sum in acc. The entries grouped by row (counting sort, in entry order), then
    // one task per row range.
    std::vector<int64_t> row_begin(num_out_rows + 1, 0);
    for (int64_t entry = 0; entry < num_entries; ++entry) {
      ++row_begin[entry_row[entry] + 1];
    }
    std::partial_sum(row_begin.begin(), row_begin.end(), row_begin.begin());
    std::vector<int64_t> row_entries(num_entries);
    {
      std::vector<int64_t> fill(row_begin.begin(), row_begin.end() - 1);
      for (int64_t entry = 0; entry < num_entries; ++entry) {
        row_entries[fill[entry_row[entry]]++] = entry;
      }
    }
    const int64_t rows_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim_v, 1));
    at::parallel_for(0, num_out_rows, rows_per_task, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dout_buffer(dim_v), dvalue_acc(dim_v);
      for (int64_t out_row = begin; out_row < end; ++out_row) {
        scalar_t* dst = dvalues + out_row * dim_v;
        if (row_begin[out_row] == row_begin[out_row + 1]) {
          std::fill_n(dst, dim_v, scalar_t(0));  // +0.0, any dtype
          continue;
        }
        std::fill(dvalue_acc.begin(), dvalue_acc.end(), acc_t(0));
        for (int64_t e = row_begin[out_row]; e < row_begin[out_row + 1]; ++e) {
          const int64_t entry = row_entries[e];
          const acc_t* grad_out =
              load_row(dout + dout_offset(entry / k), dim_v, dout_buffer.data());
          const acc_t w = weights[entry];
#pragma omp simd
          for (int64_t i = 0; i < dim_v; ++i) {
            dvalue_acc[i] += w * grad_out[i];
          }
        }
        store_row(dst, dvalue_acc.data(), dim_v);
      }
    });
  }
}

}  // namespace

L2M_CPU_LAUNCHER(product_key_fwd, ProductKeyFwdParams, product_key_fwd_impl)
L2M_CPU_LAUNCHER(product_key_bwd, ProductKeyBwdParams, product_key_bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
