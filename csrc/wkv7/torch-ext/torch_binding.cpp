// Op schema of the WKV7 kernels, shared by the kernel-builder (Hub) builds and the package's local JIT build.
// kernel-builder provides registration.h and defines CPU_KERNEL / CUDA_KERNEL per backend; the local build
// (visualrwkv_hf.ops.kernels) compiles this file with -DCPU_KERNEL or -DCUDA_KERNEL and gets the macros from here.
#include <torch/library.h>

#if __has_include("registration.h")
#include "registration.h"
#else
#define WKV7_LIBRARY_EXPAND(name, module) TORCH_LIBRARY(name, module)
#define TORCH_LIBRARY_EXPAND(name, module) WKV7_LIBRARY_EXPAND(name, module)
#define REGISTER_EXTENSION(name)
#endif

#if defined(CPU_KERNEL)
#include "../wkv7_cpu/wkv7_cpu.h"
#endif
#if defined(CUDA_KERNEL)
#include "../wkv7_cuda/wkv7_cuda.h"
#endif

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? initial_state) -> (Tensor, "
      "Tensor)");
  ops.def(
      "backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? initial_state, Tensor grad_y, "
      "Tensor? grad_final_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
#if defined(CPU_KERNEL)
  ops.impl("forward", torch::kCPU, &wkv7_forward_cpu);
  ops.impl("backward", torch::kCPU, &wkv7_backward_cpu);
#endif
#if defined(CUDA_KERNEL)
  ops.impl("forward", torch::kCUDA, &wkv7_forward_cuda);
  ops.impl("backward", torch::kCUDA, &wkv7_backward_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
