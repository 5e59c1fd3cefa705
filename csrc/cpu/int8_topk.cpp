// CPU kernel of the exact top-k read over int8 keys (interface: memory_store.h, int8_topk_fwd).
//
// Exact score. The score of slot n for query row r is the float64 dot product of q[r] (float32)
// and key[n] (int8) with a fixed association: kLanes partial sums (d = l, l + kLanes, ... into
// part[l]), then added in lane order, as store_read.cpp does. Every product is exact in float64,
// so a score is a pure function of the query and the key, whatever the tiling or thread count.
//
// Bound. Each query row is quantised to int8 with one scale: a = max_d |q[d]| / 127 (float32),
// q8[d] = round(q[d] / a) in [-127, 127]. With t = sum_d q8[d] * key[d] (an exact integer) and
// e_d = q[d] - a * q8[d], the real dot product is a * t + sum_d e_d * key[d]. A row is filtered
// only when every |e_d| is checked (exactly, in float64) to be at most (1/2 + 2^-16) a; then, with
// key_abs[n] = sum_d |key[d]| and kb[n] = ceil((1/2 + 2^-14) key_abs[n]),
//   a * (t - kb[n]) <= score(n) <= a * (t + kb[n]),
// the extra 3 * 2^-16 * a * key_abs covering the float64 rounding of the score (at most
// dim * 2^-53 * 128 * a * key_abs, far below it for the dimensions filtered).
//
// Filter. Each row keeps its k best (exact score, slot) pairs in a sorted list and sees its slots
// in increasing order, so a later slot loses every tie. Once the list is full with k-th best exact
// score S, slot n cannot enter if a * (t + kb[n]) <= S, that is if t + kb[n] <= m for an integer
// m with a * m <= S (threshold_units: floor(S / a) less a margin for the division's rounding,
// clamped). So the filter is one integer comparison per (row, slot), "t + kb[n] > m" passes, and
// a passing slot is rescored exactly and offered to the list, which may raise m. Warm start: on
// the first slots (the first 1 / kWarmShare, in ceil(k / kWarmTop) parts), the integer pre-pass
// takes per row the kWarmTop largest lower bounds t - kb of each part; their minimum L over the
// parts is the lower bound of at least k distinct slots, so a slot with t + kb < L scores less
// than k others and can never enter: m starts at L - 1 instead of "everything passes", which
// spares most of the insertions of a cold list (about k ln(N / k)). A zero row (a = 0) scores 0
// everywhere: m is "skip all" once its list is full, and it has no warm start. A row with a NaN
// scores NaN everywhere (its top-k is the first k slots); a row with an infinity, or one that
// fails the check (e.g. a subnormal scale), is scored exactly slot by slot.
//
// Refinement (q_refine set). The ranked score is s, the float64 dot product of q_refine[r] and
// the float32 key refine_keys[n] with the same association (a product of two floats is exact in
// float64 too); the int8 keys only filter. The caller guarantees |s - q[r] . key[n]| <= slack[r],
// so a * (t - kb[n]) - slack <= s <= a * (t + kb[n]) + slack, and:
//  - m is an integer with a * m <= S - slack (threshold_units of S - slack: the float64
//    difference rounds within 2^-25 units, inside its margin);
//  - the warm start's floor is L - 1 - w with an integer w >= 2 slack / a (slack_shift_units: the
//    ceiling of the float64 quotient enlarged by 2^-40): a slot with t + kb < L - w scores at most
//    a * (t + kb) + slack < a * L - slack, less than each of k slots;
//  - a passing slot gets its exact int8 score s8 (its int8 key row is still in cache): when the
//    list is full and s8 + B <= S, B = slack (1 + 2^-40) + 2^-28 sum_d |q[d]| (refine_reach: the
//    terms past the slack cover the rounding of s8 and of the sum), it cannot enter. The others
//    wait in a short queue; a flush repeats that check against the lists as they are then,
//    prefetches the float rows of the remaining slots together (they are scattered), scores them
//    and offers them in the queue's order, which keeps each row's slots in increasing order.
// A row whose q_refine has a NaN scores NaN everywhere; one with an infinity in q_refine, a slack
// that is not finite or negative, a zero int8 row (a = 0) with a positive slack, or a row the int8
// filter does not serve is scored exactly (against the float keys) slot by slot. Without
// refinement the slack is 0 and every step is the one above.
//
// Layout. Work units are (memory head, block of up to kUnitRows query rows), over
// at::parallel_for. A unit walks the slots in key tiles that stay in L2; against each tile, a
// register-blocked micro-kernel computes kRows keys x (kVecs vectors of query rows) values
// t + kb[n] and compares them, in registers, with each row's m. The rare passing lanes of a call
// leave the registers as one batch: their exact scores are computed together (independent dot
// products), then offered in slot order. The result is the brute-force ranking, independent of
// the tiling and the thread count.
//  - AVX-512 VNNI (the AVX-512 variant, on a CPU that has VNNI, dim <= 16384): the unit's
//    queries are packed as bytes u8 = q8 + 128 in (dim / 4, rows, 4) order, so one 64-byte load
//    holds 16 rows x 4 dims; a key row's 4 bytes are broadcast and vpdpbusd accumulates
//    sum u8 * key in int32 (wrapping; the final value fits). The accumulators start at
//    kb[n] - 128 * key_sum[n] (at -kb[n] - 128 * key_sum[n] in the warm start), which removes
//    the +128 offset: the result is t + kb[n] (t - kb[n]) exactly. When dim is not a multiple of
//    4 the tile is copied with zero padding (keys are only guaranteed dim bytes).
//  - Elsewhere (dim <= 1024): the same integers t + kb[n] in float32 FMA (every partial sum is an
//    integer below 2^24 in magnitude, so exact), keys converted to float per tile; no warm start.
//  - Larger dims: every row is scored exactly slot by slot.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "memory_store.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
#define L2M_INT8_TOPK_VNNI 1
#define L2M_INT8_TOPK_VNNI_TARGET __attribute__((target("avx512vnni,avx512bw,avx512f")))
#else
#define L2M_INT8_TOPK_VNNI 0
#endif

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

constexpr int kLanes = 8;  // partial sums of the exact dot product

// Query rows per work unit: the unit's key tiles are reused by this many rows while in L2.
constexpr int64_t kUnitRows = 256;
// Bytes of one key tile (int8 keys for VNNI, float32 for the portable filter): half of a 2 MB L2.
constexpr int64_t kKeyTileBytes = 1024 * 1024;

