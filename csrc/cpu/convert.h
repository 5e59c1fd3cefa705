// Storage <-> accumulation conversions shared by the CPU kernels of l2m-kernels.
//
// Every kernel loads its inputs in the storage dtype, computes in the accumulation type
// (float64 for float64 input, float32 otherwise) and rounds once when it stores. These helpers do
// the loads and stores of n contiguous elements; the half-precision ones are vectorised with F16C
// where the build enables it (bitwise the same results as c10's scalar conversions).
#pragma once

#include "isa.h"
#include "../common/params.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace l2m::cpu {
// Whether stream_row streams (bindings.cpp; set from Python, see l2m_kernels/_alloc.py): on while
// large outputs come from buffers kept warm between calls. Into freshly mapped pages, which the
// page fault has just zeroed through the cache, a streaming store first evicts the zeroed line,
// and plain stores are faster.
extern std::atomic<bool> g_stream_stores;
inline bool stream_stores_enabled() { return g_stream_stores.load(std::memory_order_relaxed); }

// In the variant's namespace: these inline helpers compile differently per instruction set (F16C),
// and one shared out-of-line copy would serve every variant.
inline namespace L2M_CPU_ISA {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// memcpy of n elements; nothing for n == 0, where either pointer may be null (an empty tensor or
// scratch row), which memcpy must not be passed even for a zero size.
template <typename T>
inline void copy_elements(const T* src, T* dst, int64_t n) {
  if (n > 0) {
    std::memcpy(dst, src, n * sizeof(T));
  }
}

inline void to_acc(const c10::BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = c10::detail::f32_from_bits(src[i].x);
  }
}

inline void to_acc(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  // The scalar c10 conversion is one F16C instruction per element that compilers do not
  // vectorise; convert eight at a time instead (bitwise the same result).
  for (; i + 8 <= n; i += 8) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(halves));
  }
#endif
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

inline void to_acc(const float* src, float* dst, int64_t n) {
  copy_elements(src, dst, n);
}

inline void to_acc(const double* src, double* dst, int64_t n) {
  copy_elements(src, dst, n);
}

inline void from_acc(const float* src, c10::BFloat16* dst, int64_t n) {
  // Same rounding as c10::BFloat16(float): to nearest even, NaN kept NaN.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i].x = c10::detail::round_to_nearest_even(src[i]);
  }
}

inline void from_acc(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), halves);
  }
#endif
  for (; i < n; ++i) {
    dst[i] = c10::Half(src[i]);
  }
}

inline void from_acc(const float* src, float* dst, int64_t n) {
  copy_elements(src, dst, n);
}

inline void from_acc(const double* src, double* dst, int64_t n) {
  copy_elements(src, dst, n);
}

// n elements of `src` as the accumulation type: `src` itself when it already is that type, else
// converted into `buffer`.
template <typename scalar_t>
inline const acc_type<scalar_t>* load_row(const scalar_t* src, int64_t n, acc_type<scalar_t>* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return src;
  } else {
    to_acc(src, buffer, n);
    return buffer;
  }
}

// n accumulated values rounded once into `dst` (round to nearest even, as torch's .to()).
template <typename scalar_t>
inline void store_row(scalar_t* dst, const acc_type<scalar_t>* values, int64_t n) {
  from_acc(values, dst, n);
}

// Outputs of at least this many bytes are worth streaming (stream_row): larger than what the caches
// would keep for whoever reads them next.
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;
inline bool stream_output(int64_t bytes) { return bytes >= kStreamMinBytes && stream_stores_enabled(); }

// store_row for rows written once and not read again soon (a gradient larger than the caches):
// float32 with streaming (non-temporal) stores where the target has them, which write whole cache
// lines without first reading them in; otherwise as store_row. Callers decide when to stream
// (stream_output, stream_stores_enabled); a task that streamed rows calls stream_fence() after its
// last, before another thread may read them.
template <typename scalar_t>
inline void stream_row(scalar_t* dst, const acc_type<scalar_t>* values, int64_t n) {
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(__AVX512F__)
    constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
    constexpr int64_t kLanes = 8;
#else
    constexpr int64_t kLanes = 4;
#endif
    int64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) % (kLanes * 4)) != 0; ++i) {
      dst[i] = values[i];  // up to the first aligned vector (rows of 4-byte floats)
    }
    for (; i + kLanes <= n; i += kLanes) {
#if defined(__AVX512F__)
      _mm512_stream_ps(dst + i, _mm512_loadu_ps(values + i));
#elif defined(__AVX__)
      _mm256_stream_ps(dst + i, _mm256_loadu_ps(values + i));
#else
      _mm_stream_ps(dst + i, _mm_loadu_ps(values + i));
#endif
    }
    for (; i < n; ++i) {
      dst[i] = values[i];
    }
    return;
  }
#endif
  store_row(dst, values, n);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Where to compute an output tile of n values: the output itself when it has the accumulation type
// and is not streamed, else `buffer`, which store_tile then converts or streams into the output.
template <typename scalar_t>
inline acc_type<scalar_t>* tile_target(scalar_t* dst, acc_type<scalar_t>* buffer, bool stream) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return stream ? buffer : dst;
  } else {
    return buffer;
  }
}

template <typename scalar_t>
inline void store_tile(scalar_t* dst, const acc_type<scalar_t>* values, int64_t n, bool stream) {
  if (stream) {
    stream_row(dst, values, n);
  } else if constexpr (!std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    from_acc(values, dst, n);
  }
}

// Calls fn(scalar_t{}) for the storage type named by dtype (float, double, c10::Half,
// c10::BFloat16); any other value throws a TypeError naming op_name. (The message is built as a
// std::string: see csrc/common/binding.h on ostream insertion crashing in some toolchains.)
template <typename Fn>
void dispatch_floating(Dtype dtype, const char* op_name, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32:
      fn(float{});
      break;
    case Dtype::kFloat64:
      fn(double{});
      break;
    case Dtype::kFloat16:
      fn(c10::Half{});
      break;
    case Dtype::kBFloat16:
      fn(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, std::string(op_name) + ": unsupported dtype " +
                                  std::to_string(static_cast<int>(dtype)) +
                                  " (expected float32, float64, float16 or bfloat16)");
  }
}

// The one dtype dispatch of the launchers, as mamba's DISPATCH_ITYPE_*: runs impl<scalar_t>(params)
// for the storage type of params.dtype; `name` (the launcher's) goes into the error for another.
#define L2M_DISPATCH_FLOATING(params, name, impl) \
  dispatch_floating((params).dtype, name, [&](auto tag) { impl<decltype(tag)>(params); })

// Defines the launcher `name` (declared in kernels.h) as that dispatch of impl<scalar_t>.
#define L2M_CPU_LAUNCHER(name, Params, impl) \
  void name(const Params& params) { L2M_DISPATCH_FLOATING(params, #name, impl); }

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
