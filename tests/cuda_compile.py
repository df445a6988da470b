"""Test helpers: compile the CUDA sources with nvcc where there is no GPU, and check that every kernel launcher a
torch-facing source calls is defined by the kernel source (a dispatch over a dtype without a kernel links, then
fails to load with an undefined symbol)."""

import shutil
import subprocess
from pathlib import Path

NVCC = shutil.which("nvcc") or next(
    (p for p in ["/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"] if Path(p).exists()), None
)
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80"]


def compile_torch_source(source: Path, output: Path, scratch: Path) -> subprocess.CompletedProcess:
    """nvcc -c of a source that includes torch (every dtype and head size, for sm_80), with the flags torch's
    extension builder adds."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = include_paths("cpu")
    # a CPU-only torch ships c10/cuda's headers but not the one its CUDA build generates, which defines one macro
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = scratch / "include" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(scratch / "include"))
    command = [
        NVCC, "-std=c++17", "-O3", "--use_fast_math", "-DCUDA_KERNEL", *COMMON_NVCC_FLAGS, *ARCH_FLAGS,
        "-Xcompiler", "-fPIC", *(f"-I{p}" for p in includes), "-c", str(source), "-o", str(output),
    ]
    return subprocess.run(command, capture_output=True, text=True)


def undefined_launchers(op_source: Path, kernel_source: Path, namespace: str, scratch: Path) -> set[str]:
    """The launchers of `namespace` that the compiled `op_source` calls and the compiled `kernel_source` does not
    define (empty when all are there); raises if either does not compile or the op calls none."""
    op_object, kernel_object = scratch / "op.o", scratch / "kernel.o"
    result = compile_torch_source(op_source, op_object, scratch)
    assert result.returncode == 0, result.stderr[-4000:]
    kernel = [NVCC, "-std=c++17", "-O3", *ARCH_FLAGS, "-Xcompiler", "-fPIC", "-c", str(kernel_source),
              "-o", str(kernel_object)]
    result = subprocess.run(kernel, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    mangled = f"{len(namespace)}{namespace}"

    def symbols(path: Path, flag: str) -> set[str]:  # the mangled names (the last field of nm's lines)
        listing = subprocess.run(["nm", flag, str(path)], capture_output=True, text=True, check=True)
        return {line.split()[-1] for line in listing.stdout.splitlines()
                if mangled in line and "6detail" not in line}

    needed = symbols(op_object, "--undefined-only")
    assert needed, f"{op_source.name} calls no {namespace} launcher"
    return needed - symbols(kernel_object, "--defined-only")
