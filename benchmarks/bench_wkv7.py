"""The chunked WKV7 torch form against autograd through the step form (fp32, CPU), side by side.

Usage: python benchmarks/bench_wkv7.py [--lengths 512 2048] [--heads 4 8] [--threads 1 2] [--repeats 3]
Op level, B=1, N=64, RWKV-7 inputs (a = -kk, b = kk * iclr, w = -softplus(-x) - 0.5): forward (no grad) and
forward+backward of `wkv7_chunked` (hand-written backward) and `wkv7_recurrent` (autograd through the step loop),
for each thread count. Every number is the minimum over --repeats rounds in which the two take turns (the machine
may be shared; the step form's backward, seconds per run, gets half the rounds); ratio = step time / chunked time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_wkv6_kernels import forward_backward, forward_only, min_seconds  # benchmarks/ is on the path
from visualrwkv_hf.ops import wkv7_chunked, wkv7_recurrent

FORMS = {"chunked": wkv7_chunked, "step": wkv7_recurrent}


def op_inputs(T: int, heads: int, head_size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (1, T, heads, head_size)
    r, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    # a fixed decay per channel across RWKV-7's range, as in trained checkpoints
    x = (-8 + 14 * torch.rand(heads, head_size, generator=g)).expand(*shape)
    w = -F.softplus(-x) - 0.5
    kk = F.normalize(torch.randn(*shape, generator=g), dim=-1)
    iclr = torch.rand(*shape, generator=g)
    return [r, w, k, v, -kk, kk * iclr]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; B=1 N=64 fp32, ms (min of runs); ratio = step / chunked")
    print(f"{'threads':>7} {'H':>3} {'T':>6} {'pass':>9} {'chunked':>9} {'step':>9} {'ratio':>7}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for heads in args.heads:
            for T in args.lengths:
                inputs = op_inputs(T, heads)
                with torch.no_grad():
                    (y_chunked, _), (y_step, _) = wkv7_chunked(*inputs), wkv7_recurrent(*inputs)
                error = ((y_chunked - y_step).abs().max() / y_step.abs().max()).item()
                leaves = [x.clone().requires_grad_() for x in inputs]
                for label, run, tensors in (("forward", forward_only, inputs), ("fwd+bwd", forward_backward, leaves)):
                    times = min_seconds(
                        {name: (lambda f=form: run(f, tensors)) for name, form in FORMS.items()},
                        args.repeats,
                        rounds_of={"step": max(1, args.repeats // 2)},
                    )
                    print(
                        f"{threads:>7} {heads:>3} {T:>6} {label:>9} {times['chunked'] * 1e3:>9.1f} "
                        f"{times['step'] * 1e3:>9.1f} {times['step'] / times['chunked']:>6.1f}x"
                    )
                print(f"{'':>7} {'':>3} {T:>6} max |y_chunked - y_step| / max |y_step| = {error:.1e}")


if __name__ == "__main__":
    main()
