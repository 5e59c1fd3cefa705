// Register-blocked matrix products and tile helpers of the CPU attention kernels
// (local_attention.cpp, block_memory.cpp): SIMD vectors of the target's register width, the
// micro-kernel gemm (C (+)= A B on row-major tiles padded to the vector width), the accumulation
// type's exp that `omp simd` loops vectorise, and the loads that stage rows of q, k, v as padded
// or transposed accumulation-type tiles. Included by kernel sources only (after isa.h): everything
// here is per instruction-set variant and private to the including file.
#pragma once

#include "isa.h"
#include "convert.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// ---- SIMD vectors: GCC/Clang vector extensions of the target's register width (one zmm under
// AVX-512, one ymm under AVX/AVX2, one xmm otherwise), so one source serves every -march ----

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
// kRowBlock x kMaxVecs accumulators (24 of 32 zmm) + kMaxVecs B vectors + 1 broadcast.
constexpr int64_t kRowBlock = 6;
constexpr int64_t kMaxVecs = 4;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
// 16 ymm: 2 x 4 accumulators + 4 B vectors + 1 broadcast.
constexpr int64_t kRowBlock = 2;
constexpr int64_t kMaxVecs = 4;
#else
constexpr int kVectorBytes = 16;
constexpr int64_t kRowBlock = 2;
constexpr int64_t kMaxVecs = 4;
#endif

typedef float f32_vec __attribute__((vector_size(kVectorBytes)));
typedef float f32_vec_unaligned __attribute__((vector_size(kVectorBytes), aligned(4), may_alias));
typedef double f64_vec __attribute__((vector_size(kVectorBytes)));
typedef double f64_vec_unaligned __attribute__((vector_size(kVectorBytes), aligned(8), may_alias));

template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  using vec = f32_vec;
  using unaligned = f32_vec_unaligned;
  static constexpr int64_t kWidth = kVectorBytes / sizeof(float);
};
template <>
struct Simd<double> {
  using vec = f64_vec;
  using unaligned = f64_vec_unaligned;
  static constexpr int64_t kWidth = kVectorBytes / sizeof(double);
};

template <typename acc_t>
inline typename Simd<acc_t>::vec load_vec(const acc_t* p) {
  return *reinterpret_cast<const typename Simd<acc_t>::unaligned*>(p);
}

template <typename acc_t>
inline void store_vec(acc_t* p, typename Simd<acc_t>::vec value) {
  *reinterpret_cast<typename Simd<acc_t>::unaligned*>(p) = value;
}

// Keys per score tile: kMaxVecs vectors, so a row of a score tile is one register block of the
// micro-kernel (64 float32 keys under AVX-512).
template <typename acc_t>
constexpr int64_t kKeyTile = kMaxVecs * Simd<acc_t>::kWidth;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// ---- micro-kernels ----

// C[kRows x kVecs*W] (+)= A[kRows x depth] * B[depth x kVecs*W]; row-major with leading dims.
template <typename acc_t, int64_t kRows, int64_t kVecs>
inline void gemm_block(int64_t depth, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                       acc_t* c, int64_t ldc, bool accumulate) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int64_t W = Simd<acc_t>::kWidth;
  vec sum[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t v = 0; v < kVecs; ++v) {
      sum[r][v] = accumulate ? load_vec(c + r * ldc + v * W) : vec{};
    }
  }
  for (int64_t d = 0; d < depth; ++d) {
    vec b_vec[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) {
      b_vec[v] = load_vec(b + d * ldb + v * W);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
      // Keep the B row in registers: folded into each FMA as a memory operand it would be loaded
      // once per row of the block (kRows times), which makes the loop load-bound.
      __asm__("" : "+v"(b_vec[v]));
#endif
    }
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t a_value = a[r * lda + d];
      for (int64_t v = 0; v < kVecs; ++v) {
        sum[r][v] += a_value * b_vec[v];
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t v = 0; v < kVecs; ++v) {
      store_vec(c + r * ldc + v * W, sum[r][v]);
    }
  }
}

template <typename acc_t, int64_t kRows>
inline void gemm_rows(int64_t vecs, int64_t depth, const acc_t* a, int64_t lda, const acc_t* b,
                      int64_t ldb, acc_t* c, int64_t ldc, bool accumulate) {
  switch (vecs) {
    case 4:
      gemm_block<acc_t, kRows, 4>(depth, a, lda, b, ldb, c, ldc, accumulate);
      break;
    case 3:
      gemm_block<acc_t, kRows, 3>(depth, a, lda, b, ldb, c, ldc, accumulate);
      break;
    case 2:
      gemm_block<acc_t, kRows, 2>(depth, a, lda, b, ldb, c, ldc, accumulate);
      break;
    default:
      gemm_block<acc_t, kRows, 1>(depth, a, lda, b, ldb, c, ldc, accumulate);
  }
}

// gemm_rows for the last rows of gemm, fewer than kRowBlock: rows == kRows, or fewer.
template <typename acc_t, int64_t kRows>
inline void gemm_tail(int64_t rows, int64_t vecs, int64_t depth, const acc_t* a, int64_t lda,
                      const acc_t* b, int64_t ldb, acc_t* c, int64_t ldc, bool accumulate) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      gemm_rows<acc_t, kRows>(vecs, depth, a, lda, b, ldb, c, ldc, accumulate);
    } else {
      gemm_tail<acc_t, kRows - 1>(rows, vecs, depth, a, lda, b, ldb, c, ldc, accumulate);
    }
  }
}

