// Op schema of the decode linear kernel (inference only: no backward), shared by a kernel-builder (Hub) build and
// the package's local JIT build. kernel-builder provides registration.h and defines CPU_KERNEL; the local build
// (visualrwkv_hf.ops.kernels) compiles this file with -DCPU_KERNEL and gets the macros from here.
#include <torch/library.h>

#if __has_include("registration.h")
#include "registration.h"
#else
#define LINEAR_LIBRARY_EXPAND(name, module) TORCH_LIBRARY(name, module)
#define TORCH_LIBRARY_EXPAND(name, module) LINEAR_LIBRARY_EXPAND(name, module)
#define REGISTER_EXTENSION(name)
#endif

#if defined(CPU_KERNEL)
#include "../linear_cpu/linear_cpu.h"
#endif

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def("forward(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
#if defined(CPU_KERNEL)
  ops.impl("forward", torch::kCPU, &linear_forward_cpu);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
