// The torch-facing side of both extensions, written once: the argument checks of every op with
// their error texts, the filling of the kernels' plain params structs (csrc/common/params.h), the
// entry points and their registration. Included by csrc/cpu/bindings.cpp (l2m_kernels._C) and
// csrc/cuda/bindings.cpp (l2m_kernels._C_cuda), which define before it:
//   L2M_BINDING_CUDA  0 or 1: which extension. It decides the device, the layouts and dtypes
//                     served and the error prefix ("l2m <op> (cuda)"), and selects the few
//                     sections only one backend has (#if L2M_BINDING_CUDA): on CPU the row layouts
//                     of operands read where they lie and the host checks of indices; on CUDA the
//                     kernels' size limits, their scratch buffers, and the write plan.
//   L2M_KERNEL_NS     the namespace of the launchers' params structs (l2m::cpu or l2m::cuda);
//   L2M_LAUNCH(call, launcher, params, device_of)   runs a launcher on filled params.
// Every entry point returns None and writes every element of its preallocated outputs (passed
// last). The Python layer validates first; these checks keep a wrong call from reading or writing
// out of bounds.
//
// Errors: ValueError for shapes, devices and layouts, TypeError for dtypes, IndexError for indices
// out of range, NotImplementedError for sizes a backend does not serve. Sizes are formatted into a
// std::string (dims_text) rather than streamed into TORCH_CHECK: with torch 2.11 and gcc 13,
// inserting an integer into the error's ostream crashed the process instead of raising.
#pragma once

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(L2M_BINDING_CUDA) || !defined(L2M_KERNEL_NS) || !defined(L2M_LAUNCH)
#error "define L2M_BINDING_CUDA, L2M_KERNEL_NS and L2M_LAUNCH before including binding.h"
#endif

namespace l2m::binding {

namespace kp = L2M_KERNEL_NS;
namespace py = pybind11;
constexpr bool kCuda = L2M_BINDING_CUDA != 0;
// float64 storage: served by every CPU kernel; on CUDA by the attention kernels only.
constexpr bool kFloat64 = !kCuda;

// How an operand may lie in memory. kRows: a (.., T, D) operand whose last dimension is contiguous,
// read row by row where it lies (csrc/cpu/rows.h); kRowsOrBroadcast: stride 1 or 0 there.
enum class Layout { kContiguous, kRows, kRowsOrBroadcast, kAny };
// The operands the CPU kernels read through Rows; the CUDA kernels read them contiguous.
constexpr Layout kRowLayout = kCuda ? Layout::kContiguous : Layout::kRows;

using Dims = std::vector<int64_t>;
using TensorArg = const at::Tensor&;
using OptionalTensor = const std::optional<at::Tensor>&;
// An argument that only one extension's entry point has: L2M_CUDA_ONLY(bool deterministic) is
// ", bool deterministic" in the CUDA extension and nothing in the CPU one.
#if L2M_BINDING_CUDA
#define L2M_CUDA_ONLY(...) , __VA_ARGS__
#define L2M_CPU_ONLY(...)
#else
#define L2M_CUDA_ONLY(...)
#define L2M_CPU_ONLY(...) , __VA_ARGS__
#endif
using Tensors = std::initializer_list<const at::Tensor*>;
using NamedTensors = std::initializer_list<std::pair<const char*, const at::Tensor*>>;

// "(4, 8)", "(4,)".
inline std::string dims_text(at::IntArrayRef dims) {
  std::string text = "(";
  for (size_t axis = 0; axis < dims.size(); ++axis) {
    text += (axis ? ", " : "") + std::to_string(dims[axis]);
  }
  return text + (dims.size() == 1 ? ",)" : ")");
}
inline std::string shape_of(TensorArg tensor) { return dims_text(tensor.sizes()); }
inline Dims dims_of(TensorArg tensor) { return tensor.sizes().vec(); }
inline std::string text(int64_t value) { return std::to_string(value); }

// The storage dtype of an op's floating operands and the accumulation dtype of its statistics
// (lse, weights, gradients kept in acc): float64 for float64 storage, else float32.
struct Floating {
  c10::ScalarType dtype;
  c10::ScalarType acc;
};

// The one dtype dispatch from torch to the kernels: the params' `dtype` (l2m::Dtype, params.h).
inline l2m::Dtype kernel_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat      ? l2m::Dtype::kFloat32
         : dtype == at::kHalf     ? l2m::Dtype::kFloat16
         : dtype == at::kBFloat16 ? l2m::Dtype::kBFloat16
                                  : l2m::Dtype::kFloat64;
}

// L2M_IN(params, a, b, ...): params.a = a's data (read-only), params.b = b's, ..., each as its
// field's pointer type; L2M_OUT the same for outputs. Up to 8 tensors named like their fields.
#define L2M_PTR_(params, get, tensor) \
  (params).tensor = static_cast<decltype((params).tensor)>((tensor).get());
#define L2M_EACH_1(p, g, a) L2M_PTR_(p, g, a)
#define L2M_EACH_2(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_1(p, g, __VA_ARGS__)
#define L2M_EACH_3(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_2(p, g, __VA_ARGS__)
#define L2M_EACH_4(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_3(p, g, __VA_ARGS__)
#define L2M_EACH_5(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_4(p, g, __VA_ARGS__)
#define L2M_EACH_6(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_5(p, g, __VA_ARGS__)
#define L2M_EACH_7(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_6(p, g, __VA_ARGS__)
#define L2M_EACH_8(p, g, a, ...) L2M_PTR_(p, g, a) L2M_EACH_7(p, g, __VA_ARGS__)
#define L2M_EACH_(_1, _2, _3, _4, _5, _6, _7, _8, N, ...) L2M_EACH_##N
#define L2M_IN(params, ...) \
  L2M_EACH_(__VA_ARGS__, 8, 7, 6, 5, 4, 3, 2, 1)(params, const_data_ptr, __VA_ARGS__)
#define L2M_OUT(params, ...) \
  L2M_EACH_(__VA_ARGS__, 8, 7, 6, 5, 4, 3, 2, 1)(params, data_ptr, __VA_ARGS__)

struct MemoryShape {  // keys and values of a read
  int64_t mem_heads, num_slots, dim_v;
  bool shared;
};
struct WriteShape {
  int64_t groups, num_slots, dim, steps, writes_per_step, erase_dim;
  bool indices_int32;
};

// The checks of one call of one op; `op` prefixes every message. On CUDA every tensor must be on
// the device of the first one checked.
class Call {
 public:
  explicit Call(const char* name) : op(kCuda ? "l2m " + std::string(name) + " (cuda)" : name) {}

  const std::string op;

  void value_error(const std::string& what) const { TORCH_CHECK_VALUE(false, op + ": " + what); }
  void type_error(const std::string& what) const { TORCH_CHECK_TYPE(false, op + ": " + what); }
  void index_error(const std::string& what) const { TORCH_CHECK_INDEX(false, op + ": " + what); }
  void not_served(const std::string& what) const {
    TORCH_CHECK_NOT_IMPLEMENTED(false, op + ": the CUDA kernels serve " + what);
  }

