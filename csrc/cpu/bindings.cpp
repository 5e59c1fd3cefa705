// Python bindings of the CPU extension `l2m_kernels._C`: tensor checks, then the plain-struct
// launchers of the op headers, called through the dispatch table (kernels.h) of the
// instruction-set variant chosen at import (see "Instruction-set variants" below). The Python
// layer validates first; these checks are the last line that keeps a bad call from reading or
// writing out of bounds. Every function returns None, writes every element of its preallocated
// outputs (passed last) and runs with the GIL released.
#include <algorithm>
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>

#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

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
  if (capability == "DEFAULT") {
    return 0;
  }
  if (capability == "AVX2") {
    return 1;
  }
  return 2;
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
  const char* requested = std::getenv("L2M_CPU_ISA");
  py::dict info;
  info["active"] = active_variant.load()->name;
  info["requested"] = requested != nullptr && *requested != '\0' ? requested : "auto";
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

c10::ScalarType acc_dtype_for(c10::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// "(4, 8)". Formatted here rather than by streaming tensor.sizes() into TORCH_CHECK: with
// torch 2.11 (cu130 wheel, gcc 13) that stream crashed the process instead of raising.
std::string shape_of(const at::Tensor& tensor) {
  std::string text = "(";
  for (int64_t axis = 0; axis < tensor.dim(); ++axis) {
    text += (axis ? ", " : "") + std::to_string(tensor.size(axis));
  }
  return text + (tensor.dim() == 1 ? ",)" : ")");
}

// `strided_rows`: a (B, H, T, D) operand the kernel reads through l2m::cpu::Rows, which needs only
// its last dimension contiguous (or, `broadcast_last`, of stride 0 too); every other operand must
// be contiguous.
void check_storage(const at::Tensor& tensor, const char* op, const char* name,
                   bool strided_rows = false, bool broadcast_last = false) {
  TORCH_CHECK_VALUE(tensor.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), op, ": ", name, " must be on the cpu, got ",
                    c10::DeviceTypeName(tensor.device().type(), /*lower_case=*/true));
  TORCH_CHECK_VALUE(tensor.layout() == at::kStrided, op, ": ", name,
                    " must be a strided (dense) tensor");
  if (strided_rows) {
    TORCH_CHECK_VALUE(tensor.dim() == 0 || tensor.numel() == 0 || tensor.stride(-1) == 1 ||
                          tensor.size(-1) <= 1 || (broadcast_last && tensor.stride(-1) == 0),
                      op, ": ", name, " must have a contiguous last dimension (stride 1",
                      broadcast_last ? " or 0" : "", "), got stride ",
                      tensor.dim() == 0 ? 0 : tensor.stride(-1));
  } else {
    TORCH_CHECK_VALUE(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK_VALUE(!tensor.is_neg() && !tensor.is_conj(), op, ": ", name,
                    " must not be a lazily negated or conjugated view");
}

// A (rows, dim) tensor of `dtype`.
void check_rows(const at::Tensor& tensor, const char* op, const char* name, c10::ScalarType dtype,
                int64_t rows, int64_t dim) {
  check_storage(tensor, op, name);
  TORCH_CHECK_VALUE(tensor.dim() == 2 && tensor.size(0) == rows && tensor.size(1) == dim, op,
                    ": ", name, " must have shape (", rows, ", ", dim, "), got ", shape_of(tensor));
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype,
                   ", got ", tensor.scalar_type());
}

// A (rows,) tensor of `dtype`.
void check_row_scalars(const at::Tensor& tensor, const char* op, const char* name,
                       c10::ScalarType dtype, int64_t rows) {
  check_storage(tensor, op, name);
  TORCH_CHECK_VALUE(tensor.dim() == 1 && tensor.size(0) == rows, op, ": ", name,
                    " must have shape (", rows, ",), got ", shape_of(tensor));
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype,
                   ", got ", tensor.scalar_type());
}

// The first (R, D) argument fixes R, D and the storage dtype.
void check_first_rows(const at::Tensor& tensor, const char* op, const char* name) {
  check_storage(tensor, op, name);
  TORCH_CHECK_VALUE(tensor.dim() == 2, op, ": ", name, " must have shape (R, D), got ",
                    shape_of(tensor));
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// Outputs may alias an input exactly (every element is read before it is written) but must not
// overlap one partially, nor overlap each other.
void check_outputs_apart(std::initializer_list<const at::Tensor*> outputs,
                         std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* output : outputs) {
    for (const at::Tensor* input : inputs) {
      at::assert_no_partial_overlap(*output, *input);
    }
    for (const at::Tensor* other : outputs) {
      if (other != output) {
        at::assert_no_overlap(*output, *other);
      }
    }
  }
}

void merge_attention_fwd(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                         const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse) {
  constexpr const char* op = "merge_attention_fwd";
  check_first_rows(out_a, op, "out_a");
  const auto dtype = out_a.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t rows = out_a.size(0), dim = out_a.size(1);
  check_row_scalars(lse_a, op, "lse_a", acc, rows);
  check_rows(out_b, op, "out_b", dtype, rows, dim);
  check_row_scalars(lse_b, op, "lse_b", acc, rows);
  check_rows(out, op, "out", dtype, rows, dim);
  check_row_scalars(lse, op, "lse", acc, rows);
  check_outputs_apart({&out, &lse}, {&out_a, &lse_a, &out_b, &lse_b});
  if (rows == 0) {
    return;
  }
  l2m::cpu::MergeAttentionFwdParams params{};
  params.dtype = dtype;
  params.rows = rows;
  params.dim = dim;
  params.out_a = out_a.const_data_ptr();
  params.lse_a = lse_a.const_data_ptr();
  params.out_b = out_b.const_data_ptr();
  params.lse_b = lse_b.const_data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr();
  kernels().merge_attention_fwd(params);
}

void merge_attention_bwd(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out_a,
                         const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b,
                         const at::Tensor& lse, const at::Tensor& d_out_a,
                         const at::Tensor& d_lse_a, const at::Tensor& d_out_b,
                         const at::Tensor& d_lse_b) {
  constexpr const char* op = "merge_attention_bwd";
  check_first_rows(dout, op, "dout");
  const auto dtype = dout.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t rows = dout.size(0), dim = dout.size(1);
  check_row_scalars(dlse, op, "dlse", acc, rows);
  check_rows(out_a, op, "out_a", dtype, rows, dim);
  check_row_scalars(lse_a, op, "lse_a", acc, rows);
  check_rows(out_b, op, "out_b", dtype, rows, dim);
  check_row_scalars(lse_b, op, "lse_b", acc, rows);
  check_row_scalars(lse, op, "lse", acc, rows);
  check_rows(d_out_a, op, "d_out_a", dtype, rows, dim);
  check_row_scalars(d_lse_a, op, "d_lse_a", acc, rows);
  check_rows(d_out_b, op, "d_out_b", dtype, rows, dim);
  check_row_scalars(d_lse_b, op, "d_lse_b", acc, rows);
  check_outputs_apart({&d_out_a, &d_lse_a, &d_out_b, &d_lse_b},
                      {&dout, &dlse, &out_a, &lse_a, &out_b, &lse_b, &lse});
  if (rows == 0) {
    return;
  }
  l2m::cpu::MergeAttentionBwdParams params{};
  params.dtype = dtype;
  params.rows = rows;
  params.dim = dim;
  params.dout = dout.const_data_ptr();
  params.dlse = dlse.const_data_ptr();
  params.out_a = out_a.const_data_ptr();
  params.lse_a = lse_a.const_data_ptr();
  params.out_b = out_b.const_data_ptr();
  params.lse_b = lse_b.const_data_ptr();
  params.lse = lse.const_data_ptr();
  params.d_out_a = d_out_a.data_ptr();
  params.d_lse_a = d_lse_a.data_ptr();
  params.d_out_b = d_out_b.data_ptr();
  params.d_lse_b = d_lse_b.data_ptr();
  kernels().merge_attention_bwd(params);
}

