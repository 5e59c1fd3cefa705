// The torch-facing side of both extensions, written once: each entry point lists its operands
// (Operand: shape, dtype, layout), from which its checks and their error texts follow; it fills the
// kernels' plain params structs (csrc/common/params.h) and is registered by def_ops. Included by
// csrc/cpu/bindings.cpp (l2m_kernels._C) and csrc/cuda/bindings.cpp (l2m_kernels._C_cuda), which
// define before it L2M_BINDING_CUDA (0 or 1: the device, layouts, dtypes and error prefix, and the
// sections only one backend has: on CPU the row layouts of operands read where they lie and the
// host checks of indices; on CUDA the kernels' size limits and the plan and scratch tensors, which
// the Python launchers make and pass in like any operand),
// L2M_KERNEL_NS (the namespace of the params structs) and L2M_LAUNCH(call, launcher, params,
// device_of). Every entry point returns None and writes every element of its preallocated outputs
// (passed last); the Python layer validates first, these checks keep a wrong call from reading or
// writing out of bounds. Errors: ValueError for shapes, devices and layouts, TypeError for dtypes,
// IndexError for indices out of range, NotImplementedError for sizes a backend does not serve.
// Sizes are formatted into a std::string rather than streamed into TORCH_CHECK: with torch 2.11
// and gcc 13, inserting an integer into the error's ostream crashed the process.
#pragma once

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
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

// How an operand may lie in memory. kRows: a (.., T, D) operand whose last dimension is contiguous,
// read row by row where it lies (csrc/cpu/rows.h); kRowsOrBroadcast: stride 1 or 0 there.
enum Layout { kContiguous, kRows, kRowsOrBroadcast, kAny };
// The operands the CPU kernels read through Rows; the CUDA kernels read them contiguous.
constexpr Layout kRowLayout = kCuda ? kContiguous : kRows;
// An operand's dtype: the op's floating storage dtype (fixed by its first kData operand), its
// accumulation dtype kAcc (float64 for float64 storage, else float32), or a fixed one; kIndex is
// int32 or int64.
enum Kind { kData, kAcc, kInt64, kInt32, kFloat32, kIndex, kBool };

// One operand as an entry point describes it: its name, the tensor (nullptr: an absent optional),
// its shape, dtype and layout. A shape is "(B, H, T, Dk)": sizes named by symbols, each bound by
// the first operand that has it (or by Call::let) and required of every later one, or literal
// numbers; "(B, Hm, N, Dk) or (Hm, N, Dk)": the first alternative that fits; "like q": the sizes
// of the operand q checked before; "*": any.
struct Operand {
  const char* name;
  const at::Tensor* tensor;
  const char* shape;
  Kind kind = kData;
  Layout layout = kContiguous;
};
inline const at::Tensor* tensor_ptr(TensorArg tensor) { return &tensor; }
inline const at::Tensor* tensor_ptr(OptionalTensor tensor) {
  return tensor.has_value() ? &*tensor : nullptr;
}
// L2M_T(q, "(B, H, T, Dk)", kData, kRowLayout): the operand named like the argument it holds.
#define L2M_T(tensor, ...) \
  ::l2m::binding::Operand { #tensor, ::l2m::binding::tensor_ptr(tensor), __VA_ARGS__ }

// "(4, 8)", "(4,)".
inline std::string dims_text(at::IntArrayRef dims) {
  std::string text = "(";
  for (size_t axis = 0; axis < dims.size(); ++axis) {
    text += (axis ? ", " : "") + std::to_string(dims[axis]);
  }
  return text + (dims.size() == 1 ? ",)" : ")");
}
inline std::string shape_of(TensorArg tensor) { return dims_text(tensor.sizes()); }
inline std::string text(int64_t value) { return std::to_string(value); }

// Calls f(dim) for each dimension of one shape alternative, "(B, H, T)" or "(R,)".
template <typename F>
void for_each_dim(std::string_view shape, F&& f) {
  for (shape = shape.substr(1, shape.size() - 2); !shape.empty();) {
    const size_t comma = std::min(shape.find(','), shape.size());
    std::string_view dim = shape.substr(0, comma);
    shape.remove_prefix(std::min(comma + 1, shape.size()));
    dim.remove_prefix(std::min(dim.find_first_not_of(' '), dim.size()));
    if (!dim.empty()) {
      f(dim);
    }
  }
}

// The one dtype dispatch from torch to the kernels: the params' `dtype` (l2m::Dtype, params.h).
inline l2m::Dtype kernel_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat      ? l2m::Dtype::kFloat32
         : dtype == at::kHalf     ? l2m::Dtype::kFloat16
         : dtype == at::kBFloat16 ? l2m::Dtype::kBFloat16
                                  : l2m::Dtype::kFloat64;
}

// L2M_FOR_EACH(f, x, a, b, ...): f(x, a) f(x, b) ..., for up to 20 arguments.
#define L2M_EACH_1(f, x, a) f(x, a)
#define L2M_EACH_2(f, x, a, ...) f(x, a) L2M_EACH_1(f, x, __VA_ARGS__)
#define L2M_EACH_3(f, x, a, ...) f(x, a) L2M_EACH_2(f, x, __VA_ARGS__)
#define L2M_EACH_4(f, x, a, ...) f(x, a) L2M_EACH_3(f, x, __VA_ARGS__)
#define L2M_EACH_5(f, x, a, ...) f(x, a) L2M_EACH_4(f, x, __VA_ARGS__)
#define L2M_EACH_6(f, x, a, ...) f(x, a) L2M_EACH_5(f, x, __VA_ARGS__)
#define L2M_EACH_7(f, x, a, ...) f(x, a) L2M_EACH_6(f, x, __VA_ARGS__)
#define L2M_EACH_8(f, x, a, ...) f(x, a) L2M_EACH_7(f, x, __VA_ARGS__)
#define L2M_EACH_9(f, x, a, ...) f(x, a) L2M_EACH_8(f, x, __VA_ARGS__)
#define L2M_EACH_10(f, x, a, ...) f(x, a) L2M_EACH_9(f, x, __VA_ARGS__)
#define L2M_EACH_11(f, x, a, ...) f(x, a) L2M_EACH_10(f, x, __VA_ARGS__)
#define L2M_EACH_12(f, x, a, ...) f(x, a) L2M_EACH_11(f, x, __VA_ARGS__)
#define L2M_EACH_13(f, x, a, ...) f(x, a) L2M_EACH_12(f, x, __VA_ARGS__)
#define L2M_EACH_14(f, x, a, ...) f(x, a) L2M_EACH_13(f, x, __VA_ARGS__)
#define L2M_EACH_15(f, x, a, ...) f(x, a) L2M_EACH_14(f, x, __VA_ARGS__)
#define L2M_EACH_16(f, x, a, ...) f(x, a) L2M_EACH_15(f, x, __VA_ARGS__)
#define L2M_EACH_17(f, x, a, ...) f(x, a) L2M_EACH_16(f, x, __VA_ARGS__)
#define L2M_EACH_18(f, x, a, ...) f(x, a) L2M_EACH_17(f, x, __VA_ARGS__)
#define L2M_EACH_19(f, x, a, ...) f(x, a) L2M_EACH_18(f, x, __VA_ARGS__)
#define L2M_EACH_20(f, x, a, ...) f(x, a) L2M_EACH_19(f, x, __VA_ARGS__)
#define L2M_EACH_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, _17, _18, \
                  _19, _20, N, ...)                                                                \
  L2M_EACH_##N
#define L2M_FOR_EACH(f, x, ...)                                                                   \
  L2M_EACH_(__VA_ARGS__, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1) \
  (f, x, __VA_ARGS__)
// L2M_IN(params, a, b, ...): params.a = a's data (read-only), params.b = b's, ..., each as its
// field's pointer type; L2M_OUT the same for outputs.
#define L2M_IN_(params, tensor) \
  (params).tensor = static_cast<decltype((params).tensor)>((tensor).const_data_ptr());
#define L2M_OUT_(params, tensor) \
  (params).tensor = static_cast<decltype((params).tensor)>((tensor).data_ptr());
#define L2M_IN(params, ...) L2M_FOR_EACH(L2M_IN_, params, __VA_ARGS__)
#define L2M_OUT(params, ...) L2M_FOR_EACH(L2M_OUT_, params, __VA_ARGS__)
// The size fields of the params structs (params.h) and the shape symbols whose sizes they hold.
constexpr std::pair<std::string_view, std::string_view> kSizeFields[] = {
    {"batch", "B"},     {"heads", "H"},       {"seq_len", "T"},  {"mem_heads", "Hm"},
    {"num_slots", "N"}, {"dim_k", "Dk"},      {"dim_v", "Dv"},   {"kv_heads", "Hkv"},
    {"dim", "D"},       {"context_len", "S"}, {"head_dim", "D"}, {"rows", "R"},
    {"groups", "G"},    {"steps", "T"},       {"writes_per_step", "kw"},
    {"num_blocks", "NB"}, {"num_reprs", "R"},   {"block_size", "S"}, {"num_selected", "K"}};
constexpr std::string_view symbol_of(std::string_view field) {
  for (const auto& [name, symbol] : kSizeFields) {
    if (name == field) {
      return symbol;
    }
  }
  return field;  // k, n_sub, erase_dim: named alike
}
// L2M_SIZES(params, batch, heads, ...): params.dtype and the size fields named, from the dtype and
// the sizes bound in `call`.
#define L2M_SIZE_(params, field) (params).field = call[symbol_of(#field)];
#define L2M_SIZES(params, ...)                     \
  (params).dtype = kernel_dtype(call.dtype);       \
  L2M_FOR_EACH(L2M_SIZE_, params, __VA_ARGS__)
