// CPU kernels of the gated dense update (interface: dense_update.h).
//
// Purely elementwise and bound by memory bandwidth: threads split the flat element range (or, when
// an input is strided or broadcast, the rows of the broadcast shape) into fixed chunks
// (at::parallel_for, so torch.set_num_threads applies and small calls stay on the calling thread);
// each chunk is walked in tiles whose inner loops are `omp simd`, with the vectorisable exp and tanh
// of vmath.h and every multiply-add explicit (madd), so that an element gets the same bits in a
// loop's vector body and in its remainder, whichever the tile it falls in. Half types, and inputs broadcast along a row, are converted to acc in small
// stack buffers so those loops see plain arrays; float and double rows are used in place. Every
// element is computed by the same code whatever the path and the thread count: bitwise
// deterministic.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "dense_update.h"
#include "convert.h"
#include "vmath.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// Elements per tile: the staging buffers (a few KiB) stay in L1.
constexpr int64_t kTile = 256;
// Elements below which a chunk is not worth handing to another thread.
constexpr int64_t kGrain = 32768;
// Lanes of a row sum (RowSums).
constexpr int kLanes = 16;

// n gate logits from `src` as sigmoids in acc, into `buffer`.
template <typename scalar_t>
inline const acc_type<scalar_t>* load_sigmoids(const scalar_t* src, int64_t n,
                                              acc_type<scalar_t>* buffer) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* logits = load_row(src, n, buffer);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    buffer[k] = vsigmoid(logits[k]);
  }
  return buffer;
}

// The gradient sums along a row of the inputs broadcast along it (their outputs hold one value per
// row): lane j of an input adds the row's elements j, j + kLanes, j + 2 kLanes, ... in order, and
// the lanes are added pairwise at the row's end. A fixed order, whatever the thread count or the
// instruction-set variant (the lanes are independent: no reassociation is needed to vectorise).
template <typename acc_t>
struct RowSums {
  acc_t lanes[4][kLanes];

  void clear() { std::fill_n(&lanes[0][0], 4 * kLanes, acc_t(0)); }
  void add(int input, const acc_t* values, int64_t n) {
    acc_t* lane = lanes[input];
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        lane[j] += values[k + j];
      }
    }
    for (int j = 0; k + j < n; ++j) {
      lane[j] += values[k + j];
    }
  }
  acc_t total(int input) {
    acc_t* lane = lanes[input];
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int j = 0; j < width; ++j) {
        lane[j] += lane[j + width];
      }
    }
    return lane[0];
  }
};

// One value for every index: a gate broadcast along the row, handed to a tile as its sigmoid
// without filling a run with it.
template <typename acc_t>
struct Broadcast {
  acc_t value;
  acc_t operator[](int64_t) const { return value; }
};

// Calls tile(offset, n, m, u, si, sf, sums) for consecutive runs of at most kTile elements that
// together cover the flat output range [0, numel), in parallel: m and u are memory's and update's
// runs in acc, si and sf the sigmoids of the gates' runs, `sums` the RowSums of the calling thread
// (strided path only, else null), and row_end(row, sums) after each row of the strided path.
// Flat path: every input contiguous, runs of the flat range. Strided path: runs within a row of
// S3 elements, each input read through its layout; a gate broadcast along the row has its sigmoid
// taken once per row, and when both are, they reach the tile as Broadcast values (si and sf are
// then Broadcast<acc_t>, else acc_t pointers: tile is generic in them). Every element is computed
// by the same code whatever the path and the thread count: bitwise the same results.
template <typename scalar_t, typename Params, typename Tile, typename RowEnd>
void for_each_run(const Params& params, Tile&& tile, RowEnd&& row_end) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* inputs[4] = {static_cast<const scalar_t*>(params.memory),
                               static_cast<const scalar_t*>(params.update),
                               static_cast<const scalar_t*>(params.input_gate),
                               static_cast<const scalar_t*>(params.forget_gate)};
  const DenseLayout* layouts[4] = {&params.memory_layout, &params.update_layout,
                                   &params.input_gate_layout, &params.forget_gate_layout};
  if (!params.strided) {
    at::parallel_for(0, params.numel, kGrain, [&](int64_t begin, int64_t end) {
      acc_t buffers[4][kTile];  // half types, and the sigmoids
      for (int64_t start = begin; start < end; start += kTile) {
        const int64_t n = std::min(kTile, end - start);
        tile(start, n, load_row(inputs[0] + start, n, buffers[0]),
             load_row(inputs[1] + start, n, buffers[1]),
             load_sigmoids(inputs[2] + start, n, buffers[2]),
             load_sigmoids(inputs[3] + start, n, buffers[3]), static_cast<RowSums<acc_t>*>(nullptr));
      }
      stream_fence();  // the tiles' streaming stores, before another thread reads them
    });
    return;
  }
  const int64_t row_len = params.row_len;
  if (row_len == 0) {
    return;
  }
  const int64_t rows = params.numel / row_len;
  const bool gates_broadcast = layouts[2]->step == 0 && layouts[3]->step == 0;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / row_len), [&](int64_t begin, int64_t end) {
    acc_t buffers[4][kTile];  // half types, the sigmoids, and inputs broadcast along the row
    RowSums<acc_t> sums;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* row_start[4];
      for (int i = 0; i < 4; ++i) {
        row_start[i] = inputs[i] + layouts[i]->rows.offset(row);
      }
      sums.clear();
      acc_t row_values[4];
      for (int i = 0; i < 4; ++i) {  // an input broadcast along the row: one value, once
        if (layouts[i]->step == 0) {
          const acc_t value = static_cast<acc_t>(row_start[i][0]);
          row_values[i] = i < 2 ? value : vsigmoid(value);
          if (!gates_broadcast || i < 2) {
            std::fill_n(buffers[i], std::min(kTile, row_len), row_values[i]);
          }
        }
      }
      for (int64_t col = 0; col < row_len; col += kTile) {
        const int64_t n = std::min(kTile, row_len - col);
        const acc_t* runs[4];
        for (int i = 0; i < (gates_broadcast ? 2 : 4); ++i) {
          const scalar_t* src = row_start[i] + col;
          runs[i] = layouts[i]->step == 0 ? buffers[i]
                    : i < 2              ? load_row(src, n, buffers[i])
                                         : load_sigmoids(src, n, buffers[i]);
        }
        if (gates_broadcast) {
          tile(row * row_len + col, n, runs[0], runs[1], Broadcast<acc_t>{row_values[2]},
               Broadcast<acc_t>{row_values[3]}, &sums);
        } else {
          tile(row * row_len + col, n, runs[0], runs[1], runs[2], runs[3], &sums);
        }
      }
      row_end(row, sums);
    }
    stream_fence();
  });
}

