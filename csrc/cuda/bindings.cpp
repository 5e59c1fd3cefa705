// Torch-facing bindings of the CUDA kernels: extension `l2m_kernels._C_cuda`, the only file under
// csrc/cuda that includes torch headers (the kernels in *.cu see plain structs). The checks, params
// and entry points are csrc/common/binding.h, shared with the CPU extension; here are the launch
// on the current stream of the tensors' device and a CUDA error turned into an exception.
// Compiled with the host compiler as part of the CUDAExtension (csrc/cuda/*.cu + this file).
// Optional string-literal macros in the cxx flags: -DL2M_CUDA_ARCHS="8.0;9.0" (module attribute
// CUDA_ARCHS, else "unknown") and -DL2M_TORCH_VERSION="<torch.__version__>" (TORCH_VERSION).
// c10's stream header rather than ATen/cuda/CUDAContext.h: the same getCurrentCUDAStream without
// pulling in the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <string>

#include "dense_update.h"
#include "local_attention.h"
#include "memory_attention.h"
#include "memory_write.h"
#include "merge.h"
#include "product_key.h"
#include "topk_read.h"

namespace {

// Build facts passed by setup.py as string-literal macros (-DNAME="value"), reported by the module.
#ifdef L2M_CUDA_ARCHS
constexpr const char* kCudaArchs = L2M_CUDA_ARCHS;
#else
constexpr const char* kCudaArchs = "unknown";
#endif

// The stream PyTorch is using on the current device (set by the CUDAGuard on the tensors' device).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(const std::string& op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(status));
}

}  // namespace

// The shared contract for the CUDA kernels: each launcher runs on the current stream of the
// tensors' device (an entry point that launches a kernel otherwise sets the device guard itself).
#define L2M_BINDING_CUDA 1
#define L2M_KERNEL_NS l2m::cuda
#define L2M_LAUNCH(call, launcher, params, device_of)                                \
  do {                                                                               \
    const c10::cuda::CUDAGuard launch_guard((device_of).device());                   \
    check_launch((call).op, l2m::cuda::launcher##_launch(params, current_stream())); \
  } while (false)
#include "../common/binding.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "l2m-kernels CUDA kernels. Low-level: call through l2m_kernels.";
  m.attr("CUDA_ARCHS") = kCudaArchs;
  m.attr("CUDART_VERSION") = CUDART_VERSION;  // of the toolkit the extension was built with
#ifdef L2M_TORCH_VERSION
  m.attr("TORCH_VERSION") = L2M_TORCH_VERSION;  // l2m_kernels._ext refuses a stale build by it
#endif
  l2m::binding::def_ops(m);  // the ops (csrc/common/binding.h)
}