// Filter limits. |t + kb| <= (127 + 0.51) * 128 * dim stays below the clamp of m (m = +clamp:
// every slot skips, m = -clamp: every slot passes).
constexpr int64_t kVnniMaxDim = 16384;
constexpr int64_t kVnniClamp = int64_t(1) << 28;
constexpr int64_t kFloatMaxDim = 1024;
constexpr int64_t kFloatClamp = int64_t(1) << 24;  // and every integer below it is a float

// Passing lanes of one micro-kernel call, at most (12 keys x 32 lanes or 6 x 64).
constexpr int kMaxBatch = 384;

// Refinement: passing slots queued before their float key rows are read, and the bytes of a
// float row prefetched.
constexpr int kPending = 32;
constexpr int64_t kPrefetchBytes = 1024;

// Warm start: the first num_slots / kWarmShare slots (within the first tile), in ceil(k / kWarmTop)
// parts of at least kWarmMinPart slots, else none.
constexpr int64_t kWarmShare = 8;
constexpr int kWarmTop = 4;
constexpr int64_t kWarmMinPart = 16;

// Row kinds.
enum : uint8_t { kFiltered = 0, kExact = 1, kNaNRow = 2 };

// The partial sums of q . key from element d on (the scalar loop of exact_score, and the tail of
// its SIMD loops), then summed in lane order.
template <typename key_t>
inline double lanes_sum(double* part, const float* q, const key_t* key, int64_t d, int64_t dim) {
  for (; d + kLanes <= dim; d += kLanes) {
#pragma GCC unroll 8
    for (int l = 0; l < kLanes; ++l) {
      part[l] += static_cast<double>(q[d + l]) * static_cast<double>(key[d + l]);
    }
  }
  for (int l = 0; d < dim; ++d, ++l) {
    part[l] += static_cast<double>(q[d]) * static_cast<double>(key[d]);
  }
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) {
    sum += part[l];
  }
  return sum;
}

// The exact score. The SIMD loops compute the same partial sums as the scalar one (a product is
// exact, so a fused multiply-add rounds once, like the add). AVX-512 conversions, min and max are
// written in their zero-masking forms with a full mask throughout this file: the plain forms trip
// GCC 12's -Wmaybe-uninitialized on their undefined merge source.
inline double exact_score(const float* q, const int8_t* key, int64_t dim) {
  alignas(64) double part[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
#if defined(__AVX512F__)
  __m512d acc = _mm512_setzero_pd();
  for (; d + kLanes <= dim; d += kLanes) {
    const __m512d q_vec = _mm512_maskz_cvtps_pd(0xff, _mm256_loadu_ps(q + d));
    const __m128i key_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(key + d));
    const __m512d key_vec = _mm512_maskz_cvtepi32_pd(0xff, _mm256_cvtepi8_epi32(key_bytes));
    acc = _mm512_fmadd_pd(q_vec, key_vec, acc);
  }
  _mm512_store_pd(part, acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
  for (; d + kLanes <= dim; d += kLanes) {
    const __m128i key_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(key + d));
    const __m256i key_words = _mm256_cvtepi8_epi32(key_bytes);
    acc_lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + d)),
                             _mm256_cvtepi32_pd(_mm256_castsi256_si128(key_words)), acc_lo);
    acc_hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + d + 4)),
                             _mm256_cvtepi32_pd(_mm256_extracti128_si256(key_words, 1)), acc_hi);
  }
  _mm256_store_pd(part, acc_lo);
  _mm256_store_pd(part + 4, acc_hi);
#endif
  return lanes_sum(part, q, key, d, dim);
}

// The exact score against a float32 key (refinement): the same association as exact_score, every
// product of two floats being exact in float64 too.
inline double exact_score(const float* q, const float* key, int64_t dim) {
  alignas(64) double part[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
#if defined(__AVX512F__)
  __m512d acc = _mm512_setzero_pd();
  for (; d + kLanes <= dim; d += kLanes) {
    const __m512d q_vec = _mm512_maskz_cvtps_pd(0xff, _mm256_loadu_ps(q + d));
    const __m512d key_vec = _mm512_maskz_cvtps_pd(0xff, _mm256_loadu_ps(key + d));
    acc = _mm512_fmadd_pd(q_vec, key_vec, acc);
  }
  _mm512_store_pd(part, acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
  for (; d + kLanes <= dim; d += kLanes) {
    acc_lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + d)),
                             _mm256_cvtps_pd(_mm_loadu_ps(key + d)), acc_lo);
    acc_hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + d + 4)),
                             _mm256_cvtps_pd(_mm_loadu_ps(key + d + 4)), acc_hi);
  }
  _mm256_store_pd(part, acc_lo);
  _mm256_store_pd(part + 4, acc_hi);
#endif
  return lanes_sum(part, q, key, d, dim);
}

// Rank of a score in the selection order: NaN ranks like +inf.
inline double rank_of(double score) {
  return std::isnan(score) ? std::numeric_limits<double>::infinity() : score;
}

// kb = ceil((1/2 + 2^-14) * key_abs), the per-slot part of the bound, in units of a.
inline int64_t bound_units(int32_t key_abs) {
  return (static_cast<int64_t>(key_abs) * ((1 << 13) + 1) + (1 << 14) - 1) >> 14;
}

// An integer m with a * m <= kth - slack (a > 0), clamped to [-clamp, clamp]: floor((kth - slack)
// / a) but for the rare quotient within 2^-20 above an integer; clamp when a = 0 (a zero row,
// whose scores are all 0 = kth; never with a slack). While |(kth - slack) / a| < 2^28, the
// rounding of the difference and of the quotient in float64 stay within 2^-25 + 2^-24 of it, so
// the margin keeps m <= (kth - slack) / a. Without refinement the slack is 0 and kth - 0 = kth.
inline int64_t threshold_units(double kth, double slack, float scale, int64_t clamp) {
  if (scale == 0.0f) {
    return clamp;
  }
  const double x = (kth - slack) / static_cast<double>(scale) - 0x1p-20;
  if (!(x < static_cast<double>(clamp))) {
    return clamp;
  }
  if (!(x > -static_cast<double>(clamp))) {
    return -clamp;
  }
  return static_cast<int64_t>(std::floor(x));
}

