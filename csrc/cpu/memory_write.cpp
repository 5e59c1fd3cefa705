// CPU kernels of the gated memory writes (interface: memory_write.h).
//
// The writes of one slot compose into a chain m <- a * m + b (a = 1 - w * e, b = w * add) that
// only that slot sees, so the work is split by slot, not by step. A plan groups the (t, j) entries
// of each memory by slot, in (t, j) order within a slot (a sort of (slot, position) pairs, which
// costs O(T * kw log(T * kw)) per memory and nothing per untouched slot, so the in-place write
// stays O(T * kw * D) however large N is). Each run of entries of one slot is then one task: it
// loads the slot, applies the chain in acc and stores the slot once. Tasks own disjoint slots:
// no races, no atomics, the result is a pure function of the inputs (bitwise deterministic,
// whatever the thread count). That is the forward for float16 / bfloat16 memory, whose chain runs
// in float32 and is rounded once. For float32 / float64 memory the running state is the memory row
// itself, so the forward applies the writes where they land, in (t, j) order, with no plan at all
// (apply_in_time_order): the same values, bitwise, at about half the cost.
//
// Backward. Each run recomputes its chain forward, keeping the state before each write (scratch,
// one row per entry), then walks it in reverse carrying dm. dweights is per entry (one writer);
// dadd and derase sum over the kw entries of a step, which may sit in different runs, so each
// entry's part goes to scratch and a second pass sums them per step in j order.
#include "isa.h"  // first: names the variant that the declarations below belong to
#include "memory_write.h"
#include "convert.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {  // one copy per instruction-set variant (isa.h)
namespace {


// Bytes per task of the parallel copies (memory -> out, dnew -> dmemory).
constexpr int64_t kCopyChunkBytes = int64_t(1) << 20;

void parallel_copy(void* dst, const void* src, int64_t bytes) {
  if (dst == src || bytes == 0) {
    return;
  }
  const int64_t chunks = (bytes + kCopyChunkBytes - 1) / kCopyChunkBytes;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t offset = chunk * kCopyChunkBytes;
      const int64_t size = std::min(kCopyChunkBytes, bytes - offset);
      std::memcpy(static_cast<char*>(dst) + offset, static_cast<const char*>(src) + offset, size);
    }
  });
}

// Tasks for at::parallel_for over items of about `work_per_item` elements each: enough items per
// task that a task moves a few thousand elements.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(work_per_item, 1));
}

// The entries of every memory grouped by slot. An entry is a global position e = g * P + p
// (P = T * kw, p = t * kw + j); skipped entries (-1) are left out.
struct WritePlan {
  std::vector<int64_t> entries;    // grouped by (g, slot), p increasing within a slot
  std::vector<int64_t> run_begin;  // run r is entries[run_begin[r] .. run_begin[r + 1])
  std::vector<int64_t> entry_rank; // (G * P): index of entry e in `entries`, or -1 (skipped)

  int64_t num_runs() const { return static_cast<int64_t>(run_begin.size()) - 1; }
};

inline int64_t slot_at(const void* indices, bool indices_int32, int64_t entry) {
  return indices_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(indices)[entry])
                       : static_cast<const int64_t*>(indices)[entry];
}

// Sorts the (slot, p) pairs of one memory, given in increasing p, by slot and stably. A counting
// sort (O(N + P), a few microseconds) where the memory is not much larger than the number of
// writes, else a comparison sort (O(P log P), independent of N: in place stays O(T * kw * D)).
void sort_by_slot(std::pair<int64_t, int64_t>* pairs, int64_t count, int64_t num_slots) {
  if (count < 2) {
    return;
  }
  if (num_slots > 16 * count) {
    std::sort(pairs, pairs + count);  // p is unique: (slot, p) order is the stable order
    return;
  }
  std::vector<int32_t> slot_start(num_slots + 1, 0);
  for (int64_t i = 0; i < count; ++i) {
    ++slot_start[pairs[i].first + 1];
  }
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    slot_start[slot + 1] += slot_start[slot];
  }
  std::vector<std::pair<int64_t, int64_t>> sorted(count);
  for (int64_t i = 0; i < count; ++i) {
    sorted[slot_start[pairs[i].first]++] = pairs[i];
  }
  std::copy(sorted.begin(), sorted.end(), pairs);
}

