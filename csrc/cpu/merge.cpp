// CPU kernels of the row-wise merge ops (interface: merge.h, /work/notes/merge_kernels.md).
//
// Rows are independent: each is read once and written once, so these loops are bound by memory
// bandwidth. Threads split the rows (at::parallel_for, so torch.set_num_threads applies and tiny
// calls stay on the calling thread); within a row, D is walked in tiles whose inner loops are
// `omp simd`. Half types are converted to float in small stack buffers so those loops see plain
// float arrays; float and double are used in place. Per-row reductions run in a fixed order, so
// results do not depend on the number of threads.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "merge.h"
#include "convert.h"
#include "vmath.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// Elements of a row handled per tile: the half-type staging buffers (a few KiB) stay in L1.
constexpr int64_t kTile = 256;
// Work, in row elements, below which a chunk of rows is not worth handing to another thread.
constexpr int64_t kMinElementsPerTask = 32768;

int64_t rows_per_task(int64_t dim) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(dim, 1));
}

// Whether a kernel streams its (rows, dim) outputs (stream_row; then each task ends with
// stream_fence()).
template <typename scalar_t>
inline bool streamed(int64_t rows, int64_t dim) {
  return stream_output(rows * dim * static_cast<int64_t>(sizeof(scalar_t)));
}

// ---- per-row scalars, a block of rows at a time ----

// Rows whose scalars are computed together before their elements are walked (stack arrays).
constexpr int64_t kRowBlock = 64;

// Weight of a side with log-sum-exp `side_lse` in the merged result: exactly 0 for an empty side
// (-inf), so that empty rows give 0 rather than exp(-inf - (-inf)) = NaN.
template <typename acc_t>
inline acc_t side_weight(acc_t side_lse, acc_t merged_lse) {
  return side_lse == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : vexp(side_lse - merged_lse);
}

// lse = logaddexp(lse_a, lse_b) and each side's weight exp(lse_side - lse), for n rows.
template <typename acc_t>
inline void merge_weights(const acc_t* lse_a, const acc_t* lse_b, int64_t n, acc_t* lse, acc_t* weight_a,
                          acc_t* weight_b) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = lse_a[i], b = lse_b[i];
    // Not fmax, which drops NaN: a NaN on either side must give a NaN row. The comparison alone
    // propagates a NaN b; the a != a test also catches (NaN, -inf), which it would map to -inf.
    acc_t max_lse = a > b ? a : b;
    max_lse = a != a ? a : max_lse;
    const acc_t sum = max_lse + vlog1p_unit(vexp(-std::abs(a - b)));
    // Both sides empty: -inf. A +inf side: +inf (the sum is NaN there). A NaN side: NaN (the sum).
    const acc_t merged = max_lse == -kInf ? -kInf : max_lse == kInf ? max_lse : sum;
    lse[i] = merged;
    weight_a[i] = side_weight(a, merged);
    weight_b[i] = side_weight(b, merged);
  }
}

// Each row's two side weights given the merged lse (the backward's).
template <typename acc_t>
inline void side_weights(const acc_t* lse_a, const acc_t* lse_b, const acc_t* lse, int64_t n, acc_t* weight_a,
                         acc_t* weight_b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    weight_a[i] = side_weight(lse_a[i], lse[i]);
    weight_b[i] = side_weight(lse_b[i], lse[i]);
  }
}

// g = sigmoid(logit) and 1 - g, computed as sigmoid(-logit): 1 - sigmoid(logit) loses its digits
// when the gate saturates.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void gate_weights(const scalar_t* gate, int64_t n, acc_t* g, acc_t* one_minus_g) {
  acc_t buffer[kRowBlock];  // used by half types only
  const acc_t* logits = load_row(gate, n, buffer);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = vsigmoid(logits[i]);
    one_minus_g[i] = vsigmoid(-logits[i]);
  }
}

// ---- kernels ----

// Calls body(block_begin, n) for consecutive blocks of at most kRowBlock rows of [begin, end).
template <typename Body>
inline void for_row_blocks(int64_t begin, int64_t end, const Body& body) {
  for (int64_t block = begin; block < end; block += kRowBlock) {
    body(block, std::min(kRowBlock, end - block));
  }
}