void gated_merge_fwd(const at::Tensor& out_local, const at::Tensor& out_mem,
                     const at::Tensor& gate, const at::Tensor& out) {
  constexpr const char* op = "gated_merge_fwd";
  check_first_rows(out_local, op, "out_local");
  const auto dtype = out_local.scalar_type();
  const int64_t rows = out_local.size(0), dim = out_local.size(1);
  check_rows(out_mem, op, "out_mem", dtype, rows, dim);
  check_row_scalars(gate, op, "gate", dtype, rows);
  check_rows(out, op, "out", dtype, rows, dim);
  check_outputs_apart({&out}, {&out_local, &out_mem, &gate});
  if (rows == 0) {
    return;
  }
  l2m::cpu::GatedMergeFwdParams params{};
  params.dtype = dtype;
  params.rows = rows;
  params.dim = dim;
  params.out_local = out_local.const_data_ptr();
  params.out_mem = out_mem.const_data_ptr();
  params.gate = gate.const_data_ptr();
  params.out = out.data_ptr();
  kernels().gated_merge_fwd(params);
}

void gated_merge_bwd(const at::Tensor& dout, const at::Tensor& out_local, const at::Tensor& out_mem,
                     const at::Tensor& gate, const at::Tensor& d_local, const at::Tensor& d_mem,
                     const at::Tensor& d_gate) {
  constexpr const char* op = "gated_merge_bwd";
  check_first_rows(dout, op, "dout");
  const auto dtype = dout.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t rows = dout.size(0), dim = dout.size(1);
  check_rows(out_local, op, "out_local", dtype, rows, dim);
  check_rows(out_mem, op, "out_mem", dtype, rows, dim);
  check_row_scalars(gate, op, "gate", dtype, rows);
  check_rows(d_local, op, "d_local", dtype, rows, dim);
  check_rows(d_mem, op, "d_mem", dtype, rows, dim);
  check_row_scalars(d_gate, op, "d_gate", acc, rows);
  check_outputs_apart({&d_local, &d_mem, &d_gate}, {&dout, &out_local, &out_mem, &gate});
  if (rows == 0) {
    return;
  }
  l2m::cpu::GatedMergeBwdParams params{};
  params.dtype = dtype;
  params.rows = rows;
  params.dim = dim;
  params.dout = dout.const_data_ptr();
  params.out_local = out_local.const_data_ptr();
  params.out_mem = out_mem.const_data_ptr();
  params.gate = gate.const_data_ptr();
  params.d_local = d_local.data_ptr();
  params.d_mem = d_mem.data_ptr();
  params.d_gate = d_gate.data_ptr();
  kernels().gated_merge_bwd(params);
}


// ---- topk_memory_read (topk_read.h, /work/notes/topk_cpu.md) ----
// Error messages are assembled as one std::string (no integers or sizes streamed into
// TORCH_CHECK: see shape_of).

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string text = "(";
  for (size_t axis = 0; axis < dims.size(); ++axis) {
    text += (axis ? ", " : "") + std::to_string(dims[axis]);
  }
  return text + (dims.size() == 1 ? ",)" : ")");
}

std::string dtype_text(c10::ScalarType dtype) {
  return c10::toString(dtype);
}

// A tensor of exactly `dims` and `dtype`; `dims_names` spells the expected shape, e.g. "(B, H, T)".
void check_tensor(const at::Tensor& tensor, const char* op, const char* name,
                  c10::ScalarType dtype, const std::vector<int64_t>& dims, const char* dims_names,
                  bool strided_rows = false, bool broadcast_last = false) {
  check_storage(tensor, op, name, strided_rows, broadcast_last);
  bool same_shape = tensor.dim() == static_cast<int64_t>(dims.size());
  for (size_t axis = 0; same_shape && axis < dims.size(); ++axis) {
    same_shape = tensor.size(static_cast<int64_t>(axis)) == dims[axis];
  }
  if (!same_shape) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": " + name + " must have shape " + dims_names +
                                 " = " + dims_text(dims) + ", got " + shape_of(tensor));
  }
  if (tensor.scalar_type() != dtype) {
    TORCH_CHECK_TYPE(false, std::string(op) + ": " + name + " must have dtype " +
                                dtype_text(dtype) + ", got " + dtype_text(tensor.scalar_type()));
  }
}

// Where the rows of a checked (B, H, T, D) operand start (rows.h).
l2m::cpu::Rows rows_of(const at::Tensor& tensor) {
  const int64_t heads = tensor.size(1), seq_len = tensor.size(2);
  if (tensor.is_contiguous()) {
    return l2m::cpu::Rows::contiguous(heads, seq_len, tensor.size(3));
  }
  return l2m::cpu::Rows::strided(heads, seq_len, tensor.stride(0), tensor.stride(1),
                                 tensor.stride(2));
}

// q fixes B, H, T, Dk and the storage dtype; its rows may have any strides (rows_of).
void check_query(const at::Tensor& q, const char* op, const char* name) {
  check_storage(q, op, name, /*strided_rows=*/true);
  if (q.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": " + name +
                                 " must have shape (B, H, T, Dk), got " + shape_of(q));
  }
  const auto dtype = q.scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
        dtype == at::kBFloat16)) {
    TORCH_CHECK_TYPE(false, std::string(op) + ": " + name +
                                " must be float32, float64, float16 or bfloat16, got " +
                                dtype_text(dtype));
  }
}

struct MemoryShape {
  int64_t mem_heads;
  int64_t num_slots;
  bool shared;
};

// keys (B, Hm, N, Dk) or shared (Hm, N, Dk) with H % Hm == 0; values the same leading shape.
MemoryShape check_memory(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                         const char* op) {
  const auto dtype = q.scalar_type();
  const int64_t batch = q.size(0), heads = q.size(1), dim_k = q.size(3);
  check_storage(keys, op, "keys");
  if (keys.dim() != 3 && keys.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": keys must have shape (B, Hm, N, Dk) or " +
                                 "(Hm, N, Dk), got " + shape_of(keys));
  }
  const bool shared = keys.dim() == 3;
  const int64_t mem_heads = keys.size(-3), num_slots = keys.size(-2);
  if (mem_heads < 1 || heads % mem_heads != 0) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": the memory head count Hm = " +
                                 std::to_string(mem_heads) + " must divide H = " +
                                 std::to_string(heads) + " (keys " + shape_of(keys) + ")");
  }
  if (shared) {
    check_tensor(keys, op, "keys", dtype, {mem_heads, num_slots, dim_k}, "(Hm, N, Dk)");
  } else {
    check_tensor(keys, op, "keys", dtype, {batch, mem_heads, num_slots, dim_k}, "(B, Hm, N, Dk)");
  }
  check_storage(values, op, "values");
  if (values.dim() != keys.dim()) {
    TORCH_CHECK_VALUE(false, std::string(op) +
                                 ": values must have keys' leading shape + (Dv,), got " +
                                 shape_of(values) + " for keys " + shape_of(keys));
  }
  const int64_t dim_v = values.size(-1);
  if (shared) {
    check_tensor(values, op, "values", dtype, {mem_heads, num_slots, dim_v}, "(Hm, N, Dv)");
  } else {
    check_tensor(values, op, "values", dtype, {batch, mem_heads, num_slots, dim_v},
                 "(B, Hm, N, Dv)");
  }
  return {mem_heads, num_slots, shared};
}

void check_apart(std::initializer_list<const at::Tensor*> outputs,
                 std::initializer_list<const at::Tensor*> inputs) {
  // Unlike the row-wise merges, these kernels read inputs (values, keys) for other rows after
  // writing outputs: no overlap at all.
  for (const at::Tensor* output : outputs) {
    for (const at::Tensor* input : inputs) {
      at::assert_no_overlap(*output, *input);
    }
    for (const at::Tensor* other : outputs) {
      if (other != output) {
        at::assert_no_overlap(*output, *other);
      }
    }
  }
}