// An integer w >= 2 * slack / a (a > 0, slack finite >= 0): the warm start's shift. The float64
// quotient and the product are each within a relative 2^-53, far inside the 2^-40 added before the
// ceiling; beyond 2^40 (the filter is then useless anyway) w saturates, which disables the warm
// start of the row.
inline int64_t slack_shift_units(double slack, float scale) {
  if (slack == 0.0) {
    return 0;
  }
  const double x = (2.0 * slack / static_cast<double>(scale)) * (1.0 + 0x1p-40);
  if (!(x < 0x1p40)) {
    return int64_t(1) << 40;
  }
  return static_cast<int64_t>(std::ceil(x));
}

// Quantises one query row into q8 (dim values; zeros unless filtered) and its scale; returns
// the row's kind.
inline uint8_t quantize_row(const float* q, int64_t dim, int8_t* q8, float* scale) {
  float max_abs = 0.0f;
  bool has_nan = false, finite = true;
  for (int64_t d = 0; d < dim; ++d) {
    has_nan |= std::isnan(q[d]);
    finite &= std::isfinite(q[d]);
    max_abs = std::max(max_abs, std::fabs(q[d]));
    q8[d] = 0;
  }
  *scale = 0.0f;
  if (has_nan) {
    return kNaNRow;
  }
  const float a = max_abs / 127.0f;
  if (!finite || (max_abs != 0.0f && !(a > 0.0f))) {
    return kExact;
  }
  if (max_abs == 0.0f) {
    return kFiltered;  // a zero row: scale 0
  }
  const double limit = (0.5 + 1.0 / 65536.0) * static_cast<double>(a);
  bool bounded = true;
  for (int64_t d = 0; d < dim; ++d) {
    const float v = std::min(std::max(std::nearbyint(q[d] / a), -127.0f), 127.0f);
    // Exact in float64: a * v has at most 31 significant bits, and the difference is below a.
    const double e = static_cast<double>(q[d]) - static_cast<double>(a) * static_cast<double>(v);
    bounded &= std::fabs(e) <= limit;
    q8[d] = static_cast<int8_t>(v);
  }
  if (!bounded) {
    for (int64_t d = 0; d < dim; ++d) {
      q8[d] = 0;
    }
    return kExact;
  }
  *scale = a;
  return kFiltered;
}

// Refinement's second filter, B = slack (1 + 2^-40) + 2^-28 sum_d |q[d]| for a finite row q:
// a slot whose computed int8 score s8 has s8 + B <= the list's k-th score S (both in float64)
// scores at most S. The computed s8 is within dim 2^-53 127 sum |q| < 2^-31 sum |q| of the
// exact dot product (dim <= 16384), the float64 sum s8 + B within 2^-53 (127 sum |q| + B) of its
// exact value, and B's own rounding within 2^-51 B: the terms past the slack cover all three.
inline double refine_reach(const float* q, int64_t dim, float slack) {
  double sum = 0;
  for (int64_t d = 0; d < dim; ++d) {
    sum += std::fabs(static_cast<double>(q[d]));
  }
  return static_cast<double>(slack) * (1.0 + 0x1p-40) + 0x1p-28 * sum;
}

// The kind of a row with refinement, given its kind from quantize_row: NaN in the rescoring
// query makes every score NaN; an infinity in it, a row the filter does not serve, a slack that
// is not a finite value >= 0, or a zero row (scale 0) with a positive slack are scored exactly.
// Sets the row's slack, B and warm-start shift (0 unless filtered); q8 and scale as quantize_row's
// (zeros unless filtered).
inline uint8_t refine_row(uint8_t kind, const float* q, const float* q_refine, int64_t dim,
                          float slack, int8_t* q8, float* scale, double* row_slack,
                          double* reach, int64_t* shift) {
  bool has_nan = false, finite = true;
  for (int64_t d = 0; d < dim; ++d) {
    has_nan |= std::isnan(q_refine[d]);
    finite &= std::isfinite(q_refine[d]);
  }
  *row_slack = 0.0;
  *reach = 0.0;
  *shift = 0;
  if (has_nan) {
    kind = kNaNRow;
  } else if (!finite || kind != kFiltered || !(slack >= 0.0f && std::isfinite(slack)) ||
             (*scale == 0.0f && slack != 0.0f)) {
    kind = kExact;
  }
  if (kind != kFiltered) {
    std::fill(q8, q8 + dim, int8_t(0));
    *scale = 0.0f;
    return kind;
  }
  *row_slack = slack;
  *reach = refine_reach(q, dim, slack);
  *shift = *scale == 0.0f ? 0 : slack_shift_units(slack, *scale);
  return kind;
}

// The k best (score, slot) pairs seen so far for each row of a unit, as arrays sorted in the
// output order (rank descending, then slot ascending), and each filtered row's threshold m (in
// the filter's value type: int32 or float). Insertion relies on each row seeing its slots in
// increasing order: a candidate loses every tie, so its place is the number of kept pairs
// ranking at or above it (one vectorised count), and the pairs after it move one step.
template <typename value_t>
struct UnitLists {
  int64_t cap = 0;  // min(k, slots)
  double* scores = nullptr;      // (rows, cap), raw scores (NaN kept, ranked like +inf)
  int64_t* slots = nullptr;      // (rows, cap)
  int64_t* counts = nullptr;     // (rows,)
  value_t* thresholds = nullptr;  // (padded rows,): m, +clamp for rows and lanes never filtered
  value_t* floors = nullptr;      // (rows,): the least threshold (warm start), else -clamp
  const float* scales = nullptr;  // (rows,)
  const double* slacks = nullptr;  // (rows,): a filtered row's slack, 0 without refinement
  const double* reaches = nullptr;  // (rows,): refinement, a filtered row's B (refine_reach)
  int64_t clamp = 0;
  // Where rescoring reads: unit row 0's query, the head's keys; with refinement (refine_keys set)
  // unit row 0's rescoring query and the head's float keys instead.
  const float* q = nullptr;
  int64_t dim = 0;
  const int8_t* keys = nullptr;
  int64_t key_stride = 0;
  const float* refine_q = nullptr;
  const float* refine_keys = nullptr;
  int64_t refine_stride = 0;
  // Refinement: slots waiting for their float rescoring (queue, flush).
  int pending = 0;
  int64_t pending_rows[kPending];
  int64_t pending_slots[kPending];
  double pending_bounds[kPending];

  // The exact score of (row, slot).
  double score_of(int64_t row, int64_t slot) const {
    if (refine_keys != nullptr) {
      return exact_score(refine_q + row * dim, refine_keys + slot * refine_stride, dim);
    }
    return exact_score(q + row * dim, keys + slot * key_stride, dim);
  }

