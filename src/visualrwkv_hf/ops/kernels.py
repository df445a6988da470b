"""Compiled ops: the C++ / CUDA kernels of csrc/, built on this machine at first use, behind one switch, one autograd
wrapper and one build helper; `kernels.kernelize` is the way to swap in another build.

How an op registers. Its folder csrc/<op>/ holds the kernels and a binding (torch-ext/torch_binding.cpp) that defines,
in the library TORCH_EXTENSION_NAME, for tensor inputs x1..xn and an optional state:

    forward(Tensor x1, .., Tensor xn, Tensor? initial_state) -> (Tensor y, Tensor final_state)
    backward(Tensor x1, .., Tensor xn, Tensor? initial_state, Tensor grad_y, Tensor? grad_final_state)
        -> (Tensor grad_x1, .., Tensor grad_xn, Tensor grad_initial_state)

with the CPU implementation compiled under -DCPU_KERNEL and the CUDA one under -DCUDA_KERNEL (what kernel-builder
defines for a Hub build of the same folder). The op's Python module then declares a `CompiledOp` with its sources
(paths under csrc/), its torch fallback (whose parameters are x1..xn, `initial_state`, then options with defaults that
only the fallback takes) and the name of the layer the model calls it through:

    wkv6_compiled = CompiledOp(
        "wkv6",
        sources={"cpu": ["wkv6/wkv6_cpu/wkv6_cpu.cpp", BINDING], "cuda": ["wkv6/wkv6_cuda/wkv6_cuda.cu", BINDING]},
        headers=["wkv6/wkv6_checks.h", "wkv6/wkv6_cpu/wkv6_cpu.h", "wkv6/wkv6_cuda/wkv6_cuda.h"],
        fallback=wkv6, check_inputs=_check_inputs, layer_name="WKV6", cuda_head_sizes=(16, 24, 32, 64, 128),
    )

    @use_kernel_forward_from_hub("WKV6")
    class WKV6(nn.Module):
        def forward(self, r, k, v, w, u, initial_state=None, chunk_size=16):
            return wkv6_compiled(r, k, v, w, u, initial_state, chunk_size=chunk_size)

Calling the `CompiledOp` runs the kernel for the inputs' device through `KernelFunction` (autograd: the backward
recomputes what it needs from the saved inputs), or the fallback where there is no kernel: another device, a CUDA head
size outside `cuda_head_sizes`, no compiler, a failed build, or the switch set to "torch". Everything else (build,
cache, the switch, shipping the sources in remote-code folders) is shared by every registered op.

An inference-only op (`differentiable=False`, the decode linear of `linear.py`) has no state and no backward: its
binding defines only `forward(Tensor x1, .., Tensor? xn) -> Tensor y`, its fallback's parameters are x1..xn, and it
is called directly by its layer (`layer_name=None`: not a `kernels` layer). Its kernel runs where no gradient is
needed (grad mode off, or no input requiring one), the fallback otherwise.

Switch: VISUALRWKV_WKV_BACKEND=torch (or `set_wkv_backend("torch")`) makes every compiled op (the decode linear
too) run its fallback and never build; "auto" (the default) uses a kernel where there is one.

Build (`CompiledOp.build`): the sources are written into a folder of the torch extensions cache (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions) named after the op, the device type, the ISA or GPU architecture and a hash of the
flags, the sources and the torch and Python versions, and compiled there with `torch.utils.cpp_extension.load`: CPU
~60 s, CUDA ~1-2 min with nvcc for the current GPU's architecture, once per machine; afterwards the library loads in
~0.2 s, without a compiler. CPU: -fopenmp is required (without it at::parallel_for runs on one thread); -mavx2 -mfma
(and AVX-512) are added only when this CPU has them, never -march=native. Nothing is built at import time. Without the
tools (a C++ compiler and ninja; nvcc for CUDA) the fallback runs without a word (logged at INFO); a build that fails
with the tools present warns once.

Extension point: the layer is declared with `use_kernel_forward_from_hub`, so `kernels.kernelize(model, device=...,
mode=...)` replaces its forward from a registered mapping; `CompiledOp.repository()` is such a repository, for the
local build or (`repo_id=`) a kernel-builder build of csrc/<op>/ on the Hub, run through the same autograd wrapper:

    from kernels import Mode, kernelize, register_kernel_mapping
    register_kernel_mapping({"WKV6": {"cuda": wkv6_compiled.repository("<org>/wkv6")}})
    kernelize(model, device="cuda", mode=Mode.TRAINING)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import shlex
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKEND_ENV = "VISUALRWKV_WKV_BACKEND"
BACKENDS = ("auto", "torch")
# csrc/ ships inside the package (a link in the source tree, real files in a wheel)
CSRC = Path(__file__).resolve().parent / "csrc"
# csrc/ files by path, for copies of this module without a csrc/ folder beside them: `remote_code` fills it in the
# copy it writes into a saved folder, because transformers copies only a folder's Python files into its modules cache
EMBEDDED_SOURCES: dict[str, str] = {}
# the binding every op's folder has, relative to csrc/<op>/
BINDING = "torch-ext/torch_binding.cpp"

AVX512_FEATURES = ("avx512f", "avx512vl", "avx512bw", "avx512dq")

_backend_override: str | None = None
# every CompiledOp by name: what remote code ships, and the layers whose missing `kernels` mapping is no problem
COMPILED_OPS: dict[str, CompiledOp] = {}


def set_wkv_backend(backend: str | None) -> None:
    """Force the backend of every compiled op for this process: "torch" (never compile), "auto", or None (back to
    the VISUALRWKV_WKV_BACKEND variable)."""
    global _backend_override
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"The WKV backend must be one of {BACKENDS} or None, got {backend!r}.")
    _backend_override = backend


def wkv_backend() -> str:
    """The backend in force: the `set_wkv_backend` override, else VISUALRWKV_WKV_BACKEND, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}.")
    return backend


