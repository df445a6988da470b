"""The decode linear kernel (`visualrwkv_hf.ops.linear`) against `F.linear` and against the product with the weight
stored (in, out), BlinkDL's `rwkv` package layout, for the float32 weight shapes of RWKV-7 0.1B and 1.5B models.

Run: .venv/bin/python benchmarks/bench_linear.py [--quick] [--rows 1 4 8 16]

Per shape and row count the three products take turns (minimum of several rounds, so a loaded machine disturbs
each alike); each run multiplies by a set of weights of that shape, 64 MB or more in all (more than the last-level
cache), so every product reads its weight from memory as in a decode step. Printed: ms per product and the ratios
kernel / F.linear and kernel / (in, out) product. The kernel is called directly (the layer `DecodeLinear` runs it only up to `MAX_KERNEL_ROWS` rows); the
results are checked against F.linear first. --quick: the 0.1B shapes only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rwkv6_lm import best_of_taking_turns  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.1B shapes only")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
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
