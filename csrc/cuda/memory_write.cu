// Gated memory writes on CUDA (interface: memory_write.h; semantics:
// l2m_kernels/ops/memory_write/reference.py; the same algorithm as csrc/cpu/memory_write.cpp).
//
// The writes of one slot compose into a chain m <- m * (1 - w * e) + w * add that only that slot
// sees, so the work is split by slot: the plan (plan.py, built on the device with torch ops) sorts
// the entries by (memory, slot), stably, and marks the first sorted position of each slot's run
// with the run's length. One warp per sorted position: a warp whose run_length is 0 exits, the
// others own their slot (row indices[order[i]] of memory order[i] / P) and walk its run in (t, j)
// order. Warps own disjoint rows: no races, no atomics, bitwise deterministic.
//
// Columns: the row is walked in chunks of 32 * kPerLane columns (kPerLane = 16 bytes of the storage
// type: 4 float32 or 8 float16 / bfloat16), each lane holding kPerLane float32 values of the chunk
// in registers: contiguous ones moved with one 16-byte access when every row of every tensor is
// 16-byte aligned (D a multiple of kPerLane, aligned base pointers), else columns strided by 32 so
// that each scalar access of the warp still covers consecutive elements. Columns are independent in
// the forward, so each chunk applies the whole chain and stores the slot's row of `out` once.
//
// Backward, per run and per chunk: the chain is recomputed forward (the same code and roundings as
// the forward, so m_prev is exactly the forward's state), storing the state before each write
// into that entry's add_parts row (float32 scratch the caller sizes (E, D)); then the reverse walk
// carries dm from dnew: each lane reads back the m_prev values it stored itself (same thread, same
// addresses: ordinary program order, no __syncwarp needed; plain loads, not the read-only path),
// overwrites them with w * dm, writes the erase part, and reduces its share of
// dweight = sum_d dm * (add - e * m_prev) (and, for one erase gate per step, sum_d m_prev * dm)
// with a warp butterfly in a fixed order. With several chunks, lane 0 carries those sums from
// chunk to chunk in float32 scratch (dweight_partial, and erase_parts itself for erase_dim == 1)
// and rounds dweight to the storage type after the last chunk.
//
// Numerics: every input converted to float32 on load; the forward chain rounds each operation to
// float32 in the reference's order (no fused multiply-add), so it matches the reference evaluated
// in float32 and rounds once per slot at the end.
//
// Variants: storage type x vector / scalar columns x erase layout ((.., D) or one gate per step,
// a template parameter: as a runtime branch inside the chain loops it made ptxas spill on sm_80).
// Entry ids are divided by kw and T * kw with IntDivider (int_divide.cuh), not int64 `/`.
#include <cstdint>
#include <type_traits>

#include "int_divide.cuh"
#include "memory_write.h"
#include "merge_common.cuh"  // to_float / from_float, load_chunk / store_chunk, MergeDtype

namespace l2m {
namespace cuda {
namespace {

using detail::from_float;
using detail::load_chunk;
using detail::store_chunk;
using detail::to_float;
using detail::VectorWidth;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the warp: xor butterfly, fixed order, every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// The columns of one chunk that a lane owns.

template <typename T, bool kVectorised>
struct LaneColumns {
  static constexpr int kPerLane = VectorWidth<T>::value;  // 4 (float32) or 8 (16-bit)
  static constexpr int64_t kChunk = 32 * kPerLane;        // columns per chunk (the whole warp)

  int64_t first;  // this lane's first column
  int64_t dim;

  __device__ __forceinline__ LaneColumns(int64_t chunk_start, int lane, int64_t dim_)
      : first(chunk_start + (kVectorised ? int64_t{lane} * kPerLane : int64_t{lane})), dim(dim_) {}