def read_source(path: str) -> str:
    """A file of csrc/ by its path there (from `EMBEDDED_SOURCES` in a remote-code copy)."""
    if EMBEDDED_SOURCES:
        return EMBEDDED_SOURCES[path]
    return (CSRC / path).read_text(encoding="utf-8")


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
    """Compiler flags of a CPU build: a baseline ISA this CPU has, never -march=native (a cached build may move)."""
    # -fno-trapping-math lets the clamps in the decay's exp vectorise (nothing here enables FP exceptions)
    flags = ["-O3", "-fno-trapping-math", "-fopenmp", "-DCPU_KERNEL"]
    if _cpu_has("avx2", "fma"):
        flags += ["-mavx2", "-mfma"]
        # the scans' register tiles use 512-bit vectors where the CPU has them (about 1.8x the AVX2 speed)
        if _cpu_has(*AVX512_FEATURES):
            flags += [f"-m{feature}" for feature in AVX512_FEATURES]
    return flags


def _missing_build_tool(device_type: str) -> str | None:
    """What this machine lacks to build for `device_type`, or None when it has the tools."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    compiler = shlex.split(os.environ.get("CXX", "c++"))[0]
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler})"
    if not is_ninja_available():
        return "no ninja"
    if device_type == "cuda" and CUDA_HOME is None:
        return "no CUDA toolkit (nvcc)"
    return None


class MissingBuildTool(RuntimeError):
    """This machine lacks a tool a build needs (a compiler, ninja, nvcc): the fallback runs without a warning."""


class KernelFunction(torch.autograd.Function):
    """Autograd around a compiled op's forward / backward pair: saves the inputs (the backward recomputes the states
    from them: O(1) memory), and gives the backward a zero output gradient where only the final state reached the
    loss, in the output's dtype."""

    @staticmethod
    def forward(ctx, ops, *inputs):
        y, state = ops.forward(*inputs)
        ctx.ops = ops
        ctx.y_meta = (y.shape, y.dtype, y.device)
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        inputs = ctx.saved_tensors
        if grad_y is None:
            shape, dtype, device = ctx.y_meta
            grad_y = torch.zeros(shape, dtype=dtype, device=device)
        *grads, grad_initial_state = ctx.ops.backward(*inputs, grad_y, grad_state)
        # the schema always returns an initial-state gradient; there is none to give without an initial state
        return None, *grads, (grad_initial_state if inputs[-1] is not None else None)