  // Inserts (score, slot) if it ranks among the row's cap best; true when it was inserted.
  bool offer(int64_t row, double score, int64_t slot) {
    double* kept_scores = scores + row * cap;
    int64_t* kept_slots = slots + row * cap;
    const int64_t count = counts[row];
    const double rank = rank_of(score);
    using L = Lanes<double>;
    const typename L::vec rank_vec = L::broadcast(rank);
    int64_t place = 0, j = 0;
    for (; j + L::kWidth <= count; j += L::kWidth) {
      place += __builtin_popcount(L::at_or_above(L::load(kept_scores + j), rank_vec));
    }
    for (; j < count; ++j) {
      place += !(kept_scores[j] < rank) ? 1 : 0;
    }
    if (place >= cap) {
      return false;
    }
    const int64_t moved = (count < cap ? count : cap - 1) - place;
    std::memmove(kept_scores + place + 1, kept_scores + place, moved * sizeof(double));
    std::memmove(kept_slots + place + 1, kept_slots + place, moved * sizeof(int64_t));
    kept_scores[place] = score;
    kept_slots[place] = slot;
    if (count < cap) {
      counts[row] = count + 1;
    }
    return true;
  }

  // The passing lanes of one micro-kernel call: masks (rows, vecs) of `width` lanes each, for
  // the keys first_slot + 0 .. rows - 1. They are rescored first, all together (independent dot
  // products that overlap), then offered in slot order (an offer after its row's threshold rose
  // within the batch is simply turned down by the list).
  __attribute__((noinline)) void take(const uint32_t* masks, int rows, int vecs, int width,
                                      int64_t lane_base, int64_t first_slot) {
    int32_t batch_rows[kMaxBatch];
    int32_t batch_keys[kMaxBatch];
    double batch_scores[kMaxBatch];
    int count = 0;
    for (int r = 0; r < rows; ++r) {
      uint64_t bits = 0;  // the key's lanes, block <= 64
      for (int v = 0; v < vecs; ++v) {
        bits |= static_cast<uint64_t>(masks[r * vecs + v]) << (v * width);
      }
      while (bits) {
        batch_rows[count] = __builtin_ctzll(bits);
        batch_keys[count] = r;
        bits &= bits - 1;
        ++count;
      }
    }
    if (refine_keys != nullptr) {
      for (int i = 0; i < count; ++i) {
        queue(lane_base + batch_rows[i], first_slot + batch_keys[i]);
      }
      return;
    }
    for (int i = 0; i < count; ++i) {
      batch_scores[i] = exact_score(q + (lane_base + batch_rows[i]) * dim,
                                    keys + (first_slot + batch_keys[i]) * key_stride, dim);
    }
    for (int i = 0; i < count; ++i) {
      accept(lane_base + batch_rows[i], batch_scores[i], first_slot + batch_keys[i]);
    }
  }

  // Offers (score, slot) and, when the row's list is full after an insertion, raises m.
  void accept(int64_t row, double score, int64_t slot) {
    if (offer(row, score, slot) && counts[row] == cap) {
      const auto m = static_cast<value_t>(
          threshold_units(scores[row * cap + cap - 1], slacks[row], scales[row], clamp));
      thresholds[row] = std::max(m, floors[row]);
    }
  }

  // Refinement: a passing (row, slot) gets its exact int8 score s8; unless its list is full and
  // s8 + B <= the k-th rank (refine_reach: it cannot enter), it waits in the pending queue with
  // its bound s8 + B. The queue keeps the order of arrival, so each row's slots stay in
  // increasing order.
  void queue(int64_t row, int64_t slot) {
    const double bound = exact_score(q + row * dim, keys + slot * key_stride, dim) + reaches[row];
    if (counts[row] == cap && !(bound > rank_of(scores[row * cap + cap - 1]))) {
      return;
    }
    pending_rows[pending] = row;
    pending_slots[pending] = slot;
    pending_bounds[pending] = bound;
    if (++pending == kPending) {
      flush();
    }
  }

  // Rescoring of the pending slots against the float keys: the bounds are checked again against
  // the lists as they are now, the float rows of the remaining slots are prefetched together (they
  // are scattered), then scored and offered in the queue's order (an offer after its row's
  // threshold rose within the queue is simply turned down by the list).
  void flush() {
    int kept = 0;
    for (int i = 0; i < pending; ++i) {
      const int64_t row = pending_rows[i];
      if (counts[row] == cap && !(pending_bounds[i] > rank_of(scores[row * cap + cap - 1]))) {
        continue;
      }
      const char* key_row =
          reinterpret_cast<const char*>(refine_keys + pending_slots[i] * refine_stride);
      const int64_t bytes = std::min<int64_t>(dim * sizeof(float), kPrefetchBytes);
      for (int64_t b = 0; b < bytes; b += 64) {
        __builtin_prefetch(key_row + b);
      }
      if (bytes > 0) {
        __builtin_prefetch(key_row + bytes - 1);
      }
      pending_rows[kept] = row;
      pending_slots[kept] = pending_slots[i];
      ++kept;
    }
    double pending_scores[kPending];
    for (int i = 0; i < kept; ++i) {
      pending_scores[i] = exact_score(refine_q + pending_rows[i] * dim,
                                      refine_keys + pending_slots[i] * refine_stride, dim);
    }
    for (int i = 0; i < kept; ++i) {
      accept(pending_rows[i], pending_scores[i], pending_slots[i]);
    }
    pending = 0;
  }

  // Exact scoring of every slot, for a row the filter does not serve.
  void scan(int64_t row, int64_t num_slots) {
    for (int64_t slot = 0; slot < num_slots; ++slot) {
      offer(row, score_of(row, slot), slot);
    }
  }
};

// A thread's buffers, sized once for units of up to kUnitRows rows.
template <typename value_t>
struct Scratch {
  std::vector<double> kept_scores;   // (unit rows, cap)
  std::vector<int64_t> kept_slots;   // (unit rows, cap)
  std::vector<int64_t> counts;       // (unit rows,)
  std::vector<value_t> thresholds;   // (padded unit rows,)
  std::vector<value_t> floors;       // (unit rows,)
  std::vector<float> scales;         // (unit rows,)
  std::vector<double> slacks;        // (unit rows,)
  std::vector<double> reaches;       // (unit rows,)
  std::vector<int64_t> shifts;       // (unit rows,): the warm start's shift w, 0 without slack
  std::vector<uint8_t> kinds;        // (unit rows,)
  std::vector<int8_t> q8;            // (unit rows, dim)
  std::vector<value_t> tile_init;    // (tile slots,): accumulator start of each slot
  std::vector<value_t> lower_init;   // (warm-up slots,): the same for t - kb
  std::vector<uint8_t> q_bytes;      // VNNI: (blocks, groups, block, 4) q8 + 128
  std::vector<int8_t> key_bytes;     // VNNI: (tile slots, groups * 4) zero-padded keys
  std::vector<float> q_floats;       // portable: (blocks, dim, block) q8
  std::vector<float> key_floats;     // portable: (tile slots, dim) keys
  UnitLists<value_t> lists;

