// CPU kernels of a MemoryStore's reads (interface: memory_store.h): the second level of the
// two-level read, the exact top-k of each query row within the blocks its first level selected
// (block_candidates_topk_fwd); and the read of a selection (topk_values_read_fwd).
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

#include "convert.h"

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

// ---- topk_values_read_fwd ----

// float8_e4m3fn: 1 sign, 4 exponent (bias 7) and 3 mantissa bits; no infinities, 0x7f / 0xff NaN.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int byte = 0; byte < 256; ++byte) {
      const int exponent = (byte >> 3) & 15, mantissa = byte & 7;
      float magnitude;
      if ((byte & 127) == 127) {
        magnitude = std::numeric_limits<float>::quiet_NaN();
      } else if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m / 8 * 2^-6
      } else {
        magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
      }
      value[byte] = (byte & 128) ? -magnitude : magnitude;
    }
  }
};

const Fp8Table& fp8_table() {
  static const Fp8Table table;
  return table;
}

// acc[d] += factor * row[d] for d < dim, the row in its storage type.
template <typename value_t>
inline void add_row(float* acc, const value_t* row, float factor, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    acc[d] += factor * static_cast<float>(row[d]);
  }
}

inline void add_row(float* acc, const c10::BFloat16* row, float factor, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    acc[d] += factor * c10::detail::f32_from_bits(row[d].x);
  }
}

inline void add_fp8_row(float* acc, const uint8_t* row, float factor, int64_t dim,
                        const float* table) {
  for (int64_t d = 0; d < dim; ++d) {
    acc[d] += factor * table[row[d]];
  }
}

// Rows [begin, end) of h * R + r. stored_t: the element type of a value row.
template <typename stored_t>
void values_read_rows(const TopkValuesReadParams& p, int64_t begin, int64_t end) {
  const int64_t k = p.k, dim = p.dim;
  const stored_t* values = static_cast<const stored_t*>(p.values);
  const bool scaled = p.value_scale != nullptr;
  const float* table = p.value_type == StoredValues::kFloat8E4M3 ? fp8_table().value : nullptr;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> acc(static_cast<size_t>(dim));
  std::vector<float> e(static_cast<size_t>(k));
  auto row_of = [&](int64_t h, int64_t n) {
    return values + h * p.value_strides[0] + n * p.value_strides[1];
  };
  auto prefetch_rows = [&](int64_t row) {  // the value rows of a later query row
    const int64_t h = row / p.rows;
    const int64_t* ids = p.indices + row * k;
    const int64_t bytes = dim * static_cast<int64_t>(sizeof(stored_t));
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] >= 0) {
        const char* at = reinterpret_cast<const char*>(row_of(h, ids[j]));
        for (int64_t b = 0; b < bytes; b += 64) {
          __builtin_prefetch(at + b);
        }
      }
    }
  };
  if (begin < end) {
    prefetch_rows(begin);
  }
  for (int64_t row = begin; row < end; ++row) {
    if (row + 1 < end) {
      prefetch_rows(row + 1);
    }
    const int64_t h = row / p.rows;
    const float* scores = p.scores + row * k;
    const int64_t* ids = p.indices + row * k;
    float* weights = p.weights + row * k;
    float* out = p.out + row * dim;
    float m = kNegInf;
    bool nan = false, live = false;
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] >= 0) {
        live = true;
        nan |= std::isnan(scores[j]);
        m = std::max(m, scores[j]);
      }
    }
    if (!live || (!nan && m == kNegInf)) {  // nothing to read (every live score -inf counts so)
      std::fill(weights, weights + k, 0.0f);
      std::fill(out, out + dim, 0.0f);
      p.lse[row] = kNegInf;
      continue;
    }
    const float shift = m;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      e[j] = ids[j] >= 0 ? std::exp(scores[j] - shift) : 0.0f;
      sum += e[j];
    }
    const float nan_value = std::numeric_limits<float>::quiet_NaN();
    for (int64_t j = 0; j < k; ++j) {
      weights[j] = nan ? (ids[j] >= 0 ? nan_value : 0.0f) : e[j] / sum;
    }
    p.lse[row] = nan ? nan_value : shift + std::log(sum);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] < 0) {
        continue;
      }
      const float factor =
          scaled ? weights[j] * p.value_scale[h * p.value_scale_strides[0] +
                                              ids[j] * p.value_scale_strides[1]]
                 : weights[j];
      const stored_t* value = row_of(h, ids[j]);
      if constexpr (std::is_same_v<stored_t, uint8_t>) {
        add_fp8_row(acc.data(), value, factor, dim, table);
      } else {
        add_row(acc.data(), value, factor, dim);
      }
    }
    copy_elements(acc.data(), out, dim);
  }
}

}  // namespace

void topk_values_read_fwd(const TopkValuesReadParams& params) {
  const int64_t rows = params.heads * params.rows;
  const int64_t work = std::max<int64_t>(1, params.k * (params.dim + 8));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / work);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    switch (params.value_type) {
      case StoredValues::kFloat32: values_read_rows<float>(params, begin, end); break;
      case StoredValues::kFloat16: values_read_rows<c10::Half>(params, begin, end); break;
      case StoredValues::kBFloat16: values_read_rows<c10::BFloat16>(params, begin, end); break;
      case StoredValues::kFloat64: values_read_rows<double>(params, begin, end); break;
      case StoredValues::kInt8: values_read_rows<int8_t>(params, begin, end); break;
      case StoredValues::kFloat8E4M3: values_read_rows<uint8_t>(params, begin, end); break;
    }
  });
}

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