// L2M_ROWS(params, q, dout): params.q_rows = rows_of(q), ... (CPU).
#define L2M_ROWS_(params, tensor) (params).tensor##_rows = rows_of(tensor);
#define L2M_ROWS(params, ...) L2M_FOR_EACH(L2M_ROWS_, params, __VA_ARGS__)

// The checks of one call of one op; `op` prefixes every message. The operands are checked in the
// order given: place (device, layout), shape, dtype. On CUDA every tensor must be on the device of
// the first one.
class Call {
 public:
  explicit Call(const char* name, bool float64 = kFloat64)
      : op(kCuda ? "l2m " + std::string(name) + " (cuda)" : name), float64_(float64) {}

  const std::string op;
  c10::ScalarType dtype = at::kFloat, acc = at::kFloat;  // fixed by the first kData operand

  void value_error(const std::string& what) const { TORCH_CHECK_VALUE(false, op + ": " + what); }
  void type_error(const std::string& what) const { TORCH_CHECK_TYPE(false, op + ": " + what); }
  void index_error(const std::string& what) const { TORCH_CHECK_INDEX(false, op + ": " + what); }
  void not_served(const std::string& what) const {
    TORCH_CHECK_NOT_IMPLEMENTED(false, op + ": the CUDA kernels serve " + what);
  }

  void inputs(std::initializer_list<Operand> operands) { check(operands, /*output=*/false); }
  void outputs(std::initializer_list<Operand> operands) { check(operands, /*output=*/true); }
  // Binds a size that no operand has alone, e.g. let("Dk / 2", Dk / 2).
  void let(std::string_view symbol, int64_t size) { symbols_.push_back({symbol, size}); }
  int64_t operator[](std::string_view symbol) const {
    const int64_t* size = find(symbol);
    TORCH_INTERNAL_ASSERT(size != nullptr, op, ": the size ", std::string(symbol), " is unbound");
    return *size;
  }

