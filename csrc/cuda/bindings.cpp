// Torch-facing bindings of the CUDA merge kernels: extension `l2m_kernels._C_cuda`.
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

#include <cuda_runtime_api.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "merge.h"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "l2m-kernels CUDA backend: merge ops (low-level interface, preallocated outputs).";
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
}