void topk_read_fwd(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                   const std::optional<at::Tensor>& valid_len, int64_t k, double scale,
                   const at::Tensor& out, const at::Tensor& indices, const at::Tensor& weights,
                   const at::Tensor& lse) {
  constexpr const char* op = "topk_read_fwd";
  check_query(q, op, "q");
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), dim_k = q.size(3);
  const MemoryShape memory = check_memory(q, keys, values, op);
  const int64_t num_slots = memory.num_slots, dim_v = values.size(-1);
  const int64_t max_k = std::min<int64_t>(num_slots, 256);
  if (k < 1 || k > max_k) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": k must be in [1, min(N, 256)] = [1, " +
                                 std::to_string(max_k) + "], got " + std::to_string(k));
  }
  if (valid_len.has_value()) {
    check_tensor(*valid_len, op, "valid_len", at::kLong, {batch}, "(B,)");
  }
  check_tensor(out, op, "out", dtype, {batch, heads, seq_len, dim_v}, "(B, H, T, Dv)");
  check_tensor(indices, op, "indices", at::kLong, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(weights, op, "weights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(lse, op, "lse", acc, {batch, heads, seq_len}, "(B, H, T)");
  if (valid_len.has_value()) {
    check_apart({&out, &indices, &weights, &lse}, {&q, &keys, &values, &*valid_len});
  } else {
    check_apart({&out, &indices, &weights, &lse}, {&q, &keys, &values});
  }
  if (batch == 0 || heads == 0 || seq_len == 0) {
    return;
  }
  l2m::cpu::TopkReadFwdParams params{};
  params.dtype = dtype;
  params.batch = batch;
  params.heads = heads;
  params.seq_len = seq_len;
  params.mem_heads = memory.mem_heads;
  params.num_slots = num_slots;
  params.dim_k = dim_k;
  params.dim_v = dim_v;
  params.k = k;
  params.shared_memory = memory.shared;
  params.scale = scale;
  params.q = q.const_data_ptr();
  params.q_rows = rows_of(q);
  params.keys = keys.const_data_ptr();
  params.values = values.const_data_ptr();
  params.valid_len = valid_len.has_value() ? valid_len->const_data_ptr<int64_t>() : nullptr;
  params.out = out.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.weights = weights.data_ptr();
  params.lse = lse.data_ptr();
  kernels().topk_read_fwd(params);
}

void topk_read_bwd(const at::Tensor& dout, const at::Tensor& dweights, const at::Tensor& dlse,
                   const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                   const at::Tensor& indices, const at::Tensor& weights, double scale,
                   const at::Tensor& dq, const at::Tensor& dkeys, const at::Tensor& dvalues) {
  constexpr const char* op = "topk_read_bwd";
  check_query(q, op, "q");
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), dim_k = q.size(3);
  const MemoryShape memory = check_memory(q, keys, values, op);
  const int64_t num_slots = memory.num_slots, dim_v = values.size(-1);
  check_storage(indices, op, "indices");
  if (indices.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": indices must have shape (B, H, T, k), got " +
                                 shape_of(indices));
  }
  const int64_t k = indices.size(3);
  check_tensor(indices, op, "indices", at::kLong, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(dout, op, "dout", dtype, {batch, heads, seq_len, dim_v}, "(B, H, T, Dv)",
               /*strided_rows=*/true);
  check_tensor(dweights, op, "dweights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(dlse, op, "dlse", acc, {batch, heads, seq_len}, "(B, H, T)");
  check_tensor(weights, op, "weights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(dq, op, "dq", dtype, q.sizes().vec(), "like q");
  check_tensor(dkeys, op, "dkeys", dtype, keys.sizes().vec(), "like keys");
  check_tensor(dvalues, op, "dvalues", dtype, values.sizes().vec(), "like values");
  check_apart({&dq, &dkeys, &dvalues},
              {&dout, &dweights, &dlse, &q, &keys, &values, &indices, &weights});
  // The slots are used as addresses: every one must be -1 or name an existing row.
  const int64_t* slot_ids = indices.const_data_ptr<int64_t>();
  const int64_t num_indices = indices.numel();
  for (int64_t i = 0; i < num_indices; ++i) {
    if (slot_ids[i] < -1 || slot_ids[i] >= num_slots) {
      TORCH_CHECK_INDEX(false, std::string(op) + ": indices must be -1 or in [0, N) with N = " +
                                   std::to_string(num_slots) + ", got " +
                                   std::to_string(slot_ids[i]));
    }
  }
  l2m::cpu::TopkReadBwdParams params{};
  params.dtype = dtype;
  params.batch = batch;
  params.heads = heads;
  params.seq_len = seq_len;
  params.mem_heads = memory.mem_heads;
  params.num_slots = num_slots;
  params.dim_k = dim_k;
  params.dim_v = dim_v;
  params.k = k;
  params.shared_memory = memory.shared;
  params.scale = scale;
  params.dout = dout.const_data_ptr();
  params.dout_rows = rows_of(dout);
  params.dweights = dweights.const_data_ptr();
  params.dlse = dlse.const_data_ptr();
  params.q = q.const_data_ptr();
  params.q_rows = rows_of(q);
  params.keys = keys.const_data_ptr();
  params.values = values.const_data_ptr();
  params.indices = slot_ids;
  params.weights = weights.const_data_ptr();
  params.dq = dq.data_ptr();
  params.dkeys = dkeys.data_ptr();
  params.dvalues = dvalues.data_ptr();
  // Runs even without queries: dkeys and dvalues (shared memories) must still be zeroed.
  kernels().topk_read_bwd(params);
}

// ---- product_key_read (product_key.h) ----

struct SubkeyShape {
  int64_t num_sub;
  int64_t dim_v;
};

// q (B, H, T, Dk) with Dk even; subkeys (H, 2, n_sub, Dk / 2); values (n_sub ** 2, Dv).
SubkeyShape check_product_key_inputs(const at::Tensor& q, const at::Tensor& subkeys,
                                     const at::Tensor& values, const char* op) {
  check_query(q, op, "q");
  const auto dtype = q.scalar_type();
  const int64_t heads = q.size(1), dim_k = q.size(3);
  if (dim_k % 2 != 0) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": q's feature size Dk must be even, got q " +
                                 shape_of(q));
  }
  check_storage(subkeys, op, "subkeys");
  if (subkeys.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": subkeys must have shape (H, 2, n_sub, Dk / 2)," +
                                 " got " + shape_of(subkeys));
  }
  const int64_t num_sub = subkeys.size(2);
  check_tensor(subkeys, op, "subkeys", dtype, {heads, 2, num_sub, dim_k / 2},
               "(H, 2, n_sub, Dk / 2)");
  if (num_sub < 1 || num_sub > (int64_t(1) << 31)) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": n_sub must be in [1, 2 ** 31], got " +
                                 std::to_string(num_sub));
  }
  check_storage(values, op, "values");
  if (values.dim() != 2) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": values must have shape (n_sub ** 2, Dv), got " +
                                 shape_of(values));
  }
  const int64_t dim_v = values.size(1);
  check_tensor(values, op, "values", dtype, {num_sub * num_sub, dim_v}, "(n_sub ** 2, Dv)");
  return {num_sub, dim_v};
}

std::vector<int64_t> product_key_out_dims(const at::Tensor& q, bool sum_heads, int64_t dim_v) {
  if (sum_heads) {
    return {q.size(0), q.size(2), dim_v};
  }
  return {q.size(0), q.size(1), q.size(2), dim_v};
}