class CompiledOp:
    """
    A compiled op: its csrc/ sources per device type, built at first use, and its torch fallback (see the module
    docstring for the contract). Calling it runs the kernel with autograd, or the fallback.

    Args:
        name: the op's name, part of the build's name (`"wkv6"`).
        sources: per device type ("cpu", "cuda"), the files to compile, as paths under csrc/.
        headers: the files they include, as paths under csrc/ (written beside them and hashed, not compiled).
        fallback: the torch op; its parameters are the kernel's tensor inputs, `initial_state`, then options (only
            the tensor inputs for an op that is not differentiable).
        check_inputs: raises a readable error for inputs the kernel would reject (called with the tensor inputs and
            the initial state before the kernel runs).
        layer_name: the `use_kernel_forward_from_hub` name of the layer that calls the op; None for an op its layer
            calls directly.
        cuda_head_sizes: head sizes (the inputs' last dimension) the CUDA kernel is instantiated for.
        differentiable: False for an inference-only op: no state, no backward (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        *,
        sources: dict[str, list[str]],
        headers: list[str],
        fallback: Callable,
        check_inputs: Callable,
        layer_name: str | None,
        cuda_head_sizes: tuple[int, ...] = (),
        differentiable: bool = True,
    ):
        if name in COMPILED_OPS:
            raise ValueError(f"A compiled op named {name!r} is already registered.")
        self.name, self.sources, self.headers = name, sources, headers
        self.fallback, self.check_inputs, self.layer_name = fallback, check_inputs, layer_name
        self.cuda_head_sizes, self.differentiable = cuda_head_sizes, differentiable
        self.signature = inspect.signature(fallback)
        parameters = list(self.signature.parameters)
        self.num_inputs = parameters.index("initial_state") + 1 if differentiable else len(parameters)
        # per device type: the loaded ops, or None once this process knows it has no kernel there
        self._loaded: dict[str, SimpleNamespace | None] = {}
        self._lock = threading.Lock()
        COMPILED_OPS[name] = self

    def files(self) -> list[str]:
        """Every csrc/ file of the op, sources and headers."""
        return sorted({*self.headers, *(path for paths in self.sources.values() for path in paths)})

    def _build_settings(self, device_type: str, cflags: list[str] | None) -> dict:
        if device_type == "cpu":
            cflags = cpu_build_flags() if cflags is None else cflags
            tag = "avx512" if "-mavx512f" in cflags else "avx2" if "-mavx2" in cflags else "base"
            return {"tag": tag, "extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}
        flags = ["-O3", "-DCUDA_KERNEL"] if cflags is None else cflags
        # torch.utils.cpp_extension compiles for this GPU's architecture: part of the name
        tag = "sm_{}{}".format(*torch.cuda.get_device_capability())
        return {"tag": tag, "extra_cflags": flags, "extra_cuda_cflags": [*flags, "--use_fast_math"]}

    def extension_name(self, device_type: str, cflags: list[str] | None = None) -> str:
        """The build's name (its cache folder and torch.ops namespace): op, device type, ISA or GPU architecture, and
        a hash of the flags, the sources and the torch, CUDA and Python versions."""
        settings = self._build_settings(device_type, cflags)
        versions = [torch.__version__, str(torch.version.cuda), "py{}{}".format(*sys.version_info[:2])]
        digest = hashlib.sha256(repr(sorted(settings.items()) + versions).encode())
        for path in self.files():
            digest.update(path.encode() + b"\0" + read_source(path).encode())
        return f"visualrwkv_{self.name}_{device_type}_{settings['tag']}_{digest.hexdigest()[:12]}"

    def build(self, device_type: str, cflags: list[str] | None = None) -> SimpleNamespace:
        """Build (or load from the cache) the kernel for "cpu" or "cuda", with `cflags` instead of this machine's
        default flags if given; returns its `forward` and `backward` ops (backward None for an op that is not
        differentiable). Raises if the build fails."""
        from torch.utils.cpp_extension import LIB_EXT, get_default_build_root, load

        name = self.extension_name(device_type, cflags)
        settings = self._build_settings(device_type, cflags)
        settings.pop("tag")
        folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        library = folder / f"{name}{LIB_EXT}"
        if library.is_file():
            # the name carries every input of the build, so a library of that name is this build
            torch.ops.load_library(str(library))
        elif (missing := _missing_build_tool(device_type)) is not None:
            raise MissingBuildTool(f"{missing}, so the {self.name} {device_type.upper()} kernel cannot be built")
        else:
            # the sources go into the build's own folder: a copy in a remote-code folder builds from the same
            # paths as the package, so either finds the other's build
            for path in self.files():
                target = folder / "src" / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(read_source(path), encoding="utf-8")
            # is_python_module=False: the library registers torch.ops.<name>.forward / backward, as a Hub build does
            load(
                name=name,
                sources=[str(folder / "src" / path) for path in self.sources[device_type]],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
                **settings,
            )
        namespace = getattr(torch.ops, name)
        return SimpleNamespace(forward=namespace.forward,
                               backward=namespace.backward if self.differentiable else None)

    def _ops(self, device_type: str) -> SimpleNamespace | None:
        """The kernel for "cpu" or "cuda", built on first call; None where there is none (see the module docstring)."""
        if device_type in self._loaded:
            return self._loaded[device_type]
        with self._lock:
            if device_type not in self._loaded:
                self._loaded[device_type] = self._load(device_type)
        return self._loaded[device_type]

    def _load(self, device_type: str) -> SimpleNamespace | None:
        try:
            return self.build(device_type)
        except MissingBuildTool as error:  # nothing is wrong: this machine just cannot compile
            logger.info("%s; using the torch op.", error)
            return None
        except Exception as error:  # a compiler that fails is worth one warning
            message = str(error).strip()
            warnings.warn(
                f"visualrwkv_hf: the compiled {self.name.upper()} {device_type.upper()} kernel could not be built "
                f"({type(error).__name__}: {message.splitlines()[-1] if message else ''}); using the torch "
                f"implementation (slower). Set {BACKEND_ENV}=torch to skip the build attempt.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    def kernel_for(self, device: torch.device | str, head_size: int) -> SimpleNamespace | None:
        """The local build for inputs on `device` with this head size (built if needed), or None when the fallback
        must run: the switch says "torch", no kernel for the device or head size, or no build."""
        device = torch.device(device)
        if wkv_backend() == "torch":
            return None
        if device.type == "cpu":
            return self._ops("cpu")
        # ROCm also reports "cuda" tensors; the kernels are CUDA C++ only
        if device.type == "cuda" and torch.version.hip is None and head_size in self.cuda_head_sizes:
            return self._ops("cuda")
        return None

    def available(self, device: torch.device | str = "cpu", head_size: int = 64) -> bool:
        """Whether a call with inputs on `device` and this head size runs a kernel (builds it if needed)."""
        return self.kernel_for(device, head_size) is not None

    def run(self, kernel_for: Callable, args: tuple, kwargs: dict):
        """The op with the kernel `kernel_for(device, head_size)` gives, or the fallback where it gives None."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.values())
        inputs = values[: self.num_inputs]
        ops = kernel_for(inputs[0].device, inputs[0].shape[-1])
        if not self.differentiable and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in inputs
        ):
            ops = None  # no backward: autograd goes through the fallback
        if ops is None:
            return self.fallback(*bound.args, **bound.kwargs)
        self.check_inputs(*inputs)
        if not self.differentiable:
            return ops.forward(*inputs)
        return KernelFunction.apply(ops, *inputs)

    def __call__(self, *args, **kwargs):
        """The op: the fallback's signature, the kernel where there is one."""
        return self.run(self.kernel_for, args, kwargs)

    def repository(self, repo_id: str | None = None, revision: str | None = None) -> KernelRepository:
        """A `kernels` repository for the op's layer: the local build, or a kernel-builder build on the Hub."""
        if self.layer_name is None:
            raise ValueError(f"The {self.name} op has no `kernels` layer; its layer calls the op directly.")
        return KernelRepository(self, repo_id, revision)


