"""The decode linear kernel (`visualrwkv_hf.ops.linear`) against `F.linear` and against the product with the weight
stored (in, out), BlinkDL's `rwkv` package layout, for the float32 weight shapes of RWKV-7 0.1B and 1.5B models.

Run: .venv/bin/python benchmarks/bench_linear.py [--quick] [--rows 1 4 16] [--decode]

Per shape and row count the three products take turns (minimum of several rounds, so a loaded machine disturbs
each alike); each run multiplies by a set of weights of that shape, 64 MB or more in all (more than the last-level
cache), so every product reads its weight from memory as in a decode step. Printed: ms per product and the ratios
kernel / F.linear and kernel / (in, out) product. The kernel is called directly (the layer `DecodeLinear` runs it
only up to `MAX_KERNEL_ROWS` rows); its results are checked against F.linear first. --quick: the 0.1B shapes only.

--decode instead: the model-level effect, part a. of bench_rwkv7_lm.py at context 256 (12 x 768 fp32 RWKV-7 against
the `rwkv` package, taking turns per token, minima of 40 steps), alternately with `DecodeLinear`'s kernel on and off
(`MAX_KERNEL_ROWS` 16 / 0), twice each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# first: it selects the `rwkv` package's RWKV-7 classes (RWKV_V7_ON) before bench_rwkv6_lm imports `rwkv.model`
import bench_rwkv7_lm as lm  # noqa: E402
from bench_rwkv6_lm import best_of_taking_turns  # noqa: E402

import visualrwkv_hf.ops.linear as linear_module  # noqa: E402
from visualrwkv_hf.ops.linear import MAX_KERNEL_ROWS, linear_compiled  # noqa: E402

# (model, matrix, out, in): the block's C x C products (r, k, v, output), the FFN's key and value, the LM head
SHAPES = [
    ("0.1B", "C x C", 768, 768),
    ("0.1B", "ffn key", 3072, 768),
    ("0.1B", "ffn value", 768, 3072),
    ("0.1B", "head", 65536, 768),
    ("1.5B", "C x C", 2048, 2048),
    ("1.5B", "ffn key", 8192, 2048),
    ("1.5B", "ffn value", 2048, 8192),
    ("1.5B", "head", 65536, 2048),
]
# bytes of weights each timed run reads: more than the last-level cache
SET_BYTES = 64 << 20


def decode_with_and_without_kernel(steps: int = 40, context: int = 256) -> None:
    """Our decode step against the `rwkv` package's, with the kernel on and off (see the module docstring)."""
    model = lm.build_model(12, 768, 65536)
    with tempfile.TemporaryDirectory() as directory:
        reference = lm.load_reference(model, Path(directory))
    print(lm.sanity_check(model, reference, 65536))
    history = lm.random_tokens(context, 65536, seed=11)
    tokens = lm.random_tokens(steps + lm.DECODE_WARMUP, 65536, seed=19)
    for max_rows in (MAX_KERNEL_ROWS, 0, MAX_KERNEL_ROWS, 0):
        linear_module.MAX_KERNEL_ROWS = max_rows
        _, cache = lm.prefill_ours(model, history, None)
        _, state = reference.forward(history, None)
        (ours,), theirs = lm.interleaved_decode(model, [cache], reference, state, tokens)
        print(f"decode ms/token after {context} tokens, kernel {'on ' if max_rows else 'off'}: ours {ours * 1e3:.2f},"
              f" rwkv {theirs * 1e3:.2f}, ratio {ours / theirs:.2f}", flush=True)
    linear_module.MAX_KERNEL_ROWS = MAX_KERNEL_ROWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.1B shapes only")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--decode", action="store_true", help="the model-level decode comparison instead")
    args = parser.parse_args()
    if args.decode:
        decode_with_and_without_kernel()
        return
    kernel = linear_compiled.build("cpu").forward
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DecodeLinear runs the kernel up to "
          f"{MAX_KERNEL_ROWS} rows")
    print(f"{'model':5} {'matrix':10} {'out x in':>12} {'rows':>4} {'kernel ms':>9} {'F.linear':>9} {'(in,out)':>9}"
          f" {'k/F.lin':>7} {'k/(in,out)':>10}")
    for model, matrix, out, inp in SHAPES:
        if args.quick and model != "0.1B":
            continue
        copies = -(-SET_BYTES // (out * inp * 4))
        weights = [torch.randn(out, inp) / inp**0.5 for _ in range(copies)]
        weights_in_out = [weight.t().contiguous() for weight in weights]
        for rows in args.rows:
            x = torch.randn(rows, inp)
            torch.testing.assert_close(kernel(x, weights[0], None), F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
            best = best_of_taking_turns(args.repeats, {
                "kernel": lambda: [kernel(x, weight, None) for weight in weights],
                "F.linear": lambda: [F.linear(x, weight) for weight in weights],
                "in_out": lambda: [x @ weight for weight in weights_in_out],
            })
            ms = {name: seconds * 1e3 / copies for name, seconds in best.items()}
            print(f"{model:5} {matrix:10} {f'{out}x{inp}':>12} {rows:>4} {ms['kernel']:9.3f} {ms['F.linear']:9.3f}"
                  f" {ms['in_out']:9.3f} {ms['kernel'] / ms['F.linear']:7.2f} {ms['kernel'] / ms['in_out']:10.2f}")
        del weights, weights_in_out


if __name__ == "__main__":
    with torch.no_grad():
        main()