void product_key_fwd(const at::Tensor& q, const at::Tensor& subkeys, const at::Tensor& values,
                     int64_t k, int64_t k_sub, double scale, bool sum_heads, const at::Tensor& out,
                     const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& lse) {
  constexpr const char* op = "product_key_fwd";
  const SubkeyShape shape = check_product_key_inputs(q, subkeys, values, op);
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2);
  if (k_sub < 1 || k_sub > shape.num_sub) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": k_sub must be in [1, n_sub] = [1, " +
                                 std::to_string(shape.num_sub) + "], got " +
                                 std::to_string(k_sub));
  }
  if (k < 1 || k > k_sub * k_sub) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": k must be in [1, k_sub ** 2] = [1, " +
                                 std::to_string(k_sub * k_sub) + "], got " + std::to_string(k));
  }
  check_tensor(out, op, "out", dtype, product_key_out_dims(q, sum_heads, shape.dim_v),
               sum_heads ? "(B, T, Dv)" : "(B, H, T, Dv)");
  check_tensor(indices, op, "indices", at::kLong, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(weights, op, "weights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(lse, op, "lse", acc, {batch, heads, seq_len}, "(B, H, T)");
  check_apart({&out, &indices, &weights, &lse}, {&q, &subkeys, &values});
  if (batch == 0 || seq_len == 0) {
    return;
  }
  if (heads == 0) {
    out.zero_();  // a sum over no heads
    return;
  }
  l2m::cpu::ProductKeyFwdParams params{};
  params.dtype = dtype;
  params.batch = batch;
  params.heads = heads;
  params.seq_len = seq_len;
  params.dim_k = q.size(3);
  params.num_sub = shape.num_sub;
  params.dim_v = shape.dim_v;
  params.k = k;
  params.k_sub = k_sub;
  params.sum_heads = sum_heads;
  params.scale = scale;
  params.q = q.const_data_ptr();
  params.q_rows = rows_of(q);
  params.subkeys = subkeys.const_data_ptr();
  params.values = values.const_data_ptr();
  params.out = out.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.weights = weights.data_ptr();
  params.lse = lse.data_ptr();
  kernels().product_key_fwd(params);
}

void product_key_bwd(const at::Tensor& dout, const at::Tensor& dweights, const at::Tensor& dlse,
                     const at::Tensor& q, const at::Tensor& subkeys, const at::Tensor& values,
                     const at::Tensor& indices, const at::Tensor& weights, double scale,
                     bool sum_heads, bool sparse_grad, const at::Tensor& dq,
                     const at::Tensor& dsubkeys, const at::Tensor& dvalues,
                     const std::optional<at::Tensor>& value_rows) {
  constexpr const char* op = "product_key_bwd";
  const SubkeyShape shape = check_product_key_inputs(q, subkeys, values, op);
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2);
  check_storage(indices, op, "indices");
  if (indices.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": indices must have shape (B, H, T, k), got " +
                                 shape_of(indices));
  }
  const int64_t k = indices.size(3);
  if (k < 1) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": indices must have k >= 1 entries per query, " +
                                 "got " + shape_of(indices));
  }
  check_tensor(indices, op, "indices", at::kLong, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(dout, op, "dout", dtype, product_key_out_dims(q, sum_heads, shape.dim_v),
               sum_heads ? "(B, T, Dv)" : "(B, H, T, Dv)", /*strided_rows=*/true);
  check_tensor(dweights, op, "dweights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(dlse, op, "dlse", acc, {batch, heads, seq_len}, "(B, H, T)");
  check_tensor(weights, op, "weights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(dq, op, "dq", dtype, q.sizes().vec(), "like q");
  check_tensor(dsubkeys, op, "dsubkeys", dtype, subkeys.sizes().vec(), "like subkeys");
  int64_t num_value_rows = 0;
  if (sparse_grad) {
    TORCH_CHECK_VALUE(value_rows.has_value(), std::string(op) + ": sparse_grad needs value_rows " +
                                                  "(the dvalues row of each entry)");
    check_tensor(*value_rows, op, "value_rows", at::kLong, {batch, heads, seq_len, k},
                 "(B, H, T, k)");
    check_storage(dvalues, op, "dvalues");
    num_value_rows = dvalues.dim() == 2 ? dvalues.size(0) : -1;
    check_tensor(dvalues, op, "dvalues", dtype, {num_value_rows, shape.dim_v}, "(U, Dv)");
  } else {
    TORCH_CHECK_VALUE(!value_rows.has_value(), std::string(op) + ": value_rows is only for " +
                                                   "sparse_grad");
    check_tensor(dvalues, op, "dvalues", dtype, values.sizes().vec(), "like values");
  }
  check_apart({&dq, &dsubkeys, &dvalues},
              {&dout, &dweights, &dlse, &q, &subkeys, &values, &indices, &weights});
  if (sparse_grad) {
    check_apart({&dq, &dsubkeys, &dvalues}, {&*value_rows});
    const int64_t* rows = value_rows->const_data_ptr<int64_t>();
    for (int64_t i = 0; i < value_rows->numel(); ++i) {
      if (rows[i] < 0 || rows[i] >= num_value_rows) {
        TORCH_CHECK_INDEX(false, std::string(op) + ": value_rows must be in [0, U) with U = " +
                                     std::to_string(num_value_rows) + ", got " +
                                     std::to_string(rows[i]));
      }
    }
  }
  // The slots are used as addresses: every one must name an existing row.
  const int64_t num_slots = shape.num_sub * shape.num_sub;
  const int64_t* slot_ids = indices.const_data_ptr<int64_t>();
  const int64_t num_indices = indices.numel();
  for (int64_t i = 0; i < num_indices; ++i) {
    if (slot_ids[i] < 0 || slot_ids[i] >= num_slots) {
      TORCH_CHECK_INDEX(false, std::string(op) + ": indices must be in [0, n_sub ** 2) with " +
                                   "n_sub ** 2 = " + std::to_string(num_slots) + ", got " +
                                   std::to_string(slot_ids[i]));
    }
  }
  l2m::cpu::ProductKeyBwdParams params{};
  params.dtype = dtype;
  params.batch = batch;
  params.heads = heads;
  params.seq_len = seq_len;
  params.dim_k = q.size(3);
  params.num_sub = shape.num_sub;
  params.dim_v = shape.dim_v;
  params.k = k;
  params.sum_heads = sum_heads;
  params.sparse_grad = sparse_grad;
  params.scale = scale;
  params.dout = dout.const_data_ptr();
  // With sum_heads, dout (B, T, Dv) serves every head: the (B, H, T) rows with head stride 0.
  params.dout_rows = sum_heads ? l2m::cpu::Rows::strided(heads, seq_len, dout.stride(0), 0,
                                                         dout.stride(1))
                               : rows_of(dout);
  params.dweights = dweights.const_data_ptr();
  params.dlse = dlse.const_data_ptr();
  params.q = q.const_data_ptr();
  params.q_rows = rows_of(q);
  params.subkeys = subkeys.const_data_ptr();
  params.values = values.const_data_ptr();
  params.indices = slot_ids;
  params.weights = weights.const_data_ptr();
  params.dq = dq.data_ptr();
  params.dsubkeys = dsubkeys.data_ptr();
  params.dvalues = dvalues.data_ptr();
  params.value_rows = sparse_grad ? value_rows->const_data_ptr<int64_t>() : nullptr;
  params.num_value_rows = num_value_rows;
  // Runs even without queries: dsubkeys and a dense dvalues must still be zeroed.
  kernels().product_key_bwd(params);
}

// ---- gated_memory_write (memory_write.h) ----

struct WriteShape {
  int64_t groups, num_slots, dim, steps, writes_per_step, erase_dim;
  bool indices_int32;
};

// Where the (g, t) rows of a checked write operand start (rows.h): a (B, Hm, T, .) tensor as it
// is, a (B, T, .) one as (B, 1, T, .).
l2m::cpu::Rows write_rows_of(const at::Tensor& tensor) {
  if (tensor.dim() == 4) {
    return rows_of(tensor);
  }
  if (tensor.is_contiguous()) {
    return l2m::cpu::Rows::contiguous(1, tensor.size(1), tensor.size(2));
  }
  return l2m::cpu::Rows::strided(1, tensor.size(1), tensor.stride(0), 0, tensor.stride(1));
}

// at::assert_no_overlap (check_apart) passes tensors it cannot judge, such as sliced operands,
// which are not dense; the write kernels read weights, add and erase where they lie while they
// store to their outputs. So no output may reach into the bytes between the first and the last
// element of one of those operands (a conservative test: strides are never negative).
void check_span_apart(std::initializer_list<std::pair<const char*, const at::Tensor*>> outputs,
                      std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs,
                      const char* op) {
  const auto span = [](const at::Tensor& tensor) {
    int64_t last = 0;
    for (int64_t axis = 0; axis < tensor.dim(); ++axis) {
      last += (tensor.size(axis) - 1) * tensor.stride(axis);
    }
    const auto begin = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
    const int64_t bytes = (last + 1) * static_cast<int64_t>(tensor.element_size());
    return std::make_pair(begin, begin + static_cast<uintptr_t>(bytes));
  };
  for (const auto& [output_name, output] : outputs) {
    for (const auto& [input_name, input] : inputs) {
      if (output->numel() == 0 || input->numel() == 0) {
        continue;
      }
      const auto [out_begin, out_end] = span(*output);
      const auto [in_begin, in_end] = span(*input);
      if (out_begin < in_end && in_begin < out_end) {
        TORCH_CHECK(false, std::string(op) + ": " + output_name + " overlaps " + input_name +
                               ", which is read while it is written (clone " + input_name +
                               " first)");
      }
    }
  }
}

// memory (B, Hm, N, D) or (B, N, D): its leading dimensions, (B, Hm) or (B,), are the G = B * Hm
// or B memories. indices and weights (.., T, kw); add (.., T, D); erase (.., T, D) or (.., T, 1),
// with the same leading dimensions. The leading dimensions are taken as they are rather than
// merged into G by the caller: for a transposed projection (B, Hm) -> G is not a view, and
// weights, add and erase are read in place (write_rows_of), needing only a contiguous last
// dimension; memory and indices must be contiguous. The slots are used as addresses: every index
// must be -1 or name an existing slot.
WriteShape check_write_inputs(const at::Tensor& memory, const at::Tensor& indices,
                              const at::Tensor& weights, const at::Tensor& add,
                              const at::Tensor& erase, const char* op) {
  check_storage(memory, op, "memory");
  if (memory.dim() != 3 && memory.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) +
                                 ": memory must have shape (B, Hm, N, D) or (B, N, D), got " +
                                 shape_of(memory));
  }
  const auto dtype = memory.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": memory must be float32, float64, float16 or bfloat16, got ", dtype);
  const bool heads = memory.dim() == 4;
  const std::vector<int64_t> lead(memory.sizes().begin(), memory.sizes().end() - 2);
  WriteShape shape{};
  shape.groups = heads ? lead[0] * lead[1] : lead[0];
  shape.num_slots = memory.size(-2);
  shape.dim = memory.size(-1);
  check_storage(indices, op, "indices");
  bool same_lead = indices.dim() == memory.dim();
  for (size_t axis = 0; same_lead && axis < lead.size(); ++axis) {
    same_lead = indices.size(static_cast<int64_t>(axis)) == lead[axis];
  }
  if (!same_lead) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": indices must have shape " +
                                 (heads ? "(B, Hm, T, kw)" : "(B, T, kw)") + " with " +
                                 (heads ? "(B, Hm)" : "(B,)") + " = " + dims_text(lead) +
                                 ", got " + shape_of(indices));
  }
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  shape.indices_int32 = indices.scalar_type() == at::kInt;
  shape.steps = indices.size(-2);
  shape.writes_per_step = indices.size(-1);
  const auto with_lead = [&](int64_t last) {
    std::vector<int64_t> dims = lead;
    dims.push_back(shape.steps);
    dims.push_back(last);
    return dims;
  };
  check_tensor(weights, op, "weights", dtype, indices.sizes().vec(),
               heads ? "(B, Hm, T, kw)" : "(B, T, kw)", /*strided_rows=*/true);
  check_tensor(add, op, "add", dtype, with_lead(shape.dim), heads ? "(B, Hm, T, D)" : "(B, T, D)",
               /*strided_rows=*/true);
  check_storage(erase, op, "erase", /*strided_rows=*/true);
  shape.erase_dim = erase.dim() == memory.dim() && erase.size(-1) == 1 ? 1 : shape.dim;
  check_tensor(erase, op, "erase", dtype, with_lead(shape.erase_dim),
               heads ? "(B, Hm, T, D) or (B, Hm, T, 1)" : "(B, T, D) or (B, T, 1)",
               /*strided_rows=*/true);
  // The range over all indices first (a vectorisable min/max), the message only when it fails.
  const int64_t num_indices = indices.numel();
  int64_t low = 0, high = -1;
  if (shape.indices_int32) {
    const int32_t* slots = indices.const_data_ptr<int32_t>();
    int32_t lo = 0, hi = -1;
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t i = 0; i < num_indices; ++i) {
      lo = std::min(lo, slots[i]);
      hi = std::max(hi, slots[i]);
    }
    low = lo;
    high = hi;
  } else {
    const int64_t* slots = indices.const_data_ptr<int64_t>();
#pragma omp simd reduction(min : low) reduction(max : high)
    for (int64_t i = 0; i < num_indices; ++i) {
      low = std::min(low, slots[i]);
      high = std::max(high, slots[i]);
    }
  }
  if (low < -1 || high >= shape.num_slots) {
    TORCH_CHECK_INDEX(false, std::string(op) + ": indices must be -1 or in [0, N) with N = " +
                                 std::to_string(shape.num_slots) + ", got " +
                                 std::to_string(low < -1 ? low : high));
  }
  return shape;
}