  void size(int64_t unit_rows, int64_t padded_rows, int64_t cap, int64_t dim,
            int64_t tile_slots) {
    kept_scores.resize(unit_rows * cap);
    kept_slots.resize(unit_rows * cap);
    counts.resize(unit_rows);
    thresholds.resize(padded_rows);
    floors.resize(unit_rows);
    scales.resize(unit_rows);
    slacks.resize(unit_rows);
    reaches.resize(unit_rows);
    shifts.resize(unit_rows);
    kinds.resize(unit_rows);
    q8.resize(unit_rows * dim);
    tile_init.resize(tile_slots);
    lists.cap = cap;
    lists.scores = kept_scores.data();
    lists.slots = kept_slots.data();
    lists.counts = counts.data();
    lists.thresholds = thresholds.data();
    lists.floors = floors.data();
    lists.scales = scales.data();
    lists.slacks = slacks.data();
    lists.reaches = reaches.data();
  }
};

// A filtered row with scale a > 0 whose `parts` distinct keys all have t - kb >= lower: each of
// them scores at least a * lower - slack, so a key with t + kb < lower - w (w >= 2 slack / a)
// scores at most a * (t + kb) + slack < a * lower - slack, less than k others, and is skipped from
// the start (floor and threshold lower - 1 - w). Not for a zero row: its scores all tie.
template <typename value_t>
void set_floor(UnitLists<value_t>& lists, const Scratch<value_t>& scratch, int64_t row,
               int64_t lower) {
  if (scratch.kinds[row] != kFiltered || lists.scales[row] == 0.0f) {
    return;
  }
  const int64_t floor =
      std::min(std::max(lower - 1 - scratch.shifts[row], -lists.clamp), lists.clamp);
  lists.floors[row] = static_cast<value_t>(floor);
  lists.thresholds[row] = std::max(lists.thresholds[row], static_cast<value_t>(floor));
}

// Quantises the unit's rows, sets the lists and the thresholds; NaN rows get their final list.
template <typename value_t>
void begin_unit(const Int8TopkParams& p, int64_t head, int64_t row_begin, int64_t rows,
                int64_t padded_rows, int64_t clamp, Scratch<value_t>& scratch) {
  UnitLists<value_t>& lists = scratch.lists;
  const int64_t dim = p.dim, cap = lists.cap;
  lists.clamp = clamp;
  lists.q = p.q + (head * p.rows + row_begin) * dim;
  lists.dim = dim;
  lists.keys = p.keys + head * p.key_strides[0];
  lists.key_stride = p.key_strides[1];
  const bool refine = p.q_refine != nullptr;
  lists.refine_q = refine ? p.q_refine + (head * p.rows + row_begin) * dim : nullptr;
  lists.refine_keys = refine ? p.refine_keys + head * p.refine_strides[0] : nullptr;
  lists.refine_stride = refine ? p.refine_strides[1] : 0;
  lists.pending = 0;
  for (int64_t row = 0; row < padded_rows; ++row) {
    lists.thresholds[row] = static_cast<value_t>(clamp);  // never passes
  }
  for (int64_t row = 0; row < rows; ++row) {
    int8_t* q8 = scratch.q8.data() + row * dim;
    uint8_t kind = quantize_row(lists.q + row * dim, dim, q8, &scratch.scales[row]);
    scratch.slacks[row] = 0.0;
    scratch.reaches[row] = 0.0;
    scratch.shifts[row] = 0;
    if (refine) {
      kind = refine_row(kind, lists.q + row * dim, lists.refine_q + row * dim, dim,
                        p.slack[head * p.rows + row_begin + row], q8, &scratch.scales[row],
                        &scratch.slacks[row], &scratch.reaches[row], &scratch.shifts[row]);
    }
    scratch.kinds[row] = kind;
    lists.counts[row] = 0;
    lists.floors[row] = static_cast<value_t>(-clamp);
    if (kind == kFiltered) {
      lists.thresholds[row] = static_cast<value_t>(-clamp);  // list not full: everything passes
    } else if (kind == kNaNRow) {
      // NaN times any key is NaN: every score is NaN, the first slots win.
      for (int64_t j = 0; j < cap; ++j) {
        lists.scores[row * cap + j] = std::numeric_limits<double>::quiet_NaN();
        lists.slots[row * cap + j] = j;
      }
      lists.counts[row] = cap;
    }
  }
}

// The pending rescoring, exact scans of the rows the filter does not serve, then the output.
template <typename value_t>
void finish_unit(const Int8TopkParams& p, int64_t head, int64_t row_begin, int64_t rows,
                 Scratch<value_t>& scratch) {
  UnitLists<value_t>& lists = scratch.lists;
  const int64_t k = p.k, cap = lists.cap;
  if (lists.pending > 0) {
    lists.flush();
  }
  for (int64_t row = 0; row < rows; ++row) {
    if (scratch.kinds[row] == kExact) {
      lists.scan(row, p.slots);
    }
    const int64_t out = (head * p.rows + row_begin + row) * k;
    const int64_t count = lists.counts[row];
    for (int64_t j = 0; j < count; ++j) {
      p.scores[out + j] = static_cast<float>(lists.scores[row * cap + j]);
      p.indices[out + j] = lists.slots[row * cap + j];
    }
    for (int64_t j = count; j < k; ++j) {
      p.scores[out + j] = -std::numeric_limits<float>::infinity();
      p.indices[out + j] = -1;
    }
  }
}

// Units of up to kUnitRows rows per memory head, `run(head, row_begin, rows, scratch)` over
// at::parallel_for with one scratch per task.
template <typename value_t, typename SizeFn, typename RunFn>
void for_each_unit(const Int8TopkParams& p, SizeFn&& size, RunFn&& run) {
  const int64_t units_per_head = (p.rows + kUnitRows - 1) / kUnitRows;
  at::parallel_for(0, p.heads * units_per_head, 1, [&](int64_t unit_begin, int64_t unit_end) {
    Scratch<value_t> scratch;
    size(scratch);
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t head = unit / units_per_head;
      const int64_t row_begin = (unit % units_per_head) * kUnitRows;
      run(head, row_begin, std::min(kUnitRows, p.rows - row_begin), scratch);
    }
  });
}