// out[r] = w1[r] x1[r] + w2[r] x2[r] for `rows` rows of `dim` elements starting at row `first` (the
// forward of both merges: per-row weights, one multiply-add per element).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void blend_rows(const scalar_t* x1, const acc_t* w1, const scalar_t* x2, const acc_t* w2, scalar_t* out,
                       int64_t first, int64_t rows, int64_t dim, bool stream) {
  acc_t x1_buffer[kTile], x2_buffer[kTile], out_buffer[kTile];  // half types, streamed outputs
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t weight1 = w1[r], weight2 = w2[r];
    const int64_t row_offset = (first + r) * dim;
    for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
      const int64_t n = std::min(kTile, dim - d0);
      const acc_t* a = load_row(x1 + row_offset + d0, n, x1_buffer);
      const acc_t* b = load_row(x2 + row_offset + d0, n, x2_buffer);
      acc_t* blended = tile_target(out + row_offset + d0, out_buffer, stream);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        blended[i] = madd(weight1, a[i], weight2 * b[i]);
      }
      store_tile(out + row_offset + d0, blended, n, stream);
    }
  }
}

template <typename scalar_t>
void merge_attention_fwd_impl(const MergeAttentionFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* out_a = static_cast<const scalar_t*>(params.out_a);
  const auto* out_b = static_cast<const scalar_t*>(params.out_b);
  const auto* lse_a = static_cast<const acc_t*>(params.lse_a);
  const auto* lse_b = static_cast<const acc_t*>(params.lse_b);
  auto* out = static_cast<scalar_t*>(params.out);
  auto* lse = static_cast<acc_t*>(params.lse);
  const int64_t dim = params.head_dim;
  const bool stream = streamed<scalar_t>(params.rows, dim);

  at::parallel_for(0, params.rows, rows_per_task(dim), [&](int64_t row_begin, int64_t row_end) {
    acc_t weight_a[kRowBlock], weight_b[kRowBlock];
    for_row_blocks(row_begin, row_end, [&](int64_t block, int64_t rows) {
      merge_weights(lse_a + block, lse_b + block, rows, lse + block, weight_a, weight_b);
      blend_rows(out_a, weight_a, out_b, weight_b, out, block, rows, dim, stream);
    });
    if (stream) {
      stream_fence();
    }
  });
}

template <typename scalar_t>
void merge_attention_bwd_impl(const MergeAttentionBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  const auto* out_a = static_cast<const scalar_t*>(params.out_a);
  const auto* out_b = static_cast<const scalar_t*>(params.out_b);
  const auto* dlse = static_cast<const acc_t*>(params.dlse);
  const auto* lse_a = static_cast<const acc_t*>(params.lse_a);
  const auto* lse_b = static_cast<const acc_t*>(params.lse_b);
  const auto* lse = static_cast<const acc_t*>(params.lse);
  auto* d_out_a = static_cast<scalar_t*>(params.d_out_a);
  auto* d_out_b = static_cast<scalar_t*>(params.d_out_b);
  auto* d_lse_a = static_cast<acc_t*>(params.d_lse_a);
  auto* d_lse_b = static_cast<acc_t*>(params.d_lse_b);
  const int64_t dim = params.head_dim;
  const bool stream = streamed<scalar_t>(params.rows, dim);

  at::parallel_for(0, params.rows, rows_per_task(dim), [&](int64_t row_begin, int64_t row_end) {
    acc_t dout_buffer[kTile], a_buffer[kTile], b_buffer[kTile];  // used by half types only
    acc_t da_buffer[kTile], db_buffer[kTile];  // half types, streamed outputs
    acc_t weight_a[kRowBlock], weight_b[kRowBlock], dot_diff[kRowBlock];
    for_row_blocks(row_begin, row_end, [&](int64_t block, int64_t rows) {
      side_weights(lse_a + block, lse_b + block, lse + block, rows, weight_a, weight_b);
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t wa = weight_a[r], wb = weight_b[r];
        const int64_t row_offset = (block + r) * dim;
        // One pass: the d_out tiles need only the weights, the dot products only the inputs.
        acc_t dot_a = 0;  // sum_d dout * out_a
        acc_t dot_b = 0;  // sum_d dout * out_b
        for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
          const int64_t n = std::min(kTile, dim - d0);
          const acc_t* g = load_row(dout + row_offset + d0, n, dout_buffer);
          const acc_t* a = load_row(out_a + row_offset + d0, n, a_buffer);
          const acc_t* b = load_row(out_b + row_offset + d0, n, b_buffer);
          acc_t* da = tile_target(d_out_a + row_offset + d0, da_buffer, stream);
          acc_t* db = tile_target(d_out_b + row_offset + d0, db_buffer, stream);
          acc_t tile_dot_a = 0, tile_dot_b = 0;
#pragma omp simd reduction(+ : tile_dot_a, tile_dot_b)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t grad = g[i];
            tile_dot_a += grad * a[i];
            tile_dot_b += grad * b[i];
            da[i] = wa * grad;
            db[i] = wb * grad;
          }
          dot_a += tile_dot_a;
          dot_b += tile_dot_b;
          store_tile(d_out_a + row_offset + d0, da, n, stream);
          store_tile(d_out_b + row_offset + d0, db, n, stream);
        }
        dot_diff[r] = dot_a - dot_b;
      }
      // wa (dlse + pa - (wa pa + wb pb)) with wa + wb = 1, written without the cancelling
      // difference (the same form as the CUDA and Triton kernels); exact 0 / dlse on empty sides.
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t wa = weight_a[r], wb = weight_b[r], d = dlse[block + r];
        d_lse_a[block + r] = wa * madd(wb, dot_diff[r], d);
        d_lse_b[block + r] = wb * madd(-wa, dot_diff[r], d);
      }
    });
    if (stream) {
      stream_fence();
    }
  });
}

