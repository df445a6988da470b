"""`DecodeLinear`: an `nn.Linear` whose float32 CPU products of a few rows (one-token decode steps) run a compiled
row-dot kernel (csrc/linear) instead of `F.linear`.

Why: for a handful of rows the product is a matrix-vector one, bound by reading the weight once. On some CPUs (AMD
EPYC with torch's MKL) `F.linear`'s GEMV on nn.Linear's (out, in) weight layout reaches only part of that bandwidth
(1.5x the time of the same product with the weight stored (in, out), the layout BlinkDL's `rwkv` package uses), and
one-token decode is almost all such products. The kernel streams the weight in its own layout, so the parameters, the
state dict and everything that sees an `nn.Linear` (PEFT LoRA, which calls `base_layer(x)`; transformers' weight
initialisation; quantisation tools that replace the module) stay as they are.

The kernel runs only where it is a drop-in: CPU, float32 input, weight and bias, at most `MAX_KERNEL_ROWS` rows, a
contiguous weight, no gradient needed (grad mode off, or nothing requiring one), not under torch.compile; everything
else, and every input when the compiled ops are switched off (VISUALRWKV_WKV_BACKEND=torch) or cannot be built, runs
`F.linear`. Its results equal `F.linear`'s to float32 rounding (the sums run in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import BINDING, CompiledOp

# Rows up to which the kernel runs: it beats F.linear on every RWKV-7 0.1B shape at 16 rows and beyond
# (benchmarks/bench_linear.py), but its inner loop loads a weight vector per FMA, so with many rows it turns
# compute-bound where a GEMM does not; prefill and training keep F.linear.
MAX_KERNEL_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch op: `F.linear` of 2-D x (rows, in) with weight (out, in)."""
    return F.linear(x, weight, bias)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear: x must be (rows, in) and weight (out, in), got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)}."
        )
    tensors = [x, weight] if bias is None else [x, weight, bias]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise TypeError("linear: the kernel takes float32 CPU tensors; use F.linear for other dtypes or devices.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}.")


linear_compiled = CompiledOp(
    "linear",
    sources={"cpu": ["linear/linear_cpu/linear_cpu.cpp", f"linear/{BINDING}"]},
    headers=["linear/linear_cpu/linear_cpu.h"],
    fallback=linear,
    check_inputs=_check_inputs,
    layer_name=None,
    differentiable=False,
)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the compiled kernel where that is a drop-in (see the module docstring)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and 0 < x.numel() <= MAX_KERNEL_ROWS * x.shape[-1]
        # the op has no fake (meta) implementation for torch.compile to trace
        and not torch.compiler.is_compiling()
    ):
        # run() takes the fallback where autograd needs a gradient, the switch is "torch" or nothing is built
        y = linear_compiled(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class DecodeLinear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and type checks) whose few-row float32 CPU products, one-token decode
    steps, run the compiled row-dot kernel where no gradient is needed (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return decode_linear(input, self.weight, self.bias)