// ---- exact path: every row scored slot by slot ----

void exact_topk(const Int8TopkParams& p) {
  const int64_t cap = std::min(p.k, p.slots);
  const int64_t unit_rows = std::min(kUnitRows, p.rows);
  for_each_unit<float>(
      p, [&](Scratch<float>& s) { s.size(unit_rows, unit_rows, cap, p.dim, 0); },
      [&](int64_t head, int64_t row_begin, int64_t rows, Scratch<float>& s) {
        begin_unit(p, head, row_begin, rows, rows, kFloatClamp, s);
        for (int64_t row = 0; row < rows; ++row) {
          if (s.kinds[row] != kNaNRow) {
            s.kinds[row] = kExact;
          }
        }
        finish_unit(p, head, row_begin, rows, s);
      });
}

// ---- portable filter: the integers t + kb in float32 FMA ----

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

// kRows consecutive keys (float, dim each) against kVecs * kWidth rows (q8 as float, (dim, block)
// layout), accumulators starting at kb; lanes where t + kb > m are considered.
template <int kRows, int kVecs>
inline void float_score_and_filter(const float* key_rows, int64_t dim, const float* q_block,
                                   const float* init, UnitLists<float>& lists, int64_t lane_base,
                                   int64_t first_slot) {
  using L = Lanes<float>;
  using vec = typename L::vec;
  constexpr int kBlock = kVecs * L::kWidth;
  static_assert(kRows * kBlock <= kMaxBatch && kBlock <= 64, "UnitLists::take's batch");
  vec acc[kRows][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    const vec start = L::broadcast(init[r]);
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = start;
    }
  }
  for (int64_t d = 0; d < dim; ++d) {
    vec q_vecs[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      q_vecs[v] = L::load(q_block + d * kBlock + v * L::kWidth);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const vec key_value = L::broadcast(key_rows[r * dim + d]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = L::fma(key_value, q_vecs[v], acc[r][v]);
      }
    }
  }
  typename L::mask passed[kRows][kVecs];
  typename L::mask any_passed = 0;
  const float* thresholds = lists.thresholds + lane_base;
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
  uint32_t masks[kRows][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      masks[r][v] = passed[r][v];
    }
  }
  lists.take(&masks[0][0], kRows, kVecs, L::kWidth, lane_base, first_slot);
}

template <int kVecs>
void float_topk(const Int8TopkParams& p) {
  using L = Lanes<float>;
  constexpr int kBlock = kVecs * L::kWidth;
  constexpr int kRows = rows_for_vecs(kVecs);
  const int64_t dim = p.dim, num_slots = p.slots;
  const int64_t cap = std::min(p.k, num_slots);
  const int64_t unit_rows = std::min(kUnitRows, p.rows);
  const int64_t padded_rows = (unit_rows + kBlock - 1) / kBlock * kBlock;
  const int64_t fit =
      kKeyTileBytes / (static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(dim, 1));
  const int64_t tile_slots = std::min(std::max<int64_t>(1, fit / kRows) * kRows, num_slots);
  for_each_unit<float>(
      p,
      [&](Scratch<float>& s) {
        s.size(unit_rows, padded_rows, cap, dim, tile_slots);
        s.q_floats.resize(padded_rows * dim);
        s.key_floats.resize(tile_slots * dim);
      },
      [&](int64_t head, int64_t row_begin, int64_t rows, Scratch<float>& s) {
        begin_unit(p, head, row_begin, rows, padded_rows, kFloatClamp, s);
        UnitLists<float>& lists = s.lists;
        const int64_t blocks = (rows + kBlock - 1) / kBlock;
        for (int64_t block = 0; block < blocks; ++block) {
          float* packed = s.q_floats.data() + block * dim * kBlock;
          for (int lane = 0; lane < kBlock; ++lane) {
            const int64_t row = block * kBlock + lane;
            for (int64_t d = 0; d < dim; ++d) {
              packed[d * kBlock + lane] = row < rows ? s.q8[row * dim + d] : 0.0f;
            }
          }
        }
        const int32_t* key_abs = p.key_abs + head * num_slots;
        for (int64_t tile_begin = 0; tile_begin < num_slots; tile_begin += tile_slots) {
          const int64_t tile_rows = std::min(tile_slots, num_slots - tile_begin);
          for (int64_t n = 0; n < tile_rows; ++n) {
            const int8_t* key = lists.keys + (tile_begin + n) * lists.key_stride;
            float* converted = s.key_floats.data() + n * dim;
            for (int64_t d = 0; d < dim; ++d) {
              converted[d] = key[d];
            }
            s.tile_init[n] = static_cast<float>(bound_units(key_abs[tile_begin + n]));
          }
          for (int64_t block = 0; block < blocks; ++block) {
            const float* q_block = s.q_floats.data() + block * dim * kBlock;
            const float* key_tile = s.key_floats.data();
            const int64_t lane_base = block * kBlock;
            int64_t r = 0;
            for (; r + kRows <= tile_rows; r += kRows) {
              float_score_and_filter<kRows, kVecs>(key_tile + r * dim, dim, q_block,
                                                   s.tile_init.data() + r, lists, lane_base,
                                                   tile_begin + r);
            }
            for (; r < tile_rows; ++r) {
              float_score_and_filter<1, kVecs>(key_tile + r * dim, dim, q_block,
                                               s.tile_init.data() + r, lists, lane_base,
                                               tile_begin + r);
            }
          }
        }
        finish_unit(p, head, row_begin, rows, s);
      });
}

// ---- AVX-512 VNNI filter ----

#if L2M_INT8_TOPK_VNNI
constexpr int kVnniWidth = 16;  // int32 lanes of a zmm
constexpr int vnni_rows_for_vecs(int vecs) { return vecs >= 4 ? 6 : 12; }

inline int32_t load_word(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return word;
}

// acc += the 4-byte dot products of u8 (unsigned) and key (signed) in each int32 lane. Inline
// assembly rather than _mm512_dpbusd_epi32: with the intrinsic, GCC keeps copying and spilling
// the micro-kernel's accumulators inside the loop.
L2M_INT8_TOPK_VNNI_TARGET inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i key) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(key));
  return acc;
}

