"""The WKV7 forms side by side: the compiled kernel, the chunked torch form and autograd through the step form.

Usage: python benchmarks/bench_wkv7.py [--lengths 512 2048] [--heads 4 8] [--threads 1 2] [--repeats 3]
       [--device cpu|cuda] [--forms kernel chunked step]
Op level, B=1, N=64, RWKV-7 inputs (a = -kk, b = kk * iclr, w = -softplus(-x) - 0.5): forward (no grad) and
forward+backward of `wkv7_compiled` (csrc/wkv7: the CPU or CUDA kernel; the first run builds it unless it is cached),
`wkv7_chunked` (hand-written backward) and `wkv7_recurrent` (autograd through the step loop), for each thread count.
Every number is the minimum over --repeats rounds in which the forms take turns (the machine may be shared; the step
form's backward, seconds per run, gets half the rounds); ratios are "other form's time / kernel time".
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_wkv6_kernels import forward_backward, forward_only, min_seconds  # benchmarks/ is on the path
from visualrwkv_hf.ops import wkv7_chunked, wkv7_compiled, wkv7_recurrent

FORMS = {"kernel": wkv7_compiled, "chunked": wkv7_chunked, "step": wkv7_recurrent}


def op_inputs(T: int, heads: int, head_size: int = 64, device: str = "cpu", batch: int = 1,
              seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, T, heads, head_size)
    r, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    # a fixed decay per channel across RWKV-7's range, as in trained checkpoints
    x = (-8 + 14 * torch.rand(heads, head_size, generator=g)).expand(*shape)
    w = -F.softplus(-x) - 0.5
    kk = F.normalize(torch.randn(*shape, generator=g), dim=-1)
    iclr = torch.rand(*shape, generator=g)
    return [t.to(device) for t in (r, w, k, v, -kk, kk * iclr)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    args = parser.parse_args()
    forms = {name: FORMS[name] for name in args.forms}
    others = [name for name in forms if name != "kernel"]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {device_name}; B=1 N=64 fp32, ms (min of runs); ratio = form / kernel")
    print(
        f"{'threads':>7} {'H':>3} {'T':>6} {'pass':>9} " + " ".join(f"{name:>9}" for name in forms)
        + "".join(f" {name + '/k':>10}" for name in others if "kernel" in forms)
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        for heads in args.heads:
            for T in args.lengths:
                inputs = op_inputs(T, heads, device=args.device)
                with torch.no_grad():
                    outputs = {name: form(*inputs)[0] for name, form in forms.items()}
                y_ref = next(iter(outputs.values()))
                error = max(((y - y_ref).abs().max() / y_ref.abs().max()).item() for y in outputs.values())
                leaves = [x.clone().requires_grad_() for x in inputs]
                for label, run, tensors in (("forward", forward_only, inputs), ("fwd+bwd", forward_backward, leaves)):
                    times = min_seconds(
                        {name: (lambda f=form: (run(f, tensors), sync())) for name, form in forms.items()},
                        args.repeats,
                        rounds_of={"step": max(1, args.repeats // 2)},
                    )
                    ratios = "".join(f" {times[name] / times['kernel']:>9.1f}x" for name in others if "kernel" in forms)
                    print(
                        f"{threads:>7} {heads:>3} {T:>6} {label:>9} "
                        + " ".join(f"{times[name] * 1e3:>9.1f}" for name in forms) + ratios
                    )
                print(f"{'':>7} {'':>3} {T:>6} outputs agree to {error:.1e} of the largest")


if __name__ == "__main__":
    main()
