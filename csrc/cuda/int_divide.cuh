// Division of unsigned 64-bit integers by a divisor fixed at launch, by a multiply-high
// (Granlund & Montgomery, "Division by Invariant Integers using Multiplication", 1994, fig. 4.1),
// shared by the gated memory write and dense update kernels (memory_write.cu, dense_update.cu).
//
// Why: a 64-bit `/` or `%` in device code is a called subroutine in SASS; besides its ~70
// instructions its calling convention gave one of the write kernels a stack frame and spills.
// This form is exact for every 64-bit dividend and any divisor in [1, 2**63): with
// l = ceil(log2 d) and m = floor(2**64 * (2**l - d) / d) + 1 (which fits in 64 bits),
//   t = mulhi(m, n);  n / d = (t + ((n - t) >> 1)) >> (l - 1)   (d >= 2; d == 1 is n itself).
//
// No torch headers (see merge.h). Host: IntDivider::make (needs unsigned __int128: gcc / clang).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace l2m {
namespace cuda {

struct IntDivider {
  uint64_t divisor;
  uint64_t multiplier;
  int shift;  // l - 1; -1 for divisor 1

  // divisor >= 1 (a non-positive divisor is treated as 1: callers never divide by sizes of 0).
  static inline IntDivider make(int64_t value) {
    IntDivider d;
    d.divisor = value > 1 ? static_cast<uint64_t>(value) : 1u;
    if (d.divisor == 1) {
      d.multiplier = 0;
      d.shift = -1;
      return d;
    }
    int l = 0;
    while (l < 64 && (uint64_t{1} << l) < d.divisor) ++l;
    const unsigned __int128 numerator =
        (static_cast<unsigned __int128>(1) << 64) *
        static_cast<unsigned __int128>((l == 64 ? 0 : (uint64_t{1} << l)) - d.divisor);
    d.multiplier = static_cast<uint64_t>(numerator / d.divisor + 1);
    d.shift = l - 1;
    return d;
  }

  __device__ __forceinline__ uint64_t quotient(uint64_t n) const {
    if (shift < 0) return n;
    const uint64_t high = __umul64hi(multiplier, n);
    return (high + ((n - high) >> 1)) >> shift;
  }

  // q = n / divisor and r = n - q * divisor.
  __device__ __forceinline__ uint64_t divmod(uint64_t n, uint64_t& remainder) const {
    const uint64_t q = quotient(n);
    remainder = n - q * divisor;
    return q;
  }
};

}  // namespace cuda
}  // namespace l2m