// C[rows x cols] (+)= A[rows x depth] * B[depth x cols]; cols a multiple of the vector width
// (buffers are padded with zeros to it).
template <typename acc_t>
void gemm(int64_t rows, int64_t cols, int64_t depth, const acc_t* a, int64_t lda, const acc_t* b,
          int64_t ldb, acc_t* c, int64_t ldc, bool accumulate) {
  constexpr int64_t W = Simd<acc_t>::kWidth;
  for (int64_t col = 0; col < cols; col += kMaxVecs * W) {
    const int64_t vecs = std::min<int64_t>(kMaxVecs, (cols - col) / W);
    int64_t row = 0;
    for (; row + kRowBlock <= rows; row += kRowBlock) {
      gemm_rows<acc_t, kRowBlock>(vecs, depth, a + row * lda, lda, b + col, ldb,
                                  c + row * ldc + col, ldc, accumulate);
    }
    gemm_tail<acc_t, kRowBlock - 1>(rows - row, vecs, depth, a + row * lda, lda, b + col, ldb,
                                    c + row * ldc + col, ldc, accumulate);
  }
}

// True when every one of the n values is finite (x * 0 is NaN exactly for inf and NaN).
template <typename acc_t>
bool all_finite(const acc_t* x, int64_t n) {
  acc_t probe = 0;
#pragma omp simd reduction(+ : probe)
  for (int64_t i = 0; i < n; ++i) {
    probe += x[i] * acc_t(0);
  }
  return probe == acc_t(0);
}

// exp in float32, written so that `omp simd` loops vectorise it (std::exp does not without
// -ffast-math): Cephes' expf, 2^n * exp(r) with |r| <= ln2 / 2 and a degree-6 polynomial, within
// about 1 ulp of std::exp. -inf gives 0 (and anything below -87.3, where exp would be denormal),
// +inf gives inf, NaN gives NaN.
inline float exp_acc(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: x + it - it rounds x to an integer
  constexpr float kMin = -87.3f;
  constexpr float kMax = 88.3f;
  const float clamped = x < kMin ? kMin : (x > kMax ? kMax : x);  // NaN stays NaN
  const float n = (clamped * kLog2e + kRoundShift) - kRoundShift;
  float r = clamped - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * (r * r) + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &exponent_bits, sizeof(power));
  float result = poly * power;
  result = x < kMin ? 0.0f : result;
  result = x > kMax ? std::numeric_limits<float>::infinity() : result;
  return result;
}

inline double exp_acc(double x) {
  return std::exp(x);
}

// ---- online softmax ----

// One tile's step of a row's online softmax: the row's new running maximum, the shift subtracted
// from the tile's scores before exp (0 while the maximum is -inf, so that masked -inf scores give
// exp 0, not NaN) and the factor that rescales the row's running sum and output (0 from an empty
// start).
template <typename acc_t>
struct SoftmaxStep {
  acc_t new_max;
  acc_t shift;
  acc_t correction;
};

template <typename acc_t>
inline SoftmaxStep<acc_t> softmax_step(acc_t old_max, acc_t tile_max) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t new_max = tile_max > old_max ? tile_max : old_max;
  const acc_t shift = new_max == kNegInf ? acc_t(0) : new_max;
  const acc_t correction = old_max == kNegInf ? acc_t(0) : exp_acc(old_max - new_max);
  return {new_max, shift, correction};
}

// row[0, n) *= correction (nothing to do when it is 1).
template <typename acc_t>
inline void rescale_row(acc_t* row, int64_t n, acc_t correction) {
  if (correction != acc_t(1)) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      row[e] *= correction;
    }
  }
}

// Stores a row's result: out = o_row / sum (n values, rounded once, through `buffer`) and
// lse = row_max + log(sum). sum == 0 (nothing attended, or only -inf scores): out = 0
// (0 * NaN stays NaN), lse = -inf.
template <typename scalar_t>
inline void store_softmax_row(const acc_type<scalar_t>* o_row, int64_t n, acc_type<scalar_t> sum,
                              acc_type<scalar_t> row_max, acc_type<scalar_t>* buffer,
                              scalar_t* out, acc_type<scalar_t>* lse) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv_sum = sum == acc_t(0) ? acc_t(0) : acc_t(1) / sum;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    buffer[e] = o_row[e] * inv_sum;
  }
  store_row(out, buffer, n);
  *lse = sum == acc_t(0) ? -std::numeric_limits<acc_t>::infinity() : row_max + std::log(sum);
}

// ---- tile loads ----

// n elements of `src` as acc_t times `factor` into dst, then zeros up to `padded`.
template <typename scalar_t>
inline void load_padded(const scalar_t* src, int64_t n, int64_t padded, acc_type<scalar_t> factor,
                        acc_type<scalar_t>* staging, acc_type<scalar_t>* dst) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* values = load_row(src, n, staging);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = values[i] * factor;
  }
  std::fill(dst + n, dst + padded, acc_t(0));
}

// Row `index` (of `count` rows) of a tile: the row-major copy (width `padded`) and/or the
// transposed copy (column `index` of a dim x ld_t matrix).
template <typename acc_t>
inline void scatter_transposed(const acc_t* row, int64_t n, int64_t index, acc_t* transposed,
                               int64_t ld_t) {
  for (int64_t d = 0; d < n; ++d) {
    transposed[d * ld_t + index] = row[d];
  }
}

}  // namespace
}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