// acc[r][v] = init[r] + sum_d u8 * key for kRows consecutive keys (groups * 4 bytes readable
// each, key_stride apart) against kVecs * 16 rows (u8 = q8 + 128 in (groups, block, 4) layout).
template <int kRows, int kVecs>
L2M_INT8_TOPK_VNNI_TARGET __attribute__((always_inline)) inline void vnni_dots(
    const int8_t* key_rows, int64_t key_stride, int64_t groups, const uint8_t* q_block,
    const int32_t* init, __m512i (&acc)[kRows][kVecs]) {
  constexpr int kBlock = kVecs * kVnniWidth;
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    const __m512i start = _mm512_set1_epi32(init[r]);
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = start;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i q_vecs[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      q_vecs[v] = _mm512_loadu_si512(q_block + (g * kBlock + v * kVnniWidth) * 4);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m512i key_word = _mm512_set1_epi32(load_word(key_rows + r * key_stride + g * 4));
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = dpbusd(acc[r][v], q_vecs[v], key_word);
      }
    }
  }
}

// The filter: accumulators that start at kb - 128 * key_sum end at t + kb; lanes where that
// exceeds m are rescored.
template <int kRows, int kVecs>
L2M_INT8_TOPK_VNNI_TARGET inline void vnni_score_and_filter(
    const int8_t* key_rows, int64_t key_stride, int64_t groups, const uint8_t* q_block,
    const int32_t* init, UnitLists<int32_t>& lists, int64_t lane_base, int64_t first_slot) {
  static_assert(kRows * kVecs * kVnniWidth <= kMaxBatch && kVecs * kVnniWidth <= 64,
                "UnitLists::take's batch");
  __m512i acc[kRows][kVecs];
  vnni_dots<kRows, kVecs>(key_rows, key_stride, groups, q_block, init, acc);
  // Usually nothing passes: one comparison per vector of rows, of the keys' maximum.
  const int32_t* thresholds = lists.thresholds + lane_base;
  __m512i threshold[kVecs];
  __mmask16 any_passed = 0;
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    threshold[v] = _mm512_loadu_si512(thresholds + v * kVnniWidth);
    __m512i top = acc[0][v];
#pragma GCC unroll 16
    for (int r = 1; r < kRows; ++r) {
      top = _mm512_maskz_max_epi32(0xffff, top, acc[r][v]);
    }
    any_passed |= _mm512_cmpgt_epi32_mask(top, threshold[v]);
  }
  if (__builtin_expect(any_passed == 0, 1)) {
    return;
  }
  uint32_t masks[kRows][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      masks[r][v] = _mm512_cmpgt_epi32_mask(acc[r][v], threshold[v]);
    }
  }
  lists.take(&masks[0][0], kRows, kVecs, kVnniWidth, lane_base, first_slot);
}

// The warm start: accumulators that start at -kb - 128 * key_sum end at the lower bound t - kb;
// top (kWarmTop x kVecs vectors, per lane descending) keeps the kWarmTop largest per lane.
template <int kRows, int kVecs>
L2M_INT8_TOPK_VNNI_TARGET inline void vnni_lower_top(const int8_t* key_rows, int64_t key_stride,
                                                     int64_t groups, const uint8_t* q_block,
                                                     const int32_t* init, __m512i* top) {
  __m512i acc[kRows][kVecs];
  vnni_dots<kRows, kVecs>(key_rows, key_stride, groups, q_block, init, acc);
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    __m512i kept[kWarmTop];  // registers: stores through __m512i* may alias anything
#pragma GCC unroll 8
    for (int j = 0; j < kWarmTop; ++j) {
      kept[j] = top[j * kVecs + v];
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      __m512i x = acc[r][v];
#pragma GCC unroll 8
      for (int j = 0; j < kWarmTop; ++j) {
        const __m512i larger = _mm512_maskz_max_epi32(0xffff, kept[j], x);
        x = _mm512_maskz_min_epi32(0xffff, kept[j], x);
        kept[j] = larger;
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < kWarmTop; ++j) {
      top[j * kVecs + v] = kept[j];
    }
  }
}