WritePlan make_plan(const void* indices, bool indices_int32, int64_t groups, int64_t num_slots,
                    int64_t num_writes, bool with_rank) {
  // Per memory, in parallel: the (slot, p) pairs of its writes, sorted (p is unique, so the sort
  // keeps (t, j) order within a slot).
  std::vector<std::pair<int64_t, int64_t>> sorted(groups * num_writes);
  std::vector<int64_t> counts(groups, 0);
  at::parallel_for(0, groups, grain_for(num_writes), [&](int64_t group_begin, int64_t group_end) {
    for (int64_t g = group_begin; g < group_end; ++g) {
      auto* pairs = sorted.data() + g * num_writes;
      int64_t count = 0;
      for (int64_t p = 0; p < num_writes; ++p) {
        const int64_t slot = slot_at(indices, indices_int32, g * num_writes + p);
        if (slot >= 0) {
          pairs[count++] = {slot, p};
        }
      }
      sort_by_slot(pairs, count, num_slots);
      counts[g] = count;
    }
  });
  WritePlan plan;
  int64_t total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    total += counts[g];
  }
  plan.entries.reserve(total);
  plan.run_begin.reserve(total + 1);
  if (with_rank) {
    plan.entry_rank.assign(groups * num_writes, -1);
  }
  for (int64_t g = 0; g < groups; ++g) {
    const auto* pairs = sorted.data() + g * num_writes;
    for (int64_t i = 0; i < counts[g]; ++i) {
      if (i == 0 || pairs[i].first != pairs[i - 1].first) {
        plan.run_begin.push_back(static_cast<int64_t>(plan.entries.size()));
      }
      const int64_t entry = g * num_writes + pairs[i].second;
      if (with_rank) {
        plan.entry_rank[entry] = static_cast<int64_t>(plan.entries.size());
      }
      plan.entries.push_back(entry);
    }
  }
  plan.run_begin.push_back(static_cast<int64_t>(plan.entries.size()));
  return plan;
}

// Inputs of write `entry` (global position g * P + t * kw + j), loaded in acc. weights, add and
// erase are read where they lie (rows placed by a Rows each, memory_write.h): the same values as
// from row-major copies, so the same results, bitwise.
template <typename scalar_t>
struct WriteInputs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* weights;
  const scalar_t* add;
  const scalar_t* erase;
  Rows weight_rows, add_rows, erase_rows;
  int64_t dim, erase_dim, steps, writes_per_step;

  // Row (g, t) = g * T + t of weights / add / erase for an entry.
  int64_t step_row(int64_t entry) const { return entry / writes_per_step; }
  acc_t weight(int64_t entry) const {
    if (weight_rows.dense) {
      return static_cast<acc_t>(weights[entry]);
    }
    const int64_t row = step_row(entry);
    return static_cast<acc_t>(weights[weight_rows.offset(row) + (entry - row * writes_per_step)]);
  }
  const scalar_t* add_row(int64_t entry) const { return add + add_rows.offset(step_row(entry)); }
  const scalar_t* erase_row(int64_t entry) const {
    return erase + erase_rows.offset(step_row(entry));
  }

  // state <- state * (1 - w * e) + w * add, in the reference's operation order.
  // Columns [col_begin, col_end) of `state` (indexed from column 0). The loops are `GCC ivdep`
  // (as is the backward's reverse walk): add and erase never overlap `state` (a scratch row, or a
  // row of out, which the bindings keep apart from them), and without the pragma the compiler
  // versions each loop on a run-time test of how close the rows lie, so a row read in place could
  // take the scalar version where its row-major copy takes the vector one, whose floating-point
  // contraction differs: results would depend on addresses, not only on values.
  void apply(int64_t entry, acc_t* state, int64_t col_begin = 0, int64_t col_end = -1) const {
    if (col_end < 0) {
      col_end = dim;
    }
    const acc_t w = weight(entry);
    const scalar_t* add_values = add_row(entry);
    const scalar_t* erase_values = erase_row(entry);
    if (erase_dim == 1) {
      const acc_t keep = acc_t(1) - w * static_cast<acc_t>(erase_values[0]);
#pragma GCC ivdep
      for (int64_t d = col_begin; d < col_end; ++d) {
        state[d] = state[d] * keep + w * static_cast<acc_t>(add_values[d]);
      }
    } else {
#pragma GCC ivdep
      for (int64_t d = col_begin; d < col_end; ++d) {
        const acc_t keep = acc_t(1) - w * static_cast<acc_t>(erase_values[d]);
        state[d] = state[d] * keep + w * static_cast<acc_t>(add_values[d]);
      }
    }
  }
};