  void storage(TensorArg tensor, const char* name, Layout layout = Layout::kContiguous) {
    TORCH_CHECK_VALUE(tensor.defined(), op, ": ", name, " is undefined");
    if constexpr (kCuda) {
      TORCH_CHECK_VALUE(tensor.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ",
                        tensor.device());
      if (!device_.has_value()) {
        device_ = tensor.device();
        first_ = name;
      }
      TORCH_CHECK_VALUE(tensor.device() == *device_, op, ": ", name, " is on ", tensor.device(),
                        " but ", first_, " is on ", *device_);
    } else {
      TORCH_CHECK_VALUE(tensor.device().is_cpu(), op, ": ", name, " must be on the cpu, got ",
                        c10::DeviceTypeName(tensor.device().type(), /*lower_case=*/true));
    }
    TORCH_CHECK_VALUE(tensor.layout() == at::kStrided, op, ": ", name,
                      " must be a strided (dense) tensor");
    if (layout == Layout::kContiguous) {
      TORCH_CHECK_VALUE(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
    } else if (layout != Layout::kAny) {
      const bool broadcast = layout == Layout::kRowsOrBroadcast;
      const int64_t step = tensor.dim() == 0 ? 0 : tensor.stride(-1);
      if (!(tensor.dim() == 0 || tensor.numel() == 0 || step == 1 || tensor.size(-1) <= 1 ||
            (broadcast && step == 0))) {
        value_error(std::string(name) + " must have a contiguous last dimension (stride 1" +
                    (broadcast ? " or 0" : "") + "), got stride " + text(step));
      }
    }
    TORCH_CHECK_VALUE(!tensor.is_neg() && !tensor.is_conj(), op, ": ", name,
                      " must not be a lazily negated or conjugated view");
  }

  // A tensor of exactly `dims` and `dtype`; `dims_names` spells the shape, e.g. "(B, H, T)".
  void tensor(TensorArg tensor, const char* name, c10::ScalarType dtype, const Dims& dims,
              const char* dims_names, Layout layout = Layout::kContiguous) {
    storage(tensor, name, layout);
    if (tensor.sizes() != at::IntArrayRef(dims)) {
      value_error(std::string(name) + " must have shape " + dims_names + " = " + dims_text(dims) +
                  ", got " + shape_of(tensor));
    }
    if (tensor.scalar_type() != dtype) {
      type_error(std::string(name) + " must have dtype " + c10::toString(dtype) + ", got " +
                 c10::toString(tensor.scalar_type()));
    }
  }

  // A tensor of `rank` dimensions (spelled by `dims_names`), its sizes to be checked next.
  void rank(TensorArg tensor, const char* name, int64_t rank, const char* dims_names,
            Layout layout = Layout::kContiguous) {
    storage(tensor, name, layout);
    if (tensor.dim() != rank) {
      value_error(std::string(name) + " must have shape " + dims_names + ", got " +
                  shape_of(tensor));
    }
  }

  // The storage dtype of the op, from its first floating operand.
  Floating floating(TensorArg tensor, const char* name, bool float64 = kFloat64) const {
    const auto dtype = tensor.scalar_type();
    if (!(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
          (float64 && dtype == at::kDouble))) {
      type_error(std::string(name) + " must be float32, " + (float64 ? "float64, " : "") +
                 "float16 or bfloat16, got " + c10::toString(dtype));
    }
    return {dtype, dtype == at::kDouble ? at::kDouble : at::kFloat};
  }

  // ---- the operands of each family of ops ----

  // The (R, D) rows of a merge: the first fixes R, D and the dtype.
  Floating first_rows(TensorArg tensor, const char* name) {
    rank(tensor, name, 2, "(R, D)");
    return floating(tensor, name);
  }
  void rows(TensorArg tensor, const char* name, c10::ScalarType dtype, const Dims& dims) {
    this->tensor(tensor, name, dtype, dims, dims.size() == 1 ? "(R,)" : "(R, D)");
  }

  // q (B, H, T, Dk) fixes B, H, T, Dk and the dtype.
  Floating query(TensorArg q, bool float64 = kFloat64, const char* dims = "(B, H, T, Dk)") {
    rank(q, "q", 4, dims, kRowLayout);
    return floating(q, "q", float64);
  }

  // keys (B, Hm, N, Dk) or shared (Hm, N, Dk) with H % Hm == 0; values the same leading shape.
  MemoryShape memory(TensorArg q, TensorArg keys, TensorArg values) {
    const auto dtype = q.scalar_type();
    storage(keys, "keys");
    if (keys.dim() != 3 && keys.dim() != 4) {
      value_error("keys must have shape (B, Hm, N, Dk) or (Hm, N, Dk), got " + shape_of(keys));
    }
    const bool shared = keys.dim() == 3;
    const int64_t mem_heads = keys.size(-3), num_slots = keys.size(-2);
    if (mem_heads < 1 || q.size(1) % mem_heads != 0) {
      value_error("the memory head count Hm = " + text(mem_heads) + " must divide H = " +
                  text(q.size(1)) + " (keys " + shape_of(keys) + ")");
    }
    const auto with_last = [&](int64_t last) {
      return shared ? Dims{mem_heads, num_slots, last}
                    : Dims{q.size(0), mem_heads, num_slots, last};
    };
    tensor(keys, "keys", dtype, with_last(q.size(3)), shared ? "(Hm, N, Dk)" : "(B, Hm, N, Dk)");
    storage(values, "values");
    if (values.dim() != keys.dim()) {
      value_error("values must have keys' leading shape + (Dv,), got " + shape_of(values) +
                  " for keys " + shape_of(keys));
    }
    const int64_t dim_v = values.size(-1);
    tensor(values, "values", dtype, with_last(dim_v), shared ? "(Hm, N, Dv)" : "(B, Hm, N, Dv)");
    return {mem_heads, num_slots, dim_v, shared};
  }

  // indices (B, H, T, k) int64 of a given selection: returns k.
  int64_t selection(TensorArg indices, TensorArg q) {
    rank(indices, "indices", 4, "(B, H, T, k)");
    const int64_t k = indices.size(3);
    tensor(indices, "indices", at::kLong, {q.size(0), q.size(1), q.size(2), k}, "(B, H, T, k)");
    return k;
  }

  // Every entry of int64 `indices` in [low, count) (`name`s are used as addresses). Host memory:
  // the CUDA kernels check their indices on the device instead.
  void in_range(TensorArg indices, const char* name, int64_t low, int64_t count,
                const std::string& range) const {
    const int64_t* slots = indices.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < indices.numel(); ++i) {
      if (slots[i] < low || slots[i] >= count) {
        index_error(std::string(name) + " must be " + range + ", got " + text(slots[i]));
      }
    }
  }

  // q (B, H, T, Dk) with Dk even; subkeys (H, 2, n_sub, Dk / 2); values (n_sub ** 2, Dv).
  Floating product_key(TensorArg q, TensorArg subkeys, TensorArg values) {
    const Floating f = query(q);
    if (q.size(3) % 2 != 0) {
      value_error("q's feature size Dk must be even, got q " + shape_of(q));
    }
    rank(subkeys, "subkeys", 4, "(H, 2, n_sub, Dk / 2)");
    const int64_t n_sub = subkeys.size(2);
    tensor(subkeys, "subkeys", f.dtype, {q.size(1), 2, n_sub, q.size(3) / 2},
           "(H, 2, n_sub, Dk / 2)");
    if (n_sub < 1 || n_sub > (int64_t(1) << 31)) {
      value_error("n_sub must be in [1, 2 ** 31], got " + text(n_sub));
    }
    rank(values, "values", 2, "(n_sub ** 2, Dv)");
    tensor(values, "values", f.dtype, {n_sub * n_sub, values.size(1)}, "(n_sub ** 2, Dv)");
    return f;
  }

  // q (B, H, T, D); k (B, Hkv, S, D) with H % Hkv == 0 and S >= T; v (B, Hkv, S, Dv); window -1
  // (none) or >= 0.
  Floating local(TensorArg q, TensorArg k, TensorArg v, int64_t window) {
    const Floating f = query(q, /*float64=*/true, "(B, H, T, D)");
    rank(k, "k", 4, "(B, Hkv, S, D)", kRowLayout);
    const int64_t kv_heads = k.size(1), context_len = k.size(2);
    if (kv_heads < 1 || q.size(1) % kv_heads != 0 || context_len < q.size(2)) {
      value_error("k must have Hkv dividing H = " + text(q.size(1)) + " and S >= T = " +
                  text(q.size(2)) + ", got " + shape_of(k));
    }
    tensor(k, "k", f.dtype, {q.size(0), kv_heads, context_len, q.size(3)}, "(B, Hkv, S, D)",
           kRowLayout);
    rank(v, "v", 4, "(B, Hkv, S, Dv)", kRowLayout);
    tensor(v, "v", f.dtype, {q.size(0), kv_heads, context_len, v.size(3)}, "(B, Hkv, S, Dv)",
           kRowLayout);
    if (window < -1) {
      value_error("window must be -1 (no window) or >= 0, got " + text(window));
    }
    return f;
  }

  // memory (B, Hm, N, D) or (B, N, D): its leading dimensions, (B, Hm) or (B,), are the G memories
  // (on CUDA memory is (G, N, D)). indices and weights (.., T, kw); add (.., T, D); erase
  // (.., T, D) or (.., T, 1), with the same leading dimensions. weights, add and erase are read
  // where they lie (kRowLayout); memory and indices are contiguous.
  WriteShape write(TensorArg memory, TensorArg indices, TensorArg weights,
                   TensorArg add, TensorArg erase) {
    storage(memory, "memory");
    if (memory.dim() != 3 && (kCuda || memory.dim() != 4)) {
      value_error(std::string("memory must have shape ") +
                  (kCuda ? "(G, N, D)" : "(B, Hm, N, D) or (B, N, D)") + ", got " +
                  shape_of(memory));
    }
    const auto dtype = floating(memory, "memory").dtype;
    const bool heads = memory.dim() == 4;
    const Dims lead(memory.sizes().begin(), memory.sizes().end() - 2);
    WriteShape shape{};
    shape.groups = heads ? lead[0] * lead[1] : lead[0];
    shape.num_slots = memory.size(-2);
    shape.dim = memory.size(-1);
    storage(indices, "indices");
    if (indices.dim() != memory.dim() ||
        !std::equal(lead.begin(), lead.end(), indices.sizes().begin())) {
      value_error(std::string("indices must have shape ") +
                  (heads ? "(B, Hm, T, kw) with (B, Hm)" : "(B, T, kw) with (B,)") + " = " +
                  dims_text(lead) + ", got " + shape_of(indices));
    }
    if (indices.scalar_type() != at::kInt && indices.scalar_type() != at::kLong) {
      type_error(std::string("indices must be int32 or int64, got ") +
                 c10::toString(indices.scalar_type()));
    }
    shape.indices_int32 = indices.scalar_type() == at::kInt;
    shape.steps = indices.size(-2);
    shape.writes_per_step = indices.size(-1);
    const auto with_lead = [&](int64_t last) {
      Dims dims = lead;
      dims.push_back(shape.steps);
      dims.push_back(last);
      return dims;
    };
    tensor(weights, "weights", dtype, dims_of(indices), heads ? "(B, Hm, T, kw)" : "(B, T, kw)",
           kRowLayout);
    tensor(add, "add", dtype, with_lead(shape.dim), heads ? "(B, Hm, T, D)" : "(B, T, D)",
           kRowLayout);
    storage(erase, "erase", kRowLayout);
    shape.erase_dim = erase.dim() == memory.dim() && erase.size(-1) == 1 ? 1 : shape.dim;
    tensor(erase, "erase", dtype, with_lead(shape.erase_dim),
           heads ? "(B, Hm, T, D) or (B, Hm, T, 1)" : "(B, T, D) or (B, T, 1)", kRowLayout);
    return shape;
  }

  // The four inputs of the dense update: same-shape tensors of one floating dtype (broadcast by
  // the caller), either all contiguous (any rank: the CPU kernels' flat path) or 4-D views of the
  // broadcast shape (stride 1 or 0 along the last dimension on CPU, any strides on CUDA). Returns
  // whether they are read as strided views.
  bool dense(TensorArg memory, TensorArg update, TensorArg input_gate,
             TensorArg forget_gate) {
    const bool strided = kCuda || !(memory.is_contiguous() && update.is_contiguous() &&
                                    input_gate.is_contiguous() && forget_gate.is_contiguous());
    const Layout layout =
        kCuda ? Layout::kAny : strided ? Layout::kRowsOrBroadcast : Layout::kContiguous;
    const NamedTensors inputs = {{"memory", &memory}, {"update", &update},
                                 {"input_gate", &input_gate}, {"forget_gate", &forget_gate}};
    for (const auto& [name, input] : inputs) {
      storage(*input, name, layout);
      if (strided && input->dim() != 4) {
        value_error(std::string("strided inputs must be 4-D views of the broadcast shape, got ") +
                    name + " " + shape_of(*input));
      }
    }
    const auto dtype = floating(memory, "memory").dtype;
    for (const auto& [name, input] : inputs) {
      tensor(*input, name, dtype, dims_of(memory), "like memory", layout);
    }
    return strided;
  }

