// SIMD vectors of the accumulation type for the CPU kernels (topk_read.cpp, product_key.cpp).
//
// Lanes<acc_t> (acc_t float or double): vec, kWidth lanes, mask (a bit per lane),
// zero/load/broadcast/fma/mul/store, passes(score, threshold): the mask of lanes where
// !(score <= threshold), i.e. above the threshold or NaN, and at_or_above(kept, rank): lanes where
// !(kept < rank). The instruction set is the compiling variant's (isa.h): AVX-512 (zmm), AVX2 with
// FMA (ymm), else plain arrays of 32 bytes that the compiler may vectorise. L2M_SIMD_REGISTERS
// names the register file (32 zmm, 16 ymm, 0 for the fallback), from which each kernel sizes its
// register tiles.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

template <typename acc_t>
struct Lanes;

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Lanes<acc_t> on the vector type vec_t, from the intrinsics' names: `prefix` _mm512 or _mm256,
// `suffix` ps (float) or pd (double); L2M_LANES_COMPARE (per instruction set) makes the masks.
#define L2M_LANES_OF(acc_t, vec_t, prefix, suffix)                                    \
  template <>                                                                        \
  struct Lanes<acc_t> {                                                              \
    using vec = vec_t;                                                               \
    using mask = uint32_t;                                                           \
    static constexpr int kWidth = static_cast<int>(sizeof(vec_t) / sizeof(acc_t));   \
    static vec zero() { return prefix##_setzero_##suffix(); }                        \
    static vec load(const acc_t* p) { return prefix##_loadu_##suffix(p); }           \
    static vec broadcast(acc_t x) { return prefix##_set1_##suffix(x); }              \
    static vec fma(vec a, vec b, vec c) { return prefix##_fmadd_##suffix(a, b, c); } \
    static vec mul(vec a, vec b) { return prefix##_mul_##suffix(a, b); }             \
    static void store(acc_t* p, vec v) { prefix##_storeu_##suffix(p, v); }           \
    static mask passes(vec s, vec t) {                                               \
      return L2M_LANES_COMPARE(suffix, s, t, _CMP_NLE_UQ);                           \
    }                                                                                \
    static mask at_or_above(vec s, vec t) {                                          \
      return L2M_LANES_COMPARE(suffix, s, t, _CMP_NLT_UQ);                           \
    }                                                                                \
  };

#if defined(__AVX512F__)
#define L2M_SIMD_REGISTERS 32
// AVX-512 comparisons give a mask register.
#define L2M_LANES_COMPARE(suffix, s, t, predicate) _mm512_cmp_##suffix##_mask(s, t, predicate)
L2M_LANES_OF(float, __m512, _mm512, ps)
L2M_LANES_OF(double, __m512d, _mm512, pd)
#else
#define L2M_SIMD_REGISTERS 16
// AVX2 comparisons give all-ones / all-zeros lanes, which movemask gathers into bits.
#define L2M_LANES_COMPARE(suffix, s, t, predicate) \
  static_cast<uint32_t>(_mm256_movemask_##suffix(_mm256_cmp_##suffix(s, t, predicate)))
L2M_LANES_OF(float, __m256, _mm256, ps)
L2M_LANES_OF(double, __m256d, _mm256, pd)
#endif
#undef L2M_LANES_COMPARE
#undef L2M_LANES_OF
#else
#define L2M_SIMD_REGISTERS 0
// Portable fallback: plain arrays the compiler may vectorise. Where the target has FMA, std::fma
// keeps every score one rounding per step, as in the SIMD paths.
template <typename acc_t>
struct Lanes {
  static constexpr int kWidth = 32 / static_cast<int>(sizeof(acc_t));
  struct vec {
    acc_t lane[kWidth];
  };
  using mask = uint32_t;
  static vec zero() { return broadcast(acc_t(0)); }
  static vec load(const acc_t* p) {
    vec v;
    for (int i = 0; i < kWidth; ++i) v.lane[i] = p[i];
    return v;
  }
  static vec broadcast(acc_t x) {
    vec v;
    for (int i = 0; i < kWidth; ++i) v.lane[i] = x;
    return v;
  }
  static vec fma(const vec& a, const vec& b, const vec& c) {
    vec v;
#if defined(__FMA__)
    for (int i = 0; i < kWidth; ++i) v.lane[i] = std::fma(a.lane[i], b.lane[i], c.lane[i]);
#else
    // Without FMA instructions std::fma is a library call per element (tens of times slower than
    // the loop itself): a multiply and an add, rounding twice, within every backend's tolerance.
    for (int i = 0; i < kWidth; ++i) v.lane[i] = a.lane[i] * b.lane[i] + c.lane[i];
#endif
    return v;
  }
  static vec mul(const vec& a, const vec& b) {
    vec v;
    for (int i = 0; i < kWidth; ++i) v.lane[i] = a.lane[i] * b.lane[i];
    return v;
  }
  static void store(acc_t* p, const vec& v) {
    for (int i = 0; i < kWidth; ++i) p[i] = v.lane[i];
  }
  static mask passes(const vec& s, const vec& t) {
    mask bits = 0;
    for (int i = 0; i < kWidth; ++i) bits |= mask(!(s.lane[i] <= t.lane[i])) << i;
    return bits;
  }
  static mask at_or_above(const vec& s, const vec& t) {
    mask bits = 0;
    for (int i = 0; i < kWidth; ++i) bits |= mask(!(s.lane[i] < t.lane[i])) << i;
    return bits;
  }
};
#endif

}  // namespace
}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