template <typename Params, typename scalar_t>
WriteInputs<scalar_t> write_inputs(const Params& params) {
  return {static_cast<const scalar_t*>(params.weights), static_cast<const scalar_t*>(params.add),
          static_cast<const scalar_t*>(params.erase), params.weight_rows, params.add_rows,
          params.erase_rows, params.dim, params.erase_dim, params.steps,
          params.writes_per_step};
}

// Runs ahead of the current one whose memory row the forward prefetches.
constexpr int64_t kPrefetchRuns = 4;

// Offset (elements) of the memory row that run `run` of the plan writes.
template <typename Params>
int64_t row_offset(const WritePlan& plan, const Params& params, int64_t run) {
  const int64_t entry = plan.entries[plan.run_begin[run]];
  const int64_t group = entry / (params.steps * params.writes_per_step);
  return (group * params.num_slots + slot_at(params.indices, params.indices_int32, entry)) *
         params.dim;
}

template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t offset = 0; offset < size; offset += 64) {
    __builtin_prefetch(bytes + offset, 1 /* for writing */, 3);
  }
}

// Writes ahead of the current one whose memory row the time-order forward prefetches (8 and 16
// measured alike at write-cpu).
constexpr int64_t kPrefetchWrites = 16;

// The forward for float32 / float64 memory, where the accumulation type is the storage type: every
// write is applied to its row of `out` where it lands, in (t, j) order, which is the definition of
// the op (and bitwise what the per-slot chain computes: the same operations on the same values in
// the same order, with no rounding in between). Nothing is sorted, the add / erase rows stream in
// order, and the slot ids, known in advance, let the memory row of a later write be prefetched.
// Columns are independent, so the work splits over (group, column chunk) pairs: disjoint
// elements, no races, and the result does not depend on the split.
template <typename scalar_t>
void apply_in_time_order(const GatedMemoryWriteFwdParams& params, scalar_t* out) {
  const int64_t dim = params.dim, num_slots = params.num_slots, groups = params.groups;
  const int64_t num_writes = params.steps * params.writes_per_step;
  const auto inputs = write_inputs<GatedMemoryWriteFwdParams, scalar_t>(params);
  // Enough chunks that every thread has work when the groups are few; each a whole number of
  // 64-byte lines.
  const int64_t line = std::max<int64_t>(1, 64 / int64_t(sizeof(scalar_t)));
  const int64_t max_chunks = (dim + line - 1) / line;
  const int64_t wanted = (2 * at::get_num_threads() + groups - 1) / groups;
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, max_chunks));
  const int64_t chunk_cols = ((dim + chunks - 1) / chunks + line - 1) / line * line;
  at::parallel_for(0, groups * chunks, 1, [&](int64_t item_begin, int64_t item_end) {
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t group = item / chunks;
      const int64_t col_begin = std::min(dim, (item % chunks) * chunk_cols);
      const int64_t col_end = std::min(dim, col_begin + chunk_cols);
      if (col_begin == col_end) {
        continue;
      }
      scalar_t* rows = out + group * num_slots * dim;
      const int64_t first_entry = group * num_writes;
      for (int64_t p = 0; p < num_writes; ++p) {
        if (p + kPrefetchWrites < num_writes) {
          const int64_t ahead = slot_at(params.indices, params.indices_int32, first_entry + p + kPrefetchWrites);
          if (ahead >= 0) {
            prefetch_row(rows + ahead * dim + col_begin, col_end - col_begin);
          }
        }
        const int64_t slot = slot_at(params.indices, params.indices_int32, first_entry + p);
        if (slot >= 0) {
          inputs.apply(first_entry + p, rows + slot * dim, col_begin, col_end);
        }
      }
    }
  });
}