  // ---- overlaps ----

  // No output overlaps an input or another output; with `exact_alias`, an output may be an input
  // exactly (row-wise and elementwise kernels read each element before writing it).
  void apart(const std::vector<const at::Tensor*>& outputs,
             const std::vector<const at::Tensor*>& inputs, bool exact_alias = false) const {
    for (const at::Tensor* output : outputs) {
      for (const at::Tensor* input : inputs) {
        exact_alias ? at::assert_no_partial_overlap(*output, *input)
                    : at::assert_no_overlap(*output, *input);
      }
      for (const at::Tensor* other : outputs) {
        if (other != output) {
          at::assert_no_overlap(*output, *other);
        }
      }
    }
  }

  // at::assert_no_overlap passes tensors it cannot judge, such as sliced operands, which are not
  // dense; kernels that read such inputs where they lie while they store must not find an output
  // anywhere between their first and last element (a conservative test: strides are never
  // negative).
  void spans_apart(NamedTensors outputs, NamedTensors inputs) const {
    const auto span = [](TensorArg tensor) {
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
        TORCH_CHECK(!(out_begin < in_end && in_begin < out_end),
                    op + ": " + output_name + " overlaps " + input_name + ", which is read while " +
                        "it is written (clone " + input_name + " first)");
      }
    }
  }

 private:
  std::optional<c10::Device> device_;
  const char* first_ = "";
};

// ---- the sizes every params struct of a family has (params.h) ----

template <typename Params>
void fill_read(Params& params, const Floating& f, TensorArg q, const MemoryShape& memory, int64_t k,
               double scale) {
  params.dtype = kernel_dtype(f.dtype);
  params.batch = q.size(0);
  params.heads = q.size(1);
  params.seq_len = q.size(2);
  params.mem_heads = memory.mem_heads;
  params.num_slots = memory.num_slots;
  params.dim_k = q.size(3);
  params.dim_v = memory.dim_v;
  params.k = k;
  params.shared_memory = memory.shared;
  params.scale = scale;
}

template <typename Params>
void fill_product_key(Params& params, const Floating& f, TensorArg q, TensorArg subkeys,
                      TensorArg values, int64_t k, double scale, bool sum_heads) {
  params.dtype = kernel_dtype(f.dtype);
  params.batch = q.size(0);
  params.heads = q.size(1);
  params.seq_len = q.size(2);
  params.dim_k = q.size(3);
  params.n_sub = subkeys.size(2);
  params.dim_v = values.size(1);
  params.k = k;
  params.sum_heads = sum_heads;
  params.scale = scale;
}

template <typename Params>
void fill_local(Params& params, const Floating& f, TensorArg q, TensorArg k, TensorArg v,
                int64_t window, double scale) {
  params.dtype = kernel_dtype(f.dtype);
  params.batch = q.size(0);
  params.heads = q.size(1);
  params.kv_heads = k.size(1);
  params.seq_len = q.size(2);
  params.context_len = k.size(2);
  params.dim = q.size(3);
  params.dim_v = v.size(3);
  params.window = window < 0 ? k.size(2) : window;
  params.scale = scale;
}

// ---- what only one backend has ----
#if L2M_BINDING_CUDA

constexpr int64_t kMaxRows = int64_t{1} << 31;  // query rows B * H * T the kernels index in 32 bits

// The limits of the top-k read's kernels (topk_read.h), also those of memory_read_weights.
inline void check_read_limits(const Call& call, TensorArg q, TensorArg keys, TensorArg values) {
  if (q.size(3) > kp::kTopkReadMaxDim || values.size(-1) > kp::kTopkReadMaxDim) {
    call.not_served("Dk, Dv <= " + text(kp::kTopkReadMaxDim) + ", got q " + shape_of(q) +
                    " and values " + shape_of(values));
  }
  if (keys.size(-2) > kp::kTopkReadMaxSlots) {
    call.not_served("N <= 2**31 slots, got keys " + shape_of(keys));
  }
  if (q.size(0) * q.size(1) * q.size(2) >= kMaxRows) {
    call.not_served("B * H * T < 2**31 query rows, got q " + shape_of(q));
  }
}

// The limits of the product-key kernels (product_key.h).
inline void check_product_key_limits(const Call& call, TensorArg q, TensorArg subkeys, int64_t k) {
  if (subkeys.size(2) * subkeys.size(2) > kp::kProductKeyMaxSlots) {
    call.not_served("n_sub ** 2 < 2**31 slots, got subkeys " + shape_of(subkeys));
  }
  if (q.size(3) > kp::kProductKeyMaxDimK) {
    call.not_served("Dk <= " + text(kp::kProductKeyMaxDimK) + ", got q " + shape_of(q));
  }
  if (q.size(0) * q.size(1) * q.size(2) >= kMaxRows || q.size(0) * q.size(2) >= kMaxRows) {
    call.not_served("B * H * T < 2**31 query rows, got q " + shape_of(q));
  }
  if (k > kp::kProductKeyMaxK) {
    call.not_served("1 <= k <= " + text(kp::kProductKeyMaxK) + " entries per query, got k = " +
                    text(k));
  }
}

// Deterministic segment sum (product_key.h): entries grouped by destination key with a stable
// sort (keys >= num_dst: entries that contribute nothing, sorted last), run starts by binary
// search. entry_coef / entry_src map each entry id (the position in `keys`) to its coefficient
// and source row.
inline void product_key_segment_sum(const Call& call, l2m::Dtype dtype, TensorArg keys,
                                    TensorArg entry_coef, TensorArg entry_src, int64_t num_dst,
                                    TensorArg src, int64_t num_src, TensorArg coef, double scale,
                                    TensorArg dst, int64_t dim) {
  const std::tuple<at::Tensor, at::Tensor> sorted =
      at::sort(keys, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted);
  const at::Tensor sorted_coef = entry_coef.index_select(0, order).contiguous();
  const at::Tensor sorted_src = entry_src.index_select(0, order).contiguous();
  const at::Tensor run_starts =
      at::searchsorted(std::get<0>(sorted), at::arange(num_dst + 1, keys.options())).contiguous();
  kp::ProductKeySegmentParams params{};
  params.dtype = dtype;
  params.num_dst = num_dst;
  params.num_src = num_src;
  params.num_coef = coef.numel();
  params.dim = dim;
  params.scale = scale;
  params.src = src.data_ptr();
  params.coef = coef.data_ptr<float>();
  params.entry_coef = sorted_coef.data_ptr<int64_t>();
  params.entry_src = sorted_src.data_ptr<int64_t>();
  params.run_starts = run_starts.data_ptr<int64_t>();
  params.dst = dst.data_ptr();
  L2M_LAUNCH(call, product_key_segment, params, src);
}

#else  // the CPU kernels

using l2m::cpu::Rows;

// Where the rows of a checked (B, H, T, D) operand start (rows.h).
inline Rows rows_of(TensorArg tensor) {
  if (tensor.is_contiguous()) {
    return Rows::contiguous(tensor.size(1), tensor.size(2), tensor.size(3));
  }
  return Rows::strided(tensor.size(1), tensor.size(2), tensor.stride(0), tensor.stride(1),
                       tensor.stride(2));
}

// The (g, t) rows of a checked write operand: a (B, Hm, T, .) tensor as it is, a (B, T, .) one as
// (B, 1, T, .).
inline Rows write_rows_of(TensorArg tensor) {
  if (tensor.dim() == 4) {
    return rows_of(tensor);
  }
  if (tensor.is_contiguous()) {
    return Rows::contiguous(1, tensor.size(1), tensor.size(2));
  }
  return Rows::strided(1, tensor.size(1), tensor.stride(0), 0, tensor.stride(1));
}

// Every write index -1 or an existing slot: the range over all indices first (a vectorisable
// min/max), the message only when it fails.
inline void check_write_slots(const Call& call, TensorArg indices, const WriteShape& shape) {
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
    call.index_error("indices must be -1 or in [0, N) with N = " + text(shape.num_slots) +
                     ", got " + text(low < -1 ? low : high));
  }
}

#endif

// ---- the entry points ----

inline void merge_attention_fwd(TensorArg out_a, TensorArg lse_a, TensorArg out_b, TensorArg lse_b,
                                TensorArg out, TensorArg lse) {
  Call call("merge_attention_fwd");
  const Floating f = call.first_rows(out_a, "out_a");
  const Dims rows = {out_a.size(0)}, rows_d = dims_of(out_a);
  call.rows(lse_a, "lse_a", f.acc, rows);
  call.rows(out_b, "out_b", f.dtype, rows_d);
  call.rows(lse_b, "lse_b", f.acc, rows);
  call.rows(out, "out", f.dtype, rows_d);
  call.rows(lse, "lse", f.acc, rows);
  call.apart({&out, &lse}, {&out_a, &lse_a, &out_b, &lse_b}, /*exact_alias=*/true);
  if (rows[0] == 0) {
    return;
  }
  kp::MergeAttentionFwdParams params{};
  params.dtype = kernel_dtype(f.dtype);
  params.rows = rows[0];
  params.head_dim = rows_d[1];
  L2M_IN(params, out_a, lse_a, out_b, lse_b);
  L2M_OUT(params, out, lse);
  L2M_LAUNCH(call, merge_attention_fwd, params, out_a);
}

