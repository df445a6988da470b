"""RWKV-6 logit error of bfloat16 and float16 inference against float32, with and without the float16 guard.

Run: .venv/bin/python benchmarks/bench_precision.py [--layers 12] [--width 768] [--length 16384] [--window 256]

One random model of a released shape (`build_model` of bench_rwkv6_lm.py: random data-dependent LoRAs, spread
decays; vocab 65536) runs one prompt of --length random tokens in float32 (the reference), bfloat16, float16 with
the overflow guard (`rescale_every`, the config default 6) and float16 without it (`rescale_every=0`). For each, the
logits of --window positions ending at 4K and at --length tokens are compared with float32's: max and mean absolute
error, relative error (mean absolute error / mean |float32 logit|), and how often the top token agrees.

A random model's residual stream stays small (the largest value is printed), so here the guard only shows that it
costs no accuracy; tests/test_precision.py builds tiny models whose stream overflows float16 without it. (Growing a
random model's stream with depth instead, by scaling its later blocks' outputs, makes it chaotic: bfloat16 and
float16 then both lose the top token, guard or not, which says nothing about trained models.)

CPU float16: this CPU's native float16 matrix product runs at ~2 GFLOP/s, far too slow for 16K tokens, so float16
products are emulated (`EmulatedFloat16Products`): float16 operands, float32 accumulation, one rounding to float16,
which is what GPUs compute (and what the native CPU product gives to within one unit in the last place). Everything
else (LayerNorms, the WKV op's float16 inputs, the residual additions) runs in float16 as it would on a GPU. The WKV
op is the compiled kernel where it builds (printed), else the torch form; `--backend torch` forces the latter.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bench_rwkv6_lm import build_model, describe, random_tokens  # benchmarks/ is on the path
from visualrwkv_hf.ops import set_wkv_backend, wkv6_compiled, wkv_backend

PRODUCTS = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm, torch.baddbmm}

class EmulatedFloat16Products(TorchFunctionMode):
    """Matrix products with a float16 operand run in float32 and are rounded once to float16 (as on a GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in args):
            args = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]
            return func(*args, **kwargs).half()
        return func(*args, **kwargs)


@torch.no_grad()
def logits_at(model, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(float32 logits at `positions`, the largest |residual stream| value, seconds) of one forward pass."""
    largest = []
    hooks = [block.register_forward_hook(lambda m, a, out: largest.append(out.abs().max().item()))
             for block in model.model.blocks]
    start = time.perf_counter()
    with EmulatedFloat16Products():
        logits = model(ids, use_cache=False, logits_to_keep=positions).logits
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    return logits[0], max(largest), seconds


def errors(logits: torch.Tensor, reference: torch.Tensor) -> str:
    if not logits.isfinite().all():
        share = (~logits.isfinite()).float().mean().item()
        return f"{'non-finite':>10} {'':>10} {'':>10} {share * 100:>7.1f}% non-finite"
    diff = (logits - reference).abs()
    top = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    relative = diff.mean().item() / reference.abs().mean().item()
    return f"{diff.max().item():>10.2e} {diff.mean().item():>10.2e} {relative:>10.2e} {top * 100:>7.1f}% top-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--length", type=int, default=16384, help="prompt tokens (one forward pass)")
    parser.add_argument("--window", type=int, default=256, help="positions compared, ending at 4K and at --length")
    parser.add_argument("--backend", choices=("auto", "torch"), default="auto", help="WKV op")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    set_wkv_backend(args.backend)

    model = build_model(args.layers, args.width, args.vocab)
    ends = sorted({min(4096, args.length), args.length})
    positions = torch.cat([torch.arange(end - args.window, end) for end in ends])
    ids = torch.tensor([random_tokens(args.length, args.vocab, seed=5)])
    wkv = "compiled kernel" if wkv6_compiled.available("cpu", model.config.head_size) else "torch"
    print(f"torch {torch.__version__}, {threads} threads, WKV op: {wkv}; float16 products emulated (see --help)")
    print(f"model: {describe(model)}")

    variants = {
        "float32": (torch.float32, 0),
        "bfloat16": (torch.bfloat16, 0),
        "float16, guard (rescale_every=6)": (torch.float16, 6),
        "float16, no guard": (torch.float16, 0),
    }
    results = {}
    for name, (dtype, rescale_every) in variants.items():
        variant = copy.deepcopy(model).to(dtype)
        variant.config.rescale_every = rescale_every
        results[name] = logits_at(variant, ids, positions)
        del variant
        _, largest, seconds = results[name]
        print(f"  {name}: {seconds:.1f} s, largest |residual stream| value as stored {largest:.4g}", flush=True)

    reference = results["float32"][0]
    print(f"\nlogits vs float32, {args.window} positions ending at each length:")
    print(f"{'tokens':>6}  {'variant':<34} {'max abs':>10} {'mean abs':>10} {'relative':>10} {'top-1 agrees':>12}")
    for index, end in enumerate(ends):
        window = slice(index * args.window, (index + 1) * args.window)
        for name, (logits, _, _) in list(results.items())[1:]:
            print(f"{end:>6}  {name:<34} {errors(logits[window], reference[window])}")


if __name__ == "__main__":
    main()
