// Torch-facing bindings of the CUDA kernels (merge ops, top-k and product-key memory reads, gated
// memory writes, the gated dense update, and the local attention and read-weight helper of the
// memory_attention backend): extension `l2m_kernels._C_cuda`.
//
// The only file under csrc/cuda that includes torch headers (the kernels in *.cu see plain
// structs, see merge.h). Each function follows notes/merge_kernels.md: the Python layer has
// flattened (B, H, T) into R rows, made inputs contiguous and preallocated every output; here we
// check all of that again (a wrong call must raise, never read or write out of bounds), fill the
// params struct, launch on the current stream of the tensors' device and raise on a CUDA error.
//
// Build: compiled with the host compiler as part of the CUDAExtension whose sources are
// csrc/cuda/*.cu + this file. Optional string-literal macros in the cxx flags:
// -DL2M_CUDA_ARCHS="8.0;9.0" (module attribute CUDA_ARCHS, else "unknown") and
// -DL2M_TORCH_VERSION="<torch.__version__>" (module attribute TORCH_VERSION, else absent).
//
// c10's stream header rather than ATen/cuda/CUDAContext.h: the same getCurrentCUDAStream (ATen
// re-exports it as at::cuda::getCurrentCUDAStream) without pulling in the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>

#include <cuda_runtime_api.h>

#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dense_update.h"
#include "local_attention.h"
#include "memory_attention.h"
#include "memory_write.h"
#include "merge.h"
#include "product_key.h"
#include "topk_read.h"

namespace {

using l2m::cuda::MergeDtype;

// Build facts passed by setup.py as string-literal macros (-DNAME="value"), reported by the module.
#ifdef L2M_CUDA_ARCHS
constexpr const char* kCudaArchs = L2M_CUDA_ARCHS;
#else
constexpr const char* kCudaArchs = "unknown";
#endif

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// "(4, 8)". Sizes are formatted here rather than streamed into TORCH_CHECK: on the GPU image
// (g++ from /opt/gcc, torch 2.11) an extension that inserts an integer into the error message's
// ostream crashed with SIGSEGV inside std::ostream::_M_insert<long>; strings are safe.
std::string shape_string(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return text + (sizes.size() == 1 ? ",)" : ")");
}

// Every tensor: on CUDA, on the device of the first one, contiguous.
void check_placement(const char* op, std::initializer_list<NamedTensor> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  for (const NamedTensor& named : tensors) {
    const at::Tensor& tensor = *named.second;
    TORCH_CHECK_VALUE(tensor.is_cuda(), op, ": ", named.first, " must be a CUDA tensor, got ",
                      tensor.device());
    TORCH_CHECK_VALUE(tensor.device() == first.device(), op, ": ", named.first, " is on ",
                      tensor.device(), " but ", tensors.begin()->first, " is on ", first.device());
    TORCH_CHECK_VALUE(tensor.is_contiguous(), op, ": ", named.first, " must be contiguous");
  }
}

// The (R, D) row tensors: 2-D, the same shape and dtype as the first, dtype one the kernels serve.
MergeDtype check_rows(const char* op, std::initializer_list<NamedTensor> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  TORCH_CHECK_VALUE(first.dim() == 2, op, ": ", tensors.begin()->first,
                    " must be 2-D (rows, head_dim), got shape ", shape_string(first.sizes()));
  MergeDtype dtype = MergeDtype::kFloat32;
  switch (first.scalar_type()) {
    case at::kFloat:
      dtype = MergeDtype::kFloat32;
      break;
    case at::kHalf:
      dtype = MergeDtype::kFloat16;
      break;
    case at::kBFloat16:
      dtype = MergeDtype::kBFloat16;
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", tensors.begin()->first,
                       " must be float32, float16 or bfloat16 on CUDA, got ",
                       first.scalar_type());
  }
  for (const NamedTensor& named : tensors) {
    const at::Tensor& tensor = *named.second;
    TORCH_CHECK_TYPE(tensor.scalar_type() == first.scalar_type(), op, ": ", named.first,
                     " has dtype ", tensor.scalar_type(), " but ", tensors.begin()->first,
                     " has ", first.scalar_type());
    TORCH_CHECK_VALUE(tensor.sizes() == first.sizes(), op, ": ", named.first, " must have shape ",
                      shape_string(first.sizes()), ", got ", shape_string(tensor.sizes()));
  }
  return dtype;
}

// The (R,) per-row tensors, each of dtype `dtype`.
void check_per_row(const char* op, int64_t rows, at::ScalarType dtype,
                   std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& named : tensors) {
    const at::Tensor& tensor = *named.second;
    TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, op, ": ", named.first, " must be ", dtype,
                     ", got ", tensor.scalar_type());
    TORCH_CHECK_VALUE(tensor.dim() == 1 && tensor.size(0) == rows, op, ": ", named.first,
                      " must have shape (", std::to_string(rows), ",), got ",
                      shape_string(tensor.sizes()));
  }
}

// The stream PyTorch is using on the current device (set by the CUDAGuard on the tensors' device).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(status));
}

void merge_attention_fwd(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                         const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse) {
  constexpr const char* op = "l2m merge_attention_fwd (cuda)";
  check_placement(op, {{"out_a", &out_a}, {"lse_a", &lse_a}, {"out_b", &out_b},
                       {"lse_b", &lse_b}, {"out", &out}, {"lse", &lse}});
  const MergeDtype dtype = check_rows(op, {{"out_a", &out_a}, {"out_b", &out_b}, {"out", &out}});
  const int64_t rows = out_a.size(0);
  check_per_row(op, rows, at::kFloat, {{"lse_a", &lse_a}, {"lse_b", &lse_b}, {"lse", &lse}});
  if (rows == 0) return;

  const c10::cuda::CUDAGuard device_guard(out_a.device());
  l2m::cuda::MergeAttentionFwdParams params;
  params.out_a = out_a.data_ptr();
  params.lse_a = lse_a.data_ptr<float>();
  params.out_b = out_b.data_ptr();
  params.lse_b = lse_b.data_ptr<float>();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.rows = rows;
  params.head_dim = out_a.size(1);
  params.dtype = dtype;
  check_launch(op, l2m::cuda::merge_attention_fwd_launch(params, current_stream()));
}

void merge_attention_bwd(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out_a,
                         const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b,
                         const at::Tensor& lse, const at::Tensor& d_out_a,
                         const at::Tensor& d_lse_a, const at::Tensor& d_out_b,
                         const at::Tensor& d_lse_b) {
  constexpr const char* op = "l2m merge_attention_bwd (cuda)";
  check_placement(op, {{"dout", &dout},
                       {"dlse", &dlse},
                       {"out_a", &out_a},
                       {"lse_a", &lse_a},
                       {"out_b", &out_b},
                       {"lse_b", &lse_b},
                       {"lse", &lse},
                       {"d_out_a", &d_out_a},
                       {"d_lse_a", &d_lse_a},
                       {"d_out_b", &d_out_b},
                       {"d_lse_b", &d_lse_b}});
  const MergeDtype dtype = check_rows(op, {{"dout", &dout},
                                           {"out_a", &out_a},
                                           {"out_b", &out_b},
                                           {"d_out_a", &d_out_a},
                                           {"d_out_b", &d_out_b}});
  const int64_t rows = dout.size(0);
  check_per_row(op, rows, at::kFloat,
                {{"dlse", &dlse},
                 {"lse_a", &lse_a},
                 {"lse_b", &lse_b},
                 {"lse", &lse},
                 {"d_lse_a", &d_lse_a},
                 {"d_lse_b", &d_lse_b}});
  if (rows == 0) return;

  const c10::cuda::CUDAGuard device_guard(dout.device());
  l2m::cuda::MergeAttentionBwdParams params;
  params.dout = dout.data_ptr();
  params.dlse = dlse.data_ptr<float>();
  params.out_a = out_a.data_ptr();
  params.lse_a = lse_a.data_ptr<float>();
  params.out_b = out_b.data_ptr();
  params.lse_b = lse_b.data_ptr<float>();
  params.lse = lse.data_ptr<float>();
  params.d_out_a = d_out_a.data_ptr();
  params.d_lse_a = d_lse_a.data_ptr<float>();
  params.d_out_b = d_out_b.data_ptr();
  params.d_lse_b = d_lse_b.data_ptr<float>();
  params.rows = rows;
  params.head_dim = dout.size(1);
  params.dtype = dtype;
  check_launch(op, l2m::cuda::merge_attention_bwd_launch(params, current_stream()));
}

void gated_merge_fwd(const at::Tensor& out_local, const at::Tensor& out_mem,
                     const at::Tensor& gate, const at::Tensor& out) {
  constexpr const char* op = "l2m gated_merge_fwd (cuda)";
  check_placement(op, {{"out_local", &out_local}, {"out_mem", &out_mem}, {"gate", &gate},
                       {"out", &out}});
  const MergeDtype dtype =
      check_rows(op, {{"out_local", &out_local}, {"out_mem", &out_mem}, {"out", &out}});
  const int64_t rows = out_local.size(0);
  check_per_row(op, rows, out_local.scalar_type(), {{"gate", &gate}});
  if (rows == 0) return;

  const c10::cuda::CUDAGuard device_guard(out_local.device());
  l2m::cuda::GatedMergeFwdParams params;
  params.out_local = out_local.data_ptr();
  params.out_mem = out_mem.data_ptr();
  params.gate = gate.data_ptr();
  params.out = out.data_ptr();
  params.rows = rows;
  params.head_dim = out_local.size(1);
  params.dtype = dtype;
  check_launch(op, l2m::cuda::gated_merge_fwd_launch(params, current_stream()));
}