template <typename scalar_t>
void gated_memory_write_fwd_impl(const GatedMemoryWriteFwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dim = params.dim, num_slots = params.num_slots;
  const int64_t num_writes = params.steps * params.writes_per_step;
  const auto* memory = static_cast<const scalar_t*>(params.memory);
  auto* out = static_cast<scalar_t*>(params.out);
  parallel_copy(out, memory, params.groups * num_slots * dim * int64_t(sizeof(scalar_t)));
  if (num_writes == 0 || dim == 0 || params.groups == 0) {
    return;
  }
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    apply_in_time_order(params, out);
    return;
  }
  const WritePlan plan =
      make_plan(params.indices, params.indices_int32, params.groups, num_slots, num_writes, false);
  const auto inputs = write_inputs<GatedMemoryWriteFwdParams, scalar_t>(params);
  const int64_t average_run = static_cast<int64_t>(plan.entries.size()) /
                              std::max<int64_t>(plan.num_runs(), 1);
  at::parallel_for(0, plan.num_runs(), grain_for(average_run * dim), [&](int64_t run_begin,
                                                                         int64_t run_end) {
    std::vector<acc_t> state(dim);
    for (int64_t run = run_begin; run < run_end; ++run) {
      // The written rows are scattered over the memory: fetch a later run's row while this
      // one is computed, so the loads overlap instead of each waiting on DRAM.
      if (run + kPrefetchRuns < run_end) {
        prefetch_row(memory + row_offset(plan, params, run + kPrefetchRuns), dim);
      }
      const int64_t first = plan.run_begin[run], last = plan.run_begin[run + 1];
      const int64_t row = row_offset(plan, params, run);
      // Read from `memory`, not `out`: the same values (out is a copy, or memory itself), and no
      // dependence on the copy above having reached this row.
      to_acc(memory + row, state.data(), dim);
      for (int64_t i = first; i < last; ++i) {
        inputs.apply(plan.entries[i], state.data());
      }
      store_row(out + row, state.data(), dim);
    }
  });
}