template <typename scalar_t>
void fwd_impl(const GatedDenseUpdateFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  auto* out = static_cast<scalar_t*>(params.out);
  const bool stream = stream_output(params.numel * static_cast<int64_t>(sizeof(scalar_t)));
  for_each_run<scalar_t>(
      params,
      [&](int64_t offset, int64_t n, const acc_t* m, const acc_t* u, auto si, auto sf,
          RowSums<acc_t>*) {
        acc_t out_buf[kTile];  // half types, and streamed outputs
        acc_t* result = tile_target(out + offset, out_buf, stream);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          result[k] = madd(sf[k], m[k], si[k] * vtanh(u[k]));
        }
        store_tile(out + offset, result, n, stream);
      },
      [](int64_t, RowSums<acc_t>&) {});
}

template <typename scalar_t>
void bwd_impl(const GatedDenseUpdateBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  acc_t* grads[4] = {static_cast<acc_t*>(params.dmemory), static_cast<acc_t*>(params.dupdate),
                     static_cast<acc_t*>(params.dinput_gate), static_cast<acc_t*>(params.dforget_gate)};
  const bool* row_sums = params.row_sums;
  const bool stream = stream_output(params.numel * static_cast<int64_t>(sizeof(acc_t)));
  for_each_run<scalar_t>(
      params,
      [&](int64_t offset, int64_t n, const acc_t* m, const acc_t* u, auto si, auto sf,
          RowSums<acc_t>* sums) {
        acc_t g_buf[kTile];  // half types
        acc_t staged[4][kTile];  // the gradients summed along the row, and streamed ones
        const acc_t* g = load_row(dout + offset, n, g_buf);
        acc_t* d[4];
        for (int i = 0; i < 4; ++i) {
          d[i] = tile_target(grads[i] + offset, staged[i], row_sums[i] || stream);
        }
        acc_t* dm = d[0];
        acc_t* du = d[1];
        acc_t* di = d[2];
        acc_t* df = d[3];
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const acc_t th = vtanh(u[k]);
          const acc_t grad = g[k];
          dm[k] = grad * sf[k];
          du[k] = grad * si[k] * madd(-th, th, acc_t(1));
          di[k] = grad * th * si[k] * (acc_t(1) - si[k]);
          df[k] = grad * m[k] * sf[k] * (acc_t(1) - sf[k]);
        }
        for (int i = 0; i < 4; ++i) {
          if (row_sums[i]) {
            sums->add(i, staged[i], n);
          } else {
            store_tile(grads[i] + offset, d[i], n, stream);
          }
        }
      },
      [&](int64_t row, RowSums<acc_t>& sums) {
        for (int i = 0; i < 4; ++i) {
          if (row_sums[i]) {
            grads[i][row] = sums.total(i);
          }
        }
      });
}

}  // namespace

L2M_CPU_LAUNCHER(gated_dense_update_fwd, GatedDenseUpdateFwdParams, fwd_impl)
L2M_CPU_LAUNCHER(gated_dense_update_bwd, GatedDenseUpdateBwdParams, bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