void gated_memory_write_fwd(const at::Tensor& memory, const at::Tensor& indices,
                            const at::Tensor& weights, const at::Tensor& add,
                            const at::Tensor& erase, const at::Tensor& out) {
  constexpr const char* op = "gated_memory_write_fwd";
  const WriteShape shape = check_write_inputs(memory, indices, weights, add, erase, op);
  check_tensor(out, op, "out", memory.scalar_type(), memory.sizes().vec(), "like memory");
  // out may be memory itself (in place: each slot is read before it is written), nothing else.
  at::assert_no_partial_overlap(out, memory);
  check_apart({&out}, {&indices, &weights, &add, &erase});
  check_span_apart({{"out", &out}}, {{"weights", &weights}, {"add", &add}, {"erase", &erase}}, op);
  l2m::cpu::GatedMemoryWriteFwdParams params{};
  params.dtype = memory.scalar_type();
  params.indices_int32 = shape.indices_int32;
  params.groups = shape.groups;
  params.num_slots = shape.num_slots;
  params.dim = shape.dim;
  params.steps = shape.steps;
  params.writes_per_step = shape.writes_per_step;
  params.erase_dim = shape.erase_dim;
  params.memory = memory.const_data_ptr();
  params.indices = indices.const_data_ptr();
  params.weights = weights.const_data_ptr();
  params.weight_rows = write_rows_of(weights);
  params.add = add.const_data_ptr();
  params.add_rows = write_rows_of(add);
  params.erase = erase.const_data_ptr();
  params.erase_rows = write_rows_of(erase);
  params.out = out.data_ptr();
  kernels().gated_memory_write_fwd(params);
}

void gated_memory_write_bwd(const at::Tensor& dnew, const at::Tensor& memory,
                            const at::Tensor& indices, const at::Tensor& weights,
                            const at::Tensor& add, const at::Tensor& erase,
                            const at::Tensor& dmemory, const at::Tensor& dweights,
                            const at::Tensor& dadd, const at::Tensor& derase) {
  constexpr const char* op = "gated_memory_write_bwd";
  const WriteShape shape = check_write_inputs(memory, indices, weights, add, erase, op);
  const auto dtype = memory.scalar_type();
  check_tensor(dnew, op, "dnew", dtype, memory.sizes().vec(), "like memory");
  check_tensor(dmemory, op, "dmemory", dtype, memory.sizes().vec(), "like memory");
  check_tensor(dweights, op, "dweights", dtype, weights.sizes().vec(), "like weights");
  check_tensor(dadd, op, "dadd", dtype, add.sizes().vec(), "like add");
  check_tensor(derase, op, "derase", dtype, erase.sizes().vec(), "like erase");
  check_apart({&dmemory, &dweights, &dadd, &derase},
              {&dnew, &memory, &indices, &weights, &add, &erase});
  check_span_apart({{"dmemory", &dmemory}, {"dweights", &dweights}, {"dadd", &dadd},
                    {"derase", &derase}},
                   {{"weights", &weights}, {"add", &add}, {"erase", &erase}}, op);
  l2m::cpu::GatedMemoryWriteBwdParams params{};
  params.dtype = dtype;
  params.indices_int32 = shape.indices_int32;
  params.groups = shape.groups;
  params.num_slots = shape.num_slots;
  params.dim = shape.dim;
  params.steps = shape.steps;
  params.writes_per_step = shape.writes_per_step;
  params.erase_dim = shape.erase_dim;
  params.dnew = dnew.const_data_ptr();
  params.memory = memory.const_data_ptr();
  params.indices = indices.const_data_ptr();
  params.weights = weights.const_data_ptr();
  params.weight_rows = write_rows_of(weights);
  params.add = add.const_data_ptr();
  params.add_rows = write_rows_of(add);
  params.erase = erase.const_data_ptr();
  params.erase_rows = write_rows_of(erase);
  params.dmemory = dmemory.data_ptr();
  params.dweights = dweights.data_ptr();
  params.dadd = dadd.data_ptr();
  params.derase = derase.data_ptr();
  kernels().gated_memory_write_bwd(params);
}

// ---- local attention, the local half of memory_attention (local_attention.h) ----

struct LocalShape {
  int64_t kv_heads;
  int64_t context_len;
  int64_t dim_v;
};

