"""The CUDA WKV7 kernels on a GPU: the chunked kernel vs the step kernel vs fla's `chunk_rwkv7` vs the chunked torch
form, error against float64 and speed side by side; the step/chunked crossover.

Usage: python benchmarks/bench_wkv7_cuda.py [--length 4096] [--batches 1 8] [--repeats 5] [--no-fla]
           [--crossover 16 32 64 128 256 1024] [--output results.jsonl]
Accuracy (B=1, H=32, N=64, T=--accuracy-length, bf16 inputs, RWKV-7 inputs: a = -kk, b = kk * iclr,
w = -softplus(-x) - 0.5 with a fixed x per channel): each form's y, final state and every input gradient against the
float64 step reference on the same rounded inputs, as max |error| / max |reference|. Speed (H=32, N=64, bf16 inputs,
T=--length): forward and forward+backward, ms (min of --repeats runs, CUDA events), and each form's speed relative to
fla (fla's time / the form's). Crossover (B=1, H=32): step vs chunked kernel over T, which sets kWKV7ChunkedMinLength
(csrc/wkv7/wkv7_cuda/wkv7_chunked_op.h). fla (flash-linear-attention) runs its `chunk_rwkv7` when importable (it
needs Triton): log-decay -exp(w) (clamped as ours), scale 1, our a and b, key-major state as ours; its errors in the
accuracy table are the check of that mapping. Every result is also appended to --output as a JSON line the moment it
is measured.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_claims import Results  # noqa: E402
from bench_wkv6_cuda import min_ms, run_with_grads  # noqa: E402
from bench_wkv7 import op_inputs  # noqa: E402

from visualrwkv_hf.ops import wkv7_chunked, wkv7_compiled, wkv7_reference  # noqa: E402
from visualrwkv_hf.ops.wkv6 import LOG_DECAY_MIN  # noqa: E402

FORM_ENV = "VISUALRWKV_WKV7_CUDA_FORM"
GRAD_NAMES = ["r", "w", "k", "v", "a", "b", "s0"]


def inputs_for(B: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    """RWKV-7 inputs (B, T, 32, 64) in bf16 on the GPU, and a random fp32 initial state."""
    inputs = [x.to(torch.bfloat16) for x in op_inputs(T, 32, 64, device="cuda", batch=B, seed=seed)]
    g = torch.Generator().manual_seed(seed + 1)
    return inputs + [torch.randn(B, 32, 64, 64, generator=g).cuda()]


def cuda_form(form: str):
    """Our CUDA op with the step or the chunked kernel forced."""

    def run(*inputs):
        os.environ[FORM_ENV] = form
        try:
            return wkv7_compiled(*inputs)
        finally:
            os.environ.pop(FORM_ENV, None)

    return run


def fla_form():
    """fla's `chunk_rwkv7` behind our contract (y and state in float32), or an ImportError."""
    from fla.ops.rwkv7 import chunk_rwkv7

    def run(r, w, k, v, a, b, initial_state=None):
        log_decay = -torch.exp(w.float().clamp(max=math.log(-LOG_DECAY_MIN))).to(r.dtype)
        state = None if initial_state is None else initial_state.float()
        y, final_state = chunk_rwkv7(r, log_decay, k, v, a, b, scale=1.0, initial_state=state,
                                     output_final_state=True)
        return y.float(), final_state.float()

    return run


def op_forms(use_fla: bool) -> dict:
    wkv7_compiled.build("cuda")  # raises with nvcc's output if the kernels cannot be built
    forms = {"chunked kernel": cuda_form("chunked"), "step kernel": cuda_form("step"), "chunked torch": wkv7_chunked}
    if use_fla:
        try:
            forms["fla chunk_rwkv7"] = fla_form()
        except ImportError as error:
            print(f"fla left out: {error}")
    return forms


def bench_accuracy(forms, T, results):
    inputs = inputs_for(1, T, seed=1)
    g = torch.Generator().manual_seed(2)
    grad_y = torch.randn(inputs[0].shape, generator=g).cuda()
    grad_s = torch.randn(inputs[6].shape, generator=g).cuda()
    reference = run_with_grads(wkv7_reference, [x.double() for x in inputs], grad_y.double(), grad_s.double())
    print(f"accuracy vs float64, B=1 H=32 N=64 T={T} bf16 inputs: max |error| / max |reference|")
    for name, form in forms.items():
        got = run_with_grads(form, inputs, grad_y, grad_s)
        errors = {
            key: (a.double() - b).abs().max().item() / b.abs().max().item()
            for key, a, b in zip(["y", "state"] + GRAD_NAMES, got, reference)
        }
        results.add({"kind": "accuracy", "form": name, "T": T, **{k: float(f"{e:.2e}") for k, e in errors.items()}})


def timings(form, inputs, repeats):
    def forward():
        with torch.no_grad():
            form(*inputs)

    def forward_backward():
        leaves = [x.clone().requires_grad_() for x in inputs]
        y, state = form(*leaves)
        (y.float().sum() + state.float().sum()).backward()

    return min_ms(forward, repeats), min_ms(forward_backward, repeats)


def bench_speed(forms, batches, T, repeats, results):
    print(f"speed, H=32 N=64 T={T} bf16 inputs; ms, min of {repeats}")
    for B in batches:
        inputs = inputs_for(B, T)
        measured = {}
        # fla last (its first call autotunes Triton kernels, which may take most of a time-boxed run): our rows are
        # written before it starts; the speed ratios against it follow as rows of their own
        for name in sorted(forms, key=lambda name: name == "fla chunk_rwkv7"):
            if name == "chunked torch" and B > 1:
                continue  # seconds per run at this size, and no contender
            measured[name] = forward_ms, fwd_bwd_ms = timings(forms[name], inputs, repeats)
            results.add({"kind": "op_speed", "form": name, "B": B, "T": T, "forward_ms": round(forward_ms, 3),
                         "fwd_bwd_ms": round(fwd_bwd_ms, 3)})
        if (anchor := measured.get("fla chunk_rwkv7")) is not None:
            for name, (forward_ms, fwd_bwd_ms) in measured.items():
                results.add({"kind": "speed_vs_fla", "form": name, "B": B, "T": T,
                             "forward": round(anchor[0] / forward_ms, 2), "fwd_bwd": round(anchor[1] / fwd_bwd_ms, 2)})


def bench_crossover(lengths, repeats, results):
    print("crossover, B=1 H=32 N=64 bf16: step vs chunked kernel over T")
    for T in lengths:
        inputs = inputs_for(1, T)
        row = {"kind": "crossover", "T": T}
        for form in ("step", "chunked"):
            forward_ms, fwd_bwd_ms = timings(cuda_form(form), inputs, repeats)
            row[f"{form}_forward_ms"], row[f"{form}_fwd_bwd_ms"] = round(forward_ms, 3), round(fwd_bwd_ms, 3)
        results.add(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--accuracy-length", type=int, default=1024)
    parser.add_argument("--crossover", type=int, nargs="*", default=[16, 32, 64, 128, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its Triton autotuning takes a while)")
    parser.add_argument("--output", help="append one JSON line per result to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    results = Results(args.output, {"bench": "bench_wkv7_cuda", "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__, "cuda": torch.version.cuda,
                                    "command": " ".join(sys.argv)})
    forms = op_forms(not args.no_fla)
    # speed first: the numbers the issue asks for survive a run cut short by the stage's time limit
    bench_speed(forms, args.batches, args.length, args.repeats, results)
    bench_accuracy(forms, args.accuracy_length, results)
    if args.crossover:
        bench_crossover(args.crossover, args.repeats, results)


if __name__ == "__main__":
    main()
