"""The CUDA WKV6 kernels on a GPU: the chunked kernel vs the step kernel vs fla's `chunk_rwkv6` vs the chunked torch
form, error against float64 and speed side by side; the step/chunked crossover; a 12 x 768 model.

Usage: python benchmarks/bench_wkv6_cuda.py [--length 4096] [--batches 1 8] [--repeats 5] [--no-fla] [--no-model]
           [--output results.jsonl]
Accuracy (B=1, H=32, N=64, T=--accuracy-length, bf16 inputs, realistic per-channel decays): each form's y, final
state and every input gradient against the float64 step reference on the same rounded inputs, as max |error| / max
|reference|. Speed (H=32, N=64, bf16 inputs, T=--length): forward and forward+backward, ms (min of --repeats runs,
CUDA events), and each form's speed relative to fla. Crossover (B=1, H=32): step vs chunked kernel over T, which sets
kWKV6ChunkedMinLength (csrc/wkv6/wkv6_cuda/wkv6_chunked_op.h). Model level (12 x 768, vocab 65536, bf16): prefill
and a training step with the kernels and with the torch op, and decode ms/token, eager and CUDA-graphed.
fla (flash-linear-attention) runs through ops.wkv6_fla when importable (it needs Triton); --no-fla skips it.
Every result is also appended to --output as a JSON line the moment it is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_claims import Results  # noqa: E402

from visualrwkv_hf import Rwkv6ForCausalLM, Rwkv6Config  # noqa: E402
from visualrwkv_hf.ops import set_wkv_backend, wkv6_chunked, wkv6_compiled, wkv6_recurrent  # noqa: E402

FORM_ENV = "VISUALRWKV_WKV6_CUDA_FORM"
GRAD_NAMES = ["r", "k", "v", "w", "u", "s0"]


def min_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, autotuning, lazy builds
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def op_inputs(B: int, T: int, H: int = 32, N: int = 64, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, device="cuda", generator=g) for _ in range(3))
    # realistic decays: one level per channel from ~e^-e^-6 (slow) to e^-e (fast), as in trained checkpoints
    w = (-6 + 7 * torch.rand(H, N, device="cuda", generator=g)).expand(B, T, H, N).contiguous()
    u = 0.5 * torch.randn(H, N, device="cuda", generator=g)
    s0 = torch.randn(B, H, N, N, device="cuda", generator=g)
    return [x.to(torch.bfloat16) for x in (r, k, v, w, u)] + [s0]


def cuda_form(form: str):
    """Our CUDA op with the step or the chunked kernel forced."""

    def run(*inputs):
        os.environ[FORM_ENV] = form
        try:
            return wkv6_compiled(*inputs)
        finally:
            os.environ.pop(FORM_ENV, None)

    return run


def op_forms(use_fla: bool) -> dict:
    wkv6_compiled.build("cuda")  # raises with nvcc's output if the kernels cannot be built
    forms = {"chunked kernel": cuda_form("chunked"), "step kernel": cuda_form("step"), "chunked torch": wkv6_chunked}
    if use_fla:
        from visualrwkv_hf.ops.wkv6_fla import fla_chunk_rwkv6, wkv6_fla

        try:
            fla_chunk_rwkv6()
            forms["fla chunk_rwkv6"] = wkv6_fla
        except ImportError as error:
            print(f"fla left out: {error}")
    return forms


def run_with_grads(form, inputs, grad_y, grad_s):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, s = form(*leaves)
    ((y.float() * grad_y).sum() + (s.float() * grad_s).sum()).backward()
    return [y.detach(), s.detach()] + [x.grad for x in leaves]


def bench_accuracy(forms, T, results):
    inputs = op_inputs(1, T, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    grad_y = torch.randn(inputs[0].shape, device="cuda", generator=g)
    grad_s = torch.randn(inputs[5].shape, device="cuda", generator=g)
    reference = run_with_grads(wkv6_recurrent, [x.double() for x in inputs], grad_y.double(), grad_s.double())
    print(f"accuracy vs float64, B=1 H=32 N=64 T={T} bf16 inputs: max |error| / max |reference|")
    for name, form in forms.items():
        got = run_with_grads(form, inputs, grad_y, grad_s)
        errors = {
            key: (a.double() - b).abs().max().item() / b.abs().max().item()
            for key, a, b in zip(["y", "state"] + GRAD_NAMES, got, reference)
        }
        results.add({"kind": "accuracy", "form": name, "T": T, **{k: float(f"{e:.2e}") for k, e in errors.items()}})


def bench_speed(forms, batches, T, repeats, results):
    print(f"speed, H=32 N=64 T={T} bf16 inputs; ms, min of {repeats}")
    for B in batches:
        inputs = op_inputs(B, T)
        timings = {}
        for name, form in forms.items():

            def forward():
                with torch.no_grad():
                    form(*inputs)

            def forward_backward():
                leaves = [x.clone().requires_grad_() for x in inputs]
                y, state = form(*leaves)
                (y.float().sum() + state.float().sum()).backward()

            timings[name] = (min_ms(forward, repeats), min_ms(forward_backward, repeats))
        anchor = timings.get("fla chunk_rwkv6")
        for name, (fwd, fwd_bwd) in timings.items():
            row = {"kind": "op_speed", "form": name, "B": B, "T": T, "forward_ms": round(fwd, 3),
                   "fwd_bwd_ms": round(fwd_bwd, 3)}
            if anchor:
                row.update({"speed_vs_fla_forward": round(anchor[0] / fwd, 2),
                            "speed_vs_fla_fwd_bwd": round(anchor[1] / fwd_bwd, 2)})
            results.add(row)


def bench_crossover(lengths, repeats, results):
    print("crossover, B=1 H=32 N=64 bf16: step vs chunked kernel over T")
    for T in lengths:
        inputs = op_inputs(1, T)
        row = {"kind": "crossover", "T": T}
        for form in ("step", "chunked"):
            run = cuda_form(form)

            def forward():
                with torch.no_grad():
                    run(*inputs)

            def forward_backward():
                leaves = [x.clone().requires_grad_() for x in inputs]
                y, state = run(*leaves)
                (y.sum() + state.sum()).backward()

            row[f"{form}_forward_ms"] = round(min_ms(forward, repeats), 3)
            row[f"{form}_fwd_bwd_ms"] = round(min_ms(forward_backward, repeats), 3)
        results.add(row)


def bench_model(T, repeats, results):
    config = Rwkv6Config(vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_size=64)
    torch.manual_seed(0)
    model = Rwkv6ForCausalLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, T), device="cuda")
    print(f"model level, 12 x 768, vocab 65536, bf16, T={T}; ms, min of {repeats}")
    for backend in ("auto", "torch"):
        set_wkv_backend(backend)
        try:

            def prefill():
                with torch.no_grad():
                    model(ids, use_cache=True, logits_to_keep=1)

            def train_step():
                model(ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)

            model.eval()
            prefill_ms = min_ms(prefill, repeats)
            model.train()
            train_ms = min_ms(train_step, repeats)
        finally:
            set_wkv_backend(None)
        results.add({"kind": "model", "wkv": "kernels" if backend == "auto" else "torch op", "T": T,
                     "prefill_ms": round(prefill_ms, 2), "prefill_tok_s": round(T / prefill_ms * 1e3),
                     "train_step_ms": round(train_ms, 2)})
    model.eval()
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)

        def decode():
            model(token, cache=cache, use_cache=True)

        results.add({"kind": "decode", "mode": "eager", "context": T, "ms_per_token": round(min_ms(decode, repeats * 4), 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--accuracy-length", type=int, default=1024)
    parser.add_argument("--crossover", type=int, nargs="*", default=[16, 32, 64, 128, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its Triton autotuning takes a while)")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--output", help="append one JSON line per result to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    results = Results(args.output, {"bench": "bench_wkv6_cuda", "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__, "cuda": torch.version.cuda,
                                    "command": " ".join(sys.argv)})
    forms = op_forms(not args.no_fla)
    bench_accuracy(forms, args.accuracy_length, results)
    bench_speed(forms, args.batches, args.length, args.repeats, results)
    if args.crossover:
        bench_crossover(args.crossover, args.repeats, results)
    if not args.no_model:
        bench_model(args.length, args.repeats, results)


if __name__ == "__main__":
    main()