inline void merge_attention_bwd(TensorArg dout, TensorArg dlse, TensorArg out_a, TensorArg lse_a,
                                TensorArg out_b, TensorArg lse_b, TensorArg lse, TensorArg d_out_a,
                                TensorArg d_lse_a, TensorArg d_out_b, TensorArg d_lse_b) {
  Call call("merge_attention_bwd");
  const Floating f = call.first_rows(dout, "dout");
  const Dims rows = {dout.size(0)}, rows_d = dims_of(dout);
  call.rows(dlse, "dlse", f.acc, rows);
  call.rows(out_a, "out_a", f.dtype, rows_d);
  call.rows(lse_a, "lse_a", f.acc, rows);
  call.rows(out_b, "out_b", f.dtype, rows_d);
  call.rows(lse_b, "lse_b", f.acc, rows);
  call.rows(lse, "lse", f.acc, rows);
  call.rows(d_out_a, "d_out_a", f.dtype, rows_d);
  call.rows(d_lse_a, "d_lse_a", f.acc, rows);
  call.rows(d_out_b, "d_out_b", f.dtype, rows_d);
  call.rows(d_lse_b, "d_lse_b", f.acc, rows);
  call.apart({&d_out_a, &d_lse_a, &d_out_b, &d_lse_b},
             {&dout, &dlse, &out_a, &lse_a, &out_b, &lse_b, &lse}, /*exact_alias=*/true);
  if (rows[0] == 0) {
    return;
  }
  kp::MergeAttentionBwdParams params{};
  params.dtype = kernel_dtype(f.dtype);
  params.rows = rows[0];
  params.head_dim = rows_d[1];
  L2M_IN(params, dout, dlse, out_a, lse_a, out_b, lse_b, lse);
  L2M_OUT(params, d_out_a, d_lse_a, d_out_b, d_lse_b);
  L2M_LAUNCH(call, merge_attention_bwd, params, dout);
}

inline void gated_merge_fwd(TensorArg out_local, TensorArg out_mem, TensorArg gate, TensorArg out) {
  Call call("gated_merge_fwd");
  const Floating f = call.first_rows(out_local, "out_local");
  const Dims rows = {out_local.size(0)}, rows_d = dims_of(out_local);
  call.rows(out_mem, "out_mem", f.dtype, rows_d);
  call.rows(gate, "gate", f.dtype, rows);
  call.rows(out, "out", f.dtype, rows_d);
  call.apart({&out}, {&out_local, &out_mem, &gate}, /*exact_alias=*/true);
  if (rows[0] == 0) {
    return;
  }
  kp::GatedMergeFwdParams params{};
  params.dtype = kernel_dtype(f.dtype);
  params.rows = rows[0];
  params.head_dim = rows_d[1];
  L2M_IN(params, out_local, out_mem, gate);
  L2M_OUT(params, out);
  L2M_LAUNCH(call, gated_merge_fwd, params, out_local);
}

inline void gated_merge_bwd(TensorArg dout, TensorArg out_local, TensorArg out_mem, TensorArg gate,
                            TensorArg d_local, TensorArg d_mem, TensorArg d_gate) {
  Call call("gated_merge_bwd");
  const Floating f = call.first_rows(dout, "dout");
  const Dims rows = {dout.size(0)}, rows_d = dims_of(dout);
  call.rows(out_local, "out_local", f.dtype, rows_d);
  call.rows(out_mem, "out_mem", f.dtype, rows_d);
  call.rows(gate, "gate", f.dtype, rows);
  call.rows(d_local, "d_local", f.dtype, rows_d);
  call.rows(d_mem, "d_mem", f.dtype, rows_d);
  call.rows(d_gate, "d_gate", f.acc, rows);
  call.apart({&d_local, &d_mem, &d_gate}, {&dout, &out_local, &out_mem, &gate},
             /*exact_alias=*/true);
  if (rows[0] == 0) {
    return;
  }
  kp::GatedMergeBwdParams params{};
  params.dtype = kernel_dtype(f.dtype);
  params.rows = rows[0];
  params.head_dim = rows_d[1];
  L2M_IN(params, dout, out_local, out_mem, gate);
  L2M_OUT(params, d_local, d_mem, d_gate);
  L2M_LAUNCH(call, gated_merge_bwd, params, dout);
}

