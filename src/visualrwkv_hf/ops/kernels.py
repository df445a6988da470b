"""Compiled WKV6: the package's CPU and CUDA kernels (csrc/wkv6), built at first use, and its `kernels` layer.

* `wkv6_compiled(r, k, v, w, u, initial_state)`: the compiled op with autograd, same contract as `ops.wkv6`; inputs
  it has no kernel for (a CUDA head size outside `CUDA_HEAD_SIZES`, another device, a failed build, the torch
  backend forced) go to the torch op instead.
* `WKV6`: the stateless layer the model calls, declared with `kernels.use_kernel_forward_from_hub("WKV6")`. Its own
  forward is `wkv6_compiled`, so a plain `from_pretrained` model already gets the fastest path on the CPU and on
  NVIDIA GPUs; `kernels.kernelize(model, device=..., mode=...)` replaces it per device and mode from the mapping
  registered by `register_wkv6_kernels` (the local builds as a `LocalLayerRepository`; for CUDA, optionally a Hub
  repository built with kernel-builder from csrc/wkv6).

The build: `torch.utils.cpp_extension.load` compiles csrc/wkv6 into the per-user torch extensions cache, once per
device type on first use (CPU ~60 s, CUDA ~1-2 min with nvcc for the current GPU's architecture; ~0.2 s to load
afterwards). CPU: -fopenmp is required (without it at::parallel_for runs on one thread); -mavx2 -mfma are added only
when this CPU has them, and the flag set (GPU architecture), a hash of the sources and the torch version are part of
the extension name, so builds for different machines or sources never share a cache entry. Nothing is built at import
time. If a build fails (no compiler, no nvcc, ...) one warning says so and every call on that device uses the torch op.

Switch: VISUALRWKV_WKV_BACKEND=torch (or `set_wkv6_backend("torch")`) forces the torch op; "auto" (default) uses the
kernel where there is one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from kernels import LocalLayerRepository, Mode, register_kernel_mapping, use_kernel_forward_from_hub
from torch import nn

from .wkv6 import _check_inputs, wkv6

BACKEND_ENV = "VISUALRWKV_WKV_BACKEND"
BACKENDS = ("auto", "torch")
# csrc/ ships inside the package (a link in the source tree, real files in a wheel)
KERNEL_SOURCES = Path(__file__).resolve().parent / "csrc" / "wkv6"
# a `kernels` repository (one noarch variant, build/torch-universal/) whose layer runs the local builds, CPU or CUDA
LOCAL_KERNEL_REPOSITORY = KERNEL_SOURCES / "local-repository"

# head sizes the CUDA kernel is instantiated for (its per-thread state row lives in registers); others use torch
CUDA_HEAD_SIZES = (16, 24, 32, 64, 128)

_backend_override: str | None = None
_build_lock = threading.Lock()
# per device type ("cpu", "cuda"): the loaded ops, or None once a build attempt failed
_compiled_ops: dict[str, SimpleNamespace | None] = {}


def set_wkv6_backend(backend: str | None) -> None:
    """Force the WKV6 backend for this process: "torch" (never compile), "auto", or None (back to the env var)."""
    global _backend_override
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"WKV6 backend must be one of {BACKENDS} or None, got {backend!r}.")
    _backend_override = backend


def wkv6_backend() -> str:
    """The backend in force: the `set_wkv6_backend` override, else VISUALRWKV_WKV_BACKEND, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}.")
    return backend


AVX512_FEATURES = ("avx512f", "avx512vl", "avx512bw", "avx512dq")


def _cpu_has(*features: str) -> bool:
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return False
    return all(feature in flags for feature in features)


def cpu_build_flags() -> list[str]:
    """Compiler flags of the local CPU build: a baseline ISA, never -march=native (a cached build may move)."""
    # -fno-trapping-math lets the clamps in the decay's exp vectorise (nothing here enables FP exceptions)
    flags = ["-O3", "-fno-trapping-math", "-fopenmp", "-DCPU_KERNEL"]
    if _cpu_has("avx2", "fma"):
        flags += ["-mavx2", "-mfma"]
        # the scans' register tiles use 512-bit vectors where the CPU has them (about 1.8x the AVX2 speed)
        if _cpu_has(*AVX512_FEATURES):
            flags += [f"-m{feature}" for feature in AVX512_FEATURES]
    return flags