  void storage(TensorArg tensor, const char* name, Layout layout) {
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
    if (layout == kContiguous) {
      TORCH_CHECK_VALUE(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
    } else if (layout != kAny) {
      const bool broadcast = layout == kRowsOrBroadcast;
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

  // No output overlaps an input or another output. With exact_alias an output may be an input
  // exactly (row-wise and elementwise kernels read each element before writing it); so it may be
  // `in_place` (a kernel that reads each slot before it writes it).
  void apart(bool exact_alias = false, const at::Tensor* in_place = nullptr) const {
    for (size_t i = 0; i < checked_.size(); ++i) {
      for (size_t j = 0; j < checked_.size() && checked_[i].output; ++j) {
        const Checked& other = checked_[j];
        if (!other.output && (exact_alias || other.tensor == in_place)) {
          at::assert_no_partial_overlap(*checked_[i].tensor, *other.tensor);
        } else if (!other.output || j < i) {
          at::assert_no_overlap(*checked_[i].tensor, *other.tensor);
        }
      }
    }
  }

  // at::assert_no_overlap passes tensors it cannot judge, such as sliced operands, which are not
  // dense; kernels that read inputs where they lie (not contiguous) while they store must not find
  // an output anywhere between such an input's first and last element (a conservative test:
  // strides are never negative).
  void spans_apart() const {
    const auto span = [](TensorArg tensor) {
      int64_t last = 0;
      for (int64_t axis = 0; axis < tensor.dim(); ++axis) {
        last += (tensor.size(axis) - 1) * tensor.stride(axis);
      }
      const auto begin = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
      const int64_t bytes = (last + 1) * static_cast<int64_t>(tensor.element_size());
      return std::make_pair(begin, begin + static_cast<uintptr_t>(bytes));
    };
    for (const Checked& output : checked_) {
      for (const Checked& input : checked_) {
        if (!output.output || input.output || input.layout == kContiguous ||
            output.tensor->numel() == 0 || input.tensor->numel() == 0) {
          continue;
        }
        const auto [out_begin, out_end] = span(*output.tensor);
        const auto [in_begin, in_end] = span(*input.tensor);
        TORCH_CHECK(!(out_begin < in_end && in_begin < out_end),
                    op + ": " + output.name + " overlaps " + input.name + ", which is read while " +
                        "it is written (clone " + input.name + " first)");
      }
    }
  }

 private:
  struct Symbol {
    std::string_view name;
    int64_t size;
  };
  struct Checked {
    const char* name;
    const at::Tensor* tensor;
    bool output;
    Layout layout;
  };

  void check(std::initializer_list<Operand> operands, bool output) {
    for (const Operand& operand : operands) {
      if (operand.tensor != nullptr) {
        storage(*operand.tensor, operand.name, operand.layout);
        check_shape(*operand.tensor, operand.name, operand.shape);
        check_dtype(*operand.tensor, operand.name, operand.kind);
        checked_.push_back({operand.name, operand.tensor, output, operand.layout});
      }
    }
  }

  const int64_t* find(std::string_view symbol) const {
    for (const Symbol& bound : symbols_) {
      if (bound.name == symbol) {
        return &bound.size;
      }
    }
    return nullptr;
  }

  void check_shape(TensorArg tensor, const char* name, std::string_view shape) {
    if (shape == "*") {
      return;
    }
    if (shape.substr(0, 5) == "like ") {
      const at::Tensor* like = nullptr;
      for (const Checked& other : checked_) {
        like = shape.substr(5) == other.name ? other.tensor : like;
      }
      TORCH_INTERNAL_ASSERT(like != nullptr, op, ": ", std::string(shape), " before it");
      if (tensor.sizes() != like->sizes()) {
        value_error(std::string(name) + " must have shape " + std::string(shape) + " = " +
                    shape_of(*like) + ", got " + shape_of(tensor));
      }
      return;
    }
    std::string expected;  // the alternatives of the tensor's rank, with their sizes
    for (std::string_view rest = shape; !rest.empty();) {
      const size_t end = std::min(rest.find(" or "), rest.size());
      const std::string_view alternative = rest.substr(0, end);
      rest.remove_prefix(std::min(end + 4, rest.size()));
      const size_t num_bound = symbols_.size();
      Dims sizes;
      for_each_dim(alternative, [&](std::string_view dim) {
        int64_t size = -1;
        const auto [last, error] = std::from_chars(dim.data(), dim.data() + dim.size(), size);
        if (error != std::errc() || last != dim.data() + dim.size()) {
          const int64_t* bound = find(dim);
          size = bound != nullptr ? *bound
                 : static_cast<int64_t>(sizes.size()) < tensor.dim() ? tensor.size(sizes.size())
                                                                      : -1;
          if (bound == nullptr) {
            symbols_.push_back({dim, size});
          }
        }
        sizes.push_back(size);
      });
      if (tensor.sizes() == at::IntArrayRef(sizes)) {
        return;
      }
      symbols_.resize(num_bound);
      if (static_cast<int64_t>(sizes.size()) == tensor.dim()) {
        expected += (expected.empty() ? "" : " or ") + std::string(alternative) + " = " +
                    dims_text(sizes);
      }
    }
    if (expected.empty()) {  // no alternative of its rank: the sizes known so far
      expected = shape;
      std::string with;
      for_each_dim(shape.find(" or ") == shape.npos ? shape : "()", [&](std::string_view dim) {
        if (const int64_t* size = find(dim)) {
          with += (with.empty() ? " with " : ", ") + std::string(dim) + " = " + text(*size);
        }
      });
      expected += with;
    }
    value_error(std::string(name) + " must have shape " + expected + ", got " + shape_of(tensor));
  }

  void check_dtype(TensorArg tensor, const char* name, Kind kind) {
    const c10::ScalarType given = tensor.scalar_type();
    if (kind == kData && !has_dtype_) {
      if (!(given == at::kFloat || given == at::kHalf || given == at::kBFloat16 ||
            (float64_ && given == at::kDouble))) {
        type_error(std::string(name) + " must be float32, " + (float64_ ? "float64, " : "") +
                   "float16 or bfloat16, got " + c10::toString(given));
      }
      dtype = given;
      acc = given == at::kDouble ? at::kDouble : at::kFloat;
      has_dtype_ = true;
    } else if (kind == kIndex) {
      if (given != at::kInt && given != at::kLong) {
        type_error(std::string(name) + " must be int32 or int64, got " + c10::toString(given));
      }
    } else {
      const c10::ScalarType want = kind == kData    ? dtype
                                   : kind == kAcc   ? acc
                                   : kind == kInt64 ? at::kLong
                                   : kind == kInt32 ? at::kInt
                                   : kind == kBool  ? at::kBool
                                                    : at::kFloat;
      if (given != want) {
        type_error(std::string(name) + " must have dtype " + c10::toString(want) + ", got " +
                   c10::toString(given));
      }
    }
  }

  const bool float64_;
  bool has_dtype_ = false;
  c10::SmallVector<Symbol, 16> symbols_;
  c10::SmallVector<Checked, 16> checked_;
  std::optional<c10::Device> device_;
  const char* first_ = "";
};

// ---- the operands and sizes of each family of ops ----

// After a row-wise merge's operand checks: its outputs may alias inputs only exactly (each row is
// read before it is written), and its sizes (R rows of D features) fill params; false without rows.
template <typename Params>
bool fill_rows(Call& call, Params& params) {
  call.apart(/*exact_alias=*/true);
  L2M_SIZES(params, rows, head_dim);
  return params.rows > 0;
}

// q (B, H, T, Dk); keys (B, Hm, N, Dk) or shared (Hm, N, Dk) with H % Hm == 0; values the same
// leading shape, last Dv.
inline void read_operands(Call& call, TensorArg q, TensorArg keys, TensorArg values) {
  call.inputs({L2M_T(q, "(B, H, T, Dk)", kData, kRowLayout),
               L2M_T(keys, "(B, Hm, N, Dk) or (Hm, N, Dk)")});
  if (call["Hm"] < 1 || call["H"] % call["Hm"] != 0) {
    call.value_error("the memory head count Hm = " + text(call["Hm"]) + " must divide H = " +
                     text(call["H"]) + " (keys " + shape_of(keys) + ")");
  }
  call.inputs({L2M_T(values, keys.dim() == 3 ? "(Hm, N, Dv)" : "(B, Hm, N, Dv)")});
}

template <typename Params>
void fill_read(Params& params, const Call& call, TensorArg keys, double scale) {
  L2M_SIZES(params, batch, heads, seq_len, mem_heads, num_slots, dim_k, dim_v, k);
  params.shared_memory = keys.dim() == 3;
  params.scale = scale;
}

// q (B, H, T, Dk) with Dk even; subkeys (H, 2, n_sub, Dk / 2); values (n_sub ** 2, Dv).
inline void product_key_operands(Call& call, TensorArg q, TensorArg subkeys, TensorArg values) {
  call.inputs({L2M_T(q, "(B, H, T, Dk)", kData, kRowLayout)});
  if (call["Dk"] % 2 != 0) {
    call.value_error("q's feature size Dk must be even, got q " + shape_of(q));
  }
  call.let("Dk / 2", call["Dk"] / 2);
  call.inputs({L2M_T(subkeys, "(H, 2, n_sub, Dk / 2)")});
  const int64_t n_sub = call["n_sub"];
  if (n_sub < 1 || n_sub > (int64_t(1) << 31)) {
    call.value_error("n_sub must be in [1, 2 ** 31], got " + text(n_sub));
  }
  call.let("n_sub ** 2", n_sub * n_sub);
  call.inputs({L2M_T(values, "(n_sub ** 2, Dv)")});
}

template <typename Params>
void fill_product_key(Params& params, const Call& call, double scale, bool sum_heads) {
  L2M_SIZES(params, batch, heads, seq_len, dim_k, n_sub, dim_v, k);
  params.sum_heads = sum_heads;
  params.scale = scale;
}

// q (B, H, T, D); k (B, Hkv, S, D) with H % Hkv == 0 and S >= T; v (B, Hkv, S, Dv); window -1
// (none) or >= 0.
inline void local_operands(Call& call, TensorArg q, TensorArg k, TensorArg v, int64_t window) {
  call.inputs({L2M_T(q, "(B, H, T, D)", kData, kRowLayout),
               L2M_T(k, "(B, Hkv, S, D)", kData, kRowLayout)});
  const int64_t H = call["H"], T = call["T"], kv_heads = call["Hkv"];
  if (kv_heads < 1 || H % kv_heads != 0 || call["S"] < T) {
    call.value_error("k must have Hkv dividing H = " + text(H) + " and S >= T = " + text(T) +
                     ", got " + shape_of(k));
  }
  call.inputs({L2M_T(v, "(B, Hkv, S, Dv)", kData, kRowLayout)});
  if (window < -1) {
    call.value_error("window must be -1 (no window) or >= 0, got " + text(window));
  }
  if (kCuda && std::max({H, call["S"], call["D"], call["Dv"]}) > (int64_t{1} << 30)) {
    call.not_served("H, S, D, Dv <= 2**30, got q " + shape_of(q) + ", k " + shape_of(k) +
                    ", v " + shape_of(v));
  }
}

template <typename Params>
void fill_local(Params& params, const Call& call, int64_t window, double scale) {
  L2M_SIZES(params, batch, heads, kv_heads, seq_len, context_len, dim, dim_v);
  params.window = window < 0 ? call["S"] : window;
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

// Atomic mode's float32 sums of the gradient `grad`, zeroed by the caller: `grad` itself when it is
// float32, else scratch shaped like it that the caller copies into it afterwards. As an operand:
// none when it is `grad` (checked as such), else a float32 output like `like`.
inline Operand accumulator(const Call& call, const char* name, OptionalTensor acc, TensorArg grad,
                           const char* like) {
  if (!acc.has_value()) {
    call.value_error(std::string("the atomic mode needs ") + name);
  }
  const bool itself = acc->is_same(grad) && grad.scalar_type() == at::kFloat;
  return {name, itself ? nullptr : &*acc, like, kFloat32};
}

#else  // the CPU kernels

using l2m::cpu::Rows;

// Where the rows of a checked (B, H, T, D) operand start (rows.h); a (B, T, .) write operand's
// (g, t) rows as those of (B, 1, T, .).
inline Rows rows_of(TensorArg tensor) {
  const bool heads = tensor.dim() == 4;
  if (tensor.is_contiguous()) {
    return Rows::contiguous(heads ? tensor.size(1) : 1, tensor.size(-2), tensor.size(-1));
  }
  return Rows::strided(heads ? tensor.size(1) : 1, tensor.size(-2), tensor.stride(0),
                       heads ? tensor.stride(1) : 0, tensor.stride(-2));
}

template <typename Index>
std::pair<int64_t, int64_t> index_range(TensorArg indices) {
  const Index* data = indices.const_data_ptr<Index>();
  const int64_t count = indices.numel();
  Index low = 0, high = -1;
#pragma omp simd reduction(min : low) reduction(max : high)
  for (int64_t i = 0; i < count; ++i) {
    low = std::min(low, data[i]);
    high = std::max(high, data[i]);
  }
  return {low, high};
}

// Every entry of int32 or int64 `indices` -1 (with minus_one) or in [0, size) (`name`s are used as
// addresses): the range first (a vectorisable min/max), the message only when it fails. Host
// memory: the CUDA kernels check their indices on the device instead.
inline void check_indices(const Call& call, TensorArg indices, const char* name, bool minus_one,
                          const char* symbol, int64_t size) {
  const auto [low, high] = indices.scalar_type() == at::kInt ? index_range<int32_t>(indices)
                                                             : index_range<int64_t>(indices);
  const int64_t lowest = minus_one ? -1 : 0;
  if (low < lowest || high >= size) {
    call.index_error(std::string(name) + " must be " + (minus_one ? "-1 or " : "") + "in [0, " +
                     symbol + ") with " + symbol + " = " + text(size) + ", got " +
                     text(low < lowest ? low : high));
  }
}

// entry_order (E,) must list the E entries once each, sorted by their row `rows` (E,) and those of
// one row in increasing order: the product-key backward sums each dvalues row in this order and
// finds where a task's rows start by bisection.
inline void check_entry_order(const Call& call, TensorArg entry_order, TensorArg rows,
                              const char* rows_name) {
  const int64_t* order = entry_order.const_data_ptr<int64_t>();
  const int64_t* row = rows.const_data_ptr<int64_t>();
  const int64_t n = entry_order.numel();
  for (int64_t i = 0; i < n; ++i) {
    if (order[i] < 0 || order[i] >= n) {
      call.index_error("entry_order must be in [0, B * H * T * k) with B * H * T * k = " + text(n) +
                       ", got " + text(order[i]));
    }
    if (i > 0 && !(row[order[i - 1]] < row[order[i]] ||
                   (row[order[i - 1]] == row[order[i]] && order[i - 1] < order[i]))) {
      call.value_error(std::string("entry_order must list the entries sorted by ") + rows_name +
                       ", those of one row in increasing order (a stable sort), but position " +
                       text(i) + " does not follow " + text(i - 1));
    }
  }
}

#endif

// ---- the entry points ----

inline void merge_attention_fwd(TensorArg out_a, TensorArg lse_a, TensorArg out_b, TensorArg lse_b,
                                TensorArg out, TensorArg lse) {
  Call call("merge_attention_fwd");
  call.inputs({L2M_T(out_a, "(R, D)"), L2M_T(lse_a, "(R,)", kAcc), L2M_T(out_b, "(R, D)"),
               L2M_T(lse_b, "(R,)", kAcc)});
  call.outputs({L2M_T(out, "(R, D)"), L2M_T(lse, "(R,)", kAcc)});
  kp::MergeAttentionFwdParams params{};
  if (fill_rows(call, params)) {
    L2M_IN(params, out_a, lse_a, out_b, lse_b);
    L2M_OUT(params, out, lse);
    L2M_LAUNCH(call, merge_attention_fwd, params, out_a);
  }
}

inline void merge_attention_bwd(TensorArg dout, TensorArg dlse, TensorArg out_a, TensorArg lse_a,
                                TensorArg out_b, TensorArg lse_b, TensorArg lse, TensorArg d_out_a,
                                TensorArg d_lse_a, TensorArg d_out_b, TensorArg d_lse_b) {
  Call call("merge_attention_bwd");
  call.inputs({L2M_T(dout, "(R, D)"), L2M_T(dlse, "(R,)", kAcc), L2M_T(out_a, "(R, D)"),
               L2M_T(lse_a, "(R,)", kAcc), L2M_T(out_b, "(R, D)"), L2M_T(lse_b, "(R,)", kAcc),
               L2M_T(lse, "(R,)", kAcc)});
  call.outputs({L2M_T(d_out_a, "(R, D)"), L2M_T(d_lse_a, "(R,)", kAcc), L2M_T(d_out_b, "(R, D)"),
                L2M_T(d_lse_b, "(R,)", kAcc)});
  kp::MergeAttentionBwdParams params{};
  if (fill_rows(call, params)) {
    L2M_IN(params, dout, dlse, out_a, lse_a, out_b, lse_b, lse);
    L2M_OUT(params, d_out_a, d_lse_a, d_out_b, d_lse_b);
    L2M_LAUNCH(call, merge_attention_bwd, params, dout);
  }
}

inline void gated_merge_fwd(TensorArg out_local, TensorArg out_mem, TensorArg gate, TensorArg out) {
  Call call("gated_merge_fwd");
  call.inputs({L2M_T(out_local, "(R, D)"), L2M_T(out_mem, "(R, D)"), L2M_T(gate, "(R,)")});
  call.outputs({L2M_T(out, "(R, D)")});
  kp::GatedMergeFwdParams params{};
  if (fill_rows(call, params)) {
    L2M_IN(params, out_local, out_mem, gate);
    L2M_OUT(params, out);
    L2M_LAUNCH(call, gated_merge_fwd, params, out_local);
  }
}

inline void gated_merge_bwd(TensorArg dout, TensorArg out_local, TensorArg out_mem, TensorArg gate,
                            TensorArg d_local, TensorArg d_mem, TensorArg d_gate) {
  Call call("gated_merge_bwd");
  call.inputs({L2M_T(dout, "(R, D)"), L2M_T(out_local, "(R, D)"), L2M_T(out_mem, "(R, D)"),
               L2M_T(gate, "(R,)")});
  call.outputs({L2M_T(d_local, "(R, D)"), L2M_T(d_mem, "(R, D)"), L2M_T(d_gate, "(R,)", kAcc)});
  kp::GatedMergeBwdParams params{};
  if (fill_rows(call, params)) {
    L2M_IN(params, dout, out_local, out_mem, gate);
    L2M_OUT(params, d_local, d_mem, d_gate);
    L2M_LAUNCH(call, gated_merge_bwd, params, dout);
  }
}

// The top-k read's inputs: q, keys, values (read_operands), k in [1, min(N, 256)], valid_len (B,)
// int64 or none.
inline void topk_read_inputs(Call& call, TensorArg q, TensorArg keys, TensorArg values,
                             OptionalTensor valid_len, int64_t k) {
  read_operands(call, q, keys, values);
  const int64_t max_k = std::min<int64_t>(call["N"], 256);
  if (k < 1 || k > max_k) {
    call.value_error("k must be in [1, min(N, 256)] = [1, " + text(max_k) + "], got " + text(k));
  }
  call.let("k", k);
  call.inputs({L2M_T(valid_len, "(B,)", kInt64)});
}

// What the forward's kernels read of those inputs.
inline void fill_topk_read(kp::TopkReadFwdParams& params, const Call& call, TensorArg q,
                           TensorArg keys, TensorArg values, OptionalTensor valid_len,
                           double scale) {
  fill_read(params, call, keys, scale);
  L2M_IN(params, q, keys, values);
  params.valid_len = valid_len.has_value() ? valid_len->const_data_ptr<int64_t>() : nullptr;
}

// Sparse top-k read; `k` in [1, min(N, 256)]. On CUDA, tau (B, H, T) int64 or none: a lower bound
// on each row's k-th best sort key (topk_read.h; INT64_MIN: none), such as the k-th largest of the
// chunk maxima of topk_read_chunk_max when there are at least k chunks (threshold_tau in
// l2m_kernels/ops/topk_read/plan.py); the selection then merges only candidates >= tau (about k
// merges per query instead of k * ln(N / k)). Without tau the selection kernel alone (the same
// result).
inline void topk_read_fwd(TensorArg q, TensorArg keys, TensorArg values, OptionalTensor valid_len,
                          int64_t k, double scale L2M_CUDA_ONLY(OptionalTensor tau), TensorArg out,
                          TensorArg indices, TensorArg weights, TensorArg lse) {
  Call call("topk_read_fwd");
  topk_read_inputs(call, q, keys, values, valid_len, k);
#if L2M_BINDING_CUDA
  call.inputs({L2M_T(tau, "(B, H, T)", kInt64)});
#endif
  call.outputs({L2M_T(out, "(B, H, T, Dv)"), L2M_T(indices, "(B, H, T, k)", kInt64),
                L2M_T(weights, "(B, H, T, k)", kAcc), L2M_T(lse, "(B, H, T)", kAcc)});
  call.apart();
#if L2M_BINDING_CUDA
  check_read_limits(call, q, keys, values);
#endif
  const int64_t rows = call["B"] * call["H"] * call["T"];
  if (rows == 0) {
    return;
  }
  kp::TopkReadFwdParams params{};
  fill_topk_read(params, call, q, keys, values, valid_len, scale);
  L2M_OUT(params, out, indices, weights, lse);
#if L2M_BINDING_CUDA
  params.tau = tau.has_value() ? tau->const_data_ptr<int64_t>() : nullptr;
#else
  L2M_ROWS(params, q);
#endif
  L2M_LAUNCH(call, topk_read_fwd, params, q);
}

#if L2M_BINDING_CUDA
// The top-k read's threshold pre-pass: chunk_max (B, H, T, n_chunks) int64, each row's largest sort
// key over each chunk of kTopkReadChunkSlots slots (INT64_MIN where none exists), n_chunks =
// topk_read_num_chunks(N). The other arguments as topk_read_fwd takes them, checked as it checks
// them, in its name.
inline void topk_read_chunk_max(TensorArg q, TensorArg keys, TensorArg values,
                                OptionalTensor valid_len, int64_t k, double scale,
                                TensorArg chunk_max) {
  Call call("topk_read_fwd");
  topk_read_inputs(call, q, keys, values, valid_len, k);
  call.let("n_chunks", kp::topk_read_num_chunks(call["N"]));
  call.outputs({L2M_T(chunk_max, "(B, H, T, n_chunks)", kInt64)});
  call.apart();
  check_read_limits(call, q, keys, values);
  if (call["B"] * call["H"] * call["T"] == 0) {
    return;
  }
  kp::TopkReadFwdParams params{};
  fill_topk_read(params, call, q, keys, values, valid_len, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_launch(call.op, kp::topk_read_chunk_max_launch(params, chunk_max.data_ptr<int64_t>(),
                                                       current_stream()));
}
#endif

// Gradients of the read at a given selection: dq, dkeys, dvalues like q, keys, values. On CUDA,
// deterministic: the slot gradients summed per slot in a fixed order, over the caller's grouping of
// the E = B * H * T * k entries by slot (slot_runs in l2m_kernels/ops/topk_read/plan.py:
// entry_order, entry_rows (E,) int64, run_starts (M * N + 1,) int64 for the M memories, Hm shared,
// else B * Hm) with ds (E,) float32 scratch; else float32 atomics into dkeys_acc and dvalues_acc
// (accumulator). The CPU kernels always are deterministic.
inline void topk_read_bwd(TensorArg dout, TensorArg dweights, TensorArg dlse, TensorArg q,
                          TensorArg keys, TensorArg values, TensorArg indices, TensorArg weights,
                          double scale L2M_CUDA_ONLY(bool deterministic, OptionalTensor entry_order,
                                                     OptionalTensor entry_rows,
                                                     OptionalTensor run_starts, OptionalTensor ds,
                                                     OptionalTensor dkeys_acc,
                                                     OptionalTensor dvalues_acc),
                          TensorArg dq, TensorArg dkeys, TensorArg dvalues) {
  Call call("topk_read_bwd");
  read_operands(call, q, keys, values);
  call.inputs({L2M_T(indices, "(B, H, T, k)", kInt64),
               L2M_T(dout, "(B, H, T, Dv)", kData, kRowLayout),
               L2M_T(dweights, "(B, H, T, k)", kAcc), L2M_T(dlse, "(B, H, T)", kAcc),
               L2M_T(weights, "(B, H, T, k)", kAcc)});
  call.outputs({L2M_T(dq, "like q"), L2M_T(dkeys, "like keys"), L2M_T(dvalues, "like values")});
  call.apart();
  kp::TopkReadBwdParams params{};
  fill_read(params, call, keys, scale);
  L2M_IN(params, dout, dweights, dlse, q, keys, values, indices, weights);
  L2M_OUT(params, dq, dkeys, dvalues);
#if L2M_BINDING_CUDA
  check_read_limits(call, q, keys, values);
  const int64_t rows = call["B"] * call["H"] * call["T"], k = call["k"];
  if (rows == 0) {  // no entry: every slot gradient is zero
    const c10::cuda::CUDAGuard device_guard(q.device());
    dkeys.zero_();
    dvalues.zero_();
    return;
  }
  if (k < 1 || k > kp::kTopkReadMaxK) {
    call.value_error("indices must have 1 <= k <= 256 entries per query, got shape " +
                     shape_of(indices));
  }
  params.deterministic = deterministic;
  if (deterministic) {
    if (!(entry_order && entry_rows && run_starts && ds)) {
      call.value_error("the deterministic mode needs entry_order, entry_rows, run_starts and ds");
    }
    call.let("E", rows * k);
    call.let("M * N + 1", (keys.dim() == 3 ? 1 : call["B"]) * call["Hm"] * call["N"] + 1);
    call.inputs({L2M_T(entry_order, "(E,)", kInt64), L2M_T(entry_rows, "(E,)", kInt64),
                 L2M_T(run_starts, "(M * N + 1,)", kInt64)});
    call.outputs({L2M_T(ds, "(E,)", kFloat32)});
    params.entry_order = entry_order->const_data_ptr<int64_t>();
    params.entry_rows = entry_rows->const_data_ptr<int64_t>();
    params.run_starts = run_starts->const_data_ptr<int64_t>();
    params.ds = ds->data_ptr<float>();
  } else {
    call.outputs({accumulator(call, "dkeys_acc", dkeys_acc, dkeys, "like keys"),
                  accumulator(call, "dvalues_acc", dvalues_acc, dvalues, "like values")});
    params.dkeys_acc = dkeys_acc->data_ptr<float>();
    params.dvalues_acc = dvalues_acc->data_ptr<float>();
  }
  call.apart();
#else
  check_indices(call, indices, "indices", /*minus_one=*/true, "N", call["N"]);
  L2M_ROWS(params, dout, q);
  // Runs even without queries: dkeys and dvalues (shared memories) must still be zeroed.
#endif
  L2M_LAUNCH(call, topk_read_bwd, params, q);
}

// The read's weights recomputed at a given selection (the memory_attention backward); dout, dots
// and out optional, dots required with dout. On CUDA, indices outside [0, N) (e.g. -1) get weight
// 0 and are never read: checked on the device, not here (no host synchronisation).
inline void memory_read_weights(TensorArg q, TensorArg keys, TensorArg values, TensorArg indices,
                                TensorArg lse, double scale, OptionalTensor dout, TensorArg weights,
                                OptionalTensor dots, OptionalTensor out) {
  Call call("memory_read_weights", /*float64=*/true);
  read_operands(call, q, keys, values);
  call.inputs({L2M_T(indices, "(B, H, T, k)", kInt64), L2M_T(lse, "(B, H, T)", kAcc),
               L2M_T(dout, "(B, H, T, Dv)", kData, kRowLayout)});
  TORCH_CHECK_VALUE(!dout.has_value() || dots.has_value(),
                    call.op + ": dots is required with dout");
  call.outputs({L2M_T(weights, "(B, H, T, k)", kAcc), L2M_T(dots, "(B, H, T)", kAcc),
                L2M_T(out, "(B, H, T, Dv)")});
  call.apart();
#if L2M_BINDING_CUDA
  check_read_limits(call, q, keys, values);
  const c10::cuda::CUDAGuard device_guard(q.device());
#else
  check_indices(call, indices, "indices", /*minus_one=*/true, "N", call["N"]);
#endif
  if (call["B"] * call["H"] * call["T"] * call["k"] == 0) {  // no entry: dots and out are zero
    for (const at::Tensor* output : {tensor_ptr(dots), tensor_ptr(out)}) {
      if (output != nullptr) {
        output->zero_();
      }
    }
    return;
  }
  kp::MemoryReadWeightsParams params{};
  fill_read(params, call, keys, scale);
  L2M_IN(params, q, keys, values, indices, lse);
  params.dout = dout.has_value() ? dout->const_data_ptr() : nullptr;
  L2M_OUT(params, weights);
  params.dots = dots.has_value() ? dots->data_ptr() : nullptr;
  params.out = out.has_value() ? out->data_ptr() : nullptr;
#if !L2M_BINDING_CUDA
  L2M_ROWS(params, q);
  params.dout_rows = dout.has_value() ? rows_of(*dout) : Rows{};
#endif
  L2M_LAUNCH(call, memory_read_weights, params, q);
}

// Product-key read: 1 <= k_sub <= n_sub, 1 <= k <= k_sub ** 2; out (B, H, T, Dv) or, with
// sum_heads, (B, T, Dv). On CUDA with the scratch between its first two kernels, each row's sorted
// k_sub best sub-keys of both halves: half_scores (B * H * T, 2, k_sub) float32, half_ids int32
// (half_scratch in l2m_kernels/ops/product_key/plan.py).
inline void product_key_fwd(TensorArg q, TensorArg subkeys, TensorArg values, int64_t k,
                            int64_t k_sub, double scale,
                            bool sum_heads L2M_CUDA_ONLY(TensorArg half_scores, TensorArg half_ids),
                            TensorArg out, TensorArg indices, TensorArg weights, TensorArg lse) {
  Call call("product_key_fwd");
  product_key_operands(call, q, subkeys, values);
  if (k_sub < 1 || k_sub > call["n_sub"]) {
    call.value_error("k_sub must be in [1, n_sub] = [1, " + text(call["n_sub"]) + "], got " +
                     text(k_sub));
  }
  if (k < 1 || k > k_sub * k_sub) {
    call.value_error("k must be in [1, k_sub ** 2] = [1, " + text(k_sub * k_sub) + "], got " +
                     text(k));
  }
  call.let("k", k);
  call.outputs({L2M_T(out, sum_heads ? "(B, T, Dv)" : "(B, H, T, Dv)"),
                L2M_T(indices, "(B, H, T, k)", kInt64), L2M_T(weights, "(B, H, T, k)", kAcc),
                L2M_T(lse, "(B, H, T)", kAcc)});
#if L2M_BINDING_CUDA
  call.let("B * H * T", call["B"] * call["H"] * call["T"]);
  call.let("k_sub", k_sub);
  call.outputs({L2M_T(half_scores, "(B * H * T, 2, k_sub)", kFloat32),
                L2M_T(half_ids, "(B * H * T, 2, k_sub)", kInt32)});
#endif
  call.apart();
#if L2M_BINDING_CUDA
  check_product_key_limits(call, q, subkeys, k);
  if (k_sub > kp::kProductKeyMaxKSub) {
    call.not_served("k_sub <= " + text(kp::kProductKeyMaxKSub) + ", got k_sub = " + text(k_sub));
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
#endif
  const int64_t rows = call["B"] * call["H"] * call["T"];
  if (rows == 0) {
    if (out.numel() > 0) {
      out.zero_();  // sum_heads with H == 0: a sum over no heads
    }
    return;
  }
  kp::ProductKeyFwdParams params{};
  fill_product_key(params, call, scale, sum_heads);
  params.k_sub = k_sub;
  L2M_IN(params, q, subkeys, values);
  L2M_OUT(params, out, indices, weights, lse);
#if L2M_BINDING_CUDA
  L2M_OUT(params, half_scores, half_ids);
#else
  L2M_ROWS(params, q);
#endif
  L2M_LAUNCH(call, product_key_fwd, params, q);
}

// Gradients of the product-key read at a given selection: dq, dsubkeys like q, subkeys; dvalues
// like values, or with sparse_grad one row per entry: on CUDA (B * H * T * k, Dv), entry m's
// w_m * dout; on CPU coalesced (U, Dv), entry m adding w_m * dout to row value_rows[m]. On CUDA,
// deterministic: dq, the sparse rows and ds (B * H * T * k,) float32 scratch here, then dsubkeys
// and a dense dvalues by the caller's product_key_segment_sum calls (fixed-order sums); else
// float32 atomics into dsubkeys_acc and (dense) dvalues_acc (accumulator). The CPU kernels always
// are deterministic.
inline void product_key_bwd(TensorArg dout, TensorArg dweights, TensorArg dlse, TensorArg q,
                            TensorArg subkeys, TensorArg values, TensorArg indices,
                            TensorArg weights, double scale, bool sum_heads,
                            bool sparse_grad L2M_CUDA_ONLY(bool deterministic, OptionalTensor ds,
                                                           OptionalTensor dsubkeys_acc,
                                                           OptionalTensor dvalues_acc)
                                L2M_CPU_ONLY(TensorArg entry_order),
                            TensorArg dq, TensorArg dsubkeys,
                            TensorArg dvalues L2M_CPU_ONLY(OptionalTensor value_rows)) {
  Call call("product_key_bwd");
  product_key_operands(call, q, subkeys, values);
  call.inputs({L2M_T(indices, "(B, H, T, k)", kInt64)});
  const int64_t B = call["B"], H = call["H"], T = call["T"], k = call["k"], rows = B * H * T;
  if (k < 1) {
    call.value_error("indices must have k >= 1 entries per query, got " + shape_of(indices));
  }
#if !L2M_BINDING_CUDA
  TORCH_CHECK_VALUE(!sparse_grad || value_rows.has_value(),
                    call.op + ": sparse_grad needs value_rows (the dvalues row of each entry)");
  TORCH_CHECK_VALUE(sparse_grad || !value_rows.has_value(),
                    call.op + ": value_rows is only for sparse_grad");
#endif
  call.let("B * H * T * k", rows * k);
  call.inputs({L2M_T(dout, sum_heads ? "(B, T, Dv)" : "(B, H, T, Dv)", kData, kRowLayout),
               L2M_T(dweights, "(B, H, T, k)", kAcc), L2M_T(dlse, "(B, H, T)", kAcc),
               L2M_T(weights, "(B, H, T, k)", kAcc)
                   L2M_CPU_ONLY(L2M_T(value_rows, "(B, H, T, k)", kInt64))
                       L2M_CPU_ONLY(L2M_T(entry_order, "(B * H * T * k,)", kInt64))});
  call.outputs({L2M_T(dq, "like q"), L2M_T(dsubkeys, "like subkeys"),
                L2M_T(dvalues, !sparse_grad ? "like values"
                               : kCuda      ? "(B * H * T * k, Dv)"
                                            : "(U, Dv)")});
  call.apart();
  kp::ProductKeyBwdParams params{};
  fill_product_key(params, call, scale, sum_heads);
  params.sparse_grad = sparse_grad;
  L2M_IN(params, dout, dweights, dlse, q, subkeys, values, indices, weights);
  L2M_OUT(params, dq);
#if L2M_BINDING_CUDA
  check_product_key_limits(call, q, subkeys, k);
  if (rows == 0) {  // no entry: every sub-key / value gradient is zero
    const c10::cuda::CUDAGuard device_guard(q.device());
    dsubkeys.zero_();
    if (!sparse_grad) {
      dvalues.zero_();
    }
    return;
  }
  params.deterministic = deterministic;
  params.dvalues_rows = sparse_grad ? dvalues.data_ptr() : nullptr;
  if (deterministic) {
    if (!ds.has_value()) {
      call.value_error("the deterministic mode needs ds");
    }
    call.outputs({L2M_T(ds, "(B * H * T * k,)", kFloat32)});
    params.ds = ds->data_ptr<float>();
  } else {
    call.outputs({accumulator(call, "dsubkeys_acc", dsubkeys_acc, dsubkeys, "like subkeys"),
                  sparse_grad ? Operand{"dvalues_acc", nullptr, "*"}
                              : accumulator(call, "dvalues_acc", dvalues_acc, dvalues,
                                            "like values")});
    params.dsubkeys_acc = dsubkeys_acc->data_ptr<float>();
    params.dvalues_acc = sparse_grad ? nullptr : dvalues_acc->data_ptr<float>();
  }
  call.apart();
  L2M_LAUNCH(call, product_key_bwd, params, q);
#else
  const int64_t num_value_rows = sparse_grad ? call["U"] : 0;
  if (sparse_grad) {
    check_indices(call, *value_rows, "value_rows", /*minus_one=*/false, "U", num_value_rows);
  }
  check_indices(call, indices, "indices", /*minus_one=*/false, "n_sub ** 2", call["n_sub ** 2"]);
  check_entry_order(call, entry_order, sparse_grad ? *value_rows : indices,
                    sparse_grad ? "value_rows" : "indices");
  // With sum_heads, dout (B, T, Dv) serves every head: the (B, H, T) rows with head stride 0.
  params.dout_rows =
      sum_heads ? Rows::strided(H, T, dout.stride(0), 0, dout.stride(1)) : rows_of(dout);
  L2M_ROWS(params, q);
  L2M_OUT(params, dsubkeys, dvalues);
  params.value_rows = sparse_grad ? value_rows->const_data_ptr<int64_t>() : nullptr;
  params.num_value_rows = num_value_rows;
  params.entry_order = entry_order.const_data_ptr<int64_t>();
  // Runs even without queries: dsubkeys and a dense dvalues must still be zeroed.
  L2M_LAUNCH(call, product_key_bwd, params, q);
#endif
}

#if L2M_BINDING_CUDA
// The deterministic product-key backward's segment sum (product_key.h): dst (R, D) row s =
// scale * the sum, in order, over the entries e in [run_starts[s], run_starts[s + 1]) of
// coef[entry_coef[e]] * src[entry_src[e]]; src (S, D) of dst's dtype, coef (C,) float32, the
// grouping entry_coef, entry_src (X,) int64 and run_starts (R + 1,) int64 of
// subkey_segments / value_segments in l2m_kernels/ops/product_key/plan.py. Its messages name
// product_key_bwd.
inline void product_key_segment_sum(TensorArg src, TensorArg coef, TensorArg entry_coef,
                                    TensorArg entry_src, TensorArg run_starts, double scale,
                                    TensorArg dst) {
  Call call("product_key_bwd");
  call.inputs({L2M_T(src, "(S, D)"), L2M_T(coef, "(C,)", kFloat32),
               L2M_T(entry_coef, "(X,)", kInt64), L2M_T(entry_src, "(X,)", kInt64)});
  call.outputs({L2M_T(dst, "(R, D)")});
  call.let("R + 1", call["R"] + 1);
  call.inputs({L2M_T(run_starts, "(R + 1,)", kInt64)});
  call.apart();
  kp::ProductKeySegmentParams params{};
  params.dtype = kernel_dtype(call.dtype);
  params.num_dst = call["R"];
  params.num_src = call["S"];
  params.num_coef = call["C"];
  params.dim = call["D"];
  params.scale = scale;
  L2M_IN(params, src, coef, entry_coef, entry_src, run_starts);
  L2M_OUT(params, dst);
  L2M_LAUNCH(call, product_key_segment, params, src);
}
#endif

// Gated memory writes: memory (B, Hm, N, D) or (B, N, D), whose leading dimensions, (B, Hm) or
// (B,), are the G memories (on CUDA memory is (G, N, D)); indices (int32 or int64) and weights
// (.., T, kw); add (.., T, D); erase (.., T, D) or (.., T, 1), with the same leading dimensions.
// weights, add and erase are read where they lie (kRowLayout). On CUDA with the write plan (order
// (E,) int64, run_length (E,) int32, E = G * T * kw; memory_write.h); on CPU reading the indices
// on the host.
template <typename Params>
void write_operands(Call& call, Params& params, TensorArg memory, TensorArg indices,
                    TensorArg weights, TensorArg add,
                    TensorArg erase L2M_CUDA_ONLY(TensorArg order, TensorArg run_length)) {
  call.inputs({L2M_T(memory, kCuda ? "(G, N, D)" : "(B, Hm, N, D) or (B, N, D)")});
  const bool heads = memory.dim() == 4;
#define L2M_WRITE_SHAPE(dims) (heads ? "(B, Hm, " dims : kCuda ? "(G, " dims : "(B, " dims)
  call.inputs({L2M_T(indices, L2M_WRITE_SHAPE("T, kw)"), kIndex),
               L2M_T(weights, L2M_WRITE_SHAPE("T, kw)"), kData, kRowLayout),
               L2M_T(add, L2M_WRITE_SHAPE("T, D)"), kData, kRowLayout),
               L2M_T(erase, L2M_WRITE_SHAPE("T, erase_dim)"), kData, kRowLayout)});
#undef L2M_WRITE_SHAPE
  if (call["erase_dim"] != 1 && call["erase_dim"] != call["D"]) {
    call.value_error("erase's last dimension erase_dim must be D = " + text(call["D"]) +
                     " or 1, got erase " + shape_of(erase));
  }
  if (!kCuda) {
    call.let("G", memory.size(0) * (heads ? memory.size(1) : 1));
  }
  call.let("E", call["G"] * call["T"] * call["kw"]);
  L2M_SIZES(params, groups, num_slots, dim, steps, writes_per_step, erase_dim);
  params.indices_int32 = indices.scalar_type() == at::kInt;
  L2M_IN(params, memory, indices, weights, add, erase);
#if L2M_BINDING_CUDA
  call.inputs({L2M_T(order, "(E,)", kInt64), L2M_T(run_length, "(E,)", kInt32)});
  L2M_IN(params, order, run_length);
#else
  check_indices(call, indices, "indices", /*minus_one=*/true, "N", params.num_slots);
  params.weight_rows = rows_of(weights);
  params.add_rows = rows_of(add);
  params.erase_rows = rows_of(erase);
#endif
}

inline void gated_memory_write_fwd(TensorArg memory, TensorArg indices, TensorArg weights,
                                   TensorArg add,
                                   TensorArg erase
                                       L2M_CUDA_ONLY(TensorArg order, TensorArg run_length),
                                   TensorArg out) {
  Call call("gated_memory_write_fwd");
  kp::GatedMemoryWriteFwdParams params{};
  write_operands(call, params, memory, indices, weights, add,
                 erase L2M_CUDA_ONLY(order, run_length));
  call.outputs({L2M_T(out, "like memory")});
  // out may be memory itself (in place: each slot is read before it is written), nothing else.
  call.apart(/*exact_alias=*/false, /*in_place=*/&memory);
  // Nothing to write (N == 0 admits only -1 entries; its empty tensors may have no storage).
  if (kCuda && (call["E"] == 0 || params.dim == 0 || params.num_slots == 0)) {
    return;
  }
  call.spans_apart();
  L2M_OUT(params, out);
  L2M_LAUNCH(call, gated_memory_write_fwd, params, memory);
}

// Gradients of the writes. CPU: dmemory, dweights, dadd, derase like their inputs. CUDA: dmemory
// (a copy of dnew) and dweights get the written slots; the per-entry float32 add_parts (E, D) and
// erase_parts (E, erase_dim) of written entries (the caller zeroes them) stand for dadd, derase;
// dweight_partial (E,) float32 is scratch (memory_write.h).
inline void gated_memory_write_bwd(TensorArg dnew, TensorArg memory, TensorArg indices,
                                   TensorArg weights, TensorArg add,
                                   TensorArg erase L2M_CUDA_ONLY(TensorArg order,
                                                                 TensorArg run_length,
                                                                 TensorArg dweight_partial),
                                   TensorArg dmemory, TensorArg dweights, TensorArg dadd,
                                   TensorArg derase) {
  Call call("gated_memory_write_bwd");
  kp::GatedMemoryWriteBwdParams params{};
  write_operands(call, params, memory, indices, weights, add,
                 erase L2M_CUDA_ONLY(order, run_length));
  call.inputs({L2M_T(dnew, "like memory")});
  call.outputs({L2M_T(dmemory, "like memory"), L2M_T(dweights, "like weights"),
                kCuda ? Operand{"add_parts", &dadd, "(E, D)", kFloat32} : L2M_T(dadd, "like add"),
                kCuda ? Operand{"erase_parts", &derase, "(E, erase_dim)", kFloat32}
                      : L2M_T(derase, "like erase")});
#if L2M_BINDING_CUDA
  call.outputs({L2M_T(dweight_partial, "(E,)", kFloat32)});
#endif
  call.apart();
  L2M_IN(params, dnew);
  L2M_OUT(params, dmemory, dweights);
#if L2M_BINDING_CUDA
  // No written slot: dmemory is dnew's copy and the other outputs arrive zeroed.
  if (call["E"] == 0 || params.dim == 0 || params.num_slots == 0) {
    return;
  }
  params.add_parts = dadd.data_ptr<float>();
  params.erase_parts = derase.data_ptr<float>();
  L2M_OUT(params, dweight_partial);
#else
  call.spans_apart();
  L2M_OUT(params, dadd, derase);
#endif
  L2M_LAUNCH(call, gated_memory_write_bwd, params, memory);
}

// The dense update's inputs: same-shape tensors of one floating dtype (broadcast by the caller),
// either all contiguous (any rank: the CPU kernels' flat path) or 4-D views of the broadcast shape
// (stride 1 or 0 along the last dimension on CPU, any strides on CUDA). Returns whether they are
// read as strided views.
inline bool dense_operands(Call& call, TensorArg memory, TensorArg update, TensorArg input_gate,
                           TensorArg forget_gate) {
  const bool strided = kCuda || !(memory.is_contiguous() && update.is_contiguous() &&
                                  input_gate.is_contiguous() && forget_gate.is_contiguous());
  const Layout layout = kCuda ? kAny : strided ? kRowsOrBroadcast : kContiguous;
  const std::initializer_list<Operand> inputs = {
      L2M_T(memory, "*", kData, layout), L2M_T(update, "like memory", kData, layout),
      L2M_T(input_gate, "like memory", kData, layout),
      L2M_T(forget_gate, "like memory", kData, layout)};
  for (const Operand& input : inputs) {
    call.storage(*input.tensor, input.name, layout);
    if (strided && input.tensor->dim() != 4) {
      call.value_error("strided inputs must be 4-D views of the broadcast shape, got " +
                       std::string(input.name) + " " + shape_of(*input.tensor));
    }
  }
  call.inputs(inputs);
  return strided;
}

// The dense update's inputs, placed for the kernels: on CUDA each as its 4-D strides; on CPU flat
// (contiguous) or strided through its rows, and then no output may reach into their bytes (the
// kernel reads them where they lie while it stores).
template <typename Params>
void fill_dense([[maybe_unused]] const Call& call, Params& params, [[maybe_unused]] bool strided,
                TensorArg memory, TensorArg update, TensorArg input_gate, TensorArg forget_gate) {
  params.dtype = kernel_dtype(call.dtype);
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
  call.spans_apart();
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
  const bool strided = dense_operands(call, memory, update, input_gate, forget_gate);
  call.outputs({L2M_T(out, "like memory")});
  // Elementwise: on CPU out may alias an input exactly (each element is read before it is
  // written).
  call.apart(/*exact_alias=*/!kCuda);
  if (kCuda && out.numel() == 0) {
    return;
  }
  kp::GatedDenseUpdateFwdParams params{};
  fill_dense(call, params, strided, memory, update, input_gate, forget_gate);
  L2M_OUT(params, out);
  L2M_LAUNCH(call, gated_dense_update_fwd, params, memory);
}

inline void gated_dense_update_bwd(TensorArg dout, TensorArg memory, TensorArg update,
                                   TensorArg input_gate, TensorArg forget_gate, TensorArg dmemory,
                                   TensorArg dupdate, TensorArg dinput_gate,
                                   TensorArg dforget_gate) {
  Call call("gated_dense_update_bwd");
  const bool strided = dense_operands(call, memory, update, input_gate, forget_gate);
  call.inputs({L2M_T(dout, "like memory")});
  // On CPU, the gradient of an input broadcast along the last dimension (stride 0) may be its sums
  // along that dimension, (S0, S1, S2, 1): the kernel reduces it as it goes.
  const auto row_sums = [&](TensorArg input, TensorArg grad) {
    return !kCuda && strided && input.size(3) > 1 && input.stride(3) == 0 && grad.dim() == 4 &&
           grad.size(3) == 1;
  };
  if (strided) {
    constexpr const char* kSizes[] = {"S0", "S1", "S2", "S3"};  // bound by name: not temporaries
    for (int d = 0; d < 4; ++d) {
      call.let(kSizes[d], memory.size(d));
    }
  }
  const auto grad_operand = [&](const char* name, TensorArg grad, TensorArg input) {
    return Operand{name, &grad, row_sums(input, grad) ? "(S0, S1, S2, 1)" : "like memory", kAcc};
  };
  call.outputs({grad_operand("dmemory", dmemory, memory), grad_operand("dupdate", dupdate, update),
                grad_operand("dinput_gate", dinput_gate, input_gate),
                grad_operand("dforget_gate", dforget_gate, forget_gate)});
  // The gradients may have another dtype than the inputs (acc): no overlap at all.
  call.apart();
  if (kCuda && dout.numel() == 0) {
    return;
  }
  kp::GatedDenseUpdateBwdParams params{};
  fill_dense(call, params, strided, memory, update, input_gate, forget_gate);
  L2M_IN(params, dout);
  L2M_OUT(params, dmemory, dupdate, dinput_gate, dforget_gate);
#if !L2M_BINDING_CUDA
  params.row_sums[0] = row_sums(memory, dmemory);
  params.row_sums[1] = row_sums(update, dupdate);
  params.row_sums[2] = row_sums(input_gate, dinput_gate);
  params.row_sums[3] = row_sums(forget_gate, dforget_gate);
#endif
  L2M_LAUNCH(call, gated_dense_update_bwd, params, memory);
}

// Causal local attention of the last T of S positions: out (B, H, T, Dv), lse (B, H, T) acc.
inline void local_attention_fwd(TensorArg q, TensorArg k, TensorArg v, int64_t window, double scale,
                                TensorArg out, TensorArg lse) {
  Call call("local_attention_fwd", /*float64=*/true);
  local_operands(call, q, k, v, window);
  call.outputs({L2M_T(out, "(B, H, T, Dv)"), L2M_T(lse, "(B, H, T)", kAcc)});
  call.apart();
  if (call["B"] * call["H"] * call["T"] == 0) {
    return;
  }
  kp::LocalAttentionFwdParams params{};
  fill_local(params, call, window, scale);
  L2M_IN(params, q, k, v);
  L2M_OUT(params, out, lse);
#if !L2M_BINDING_CUDA
  L2M_ROWS(params, q, k, v);
#endif
  L2M_LAUNCH(call, local_attention_fwd, params, q);
}

// Gradients of the local attention: dq, dk, dv like q, k, v. On CUDA with delta (B, H, T) acc
// scratch: <dout, out> - dlse per row, written by the first kernel and read by the others.
inline void local_attention_bwd(TensorArg dout, TensorArg dlse, TensorArg q, TensorArg k,
                                TensorArg v, TensorArg out, TensorArg lse, int64_t window,
                                double scale L2M_CUDA_ONLY(TensorArg delta), TensorArg dq,
                                TensorArg dk, TensorArg dv) {
  Call call("local_attention_bwd", /*float64=*/true);
  local_operands(call, q, k, v, window);
  call.inputs({L2M_T(dout, "(B, H, T, Dv)", kData, kRowLayout), L2M_T(dlse, "(B, H, T)", kAcc),
               L2M_T(out, "(B, H, T, Dv)"), L2M_T(lse, "(B, H, T)", kAcc)});
  call.outputs({L2M_T(dq, "like q"), L2M_T(dk, "like k"), L2M_T(dv, "like v")});
#if L2M_BINDING_CUDA
  call.outputs({L2M_T(delta, "(B, H, T)", kAcc)});
#endif
  call.apart();
  // No key: dk, dv and (S >= T) dq have no elements.
  if (call["B"] * call["Hkv"] * call["S"] == 0) {
    return;
  }
  kp::LocalAttentionBwdParams params{};
  fill_local(params, call, window, scale);
  L2M_IN(params, dout, dlse, q, k, v, out, lse);
  L2M_OUT(params, dq, dk, dv);
#if L2M_BINDING_CUDA
  L2M_OUT(params, delta);
#else
  L2M_ROWS(params, dout, q, k, v);
#endif
  // Runs even without queries (T == 0): dk and dv are zeroed.
  L2M_LAUNCH(call, local_attention_bwd, params, q);
}

#if !L2M_BINDING_CUDA
// ---- block memory (CPU only; l2m_kernels/ops/block_memory) ----

// A (B, Hkv, NB, X, Y) block tensor: its last two dimensions contiguous (the kernels step through
// dimensions 0-2 by their strides, which may be those of a window of a larger buffer).
inline void check_block_layout(const Call& call, TensorArg tensor, const char* name) {
  const bool last = tensor.size(4) <= 1 || tensor.stride(4) == 1;
  const bool rows = tensor.size(3) <= 1 || tensor.stride(3) == tensor.size(4);
  if (tensor.numel() > 0 && !(last && rows)) {
    call.value_error(std::string(name) + " must have contiguous last two dimensions (strides (" +
                     text(tensor.size(4)) + ", 1)), got strides " + dims_text(tensor.strides()));
  }
}

inline void copy_strides(TensorArg tensor, int64_t* strides, int64_t count) {
  for (int64_t axis = 0; axis < count; ++axis) {
    strides[axis] = tensor.stride(axis);
  }
}

// A (B, NB, X) bool validity mask's data and the strides of its dimensions 0-1; null without one.
inline const bool* mask_of(OptionalTensor mask, int64_t* strides) {
  if (!mask.has_value()) {
    strides[0] = strides[1] = 0;
    return nullptr;
  }
  copy_strides(*mask, strides, 2);
  return mask->const_data_ptr<bool>();
}

// q (B, H, T, D); the block tensor `blocks` named `name` of shape `shape`, (B, Hkv, NB, ., .) with
// Hkv dividing H.
inline void block_operands(Call& call, TensorArg q, TensorArg blocks, const char* name,
                           const char* shape) {
  call.inputs({L2M_T(q, "(B, H, T, D)", kData, kRowLayout),
               Operand{name, &blocks, shape, kData, kAny}});
  if (call["Hkv"] < 1 || call["H"] % call["Hkv"] != 0) {
    call.value_error(std::string(name) + " must have Hkv dividing H = " + text(call["H"]) +
                     ", got " + shape_of(blocks));
  }
  check_block_layout(call, blocks, name);
}

// Scores every block against the chunk q and selects the k best per (batch, kv head): reprs
// (B, Hkv, NB, R, D), repr_valid (B, NB, R) bool or none, k in [0, NB]; indices (B, Hkv, k) int64
// in increasing order, scores (B, Hkv, NB) acc.
inline void block_topk_fwd(TensorArg q, TensorArg reprs, OptionalTensor repr_valid, int64_t k,
                           double scale, TensorArg indices, TensorArg scores) {
  Call call("block_topk_fwd", /*float64=*/true);
  block_operands(call, q, reprs, "reprs", "(B, Hkv, NB, R, D)");
  call.inputs({L2M_T(repr_valid, "(B, NB, R)", kBool, kRows)});
  if (k < 0 || k > call["NB"]) {
    call.value_error("k must be in [0, NB] = [0, " + text(call["NB"]) + "], got " + text(k));
  }
  call.let("k", k);
  call.outputs({L2M_T(indices, "(B, Hkv, k)", kInt64), L2M_T(scores, "(B, Hkv, NB)", kAcc)});
  call.apart();
  call.spans_apart();
  if (call["B"] * call["Hkv"] == 0) {
    return;
  }
  kp::BlockTopkFwdParams params{};
  L2M_SIZES(params, batch, heads, kv_heads, seq_len, num_blocks, num_reprs, dim, k);
  params.scale = scale;
  L2M_IN(params, q, reprs);
  L2M_OUT(params, indices, scores);
  copy_strides(reprs, params.reprs_strides, 3);
  params.repr_valid = mask_of(repr_valid, params.repr_valid_strides);
  L2M_ROWS(params, q);
  L2M_LAUNCH(call, block_topk_fwd, params, q);
}

// The read's inputs: q, block_keys (B, Hkv, NB, S, D), block_values (B, Hkv, NB, S, Dv), indices
// (B, Hkv, K) int64 in [0, NB), block_valid (B, NB, S) bool or none.
inline void block_read_operands(Call& call, TensorArg q, TensorArg block_keys,
                                TensorArg block_values, TensorArg indices,
                                OptionalTensor block_valid) {
  block_operands(call, q, block_keys, "block_keys", "(B, Hkv, NB, S, D)");
  call.inputs({L2M_T(block_values, "(B, Hkv, NB, S, Dv)", kData, kAny),
               L2M_T(indices, "(B, Hkv, K)", kInt64),
               L2M_T(block_valid, "(B, NB, S)", kBool, kRows)});
  check_block_layout(call, block_values, "block_values");
  check_indices(call, indices, "indices", /*minus_one=*/false, "NB", call["NB"]);
}

template <typename Params>
void fill_block_read(Params& params, const Call& call, TensorArg block_keys,
                     TensorArg block_values, OptionalTensor block_valid, double scale) {
  L2M_SIZES(params, batch, heads, kv_heads, seq_len, num_blocks, block_size, dim, dim_v,
            num_selected);
  params.scale = scale;
  copy_strides(block_keys, params.key_strides, 3);
  copy_strides(block_values, params.value_strides, 3);
  params.block_valid = mask_of(block_valid, params.valid_strides);
}

// Softmax attention of each query row over the valid tokens of its kv head's selected blocks:
// out (B, H, T, Dv), lse (B, H, T) acc.
inline void block_read_fwd(TensorArg q, TensorArg block_keys, TensorArg block_values,
                           TensorArg indices, OptionalTensor block_valid, double scale,
                           TensorArg out, TensorArg lse) {
  Call call("block_read_fwd", /*float64=*/true);
  block_read_operands(call, q, block_keys, block_values, indices, block_valid);
  call.outputs({L2M_T(out, "(B, H, T, Dv)"), L2M_T(lse, "(B, H, T)", kAcc)});
  call.apart();
  call.spans_apart();
  if (call["B"] * call["H"] * call["T"] == 0) {
    return;
  }
  kp::BlockReadFwdParams params{};
  fill_block_read(params, call, block_keys, block_values, block_valid, scale);
  L2M_IN(params, q, block_keys, block_values, indices);
  L2M_OUT(params, out, lse);
  L2M_ROWS(params, q);
  L2M_LAUNCH(call, block_read_fwd, params, q);
}

// Gradients of block_read_fwd: dq like q, dkeys and dvalues like block_keys and block_values but
// contiguous (zero for blocks not read).
inline void block_read_bwd(TensorArg dout, TensorArg dlse, TensorArg q, TensorArg block_keys,
                           TensorArg block_values, TensorArg indices, OptionalTensor block_valid,
                           TensorArg out, TensorArg lse, double scale, TensorArg dq,
                           TensorArg dkeys, TensorArg dvalues) {
  Call call("block_read_bwd", /*float64=*/true);
  block_read_operands(call, q, block_keys, block_values, indices, block_valid);
  call.inputs({L2M_T(dout, "(B, H, T, Dv)", kData, kRowLayout), L2M_T(dlse, "(B, H, T)", kAcc),
               L2M_T(out, "(B, H, T, Dv)"), L2M_T(lse, "(B, H, T)", kAcc)});
  call.outputs({L2M_T(dq, "(B, H, T, D)"), L2M_T(dkeys, "(B, Hkv, NB, S, D)"),
                L2M_T(dvalues, "(B, Hkv, NB, S, Dv)")});
  call.apart();
  call.spans_apart();
  if (call["B"] * call["Hkv"] == 0) {
    return;
  }
  kp::BlockReadBwdParams params{};
  fill_block_read(params, call, block_keys, block_values, block_valid, scale);
  L2M_IN(params, dout, dlse, q, block_keys, block_values, indices, out, lse);
  L2M_OUT(params, dq, dkeys, dvalues);
  L2M_ROWS(params, dout, q);
  // Runs even without queries (T == 0): dkeys and dvalues are zeroed.
  L2M_LAUNCH(call, block_read_bwd, params, q);
}
#endif

// ---- registration: the same functions and arguments in both extensions ----

// L2M_DEF(op, doc, tail, a, b, ...): op registered (after `extra`) with the arguments a, b, ...,
// then the attributes `tail` (e.g. an argument with a default).
#define L2M_ARG_(_, name) , py::arg(#name)
#define L2M_DEF(op, doc, tail, ...) \
  m.def(#op, &op, doc, extra... L2M_FOR_EACH(L2M_ARG_, _, __VA_ARGS__) tail)

// The arguments' shapes and dtypes: the comments above and l2m_kernels/ops/<op>.
template <typename... Extra>
void def_ops(py::module_& m, const Extra&... extra) {
  L2M_DEF(merge_attention_fwd, "Merges two attention results by their lse.", , out_a, lse_a, out_b,
          lse_b, out, lse);
  L2M_DEF(merge_attention_bwd, "Gradients of merge_attention_fwd.", , dout, dlse, out_a, lse_a,
          out_b, lse_b, lse, d_out_a, d_lse_a, d_out_b, d_lse_b);
  L2M_DEF(gated_merge_fwd, "out = sigmoid(gate) * out_mem + (1 - sigmoid(gate)) * out_local.", ,
          out_local, out_mem, gate, out);
  L2M_DEF(gated_merge_bwd, "Gradients of gated_merge_fwd.", , dout, out_local, out_mem, gate,
          d_local, d_mem, d_gate);
  L2M_DEF(topk_read_fwd, "Sparse top-k memory read.", , q, keys, values, valid_len, k,
          scale L2M_CUDA_ONLY(tau), out, indices, weights, lse);
  L2M_DEF(topk_read_bwd, "Gradients of topk_read_fwd at its indices.", , dout, dweights, dlse, q,
          keys, values, indices, weights,
          scale L2M_CUDA_ONLY(deterministic, entry_order, entry_rows, run_starts, ds, dkeys_acc,
                              dvalues_acc),
          dq, dkeys, dvalues);
  L2M_DEF(memory_read_weights, "The top-k read's weights at a given selection.", , q, keys,
          values, indices, lse, scale, dout, weights, dots, out);
  L2M_DEF(product_key_fwd, "Product-key memory read.", , q, subkeys, values, k, k_sub, scale,
          sum_heads L2M_CUDA_ONLY(half_scores, half_ids), out, indices, weights, lse);
  L2M_DEF(product_key_bwd, "Gradients of product_key_fwd at its indices.",
          L2M_CPU_ONLY(py::arg("value_rows") = py::none()), dout, dweights, dlse, q, subkeys,
          values, indices, weights, scale, sum_heads,
          sparse_grad L2M_CUDA_ONLY(deterministic, ds, dsubkeys_acc, dvalues_acc)
              L2M_CPU_ONLY(entry_order),
          dq, dsubkeys, dvalues);
  L2M_DEF(gated_memory_write_fwd, "Gated memory writes.", , memory, indices, weights, add,
          erase L2M_CUDA_ONLY(order, run_length), out);
  L2M_DEF(gated_memory_write_bwd, "Gradients of gated_memory_write_fwd.", , dnew, memory, indices,
          weights, add, erase L2M_CUDA_ONLY(order, run_length, dweight_partial), dmemory,
          dweights L2M_CUDA_ONLY(add_parts, erase_parts) L2M_CPU_ONLY(dadd, derase));
  L2M_DEF(gated_dense_update_fwd, "Gated dense update, elementwise.", , memory, update,
          input_gate, forget_gate, out);
  L2M_DEF(gated_dense_update_bwd, "Gradients of gated_dense_update_fwd.", , dout, memory, update,
          input_gate, forget_gate, dmemory, dupdate, dinput_gate, dforget_gate);
  L2M_DEF(local_attention_fwd, "Causal local attention.", , q, k, v, window, scale, out, lse);
  L2M_DEF(local_attention_bwd, "Gradients of local_attention_fwd.", , dout, dlse, q, k, v, out,
          lse, window, scale L2M_CUDA_ONLY(delta), dq, dk, dv);
#if !L2M_BINDING_CUDA
  L2M_DEF(block_topk_fwd, "Block scores and the k best blocks per (batch, kv head).", , q, reprs,
          repr_valid, k, scale, indices, scores);
  L2M_DEF(block_read_fwd, "Attention over the valid tokens of the selected blocks.", , q,
          block_keys, block_values, indices, block_valid, scale, out, lse);
  L2M_DEF(block_read_bwd, "Gradients of block_read_fwd.", , dout, dlse, q, block_keys,
          block_values, indices, block_valid, out, lse, scale, dq, dkeys, dvalues);
#endif
#if L2M_BINDING_CUDA
  // The device steps that the cuda launchers (l2m_kernels/ops/<op>/function.py) run between two
  // of the entry points above.
  L2M_DEF(topk_read_chunk_max, "The threshold pre-pass of topk_read_fwd: each row's chunk maxima.",
          , q, keys, values, valid_len, k, scale, chunk_max);
  m.def("topk_read_num_chunks", &kp::topk_read_num_chunks,
        "The number of chunks of topk_read_chunk_max for num_slots slots.", extra...,
        py::arg("num_slots"));
  L2M_DEF(product_key_segment_sum, "The segment sums of product_key_bwd's deterministic mode.", ,
          src, coef, entry_coef, entry_src, run_starts, scale, dst);
#endif
}

}  // namespace l2m::binding
