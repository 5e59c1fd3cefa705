// Row addressing of the (B, H, T, D) operands of the CPU kernels of l2m-kernels.
//
// Queries, keys and output gradients arrive as models produce them: a projection viewed as
// (B, T, H, D) and transposed to (B, H, T, D), a slice of a longer sequence, a tensor broadcast
// over heads with stride 0. The kernels read such operands in place when their last dimension is
// contiguous (stride 1): a Rows gives where row (b, h, t) starts, rows numbered as in a
// contiguous tensor, (b * H + h) * T + t. Outputs are always allocated contiguous.
#pragma once

#include <cstdint>

namespace l2m::cpu {

struct Rows {
  int64_t heads = 1;         // H
  int64_t seq_len = 1;       // T
  int64_t batch_stride = 0;  // element strides of dimensions 0, 1 and 2
  int64_t head_stride = 0;
  int64_t time_stride = 0;
  bool dense = true;  // rows back to back: row r starts at r * time_stride

  // A contiguous (B, H, T, dim) tensor.
  static Rows contiguous(int64_t heads, int64_t seq_len, int64_t dim) {
    return {heads, seq_len, heads * seq_len * dim, seq_len * dim, dim, true};
  }

  // A (B, H, T, D) tensor with these element strides of dimensions 0-2 (dimension 3's is 1)
  // that is not contiguous (the bindings test that with at::Tensor::is_contiguous).
  static Rows strided(int64_t heads, int64_t seq_len, int64_t batch_stride, int64_t head_stride,
                      int64_t time_stride) {
    return {heads, seq_len, batch_stride, head_stride, time_stride, false};
  }

  // The element offset of row `row` = (b * H + h) * T + t.
  int64_t offset(int64_t row) const {
    if (dense) {
      return row * time_stride;
    }
    const int64_t bh = row / seq_len, t = row - bh * seq_len;
    const int64_t b = bh / heads, h = bh - b * heads;
    return b * batch_stride + h * head_stride + t * time_stride;
  }
};

}  // namespace l2m::cpu
