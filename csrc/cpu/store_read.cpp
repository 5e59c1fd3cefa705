// CPU kernel of the second level of a MemoryStore's two-level read (interface: memory_store.h):
// the exact top-k of each query row within the blocks its first level selected.
//
// The blocks a read needs were gathered by the caller into one staging buffer (one gather per
// tier), so this kernel reads contiguous (S, D) key tiles. Work units are query rows, in chunks,
// over at::parallel_for; a row walks its blocks in increasing slot order and scores each key row
// with a float64 dot product of fixed association (kLanes partial sums, then summed in lane
// order), so a score is a pure function of the query and the key, whatever the tiling or thread
// count. A score that does not beat the row's current k-th best (list full) is dropped; a later
// slot loses every tie, so that keeps the order "descending score, ties to the smaller slot". NaN
// ranks like +inf.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "memory_store.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

constexpr int kLanes = 8;  // partial sums of a dot product (one float64 vector on AVX-512)

template <typename key_t>
inline double dot(const double* q, const key_t* key, int64_t dim) {
  double part[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
#pragma GCC unroll 8
    for (int l = 0; l < kLanes; ++l) {
      part[l] += q[d + l] * static_cast<double>(key[d + l]);
    }
  }
  for (int l = 0; d < dim; ++d, ++l) {
    part[l] += q[d] * static_cast<double>(key[d]);
  }
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) {
    sum += part[l];
  }
  return sum;
}

inline double rank_of(double score) {
  return std::isnan(score) ? std::numeric_limits<double>::infinity() : score;
}

// One row's k best (score, slot), sorted in the output order.
struct RowTopK {
  std::vector<double> scores;
  std::vector<int64_t> slots;
  int64_t count = 0, k = 0;
  double threshold = -std::numeric_limits<double>::infinity();  // rank of the k-th (list full)

  void reset(int64_t k_) {
    k = k_;
    count = 0;
    scores.assign(k, 0.0);
    slots.assign(k, -1);
    threshold = -std::numeric_limits<double>::infinity();
  }

  // Slots arrive in increasing order: a candidate goes after every kept entry that ranks at or
  // above it.
  void offer(double score, int64_t slot) {
    const double rank = rank_of(score);
    if (count == k && !(rank > threshold)) {
      return;
    }
    int64_t place = count;
    while (place > 0 && rank_of(scores[place - 1]) < rank) {
      --place;
    }
    const int64_t last = count < k ? count : k - 1;
    for (int64_t j = last; j > place; --j) {
      scores[j] = scores[j - 1];
      slots[j] = slots[j - 1];
    }
    scores[place] = score;
    slots[place] = slot;
    if (count < k) {
      ++count;
    }
    if (count == k) {
      threshold = rank_of(scores[k - 1]);
    }
  }
};

template <typename key_t>
void candidates_rows(const BlockCandidatesParams& p, int64_t begin, int64_t end) {
  const int64_t dim = p.dim, size = p.block_size, heads = p.heads;
  const key_t* keys = static_cast<const key_t*>(p.keys);
  std::vector<double> q(static_cast<size_t>(dim));
  RowTopK top;
  for (int64_t row = begin; row < end; ++row) {  // row = h * R + r
    const int64_t h = row / p.rows;
    const float* q_row = p.q + row * dim;
    for (int64_t d = 0; d < dim; ++d) {
      q[d] = static_cast<double>(q_row[d]);
    }
    top.reset(p.k);
    const int64_t* blocks = p.blocks + row * p.num_selected;
    for (int64_t j = 0; j < p.num_selected; ++j) {
      const int64_t u = blocks[j];
      if (u < 0) {
        continue;
      }
      const key_t* block = keys + (u * heads + h) * size * dim;
      const int64_t first = p.block_slot[u], len = p.block_len[u];
      for (int64_t s = 0; s < len; ++s) {
        top.offer(dot(q.data(), block + s * dim, dim), first + s);
      }
    }
    float* scores = p.scores + row * p.k;
    int64_t* indices = p.indices + row * p.k;
    for (int64_t j = 0; j < p.k; ++j) {
      const bool kept = j < top.count;
      scores[j] = kept ? static_cast<float>(top.scores[j]) : -std::numeric_limits<float>::infinity();
      indices[j] = kept ? top.slots[j] : -1;
    }
  }
}

}  // namespace

void block_candidates_topk_fwd(const BlockCandidatesParams& params) {
  const int64_t rows = params.heads * params.rows;
  // About 256 K multiply-adds per task, at least one row.
  const int64_t work = std::max<int64_t>(1, params.num_selected * params.block_size * params.dim);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / work);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if (params.int8_keys) {
      candidates_rows<int8_t>(params, begin, end);
    } else {
      candidates_rows<float>(params, begin, end);
    }
  });
}

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
