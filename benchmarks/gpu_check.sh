#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: build the CUDA WKV6 kernel (nvcc via torch.utils.cpp_extension, cached),
# run the CUDA tests, then time forward+backward at B=1, H=32, N=64, T=4096, bf16: our kernel vs the package's
# chunked torch form (and fla's chunk_rwkv6 when it is importable).
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; PYTHON overrides the interpreter)
set -euo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
"$PYTHON" -c "from visualrwkv_hf.ops.kernels import build_cuda_kernel_ops; build_cuda_kernel_ops(); print('built')"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_kernels.py -k cuda
"$PYTHON" - <<'PY'
import torch

from visualrwkv_hf.ops import wkv6_chunked
from visualrwkv_hf.ops.kernels import WKV6KernelFunction, build_cuda_kernel_ops

ops = build_cuda_kernel_ops()
B, T, H, N = 1, 4096, 32, 64
g = torch.Generator(device="cuda").manual_seed(0)
r, k, v = (torch.randn(B, T, H, N, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
w = (-6 + 7 * torch.rand(H, N, device="cuda", generator=g)).expand(B, T, H, N).to(torch.bfloat16).contiguous()
u = torch.randn(H, N, device="cuda", generator=g, dtype=torch.bfloat16)

forms = {
    "ours (CUDA kernel)": lambda *x: WKV6KernelFunction.apply(ops, *x, None),
    "chunked torch": lambda *x: wkv6_chunked(*x),
}
try:
    from fla.ops.rwkv6 import chunk_rwkv6

    def fla_form(r, k, v, w, u):
        # fla: (B, T, H, N) with head_first=False, log-decay input, no K^-0.5 scaling
        return chunk_rwkv6(r, k, v, -torch.exp(w.float()).to(r.dtype), u, scale=1.0, output_final_state=True)

    forms["fla chunk_rwkv6"] = fla_form
except ImportError:
    print("fla not importable: compared with the chunked torch form only")


def fwd_bwd(form):
    leaves = [x.clone().requires_grad_() for x in (r, k, v, w, u)]
    y, state = form(*leaves)
    (y.float().sum() + state.float().sum()).backward()


for name, form in forms.items():
    fwd_bwd(form)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start.record()
        fwd_bwd(form)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    print(f"{name:>20}: forward+backward T={T} bf16 {best:8.2f} ms (min of 5)")
PY
