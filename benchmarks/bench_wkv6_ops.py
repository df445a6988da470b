"""WKV6 op benchmark: step form vs chunked form, prefill (forward) and forward+backward, fp32 on the CPU.

Usage: python benchmarks/bench_wkv6_ops.py [--lengths 512 2048] [--repeats 3]
Prints, per length, the minimum over repeats of each measurement and the chunked/step speed-up.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from visualrwkv_hf.ops import wkv6_chunked, wkv6_recurrent


def min_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator and thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_inputs(T: int, heads: int, head_size: int):
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(1, T, heads, head_size, generator=g) for _ in range(3))
    # per-channel decays in the range trained checkpoints use
    w = (-6 + 7 * torch.rand(heads, head_size, generator=g)).expand(1, T, heads, head_size).contiguous()
    u = torch.randn(heads, head_size, generator=g)
    return r, k, v, w, u


def forward(form, inputs):
    with torch.no_grad():
        form(*inputs)


def forward_backward(form, inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    y, state = form(*leaves)
    (y.sum() + state.sum()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"B=1 H={args.heads} N={args.head_size} fp32, {torch.get_num_threads()} threads, min of {args.repeats} runs")
    header = f"{'T':>6} {'form':>10} {'prefill tok/s':>14} {'fwd ms':>9} {'fwd+bwd ms':>11}"
    print(header)
    print("-" * len(header))
    for T in args.lengths:
        inputs = make_inputs(T, args.heads, args.head_size)
        results = {}
        for name, form in (("step", wkv6_recurrent), ("chunked", wkv6_chunked)):
            fwd = min_seconds(lambda: forward(form, inputs), args.repeats)
            fwd_bwd = min_seconds(lambda: forward_backward(form, inputs), args.repeats)
            results[name] = (fwd, fwd_bwd)
            print(f"{T:>6} {name:>10} {T / fwd:>14,.0f} {1e3 * fwd:>9.1f} {1e3 * fwd_bwd:>11.1f}")
        (step_fwd, step_fb), (chunk_fwd, chunk_fb) = results["step"], results["chunked"]
        print(f"{T:>6} {'speed-up':>10} {step_fwd / chunk_fwd:>13.2f}x {'':>9} {step_fb / chunk_fb:>10.2f}x")


if __name__ == "__main__":
    main()