// q (B, H, T, D); k (B, Hkv, S, D) with H % Hkv == 0 and S >= T; v (B, Hkv, S, Dv); window -1
// (none) or >= 0.
LocalShape check_local_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              int64_t window, const char* op) {
  check_query(q, op, "q");
  const auto dtype = q.scalar_type();
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), dim = q.size(3);
  check_storage(k, op, "k", /*strided_rows=*/true);
  if (k.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": k must have shape (B, Hkv, S, D), got " +
                                 shape_of(k));
  }
  const int64_t kv_heads = k.size(1), context_len = k.size(2);
  if (kv_heads < 1 || heads % kv_heads != 0 || context_len < seq_len) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": k must have Hkv dividing H = " +
                                 std::to_string(heads) + " and S >= T = " +
                                 std::to_string(seq_len) + ", got " + shape_of(k));
  }
  check_tensor(k, op, "k", dtype, {batch, kv_heads, context_len, dim}, "(B, Hkv, S, D)",
               /*strided_rows=*/true);
  check_storage(v, op, "v", /*strided_rows=*/true);
  if (v.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": v must have shape (B, Hkv, S, Dv), got " +
                                 shape_of(v));
  }
  const int64_t dim_v = v.size(3);
  check_tensor(v, op, "v", dtype, {batch, kv_heads, context_len, dim_v}, "(B, Hkv, S, Dv)",
               /*strided_rows=*/true);
  if (window < -1) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": window must be -1 (no window) or >= 0, got " +
                                 std::to_string(window));
  }
  return {kv_heads, context_len, dim_v};
}

template <typename Params>
void fill_local_params(Params& params, const at::Tensor& q, const LocalShape& shape,
                       int64_t window, double scale) {
  params.dtype = q.scalar_type();
  params.batch = q.size(0);
  params.heads = q.size(1);
  params.kv_heads = shape.kv_heads;
  params.seq_len = q.size(2);
  params.context_len = shape.context_len;
  params.dim = q.size(3);
  params.dim_v = shape.dim_v;
  params.window = window < 0 ? shape.context_len : window;
  params.scale = scale;
}

void local_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         int64_t window, double scale, const at::Tensor& out,
                         const at::Tensor& lse) {
  constexpr const char* op = "local_attention_fwd";
  const LocalShape shape = check_local_inputs(q, k, v, window, op);
  const auto dtype = q.scalar_type();
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2);
  check_tensor(out, op, "out", dtype, {batch, heads, seq_len, shape.dim_v}, "(B, H, T, Dv)");
  check_tensor(lse, op, "lse", acc_dtype_for(dtype), {batch, heads, seq_len}, "(B, H, T)");
  check_apart({&out, &lse}, {&q, &k, &v});
  if (batch == 0 || heads == 0 || seq_len == 0) {
    return;
  }
  l2m::cpu::LocalAttentionFwdParams params{};
  fill_local_params(params, q, shape, window, scale);
  params.q = q.const_data_ptr();
  params.k = k.const_data_ptr();
  params.v = v.const_data_ptr();
  params.q_rows = rows_of(q);
  params.k_rows = rows_of(k);
  params.v_rows = rows_of(v);
  params.out = out.data_ptr();
  params.lse = lse.data_ptr();
  kernels().local_attention_fwd(params);
}

void local_attention_bwd(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                         const at::Tensor& lse, int64_t window, double scale,
                         const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  constexpr const char* op = "local_attention_bwd";
  const LocalShape shape = check_local_inputs(q, k, v, window, op);
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2);
  const std::vector<int64_t> rows_v = {batch, heads, seq_len, shape.dim_v};
  check_tensor(dout, op, "dout", dtype, rows_v, "(B, H, T, Dv)", /*strided_rows=*/true);
  check_tensor(dlse, op, "dlse", acc, {batch, heads, seq_len}, "(B, H, T)");
  check_tensor(out, op, "out", dtype, rows_v, "(B, H, T, Dv)");
  check_tensor(lse, op, "lse", acc, {batch, heads, seq_len}, "(B, H, T)");
  check_tensor(dq, op, "dq", dtype, q.sizes().vec(), "like q");
  check_tensor(dk, op, "dk", dtype, k.sizes().vec(), "like k");
  check_tensor(dv, op, "dv", dtype, v.sizes().vec(), "like v");
  check_apart({&dq, &dk, &dv}, {&dout, &dlse, &q, &k, &v, &out, &lse});
  if (batch == 0 || shape.kv_heads == 0 || shape.context_len == 0) {
    return;
  }
  l2m::cpu::LocalAttentionBwdParams params{};
  fill_local_params(params, q, shape, window, scale);
  params.dout = dout.const_data_ptr();
  params.dlse = dlse.const_data_ptr();
  params.q = q.const_data_ptr();
  params.k = k.const_data_ptr();
  params.v = v.const_data_ptr();
  params.dout_rows = rows_of(dout);
  params.q_rows = rows_of(q);
  params.k_rows = rows_of(k);
  params.v_rows = rows_of(v);
  params.out = out.const_data_ptr();
  params.lse = lse.const_data_ptr();
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  // Runs even without queries: dk and dv must still be zeroed.
  kernels().local_attention_bwd(params);
}

// The read's weights recomputed at a given selection, for the memory_attention backward
// (memory_attention.h).
void memory_read_weights(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                         const at::Tensor& indices, const at::Tensor& lse, double scale,
                         const std::optional<at::Tensor>& dout, const at::Tensor& weights,
                         const std::optional<at::Tensor>& dots,
                         const std::optional<at::Tensor>& out) {
  constexpr const char* op = "memory_read_weights";
  check_query(q, op, "q");
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2);
  const MemoryShape memory = check_memory(q, keys, values, op);
  const int64_t num_slots = memory.num_slots, dim_v = values.size(-1);
  check_storage(indices, op, "indices");
  if (indices.dim() != 4) {
    TORCH_CHECK_VALUE(false, std::string(op) + ": indices must have shape (B, H, T, k), got " +
                                 shape_of(indices));
  }
  const int64_t k = indices.size(3);
  check_tensor(indices, op, "indices", at::kLong, {batch, heads, seq_len, k}, "(B, H, T, k)");
  check_tensor(lse, op, "lse", acc, {batch, heads, seq_len}, "(B, H, T)");
  check_tensor(weights, op, "weights", acc, {batch, heads, seq_len, k}, "(B, H, T, k)");
  std::vector<const at::Tensor*> inputs = {&q, &keys, &values, &indices, &lse};
  std::vector<const at::Tensor*> outputs = {&weights};
  if (dout.has_value()) {
    check_tensor(*dout, op, "dout", dtype, {batch, heads, seq_len, dim_v}, "(B, H, T, Dv)",
                 /*strided_rows=*/true);
    TORCH_CHECK_VALUE(dots.has_value(), std::string(op) + ": dots is required with dout");
    inputs.push_back(&*dout);
  }
  if (dots.has_value()) {
    check_tensor(*dots, op, "dots", acc, {batch, heads, seq_len}, "(B, H, T)");
    outputs.push_back(&*dots);
  }
  if (out.has_value()) {
    check_tensor(*out, op, "out", dtype, {batch, heads, seq_len, dim_v}, "(B, H, T, Dv)");
    outputs.push_back(&*out);
  }
  for (const at::Tensor* output : outputs) {
    for (const at::Tensor* input : inputs) {
      at::assert_no_overlap(*output, *input);
    }
    for (const at::Tensor* other : outputs) {
      if (other != output) {
        at::assert_no_overlap(*output, *other);
      }
    }
  }
  // The slots are used as addresses: every one must be -1 or name an existing row.
  const int64_t* slot_ids = indices.const_data_ptr<int64_t>();
  const int64_t num_indices = indices.numel();
  for (int64_t i = 0; i < num_indices; ++i) {
    if (slot_ids[i] < -1 || slot_ids[i] >= num_slots) {
      TORCH_CHECK_INDEX(false, std::string(op) + ": indices must be -1 or in [0, N) with N = " +
                                   std::to_string(num_slots) + ", got " +
                                   std::to_string(slot_ids[i]));
    }
  }
  if (batch == 0 || heads == 0 || seq_len == 0 || k == 0) {
    if (dots.has_value()) {
      dots->zero_();
    }
    if (out.has_value()) {
      out->zero_();
    }
    return;
  }
  l2m::cpu::MemoryReadWeightsParams params{};
  params.dtype = dtype;
  params.batch = batch;
  params.heads = heads;
  params.seq_len = seq_len;
  params.mem_heads = memory.mem_heads;
  params.num_slots = num_slots;
  params.dim_k = q.size(3);
  params.dim_v = dim_v;
  params.k = k;
  params.shared_memory = memory.shared;
  params.scale = scale;
  params.q = q.const_data_ptr();
  params.keys = keys.const_data_ptr();
  params.values = values.const_data_ptr();
  params.indices = slot_ids;
  params.lse = lse.const_data_ptr();
  params.q_rows = rows_of(q);
  params.dout = dout.has_value() ? dout->const_data_ptr() : nullptr;
  params.dout_rows = dout.has_value() ? rows_of(*dout) : l2m::cpu::Rows{};
  params.weights = weights.data_ptr();
  params.dots = dots.has_value() ? dots->data_ptr() : nullptr;
  params.out = out.has_value() ? out->data_ptr() : nullptr;
  kernels().memory_read_weights(params);
}

