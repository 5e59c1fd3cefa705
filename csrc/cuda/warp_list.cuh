// Warp-distributed sorted lists of int64 sort keys, shared by the CUDA top-k and product-key
// reads (topk_read.cu, product_key.cu). Include inside the kernels' namespace.
#pragma once

constexpr unsigned kFullMask = 0xffffffffu;
constexpr long long kKeyMissing = static_cast<long long>(0x8000000000000000ull);  // INT64_MIN

// ---------------------------------------------------------------------------------------------
// Sort keys: (score descending, index ascending) as one int64, the order-preserving int32 image
// of the score's float32 bits in the high word and 2**31 - 1 - index in the low word, so that
// "larger key" is exactly "higher score, then smaller index". Each read maps NaN and -0.0 to the
// bits it ranks them by before packing (its encode_key).

__device__ __forceinline__ long long pack_key(int score_bits, long long index) {
  const int ordered = score_bits < 0 ? (score_bits ^ 0x7fffffff) : score_bits;
  const unsigned long long low = static_cast<unsigned long long>(0x7fffffffLL - index);
  return static_cast<long long>((static_cast<unsigned long long>(static_cast<unsigned>(ordered))
                                 << 32) | low);
}

struct DecodedKey {
  bool exists;
  float score;
  long long index;
};

__device__ __forceinline__ DecodedKey decode_key(long long key) {
  DecodedKey decoded;
  const int high = static_cast<int>(key >> 32);
  // No float maps to 0x80000000 (-inf maps to 0x807fffff): only kKeyMissing has that high word.
  decoded.exists = high != static_cast<int>(0x80000000u);
  const int bits = high < 0 ? (high ^ 0x7fffffff) : high;
  decoded.score = __int_as_float(bits);
  decoded.index = 0x7fffffffLL - static_cast<long long>(key & 0xffffffffLL);
  return decoded;
}

// ---------------------------------------------------------------------------------------------
// Lists.

// Returns launch(std::integral_constant<int, K_PAD>{}) for the shortest list, K_PAD of 32, 64,
// 128 or 256, that holds `length` (<= 256) keys.
template <typename Launch>
inline cudaError_t with_list_length(int64_t length, Launch&& launch) {
  if (length <= 32) return launch(std::integral_constant<int, 32>{});
  if (length <= 64) return launch(std::integral_constant<int, 64>{});
  if (length <= 128) return launch(std::integral_constant<int, 128>{});
  return launch(std::integral_constant<int, 256>{});
}

__device__ __forceinline__ long long max_key(long long a, long long b) { return a > b ? a : b; }
__device__ __forceinline__ long long min_key(long long a, long long b) { return a < b ? a : b; }


// Offers the warp's 32 candidate keys (one per lane) to a list sorted descending (element
// r * 32 + lane in top[r]); afterwards the list holds the K_PAD largest of both, sorted
// descending. Every lane of the warp must call it.
template <int kRegs>
__device__ __forceinline__ void insert_candidates(long long (&top)[kRegs], long long candidate,
                                                  int lane) {
  // Bitonic sort of the 32 candidates, ascending over the lanes.
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
    const bool ascending = (lane & size) == 0;  // always true in the last stage (size == 32)
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const long long other = __shfl_xor_sync(kFullMask, candidate, stride);
      const bool lower = (lane & stride) == 0;
      candidate = (lower == ascending) ? min_key(candidate, other) : max_key(candidate, other);
    }
  }
  // Descending list vs the ascending candidates placed at its last 32 positions (INT64_MIN
  // before them): the elementwise maximum is bitonic and holds the K_PAD largest keys.
  top[kRegs - 1] = max_key(top[kRegs - 1], candidate);
  // Bitonic merge, descending: the lower index of each pair takes the larger key.
#pragma unroll
  for (int stride = kRegs * 16; stride >= 32; stride >>= 1) {
    const int reg_stride = stride >> 5;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      if ((r & reg_stride) == 0) {
        const long long high = max_key(top[r], top[r | reg_stride]);
        const long long low = min_key(top[r], top[r | reg_stride]);
        top[r] = high;
        top[r | reg_stride] = low;
      }
    }
  }
#pragma unroll
  for (int stride = 16; stride > 0; stride >>= 1) {
    const bool lower = (lane & stride) == 0;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const long long other = __shfl_xor_sync(kFullMask, top[r], stride);
      top[r] = lower ? max_key(top[r], other) : min_key(top[r], other);
    }
  }
}

// Element (kth_reg * 32 + kth_lane) of the list, in every lane. Registers are selected with a
// static loop so the list never leaves registers.
template <int kRegs>
__device__ __forceinline__ long long list_element(const long long (&top)[kRegs], int kth_reg,
                                                  int kth_lane) {
  long long value = top[0];
#pragma unroll
  for (int r = 1; r < kRegs; ++r) {
    if (r == kth_reg) value = top[r];
  }
  return __shfl_sync(kFullMask, value, kth_lane);
}

__device__ __forceinline__ float warp_sum(float value) {
  // xor butterfly: every lane ends with the same bits (a + b == b + a), fixed order.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {  // no NaN reaches it
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

