// Op schema of the WKV6 kernels, shared by the kernel-builder (Hub) builds and the package's local JIT build.
// kernel-builder provides registration.h and defines CPU_KERNEL / CUDA_KERNEL per backend; the local build
// (visualrwkv_hf.ops.kernels) compiles this file with -DCPU_KERNEL and gets the two macros from here.
#include <torch/library.h>

#if __has_include("registration.h")
#include "registration.h"
#else
#define WKV6_LIBRARY_EXPAND(name, module) TORCH_LIBRARY(name, module)
#define TORCH_LIBRARY_EXPAND(name, module) WKV6_LIBRARY_EXPAND(name, module)
#define REGISTER_EXTENSION(name)
#endif

#if defined(CPU_KERNEL)
#include "../wkv6_cpu/wkv6_cpu.h"
#endif
#if defined(CUDA_KERNEL)
#include "../wkv6_cuda/wkv6_cuda.h"
#endif

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def("forward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor? initial_state) -> (Tensor, Tensor)");
  ops.def(
      "backward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor? initial_state, Tensor grad_y, "
      "Tensor? grad_final_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
#if defined(CPU_KERNEL)
  ops.impl("forward", torch::kCPU, &wkv6_forward_cpu);
  ops.impl("backward", torch::kCPU, &wkv6_backward_cpu);
#endif
#if defined(CUDA_KERNEL)
  ops.impl("forward", torch::kCUDA, &wkv6_forward_cuda);
  ops.impl("backward", torch::kCUDA, &wkv6_backward_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