// ---- gated_dense_update (dense_update.h) ----

// The four inputs: same-shape tensors of one floating dtype (broadcast by the caller), either all
// contiguous (any number of dimensions: the flat path) or 4-D views of the broadcast shape whose
// last dimension has stride 1 or 0 (the strided path; rows.h). Returns whether they are strided.
bool check_dense_inputs(const at::Tensor& memory, const at::Tensor& update,
                        const at::Tensor& input_gate, const at::Tensor& forget_gate,
                        const char* op) {
  const bool strided = !(memory.is_contiguous() && update.is_contiguous() &&
                         input_gate.is_contiguous() && forget_gate.is_contiguous());
  const std::pair<const char*, const at::Tensor*> inputs[4] = {
      {"memory", &memory}, {"update", &update}, {"input_gate", &input_gate},
      {"forget_gate", &forget_gate}};
  for (const auto& [name, input] : inputs) {
    check_storage(*input, op, name, strided, /*broadcast_last=*/true);
    if (strided && input->dim() != 4) {
      TORCH_CHECK_VALUE(false, std::string(op) + ": strided inputs must be 4-D views of the " +
                                   "broadcast shape, got " + name + " " + shape_of(*input));
    }
  }
  const auto dtype = memory.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": memory must be float32, float64, float16 or bfloat16, got ", dtype);
  const std::vector<int64_t> dims = memory.sizes().vec();
  check_tensor(update, op, "update", dtype, dims, "like memory", strided, /*broadcast_last=*/true);
  check_tensor(input_gate, op, "input_gate", dtype, dims, "like memory", strided, /*broadcast_last=*/true);
  check_tensor(forget_gate, op, "forget_gate", dtype, dims, "like memory", strided, /*broadcast_last=*/true);
  return strided;
}

l2m::cpu::DenseLayout dense_layout_of(const at::Tensor& input) {
  return {rows_of(input), input.size(3) <= 1 ? 1 : input.stride(3)};
}

// The strided path's layouts; the outputs (contiguous) must not reach into a strided input's bytes
// (the kernel reads inputs where they lie while it stores).
template <typename Params>
void fill_dense_layouts(Params& params, bool strided, const at::Tensor& memory,
                        const at::Tensor& update, const at::Tensor& input_gate,
                        const at::Tensor& forget_gate,
                        std::initializer_list<std::pair<const char*, const at::Tensor*>> outputs,
                        const char* op) {
  params.strided = strided;
  if (!strided) {
    return;
  }
  check_span_apart(outputs, {{"memory", &memory}, {"update", &update},
                             {"input_gate", &input_gate}, {"forget_gate", &forget_gate}}, op);
  params.row_len = memory.size(3);
  params.memory_layout = dense_layout_of(memory);
  params.update_layout = dense_layout_of(update);
  params.input_gate_layout = dense_layout_of(input_gate);
  params.forget_gate_layout = dense_layout_of(forget_gate);
}

void gated_dense_update_fwd(const at::Tensor& memory, const at::Tensor& update,
                            const at::Tensor& input_gate, const at::Tensor& forget_gate,
                            const at::Tensor& out) {
  constexpr const char* op = "gated_dense_update_fwd";
  const bool strided = check_dense_inputs(memory, update, input_gate, forget_gate, op);
  check_tensor(out, op, "out", memory.scalar_type(), memory.sizes().vec(), "like memory");
  // Elementwise: out may alias an input exactly (each element is read before it is written).
  check_outputs_apart({&out}, {&memory, &update, &input_gate, &forget_gate});
  l2m::cpu::GatedDenseUpdateFwdParams params{};
  params.dtype = memory.scalar_type();
  params.numel = memory.numel();
  params.memory = memory.const_data_ptr();
  params.update = update.const_data_ptr();
  params.input_gate = input_gate.const_data_ptr();
  params.forget_gate = forget_gate.const_data_ptr();
  fill_dense_layouts(params, strided, memory, update, input_gate, forget_gate, {{"out", &out}},
                     op);
  params.out = out.data_ptr();
  kernels().gated_dense_update_fwd(params);
}

