// CPU kernels of the gated dense update (interface: dense_update.h).
//
// Purely elementwise and bound by memory bandwidth: threads split the flat element range into
// fixed chunks (at::parallel_for, so torch.set_num_threads applies and small calls stay on the
// calling thread); each chunk is walked in tiles whose inner loops are `omp simd` (with -fopenmp,
// glibc's vector exp/tanh serve them). Half types are converted to float in small stack buffers so
// those loops see plain float arrays; float and double are used in place. Every element is
// computed by the same code whatever the thread count: bitwise deterministic.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "dense_update.h"
#include "convert.h"

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

template <typename acc_t>
inline acc_t sigmoid(acc_t logit) {
  // exp(-logit) overflows to inf for very negative logits: 1 / inf = 0, the right limit.
  return acc_t(1) / (acc_t(1) + std::exp(-logit));
}

template <typename scalar_t>
void fwd_impl(const GatedDenseUpdateFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* memory = static_cast<const scalar_t*>(params.memory);
  const auto* update = static_cast<const scalar_t*>(params.update);
  const auto* input_gate = static_cast<const scalar_t*>(params.input_gate);
  const auto* forget_gate = static_cast<const scalar_t*>(params.forget_gate);
  auto* out = static_cast<scalar_t*>(params.out);

  at::parallel_for(0, params.numel, kGrain, [&](int64_t begin, int64_t end) {
    acc_t m_buf[kTile], u_buf[kTile], i_buf[kTile], f_buf[kTile], out_buf[kTile];  // half types
    for (int64_t start = begin; start < end; start += kTile) {
      const int64_t n = std::min(kTile, end - start);
      const acc_t* m = load_row(memory + start, n, m_buf);
      const acc_t* u = load_row(update + start, n, u_buf);
      const acc_t* ig = load_row(input_gate + start, n, i_buf);
      const acc_t* fg = load_row(forget_gate + start, n, f_buf);
      acc_t* result;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        result = out + start;
      } else {
        result = out_buf;
      }
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        result[k] = sigmoid(fg[k]) * m[k] + sigmoid(ig[k]) * std::tanh(u[k]);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        from_acc(out_buf, out + start, n);
      }
    }
  });
}

template <typename scalar_t>
void bwd_impl(const GatedDenseUpdateBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const auto* dout = static_cast<const scalar_t*>(params.dout);
  const auto* memory = static_cast<const scalar_t*>(params.memory);
  const auto* update = static_cast<const scalar_t*>(params.update);
  const auto* input_gate = static_cast<const scalar_t*>(params.input_gate);
  const auto* forget_gate = static_cast<const scalar_t*>(params.forget_gate);
  auto* dmemory = static_cast<acc_t*>(params.dmemory);
  auto* dupdate = static_cast<acc_t*>(params.dupdate);
  auto* dinput_gate = static_cast<acc_t*>(params.dinput_gate);
  auto* dforget_gate = static_cast<acc_t*>(params.dforget_gate);

  at::parallel_for(0, params.numel, kGrain, [&](int64_t begin, int64_t end) {
    acc_t g_buf[kTile], m_buf[kTile], u_buf[kTile], i_buf[kTile], f_buf[kTile];  // half types
    for (int64_t start = begin; start < end; start += kTile) {
      const int64_t n = std::min(kTile, end - start);
      const acc_t* g = load_row(dout + start, n, g_buf);
      const acc_t* m = load_row(memory + start, n, m_buf);
      const acc_t* u = load_row(update + start, n, u_buf);
      const acc_t* ig = load_row(input_gate + start, n, i_buf);
      const acc_t* fg = load_row(forget_gate + start, n, f_buf);
      acc_t* dm = dmemory + start;
      acc_t* du = dupdate + start;
      acc_t* di = dinput_gate + start;
      acc_t* df = dforget_gate + start;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const acc_t sf = sigmoid(fg[k]);
        const acc_t si = sigmoid(ig[k]);
        const acc_t th = std::tanh(u[k]);
        const acc_t grad = g[k];
        dm[k] = grad * sf;
        du[k] = grad * si * (acc_t(1) - th * th);
        di[k] = grad * th * si * (acc_t(1) - si);
        df[k] = grad * m[k] * sf * (acc_t(1) - sf);
      }
    }
  });
}

}  // namespace

void gated_dense_update_fwd(const GatedDenseUpdateFwdParams& params) {
  dispatch_floating(params.dtype, "gated_dense_update_fwd", [&](auto tag) {
    fwd_impl<decltype(tag)>(params);
  });
}

void gated_dense_update_bwd(const GatedDenseUpdateBwdParams& params) {
  dispatch_floating(params.dtype, "gated_dense_update_bwd", [&](auto tag) {
    bwd_impl<decltype(tag)>(params);
  });
}

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