def _cpu_sources() -> list[Path]:
    return [KERNEL_SOURCES / "wkv6_cpu" / "wkv6_cpu.cpp", KERNEL_SOURCES / "torch-ext" / "torch_binding.cpp"]


def cpu_extension_name(flags: list[str]) -> str:
    """Cache key of the build: ISA tag + hash of the flags, the sources and the torch version."""
    digest = hashlib.sha256(" ".join(flags + [torch.__version__]).encode())
    for source in _cpu_sources() + [KERNEL_SOURCES / "wkv6_cpu" / "wkv6_cpu.h"]:
        digest.update(source.read_bytes())
    isa = "avx512" if "-mavx512f" in flags else "avx2" if "-mavx2" in flags else "base"
    return f"visualrwkv_wkv6_cpu_{isa}_{digest.hexdigest()[:12]}"


def _build_cpu_ops(flags: list[str] | None = None) -> SimpleNamespace:
    """Build (cached) and load the CPU kernel with `flags` (default: `cpu_build_flags()`, this CPU's tier)."""
    from torch.utils.cpp_extension import load

    flags = cpu_build_flags() if flags is None else flags
    name = cpu_extension_name(flags)
    # is_python_module=False: the library registers torch.ops.<name>.forward / backward, as in a Hub build
    load(
        name=name,
        sources=[str(path) for path in _cpu_sources()],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    namespace = getattr(torch.ops, name)
    return SimpleNamespace(forward=namespace.forward, backward=namespace.backward)


def compiled_ops(device_type: str) -> SimpleNamespace | None:
    """The compiled ops for "cpu" or "cuda", built on first call; None (after one warning) when the build fails."""
    if device_type in _compiled_ops:
        return _compiled_ops[device_type]
    with _build_lock:
        if device_type not in _compiled_ops:
            build = {"cpu": _build_cpu_ops, "cuda": _build_cuda_ops}[device_type]
            try:
                _compiled_ops[device_type] = build()
            except Exception as error:  # no compiler, missing headers, a compile error: all mean "use torch"
                _compiled_ops[device_type] = None
                message = str(error).strip()
                warnings.warn(
                    f"visualrwkv_hf: the compiled WKV6 {device_type.upper()} kernel could not be built "
                    f"({type(error).__name__}: {message.splitlines()[-1] if message else ''}); using the torch "
                    f"implementation (slower). Set {BACKEND_ENV}=torch to skip the build attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _compiled_ops[device_type]


def cpu_kernel_ops() -> SimpleNamespace | None:
    """The compiled CPU ops (see `compiled_ops`)."""
    return compiled_ops("cpu")


def cuda_kernel_ops() -> SimpleNamespace | None:
    """The compiled CUDA ops for this process's GPU (see `compiled_ops`)."""
    return compiled_ops("cuda")


def _kernel_ops_for(device: torch.device, head_size: int) -> SimpleNamespace | None:
    """The compiled ops for inputs on `device` with this head size, or None when the torch op must run."""
    if wkv6_backend() == "torch":
        return None
    if device.type == "cpu":
        return cpu_kernel_ops()
    # ROCm also reports "cuda" tensors; the kernel is CUDA C++ only
    if device.type == "cuda" and torch.version.hip is None and head_size in CUDA_HEAD_SIZES:
        return cuda_kernel_ops()
    return None


def kernel_available(device: torch.device | str = "cpu", head_size: int = 64) -> bool:
    """Whether `wkv6_compiled` runs a compiled kernel for tensors on `device` (builds it if needed)."""
    return _kernel_ops_for(torch.device(device), head_size) is not None


class WKV6KernelFunction(torch.autograd.Function):
    """Autograd around a compiled forward / backward pair (the backward recomputes the states: O(1) memory)."""

    @staticmethod
    def forward(ctx, ops, r, k, v, w, u, initial_state):
        y, state = ops.forward(r, k, v, w, u, initial_state)
        ctx.ops = ops
        ctx.save_for_backward(r, k, v, w, u, initial_state)
        ctx.set_materialize_grads(False)
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        r, k, v, w, u, initial_state = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros(r.shape, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32,
                                 device=r.device)
        dr, dk, dv, dw, du, d_initial = ctx.ops.backward(r, k, v, w, u, initial_state, grad_y, grad_state)
        return None, dr, dk, dv, dw, du, (d_initial if initial_state is not None else None)


def wkv6_compiled(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV6 through the compiled kernel for r's device where there is one, else the torch op; same contract as
    `ops.wkv6`."""
    ops = _kernel_ops_for(r.device, r.shape[-1])
    if ops is None:
        return wkv6(r, k, v, w, u, initial_state=initial_state, chunk_size=chunk_size)
    _check_inputs(r, k, v, w, u, initial_state)
    return WKV6KernelFunction.apply(ops, r, k, v, w, u, initial_state)


@use_kernel_forward_from_hub("WKV6")
class WKV6(nn.Module):
    """The WKV6 recurrence as a stateless layer, so `kernels.kernelize` can swap its forward per device and mode."""

    def forward(
        self,
        r: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        w: torch.Tensor,
        u: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        chunk_size: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv6_compiled(r, k, v, w, u, initial_state, chunk_size)


class _WKV6FallbackIsTheKernel(logging.Filter):
    """
    Drops kernels' "No kernel mapping found for layer `WKV6`" warning. transformers kernelizes every model it loads
    and again at each train() / eval(), with its own mapping, which has no WKV6 entry; the "original forward" kernels
    then falls back to is `wkv6_compiled`, the fastest path there is, so the warning would report a problem that does
    not exist. (transformers filters the same record for layers of its own that dispatch themselves.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith("No kernel mapping found for layer `WKV6`.")


logging.getLogger("kernels._internals.layer.layer").addFilter(_WKV6FallbackIsTheKernel())


def wkv6_kernel_mapping(cuda_repository=None) -> dict:
    """The `kernels` mapping of the "WKV6" layer, for inference and training: the local builds on the CPU and on
    CUDA, or for CUDA the given repository instead (a `kernels.LayerRepository` of a kernel-builder build of
    csrc/wkv6, or a `LocalLayerRepository`)."""
    local = LocalLayerRepository(repo_path=LOCAL_KERNEL_REPOSITORY, layer_name="WKV6")
    cuda = local if cuda_repository is None else cuda_repository
    return {
        "WKV6": {
            "cpu": {Mode.INFERENCE: local, Mode.TRAINING: local},
            "cuda": {Mode.INFERENCE: cuda, Mode.TRAINING: cuda},
        }
    }


def register_wkv6_kernels(cuda_repository=None) -> None:
    """Register `wkv6_kernel_mapping` globally, for `kernels.kernelize(model, device=..., mode=...)`."""
    register_kernel_mapping(wkv6_kernel_mapping(cuda_repository))


def _build_cuda_ops() -> SimpleNamespace:
    """Build (nvcc, for this process's GPU architecture; cached like the CPU build) and load the CUDA kernel."""
    from torch.utils.cpp_extension import load

    cuda = KERNEL_SOURCES / "wkv6_cuda"
    sources = [cuda / "wkv6_cuda.cu", cuda / "wkv6_chunked.cu", cuda / "wkv6_chunked_op.cu",
               KERNEL_SOURCES / "torch-ext" / "torch_binding.cpp"]
    flags = ["-O3", "-DCUDA_KERNEL"]
    capability = "sm_{}{}".format(*torch.cuda.get_device_capability())
    digest = hashlib.sha256(" ".join(flags + [torch.__version__, str(torch.version.cuda), capability]).encode())
    for source in sources + [cuda / "wkv6_cuda.h", cuda / "wkv6_chunked.h", cuda / "wkv6_chunked_op.h"]:
        digest.update(source.read_bytes())
    name = f"visualrwkv_wkv6_cuda_{capability}_{digest.hexdigest()[:12]}"
    load(
        name=name,
        sources=[str(path) for path in sources],
        extra_cflags=flags,
        extra_cuda_cflags=["-O3", "--use_fast_math", "-DCUDA_KERNEL"],
        is_python_module=False,
        verbose=False,
    )
    namespace = getattr(torch.ops, name)
    return SimpleNamespace(forward=namespace.forward, backward=namespace.backward)