class KernelRepository:
    """
    A repository for `kernels.register_kernel_mapping` / `use_kernel_mapping`: its layer runs a `CompiledOp` through
    `KernelFunction` with the local build for the inputs' device (`repo_id` None), or with the ops of a kernel-builder
    build of the op's csrc/ folder on the Hub, loaded with `kernels.get_kernel(repo_id, revision=revision)`. Inputs
    that build has no kernel for (another device, a CUDA head size outside the op's) run the fallback.
    """

    def __init__(self, op: CompiledOp, repo_id: str | None = None, revision: str | None = None):
        self.op, self.repo_id, self.revision = op, repo_id, revision

    def _hub_kernel_for(self) -> Callable:
        # imported by name when called: only Hub builds need `kernels`, and transformers' remote-code loader would
        # require every package a copied module imports with an import statement
        get_kernel = importlib.import_module("kernels").get_kernel
        ops = get_kernel(self.repo_id, revision=self.revision).ops
        hub = SimpleNamespace(forward=ops.forward, backward=ops.backward)

        def kernel_for(device: torch.device, head_size: int) -> SimpleNamespace | None:
            supported = device.type == "cpu" or (device.type == "cuda" and head_size in self.op.cuda_head_sizes)
            return hub if supported else None

        return kernel_for

    def load(self) -> type[nn.Module]:
        op = self.op
        kernel_for = op.kernel_for if self.repo_id is None else self._hub_kernel_for()

        def forward(module, *args, **kwargs):
            return op.run(kernel_for, args, kwargs)

        # `kernels` checks that the layer's forward takes what the replaced one takes
        forward.__signature__ = op.signature.replace(
            parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                        *op.signature.parameters.values()]
        )
        # can_torch_compile: the ops have no fake (meta) implementation
        return type(op.layer_name, (nn.Module,), {"forward": forward, "has_backward": True,
                                                   "can_torch_compile": False})

    def __eq__(self, other) -> bool:
        return isinstance(other, KernelRepository) and (self.op, self.repo_id, self.revision) == (
            other.op, other.repo_id, other.revision
        )

    def __hash__(self) -> int:
        return hash((self.op.name, self.repo_id, self.revision))

    def __str__(self) -> str:
        source = "the local build" if self.repo_id is None else f"`{self.repo_id}` (revision {self.revision})"
        return f"{self.op.name} from {source}"


class _CompiledLayersNeedNoMapping(logging.Filter):
    """
    Drops kernels' "No kernel mapping found for layer `<name>`" warning for the compiled ops' layers. transformers
    kernelizes every model it loads and again at each train() / eval(), with its own mapping, which has no entry for
    them; the "original forward" kernels then falls back to runs the local build, the fastest path there is, so the
    warning would report a problem that does not exist. (transformers filters the same record for layers of its own
    that dispatch themselves.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip()
        return not any(message.startswith(f"No kernel mapping found for layer `{op.layer_name}`.")
                       for op in COMPILED_OPS.values())


logging.getLogger("kernels._internals.layer.layer").addFilter(_CompiledLayersNeedNoMapping())