void gated_merge_bwd(const at::Tensor& dout, const at::Tensor& out_local, const at::Tensor& out_mem,
                     const at::Tensor& gate, const at::Tensor& d_local, const at::Tensor& d_mem,
                     const at::Tensor& d_gate) {
  constexpr const char* op = "l2m gated_merge_bwd (cuda)";
  check_placement(op, {{"dout", &dout},
                       {"out_local", &out_local},
                       {"out_mem", &out_mem},
                       {"gate", &gate},
                       {"d_local", &d_local},
                       {"d_mem", &d_mem},
                       {"d_gate", &d_gate}});
  const MergeDtype dtype = check_rows(op, {{"dout", &dout},
                                           {"out_local", &out_local},
                                           {"out_mem", &out_mem},
                                           {"d_local", &d_local},
                                           {"d_mem", &d_mem}});
  const int64_t rows = dout.size(0);
  check_per_row(op, rows, dout.scalar_type(), {{"gate", &gate}});
  check_per_row(op, rows, at::kFloat, {{"d_gate", &d_gate}});
  if (rows == 0) return;

  const c10::cuda::CUDAGuard device_guard(dout.device());
  l2m::cuda::GatedMergeBwdParams params;
  params.dout = dout.data_ptr();
  params.out_local = out_local.data_ptr();
  params.out_mem = out_mem.data_ptr();
  params.gate = gate.data_ptr();
  params.d_local = d_local.data_ptr();
  params.d_mem = d_mem.data_ptr();
  params.d_gate = d_gate.data_ptr<float>();
  params.rows = rows;
  params.head_dim = dout.size(1);
  params.dtype = dtype;
  check_launch(op, l2m::cuda::gated_merge_bwd_launch(params, current_stream()));
}

// ---------------------------------------------------------------------------------------------
// Sparse top-k memory read (SPEC section 1; interface: csrc/cuda/topk_read.h). Same Python
// signatures as the cpu and triton backends; outputs preallocated by the caller, None returned.

// dtype of the read's floating tensors: float32, float16 or bfloat16 (float64 is not served).
MergeDtype topk_dtype(const char* op, const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return MergeDtype::kFloat32;
    case at::kHalf:
      return MergeDtype::kFloat16;
    case at::kBFloat16:
      return MergeDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": q must be float32, float16 or bfloat16 on CUDA, got ",
                       q.scalar_type());
  }
  return MergeDtype::kFloat32;
}

void expect_dtype(const char* op, at::ScalarType dtype, std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& named : tensors) {
    const at::Tensor& tensor = *named.second;
    TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, op, ": ", named.first, " must be ", dtype,
                     ", got ", tensor.scalar_type());
  }
}

void expect_shape(const char* op, const char* name, const at::Tensor& tensor,
                  const std::vector<int64_t>& expected) {
  TORCH_CHECK_VALUE(tensor.sizes() == at::IntArrayRef(expected), op, ": ", name,
                    " must have shape ", shape_string(expected), ", got ",
                    shape_string(tensor.sizes()));
}

// The sizes shared by the forward and the backward, read from q, keys and values after checking
// ranks and matching dimensions.
struct TopkReadShape {
  int64_t batch, heads, seq_len, mem_heads, num_slots, dim_k, dim_v;
  bool shared_memory;
};

