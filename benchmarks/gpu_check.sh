#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: build the CUDA WKV6 kernel (nvcc through torch.utils.cpp_extension, for
# this GPU's architecture, cached), run the CUDA tests, then benchmarks/bench_wkv6_cuda.py (extra arguments go to it):
# our kernel vs the chunked torch form (and fla's chunk_rwkv6 when importable) and a 12 x 768 model with and without
# the kernel.
# Usage: bash benchmarks/gpu_check.sh [benchmark arguments]   (from the repository root; PYTHON overrides the
# interpreter). Exit status 1 if the build, a test or the benchmark failed; every stage runs regardless.
set -uo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1
# build() raises with nvcc's full output, where a call of the op would only warn and run torch
"$PYTHON" - <<'PY' || exit 1
import time

import torch

from visualrwkv_hf.ops import wkv6_compiled

start = time.perf_counter()
wkv6_compiled.build("cuda")
print(f"{torch.cuda.get_device_name()}: CUDA WKV6 kernel built and loaded in {time.perf_counter() - start:.0f} s")
PY
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_kernels.py -k cuda || status=1
"$PYTHON" benchmarks/bench_wkv6_cuda.py "$@" || status=1
# WKV7: the CUDA kernel's build (raising with nvcc's output), its tests against the float64 reference (not the nvcc
# compile check: the build covers it) and kernel vs chunked torch form at the op level
"$PYTHON" -c "from visualrwkv_hf.ops import wkv7_compiled; wkv7_compiled.build('cuda'); print('CUDA WKV7 kernel built')" \
  || status=1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_wkv7.py -k "cuda and not nvcc" || status=1
"$PYTHON" benchmarks/bench_wkv7.py --device cuda --forms kernel chunked --lengths 512 4096 --heads 32 || status=1
exit $status