template <typename scalar_t>
void gated_merge_fwd_impl(const GatedMergeFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* out_local = static_cast<const scalar_t*>(params.out_local);
  const auto* out_mem = static_cast<const scalar_t*>(params.out_mem);
  const auto* gate = static_cast<const scalar_t*>(params.gate);
  auto* out = static_cast<scalar_t*>(params.out);
  const int64_t dim = params.head_dim;
  const bool stream = streamed<scalar_t>(params.rows, dim);

  at::parallel_for(0, params.rows, rows_per_task(dim), [&](int64_t row_begin, int64_t row_end) {
    acc_t gates[kRowBlock], one_minus_gates[kRowBlock];
    for_row_blocks(row_begin, row_end, [&](int64_t block, int64_t rows) {
      gate_weights(gate + block, rows, gates, one_minus_gates);
      blend_rows(out_mem, gates, out_local, one_minus_gates, out, block, rows, dim, stream);
    });
    if (stream) {
      stream_fence();
    }
  });
}

template <typename scalar_t>
void gated_merge_bwd_impl(const GatedMergeBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  const auto* out_local = static_cast<const scalar_t*>(params.out_local);
  const auto* out_mem = static_cast<const scalar_t*>(params.out_mem);
  const auto* gate = static_cast<const scalar_t*>(params.gate);
  auto* d_local = static_cast<scalar_t*>(params.d_local);
  auto* d_mem = static_cast<scalar_t*>(params.d_mem);
  auto* d_gate = static_cast<acc_t*>(params.d_gate);
  const int64_t dim = params.head_dim;
  const bool stream = streamed<scalar_t>(params.rows, dim);

  at::parallel_for(0, params.rows, rows_per_task(dim), [&](int64_t row_begin, int64_t row_end) {
    acc_t dout_buffer[kTile], local_buffer[kTile], mem_buffer[kTile];  // used by half types only
    acc_t d_local_buffer[kTile], d_mem_buffer[kTile];  // half types, streamed outputs
    acc_t gates[kRowBlock], one_minus_gates[kRowBlock];
    for_row_blocks(row_begin, row_end, [&](int64_t block, int64_t rows) {
      gate_weights(gate + block, rows, gates, one_minus_gates);
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t g = gates[r], one_minus_g = one_minus_gates[r];
        const int64_t row_offset = (block + r) * dim;
        acc_t dot_diff = 0;  // sum_d dout * (out_mem - out_local)
        for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
          const int64_t n = std::min(kTile, dim - d0);
          const acc_t* grad_out = load_row(dout + row_offset + d0, n, dout_buffer);
          const acc_t* local = load_row(out_local + row_offset + d0, n, local_buffer);
          const acc_t* mem = load_row(out_mem + row_offset + d0, n, mem_buffer);
          acc_t* dl = tile_target(d_local + row_offset + d0, d_local_buffer, stream);
          acc_t* dm = tile_target(d_mem + row_offset + d0, d_mem_buffer, stream);
          acc_t tile_dot = 0;
#pragma omp simd reduction(+ : tile_dot)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t grad = grad_out[i];
            tile_dot += grad * (mem[i] - local[i]);
            dl[i] = one_minus_g * grad;
            dm[i] = g * grad;
          }
          dot_diff += tile_dot;
          store_tile(d_local + row_offset + d0, dl, n, stream);
          store_tile(d_mem + row_offset + d0, dm, n, stream);
        }
        d_gate[block + r] = g * one_minus_g * dot_diff;
      }
    });
    if (stream) {
      stream_fence();
    }
  });
}

}  // namespace

L2M_CPU_LAUNCHER(merge_attention_fwd, MergeAttentionFwdParams, merge_attention_fwd_impl)
L2M_CPU_LAUNCHER(merge_attention_bwd, MergeAttentionBwdParams, merge_attention_bwd_impl)
L2M_CPU_LAUNCHER(gated_merge_fwd, GatedMergeFwdParams, gated_merge_fwd_impl)
L2M_CPU_LAUNCHER(gated_merge_bwd, GatedMergeBwdParams, gated_merge_bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
