// Python bindings of the CPU extension `l2m_kernels._C`: the ops of the shared contract
// (csrc/common/binding.h), whose launchers are called through the dispatch table (kernels.h) of
// the instruction-set variant chosen at import (see "Instruction-set variants" below), and the
// functions that report and switch that variant. Every op runs with the GIL released.
#include <torch/extension.h>

#include <atomic>
#include <optional>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

// The shared contract for the CPU kernels: launched through the table of the chosen variant.
namespace {
const l2m::cpu::KernelTable& kernels();
}
#define L2M_BINDING_CUDA 0
#define L2M_KERNEL_NS l2m::cpu
#define L2M_LAUNCH(call, launcher, params, device_of) kernels().launcher(params)
#include "../common/binding.h"

// Build facts, defined by setup.py on the compiler command line. Defaults keep a build outside
// setup.py (e.g. torch.utils.cpp_extension.load) working.
#ifndef L2M_TORCH_VERSION
#define L2M_TORCH_VERSION "unknown"
#endif
#ifndef L2M_CPU_ARCH
#define L2M_CPU_ARCH "unknown"
#endif
#ifndef L2M_CUDA_EXT
#define L2M_CUDA_EXT 0
#endif
#ifndef L2M_CUDA_ARCHS
#define L2M_CUDA_ARCHS ""
#endif
// L2M_CPU_ISA_AVX2_ARCH / L2M_CPU_ISA_AVX512_ARCH: the -march of the avx2 / avx512 variants,
// defined only when setup.py built and linked them.

