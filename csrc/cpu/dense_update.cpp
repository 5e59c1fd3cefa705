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

// Elements per tile: the half-type staging buffers (a few KiB) stay in L1.
constexpr int64_t kTile = 256;
// Elements below which a chunk is not worth handing to another thread.
constexpr int64_t kGrain = 32768;

// n elements of an input from `src` in acc: with step 1 as load_row (in place when the storage is
// the acc type); with step 0 (broadcast along the row) its one element, repeated into `buffer`.
template <typename scalar_t>
inline const acc_type<scalar_t>* load_run(const scalar_t* src, int64_t step, int64_t n,
                                         acc_type<scalar_t>* buffer) {
  if (step == 1) {
    return load_row(src, n, buffer);
  }
  std::fill_n(buffer, n, static_cast<acc_type<scalar_t>>(src[0]));
  return buffer;
}

// Calls tile(offset, n, inputs...) for consecutive runs of at most kTile elements that together
// cover the flat output range [0, numel), in parallel; `inputs` are the four inputs' runs in acc.
// Flat path: every input contiguous, runs of the flat range. Strided path: runs within a row of
// S3 elements, each input read through its layout. Every element is computed by the same code
// whatever the path and the thread count: bitwise the same results.
template <typename scalar_t, typename Params, typename Tile>
void for_each_run(const Params& params, Tile&& tile) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* inputs[4] = {static_cast<const scalar_t*>(params.memory),
                               static_cast<const scalar_t*>(params.update),
                               static_cast<const scalar_t*>(params.input_gate),
                               static_cast<const scalar_t*>(params.forget_gate)};
  const DenseLayout* layouts[4] = {&params.memory_layout, &params.update_layout,
                                   &params.input_gate_layout, &params.forget_gate_layout};
  if (!params.strided) {
    at::parallel_for(0, params.numel, kGrain, [&](int64_t begin, int64_t end) {
      acc_t buffers[4][kTile];  // half types only
      for (int64_t start = begin; start < end; start += kTile) {
        const int64_t n = std::min(kTile, end - start);
        tile(start, n, load_row(inputs[0] + start, n, buffers[0]),
             load_row(inputs[1] + start, n, buffers[1]), load_row(inputs[2] + start, n, buffers[2]),
             load_row(inputs[3] + start, n, buffers[3]));
      }
    });
    return;
  }
  const int64_t row_len = params.row_len;
  if (row_len == 0) {
    return;
  }
  const int64_t rows = params.numel / row_len;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / row_len), [&](int64_t begin, int64_t end) {
    acc_t buffers[4][kTile];  // half types, and inputs broadcast along the row
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* row_start[4];
      for (int i = 0; i < 4; ++i) {
        row_start[i] = inputs[i] + layouts[i]->rows.offset(row);
      }
      for (int64_t col = 0; col < row_len; col += kTile) {
        const int64_t n = std::min(kTile, row_len - col);
        const acc_t* runs[4];
        for (int i = 0; i < 4; ++i) {
          runs[i] = load_run(row_start[i] + col * layouts[i]->step, layouts[i]->step, n, buffers[i]);
        }
        tile(row * row_len + col, n, runs[0], runs[1], runs[2], runs[3]);
      }
    }
  });
}

template <typename scalar_t>
void fwd_impl(const GatedDenseUpdateFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  auto* out = static_cast<scalar_t*>(params.out);
  for_each_run<scalar_t>(params, [&](int64_t offset, int64_t n, const acc_t* m, const acc_t* u,
                                     const acc_t* ig, const acc_t* fg) {
    acc_t out_buf[kTile];  // half types
    acc_t* result;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      result = out + offset;
    } else {
      result = out_buf;
    }
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      result[k] = madd(vsigmoid(fg[k]), m[k], vsigmoid(ig[k]) * vtanh(u[k]));
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      from_acc(out_buf, out + offset, n);
    }
  });
}

template <typename scalar_t>
void bwd_impl(const GatedDenseUpdateBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  auto* dmemory = static_cast<acc_t*>(params.dmemory);
  auto* dupdate = static_cast<acc_t*>(params.dupdate);
  auto* dinput_gate = static_cast<acc_t*>(params.dinput_gate);
  auto* dforget_gate = static_cast<acc_t*>(params.dforget_gate);
  for_each_run<scalar_t>(params, [&](int64_t offset, int64_t n, const acc_t* m, const acc_t* u,
                                     const acc_t* ig, const acc_t* fg) {
    acc_t g_buf[kTile];  // half types
    const acc_t* g = load_row(dout + offset, n, g_buf);
    acc_t* dm = dmemory + offset;
    acc_t* du = dupdate + offset;
    acc_t* di = dinput_gate + offset;
    acc_t* df = dforget_gate + offset;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const acc_t sf = vsigmoid(fg[k]);
      const acc_t si = vsigmoid(ig[k]);
      const acc_t th = vtanh(u[k]);
      const acc_t grad = g[k];
      dm[k] = grad * sf;
      du[k] = grad * si * madd(-th, th, acc_t(1));
      di[k] = grad * th * si * (acc_t(1) - si);
      df[k] = grad * m[k] * sf * (acc_t(1) - sf);
    }
  });
}

}  // namespace

L2M_CPU_LAUNCHER(gated_dense_update_fwd, GatedDenseUpdateFwdParams, fwd_impl)
L2M_CPU_LAUNCHER(gated_dense_update_bwd, GatedDenseUpdateBwdParams, bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