template <typename scalar_t>
void gated_memory_write_bwd_impl(const GatedMemoryWriteBwdParams& params) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dim = params.dim, num_slots = params.num_slots, erase_dim = params.erase_dim;
  const int64_t writes_per_step = params.writes_per_step;
  const int64_t num_writes = params.steps * writes_per_step;
  const auto* dnew = static_cast<const scalar_t*>(params.dnew);
  const auto* memory = static_cast<const scalar_t*>(params.memory);
  auto* dmemory = static_cast<scalar_t*>(params.dmemory);
  auto* dweights = static_cast<scalar_t*>(params.dweights);
  auto* dadd = static_cast<scalar_t*>(params.dadd);
  auto* derase = static_cast<scalar_t*>(params.derase);
  // Untouched slots pass the gradient through; the runs below overwrite the written ones.
  parallel_copy(dmemory, dnew, params.groups * num_slots * dim * int64_t(sizeof(scalar_t)));
  // No early return without writes (kw == 0): dadd and derase (G, T, ...) must still be zeroed.
  const WritePlan plan =
      make_plan(params.indices, params.indices_int32, params.groups, num_slots, num_writes, true);
  const auto inputs = write_inputs<GatedMemoryWriteBwdParams, scalar_t>(params);
  const int64_t num_entries = static_cast<int64_t>(plan.entries.size());
  // Per entry: the slot's state before the write, then (overwritten in the reverse walk) the
  // entry's dadd part w * dm; and its derase part.
  std::vector<acc_t> row_parts(num_entries * dim);
  std::vector<acc_t> erase_parts(num_entries * erase_dim);

  const int64_t average_run = num_entries / std::max<int64_t>(plan.num_runs(), 1);
  at::parallel_for(0, plan.num_runs(), grain_for(2 * average_run * dim), [&](int64_t run_begin,
                                                                             int64_t run_end) {
    std::vector<acc_t> state(dim), dstate(dim);
    for (int64_t run = run_begin; run < run_end; ++run) {
      const int64_t first = plan.run_begin[run], last = plan.run_begin[run + 1];
      const int64_t group = plan.entries[first] / num_writes;
      const int64_t slot = slot_at(params.indices, params.indices_int32, plan.entries[first]);
      const int64_t row = (group * num_slots + slot) * dim;
      to_acc(memory + row, state.data(), dim);
      for (int64_t i = first; i < last; ++i) {
        std::copy(state.begin(), state.end(), row_parts.begin() + i * dim);
        inputs.apply(plan.entries[i], state.data());
      }
      to_acc(dnew + row, dstate.data(), dim);
      for (int64_t i = last - 1; i >= first; --i) {
        const int64_t entry = plan.entries[i];
        const acc_t w = inputs.weight(entry);
        const scalar_t* add_values = inputs.add_row(entry);
        const scalar_t* erase_values = inputs.erase_row(entry);
        acc_t* part = row_parts.data() + i * dim;  // m_prev in, w * dm out
        acc_t dweight = 0, derase_sum = 0;
#pragma GCC ivdep  // one code path whatever the addresses: see WriteInputs::apply
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t e = static_cast<acc_t>(erase_values[erase_dim == 1 ? 0 : d]);
          const acc_t m_prev = part[d], dm = dstate[d];
          dweight += dm * (static_cast<acc_t>(add_values[d]) - e * m_prev);
          if (erase_dim == 1) {
            derase_sum += m_prev * dm;
          } else {
            erase_parts[i * dim + d] = -w * m_prev * dm;
          }
          part[d] = w * dm;
          dstate[d] = (acc_t(1) - w * e) * dm;
        }
        if (erase_dim == 1) {
          erase_parts[i] = -w * derase_sum;
        }
        dweights[entry] = static_cast<scalar_t>(dweight);
      }
      store_row(dmemory + row, dstate.data(), dim);
    }
  });

  // Per step (g, t): dadd and derase are the sums of the step's entries' parts, in j order;
  // skipped entries contribute nothing and get dweights = 0.
  const int64_t step_rows = params.groups * params.steps;
  at::parallel_for(0, step_rows, grain_for(writes_per_step * (dim + erase_dim)), [&](
                                                                 int64_t step_begin,
                                                                 int64_t step_end) {
    std::vector<acc_t> sums(std::max(dim, erase_dim));
    for (int64_t step = step_begin; step < step_end; ++step) {
      const int64_t first_entry = step * writes_per_step;
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t j = 0; j < writes_per_step; ++j) {
        const int64_t rank = plan.entry_rank[first_entry + j];
        if (rank < 0) {
          dweights[first_entry + j] = scalar_t(0);
          continue;
        }
        const acc_t* part = row_parts.data() + rank * dim;
        for (int64_t d = 0; d < dim; ++d) {
          sums[d] += part[d];
        }
      }
      store_row(dadd + step * dim, sums.data(), dim);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t j = 0; j < writes_per_step; ++j) {
        const int64_t rank = plan.entry_rank[first_entry + j];
        if (rank < 0) {
          continue;
        }
        const acc_t* part = erase_parts.data() + rank * erase_dim;
        for (int64_t d = 0; d < erase_dim; ++d) {
          sums[d] += part[d];
        }
      }
      store_row(derase + step * erase_dim, sums.data(), erase_dim);
    }
  });
}

}  // namespace

L2M_CPU_LAUNCHER(gated_memory_write_fwd, GatedMemoryWriteFwdParams, gated_memory_write_fwd_impl)
L2M_CPU_LAUNCHER(gated_memory_write_bwd, GatedMemoryWriteBwdParams, gated_memory_write_bwd_impl)

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