// floors (kVecs * 16 lanes) = the minimum over `parts` parts of part_slots consecutive keys of
// the per-lane kWarmTop-th largest t - kb: each lane has parts * kWarmTop distinct keys whose
// lower bound is at least its floor.
template <int kVecs>
L2M_INT8_TOPK_VNNI_TARGET void vnni_lower_floors(const int8_t* key_tile, int64_t key_stride,
                                                 int64_t groups, int64_t parts,
                                                 int64_t part_slots, const uint8_t* q_block,
                                                 const int32_t* init, int32_t* floors) {
  constexpr int kRows = vnni_rows_for_vecs(kVecs);
  __m512i lowest[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    lowest[v] = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  }
  for (int64_t part = 0; part < parts; ++part) {
    __m512i top[kWarmTop * kVecs];
    for (int j = 0; j < kWarmTop * kVecs; ++j) {
      top[j] = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
    }
    const int64_t begin = part * part_slots, end = begin + part_slots;
    int64_t n = begin;
    for (; n + kRows <= end; n += kRows) {
      vnni_lower_top<kRows, kVecs>(key_tile + n * key_stride, key_stride, groups, q_block,
                                   init + n, top);
    }
    for (; n < end; ++n) {
      vnni_lower_top<1, kVecs>(key_tile + n * key_stride, key_stride, groups, q_block, init + n,
                               top);
    }
    for (int v = 0; v < kVecs; ++v) {
      lowest[v] = _mm512_maskz_min_epi32(0xffff, lowest[v], top[(kWarmTop - 1) * kVecs + v]);
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    _mm512_storeu_si512(floors + v * kVnniWidth, lowest[v]);
  }
}

// One tile's slots against one block of rows.
template <int kVecs>
L2M_INT8_TOPK_VNNI_TARGET void vnni_tile_block(const int8_t* key_tile, int64_t key_stride,
                                               int64_t groups, int64_t tile_rows,
                                               const uint8_t* q_block, const int32_t* init,
                                               UnitLists<int32_t>& lists, int64_t lane_base,
                                               int64_t tile_begin) {
  constexpr int kRows = vnni_rows_for_vecs(kVecs);
  int64_t r = 0;
  for (; r + kRows <= tile_rows; r += kRows) {
    vnni_score_and_filter<kRows, kVecs>(key_tile + r * key_stride, key_stride, groups, q_block,
                                        init + r, lists, lane_base, tile_begin + r);
  }
  for (; r < tile_rows; ++r) {
    vnni_score_and_filter<1, kVecs>(key_tile + r * key_stride, key_stride, groups, q_block,
                                    init + r, lists, lane_base, tile_begin + r);
  }
}

template <int kVecs>
void vnni_topk(const Int8TopkParams& p) {
  constexpr int kBlock = kVecs * kVnniWidth;
  constexpr int kRows = vnni_rows_for_vecs(kVecs);
  const int64_t dim = p.dim, num_slots = p.slots;
  const int64_t groups = (dim + 3) / 4;
  const bool padded_keys = dim % 4 != 0;  // tiles copied with zero padding
  const int64_t cap = std::min(p.k, num_slots);
  const int64_t unit_rows = std::min(kUnitRows, p.rows);
  const int64_t padded_rows = (unit_rows + kBlock - 1) / kBlock * kBlock;
  const int64_t fit = kKeyTileBytes / (std::max<int64_t>(groups, 1) * 4);
  const int64_t tile_slots = std::min(std::max<int64_t>(1, fit / kRows) * kRows, num_slots);
  // Warm start over the first tile: parts of warm_part_slots keys, kWarmTop keys from each.
  const int64_t parts = (cap + kWarmTop - 1) / kWarmTop;
  const int64_t warm_part_slots = std::min(num_slots / kWarmShare, tile_slots) / parts;
  const int64_t warm_parts = warm_part_slots >= kWarmMinPart ? parts : 0;
  for_each_unit<int32_t>(
      p,
      [&](Scratch<int32_t>& s) {
        s.size(unit_rows, padded_rows, cap, dim, tile_slots);
        s.lower_init.resize(warm_parts * warm_part_slots);
        s.q_bytes.resize(padded_rows * groups * 4);
        if (padded_keys) {
          s.key_bytes.resize(tile_slots * groups * 4);
        }
      },
      [&](int64_t head, int64_t row_begin, int64_t rows, Scratch<int32_t>& s) {
        begin_unit(p, head, row_begin, rows, padded_rows, kVnniClamp, s);
        UnitLists<int32_t>& lists = s.lists;
        const int64_t blocks = (rows + kBlock - 1) / kBlock;
        // q_bytes[block][g][lane][j] = q8[row][4 g + j] + 128 (128: padding row or dimension).
        std::fill(s.q_bytes.begin(), s.q_bytes.end(), uint8_t(128));
        for (int64_t row = 0; row < rows; ++row) {
          uint8_t* packed = s.q_bytes.data() + (row / kBlock) * groups * kBlock * 4 +
                            (row % kBlock) * 4;
          for (int64_t d = 0; d < dim; ++d) {
            packed[(d / 4) * kBlock * 4 + d % 4] = static_cast<uint8_t>(s.q8[row * dim + d] + 128);
          }
        }
        const int32_t* key_abs = p.key_abs + head * num_slots;
        const int32_t* key_sum = p.key_sum + head * num_slots;
        for (int64_t tile_begin = 0; tile_begin < num_slots; tile_begin += tile_slots) {
          const int64_t tile_rows = std::min(tile_slots, num_slots - tile_begin);
          const int8_t* key_tile = lists.keys + tile_begin * lists.key_stride;
          int64_t key_stride = lists.key_stride;
          if (padded_keys) {
            int8_t* copy = s.key_bytes.data();
            for (int64_t n = 0; n < tile_rows; ++n) {
              std::memcpy(copy + n * groups * 4, key_tile + n * key_stride, dim);
              std::memset(copy + n * groups * 4 + dim, 0, groups * 4 - dim);
            }
            key_tile = copy;
            key_stride = groups * 4;
          }
          for (int64_t n = 0; n < tile_rows; ++n) {
            const int64_t slot = tile_begin + n;
            s.tile_init[n] = static_cast<int32_t>(bound_units(key_abs[slot]) -
                                                  128 * static_cast<int64_t>(key_sum[slot]));
          }
          if (tile_begin == 0 && warm_parts > 0) {
            for (int64_t n = 0; n < warm_parts * warm_part_slots; ++n) {
              s.lower_init[n] = static_cast<int32_t>(-bound_units(key_abs[n]) -
                                                     128 * static_cast<int64_t>(key_sum[n]));
            }
            for (int64_t block = 0; block < blocks; ++block) {
              alignas(64) int32_t floors[kBlock];
              vnni_lower_floors<kVecs>(key_tile, key_stride, groups, warm_parts, warm_part_slots,
                                       s.q_bytes.data() + block * groups * kBlock * 4,
                                       s.lower_init.data(), floors);
              for (int lane = 0; lane < kBlock && block * kBlock + lane < rows; ++lane) {
                set_floor(lists, s, block * kBlock + lane, floors[lane]);
              }
            }
          }
          for (int64_t block = 0; block < blocks; ++block) {
            vnni_tile_block<kVecs>(key_tile, key_stride, groups, tile_rows,
                                   s.q_bytes.data() + block * groups * kBlock * 4,
                                   s.tile_init.data(), lists, block * kBlock, tile_begin);
          }
        }
        finish_unit(p, head, row_begin, rows, s);
      });
}

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has;
}
#endif  // L2M_INT8_TOPK_VNNI

}  // namespace

void int8_topk_fwd(const Int8TopkParams& p) {
  if (p.heads <= 0 || p.rows <= 0) {
    return;
  }
  if (p.slots <= 0) {
    for (int64_t i = 0; i < p.heads * p.rows * p.k; ++i) {
      p.scores[i] = -std::numeric_limits<float>::infinity();
      p.indices[i] = -1;
    }
    return;
  }
#if L2M_INT8_TOPK_VNNI
  if (p.dim <= kVnniMaxDim && cpu_has_vnni()) {
    // Narrower row blocks for few rows per head, so padding lanes waste less.
    if (p.rows > 2 * kVnniWidth) {
      vnni_topk<4>(p);
    } else if (p.rows > kVnniWidth) {
      vnni_topk<2>(p);
    } else {
      vnni_topk<1>(p);
    }
    return;
  }
#endif
  if (p.dim <= kFloatMaxDim) {
    constexpr int64_t kWidth = Lanes<float>::kWidth;
    if (kMaxVecs >= 4 && p.rows > 2 * kWidth) {
      float_topk<kMaxVecs>(p);
    } else if (p.rows > kWidth) {
      float_topk<2>(p);
    } else {
      float_topk<1>(p);
    }
    return;
  }
  exact_topk(p);
}

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
