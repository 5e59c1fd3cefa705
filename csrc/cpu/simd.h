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

#if defined(__AVX512F__)
#define L2M_SIMD_REGISTERS 32
template <typename acc_t>
struct Lanes;
template <>
struct Lanes<float> {
  using vec = __m512;
  using mask = uint32_t;
  static constexpr int kWidth = 16;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec broadcast(float x) { return _mm512_set1_ps(x); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static mask passes(vec s, vec t) { return _mm512_cmp_ps_mask(s, t, _CMP_NLE_UQ); }
  static mask at_or_above(vec s, vec t) { return _mm512_cmp_ps_mask(s, t, _CMP_NLT_UQ); }
};
template <>
struct Lanes<double> {
  using vec = __m512d;
  using mask = uint32_t;
  static constexpr int kWidth = 8;
  static vec zero() { return _mm512_setzero_pd(); }
  static vec load(const double* p) { return _mm512_loadu_pd(p); }
  static vec broadcast(double x) { return _mm512_set1_pd(x); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_pd(a, b, c); }
  static vec mul(vec a, vec b) { return _mm512_mul_pd(a, b); }
  static void store(double* p, vec v) { _mm512_storeu_pd(p, v); }
  static mask passes(vec s, vec t) { return _mm512_cmp_pd_mask(s, t, _CMP_NLE_UQ); }
  static mask at_or_above(vec s, vec t) { return _mm512_cmp_pd_mask(s, t, _CMP_NLT_UQ); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define L2M_SIMD_REGISTERS 16
template <typename acc_t>
struct Lanes;
template <>
struct Lanes<float> {
  using vec = __m256;
  using mask = uint32_t;
  static constexpr int kWidth = 8;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec broadcast(float x) { return _mm256_set1_ps(x); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static mask passes(vec s, vec t) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, t, _CMP_NLE_UQ)));
  }
  static mask at_or_above(vec s, vec t) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, t, _CMP_NLT_UQ)));
  }
};
template <>
struct Lanes<double> {
  using vec = __m256d;
  using mask = uint32_t;
  static constexpr int kWidth = 4;
  static vec zero() { return _mm256_setzero_pd(); }
  static vec load(const double* p) { return _mm256_loadu_pd(p); }
  static vec broadcast(double x) { return _mm256_set1_pd(x); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_pd(a, b, c); }
  static vec mul(vec a, vec b) { return _mm256_mul_pd(a, b); }
  static void store(double* p, vec v) { _mm256_storeu_pd(p, v); }
  static mask passes(vec s, vec t) {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(s, t, _CMP_NLE_UQ)));
  }
  static mask at_or_above(vec s, vec t) {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(s, t, _CMP_NLT_UQ)));
  }
};
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