  // Vectorised: kPerLane consecutive columns (D is a multiple of kPerLane, so all or none of
  // them exist); scalar: columns strided by 32.
  __device__ __forceinline__ int64_t column(int v) const {
    return kVectorised ? first + v : first + 32 * int64_t{v};
  }
  __device__ __forceinline__ bool valid(int v) const { return column(v) < dim; }
  __device__ __forceinline__ bool any() const { return first < dim; }
};

// The lane's columns of a row of T, as float32; columns past D read as 0. kReadOnly: through the
// read-only path (__ldg), for tensors this kernel never writes.
template <bool kReadOnly, typename T, bool kVectorised>
__device__ __forceinline__ void load_columns(const T* row, const LaneColumns<T, kVectorised>& cols,
                                             float (&values)[VectorWidth<T>::value]) {
  constexpr int kPerLane = VectorWidth<T>::value;
  if constexpr (kVectorised) {
    if (cols.any()) {
      if constexpr (kReadOnly) {
        load_chunk<T, kPerLane>(row + cols.first, values);
      } else {
        detail::load_vector<false>(row + cols.first, values);
      }
    } else {
#pragma unroll
      for (int v = 0; v < kPerLane; ++v) values[v] = 0.0f;
    }
  } else {
#pragma unroll
    for (int v = 0; v < kPerLane; ++v) {
      const int64_t col = cols.column(v);
      if (col < cols.dim) {
        values[v] = to_float<T>(kReadOnly ? __ldg(row + col) : row[col]);
      } else {
        values[v] = 0.0f;
      }
    }
  }
}

// Stores the lane's existing columns of a row of T (rounded once).
template <typename T, bool kVectorised>
__device__ __forceinline__ void store_columns(T* row, const LaneColumns<T, kVectorised>& cols,
                                              const float (&values)[VectorWidth<T>::value]) {
  constexpr int kPerLane = VectorWidth<T>::value;
  if constexpr (kVectorised) {
    if (cols.any()) store_chunk<T, kPerLane>(row + cols.first, values);
  } else {
#pragma unroll
    for (int v = 0; v < kPerLane; ++v) {
      const int64_t col = cols.column(v);
      if (col < cols.dim) row[col] = from_float<T>(values[v]);
    }
  }
}

// The same for a float32 scratch row (add_parts, erase_parts), with ordinary loads: the kernel
// writes these rows and reads them back.
template <typename T, bool kVectorised>
__device__ __forceinline__ void load_float_columns(const float* row,
                                                   const LaneColumns<T, kVectorised>& cols,
                                                   float (&values)[VectorWidth<T>::value]) {
  constexpr int kPerLane = VectorWidth<T>::value;
  if constexpr (kVectorised) {
    if (cols.any()) {
#pragma unroll
      for (int q = 0; q < kPerLane / 4; ++q) {
        const float4 vector = *reinterpret_cast<const float4*>(row + cols.first + 4 * q);
        values[4 * q] = vector.x;
        values[4 * q + 1] = vector.y;
        values[4 * q + 2] = vector.z;
        values[4 * q + 3] = vector.w;
      }
    } else {
#pragma unroll
      for (int v = 0; v < kPerLane; ++v) values[v] = 0.0f;
    }
  } else {
#pragma unroll
    for (int v = 0; v < kPerLane; ++v) {
      const int64_t col = cols.column(v);
      values[v] = col < cols.dim ? row[col] : 0.0f;
    }
  }
}

template <typename T, bool kVectorised>
__device__ __forceinline__ void store_float_columns(float* row,
                                                    const LaneColumns<T, kVectorised>& cols,
                                                    const float (&values)[VectorWidth<T>::value]) {
  constexpr int kPerLane = VectorWidth<T>::value;
  if constexpr (kVectorised) {
    if (cols.any()) {
#pragma unroll
      for (int q = 0; q < kPerLane / 4; ++q) {
        __stwb(reinterpret_cast<float4*>(row + cols.first + 4 * q),
               make_float4(values[4 * q], values[4 * q + 1], values[4 * q + 2], values[4 * q + 3]));
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < kPerLane; ++v) {
      const int64_t col = cols.column(v);
      if (col < cols.dim) row[col] = values[v];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The chain and the plan.

// m * (1 - w * e) + w * a, every operation rounded to float32 as in the reference (the _rn
// intrinsics keep nvcc from contracting them into fused multiply-adds).
__device__ __forceinline__ float gated_write(float state, float weight, float erase_gate,
                                             float added) {
  const float keep = __fsub_rn(1.0f, __fmul_rn(weight, erase_gate));
  return __fadd_rn(__fmul_rn(state, keep), __fmul_rn(weight, added));
}

// One slot's run of writes: sorted positions [begin, end), and the slot's row.
struct SlotRun {
  int64_t begin;
  int64_t end;
  int64_t row;  // element offset of the row (g, slot) in (G, N, D)
};

__device__ __forceinline__ int64_t slot_of(const void* indices, bool indices_int32, int64_t entry) {
  if (indices_int32) {
    return static_cast<int64_t>(__ldg(static_cast<const int32_t*>(indices) + entry));
  }
  return static_cast<int64_t>(
      __ldg(reinterpret_cast<const long long*>(static_cast<const int64_t*>(indices) + entry)));
}

__device__ __forceinline__ int64_t order_at(const int64_t* order, int64_t position) {
  return static_cast<int64_t>(__ldg(reinterpret_cast<const long long*>(order + position)));
}

// Whether a run starts at sorted `position`, and that run. False where run_length is 0 and for
// a malformed plan (first entry id outside [0, E), slot outside [0, N)); a run reaching past E is
// cut at E. Every lane of a warp reads the same values: the answer is warp-uniform.
template <typename Params>
__device__ __forceinline__ bool run_at(const Params& params, const IntDivider& group_divider,
                                       int64_t position, int64_t entries, SlotRun& run) {
  const int64_t length = __ldg(params.run_length + position);
  if (length <= 0) return false;
  const int64_t entry = order_at(params.order, position);
  if (entry < 0 || entry >= entries) return false;
  const int64_t slot = slot_of(params.indices, params.indices_int32, entry);
  if (slot < 0 || slot >= params.num_slots) return false;
  const int64_t group = static_cast<int64_t>(group_divider.quotient(entry));  // entry / (T * kw)
  const int64_t remaining = entries - position;
  run.begin = position;
  run.end = position + (length < remaining ? length : remaining);
  run.row = (group * params.num_slots + slot) * params.dim;
  return true;
}

// The entry id at sorted position p, or -1 when it is outside [0, E) (a malformed plan).
__device__ __forceinline__ int64_t entry_at(const int64_t* order, int64_t position,
                                            int64_t entries) {
  const int64_t entry = order_at(order, position);
  return (entry >= 0 && entry < entries) ? entry : -1;
}

// ---------------------------------------------------------------------------------------------
// Kernels.

template <typename T, bool kVectorised, bool kOneEraseGate>
__global__ void __launch_bounds__(kThreads)
    gated_memory_write_fwd_kernel(const GatedMemoryWriteFwdParams params,
                                  const IntDivider step_divider, const IntDivider group_divider) {
  using Columns = LaneColumns<T, kVectorised>;
  constexpr int kPerLane = Columns::kPerLane;
  // memory may be out itself (in place): neither is __restrict__, and memory is read with plain
  // loads; each element is read once, then written by the same lane.
  const T* memory = static_cast<const T*>(params.memory);
  T* out = static_cast<T*>(params.out);
  const T* __restrict__ weights = static_cast<const T*>(params.weights);
  const T* __restrict__ add = static_cast<const T*>(params.add);
  const T* __restrict__ erase = static_cast<const T*>(params.erase);
  const int64_t dim = params.dim;
  const int64_t writes_per_step = params.writes_per_step;
  const int64_t entries = params.groups * params.steps * writes_per_step;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warp_stride = int64_t{gridDim.x} * kWarpsPerBlock;

  for (int64_t position = int64_t{blockIdx.x} * kWarpsPerBlock + (threadIdx.x >> 5);
       position < entries; position += warp_stride) {
    SlotRun run;
    if (!run_at(params, group_divider, position, entries, run)) continue;
    for (int64_t chunk = 0; chunk < dim; chunk += Columns::kChunk) {
      const Columns cols(chunk, lane, dim);
      if (!cols.any()) continue;  // no column of this lane here (no warp-wide operation below)
      float state[kPerLane];  // [kPerLane] the slot's values, float32
      load_columns<false>(memory + run.row, cols, state);
      for (int64_t p = run.begin; p < run.end; ++p) {
        const int64_t entry = entry_at(params.order, p, entries);
        if (entry < 0) continue;
        const float weight = to_float<T>(__ldg(weights + entry));
        const int64_t step_row = static_cast<int64_t>(step_divider.quotient(entry));  // (g, t)
        float added[kPerLane];
        load_columns<true>(add + step_row * dim, cols, added);
        if constexpr (kOneEraseGate) {
          const float gate = to_float<T>(__ldg(erase + step_row));
#pragma unroll
          for (int v = 0; v < kPerLane; ++v) {
            state[v] = gated_write(state[v], weight, gate, added[v]);
          }
        } else {
          float gates[kPerLane];
          load_columns<true>(erase + step_row * dim, cols, gates);
#pragma unroll
          for (int v = 0; v < kPerLane; ++v) {
            state[v] = gated_write(state[v], weight, gates[v], added[v]);
          }
        }
      }
      store_columns(out + run.row, cols, state);
    }
  }
}

template <typename T, bool kVectorised, bool kOneEraseGate>
__global__ void __launch_bounds__(kThreads)
    gated_memory_write_bwd_kernel(const GatedMemoryWriteBwdParams params,
                                  const IntDivider step_divider, const IntDivider group_divider) {
  using Columns = LaneColumns<T, kVectorised>;
  constexpr int kPerLane = Columns::kPerLane;
  const T* __restrict__ dnew = static_cast<const T*>(params.dnew);
  const T* __restrict__ memory = static_cast<const T*>(params.memory);
  const T* __restrict__ weights = static_cast<const T*>(params.weights);
  const T* __restrict__ add = static_cast<const T*>(params.add);
  const T* __restrict__ erase = static_cast<const T*>(params.erase);
  T* __restrict__ dmemory = static_cast<T*>(params.dmemory);
  T* __restrict__ dweights = static_cast<T*>(params.dweights);
  // Written and read back by the kernel: ordinary loads and stores.
  float* add_parts = params.add_parts;
  float* erase_parts = params.erase_parts;
  float* dweight_partial = params.dweight_partial;
  const int64_t dim = params.dim;
  const int64_t writes_per_step = params.writes_per_step;
  const int64_t entries = params.groups * params.steps * writes_per_step;
  const int64_t num_chunks = (dim + Columns::kChunk - 1) / Columns::kChunk;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warp_stride = int64_t{gridDim.x} * kWarpsPerBlock;

  // Everything below is warp-uniform (the plan values are the same in every lane), so every lane
  // reaches the warp sums; lanes without a column in a chunk work on zeros and store nothing.
  for (int64_t position = int64_t{blockIdx.x} * kWarpsPerBlock + (threadIdx.x >> 5);
       position < entries; position += warp_stride) {
    SlotRun run;
    if (!run_at(params, group_divider, position, entries, run)) continue;
    for (int64_t chunk_index = 0; chunk_index < num_chunks; ++chunk_index) {
      const Columns cols(chunk_index * Columns::kChunk, lane, dim);
      const bool first_chunk = chunk_index == 0;
      const bool last_chunk = chunk_index == num_chunks - 1;

      // Forward recompute: m_prev of every write into its add_parts row.
      float state[kPerLane];
      load_columns<true>(memory + run.row, cols, state);
      for (int64_t p = run.begin; p < run.end; ++p) {
        const int64_t entry = entry_at(params.order, p, entries);
        if (entry < 0) continue;
        store_float_columns(add_parts + entry * dim, cols, state);
        const float weight = to_float<T>(__ldg(weights + entry));
        const int64_t step_row = static_cast<int64_t>(step_divider.quotient(entry));
        float added[kPerLane];
        load_columns<true>(add + step_row * dim, cols, added);
        if constexpr (kOneEraseGate) {
          const float gate = to_float<T>(__ldg(erase + step_row));
#pragma unroll
          for (int v = 0; v < kPerLane; ++v) {
            state[v] = gated_write(state[v], weight, gate, added[v]);
          }
        } else {
          float gates[kPerLane];
          load_columns<true>(erase + step_row * dim, cols, gates);
#pragma unroll
          for (int v = 0; v < kPerLane; ++v) {
            state[v] = gated_write(state[v], weight, gates[v], added[v]);
          }
        }
      }

      // Reverse walk, carrying dm (float32) from dnew.
      float grad[kPerLane];
      load_columns<true>(dnew + run.row, cols, grad);
      for (int64_t p = run.end - 1; p >= run.begin; --p) {
        const int64_t entry = entry_at(params.order, p, entries);
        if (entry < 0) continue;
        const float weight = to_float<T>(__ldg(weights + entry));
        const int64_t step_row = static_cast<int64_t>(step_divider.quotient(entry));
        float* part_row = add_parts + entry * dim;  // m_prev in, w * dm out
        float m_prev[kPerLane], added[kPerLane], gates[kPerLane];
        load_float_columns(part_row, cols, m_prev);
        load_columns<true>(add + step_row * dim, cols, added);
        if constexpr (kOneEraseGate) {
          const float gate = to_float<T>(__ldg(erase + step_row));
#pragma unroll
          for (int v = 0; v < kPerLane; ++v) gates[v] = gate;
        } else {
          load_columns<true>(erase + step_row * dim, cols, gates);
        }
        float dweight = 0.0f;    // this lane's share of sum_d dm * (add - e * m_prev)
        float erase_sum = 0.0f;  // this lane's share of sum_d m_prev * dm (one gate per step)
        float add_part[kPerLane], erase_part[kPerLane];
#pragma unroll
        for (int v = 0; v < kPerLane; ++v) {
          dweight += grad[v] * (added[v] - gates[v] * m_prev[v]);
          erase_sum += m_prev[v] * grad[v];
          add_part[v] = weight * grad[v];
          erase_part[v] = -weight * m_prev[v] * grad[v];
          grad[v] = (1.0f - weight * gates[v]) * grad[v];
        }
        store_float_columns(part_row, cols, add_part);
        if constexpr (!kOneEraseGate) {
          store_float_columns(erase_parts + entry * dim, cols, erase_part);
        }
        dweight = warp_sum(dweight);
        if constexpr (kOneEraseGate) erase_sum = warp_sum(erase_sum);
        if (lane == 0) {
          // Running sums over the chunks: only lane 0 of this warp touches them (program order).
          if (!first_chunk) dweight += dweight_partial[entry];
          if (last_chunk) {
            dweights[entry] = from_float<T>(dweight);
          } else {
            dweight_partial[entry] = dweight;
          }
          if constexpr (kOneEraseGate) {
            if (!first_chunk) erase_sum += erase_parts[entry];
            erase_parts[entry] = last_chunk ? -weight * erase_sum : erase_sum;
          }
        }
      }
      store_columns(dmemory + run.row, cols, grad);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Blocks for the grid-stride loop over `warps` warps' worth of positions (capped: the kernels
// stride, and gridDim.x stays far below its limit).
inline unsigned warp_grid(int64_t warps) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

inline bool aligned_16(const void* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0;
}

// Every row of every (., D) tensor starts on a 16-byte boundary: D is a multiple of the vector
// width and each base pointer is aligned (nullptr stands for a tensor that is not row-indexed).
template <typename T, int kPointers>
inline bool rows_vectorisable(int64_t dim, const void* const (&pointers)[kPointers]) {
  if (dim % VectorWidth<T>::value != 0) return false;
  for (int i = 0; i < kPointers; ++i) {
    if (!aligned_16(pointers[i])) return false;
  }
  return true;
}

template <typename Params>
inline bool valid_sizes(const Params& params) {
  return params.groups >= 0 && params.num_slots >= 0 && params.dim >= 0 && params.steps >= 0 &&
         params.writes_per_step >= 0 && (params.erase_dim == 1 || params.erase_dim == params.dim);
}

// Launches the kernel kernel_of(vectorised, one_erase_gate) returns for the runtime choices (passed
// as std::bool_constant, so that it can name its template arguments); `rows` are the (., D)
// tensors (see rows_vectorisable).
template <typename T, typename Params, int kPointers, typename KernelOf>
cudaError_t launch_variant(const Params& params, const void* const (&rows)[kPointers],
                           int64_t entries, cudaStream_t stream, KernelOf&& kernel_of) {
  const unsigned grid = warp_grid(entries);
  const IntDivider step_divider = IntDivider::make(params.writes_per_step);
  const IntDivider group_divider = IntDivider::make(params.steps * params.writes_per_step);
  const auto launch = [&](auto vectorised) {
    const auto kernel = params.erase_dim == 1 ? kernel_of(vectorised, std::true_type{})
                                              : kernel_of(vectorised, std::false_type{});
    kernel<<<grid, kThreads, 0, stream>>>(params, step_divider, group_divider);
  };
  if (rows_vectorisable<T>(params.dim, rows)) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const GatedMemoryWriteFwdParams& params, int64_t entries,
                       cudaStream_t stream) {
  const bool one_erase_gate = params.erase_dim == 1;
  const void* const rows[] = {params.memory, params.add, params.out,
                              one_erase_gate ? nullptr : params.erase};
  return launch_variant<T>(params, rows, entries, stream, [](auto vectorised, auto one_gate) {
    return gated_memory_write_fwd_kernel<T, vectorised.value, one_gate.value>;
  });
}

template <typename T>
cudaError_t launch_bwd(const GatedMemoryWriteBwdParams& params, int64_t entries,
                       cudaStream_t stream) {
  const bool one_erase_gate = params.erase_dim == 1;
  const void* const rows[] = {params.dnew,
                              params.memory,
                              params.add,
                              params.dmemory,
                              params.add_parts,
                              one_erase_gate ? nullptr : params.erase,
                              one_erase_gate ? nullptr : params.erase_parts};
  return launch_variant<T>(params, rows, entries, stream, [](auto vectorised, auto one_gate) {
    return gated_memory_write_bwd_kernel<T, vectorised.value, one_gate.value>;
  });
}

// What both entry points check before the dtype dispatch: the rows to write, or -1 for bad sizes
// or a missing tensor (`required`: every pointer the op reads or writes). 0 writes nothing and
// launches nothing (an empty grid is a launch error); N == 0 admits only -1 entries.
template <typename Params, int kPointers>
int64_t entries_to_write(const Params& params, const void* const (&required)[kPointers]) {
  if (!valid_sizes(params)) return -1;
  const int64_t entries = params.groups * params.steps * params.writes_per_step;
  if (entries == 0 || params.dim == 0 || params.num_slots == 0) return 0;
  for (const void* pointer : required) {
    if (pointer == nullptr) return -1;
  }
  return entries;
}

}  // namespace

cudaError_t gated_memory_write_fwd_launch(const GatedMemoryWriteFwdParams& params,
                                          cudaStream_t stream) {
  const void* const required[] = {params.memory, params.indices, params.weights,    params.add,
                                  params.erase,  params.order,   params.run_length, params.out};
  const int64_t entries = entries_to_write(params, required);
  if (entries <= 0) return entries == 0 ? cudaSuccess : cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_fwd, params, entries, stream);
}

cudaError_t gated_memory_write_bwd_launch(const GatedMemoryWriteBwdParams& params,
                                          cudaStream_t stream) {
  const void* const required[] = {params.dnew,      params.memory,     params.indices,
                                  params.weights,   params.add,        params.erase,
                                  params.order,     params.run_length, params.dmemory,
                                  params.dweights,  params.add_parts,  params.erase_parts,
                                  params.dweight_partial};
  const int64_t entries = entries_to_write(params, required);
  if (entries <= 0) return entries == 0 ? cudaSuccess : cudaErrorInvalidValue;
  L2M_CUDA_DISPATCH(params.dtype, launch_bwd, params, entries, stream);
}

}  // namespace cuda
}  // namespace l2m