void gated_dense_update_bwd(const at::Tensor& dout, const at::Tensor& memory,
                            const at::Tensor& update, const at::Tensor& input_gate,
                            const at::Tensor& forget_gate, const at::Tensor& dmemory,
                            const at::Tensor& dupdate, const at::Tensor& dinput_gate,
                            const at::Tensor& dforget_gate) {
  constexpr const char* op = "gated_dense_update_bwd";
  const bool strided = check_dense_inputs(memory, update, input_gate, forget_gate, op);
  const auto dtype = memory.scalar_type();
  const auto acc = acc_dtype_for(dtype);
  const std::vector<int64_t> dims = memory.sizes().vec();
  check_tensor(dout, op, "dout", dtype, dims, "like memory");
  check_tensor(dmemory, op, "dmemory", acc, dims, "like memory");
  check_tensor(dupdate, op, "dupdate", acc, dims, "like memory");
  check_tensor(dinput_gate, op, "dinput_gate", acc, dims, "like memory");
  check_tensor(dforget_gate, op, "dforget_gate", acc, dims, "like memory");
  // The gradients may have a different dtype than the inputs (acc): no overlap at all.
  check_apart({&dmemory, &dupdate, &dinput_gate, &dforget_gate},
              {&dout, &memory, &update, &input_gate, &forget_gate});
  l2m::cpu::GatedDenseUpdateBwdParams params{};
  params.dtype = dtype;
  params.numel = memory.numel();
  params.dout = dout.const_data_ptr();
  params.memory = memory.const_data_ptr();
  params.update = update.const_data_ptr();
  params.input_gate = input_gate.const_data_ptr();
  params.forget_gate = forget_gate.const_data_ptr();
  fill_dense_layouts(params, strided, memory, update, input_gate, forget_gate,
                     {{"dmemory", &dmemory}, {"dupdate", &dupdate}, {"dinput_gate", &dinput_gate},
                      {"dforget_gate", &dforget_gate}},
                     op);
  params.dmemory = dmemory.data_ptr();
  params.dupdate = dupdate.data_ptr();
  params.dinput_gate = dinput_gate.data_ptr();
  params.dforget_gate = dforget_gate.data_ptr();
  kernels().gated_dense_update_bwd(params);
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
  const char* requested_isa = std::getenv("L2M_CPU_ISA");
  try {
    set_isa(requested_isa != nullptr ? requested_isa : "");
  } catch (const std::exception& error) {
    throw py::import_error(std::string("L2M_CPU_ISA=") + (requested_isa ? requested_isa : "") +
                           ": " + error.what());
  }
  m.def("isa", [] { return std::string(active_variant.load()->name); },
        "The instruction-set variant of the kernels in use: default, avx2 or avx512.");
  m.def("isa_info", &isa_info,
        "dict: active, requested (L2M_CPU_ISA or auto), auto (the variant auto picks here),\n"
        "torch_capability, march (built variant -> -march), unusable (variant -> why this CPU\n"
        "cannot run it).");
  m.def("_set_isa", &set_isa, py::arg("name"),
        "Switch the kernels to another built variant (default, avx2, avx512, or auto) and return\n"
        "its name; ValueError for an unknown or unbuilt name, RuntimeError for a variant this CPU\n"
        "cannot run. For tests: calls already running finish on the variant they started with.");

  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("merge_attention_fwd", &merge_attention_fwd, release_gil, py::arg("out_a"),
        py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"), py::arg("out"), py::arg("lse"),
        "out_a, out_b, out: (R, D) dtype; lse_a, lse_b, lse: (R,) acc. Writes out and lse =\n"
        "logaddexp(lse_a, lse_b); out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.");
  m.def("merge_attention_bwd", &merge_attention_bwd, release_gil, py::arg("dout"),
        py::arg("dlse"), py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"),
        py::arg("lse"), py::arg("d_out_a"), py::arg("d_lse_a"), py::arg("d_out_b"),
        py::arg("d_lse_b"),
        "Gradients of merge_attention_fwd. (R, D) dtype: dout, out_a, out_b, d_out_a, d_out_b;\n"
        "(R,) acc: dlse, lse_a, lse_b, lse (the forward's output), d_lse_a, d_lse_b.");
  m.def("gated_merge_fwd", &gated_merge_fwd, release_gil, py::arg("out_local"),
        py::arg("out_mem"), py::arg("gate"), py::arg("out"),
        "out_local, out_mem, out: (R, D) dtype; gate: (R,) dtype logits. Writes\n"
        "out = sigmoid(gate) * out_mem + (1 - sigmoid(gate)) * out_local.");
  m.def("gated_merge_bwd", &gated_merge_bwd, release_gil, py::arg("dout"), py::arg("out_local"),
        py::arg("out_mem"), py::arg("gate"), py::arg("d_local"), py::arg("d_mem"),
        py::arg("d_gate"),
        "Gradients of gated_merge_fwd. (R, D) dtype: dout, out_local, out_mem, d_local, d_mem;\n"
        "(R,) dtype: gate; (R,) acc: d_gate.");

  m.def("topk_read_fwd", &topk_read_fwd, release_gil, py::arg("q"), py::arg("keys"),
        py::arg("values"), py::arg("valid_len"), py::arg("k"), py::arg("scale"), py::arg("out"),
        py::arg("indices"), py::arg("weights"), py::arg("lse"),
        "Sparse top-k memory read. q (B, H, T, Dk); keys (B, Hm, N, Dk) or (Hm, N, Dk); values\n"
        "the same leading shape, last Dv; valid_len None or int64 (B,); 1 <= k <= min(N, 256).\n"
        "Writes out (B, H, T, Dv) dtype, indices (B, H, T, k) int64, weights (B, H, T, k) acc,\n"
        "lse (B, H, T) acc (acc = float64 for float64 input, else float32).");
  m.def("topk_read_bwd", &topk_read_bwd, release_gil, py::arg("dout"), py::arg("dweights"),
        py::arg("dlse"), py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("indices"),
        py::arg("weights"), py::arg("scale"), py::arg("dq"), py::arg("dkeys"), py::arg("dvalues"),
        "Gradients of topk_read_fwd for its indices and weights: writes dq (like q), dkeys (like\n"
        "keys), dvalues (like values). Deterministic (slot-grouped, fixed-order reduction).");

  m.def("product_key_fwd", &product_key_fwd, release_gil, py::arg("q"), py::arg("subkeys"),
        py::arg("values"), py::arg("k"), py::arg("k_sub"), py::arg("scale"), py::arg("sum_heads"),
        py::arg("out"), py::arg("indices"), py::arg("weights"), py::arg("lse"),
        "Product-key memory read. q (B, H, T, Dk), Dk even; subkeys (H, 2, n_sub, Dk / 2); values\n"
        "(n_sub ** 2, Dv); 1 <= k_sub <= n_sub, 1 <= k <= k_sub ** 2. Writes out (B, H, T, Dv) or,\n"
        "with sum_heads, (B, T, Dv) dtype; indices (B, H, T, k) int64; weights (B, H, T, k) and\n"
        "lse (B, H, T) acc (acc = float64 for float64 input, else float32).");
  m.def("product_key_bwd", &product_key_bwd, release_gil, py::arg("dout"), py::arg("dweights"),
        py::arg("dlse"), py::arg("q"), py::arg("subkeys"), py::arg("values"), py::arg("indices"),
        py::arg("weights"), py::arg("scale"), py::arg("sum_heads"), py::arg("sparse_grad"),
        py::arg("dq"), py::arg("dsubkeys"), py::arg("dvalues"), py::arg("value_rows") = py::none(),
        "Gradients of product_key_fwd for its indices and weights: writes dq (like q), dsubkeys\n"
        "(like subkeys) and dvalues: like values (dense, every row), or with sparse_grad\n"
        "coalesced (U, Dv): entry m adds w_m * dout to row value_rows[m] (B, H, T, k) int64 in\n"
        "[0, U), one row per distinct slot. Deterministic (fixed-order reductions).");

  m.def("gated_memory_write_fwd", &gated_memory_write_fwd, release_gil, py::arg("memory"),
        py::arg("indices"), py::arg("weights"), py::arg("add"), py::arg("erase"), py::arg("out"),
        "Gated memory writes. memory (B, Hm, N, D) or (B, N, D); with its leading dims L: indices\n"
        "(*L, T, kw) int32/int64 in [-1, N), -1 = no write; weights (*L, T, kw); add (*L, T, D);\n"
        "erase (*L, T, D) or (*L, T, 1), all memory's dtype. memory and indices contiguous;\n"
        "weights, add and erase of any strides with a contiguous last dim (read in place).\n"
        "Writes out (like memory; may be memory itself: then only written slots are stored):\n"
        "for p = t * kw + j in order, M[s] = M[s] * (1 - w * erase[t]) + w * add[t].");
  m.def("gated_memory_write_bwd", &gated_memory_write_bwd, release_gil, py::arg("dnew"),
        py::arg("memory"), py::arg("indices"), py::arg("weights"), py::arg("add"),
        py::arg("erase"), py::arg("dmemory"), py::arg("dweights"), py::arg("dadd"),
        py::arg("derase"),
        "Gradients of gated_memory_write_fwd (memory = its input; dnew contiguous, like memory):\n"
        "writes dmemory, dweights, dadd, derase, each of its input's shape, contiguous.\n"
        "Deterministic (per-slot chains, fixed-order step sums).");

  m.def("gated_dense_update_fwd", &gated_dense_update_fwd, release_gil, py::arg("memory"),
        py::arg("update"), py::arg("input_gate"), py::arg("forget_gate"), py::arg("out"),
        "Gated dense update, elementwise over same-shape tensors of one dtype (all contiguous, or\n"
        "4-D views whose last dimension has stride 1 or 0, e.g. broadcast gates): writes\n"
        "out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update) (contiguous).");
  m.def("gated_dense_update_bwd", &gated_dense_update_bwd, release_gil, py::arg("dout"),
        py::arg("memory"), py::arg("update"), py::arg("input_gate"), py::arg("forget_gate"),
        py::arg("dmemory"), py::arg("dupdate"), py::arg("dinput_gate"), py::arg("dforget_gate"),
        "Elementwise gradients of gated_dense_update_fwd: writes dmemory, dupdate, dinput_gate,\n"
        "dforget_gate, each shaped like memory in acc (float64 for float64 input, else float32).");

  m.def("local_attention_fwd", &local_attention_fwd, release_gil, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("window"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        "Causal local attention of the last T of S positions (FlashAttention style, no T x S\n"
        "matrix). q (B, H, T, D); k (B, Hkv, S, D), H % Hkv == 0, S >= T; v (B, Hkv, S, Dv);\n"
        "window -1 (none) or >= 0: query t at p = S - T + t sees keys p - window < j <= p.\n"
        "Writes out (B, H, T, Dv) dtype and lse (B, H, T) acc; no visible key: out 0, lse -inf.");
  m.def("local_attention_bwd", &local_attention_bwd, release_gil, py::arg("dout"), py::arg("dlse"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("window"), py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        "Gradients of local_attention_fwd (FlashAttention-2): writes dq, dk, dv (like q, k, v).\n"
        "out enters only through <dout, out> per row. Deterministic (dq per query block, dk/dv\n"
        "per key block; independent of the thread count).");
  m.def("memory_read_weights", &memory_read_weights, release_gil, py::arg("q"), py::arg("keys"),
        py::arg("values"), py::arg("indices"), py::arg("lse"), py::arg("scale"), py::arg("dout"),
        py::arg("weights"), py::arg("dots"), py::arg("out"),
        "The top-k read's weights at a given selection (memory_attention backward): writes\n"
        "weights (B, H, T, k) acc = exp(<scale q, keys[n_j]> - lse) (0 for slot -1), and, when\n"
        "given, dots (B, H, T) acc = sum_j w_j <dout, values[n_j]> and out (B, H, T, Dv) dtype =\n"
        "sum_j w_j values[n_j]. q, keys, values as in topk_read_fwd; dout, dots, out optional.");
}