// Sparse top-k read; `k` in [1, min(N, 256)]. On CUDA, use_threshold (default true): a pre-pass
// writes each row's chunk maxima of the sort keys (topk_read.h); the k-th largest of them, tau, is
// a lower bound on the row's k-th best key, so the selection merges only candidates >= tau (about
// k merges per query instead of k * ln(N / k)). With fewer than k chunks there is no bound and the
// selection runs as without it; false: the selection kernel alone (the same result).
inline void topk_read_fwd(TensorArg q, TensorArg keys, TensorArg values, OptionalTensor valid_len,
                          int64_t k, double scale, TensorArg out, TensorArg indices,
                          TensorArg weights, TensorArg lse L2M_CUDA_ONLY(bool use_threshold)) {
  Call call("topk_read_fwd");
  const Floating f = call.query(q);
  const MemoryShape memory = call.memory(q, keys, values);
  const int64_t max_k = std::min<int64_t>(memory.num_slots, 256);
  if (k < 1 || k > max_k) {
    call.value_error("k must be in [1, min(N, 256)] = [1, " + text(max_k) + "], got " + text(k));
  }
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  std::vector<const at::Tensor*> inputs = {&q, &keys, &values};
  if (valid_len.has_value()) {
    call.tensor(*valid_len, "valid_len", at::kLong, {B}, "(B,)");
    inputs.push_back(&*valid_len);
  }
  call.tensor(out, "out", f.dtype, {B, H, T, memory.dim_v}, "(B, H, T, Dv)");
  call.tensor(indices, "indices", at::kLong, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(weights, "weights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(lse, "lse", f.acc, {B, H, T}, "(B, H, T)");
  call.apart({&out, &indices, &weights, &lse}, inputs);
#if L2M_BINDING_CUDA
  check_read_limits(call, q, keys, values);
#endif
  if (B * H * T == 0) {
    return;
  }
  kp::TopkReadFwdParams params{};
  fill_read(params, f, q, memory, k, scale);
  L2M_IN(params, q, keys, values);
  params.valid_len = valid_len.has_value() ? valid_len->const_data_ptr<int64_t>() : nullptr;
  L2M_OUT(params, out, indices, weights, lse);
#if L2M_BINDING_CUDA
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor tau;  // kept alive until the selection kernel is enqueued
  const int64_t num_chunks = kp::topk_read_num_chunks(memory.num_slots);
  if (use_threshold && num_chunks >= k) {
    const at::Tensor chunk_max = at::empty({B * H * T, num_chunks}, q.options().dtype(at::kLong));
    check_launch(call.op, kp::topk_read_chunk_max_launch(params, chunk_max.data_ptr<int64_t>(),
                                                         current_stream()));
    // Exactly k chunks have a maximum >= the k-th largest maximum (the keys are distinct), so
    // the row's k best keys are all >= it. Chunks without an existing slot hold INT64_MIN: when
    // fewer than k chunks have one, tau is INT64_MIN (no bound).
    tau = std::get<0>(at::topk(chunk_max, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true))
              .select(1, k - 1)
              .contiguous();
    params.tau = tau.data_ptr<int64_t>();
  }
#else
  params.q_rows = rows_of(q);
#endif
  L2M_LAUNCH(call, topk_read_fwd, params, q);
}

// Gradients of the read at a given selection: dq, dkeys, dvalues like q, keys, values. On CUDA,
// deterministic: slot gradients summed per slot in a fixed order (else float32 atomics); the CPU
// kernels always are.
inline void topk_read_bwd(TensorArg dout, TensorArg dweights, TensorArg dlse, TensorArg q,
                          TensorArg keys, TensorArg values, TensorArg indices, TensorArg weights,
                          double scale L2M_CUDA_ONLY(bool deterministic), TensorArg dq,
                          TensorArg dkeys, TensorArg dvalues) {
  Call call("topk_read_bwd");
  const Floating f = call.query(q);
  const MemoryShape memory = call.memory(q, keys, values);
  const int64_t k = call.selection(indices, q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  call.tensor(dout, "dout", f.dtype, {B, H, T, memory.dim_v}, "(B, H, T, Dv)", kRowLayout);
  call.tensor(dweights, "dweights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(dlse, "dlse", f.acc, {B, H, T}, "(B, H, T)");
  call.tensor(weights, "weights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(dq, "dq", f.dtype, dims_of(q), "like q");
  call.tensor(dkeys, "dkeys", f.dtype, dims_of(keys), "like keys");
  call.tensor(dvalues, "dvalues", f.dtype, dims_of(values), "like values");
  call.apart({&dq, &dkeys, &dvalues},
             {&dout, &dweights, &dlse, &q, &keys, &values, &indices, &weights});
  kp::TopkReadBwdParams params{};
  fill_read(params, f, q, memory, k, scale);
  L2M_IN(params, dout, dweights, dlse, q, keys, values, indices, weights);
  L2M_OUT(params, dq, dkeys, dvalues);
#if L2M_BINDING_CUDA
  check_read_limits(call, q, keys, values);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t rows = B * H * T;
  if (rows == 0) {  // no entry: every slot gradient is zero
    dkeys.zero_();
    dvalues.zero_();
    return;
  }
  if (k < 1 || k > kp::kTopkReadMaxK) {
    call.value_error("indices must have 1 <= k <= 256 entries per query, got shape " +
                     shape_of(indices));
  }
  params.deterministic = deterministic;
  // Scratch tensors of either mode live until the end of this scope; the caching allocator reuses
  // their memory only for later work on this stream, so the kernels are done with them by then.
  at::Tensor ds, entry_order, entry_rows, run_starts, dkeys_acc, dvalues_acc;
  if (deterministic) {
    // Entries grouped by slot, as _slot_runs in l2m_kernels/ops/topk_read/triton.py: a stable sort
    // of memory * N + slot (entries that contribute nothing last, key M * N) and the run starts by
    // binary search; both are deterministic on every device.
    const int64_t N = memory.num_slots, R = (H / memory.mem_heads) * T;
    const int64_t memories = memory.shared ? memory.mem_heads : B * memory.mem_heads;
    const at::TensorOptions long_options = indices.options().dtype(at::kLong);
    const at::Tensor row_memory_head = at::arange(rows, long_options).floor_divide(R);  // b*Hm+hm
    const at::Tensor row_memory =
        memory.shared ? row_memory_head.remainder(memory.mem_heads) : row_memory_head;
    const at::Tensor flat = indices.reshape({rows, k});
    const at::Tensor live = flat.ge(0).logical_and(flat.lt(N));
    const at::Tensor slot_key =
        at::where(live, row_memory.unsqueeze(1) * N + flat, at::Scalar(memories * N)).reshape({-1});
    const std::tuple<at::Tensor, at::Tensor> sorted =
        at::sort(slot_key, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
    entry_order = std::get<1>(sorted).contiguous();
    entry_rows = entry_order.floor_divide(k).contiguous();
    run_starts = at::searchsorted(std::get<0>(sorted), at::arange(memories * N + 1, long_options))
                     .contiguous();
    ds = at::empty({rows * k}, indices.options().dtype(at::kFloat));
    L2M_OUT(params, ds, entry_order, entry_rows, run_starts);
  } else {
    // Atomic mode: float32 accumulators, zeroed; float32 outputs accumulate in place.
    const at::TensorOptions float_options = q.options().dtype(at::kFloat);
    dkeys_acc = f.dtype == at::kFloat ? dkeys : at::empty(keys.sizes(), float_options);
    dvalues_acc = f.dtype == at::kFloat ? dvalues : at::empty(values.sizes(), float_options);
    dkeys_acc.zero_();
    dvalues_acc.zero_();
    L2M_OUT(params, dkeys_acc, dvalues_acc);
  }
  L2M_LAUNCH(call, topk_read_bwd, params, q);
  if (!deterministic && f.dtype != at::kFloat) {
    dkeys.copy_(dkeys_acc);
    dvalues.copy_(dvalues_acc);
  }
#else
  call.in_range(indices, "indices", -1, memory.num_slots,
                "-1 or in [0, N) with N = " + text(memory.num_slots));
  params.dout_rows = rows_of(dout);
  params.q_rows = rows_of(q);
  // Runs even without queries: dkeys and dvalues (shared memories) must still be zeroed.
  L2M_LAUNCH(call, topk_read_bwd, params, q);
#endif
}

// The read's weights recomputed at a given selection (the memory_attention backward); dout, dots
// and out optional, dots required with dout. On CUDA, indices outside [0, N) (e.g. -1) get weight
// 0 and are never read: checked on the device, not here (no host synchronisation).
inline void memory_read_weights(TensorArg q, TensorArg keys, TensorArg values, TensorArg indices,
                                TensorArg lse, double scale, OptionalTensor dout, TensorArg weights,
                                OptionalTensor dots, OptionalTensor out) {
  Call call("memory_read_weights");
  const Floating f = call.query(q, /*float64=*/true);
  const MemoryShape memory = call.memory(q, keys, values);
  const int64_t k = call.selection(indices, q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  call.tensor(lse, "lse", f.acc, {B, H, T}, "(B, H, T)");
  call.tensor(weights, "weights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  std::vector<const at::Tensor*> inputs = {&q, &keys, &values, &indices, &lse};
  std::vector<const at::Tensor*> outputs = {&weights};
  if (dout.has_value()) {
    call.tensor(*dout, "dout", f.dtype, {B, H, T, memory.dim_v}, "(B, H, T, Dv)", kRowLayout);
    TORCH_CHECK_VALUE(dots.has_value(), call.op + ": dots is required with dout");
    inputs.push_back(&*dout);
  }
  if (dots.has_value()) {
    call.tensor(*dots, "dots", f.acc, {B, H, T}, "(B, H, T)");
    outputs.push_back(&*dots);
  }
  if (out.has_value()) {
    call.tensor(*out, "out", f.dtype, {B, H, T, memory.dim_v}, "(B, H, T, Dv)");
    outputs.push_back(&*out);
  }
  call.apart(outputs, inputs);
#if L2M_BINDING_CUDA
  check_read_limits(call, q, keys, values);
  const c10::cuda::CUDAGuard device_guard(q.device());
#else
  call.in_range(indices, "indices", -1, memory.num_slots,
                "-1 or in [0, N) with N = " + text(memory.num_slots));
#endif
  if (B * H * T == 0 || k == 0) {  // no entry: dots and out are zero
    if (dots.has_value()) {
      dots->zero_();
    }
    if (out.has_value()) {
      out->zero_();
    }
    return;
  }
  kp::MemoryReadWeightsParams params{};
  fill_read(params, f, q, memory, k, scale);
  L2M_IN(params, q, keys, values, indices, lse);
  params.dout = dout.has_value() ? dout->const_data_ptr() : nullptr;
  L2M_OUT(params, weights);
  params.dots = dots.has_value() ? dots->data_ptr() : nullptr;
  params.out = out.has_value() ? out->data_ptr() : nullptr;
#if !L2M_BINDING_CUDA
  params.q_rows = rows_of(q);
  params.dout_rows = dout.has_value() ? rows_of(*dout) : Rows{};
#endif
  L2M_LAUNCH(call, memory_read_weights, params, q);
}

// Product-key read: 1 <= k_sub <= n_sub, 1 <= k <= k_sub ** 2; out (B, H, T, Dv) or, with
// sum_heads, (B, T, Dv).
inline void product_key_fwd(TensorArg q, TensorArg subkeys, TensorArg values, int64_t k,
                            int64_t k_sub, double scale, bool sum_heads, TensorArg out,
                            TensorArg indices, TensorArg weights, TensorArg lse) {
  Call call("product_key_fwd");
  const Floating f = call.product_key(q, subkeys, values);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  const int64_t n_sub = subkeys.size(2), dim_v = values.size(1);
  if (k_sub < 1 || k_sub > n_sub) {
    call.value_error("k_sub must be in [1, n_sub] = [1, " + text(n_sub) + "], got " + text(k_sub));
  }
  if (k < 1 || k > k_sub * k_sub) {
    call.value_error("k must be in [1, k_sub ** 2] = [1, " + text(k_sub * k_sub) + "], got " +
                     text(k));
  }
  call.tensor(out, "out", f.dtype, sum_heads ? Dims{B, T, dim_v} : Dims{B, H, T, dim_v},
              sum_heads ? "(B, T, Dv)" : "(B, H, T, Dv)");
  call.tensor(indices, "indices", at::kLong, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(weights, "weights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(lse, "lse", f.acc, {B, H, T}, "(B, H, T)");
  call.apart({&out, &indices, &weights, &lse}, {&q, &subkeys, &values});
#if L2M_BINDING_CUDA
  check_product_key_limits(call, q, subkeys, k);
  if (k_sub > kp::kProductKeyMaxKSub) {
    call.not_served("k_sub <= " + text(kp::kProductKeyMaxKSub) + ", got k_sub = " + text(k_sub));
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
#endif
  if (B == 0 || T == 0 || H == 0) {
    if (out.numel() > 0) {
      out.zero_();  // sum_heads with H == 0: a sum over no heads
    }
    return;
  }
  kp::ProductKeyFwdParams params{};
  fill_product_key(params, f, q, subkeys, values, k, scale, sum_heads);
  params.k_sub = k_sub;
  L2M_IN(params, q, subkeys, values);
  L2M_OUT(params, out, indices, weights, lse);
#if L2M_BINDING_CUDA
  // Scratch: each row's sorted top-k_sub of both halves (scores and sub-key ids), alive until the
  // end of this scope (reused by the caching allocator only for later work on this stream).
  const at::Tensor half_scores = at::empty({B * H * T, 2, k_sub}, q.options().dtype(at::kFloat));
  const at::Tensor half_ids = at::empty({B * H * T, 2, k_sub}, q.options().dtype(at::kInt));
  L2M_OUT(params, half_scores, half_ids);
#else
  params.q_rows = rows_of(q);
#endif
  L2M_LAUNCH(call, product_key_fwd, params, q);
}

// Gradients of the product-key read at a given selection: dq, dsubkeys like q, subkeys; dvalues
// like values, or with sparse_grad one row per entry: on CUDA (B * H * T * k, Dv), entry m's
// w_m * dout; on CPU coalesced (U, Dv), entry m adding w_m * dout to row value_rows[m]. On CUDA,
// deterministic: fixed-order segment sums (else float32 atomics); the CPU kernels always are.
inline void product_key_bwd(TensorArg dout, TensorArg dweights, TensorArg dlse, TensorArg q,
                            TensorArg subkeys, TensorArg values, TensorArg indices,
                            TensorArg weights, double scale, bool sum_heads,
                            bool sparse_grad L2M_CUDA_ONLY(bool deterministic), TensorArg dq,
                            TensorArg dsubkeys, TensorArg dvalues
                                L2M_CPU_ONLY(OptionalTensor value_rows)) {
  Call call("product_key_bwd");
  const Floating f = call.product_key(q, subkeys, values);
  call.rank(indices, "indices", 4, "(B, H, T, k)");
  if (indices.size(3) < 1) {
    call.value_error("indices must have k >= 1 entries per query, got " + shape_of(indices));
  }
  const int64_t k = call.selection(indices, q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  const int64_t n_sub = subkeys.size(2), N = n_sub * n_sub, Dv = values.size(1);
  call.tensor(dout, "dout", f.dtype, sum_heads ? Dims{B, T, Dv} : Dims{B, H, T, Dv},
              sum_heads ? "(B, T, Dv)" : "(B, H, T, Dv)", kRowLayout);
  call.tensor(dweights, "dweights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(dlse, "dlse", f.acc, {B, H, T}, "(B, H, T)");
  call.tensor(weights, "weights", f.acc, {B, H, T, k}, "(B, H, T, k)");
  call.tensor(dq, "dq", f.dtype, dims_of(q), "like q");
  call.tensor(dsubkeys, "dsubkeys", f.dtype, dims_of(subkeys), "like subkeys");
  std::vector<const at::Tensor*> inputs = {&dout, &dweights, &dlse, &q, &subkeys, &values,
                                           &indices, &weights};
#if L2M_BINDING_CUDA
  const int64_t rows = B * H * T, num_value_rows = rows * k;
#else
  int64_t num_value_rows = 0;
  if (sparse_grad) {
    TORCH_CHECK_VALUE(value_rows.has_value(),
                      call.op + ": sparse_grad needs value_rows (the dvalues row of each entry)");
    call.tensor(*value_rows, "value_rows", at::kLong, {B, H, T, k}, "(B, H, T, k)");
    call.storage(dvalues, "dvalues");
    num_value_rows = dvalues.dim() == 2 ? dvalues.size(0) : -1;
    inputs.push_back(&*value_rows);
  } else {
    TORCH_CHECK_VALUE(!value_rows.has_value(), call.op + ": value_rows is only for sparse_grad");
  }
#endif
  call.tensor(dvalues, "dvalues", f.dtype,
              sparse_grad ? Dims{num_value_rows, Dv} : dims_of(values),
              sparse_grad ? (kCuda ? "(B * H * T * k, Dv)" : "(U, Dv)") : "like values");
  call.apart({&dq, &dsubkeys, &dvalues}, inputs);
  kp::ProductKeyBwdParams params{};
  fill_product_key(params, f, q, subkeys, values, k, scale, sum_heads);
  params.sparse_grad = sparse_grad;
  L2M_IN(params, dout, dweights, dlse, q, subkeys, values, indices, weights);
  L2M_OUT(params, dq);
#if L2M_BINDING_CUDA
  check_product_key_limits(call, q, subkeys, k);
  const c10::cuda::CUDAGuard device_guard(q.device());
  if (rows == 0) {  // no entry: every sub-key / value gradient is zero
    dsubkeys.zero_();
    if (!sparse_grad) {
      dvalues.zero_();
    }
    return;
  }
  params.deterministic = deterministic;
  params.dvalues_rows = sparse_grad ? dvalues.data_ptr() : nullptr;
  if (deterministic) {
    const at::TensorOptions long_options = indices.options().dtype(at::kLong);
    const at::Tensor ds = at::empty({rows * k}, q.options().dtype(at::kFloat));
    L2M_OUT(params, ds);
    L2M_LAUNCH(call, product_key_bwd, params, q);
    const at::Tensor flat = indices.reshape({rows, k});
    const at::Tensor live = flat.ge(0).logical_and(flat.lt(N));
    // Sub-keys: entry (row, m, half) -> destination row (h * 2 + half) * n_sub + sub-key id,
    // source row row * 2 + half of q viewed as (rows * 2, Dk / 2), coefficient ds[row * k + m].
    const int64_t num_sub_rows = H * 2 * n_sub;
    const at::Tensor head =
        at::arange(rows, long_options).floor_divide(T).remainder(H).unsqueeze(1);  // (rows, 1)
    const at::Tensor dead = at::full({}, num_sub_rows, long_options);
    const at::Tensor key0 = at::where(live, head * (2 * n_sub) + flat.floor_divide(n_sub), dead);
    const at::Tensor key1 =
        at::where(live, head * (2 * n_sub) + n_sub + flat.remainder(n_sub), dead);
    const at::Tensor sub_keys = at::stack({key0, key1}, /*dim=*/2).reshape({-1});  // (E * 2,)
    const at::Tensor sub_entry = at::arange(rows * k * 2, long_options);
    const at::Tensor sub_coef = sub_entry.floor_divide(2);
    const at::Tensor sub_src = sub_coef.floor_divide(k) * 2 + sub_entry.remainder(2);
    product_key_segment_sum(call, params.dtype, sub_keys, sub_coef, sub_src, num_sub_rows, q,
                            rows * 2, ds, scale, dsubkeys, q.size(3) / 2);
    if (!sparse_grad) {
      // Values: entry (row, m) -> destination slot, source row of dout, coefficient weights.
      const at::Tensor value_keys =
          at::where(live, flat, at::full({}, N, long_options)).reshape({-1});
      const at::Tensor value_entry = at::arange(rows * k, long_options);
      const at::Tensor entry_row = value_entry.floor_divide(k);
      const at::Tensor value_src =
          sum_heads ? entry_row.floor_divide(H * T) * T + entry_row.remainder(T) : entry_row;
      product_key_segment_sum(call, params.dtype, value_keys, value_entry, value_src, N, dout,
                              sum_heads ? B * T : rows, weights.reshape({-1}), 1.0, dvalues, Dv);
    }
    return;
  }
  // Atomic mode: float32 accumulators, zeroed; float32 outputs accumulate in place.
  const bool in_place = f.dtype == at::kFloat;
  const at::TensorOptions float_options = q.options().dtype(at::kFloat);
  const at::Tensor dsubkeys_acc = in_place ? dsubkeys : at::empty(subkeys.sizes(), float_options);
  dsubkeys_acc.zero_();
  L2M_OUT(params, dsubkeys_acc);
  at::Tensor dvalues_acc;
  if (!sparse_grad) {
    dvalues_acc = in_place ? dvalues : at::empty(values.sizes(), float_options);
    dvalues_acc.zero_();
    L2M_OUT(params, dvalues_acc);
  }
  L2M_LAUNCH(call, product_key_bwd, params, q);
  if (!in_place) {
    dsubkeys.copy_(dsubkeys_acc);
    if (!sparse_grad) {
      dvalues.copy_(dvalues_acc);
    }
  }
#else
  if (sparse_grad) {
    call.in_range(*value_rows, "value_rows", 0, num_value_rows,
                  "in [0, U) with U = " + text(num_value_rows));
  }
  call.in_range(indices, "indices", 0, N, "in [0, n_sub ** 2) with n_sub ** 2 = " + text(N));
  // With sum_heads, dout (B, T, Dv) serves every head: the (B, H, T) rows with head stride 0.
  params.dout_rows =
      sum_heads ? Rows::strided(H, T, dout.stride(0), 0, dout.stride(1)) : rows_of(dout);
  params.q_rows = rows_of(q);
  L2M_OUT(params, dsubkeys, dvalues);
  params.value_rows = sparse_grad ? value_rows->const_data_ptr<int64_t>() : nullptr;
  params.num_value_rows = num_value_rows;
  // Runs even without queries: dsubkeys and a dense dvalues must still be zeroed.
  L2M_LAUNCH(call, product_key_bwd, params, q);
#endif
}

// Gated memory writes. On CUDA on flat (G, ...) operands with the write plan (order (E,) int64,
// run_length (E,) int32, E = G * T * kw; memory_write.h); on CPU reading the indices on the host.
template <typename Params>
WriteShape prepare_write(Call& call, Params& params, TensorArg memory, TensorArg indices,
                         TensorArg weights, TensorArg add,
                         TensorArg erase L2M_CUDA_ONLY(TensorArg order, TensorArg run_length)) {
  const WriteShape shape = call.write(memory, indices, weights, add, erase);
  params.dtype = kernel_dtype(memory.scalar_type());
  params.indices_int32 = shape.indices_int32;
  params.groups = shape.groups;
  params.num_slots = shape.num_slots;
  params.dim = shape.dim;
  params.steps = shape.steps;
  params.writes_per_step = shape.writes_per_step;
  params.erase_dim = shape.erase_dim;
  L2M_IN(params, memory, indices, weights, add, erase);
#if L2M_BINDING_CUDA
  const int64_t entries = shape.groups * shape.steps * shape.writes_per_step;
  call.tensor(order, "order", at::kLong, {entries}, "(E,)");
  call.tensor(run_length, "run_length", at::kInt, {entries}, "(E,)");
  L2M_IN(params, order, run_length);
#else
  check_write_slots(call, indices, shape);
  params.weight_rows = write_rows_of(weights);
  params.add_rows = write_rows_of(add);
  params.erase_rows = write_rows_of(erase);
#endif
  return shape;
}

inline void gated_memory_write_fwd(TensorArg memory, TensorArg indices, TensorArg weights,
                                   TensorArg add,
                                   TensorArg erase
                                       L2M_CUDA_ONLY(TensorArg order, TensorArg run_length),
                                   TensorArg out) {
  Call call("gated_memory_write_fwd");
  kp::GatedMemoryWriteFwdParams params{};
  [[maybe_unused]] const WriteShape shape =
      prepare_write(call, params, memory, indices, weights, add,
                    erase L2M_CUDA_ONLY(order, run_length));
  call.tensor(out, "out", memory.scalar_type(), dims_of(memory), "like memory");
  // out may be memory itself (in place: each slot is read before it is written), nothing else.
  at::assert_no_partial_overlap(out, memory);
  call.apart({&out}, {&indices, &weights, &add, &erase});
#if L2M_BINDING_CUDA
  call.apart({&out}, {&order, &run_length});
  // Nothing to write (N == 0 admits only -1 entries; its empty tensors may have no storage).
  if (shape.groups * shape.steps * shape.writes_per_step == 0 || shape.dim == 0 ||
      shape.num_slots == 0) {
    return;
  }
#else
  call.spans_apart({{"out", &out}}, {{"weights", &weights}, {"add", &add}, {"erase", &erase}});
#endif
  L2M_OUT(params, out);
  L2M_LAUNCH(call, gated_memory_write_fwd, params, memory);
}

// Gradients of the writes. CPU: dmemory, dweights, dadd, derase like their inputs. CUDA: dmemory
// (a copy of dnew) and dweights get the written slots; the per-entry float32 add_parts (E, D) and
// erase_parts (E, erase_dim) of written entries (the caller zeroes them) stand for dadd, derase.
inline void gated_memory_write_bwd(TensorArg dnew, TensorArg memory, TensorArg indices,
                                   TensorArg weights, TensorArg add,
                                   TensorArg erase
                                       L2M_CUDA_ONLY(TensorArg order, TensorArg run_length),
                                   TensorArg dmemory, TensorArg dweights, TensorArg dadd,
                                   TensorArg derase) {
  Call call("gated_memory_write_bwd");
  kp::GatedMemoryWriteBwdParams params{};
  [[maybe_unused]] const WriteShape shape =
      prepare_write(call, params, memory, indices, weights, add,
                    erase L2M_CUDA_ONLY(order, run_length));
  const auto dtype = memory.scalar_type();
  call.tensor(dnew, "dnew", dtype, dims_of(memory), "like memory");
  call.tensor(dmemory, "dmemory", dtype, dims_of(memory), "like memory");
  call.tensor(dweights, "dweights", dtype, dims_of(weights), "like weights");
  std::vector<const at::Tensor*> inputs = {&dnew, &memory, &indices, &weights, &add, &erase};
#if L2M_BINDING_CUDA
  const int64_t entries = shape.groups * shape.steps * shape.writes_per_step;
  call.tensor(dadd, "add_parts", at::kFloat, {entries, shape.dim}, "(E, D)");
  call.tensor(derase, "erase_parts", at::kFloat, {entries, shape.erase_dim}, "(E, erase_dim)");
  inputs.insert(inputs.end(), {&order, &run_length});
#else
  call.tensor(dadd, "dadd", dtype, dims_of(add), "like add");
  call.tensor(derase, "derase", dtype, dims_of(erase), "like erase");
#endif
  call.apart({&dmemory, &dweights, &dadd, &derase}, inputs);
  L2M_IN(params, dnew);
  L2M_OUT(params, dmemory, dweights);
#if L2M_BINDING_CUDA
  // No written slot: dmemory is dnew's copy and the other outputs arrive zeroed.
  if (entries == 0 || shape.dim == 0 || shape.num_slots == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(memory.device());
  // Running float32 sum of each entry's dweight over the column chunks (memory_write.h), alive
  // until the end of this scope.
  const at::Tensor dweight_partial = at::empty({entries}, memory.options().dtype(at::kFloat));
  params.add_parts = dadd.data_ptr<float>();
  params.erase_parts = derase.data_ptr<float>();
  L2M_OUT(params, dweight_partial);
#else
  call.spans_apart(
      {{"dmemory", &dmemory}, {"dweights", &dweights}, {"dadd", &dadd}, {"derase", &derase}},
      {{"weights", &weights}, {"add", &add}, {"erase", &erase}});
  L2M_OUT(params, dadd, derase);
#endif
  L2M_LAUNCH(call, gated_memory_write_bwd, params, memory);
}

// The dense update's inputs, placed for the kernels: on CUDA each as its 4-D strides; on CPU flat
// (contiguous) or strided through its rows, and then no output may reach into their bytes (the
// kernel reads them where they lie while it stores).
template <typename Params>
void set_dense_inputs([[maybe_unused]] const Call& call, Params& params,
                      [[maybe_unused]] bool strided, TensorArg memory, TensorArg update,
                      TensorArg input_gate, TensorArg forget_gate,
                      [[maybe_unused]] NamedTensors outputs) {
  params.dtype = kernel_dtype(memory.scalar_type());
#if L2M_BINDING_CUDA
  const auto layout = [](TensorArg tensor) {
    kp::StridedOperand operand;
    operand.data = tensor.const_data_ptr();
    for (int d = 0; d < 4; ++d) {
      operand.strides[d] = tensor.stride(d);
    }
    return operand;
  };
  for (int d = 0; d < 4; ++d) {
    params.sizes[d] = memory.size(d);
  }
  params.memory = layout(memory);
  params.update = layout(update);
  params.input_gate = layout(input_gate);
  params.forget_gate = layout(forget_gate);
#else
  params.numel = memory.numel();
  L2M_IN(params, memory, update, input_gate, forget_gate);
  params.strided = strided;
  if (!strided) {
    return;
  }
  call.spans_apart(outputs, {{"memory", &memory}, {"update", &update},
                             {"input_gate", &input_gate}, {"forget_gate", &forget_gate}});
  const auto layout = [](TensorArg input) {
    return l2m::cpu::DenseLayout{rows_of(input), input.size(3) <= 1 ? 1 : input.stride(3)};
  };
  params.row_len = memory.size(3);
  params.memory_layout = layout(memory);
  params.update_layout = layout(update);
  params.input_gate_layout = layout(input_gate);
  params.forget_gate_layout = layout(forget_gate);
#endif
}

inline void gated_dense_update_fwd(TensorArg memory, TensorArg update, TensorArg input_gate,
                                   TensorArg forget_gate, TensorArg out) {
  Call call("gated_dense_update_fwd");
  const bool strided = call.dense(memory, update, input_gate, forget_gate);
  call.tensor(out, "out", memory.scalar_type(), dims_of(memory), "like memory");
  // Elementwise: on CPU out may alias an input exactly (each element is read before it is
  // written).
  call.apart({&out}, {&memory, &update, &input_gate, &forget_gate}, /*exact_alias=*/!kCuda);
  if (kCuda && out.numel() == 0) {
    return;
  }
  kp::GatedDenseUpdateFwdParams params{};
  set_dense_inputs(call, params, strided, memory, update, input_gate, forget_gate,
                   {{"out", &out}});
  L2M_OUT(params, out);
  L2M_LAUNCH(call, gated_dense_update_fwd, params, memory);
}

inline void gated_dense_update_bwd(TensorArg dout, TensorArg memory, TensorArg update,
                                   TensorArg input_gate, TensorArg forget_gate, TensorArg dmemory,
                                   TensorArg dupdate, TensorArg dinput_gate,
                                   TensorArg dforget_gate) {
  Call call("gated_dense_update_bwd");
  const bool strided = call.dense(memory, update, input_gate, forget_gate);
  const Floating f = call.floating(memory, "memory");
  const Dims dims = dims_of(memory);
  call.tensor(dout, "dout", f.dtype, dims, "like memory");
  call.tensor(dmemory, "dmemory", f.acc, dims, "like memory");
  call.tensor(dupdate, "dupdate", f.acc, dims, "like memory");
  call.tensor(dinput_gate, "dinput_gate", f.acc, dims, "like memory");
  call.tensor(dforget_gate, "dforget_gate", f.acc, dims, "like memory");
  // The gradients may have another dtype than the inputs (acc): no overlap at all.
  call.apart({&dmemory, &dupdate, &dinput_gate, &dforget_gate},
             {&dout, &memory, &update, &input_gate, &forget_gate});
  if (kCuda && dout.numel() == 0) {
    return;
  }
  kp::GatedDenseUpdateBwdParams params{};
  set_dense_inputs(call, params, strided, memory, update, input_gate, forget_gate,
                   {{"dmemory", &dmemory}, {"dupdate", &dupdate}, {"dinput_gate", &dinput_gate},
                    {"dforget_gate", &dforget_gate}});
  L2M_IN(params, dout);
  L2M_OUT(params, dmemory, dupdate, dinput_gate, dforget_gate);
  L2M_LAUNCH(call, gated_dense_update_bwd, params, memory);
}

// Causal local attention of the last T of S positions: out (B, H, T, Dv), lse (B, H, T) acc.
inline void local_attention_fwd(TensorArg q, TensorArg k, TensorArg v, int64_t window, double scale,
                                TensorArg out, TensorArg lse) {
  Call call("local_attention_fwd");
  const Floating f = call.local(q, k, v, window);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  call.tensor(out, "out", f.dtype, {B, H, T, v.size(3)}, "(B, H, T, Dv)");
  call.tensor(lse, "lse", f.acc, {B, H, T}, "(B, H, T)");
  call.apart({&out, &lse}, {&q, &k, &v});
  if (kCuda && std::max({H, k.size(2), q.size(3), v.size(3)}) > (int64_t{1} << 30)) {
    call.not_served("H, S, D, Dv <= 2**30, got q " + shape_of(q) + ", k " + shape_of(k) +
                    ", v " + shape_of(v));
  }
  if (B * H * T == 0) {
    return;
  }
  kp::LocalAttentionFwdParams params{};
  fill_local(params, f, q, k, v, window, scale);
  L2M_IN(params, q, k, v);
  L2M_OUT(params, out, lse);
#if !L2M_BINDING_CUDA
  params.q_rows = rows_of(q);
  params.k_rows = rows_of(k);
  params.v_rows = rows_of(v);
#endif
  L2M_LAUNCH(call, local_attention_fwd, params, q);
}

// Gradients of the local attention: dq, dk, dv like q, k, v.
inline void local_attention_bwd(TensorArg dout, TensorArg dlse, TensorArg q, TensorArg k,
                                TensorArg v, TensorArg out, TensorArg lse, int64_t window,
                                double scale, TensorArg dq, TensorArg dk, TensorArg dv) {
  Call call("local_attention_bwd");
  const Floating f = call.local(q, k, v, window);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  call.tensor(dout, "dout", f.dtype, {B, H, T, v.size(3)}, "(B, H, T, Dv)", kRowLayout);
  call.tensor(dlse, "dlse", f.acc, {B, H, T}, "(B, H, T)");
  call.tensor(out, "out", f.dtype, {B, H, T, v.size(3)}, "(B, H, T, Dv)");
  call.tensor(lse, "lse", f.acc, {B, H, T}, "(B, H, T)");
  call.tensor(dq, "dq", f.dtype, dims_of(q), "like q");
  call.tensor(dk, "dk", f.dtype, dims_of(k), "like k");
  call.tensor(dv, "dv", f.dtype, dims_of(v), "like v");
  call.apart({&dq, &dk, &dv}, {&dout, &dlse, &q, &k, &v, &out, &lse});
  if (kCuda && std::max({H, k.size(2), q.size(3), v.size(3)}) > (int64_t{1} << 30)) {
    call.not_served("H, S, D, Dv <= 2**30, got q " + shape_of(q) + ", k " + shape_of(k) +
                    ", v " + shape_of(v));
  }
  // No key: dk, dv and (S >= T) dq have no elements.
  if (B * k.size(1) * k.size(2) == 0) {
    return;
  }
  kp::LocalAttentionBwdParams params{};
  fill_local(params, f, q, k, v, window, scale);
  L2M_IN(params, dout, dlse, q, k, v, out, lse);
  L2M_OUT(params, dq, dk, dv);
#if L2M_BINDING_CUDA
  const c10::cuda::CUDAGuard device_guard(q.device());
  // delta = <dout, out> - dlse per row, written by the first kernel and read by the others, alive
  // until the end of this scope.
  const at::Tensor delta = at::empty({B, H, T}, lse.options());
  L2M_OUT(params, delta);
#else
  params.dout_rows = rows_of(dout);
  params.q_rows = rows_of(q);
  params.k_rows = rows_of(k);
  params.v_rows = rows_of(v);
#endif
  // Runs even without queries (T == 0): dk and dv are zeroed.
  L2M_LAUNCH(call, local_attention_bwd, params, q);
}

// ---- registration: the same functions, arguments and docs in both extensions ----

template <typename... Extra>
void def_ops(py::module_& m, const Extra&... extra) {
  using py::arg;
  m.def("merge_attention_fwd", &merge_attention_fwd, extra..., arg("out_a"), arg("lse_a"),
        arg("out_b"), arg("lse_b"), arg("out"), arg("lse"),
        "out_a, out_b, out: (R, D) dtype; lse_a, lse_b, lse: (R,) acc. Writes out and lse =\n"
        "logaddexp(lse_a, lse_b); out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.");
  m.def("merge_attention_bwd", &merge_attention_bwd, extra..., arg("dout"), arg("dlse"),
        arg("out_a"), arg("lse_a"), arg("out_b"), arg("lse_b"), arg("lse"), arg("d_out_a"),
        arg("d_lse_a"), arg("d_out_b"), arg("d_lse_b"),
        "Gradients of merge_attention_fwd. (R, D) dtype: dout, out_a, out_b, d_out_a, d_out_b;\n"
        "(R,) acc: dlse, lse_a, lse_b, lse (the forward's output), d_lse_a, d_lse_b.");
  m.def("gated_merge_fwd", &gated_merge_fwd, extra..., arg("out_local"), arg("out_mem"),
        arg("gate"), arg("out"),
        "out_local, out_mem, out: (R, D) dtype; gate: (R,) dtype logits. Writes\n"
        "out = sigmoid(gate) * out_mem + (1 - sigmoid(gate)) * out_local.");
  m.def("gated_merge_bwd", &gated_merge_bwd, extra..., arg("dout"), arg("out_local"),
        arg("out_mem"), arg("gate"), arg("d_local"), arg("d_mem"), arg("d_gate"),
        "Gradients of gated_merge_fwd. (R, D) dtype: dout, out_local, out_mem, d_local, d_mem;\n"
        "(R,) dtype: gate; (R,) acc: d_gate.");
  const char* topk_fwd_doc =
      "Sparse top-k memory read. q (B, H, T, Dk); keys (B, Hm, N, Dk) or (Hm, N, Dk); values\n"
      "the same leading shape, last Dv; valid_len None or int64 (B,); 1 <= k <= min(N, 256).\n"
      "Writes out (B, H, T, Dv) dtype, indices (B, H, T, k) int64, weights (B, H, T, k) acc,\n"
      "lse (B, H, T) acc (acc = float64 for float64 input, else float32).";
  const char* topk_bwd_doc =
      "Gradients of topk_read_fwd for its indices and weights: writes dq (like q), dkeys (like\n"
      "keys), dvalues (like values).";
  const char* pk_bwd_doc =
      "Gradients of product_key_fwd for its indices and weights: writes dq (like q), dsubkeys\n"
      "(like subkeys) and dvalues: like values (dense, every row), or with sparse_grad one row\n"
      "per entry (see product_key_bwd in csrc/common/binding.h).";
  const char* write_fwd_doc =
      "Gated memory writes. memory (B, Hm, N, D) or (B, N, D); with its leading dims L: indices\n"
      "(*L, T, kw) int32/int64 in [-1, N), -1 = no write; weights (*L, T, kw); add (*L, T, D);\n"
      "erase (*L, T, D) or (*L, T, 1), all memory's dtype. Writes out (like memory; may be\n"
      "memory itself: then only written slots are stored): for p = t * kw + j in order,\n"
      "M[s] = M[s] * (1 - w * erase[t]) + w * add[t].";
  m.def("topk_read_fwd", &topk_read_fwd, extra..., arg("q"), arg("keys"), arg("values"),
        arg("valid_len"), arg("k"), arg("scale"), arg("out"), arg("indices"), arg("weights"),
        arg("lse") L2M_CUDA_ONLY(arg("use_threshold") = true), topk_fwd_doc);
  m.def("topk_read_bwd", &topk_read_bwd, extra..., arg("dout"), arg("dweights"), arg("dlse"),
        arg("q"), arg("keys"), arg("values"), arg("indices"), arg("weights"),
        arg("scale") L2M_CUDA_ONLY(arg("deterministic")), arg("dq"), arg("dkeys"), arg("dvalues"),
        topk_bwd_doc);
  m.def("product_key_bwd", &product_key_bwd, extra..., arg("dout"), arg("dweights"), arg("dlse"),
        arg("q"), arg("subkeys"), arg("values"), arg("indices"), arg("weights"), arg("scale"),
        arg("sum_heads"), arg("sparse_grad") L2M_CUDA_ONLY(arg("deterministic")), arg("dq"),
        arg("dsubkeys"), arg("dvalues") L2M_CPU_ONLY(arg("value_rows") = py::none()), pk_bwd_doc);
  m.def("gated_memory_write_fwd", &gated_memory_write_fwd, extra..., arg("memory"),
        arg("indices"), arg("weights"), arg("add"),
        arg("erase") L2M_CUDA_ONLY(arg("order"), arg("run_length")), arg("out"), write_fwd_doc);
  m.def("gated_memory_write_bwd", &gated_memory_write_bwd, extra..., arg("dnew"), arg("memory"),
        arg("indices"), arg("weights"), arg("add"),
        arg("erase") L2M_CUDA_ONLY(arg("order"), arg("run_length")), arg("dmemory"),
        arg("dweights"), arg(kCuda ? "add_parts" : "dadd"), arg(kCuda ? "erase_parts" : "derase"),
        kCuda ? "Gradients of gated_memory_write_fwd: stores the written slots of dmemory (a copy\n"
                "of dnew), dweights and the per-entry float32 add_parts (E, D) / erase_parts\n"
                "(E, erase_dim) of written entries (the caller zeroes them)."
              : "Gradients of gated_memory_write_fwd (memory = its input; dnew contiguous, like\n"
                "memory): writes dmemory, dweights, dadd, derase, each of its input's shape,\n"
                "contiguous. Deterministic (per-slot chains, fixed-order step sums).");
  m.def("product_key_fwd", &product_key_fwd, extra..., arg("q"), arg("subkeys"), arg("values"),
        arg("k"), arg("k_sub"), arg("scale"), arg("sum_heads"), arg("out"), arg("indices"),
        arg("weights"), arg("lse"),
        "Product-key memory read. q (B, H, T, Dk), Dk even; subkeys (H, 2, n_sub, Dk / 2);\n"
        "values (n_sub ** 2, Dv); 1 <= k_sub <= n_sub, 1 <= k <= k_sub ** 2. Writes out\n"
        "(B, H, T, Dv) or, with sum_heads, (B, T, Dv) dtype; indices (B, H, T, k) int64; weights\n"
        "(B, H, T, k) and lse (B, H, T) acc (acc = float64 for float64 input, else float32).");
  m.def("gated_dense_update_fwd", &gated_dense_update_fwd, extra..., arg("memory"), arg("update"),
        arg("input_gate"), arg("forget_gate"), arg("out"),
        "Gated dense update, elementwise over same-shape tensors of one dtype (all contiguous, or\n"
        "4-D views of the broadcast shape, e.g. broadcast gates): writes\n"
        "out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update) (contiguous).");
  m.def("gated_dense_update_bwd", &gated_dense_update_bwd, extra..., arg("dout"), arg("memory"),
        arg("update"), arg("input_gate"), arg("forget_gate"), arg("dmemory"), arg("dupdate"),
        arg("dinput_gate"), arg("dforget_gate"),
        "Elementwise gradients of gated_dense_update_fwd: writes dmemory, dupdate, dinput_gate,\n"
        "dforget_gate, each shaped like memory in acc (float64 for float64 input, else float32),\n"
        "contiguous; the caller reduces them to each input's shape.");
  m.def("local_attention_fwd", &local_attention_fwd, extra..., arg("q"), arg("k"), arg("v"),
        arg("window"), arg("scale"), arg("out"), arg("lse"),
        "Causal local attention of the last T of S positions (FlashAttention style, no T x S\n"
        "matrix). q (B, H, T, D); k (B, Hkv, S, D), H % Hkv == 0, S >= T; v (B, Hkv, S, Dv);\n"
        "window -1 (none) or >= 0: query t at p = S - T + t sees keys p - window < j <= p.\n"
        "Writes out (B, H, T, Dv) dtype and lse (B, H, T) acc; no visible key: out 0, lse -inf.");
  m.def("local_attention_bwd", &local_attention_bwd, extra..., arg("dout"), arg("dlse"), arg("q"),
        arg("k"), arg("v"), arg("out"), arg("lse"), arg("window"), arg("scale"), arg("dq"),
        arg("dk"), arg("dv"),
        "Gradients of local_attention_fwd (FlashAttention-2): writes dq, dk, dv (like q, k, v).\n"
        "out enters only through <dout, out> per row. Deterministic (dq per query block, dk/dv\n"
        "per key block, no atomics).");
  m.def("memory_read_weights", &memory_read_weights, extra..., arg("q"), arg("keys"),
        arg("values"), arg("indices"), arg("lse"), arg("scale"), arg("dout"), arg("weights"),
        arg("dots"), arg("out"),
        "The top-k read's weights at a given selection (memory_attention backward): writes\n"
        "weights (B, H, T, k) acc = exp(<scale q, keys[n_j]> - lse) (0 for slot -1), and, when\n"
        "given, dots (B, H, T) acc = sum_j w_j <dout, values[n_j]> and out (B, H, T, Dv) dtype =\n"
        "sum_j w_j values[n_j]. q, keys, values as in topk_read_fwd; dout, dots, out optional.");
}

}  // namespace l2m::binding