TopkReadShape check_topk_operands(const char* op, const at::Tensor& q, const at::Tensor& keys,
                                  const at::Tensor& values) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, H, T, Dk), got shape ",
                    shape_string(q.sizes()));
  TORCH_CHECK_VALUE(keys.dim() == 4 || keys.dim() == 3, op,
                    ": keys must be (B, Hm, N, Dk) or shared (Hm, N, Dk), got shape ",
                    shape_string(keys.sizes()));
  TopkReadShape shape;
  shape.batch = q.size(0);
  shape.heads = q.size(1);
  shape.seq_len = q.size(2);
  shape.dim_k = q.size(3);
  shape.shared_memory = keys.dim() == 3;
  shape.mem_heads = keys.size(-3);
  shape.num_slots = keys.size(-2);
  TORCH_CHECK_VALUE(values.dim() == keys.dim(), op, ": values must have the rank of keys ",
                    shape_string(keys.sizes()), ", got shape ", shape_string(values.sizes()));
  shape.dim_v = values.size(-1);
  std::vector<int64_t> keys_shape(keys.sizes().begin(), keys.sizes().end());
  if (!shape.shared_memory) keys_shape[0] = shape.batch;
  keys_shape.back() = shape.dim_k;
  expect_shape(op, "keys", keys, keys_shape);
  std::vector<int64_t> values_shape = keys_shape;
  values_shape.back() = shape.dim_v;
  expect_shape(op, "values", values, values_shape);
  TORCH_CHECK_VALUE(shape.mem_heads >= 1 && shape.heads % shape.mem_heads == 0, op,
                    ": the query heads of q ", shape_string(q.sizes()),
                    " must be a multiple of the memory heads of keys ",
                    shape_string(keys.sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(
      shape.dim_k <= l2m::cuda::kTopkReadMaxDim && shape.dim_v <= l2m::cuda::kTopkReadMaxDim, op,
      ": the CUDA kernels serve Dk, Dv <= ", std::to_string(l2m::cuda::kTopkReadMaxDim),
      ", got q ", shape_string(q.sizes()), " and values ", shape_string(values.sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(shape.num_slots <= l2m::cuda::kTopkReadMaxSlots, op,
                              ": the CUDA kernels serve N <= 2**31 slots, got keys ",
                              shape_string(keys.sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(shape.batch * shape.heads * shape.seq_len < (int64_t{1} << 31), op,
                              ": the CUDA kernels serve B * H * T < 2**31 query rows, got q ",
                              shape_string(q.sizes()));
  return shape;
}

// use_threshold (default true): first the pre-pass writes each row's chunk maxima of the sort
// keys (csrc/cuda/topk_read.h); the k-th largest of them, tau, is a lower bound on the row's k-th
// best key, so the selection kernel merges only candidates >= tau (about k merges per query
// instead of k * ln(N / k)). With fewer than k chunks (N < k * kTopkReadChunkSlots) there is no
// bound and the selection runs as without it. false: the selection kernel alone (same result).
void topk_read_fwd(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                   const std::optional<at::Tensor>& valid_len, int64_t k, double scale,
                   const at::Tensor& out, const at::Tensor& indices, const at::Tensor& weights,
                   const at::Tensor& lse, bool use_threshold) {
  constexpr const char* op = "l2m topk_read_fwd (cuda)";
  check_placement(op, {{"q", &q}, {"keys", &keys}, {"values", &values}, {"out", &out},
                       {"indices", &indices}, {"weights", &weights}, {"lse", &lse}});
  if (valid_len.has_value()) {
    check_placement(op, {{"q", &q}, {"valid_len", &*valid_len}});
  }
  const MergeDtype dtype = topk_dtype(op, q);
  expect_dtype(op, q.scalar_type(), {{"keys", &keys}, {"values", &values}, {"out", &out}});
  expect_dtype(op, at::kLong, {{"indices", &indices}});
  expect_dtype(op, at::kFloat, {{"weights", &weights}, {"lse", &lse}});
  const TopkReadShape shape = check_topk_operands(op, q, keys, values);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  expect_shape(op, "out", out, {B, H, T, shape.dim_v});
  expect_shape(op, "indices", indices, {B, H, T, k});
  expect_shape(op, "weights", weights, {B, H, T, k});
  expect_shape(op, "lse", lse, {B, H, T});
  if (valid_len.has_value()) {
    expect_dtype(op, at::kLong, {{"valid_len", &*valid_len}});
    expect_shape(op, "valid_len", *valid_len, {B});
  }
  if (B * H * T == 0) return;
  TORCH_CHECK_VALUE(k >= 1 && k <= shape.num_slots && k <= l2m::cuda::kTopkReadMaxK, op,
                    ": k must satisfy 1 <= k <= min(N, 256) with keys ",
                    shape_string(keys.sizes()), ", got k = ", std::to_string(k));

  const c10::cuda::CUDAGuard device_guard(q.device());
  l2m::cuda::TopkReadFwdParams params;
  params.dtype = dtype;
  params.batch = B;
  params.heads = H;
  params.seq_len = T;
  params.mem_heads = shape.mem_heads;
  params.num_slots = shape.num_slots;
  params.dim_k = shape.dim_k;
  params.dim_v = shape.dim_v;
  params.k = k;
  params.shared_memory = shape.shared_memory;
  params.scale = scale;
  params.q = q.data_ptr();
  params.keys = keys.data_ptr();
  params.values = values.data_ptr();
  params.valid_len = valid_len.has_value() ? valid_len->data_ptr<int64_t>() : nullptr;
  params.out = out.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.weights = weights.data_ptr<float>();
  params.lse = lse.data_ptr<float>();
  params.tau = nullptr;
  at::Tensor tau;  // kept alive until the selection kernel is enqueued
  const int64_t num_chunks = l2m::cuda::topk_read_num_chunks(shape.num_slots);
  if (use_threshold && num_chunks >= k) {
    const at::Tensor chunk_max = at::empty({B * H * T, num_chunks}, q.options().dtype(at::kLong));
    check_launch(op, l2m::cuda::topk_read_chunk_max_launch(params, chunk_max.data_ptr<int64_t>(),
                                                           current_stream()));
    // Exactly k chunks have a maximum >= the k-th largest maximum (the keys are distinct), so
    // the row's k best keys are all >= it. Chunks without an existing slot hold INT64_MIN: when
    // fewer than k chunks have one, tau is INT64_MIN (no bound).
    tau = std::get<0>(at::topk(chunk_max, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true))
              .select(1, k - 1)
              .contiguous();
    params.tau = tau.data_ptr<int64_t>();
  }
  check_launch(op, l2m::cuda::topk_read_fwd_launch(params, current_stream()));
}

void topk_read_bwd(const at::Tensor& dout, const at::Tensor& dweights, const at::Tensor& dlse,
                   const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                   const at::Tensor& indices, const at::Tensor& weights, double scale,
                   bool deterministic, const at::Tensor& dq, const at::Tensor& dkeys,
                   const at::Tensor& dvalues) {
  constexpr const char* op = "l2m topk_read_bwd (cuda)";
  check_placement(op, {{"dout", &dout},
                       {"dweights", &dweights},
                       {"dlse", &dlse},
                       {"q", &q},
                       {"keys", &keys},
                       {"values", &values},
                       {"indices", &indices},
                       {"weights", &weights},
                       {"dq", &dq},
                       {"dkeys", &dkeys},
                       {"dvalues", &dvalues}});
  const MergeDtype dtype = topk_dtype(op, q);
  expect_dtype(op, q.scalar_type(),
               {{"dout", &dout}, {"keys", &keys}, {"values", &values}, {"dq", &dq},
                {"dkeys", &dkeys}, {"dvalues", &dvalues}});
  expect_dtype(op, at::kLong, {{"indices", &indices}});
  expect_dtype(op, at::kFloat, {{"dweights", &dweights}, {"dlse", &dlse}, {"weights", &weights}});
  const TopkReadShape shape = check_topk_operands(op, q, keys, values);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  TORCH_CHECK_VALUE(indices.dim() == 4, op, ": indices must be 4-D (B, H, T, k), got shape ",
                    shape_string(indices.sizes()));
  const int64_t k = indices.size(3);
  expect_shape(op, "indices", indices, {B, H, T, k});
  expect_shape(op, "weights", weights, {B, H, T, k});
  expect_shape(op, "dweights", dweights, {B, H, T, k});
  expect_shape(op, "dlse", dlse, {B, H, T});
  expect_shape(op, "dout", dout, {B, H, T, shape.dim_v});
  expect_shape(op, "dq", dq, std::vector<int64_t>(q.sizes().begin(), q.sizes().end()));
  expect_shape(op, "dkeys", dkeys, std::vector<int64_t>(keys.sizes().begin(), keys.sizes().end()));
  expect_shape(op, "dvalues", dvalues,
               std::vector<int64_t>(values.sizes().begin(), values.sizes().end()));

  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t rows = B * H * T;
  if (rows == 0) {  // no entry: every slot gradient is zero
    dkeys.zero_();
    dvalues.zero_();
    return;
  }
  TORCH_CHECK_VALUE(k >= 1 && k <= l2m::cuda::kTopkReadMaxK, op,
                    ": indices must have 1 <= k <= 256 entries per query, got shape ",
                    shape_string(indices.sizes()));

  l2m::cuda::TopkReadBwdParams params;
  params.dtype = dtype;
  params.batch = B;
  params.heads = H;
  params.seq_len = T;
  params.mem_heads = shape.mem_heads;
  params.num_slots = shape.num_slots;
  params.dim_k = shape.dim_k;
  params.dim_v = shape.dim_v;
  params.k = k;
  params.shared_memory = shape.shared_memory;
  params.deterministic = deterministic;
  params.scale = scale;
  params.dout = dout.data_ptr();
  params.dweights = dweights.data_ptr<float>();
  params.dlse = dlse.data_ptr<float>();
  params.q = q.data_ptr();
  params.keys = keys.data_ptr();
  params.values = values.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.weights = weights.data_ptr<float>();
  params.dq = dq.data_ptr();
  params.dkeys_acc = nullptr;
  params.dvalues_acc = nullptr;
  params.ds = nullptr;
  params.entry_order = nullptr;
  params.entry_rows = nullptr;
  params.run_starts = nullptr;
  params.dkeys = dkeys.data_ptr();
  params.dvalues = dvalues.data_ptr();

  if (deterministic) {
    // Entries grouped by slot, as _slot_runs in l2m_kernels/ops/topk_read/triton.py: a stable sort
    // of memory * N + slot (entries that contribute nothing last, key M * N) and the run starts by
    // binary search; both are deterministic on every device.
    const int64_t N = shape.num_slots;
    const int64_t R = (H / shape.mem_heads) * T;
    const int64_t memories = shape.shared_memory ? shape.mem_heads : B * shape.mem_heads;
    const at::TensorOptions long_options = indices.options().dtype(at::kLong);
    const at::Tensor row_memory_head = at::arange(rows, long_options).floor_divide(R);  // b*Hm+hm
    const at::Tensor row_memory =
        shape.shared_memory ? row_memory_head.remainder(shape.mem_heads) : row_memory_head;
    const at::Tensor flat = indices.reshape({rows, k});
    const at::Tensor live = flat.ge(0).logical_and(flat.lt(N));
    const at::Tensor slot_key =
        at::where(live, row_memory.unsqueeze(1) * N + flat, at::Scalar(memories * N)).reshape({-1});
    const std::tuple<at::Tensor, at::Tensor> sorted =
        at::sort(slot_key, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
    const at::Tensor entry_order = std::get<1>(sorted).contiguous();
    const at::Tensor entry_rows = entry_order.floor_divide(k).contiguous();
    const at::Tensor run_starts =
        at::searchsorted(std::get<0>(sorted), at::arange(memories * N + 1, long_options))
            .contiguous();
    const at::Tensor ds = at::empty({rows * k}, indices.options().dtype(at::kFloat));
    params.ds = ds.data_ptr<float>();
    params.entry_order = entry_order.data_ptr<int64_t>();
    params.entry_rows = entry_rows.data_ptr<int64_t>();
    params.run_starts = run_starts.data_ptr<int64_t>();
    // The scratch tensors live until the end of this scope; the caching allocator reuses their
    // memory only for later work on this stream, so the kernels are done with them by then.
    check_launch(op, l2m::cuda::topk_read_bwd_launch(params, current_stream()));
    return;
  }

  // Atomic mode: float32 accumulators, zeroed; float32 outputs accumulate in place.
  const bool in_place = dtype == MergeDtype::kFloat32;
  const at::TensorOptions float_options = q.options().dtype(at::kFloat);
  const at::Tensor dkeys_acc = in_place ? dkeys : at::empty(keys.sizes(), float_options);
  const at::Tensor dvalues_acc = in_place ? dvalues : at::empty(values.sizes(), float_options);
  dkeys_acc.zero_();
  dvalues_acc.zero_();
  params.dkeys_acc = dkeys_acc.data_ptr<float>();
  params.dvalues_acc = dvalues_acc.data_ptr<float>();
  check_launch(op, l2m::cuda::topk_read_bwd_launch(params, current_stream()));
  if (!in_place) {
    dkeys.copy_(dkeys_acc);
    dvalues.copy_(dvalues_acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Product-key memory read (SPEC section 2; interface: csrc/cuda/product_key.h). Same Python
// signatures as the cpu and triton launchers; outputs preallocated by the caller, None returned.
// Indices given to the backward are range-checked on the device: an entry outside
// [0, n_sub ** 2) contributes nothing (never read or written out of bounds).

struct ProductKeyShape {
  int64_t batch, heads, seq_len, dim_k, n_sub, dim_v;
};

ProductKeyShape check_product_key_operands(const char* op, const at::Tensor& q,
                                           const at::Tensor& subkeys, const at::Tensor& values) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, H, T, Dk), got shape ",
                    shape_string(q.sizes()));
  ProductKeyShape shape;
  shape.batch = q.size(0);
  shape.heads = q.size(1);
  shape.seq_len = q.size(2);
  shape.dim_k = q.size(3);
  TORCH_CHECK_VALUE(shape.dim_k % 2 == 0, op, ": q's feature size Dk must be even, got q ",
                    shape_string(q.sizes()));
  TORCH_CHECK_VALUE(subkeys.dim() == 4, op,
                    ": subkeys must be 4-D (H, 2, n_sub, Dk // 2), got shape ",
                    shape_string(subkeys.sizes()));
  shape.n_sub = subkeys.size(2);
  expect_shape(op, "subkeys", subkeys, {shape.heads, 2, shape.n_sub, shape.dim_k / 2});
  TORCH_CHECK_VALUE(shape.n_sub >= 1, op, ": subkeys must hold n_sub >= 1 sub-keys, got shape ",
                    shape_string(subkeys.sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(shape.n_sub * shape.n_sub <= l2m::cuda::kProductKeyMaxSlots, op,
                              ": the CUDA kernels serve n_sub ** 2 < 2**31 slots, got subkeys ",
                              shape_string(subkeys.sizes()));
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D (n_sub ** 2, Dv), got shape ",
                    shape_string(values.sizes()));
  shape.dim_v = values.size(1);
  expect_shape(op, "values", values, {shape.n_sub * shape.n_sub, shape.dim_v});
  TORCH_CHECK_NOT_IMPLEMENTED(shape.dim_k <= l2m::cuda::kProductKeyMaxDimK, op,
                              ": the CUDA kernels serve Dk <= ",
                              std::to_string(l2m::cuda::kProductKeyMaxDimK), ", got q ",
                              shape_string(q.sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(
      shape.batch * shape.heads * shape.seq_len < (int64_t{1} << 31) &&
          shape.batch * shape.seq_len < (int64_t{1} << 31),
      op, ": the CUDA kernels serve B * H * T < 2**31 query rows, got q ", shape_string(q.sizes()));
  return shape;
}

void product_key_fwd(const at::Tensor& q, const at::Tensor& subkeys, const at::Tensor& values,
                     int64_t k, int64_t k_sub, double scale, bool sum_heads, const at::Tensor& out,
                     const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& lse) {
  constexpr const char* op = "l2m product_key_fwd (cuda)";
  check_placement(op, {{"q", &q}, {"subkeys", &subkeys}, {"values", &values}, {"out", &out},
                       {"indices", &indices}, {"weights", &weights}, {"lse", &lse}});
  const MergeDtype dtype = topk_dtype(op, q);
  expect_dtype(op, q.scalar_type(), {{"subkeys", &subkeys}, {"values", &values}, {"out", &out}});
  expect_dtype(op, at::kLong, {{"indices", &indices}});
  expect_dtype(op, at::kFloat, {{"weights", &weights}, {"lse", &lse}});
  const ProductKeyShape shape = check_product_key_operands(op, q, subkeys, values);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  if (sum_heads) {
    expect_shape(op, "out", out, {B, T, shape.dim_v});
  } else {
    expect_shape(op, "out", out, {B, H, T, shape.dim_v});
  }
  expect_shape(op, "indices", indices, {B, H, T, k});
  expect_shape(op, "weights", weights, {B, H, T, k});
  expect_shape(op, "lse", lse, {B, H, T});
  TORCH_CHECK_VALUE(k_sub >= 1 && k_sub <= shape.n_sub, op,
                    ": k_sub must satisfy 1 <= k_sub <= n_sub = ", std::to_string(shape.n_sub),
                    ", got k_sub = ", std::to_string(k_sub));
  TORCH_CHECK_VALUE(k >= 1 && k <= k_sub * k_sub, op,
                    ": k must satisfy 1 <= k <= k_sub ** 2 = ", std::to_string(k_sub * k_sub),
                    ", got k = ", std::to_string(k));
  TORCH_CHECK_NOT_IMPLEMENTED(
      k <= l2m::cuda::kProductKeyMaxK && k_sub <= l2m::cuda::kProductKeyMaxKSub, op,
      ": the CUDA kernels serve k <= ", std::to_string(l2m::cuda::kProductKeyMaxK),
      " and k_sub <= ", std::to_string(l2m::cuda::kProductKeyMaxKSub), ", got k = ",
      std::to_string(k), ", k_sub = ", std::to_string(k_sub));

  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t rows = B * H * T;
  if (rows == 0) {
    if (out.numel() > 0) out.zero_();  // sum_heads with H == 0: a sum over no heads
    return;
  }
  // Scratch: each row's sorted top-k_sub of both halves (scores and sub-key ids).
  const at::Tensor half_scores = at::empty({rows, 2, k_sub}, q.options().dtype(at::kFloat));
  const at::Tensor half_ids = at::empty({rows, 2, k_sub}, q.options().dtype(at::kInt));
  l2m::cuda::ProductKeyFwdParams params;
  params.dtype = dtype;
  params.batch = B;
  params.heads = H;
  params.seq_len = T;
  params.dim_k = shape.dim_k;
  params.n_sub = shape.n_sub;
  params.dim_v = shape.dim_v;
  params.k = k;
  params.k_sub = k_sub;
  params.sum_heads = sum_heads;
  params.scale = scale;
  params.q = q.data_ptr();
  params.subkeys = subkeys.data_ptr();
  params.values = values.data_ptr();
  params.out = out.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.weights = weights.data_ptr<float>();
  params.lse = lse.data_ptr<float>();
  params.half_scores = half_scores.data_ptr<float>();
  params.half_ids = half_ids.data_ptr<int32_t>();
  // The scratch tensors live until the end of this scope; the caching allocator reuses their
  // memory only for later work on this stream.
  check_launch(op, l2m::cuda::product_key_fwd_launch(params, current_stream()));
}

// Deterministic segment sum (product_key.h): entries grouped by destination key with a stable
// sort (keys >= num_dst: entries that contribute nothing, sorted last), run starts by binary
// search. entry_coef / entry_src map each entry id (the position in `keys`) to its coefficient
// and source row.
void product_key_segment_sum(const char* op, MergeDtype dtype, const at::Tensor& keys,
                             const at::Tensor& entry_coef, const at::Tensor& entry_src,
                             int64_t num_dst, const at::Tensor& src, int64_t num_src,
                             const at::Tensor& coef, double scale, const at::Tensor& dst,
                             int64_t dim) {
  const std::tuple<at::Tensor, at::Tensor> sorted =
      at::sort(keys, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted);
  const at::Tensor sorted_coef = entry_coef.index_select(0, order).contiguous();
  const at::Tensor sorted_src = entry_src.index_select(0, order).contiguous();
  const at::Tensor run_starts =
      at::searchsorted(std::get<0>(sorted), at::arange(num_dst + 1, keys.options())).contiguous();
  l2m::cuda::ProductKeySegmentParams params;
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
  check_launch(op, l2m::cuda::product_key_segment_launch(params, current_stream()));
}

void product_key_bwd(const at::Tensor& dout, const at::Tensor& dweights, const at::Tensor& dlse,
                     const at::Tensor& q, const at::Tensor& subkeys, const at::Tensor& values,
                     const at::Tensor& indices, const at::Tensor& weights, double scale,
                     bool sum_heads, bool sparse_grad, bool deterministic, const at::Tensor& dq,
                     const at::Tensor& dsubkeys, const at::Tensor& dvalues) {
  constexpr const char* op = "l2m product_key_bwd (cuda)";
  check_placement(op, {{"dout", &dout},
                       {"dweights", &dweights},
                       {"dlse", &dlse},
                       {"q", &q},
                       {"subkeys", &subkeys},
                       {"values", &values},
                       {"indices", &indices},
                       {"weights", &weights},
                       {"dq", &dq},
                       {"dsubkeys", &dsubkeys},
                       {"dvalues", &dvalues}});
  const MergeDtype dtype = topk_dtype(op, q);
  expect_dtype(op, q.scalar_type(),
               {{"dout", &dout}, {"subkeys", &subkeys}, {"values", &values}, {"dq", &dq},
                {"dsubkeys", &dsubkeys}, {"dvalues", &dvalues}});
  expect_dtype(op, at::kLong, {{"indices", &indices}});
  expect_dtype(op, at::kFloat, {{"dweights", &dweights}, {"dlse", &dlse}, {"weights", &weights}});
  const ProductKeyShape shape = check_product_key_operands(op, q, subkeys, values);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  const int64_t N = shape.n_sub * shape.n_sub, Dv = shape.dim_v, Dh = shape.dim_k / 2;
  TORCH_CHECK_VALUE(indices.dim() == 4, op, ": indices must be 4-D (B, H, T, k), got shape ",
                    shape_string(indices.sizes()));
  const int64_t k = indices.size(3);
  expect_shape(op, "indices", indices, {B, H, T, k});
  expect_shape(op, "weights", weights, {B, H, T, k});
  expect_shape(op, "dweights", dweights, {B, H, T, k});
  expect_shape(op, "dlse", dlse, {B, H, T});
  if (sum_heads) {
    expect_shape(op, "dout", dout, {B, T, Dv});
  } else {
    expect_shape(op, "dout", dout, {B, H, T, Dv});
  }
  expect_shape(op, "dq", dq, std::vector<int64_t>(q.sizes().begin(), q.sizes().end()));
  expect_shape(op, "dsubkeys", dsubkeys,
               std::vector<int64_t>(subkeys.sizes().begin(), subkeys.sizes().end()));
  const int64_t rows = B * H * T;
  const int64_t entries = rows * k;
  if (sparse_grad) {
    expect_shape(op, "dvalues", dvalues, {entries, Dv});
  } else {
    expect_shape(op, "dvalues", dvalues, {N, Dv});
  }

  const c10::cuda::CUDAGuard device_guard(q.device());
  if (rows == 0) {  // no entry: every sub-key / value gradient is zero
    dsubkeys.zero_();
    if (!sparse_grad) dvalues.zero_();
    return;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(k >= 1 && k <= l2m::cuda::kProductKeyMaxK, op,
                              ": the CUDA kernels serve 1 <= k <= ",
                              std::to_string(l2m::cuda::kProductKeyMaxK),
                              " entries per query, got indices ", shape_string(indices.sizes()));

  l2m::cuda::ProductKeyBwdParams params;
  params.dtype = dtype;
  params.batch = B;
  params.heads = H;
  params.seq_len = T;
  params.dim_k = shape.dim_k;
  params.n_sub = shape.n_sub;
  params.dim_v = Dv;
  params.k = k;
  params.sum_heads = sum_heads;
  params.sparse_grad = sparse_grad;
  params.deterministic = deterministic;
  params.scale = scale;
  params.dout = dout.data_ptr();
  params.dweights = dweights.data_ptr<float>();
  params.dlse = dlse.data_ptr<float>();
  params.q = q.data_ptr();
  params.subkeys = subkeys.data_ptr();
  params.values = values.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.weights = weights.data_ptr<float>();
  params.dq = dq.data_ptr();
  params.dsubkeys_acc = nullptr;
  params.dvalues_acc = nullptr;
  params.dvalues_rows = sparse_grad ? dvalues.data_ptr() : nullptr;
  params.ds = nullptr;

  if (deterministic) {
    const at::TensorOptions long_options = indices.options().dtype(at::kLong);
    const at::Tensor ds = at::empty({entries}, q.options().dtype(at::kFloat));
    params.ds = ds.data_ptr<float>();
    check_launch(op, l2m::cuda::product_key_bwd_launch(params, current_stream()));

    const at::Tensor flat = indices.reshape({rows, k});
    const at::Tensor live = flat.ge(0).logical_and(flat.lt(N));
    const at::Tensor row_ids = at::arange(rows, long_options);
    // Sub-keys: entry (row, m, half) -> destination row (h * 2 + half) * n_sub + sub-key id,
    // source row row * 2 + half of q viewed as (rows * 2, Dh), coefficient ds[row * k + m].
    const int64_t num_sub_rows = H * 2 * shape.n_sub;
    const at::Tensor head = row_ids.floor_divide(T).remainder(H).unsqueeze(1);  // (rows, 1)
    const at::Tensor sub0 = flat.floor_divide(shape.n_sub);
    const at::Tensor sub1 = flat.remainder(shape.n_sub);
    const at::Tensor dead = at::full({}, num_sub_rows, long_options);
    const at::Tensor key0 = at::where(live, head * (2 * shape.n_sub) + sub0, dead);
    const at::Tensor key1 = at::where(live, head * (2 * shape.n_sub) + shape.n_sub + sub1, dead);
    const at::Tensor sub_keys = at::stack({key0, key1}, /*dim=*/2).reshape({-1});  // (E * 2,)
    const at::Tensor sub_entry = at::arange(entries * 2, long_options);
    const at::Tensor sub_coef = sub_entry.floor_divide(2);
    const at::Tensor sub_src = sub_coef.floor_divide(k) * 2 + sub_entry.remainder(2);
    product_key_segment_sum(op, dtype, sub_keys, sub_coef, sub_src, num_sub_rows, q, rows * 2, ds,
                            scale, dsubkeys, Dh);
    if (!sparse_grad) {
      // Values: entry (row, m) -> destination slot, source row of dout, coefficient weights.
      const at::Tensor value_keys =
          at::where(live, flat, at::full({}, N, long_options)).reshape({-1});
      const at::Tensor value_entry = at::arange(entries, long_options);
      const at::Tensor entry_row = value_entry.floor_divide(k);
      const at::Tensor value_src =
          sum_heads ? entry_row.floor_divide(H * T) * T + entry_row.remainder(T) : entry_row;
      const at::Tensor flat_weights = weights.reshape({-1});
      product_key_segment_sum(op, dtype, value_keys, value_entry, value_src, N, dout,
                              sum_heads ? B * T : rows, flat_weights, 1.0, dvalues, Dv);
    }
    return;
  }

  // Atomic mode: float32 accumulators, zeroed; float32 outputs accumulate in place.
  const bool in_place = dtype == MergeDtype::kFloat32;
  const at::TensorOptions float_options = q.options().dtype(at::kFloat);
  const at::Tensor dsubkeys_acc = in_place ? dsubkeys : at::empty(subkeys.sizes(), float_options);
  dsubkeys_acc.zero_();
  params.dsubkeys_acc = dsubkeys_acc.data_ptr<float>();
  at::Tensor dvalues_acc;
  if (!sparse_grad) {
    dvalues_acc = in_place ? dvalues : at::empty(values.sizes(), float_options);
    dvalues_acc.zero_();
    params.dvalues_acc = dvalues_acc.data_ptr<float>();
  }
  check_launch(op, l2m::cuda::product_key_bwd_launch(params, current_stream()));
  if (!in_place) {
    dsubkeys.copy_(dsubkeys_acc);
    if (!sparse_grad) dvalues.copy_(dvalues_acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Gated memory writes and the gated dense update (SPEC section 3; interfaces:
// csrc/cuda/memory_write.h, csrc/cuda/dense_update.h). The Python signatures are the GPU
// backends' shared ones (comments above _gpu_kernels and _gpu_dense_fwd in
// l2m_kernels/ops/memory_write/function.py); outputs preallocated by the caller, None returned.

// dtype of a floating tensor the kernels serve: float32, float16 or bfloat16.
MergeDtype kernel_dtype(const char* op, const char* name, const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return MergeDtype::kFloat32;
    case at::kHalf:
      return MergeDtype::kFloat16;
    case at::kBFloat16:
      return MergeDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ",
                       tensor.scalar_type());
  }
  return MergeDtype::kFloat32;
}

// Every tensor on CUDA, on the device of the first one (no layout requirement).
void check_devices(const char* op, std::initializer_list<NamedTensor> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  for (const NamedTensor& named : tensors) {
    const at::Tensor& tensor = *named.second;
    TORCH_CHECK_VALUE(tensor.is_cuda(), op, ": ", named.first, " must be a CUDA tensor, got ",
                      tensor.device());
    TORCH_CHECK_VALUE(tensor.device() == first.device(), op, ": ", named.first, " is on ",
                      tensor.device(), " but ", tensors.begin()->first, " is on ", first.device());
  }
}

void check_contiguous(const char* op, std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& named : tensors) {
    TORCH_CHECK_VALUE(named.second->is_contiguous(), op, ": ", named.first, " must be contiguous");
  }
}

// No output shares memory with an input or with another output (at::assert_no_overlap raises
// on any overlap it can decide; broadcast views it cannot decide pass).
void check_outputs_apart(std::initializer_list<const at::Tensor*> outputs,
                         std::initializer_list<const at::Tensor*> inputs) {
  for (auto output = outputs.begin(); output != outputs.end(); ++output) {
    for (const at::Tensor* input : inputs) at::assert_no_overlap(**output, *input);
    for (auto other = std::next(output); other != outputs.end(); ++other) {
      at::assert_no_overlap(**output, **other);
    }
  }
}

struct WriteShape {
  int64_t groups, num_slots, dim, steps, writes_per_step, erase_dim, entries;
  bool indices_int32;
  MergeDtype dtype;
};

// memory (G, N, D) of a served dtype; indices (G, T, kw) int32 / int64; weights (G, T, kw), add
// (G, T, D), erase (G, T, D) or (G, T, 1) of memory's dtype; the plan order (E,) int64 and
// run_length (E,) int32 with E = G * T * kw. All on one CUDA device, contiguous.
WriteShape check_write_operands(const char* op, const at::Tensor& memory, const at::Tensor& indices,
                                const at::Tensor& weights, const at::Tensor& add,
                                const at::Tensor& erase, const at::Tensor& order,
                                const at::Tensor& run_length) {
  check_placement(op, {{"memory", &memory},
                       {"indices", &indices},
                       {"weights", &weights},
                       {"add", &add},
                       {"erase", &erase},
                       {"order", &order},
                       {"run_length", &run_length}});
  WriteShape shape;
  shape.dtype = kernel_dtype(op, "memory", memory);
  TORCH_CHECK_VALUE(memory.dim() == 3, op, ": memory must be 3-D (G, N, D), got shape ",
                    shape_string(memory.sizes()));
  shape.groups = memory.size(0);
  shape.num_slots = memory.size(1);
  shape.dim = memory.size(2);
  TORCH_CHECK_VALUE(indices.dim() == 3 && indices.size(0) == shape.groups, op,
                    ": indices must be 3-D (G, T, kw) with G = ", std::to_string(shape.groups),
                    ", got shape ", shape_string(indices.sizes()));
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  shape.indices_int32 = indices.scalar_type() == at::kInt;
  shape.steps = indices.size(1);
  shape.writes_per_step = indices.size(2);
  expect_dtype(op, memory.scalar_type(), {{"weights", &weights}, {"add", &add}, {"erase", &erase}});
  expect_shape(op, "weights", weights, {shape.groups, shape.steps, shape.writes_per_step});
  expect_shape(op, "add", add, {shape.groups, shape.steps, shape.dim});
  TORCH_CHECK_VALUE(erase.dim() == 3, op, ": erase must be (G, T, D) or (G, T, 1), got shape ",
                    shape_string(erase.sizes()));
  shape.erase_dim = erase.size(2) == 1 ? 1 : shape.dim;
  TORCH_CHECK_VALUE(erase.sizes() == at::IntArrayRef({shape.groups, shape.steps, shape.erase_dim}),
                    op, ": erase must be (G, T, D) or (G, T, 1) = ",
                    shape_string({shape.groups, shape.steps, shape.dim}), " or ",
                    shape_string({shape.groups, shape.steps, 1}), ", got ",
                    shape_string(erase.sizes()));
  shape.entries = shape.groups * shape.steps * shape.writes_per_step;
  expect_dtype(op, at::kLong, {{"order", &order}});
  expect_dtype(op, at::kInt, {{"run_length", &run_length}});
  expect_shape(op, "order", order, {shape.entries});
  expect_shape(op, "run_length", run_length, {shape.entries});
  return shape;
}

void gated_memory_write_fwd(const at::Tensor& memory, const at::Tensor& indices,
                            const at::Tensor& weights, const at::Tensor& add,
                            const at::Tensor& erase, const at::Tensor& order,
                            const at::Tensor& run_length, const at::Tensor& out) {
  constexpr const char* op = "l2m gated_memory_write_fwd (cuda)";
  const WriteShape shape =
      check_write_operands(op, memory, indices, weights, add, erase, order, run_length);
  check_placement(op, {{"memory", &memory}, {"out", &out}});
  expect_dtype(op, memory.scalar_type(), {{"out", &out}});
  expect_shape(op, "out", out, {shape.groups, shape.num_slots, shape.dim});
  // out may be memory itself (in place: each slot row is read, then written, by one warp), but
  // no other overlap.
  at::assert_no_partial_overlap(out, memory);
  check_outputs_apart({&out}, {&indices, &weights, &add, &erase, &order, &run_length});
  // Nothing to write (N == 0 admits only -1 entries; its empty tensors may have no storage).
  if (shape.entries == 0 || shape.dim == 0 || shape.num_slots == 0) return;

  const c10::cuda::CUDAGuard device_guard(memory.device());
  l2m::cuda::GatedMemoryWriteFwdParams params;
  params.dtype = shape.dtype;
  params.indices_int32 = shape.indices_int32;
  params.groups = shape.groups;
  params.num_slots = shape.num_slots;
  params.dim = shape.dim;
  params.steps = shape.steps;
  params.writes_per_step = shape.writes_per_step;
  params.erase_dim = shape.erase_dim;
  params.memory = memory.data_ptr();
  params.indices = indices.data_ptr();
  params.weights = weights.data_ptr();
  params.add = add.data_ptr();
  params.erase = erase.data_ptr();
  params.order = order.data_ptr<int64_t>();
  params.run_length = run_length.data_ptr<int32_t>();
  params.out = out.data_ptr();
  check_launch(op, l2m::cuda::gated_memory_write_fwd_launch(params, current_stream()));
}

void gated_memory_write_bwd(const at::Tensor& dnew, const at::Tensor& memory,
                            const at::Tensor& indices, const at::Tensor& weights,
                            const at::Tensor& add, const at::Tensor& erase,
                            const at::Tensor& order, const at::Tensor& run_length,
                            const at::Tensor& dmemory, const at::Tensor& dweights,
                            const at::Tensor& add_parts, const at::Tensor& erase_parts) {
  constexpr const char* op = "l2m gated_memory_write_bwd (cuda)";
  const WriteShape shape =
      check_write_operands(op, memory, indices, weights, add, erase, order, run_length);
  check_placement(op, {{"memory", &memory},
                       {"dnew", &dnew},
                       {"dmemory", &dmemory},
                       {"dweights", &dweights},
                       {"add_parts", &add_parts},
                       {"erase_parts", &erase_parts}});
  expect_dtype(op, memory.scalar_type(),
               {{"dnew", &dnew}, {"dmemory", &dmemory}, {"dweights", &dweights}});
  expect_dtype(op, at::kFloat, {{"add_parts", &add_parts}, {"erase_parts", &erase_parts}});
  expect_shape(op, "dnew", dnew, {shape.groups, shape.num_slots, shape.dim});
  expect_shape(op, "dmemory", dmemory, {shape.groups, shape.num_slots, shape.dim});
  expect_shape(op, "dweights", dweights, {shape.groups, shape.steps, shape.writes_per_step});
  expect_shape(op, "add_parts", add_parts, {shape.entries, shape.dim});
  expect_shape(op, "erase_parts", erase_parts, {shape.entries, shape.erase_dim});
  check_outputs_apart({&dmemory, &dweights, &add_parts, &erase_parts},
                      {&dnew, &memory, &indices, &weights, &add, &erase, &order, &run_length});
  // No written slot: dmemory is dnew's copy and the other outputs arrive zeroed.
  if (shape.entries == 0 || shape.dim == 0 || shape.num_slots == 0) return;

  const c10::cuda::CUDAGuard device_guard(memory.device());
  // Running float32 sum of each entry's dweight over the column chunks (memory_write.h).
  const at::Tensor dweight_partial = at::empty({shape.entries}, memory.options().dtype(at::kFloat));
  l2m::cuda::GatedMemoryWriteBwdParams params;
  params.dtype = shape.dtype;
  params.indices_int32 = shape.indices_int32;
  params.groups = shape.groups;
  params.num_slots = shape.num_slots;
  params.dim = shape.dim;
  params.steps = shape.steps;
  params.writes_per_step = shape.writes_per_step;
  params.erase_dim = shape.erase_dim;
  params.dnew = dnew.data_ptr();
  params.memory = memory.data_ptr();
  params.indices = indices.data_ptr();
  params.weights = weights.data_ptr();
  params.add = add.data_ptr();
  params.erase = erase.data_ptr();
  params.order = order.data_ptr<int64_t>();
  params.run_length = run_length.data_ptr<int32_t>();
  params.dmemory = dmemory.data_ptr();
  params.dweights = dweights.data_ptr();
  params.add_parts = add_parts.data_ptr<float>();
  params.erase_parts = erase_parts.data_ptr<float>();
  params.dweight_partial = dweight_partial.data_ptr<float>();
  // The scratch tensor lives until the end of this scope; the caching allocator reuses its
  // memory only for later work on this stream.
  check_launch(op, l2m::cuda::gated_memory_write_bwd_launch(params, current_stream()));
}

// The four inputs of the dense update: 4-D views of one shape (any strides, 0 where broadcast),
// one served dtype, one CUDA device.
MergeDtype check_dense_operands(const char* op, const at::Tensor& memory, const at::Tensor& update,
                                const at::Tensor& input_gate, const at::Tensor& forget_gate) {
  check_devices(op, {{"memory", &memory},
                     {"update", &update},
                     {"input_gate", &input_gate},
                     {"forget_gate", &forget_gate}});
  const MergeDtype dtype = kernel_dtype(op, "memory", memory);
  expect_dtype(op, memory.scalar_type(),
               {{"update", &update}, {"input_gate", &input_gate}, {"forget_gate", &forget_gate}});
  TORCH_CHECK_VALUE(memory.dim() == 4, op,
                    ": memory must be a 4-D view of the broadcast shape, got shape ",
                    shape_string(memory.sizes()));
  const std::vector<int64_t> sizes(memory.sizes().begin(), memory.sizes().end());
  expect_shape(op, "update", update, sizes);
  expect_shape(op, "input_gate", input_gate, sizes);
  expect_shape(op, "forget_gate", forget_gate, sizes);
  return dtype;
}

l2m::cuda::StridedOperand strided_operand(const at::Tensor& tensor) {
  l2m::cuda::StridedOperand operand;
  operand.data = tensor.data_ptr();
  for (int d = 0; d < 4; ++d) operand.strides[d] = tensor.stride(d);
  return operand;
}

void gated_dense_update_fwd(const at::Tensor& memory, const at::Tensor& update,
                            const at::Tensor& input_gate, const at::Tensor& forget_gate,
                            const at::Tensor& out) {
  constexpr const char* op = "l2m gated_dense_update_fwd (cuda)";
  const MergeDtype dtype = check_dense_operands(op, memory, update, input_gate, forget_gate);
  check_devices(op, {{"memory", &memory}, {"out", &out}});
  check_contiguous(op, {{"out", &out}});
  expect_dtype(op, memory.scalar_type(), {{"out", &out}});
  expect_shape(op, "out", out, std::vector<int64_t>(memory.sizes().begin(), memory.sizes().end()));
  check_outputs_apart({&out}, {&memory, &update, &input_gate, &forget_gate});
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard device_guard(memory.device());
  l2m::cuda::GatedDenseUpdateFwdParams params;
  params.dtype = dtype;
  for (int d = 0; d < 4; ++d) params.sizes[d] = memory.size(d);
  params.memory = strided_operand(memory);
  params.update = strided_operand(update);
  params.input_gate = strided_operand(input_gate);
  params.forget_gate = strided_operand(forget_gate);
  params.out = out.data_ptr();
  check_launch(op, l2m::cuda::gated_dense_update_fwd_launch(params, current_stream()));
}

void gated_dense_update_bwd(const at::Tensor& dout, const at::Tensor& memory,
                            const at::Tensor& update, const at::Tensor& input_gate,
                            const at::Tensor& forget_gate, const at::Tensor& dmemory,
                            const at::Tensor& dupdate, const at::Tensor& dinput_gate,
                            const at::Tensor& dforget_gate) {
  constexpr const char* op = "l2m gated_dense_update_bwd (cuda)";
  const MergeDtype dtype = check_dense_operands(op, memory, update, input_gate, forget_gate);
  check_devices(op, {{"memory", &memory},
                     {"dout", &dout},
                     {"dmemory", &dmemory},
                     {"dupdate", &dupdate},
                     {"dinput_gate", &dinput_gate},
                     {"dforget_gate", &dforget_gate}});
  check_contiguous(op, {{"dout", &dout},
                        {"dmemory", &dmemory},
                        {"dupdate", &dupdate},
                        {"dinput_gate", &dinput_gate},
                        {"dforget_gate", &dforget_gate}});
  expect_dtype(op, memory.scalar_type(), {{"dout", &dout}});
  expect_dtype(op, at::kFloat,
               {{"dmemory", &dmemory},
                {"dupdate", &dupdate},
                {"dinput_gate", &dinput_gate},
                {"dforget_gate", &dforget_gate}});
  const std::vector<int64_t> sizes(memory.sizes().begin(), memory.sizes().end());
  expect_shape(op, "dout", dout, sizes);
  expect_shape(op, "dmemory", dmemory, sizes);
  expect_shape(op, "dupdate", dupdate, sizes);
  expect_shape(op, "dinput_gate", dinput_gate, sizes);
  expect_shape(op, "dforget_gate", dforget_gate, sizes);
  check_outputs_apart({&dmemory, &dupdate, &dinput_gate, &dforget_gate},
                      {&dout, &memory, &update, &input_gate, &forget_gate});
  if (dout.numel() == 0) return;

  const c10::cuda::CUDAGuard device_guard(memory.device());
  l2m::cuda::GatedDenseUpdateBwdParams params;
  params.dtype = dtype;
  for (int d = 0; d < 4; ++d) params.sizes[d] = memory.size(d);
  params.dout = dout.data_ptr();
  params.memory = strided_operand(memory);
  params.update = strided_operand(update);
  params.input_gate = strided_operand(input_gate);
  params.forget_gate = strided_operand(forget_gate);
  params.dmemory = dmemory.data_ptr<float>();
  params.dupdate = dupdate.data_ptr<float>();
  params.dinput_gate = dinput_gate.data_ptr<float>();
  params.dforget_gate = dforget_gate.data_ptr<float>();
  check_launch(op, l2m::cuda::gated_dense_update_bwd_launch(params, current_stream()));
}

// ---------------------------------------------------------------------------------------------
// Local attention and the read-weight helper of the memory_attention backend (SPEC section 5;
// interfaces: csrc/cuda/local_attention.h, memory_attention.h). The Python signatures of the cpu
// extension's functions; outputs preallocated by the caller, None returned. float64 is served
// here too (accumulated in float64), although memory_attention itself is not served in float64 on
// CUDA (the top-k read is not).

using l2m::cuda::AttentionDtype;

AttentionDtype attention_dtype(const char* op, const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return AttentionDtype::kFloat32;
    case at::kHalf:
      return AttentionDtype::kFloat16;
    case at::kBFloat16:
      return AttentionDtype::kBFloat16;
    case at::kDouble:
      return AttentionDtype::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": q must be float32, float16, bfloat16 or float64, got ",
                       q.scalar_type());
  }
  return AttentionDtype::kFloat32;
}

// dtype of lse, weights and the other per-row statistics: float64 for float64 input, else float32.
at::ScalarType attention_acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

struct LocalShape {
  int64_t batch, heads, kv_heads, seq_len, context_len, dim, dim_v;
};

// q (B, H, T, D); k (B, Hkv, S, D) with H % Hkv == 0 and S >= T; v (B, Hkv, S, Dv); window -1
// (none) or >= 0.
LocalShape check_local_operands(const char* op, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, int64_t window) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, H, T, D), got shape ",
                    shape_string(q.sizes()));
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be 4-D (B, Hkv, S, D), got shape ",
                    shape_string(k.sizes()));
  TORCH_CHECK_VALUE(v.dim() == 4, op, ": v must be 4-D (B, Hkv, S, Dv), got shape ",
                    shape_string(v.sizes()));
  LocalShape shape;
  shape.batch = q.size(0);
  shape.heads = q.size(1);
  shape.seq_len = q.size(2);
  shape.dim = q.size(3);
  shape.kv_heads = k.size(1);
  shape.context_len = k.size(2);
  shape.dim_v = v.size(3);
  TORCH_CHECK_VALUE(shape.kv_heads >= 1 && shape.heads % shape.kv_heads == 0 &&
                        shape.context_len >= shape.seq_len,
                    op, ": k must have Hkv dividing H = ", std::to_string(shape.heads),
                    " and S >= T = ", std::to_string(shape.seq_len), ", got shape ",
                    shape_string(k.sizes()));
  expect_shape(op, "k", k, {shape.batch, shape.kv_heads, shape.context_len, shape.dim});
  expect_shape(op, "v", v, {shape.batch, shape.kv_heads, shape.context_len, shape.dim_v});
  TORCH_CHECK_VALUE(window >= -1, op, ": window must be -1 (no window) or >= 0, got ",
                    std::to_string(window));
  constexpr int64_t kMax = l2m::cuda::kLocalAttentionMaxExtent;
  TORCH_CHECK_NOT_IMPLEMENTED(shape.heads <= kMax && shape.context_len <= kMax &&
                                  shape.dim <= kMax && shape.dim_v <= kMax,
                              op, ": the CUDA kernels serve H, S, D, Dv <= 2**30, got q ",
                              shape_string(q.sizes()), ", k ", shape_string(k.sizes()), ", v ",
                              shape_string(v.sizes()));
  return shape;
}

template <typename Params>
void fill_local_params(Params& params, AttentionDtype dtype, const LocalShape& shape,
                       int64_t window, double scale) {
  params.dtype = dtype;
  params.batch = shape.batch;
  params.heads = shape.heads;
  params.kv_heads = shape.kv_heads;
  params.seq_len = shape.seq_len;
  params.context_len = shape.context_len;
  params.dim = shape.dim;
  params.dim_v = shape.dim_v;
  params.window = window < 0 ? shape.context_len : window;
  params.scale = scale;
}

void local_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         int64_t window, double scale, const at::Tensor& out,
                         const at::Tensor& lse) {
  constexpr const char* op = "l2m local_attention_fwd (cuda)";
  check_placement(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  const AttentionDtype dtype = attention_dtype(op, q);
  expect_dtype(op, q.scalar_type(), {{"k", &k}, {"v", &v}, {"out", &out}});
  expect_dtype(op, attention_acc_dtype(q.scalar_type()), {{"lse", &lse}});
  const LocalShape shape = check_local_operands(op, q, k, v, window);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  expect_shape(op, "out", out, {B, H, T, shape.dim_v});
  expect_shape(op, "lse", lse, {B, H, T});
  check_outputs_apart({&out, &lse}, {&q, &k, &v});
  if (B * H * T == 0) return;

  const c10::cuda::CUDAGuard device_guard(q.device());
  l2m::cuda::LocalAttentionFwdParams params;
  fill_local_params(params, dtype, shape, window, scale);
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr();
  check_launch(op, l2m::cuda::local_attention_fwd_launch(params, current_stream()));
}

void local_attention_bwd(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                         const at::Tensor& lse, int64_t window, double scale,
                         const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  constexpr const char* op = "l2m local_attention_bwd (cuda)";
  check_placement(op, {{"dout", &dout},
                       {"dlse", &dlse},
                       {"q", &q},
                       {"k", &k},
                       {"v", &v},
                       {"out", &out},
                       {"lse", &lse},
                       {"dq", &dq},
                       {"dk", &dk},
                       {"dv", &dv}});
  const AttentionDtype dtype = attention_dtype(op, q);
  const at::ScalarType acc = attention_acc_dtype(q.scalar_type());
  expect_dtype(op, q.scalar_type(),
               {{"dout", &dout}, {"k", &k}, {"v", &v}, {"out", &out}, {"dq", &dq}, {"dk", &dk},
                {"dv", &dv}});
  expect_dtype(op, acc, {{"dlse", &dlse}, {"lse", &lse}});
  const LocalShape shape = check_local_operands(op, q, k, v, window);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  expect_shape(op, "dout", dout, {B, H, T, shape.dim_v});
  expect_shape(op, "dlse", dlse, {B, H, T});
  expect_shape(op, "out", out, {B, H, T, shape.dim_v});
  expect_shape(op, "lse", lse, {B, H, T});
  expect_shape(op, "dq", dq, std::vector<int64_t>(q.sizes().begin(), q.sizes().end()));
  expect_shape(op, "dk", dk, std::vector<int64_t>(k.sizes().begin(), k.sizes().end()));
  expect_shape(op, "dv", dv, std::vector<int64_t>(v.sizes().begin(), v.sizes().end()));
  check_outputs_apart({&dq, &dk, &dv}, {&dout, &dlse, &q, &k, &v, &out, &lse});
  // No key: dk, dv and (S >= T) dq have no elements.
  if (B * shape.kv_heads * shape.context_len == 0) return;

  const c10::cuda::CUDAGuard device_guard(q.device());
  // delta = <dout, out> - dlse per row, written by the first kernel and read by the others; the
  // caching allocator reuses its memory only for later work on this stream.
  const at::Tensor delta = at::empty({B, H, T}, q.options().dtype(acc));
  l2m::cuda::LocalAttentionBwdParams params;
  fill_local_params(params, dtype, shape, window, scale);
  params.dout = dout.data_ptr();
  params.dlse = dlse.data_ptr();
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr();
  params.delta = delta.data_ptr();
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  // Runs without queries too (T == 0): dk and dv are zeroed.
  check_launch(op, l2m::cuda::local_attention_bwd_launch(params, current_stream()));
}

// The read's weights recomputed at a given selection, for the memory_attention backward
// (memory_attention.h). Indices outside [0, N) (e.g. -1) get weight 0 and are never read: they
// are checked on the device, not here (no host synchronisation).
void memory_read_weights(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                         const at::Tensor& indices, const at::Tensor& lse, double scale,
                         const std::optional<at::Tensor>& dout, const at::Tensor& weights,
                         const std::optional<at::Tensor>& dots,
                         const std::optional<at::Tensor>& out) {
  constexpr const char* op = "l2m memory_read_weights (cuda)";
  check_placement(op, {{"q", &q}, {"keys", &keys}, {"values", &values}, {"indices", &indices},
                       {"lse", &lse}, {"weights", &weights}});
  for (const auto& named : {std::make_pair("dout", &dout), std::make_pair("dots", &dots),
                            std::make_pair("out", &out)}) {
    if (named.second->has_value()) check_placement(op, {{"q", &q}, {named.first, &**named.second}});
  }
  const AttentionDtype dtype = attention_dtype(op, q);
  const at::ScalarType acc = attention_acc_dtype(q.scalar_type());
  expect_dtype(op, q.scalar_type(), {{"keys", &keys}, {"values", &values}});
  expect_dtype(op, acc, {{"lse", &lse}, {"weights", &weights}});
  expect_dtype(op, at::kLong, {{"indices", &indices}});
  const TopkReadShape shape = check_topk_operands(op, q, keys, values);
  const int64_t B = shape.batch, H = shape.heads, T = shape.seq_len;
  TORCH_CHECK_VALUE(indices.dim() == 4, op, ": indices must be 4-D (B, H, T, k), got shape ",
                    shape_string(indices.sizes()));
  const int64_t k = indices.size(3);
  expect_shape(op, "indices", indices, {B, H, T, k});
  expect_shape(op, "lse", lse, {B, H, T});
  expect_shape(op, "weights", weights, {B, H, T, k});
  std::vector<const at::Tensor*> outputs = {&weights};
  std::vector<const at::Tensor*> inputs = {&q, &keys, &values, &indices, &lse};
  if (dout.has_value()) {
    expect_dtype(op, q.scalar_type(), {{"dout", &*dout}});
    expect_shape(op, "dout", *dout, {B, H, T, shape.dim_v});
    TORCH_CHECK_VALUE(dots.has_value(), op, ": dots is required with dout");
    inputs.push_back(&*dout);
  }
  if (dots.has_value()) {
    expect_dtype(op, acc, {{"dots", &*dots}});
    expect_shape(op, "dots", *dots, {B, H, T});
    outputs.push_back(&*dots);
  }
  if (out.has_value()) {
    expect_dtype(op, q.scalar_type(), {{"out", &*out}});
    expect_shape(op, "out", *out, {B, H, T, shape.dim_v});
    outputs.push_back(&*out);
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    for (const at::Tensor* input : inputs) at::assert_no_overlap(*outputs[i], *input);
    for (size_t j = i + 1; j < outputs.size(); ++j) at::assert_no_overlap(*outputs[i], *outputs[j]);
  }

  const c10::cuda::CUDAGuard device_guard(q.device());
  if (B * H * T == 0 || k == 0) {  // no entry: dots and out are zero
    if (dots.has_value()) dots->zero_();
    if (out.has_value()) out->zero_();
    return;
  }
  l2m::cuda::MemoryReadWeightsParams params;
  params.dtype = dtype;
  params.batch = B;
  params.heads = H;
  params.seq_len = T;
  params.mem_heads = shape.mem_heads;
  params.num_slots = shape.num_slots;
  params.dim_k = shape.dim_k;
  params.dim_v = shape.dim_v;
  params.k = k;
  params.shared_memory = shape.shared_memory;
  params.scale = scale;
  params.q = q.data_ptr();
  params.keys = keys.data_ptr();
  params.values = values.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  params.lse = lse.data_ptr();
  params.dout = dout.has_value() ? dout->data_ptr() : nullptr;
  params.weights = weights.data_ptr();
  params.dots = dots.has_value() ? dots->data_ptr() : nullptr;
  params.out = out.has_value() ? out->data_ptr() : nullptr;
  check_launch(op, l2m::cuda::memory_read_weights_launch(params, current_stream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "l2m-kernels CUDA backend: merge ops, the top-k and product-key memory reads, gated "
          "memory writes, the gated dense update, and the local attention and read weights of "
          "memory_attention (low-level interface, preallocated outputs).";
  m.attr("CUDA_ARCHS") = kCudaArchs;
  m.attr("CUDART_VERSION") = CUDART_VERSION;  // of the toolkit the extension was built with
#ifdef L2M_TORCH_VERSION
  m.attr("TORCH_VERSION") = L2M_TORCH_VERSION;  // l2m_kernels._ext refuses a stale build by it
#endif
  m.def("merge_attention_fwd", &merge_attention_fwd,
        "out = wa * out_a + wb * out_b, lse = logaddexp(lse_a, lse_b); writes out, lse.",
        py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"), py::arg("out"),
        py::arg("lse"));
  m.def("merge_attention_bwd", &merge_attention_bwd,
        "Gradients of merge_attention_fwd; writes d_out_a, d_lse_a, d_out_b, d_lse_b.",
        py::arg("dout"), py::arg("dlse"), py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"),
        py::arg("lse_b"), py::arg("lse"), py::arg("d_out_a"), py::arg("d_lse_a"),
        py::arg("d_out_b"), py::arg("d_lse_b"));
  m.def("gated_merge_fwd", &gated_merge_fwd,
        "out = g * out_mem + (1 - g) * out_local with g = sigmoid(gate); writes out.",
        py::arg("out_local"), py::arg("out_mem"), py::arg("gate"), py::arg("out"));
  m.def("gated_merge_bwd", &gated_merge_bwd,
        "Gradients of gated_merge_fwd; writes d_local, d_mem, d_gate.", py::arg("dout"),
        py::arg("out_local"), py::arg("out_mem"), py::arg("gate"), py::arg("d_local"),
        py::arg("d_mem"), py::arg("d_gate"));
  m.def("topk_read_fwd", &topk_read_fwd,
        "Sparse top-k memory read into preallocated out, indices, weights, lse (SPEC section 1).",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("valid_len"), py::arg("k"),
        py::arg("scale"), py::arg("out"), py::arg("indices"), py::arg("weights"), py::arg("lse"),
        py::arg("use_threshold") = true);
  m.def("topk_read_bwd", &topk_read_bwd,
        "Gradients of topk_read_fwd in q, keys, values; writes dq, dkeys, dvalues (every element).",
        py::arg("dout"), py::arg("dweights"), py::arg("dlse"), py::arg("q"), py::arg("keys"),
        py::arg("values"), py::arg("indices"), py::arg("weights"), py::arg("scale"),
        py::arg("deterministic"), py::arg("dq"), py::arg("dkeys"), py::arg("dvalues"));
  m.def("product_key_fwd", &product_key_fwd,
        "Product-key memory read into preallocated out, indices, weights, lse (SPEC section 2).",
        py::arg("q"), py::arg("subkeys"), py::arg("values"), py::arg("k"), py::arg("k_sub"),
        py::arg("scale"), py::arg("sum_heads"), py::arg("out"), py::arg("indices"),
        py::arg("weights"), py::arg("lse"));
  m.def("product_key_bwd", &product_key_bwd,
        "Gradients of product_key_fwd in q, subkeys, values; writes dq, dsubkeys, dvalues (dense "
        "(n_sub ** 2, Dv), or one row w * dout per entry with sparse_grad).",
        py::arg("dout"), py::arg("dweights"), py::arg("dlse"), py::arg("q"), py::arg("subkeys"),
        py::arg("values"), py::arg("indices"), py::arg("weights"), py::arg("scale"),
        py::arg("sum_heads"), py::arg("sparse_grad"), py::arg("deterministic"), py::arg("dq"),
        py::arg("dsubkeys"), py::arg("dvalues"));
  m.def("gated_memory_write_fwd", &gated_memory_write_fwd,
        "Gated memory writes (SPEC section 3) on flat (G, ...) operands with the write plan "
        "(order, run_length); stores the written slots of out (a copy of memory, or memory "
        "itself).",
        py::arg("memory"), py::arg("indices"), py::arg("weights"), py::arg("add"),
        py::arg("erase"), py::arg("order"), py::arg("run_length"), py::arg("out"));
  m.def("gated_memory_write_bwd", &gated_memory_write_bwd,
        "Gradients of gated_memory_write_fwd: stores the written slots of dmemory (a copy of "
        "dnew), dweights and the per-entry float32 add_parts (E, D) / erase_parts (E, erase_dim) "
        "of written entries (the caller zeroes them).",
        py::arg("dnew"), py::arg("memory"), py::arg("indices"), py::arg("weights"),
        py::arg("add"), py::arg("erase"), py::arg("order"), py::arg("run_length"),
        py::arg("dmemory"), py::arg("dweights"), py::arg("add_parts"), py::arg("erase_parts"));
  m.def("gated_dense_update_fwd", &gated_dense_update_fwd,
        "out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update) on 4-D views of "
        "the broadcast shape (any strides); out contiguous.",
        py::arg("memory"), py::arg("update"), py::arg("input_gate"), py::arg("forget_gate"),
        py::arg("out"));
  m.def("gated_dense_update_bwd", &gated_dense_update_bwd,
        "Elementwise float32 gradients of gated_dense_update_fwd (contiguous, of the broadcast "
        "shape; the caller reduces them to each input's shape).",
        py::arg("dout"), py::arg("memory"), py::arg("update"), py::arg("input_gate"),
        py::arg("forget_gate"), py::arg("dmemory"), py::arg("dupdate"), py::arg("dinput_gate"),
        py::arg("dforget_gate"));
  m.def("local_attention_fwd", &local_attention_fwd,
        "Causal local attention of the last T of S positions (FlashAttention style, no T x S\n"
        "matrix). q (B, H, T, D); k (B, Hkv, S, D), H % Hkv == 0, S >= T; v (B, Hkv, S, Dv);\n"
        "window -1 (none) or >= 0: query t at p = S - T + t sees keys p - window < j <= p.\n"
        "Writes out (B, H, T, Dv) dtype and lse (B, H, T) acc; no visible key: out 0, lse -inf.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("window"), py::arg("scale"),
        py::arg("out"), py::arg("lse"));
  m.def("local_attention_bwd", &local_attention_bwd,
        "Gradients of local_attention_fwd (FlashAttention-2): writes dq, dk, dv (like q, k, v).\n"
        "out enters only through <dout, out> per row. Deterministic (dq per query tile, dk/dv\n"
        "per key tile, no atomics).",
        py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("window"), py::arg("scale"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"));
  m.def("memory_read_weights", &memory_read_weights,
        "The top-k read's weights at a given selection (memory_attention backward): writes\n"
        "weights (B, H, T, k) acc = exp(<scale q, keys[n_j]> - lse) (0 for slots outside\n"
        "[0, N)), and, when given, dots (B, H, T) acc = sum_j w_j <dout, values[n_j]> and out\n"
        "(B, H, T, Dv) dtype = sum_j w_j values[n_j]. q, keys, values as in topk_read_fwd;\n"
        "dout, dots, out optional.",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("indices"), py::arg("lse"),
        py::arg("scale"), py::arg("dout"), py::arg("weights"), py::arg("dots"), py::arg("out"));
}
