// CPU helper of the memory_attention backward (interface: memory_attention.h).
//
// One pass over the query rows (parallel, each row independent): the row's scaled query, then for
// each of its k selected slots one key row (score, weight) and one value row (dot with dout, or a
// weighted sum). B·H·T·k·(Dk + Dv) work, against the B·H·T·N·Dk of the read's scoring.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "memory_attention.h"
#include "convert.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

template <typename scalar_t>
void memory_read_weights_impl(const MemoryReadWeightsParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* q = static_cast<const scalar_t*>(params.q);
  const auto* keys = static_cast<const scalar_t*>(params.keys);
  const auto* values = static_cast<const scalar_t*>(params.values);
  const auto* lse = static_cast<const acc_t*>(params.lse);
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  auto* weights = static_cast<acc_t*>(params.weights);
  auto* dots = static_cast<acc_t*>(params.dots);
  auto* out = static_cast<scalar_t*>(params.out);
  const int64_t dim_k = params.dim_k, dim_v = params.dim_v, k = params.k;
  const int64_t group = params.heads / params.mem_heads;
  const int64_t num_rows = params.batch * params.heads * params.seq_len;
  const acc_t scale = static_cast<acc_t>(params.scale);
  const int64_t work_per_row = std::max<int64_t>(1, k * (dim_k + dim_v));
  const int64_t grain = std::max<int64_t>(1, 65536 / work_per_row);

  at::parallel_for(0, num_rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> q_scaled(dim_k + 1), key_buffer(dim_k + 1), value_buffer(dim_v + 1);
    std::vector<acc_t> dout_buffer(dim_v + 1), out_row(dim_v + 1);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t bh = row / params.seq_len;
      const int64_t b = bh / params.heads, h = bh % params.heads;
      const int64_t memory = params.shared_memory ? h / group : b * params.mem_heads + h / group;
      const int64_t slot_base = memory * params.num_slots;
      // Scaled and rounded once, as the read scores (scale * q) . key.
      const acc_t* q_row = load_row(q + params.q_rows.offset(row), dim_k, q_scaled.data());
#pragma omp simd
      for (int64_t d = 0; d < dim_k; ++d) {
        q_scaled[d] = q_row[d] * scale;
      }
      const acc_t* dout_row =
          dout != nullptr
              ? load_row(dout + params.dout_rows.offset(row), dim_v, dout_buffer.data())
              : nullptr;
      std::fill(out_row.begin(), out_row.end(), acc_t(0));
      const acc_t row_lse = lse[row];
      acc_t dot_sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = params.indices[row * k + j];
        // The rows are scattered over the memory: ask for the next entry's while this one computes.
        const int64_t next_slot = j + 1 < k ? params.indices[row * k + j + 1] : -1;
        if (next_slot >= 0) {
          __builtin_prefetch(keys + (slot_base + next_slot) * dim_k);
          __builtin_prefetch(values + (slot_base + next_slot) * dim_v);
        }
        if (slot < 0) {
          weights[row * k + j] = 0;
          continue;
        }
        const acc_t* key = load_row(keys + (slot_base + slot) * dim_k, dim_k, key_buffer.data());
        acc_t score = 0;
#pragma omp simd reduction(+ : score)
        for (int64_t d = 0; d < dim_k; ++d) {
          score += q_scaled[d] * key[d];
        }
        const acc_t weight = std::exp(score - row_lse);
        weights[row * k + j] = weight;
        const acc_t* value =
            load_row(values + (slot_base + slot) * dim_v, dim_v, value_buffer.data());
        if (dout_row != nullptr) {
          acc_t value_dot = 0;
#pragma omp simd reduction(+ : value_dot)
          for (int64_t e = 0; e < dim_v; ++e) {
            value_dot += dout_row[e] * value[e];
          }
          dot_sum += weight * value_dot;
        }
        if (out != nullptr) {
#pragma omp simd
          for (int64_t e = 0; e < dim_v; ++e) {
            out_row[e] += weight * value[e];
          }
        }
      }
      if (dots != nullptr) {
        dots[row] = dot_sum;
      }
      if (out != nullptr) {
        store_row(out + row * dim_v, out_row.data(), dim_v);
      }
    }
  });
}

}  // namespace

void memory_read_weights(const MemoryReadWeightsParams& params) {
  TORCH_CHECK_VALUE(params.mem_heads >= 1 && params.heads % params.mem_heads == 0,
                    "memory_read_weights: the memory head count must divide the head count");
  TORCH_CHECK_VALUE(params.dout == nullptr || params.dots != nullptr,
                    "memory_read_weights: dots is required with dout");
  L2M_DISPATCH_FLOATING(params, "memory_read_weights", memory_read_weights_impl);
}

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
