// exp, tanh and sigmoid of float that `omp simd` loops vectorise: glibc's vector math (libmvec) is
// only declared to the compiler under -ffast-math, so std::exp and std::tanh in such a loop are
// one scalar library call per element, several times the cost of the memory traffic of an
// elementwise kernel. These are the Cephes single-precision algorithms (exp: Cody-Waite range
// reduction and a degree-5 polynomial, within 2 ulp of the exact value for finite results); double
// keeps the library's functions (float64 is for checking, not speed). Every lane computes the
// same operations: results do not depend on the vector width or the instruction set beyond the
// use of fused multiply-adds (madd).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {

// a * b + c: one fused multiply-add where the instruction set has it, else a product and a sum. Used
// for every multiply-add of these functions and of the kernels that call them, so that the
// compiler never chooses which products to fuse: an element then gets the same bits in the vector
// body of a loop and in its scalar remainder, whatever the tiling.
template <typename T>
inline T madd(T a, T b, T c) {
#if defined(__FMA__) || defined(__AVX512F__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// e**x, with x clamped to [-88, 88] (e**88 = 1.7e38 stands for +inf; results below about 2**-126
// flush to 0); NaN in, NaN out.
inline float vexp(float x) {
  // Only arithmetic, std::min, std::max and bit copies: floor and fmin would be library calls
  // without -ffast-math, and a call (or the branch of a float-to-int conversion) keeps the loop
  // from being vectorised. n = round(x / ln 2) by the 1.5 * 2**23 shift, which leaves n in the
  // low bits of `shifted`.
  const float clamped = std::min(std::max(x, -88.0f), 88.0f);  // NaN stays NaN, and so the result
  constexpr float kShift = 12582912.0f;                          // 1.5 * 2**23, bits 0x4B400000
  const float shifted = madd(clamped, 1.44269504088896341f, kShift);
  const float n = shifted - kShift;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const int32_t n_int = shifted_bits - 0x4B400000;
  const float r = madd(n, 2.12194440e-4f, madd(n, -0.693359375f, clamped));  // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  const float e_r = madd(p, r * r, r) + 1.0f;
  const int32_t bits = (n_int + 127) << 23;  // 2**n (n = -127: 0)
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e_r * scale;
}

inline double vexp(double x) { return std::exp(x); }

// log(x) for positive finite x (Cephes logf: x = m 2**e with m in [sqrt(1/2), sqrt(2)), a degree-8
// polynomial in m - 1, ln 2 in two parts); only called by vlog1p, on [1, 2].
inline float vlog_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2**e with m in [0.5, 1)
  const int32_t m_bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &m_bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float f = low ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = madd(p, f, -1.1514610310e-1f);
  p = madd(p, f, 1.1676998740e-1f);
  p = madd(p, f, -1.2420140846e-1f);
  p = madd(p, f, 1.4249322787e-1f);
  p = madd(p, f, -1.6668057665e-1f);
  p = madd(p, f, 2.0000714765e-1f);
  p = madd(p, f, -2.4999993993e-1f);
  p = madd(p, f, 3.3333331174e-1f);
  const float fe = static_cast<float>(e);
  float y = madd(fe, -2.12194440e-4f, p * f * z);
  y = madd(-0.5f, z, y);
  return madd(fe, 0.693359375f, f + y);
}

// log(1 + x) for x in [0, 1] (what a log-sum-exp of two terms needs), with the relative accuracy
// of log at small x: log(u) x / (u - 1) for u = 1 + x rounded (exact x when u rounds to 1).
inline float vlog1p_unit(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  return d == 0.0f ? x : vlog_positive(u) * (x / d);
}

inline double vlog1p_unit(double x) { return std::log1p(x); }

// 1 / (1 + e**-x): 0 for x below -88 (the exact value is under 1e-38), 1 above 17.
template <typename acc_t>
inline acc_t vsigmoid(acc_t x) {
  // vexp clamps at 88 (e**88 is finite), so the exact 0 of a saturated gate is selected here.
  return x < acc_t(-88) ? acc_t(0) : acc_t(1) / (acc_t(1) + vexp(-x));
}

// tanh(x): a rational minimax approximation, an odd degree-13 over an even degree-6 polynomial on
// [-7.905, 7.905] (x clamped there; the coefficients of Eigen's fast float tanh): one division and
// no exp, within 5 ulp of tanh; +-1 from |x| >= 9, where tanh rounds to 1; NaN stays NaN.
inline float vtanh(float x) {
  const float c = std::min(std::max(x, -7.90531110763549805f), 7.90531110763549805f);
  const float z = c * c;
  float p = -2.76076847742355e-16f;
  p = madd(p, z, 2.00018790482477e-13f);
  p = madd(p, z, -8.60467152213735e-11f);
  p = madd(p, z, 5.12229709037114e-08f);
  p = madd(p, z, 1.48572235717979e-05f);
  p = madd(p, z, 6.37261928875436e-04f);
  p = madd(p, z, 4.89352455891786e-03f);
  float q = 1.19825839466702e-06f;
  q = madd(q, z, 1.18534705686654e-04f);
  q = madd(q, z, 2.26843463243900e-03f);
  q = madd(q, z, 4.89352518554385e-03f);
  const float ratio = (c * p) / q;
  return std::fabs(x) >= 9.0f ? std::copysign(1.0f, x) : ratio;
}

inline double vtanh(double x) { return std::tanh(x); }

}  // namespace
}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