namespace {

namespace py = pybind11;

// ---- Instruction-set variants ----
//
// The kernels are compiled once per variant (isa.h); the variant is chosen once, at import:
// L2M_CPU_ISA (default | avx2 | avx512) when set, else the best variant this CPU runs, at most
// torch's CPU capability (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY can
// lower), so that l2m and ATen use the same instruction set. A variant the CPU cannot run is never
// chosen: asked for by name, it raises instead of dying on an illegal instruction.

struct IsaVariant {
  const char* name;   // as L2M_CPU_ISA spells it
  const char* march;  // the -march it was compiled with ("": none)
  int level;          // 0 default, 1 avx2, 2 avx512: compared with torch's capability
  const l2m::cpu::KernelTable* table;
};

const std::vector<IsaVariant>& built_variants() {
  static const std::vector<IsaVariant> variants = {
      {"default", L2M_CPU_ARCH, 0, &l2m::cpu::isa_default::kernel_table},
#ifdef L2M_CPU_ISA_AVX2_ARCH
      {"avx2", L2M_CPU_ISA_AVX2_ARCH, 1, &l2m::cpu::isa_avx2::kernel_table},
#endif
#ifdef L2M_CPU_ISA_AVX512_ARCH
      {"avx512", L2M_CPU_ISA_AVX512_ARCH, 2, &l2m::cpu::isa_avx512::kernel_table},
#endif
  };
  return variants;
}

// Why this CPU cannot run `variant`, or "" when it can. The baseline runs everywhere it was built
// for (with L2M_CPU_ARCH, wherever that -march runs: not checked).
std::string cpu_cannot_run(const IsaVariant& variant) {
  if (variant.level == 0) {
    return "";
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  bool supported;
  // The feature sets of -march=x86-64-v3 and -v4, as the compiler may use any of them.
#if !defined(__clang__) && __GNUC__ >= 12
  supported = variant.level == 1 ? __builtin_cpu_supports("x86-64-v3")
                                 : __builtin_cpu_supports("x86-64-v4");
#else
  supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (variant.level == 2) {
    supported = supported && __builtin_cpu_supports("avx512f") &&
                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
#endif
  if (!supported) {
    return std::string("this CPU does not support ") +
           (variant.level == 1 ? "x86-64-v3 (AVX2, FMA, BMI1/2, F16C)"
                               : "x86-64-v4 (AVX-512 F, BW, CD, DQ, VL)");
  }
  return "";
#else
  return "this CPU is not x86-64";
#endif
}

// torch's CPU capability as a variant level; anything above AVX2 (AVX512, or a future level)
// caps nothing.
int torch_capability_level() {
  const std::string capability = at::get_cpu_capability();
  return capability == "DEFAULT" ? 0 : capability == "AVX2" ? 1 : 2;
}

std::atomic<const IsaVariant*> active_variant{nullptr};

// The best variant that this CPU runs and torch's capability allows.
const IsaVariant& auto_variant() {
  const IsaVariant* best = &built_variants().front();
  const int cap = torch_capability_level();
  for (const IsaVariant& variant : built_variants()) {
    if (variant.level <= cap && cpu_cannot_run(variant).empty() && variant.level > best->level) {
      best = &variant;
    }
  }
  return *best;
}

std::string built_names() {
  std::string names;
  for (const IsaVariant& variant : built_variants()) {
    names += (names.empty() ? "" : ", ") + std::string(variant.name);
  }
  return names;
}

// L2M_CPU_ISA, or "" when unset.
std::string requested_isa() {
  const char* requested = std::getenv("L2M_CPU_ISA");
  return requested != nullptr ? requested : "";
}

// Makes `name` ("auto", "default", "avx2", "avx512"; any case) the active variant and returns it.
// Unknown or unbuilt names raise ValueError, a variant this CPU cannot run RuntimeError.
std::string set_isa(const std::string& requested) {
  std::string name;
  for (const char c : requested) {
    if (!std::isspace(static_cast<unsigned char>(c))) {
      name += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  if (name.empty() || name == "auto") {
    active_variant.store(&auto_variant());
    return active_variant.load()->name;
  }
  for (const IsaVariant& variant : built_variants()) {
    if (name == variant.name) {
      const std::string why = cpu_cannot_run(variant);
      if (!why.empty()) {
        throw std::runtime_error("the " + name + " variant of the CPU kernels cannot run here: " +
                                 why + " (variants built: " + built_names() + ")");
      }
      active_variant.store(&variant);
      return variant.name;
    }
  }
  throw std::invalid_argument("unknown or unbuilt CPU kernel variant '" + requested +
                              "'; built: " + built_names() + " (or auto)");
}

const l2m::cpu::KernelTable& kernels() {
  return *active_variant.load(std::memory_order_relaxed)->table;
}

py::dict isa_info() {
  const std::string requested = requested_isa();
  py::dict info;
  info["active"] = active_variant.load()->name;
  info["requested"] = requested.empty() ? "auto" : requested;
  info["auto"] = auto_variant().name;
  info["torch_capability"] = at::get_cpu_capability();
  py::dict march, unusable;
  for (const IsaVariant& variant : built_variants()) {
    march[variant.name] = variant.march;
    const std::string why = cpu_cannot_run(variant);
    if (!why.empty()) {
      unusable[variant.name] = why;
    }
  }
  info["march"] = march;        // every built variant -> its -march ("" none)
  info["unusable"] = unusable;  // variants this CPU cannot run -> why
  return info;
}

}  // namespace

namespace l2m::cpu {
std::atomic<bool> g_stream_stores{true};  // convert.h
}  // namespace l2m::cpu

namespace {

// ---- MemoryStore reads (l2m_kernels/memory/read.py, which validates the arguments; the checks
// here keep a wrong call from reading out of bounds) ----

void check_store(bool ok, const std::string& what) {
  if (!ok) {
    throw std::invalid_argument("l2m_kernels._C store read: " + what);
  }
}

// sum_d |keys[h, n, d]| and sum_d keys[h, n, d] of an (Hm, N, D) int8 tensor (last dimension
// contiguous); -128 is refused (the int8 read's bounds assume keys in [-127, 127]).
void key_sums(const at::Tensor& keys, at::Tensor& key_abs, at::Tensor& key_sum) {
  const int64_t heads = keys.size(0), slots = keys.size(1), dim = keys.size(2);
  const int8_t* base = keys.data_ptr<int8_t>();
  int32_t* abs_out = key_abs.data_ptr<int32_t>();
  int32_t* sum_out = key_sum.data_ptr<int32_t>();
  const int64_t s0 = keys.stride(0), s1 = keys.stride(1);
  std::atomic<bool> saturated{false};
  at::parallel_for(0, heads * slots, 1024, [&](int64_t begin, int64_t end) {
    bool low = false;
    for (int64_t i = begin; i < end; ++i) {
      const int8_t* row = base + (i / slots) * s0 + (i % slots) * s1;
      int32_t a = 0, t = 0;
      for (int64_t d = 0; d < dim; ++d) {
        low |= row[d] == -128;
        a += row[d] < 0 ? -row[d] : row[d];
        t += row[d];
      }
      abs_out[i] = a;
      sum_out[i] = t;
    }
    if (low) {
      saturated.store(true, std::memory_order_relaxed);
    }
  });
  if (saturated.load()) {  // named as the argument (the subject of the message), as every op's checks
    throw std::invalid_argument("keys: expected int8 elements in [-127, 127], got -128 (the int8 "
                                "filter bounds |key| by 127)");
  }
}

// Exact top-k over int8 keys: q (Hm, R, D) float32, keys (Hm, N, D) int8 (last dimension
// contiguous), key_abs / key_sum (Hm, N) int32 (both None: computed here, and a key of -128
// refused). Returns scores (Hm, R, k) float32, slots int64.
// Optional refinement: q_refine (Hm, R, D) float32, refine_keys (Hm, N, D) float32 (last dimension
// contiguous), slack (Hm, R) float32: the scores are q_refine . refine_keys, filtered through the
// int8 keys with the per-row slack added to the bound.
std::vector<at::Tensor> store_int8_topk(const at::Tensor& q, const at::Tensor& keys,
                                        const std::optional<at::Tensor>& key_abs_arg,
                                        const std::optional<at::Tensor>& key_sum_arg,
                                        int64_t k, const std::optional<at::Tensor>& q_refine,
                                        const std::optional<at::Tensor>& refine_keys,
                                        const std::optional<at::Tensor>& slack) {
  check_store(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.is_cpu(),
              "q must be a contiguous (Hm, R, D) float32 CPU tensor");
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
  check_store(keys.dim() == 3 && keys.scalar_type() == at::kChar && keys.is_cpu() &&
                  keys.size(0) == heads && keys.size(2) == dim &&
                  (dim <= 1 || keys.stride(2) == 1),
              "keys must be an (Hm, N, D) int8 CPU tensor with a contiguous last dimension");
  const int64_t slots = keys.size(1);
  check_store(key_abs_arg.has_value() == key_sum_arg.has_value(),
              "key_abs and key_sum go together");
  at::Tensor key_abs, key_sum;
  if (key_abs_arg.has_value()) {
    key_abs = *key_abs_arg;
    key_sum = *key_sum_arg;
  } else {
    key_abs = at::empty({heads, slots}, keys.options().dtype(at::kInt));
    key_sum = at::empty({heads, slots}, keys.options().dtype(at::kInt));
    key_sums(keys, key_abs, key_sum);
  }
  for (const at::Tensor* t : {&key_abs, &key_sum}) {
    check_store(t->dim() == 2 && t->scalar_type() == at::kInt && t->is_contiguous() &&
                    t->size(0) == heads && t->size(1) == slots && t->is_cpu(),
                "key_abs and key_sum must be contiguous (Hm, N) int32 CPU tensors");
  }
  check_store(k >= 1, "k must be at least 1");
  check_store(q_refine.has_value() == refine_keys.has_value() &&
                  q_refine.has_value() == slack.has_value(),
              "q_refine, refine_keys and slack go together");
  if (q_refine.has_value()) {
    check_store(q_refine->sizes() == q.sizes() && q_refine->scalar_type() == at::kFloat &&
                    q_refine->is_contiguous() && q_refine->is_cpu(),
                "q_refine must be a contiguous float32 CPU tensor of q's shape");
    check_store(refine_keys->dim() == 3 && refine_keys->scalar_type() == at::kFloat &&
                    refine_keys->is_cpu() && refine_keys->size(0) == heads &&
                    refine_keys->size(1) == slots && refine_keys->size(2) == dim &&
                    (dim <= 1 || refine_keys->stride(2) == 1),
                "refine_keys must be an (Hm, N, D) float32 CPU tensor with a contiguous last "
                "dimension");
    check_store(slack->dim() == 2 && slack->size(0) == heads && slack->size(1) == rows &&
                    slack->scalar_type() == at::kFloat && slack->is_contiguous() && slack->is_cpu(),
                "slack must be a contiguous (Hm, R) float32 CPU tensor");
  }
  at::Tensor scores = at::empty({heads, rows, k}, q.options());
  at::Tensor indices = at::empty({heads, rows, k}, q.options().dtype(at::kLong));
  if (heads * rows > 0) {
    l2m::Int8TopkParams params{};
    params.heads = heads;
    params.rows = rows;
    params.slots = slots;
    params.dim = dim;
    params.k = k;
    params.q = q.data_ptr<float>();
    params.keys = keys.data_ptr<int8_t>();
    params.key_strides[0] = keys.stride(0);
    params.key_strides[1] = keys.stride(1);
    params.key_abs = key_abs.data_ptr<int32_t>();
    params.key_sum = key_sum.data_ptr<int32_t>();
    params.scores = scores.data_ptr<float>();
    params.indices = indices.data_ptr<int64_t>();
    if (q_refine.has_value()) {
      params.q_refine = q_refine->data_ptr<float>();
      params.refine_keys = refine_keys->data_ptr<float>();
      params.refine_strides[0] = refine_keys->stride(0);
      params.refine_strides[1] = refine_keys->stride(1);
      params.slack = slack->data_ptr<float>();
    }
    kernels().int8_topk_fwd(params);
  }
  return {scores, indices};
}

// Exact top-k within each row's staged blocks: q (Hm, R, D) float32, keys (U, Hm, S, D) float32
// or int8 contiguous, blocks (Hm, R, KB) int64 in [-1, U), block_slot / block_len (U,) int64.
std::vector<at::Tensor> store_block_candidates_topk(const at::Tensor& q, const at::Tensor& keys,
                                                    const at::Tensor& blocks,
                                                    const at::Tensor& block_slot,
                                                    const at::Tensor& block_len, int64_t k) {
  check_store(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.is_cpu(),
              "q must be a contiguous (Hm, R, D) float32 CPU tensor");
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
  check_store(keys.dim() == 4 && keys.is_contiguous() && keys.is_cpu() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kChar) &&
                  keys.size(1) == heads && keys.size(3) == dim,
              "keys must be a contiguous (U, Hm, S, D) float32 or int8 CPU tensor");
  const int64_t units = keys.size(0), size = keys.size(2);
  check_store(blocks.dim() == 3 && blocks.scalar_type() == at::kLong && blocks.is_contiguous() &&
                  blocks.size(0) == heads && blocks.size(1) == rows && blocks.is_cpu(),
              "blocks must be a contiguous (Hm, R, KB) int64 CPU tensor");
  for (const at::Tensor* t : {&block_slot, &block_len}) {
    check_store(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous() &&
                    t->size(0) == units && t->is_cpu(),
                "block_slot and block_len must be contiguous (U,) int64 CPU tensors");
  }
  check_store(k >= 1, "k must be at least 1");
  const int64_t* ids = blocks.data_ptr<int64_t>();
  for (int64_t i = 0, n = blocks.numel(); i < n; ++i) {
    check_store(ids[i] >= -1 && ids[i] < units, "a block id is outside [-1, U)");
  }
  const int64_t* lens = block_len.data_ptr<int64_t>();
  for (int64_t u = 0; u < units; ++u) {
    check_store(lens[u] >= 0 && lens[u] <= size, "a block length is outside [0, S]");
  }
  at::Tensor scores = at::empty({heads, rows, k}, q.options());
  at::Tensor indices = at::empty({heads, rows, k}, q.options().dtype(at::kLong));
  if (heads * rows > 0) {
    l2m::BlockCandidatesParams params{};
    params.int8_keys = keys.scalar_type() == at::kChar;
    params.heads = heads;
    params.rows = rows;
    params.num_blocks = units;
    params.block_size = size;
    params.dim = dim;
    params.num_selected = blocks.size(2);
    params.k = k;
    params.q = q.data_ptr<float>();
    params.keys = keys.data_ptr();
    params.blocks = ids;
    params.block_slot = block_slot.data_ptr<int64_t>();
    params.block_len = lens;
    params.scores = scores.data_ptr<float>();
    params.indices = indices.data_ptr<int64_t>();
    kernels().block_candidates_topk_fwd(params);
  }
  return {scores, indices};
}

// The read of a selection (topk_values_read_fwd): scores (Hm, R, k) float32 and indices
// (Hm, R, k) int64 in [-1, N), contiguous; values (Hm, N, Dv) float32/float16/bfloat16/float64,
// int8 or uint8 (the bytes of float8_e4m3fn) with a contiguous last dimension; value_scale
// (Hm, N) float32, required for int8 and uint8 values only. Returns out (Hm, R, Dv), weights
// (Hm, R, k) and lse (Hm, R), float32.
std::vector<at::Tensor> topk_values_read(const at::Tensor& scores, const at::Tensor& indices,
                                         const at::Tensor& values,
                                         const std::optional<at::Tensor>& value_scale) {
  check_store(scores.dim() == 3 && scores.scalar_type() == at::kFloat && scores.is_contiguous() &&
                  scores.is_cpu(),
              "scores must be a contiguous (Hm, R, k) float32 CPU tensor");
  const int64_t heads = scores.size(0), rows = scores.size(1), k = scores.size(2);
  check_store(indices.sizes() == scores.sizes() && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous() && indices.is_cpu(),
              "indices must be a contiguous int64 CPU tensor of scores' shape");
  check_store(values.dim() == 3 && values.is_cpu() && values.size(0) == heads &&
                  (values.size(2) <= 1 || values.stride(2) == 1),
              "values must be an (Hm, N, Dv) CPU tensor with a contiguous last dimension");
  const int64_t slots = values.size(1), dim = values.size(2);
  l2m::StoredValues type;
  switch (values.scalar_type()) {
    case at::kFloat: type = l2m::StoredValues::kFloat32; break;
    case at::kHalf: type = l2m::StoredValues::kFloat16; break;
    case at::kBFloat16: type = l2m::StoredValues::kBFloat16; break;
    case at::kDouble: type = l2m::StoredValues::kFloat64; break;
    case at::kChar: type = l2m::StoredValues::kInt8; break;
    case at::kByte: type = l2m::StoredValues::kFloat8E4M3; break;
    default: check_store(false, "values must be float32, float16, bfloat16, float64, int8 or uint8");
  }
  const bool quantized = type == l2m::StoredValues::kInt8 || type == l2m::StoredValues::kFloat8E4M3;
  check_store(value_scale.has_value() == quantized,
              "value_scale is required for int8 and uint8 (float8) values, and only for them");
  if (quantized) {
    check_store(value_scale->dim() == 2 && value_scale->size(0) == heads &&
                    value_scale->size(1) == slots && value_scale->scalar_type() == at::kFloat &&
                    value_scale->is_cpu(),
                "value_scale must be an (Hm, N) float32 CPU tensor");
  }
  const int64_t* ids = indices.data_ptr<int64_t>();
  for (int64_t i = 0, n = indices.numel(); i < n; ++i) {
    check_store(ids[i] >= -1 && ids[i] < slots, "an index is outside [-1, N)");
  }
  at::Tensor out = at::empty({heads, rows, dim}, scores.options());
  at::Tensor weights = at::empty({heads, rows, k}, scores.options());
  at::Tensor lse = at::empty({heads, rows}, scores.options());
  if (heads * rows > 0) {
    l2m::TopkValuesReadParams params{};
    params.heads = heads;
    params.rows = rows;
    params.k = k;
    params.slots = slots;
    params.dim = dim;
    params.scores = scores.data_ptr<float>();
    params.indices = ids;
    params.value_type = type;
    params.values = values.data_ptr();
    params.value_strides[0] = values.stride(0);
    params.value_strides[1] = values.stride(1);
    if (quantized) {
      params.value_scale = value_scale->data_ptr<float>();
      params.value_scale_strides[0] = value_scale->stride(0);
      params.value_scale_strides[1] = value_scale->stride(1);
    }
    params.out = out.data_ptr<float>();
    params.weights = weights.data_ptr<float>();
    params.lse = lse.data_ptr<float>();
    kernels().topk_values_read_fwd(params);
  }
  return {out, weights, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "l2m-kernels CPU (C++/OpenMP) kernels. Low-level: call through l2m_kernels.";

  // The torch this binary was compiled against: the C++ ABI is only stable within one release,
  // so the Python layer compares this with torch.__version__ before using the extension.
  m.attr("TORCH_VERSION") = L2M_TORCH_VERSION;
  // What the build that produced this binary made. Kept in the binary (not in a generated .py
  // file) so it can never disagree with the extension actually loaded.
  py::dict build_info;
  build_info["torch"] = L2M_TORCH_VERSION;
  build_info["cpu_ext"] = true;
  build_info["cpu_arch"] = L2M_CPU_ARCH;  // -march of the default variant; "" none
#ifdef _OPENMP
  build_info["openmp"] = true;
#else
  build_info["openmp"] = false;
#endif
  build_info["cuda_ext"] = static_cast<bool>(L2M_CUDA_EXT);  // _C_cuda built by the same setup.py
  build_info["cuda_archs"] = L2M_CUDA_ARCHS;                  // TORCH_CUDA_ARCH_LIST used for it
  py::list cpu_isas;
  for (const IsaVariant& variant : built_variants()) {
    cpu_isas.append(variant.name);
  }
  build_info["cpu_isas"] = cpu_isas;  // instruction-set variants of the kernels, lowest first
  m.attr("BUILD_INFO") = build_info;

  // The variant: L2M_CPU_ISA, else the best this CPU runs (see auto_variant). A name that cannot
  // be honoured fails the import with the reason: l2m_kernels then reports the CPU backend as
  // unavailable with that reason, instead of running other code than asked for.
  const std::string requested = requested_isa();
  try {
    set_isa(requested);
  } catch (const std::exception& error) {
    throw py::import_error("L2M_CPU_ISA=" + requested + ": " + error.what());
  }
  m.def("isa", [] { return std::string(active_variant.load()->name); },
        "The instruction-set variant of the kernels in use: default, avx2 or avx512.");
  m.def("isa_info", &isa_info,
        "dict: active, requested (L2M_CPU_ISA or auto), auto (the variant auto picks here),\n"
        "torch_capability, march (built variant -> -march), unusable (variant -> why this CPU\n"
        "cannot run it).");
  m.def(
      "_set_stream_stores",
      [](bool enabled) { l2m::cpu::g_stream_stores.store(enabled, std::memory_order_relaxed); },
      py::arg("enabled"),
      "Whether the kernels write their large float32 outputs with streaming stores (set by\n"
      "l2m_kernels._alloc: on while the output cache keeps those outputs' pages warm).");
  m.def("_stream_stores", [] { return l2m::cpu::g_stream_stores.load(std::memory_order_relaxed); },
        "Whether the kernels stream their large outputs (see _set_stream_stores).");
  m.def("_set_isa", &set_isa, py::arg("name"),
        "Switch the kernels to another built variant (default, avx2, avx512, or auto) and return\n"
        "its name; ValueError for an unknown or unbuilt name, RuntimeError for a variant this CPU\n"
        "cannot run. For tests: calls already running finish on the variant they started with.");

  // The ops (csrc/common/binding.h), run with the GIL released.
  l2m::binding::def_ops(m, py::call_guard<py::gil_scoped_release>());

  // MemoryStore reads (l2m_kernels.memory), internal: validated by their Python callers.
  m.def("_store_int8_topk", &store_int8_topk, py::arg("q"), py::arg("keys"),
        py::arg("key_abs"), py::arg("key_sum"), py::arg("k"), py::arg("q_refine") = py::none(),
        py::arg("refine_keys") = py::none(), py::arg("slack") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("_store_block_candidates_topk", &store_block_candidates_topk, py::arg("q"),
        py::arg("keys"), py::arg("blocks"), py::arg("block_slot"), py::arg("block_len"),
        py::arg("k"), py::call_guard<py::gil_scoped_release>());
  m.def("_topk_values_read", &topk_values_read, py::arg("scores"), py::arg("indices"),
        py::arg("values"), py::arg("value_scale") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
