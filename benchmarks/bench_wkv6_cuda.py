"""The CUDA WKV6 kernel on a GPU: ours vs the package's chunked torch form vs fla's `chunk_rwkv6`, and a model.

Usage: python benchmarks/bench_wkv6_cuda.py [--length 4096] [--batches 1 8] [--repeats 5] [--no-fla] [--no-model]
Op level (H=32, N=64, bf16 inputs): forward and forward+backward, ms (min of runs, CUDA events), and how far each
form's output lies from ours (fla is an independent implementation: agreement checks both). Model level (12 x 768,
bf16, T=--length): prefill and one training step with the kernel and with the torch op, and the per-token decode
time with a cache. fla (flash-linear-attention) is used only when importable; it needs Triton.
"""

from __future__ import annotations

import argparse

import torch

from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM
from visualrwkv_hf.ops import set_wkv_backend, wkv6_chunked, wkv6_compiled
from visualrwkv_hf.ops.kernels import KernelFunction


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


def op_inputs(B: int, T: int, H: int = 32, N: int = 64):
    g = torch.Generator(device="cuda").manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, device="cuda", generator=g) for _ in range(3))
    # realistic decays: one level per channel from ~e^-e^-6 (slow) to e^-e (fast), as in trained checkpoints
    w = (-6 + 7 * torch.rand(H, N, device="cuda", generator=g)).expand(B, T, H, N).contiguous()
    u = 0.5 * torch.randn(H, N, device="cuda", generator=g)
    return [x.to(torch.bfloat16) for x in (r, k, v, w, u)]


def op_forms(use_fla: bool) -> dict:
    ops = wkv6_compiled.kernel_for("cuda", 64)
    if ops is None:
        raise SystemExit("the CUDA WKV6 kernel could not be built (see the warning above)")
    forms = {
        "ours": lambda r, k, v, w, u: KernelFunction.apply(ops, r, k, v, w, u, None),
        "chunked torch": lambda r, k, v, w, u: wkv6_chunked(r, k, v, w, u),
    }
    if not use_fla:
        return forms
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError as error:
        print(f"fla not importable ({error}): compared with the chunked torch form only")
        return forms

    def fla(r, k, v, w, u):
        # fla takes the per-step log-decay itself and scales r.k by K^-0.5 unless told otherwise
        y, state = chunk_rwkv6(r, k, v, -torch.exp(w.float()), u, scale=1.0, output_final_state=True)
        return y.float(), state.float()

    forms["fla chunk_rwkv6"] = fla
    return forms


def bench_ops(batches, T, repeats, use_fla):
    forms = op_forms(use_fla)
    print(f"op level, H=32 N=64 T={T} bf16 inputs; ms, min of {repeats}; error = max |y - y_ours| / max |y_ours|")
    for B in batches:
        inputs = op_inputs(B, T)
        with torch.no_grad():
            y_ours, s_ours = forms["ours"](*inputs)
        for name, form in forms.items():
            with torch.no_grad():
                y, s = form(*inputs)
            error = (y.float() - y_ours).abs().max().item() / y_ours.abs().max().item()
            state_error = (s.float() - s_ours).abs().max().item() / s_ours.abs().max().item()

            def forward():
                with torch.no_grad():
                    form(*inputs)

            def forward_backward():
                leaves = [x.clone().requires_grad_() for x in inputs]
                y, state = form(*leaves)
                (y.float().sum() + state.float().sum()).backward()

            fwd, fwd_bwd = min_ms(forward, repeats), min_ms(forward_backward, repeats)
            print(f"  B={B:<2} {name:>16}: forward {fwd:8.2f} ms  fwd+bwd {fwd_bwd:8.2f} ms  "
                  f"error y {error:.1e} state {state_error:.1e}", flush=True)


def bench_model(T, repeats):
    config = Rwkv6Config(vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_size=64)
    torch.manual_seed(0)
    model = Rwkv6ForCausalLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, T), device="cuda")
    print(f"model level, 12 x 768, vocab 65536, bf16, T={T}; ms, min of {repeats}")
    results = {}
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
            results[backend] = (prefill_ms, min_ms(train_step, repeats))
        finally:
            set_wkv_backend(None)
        label = "kernel" if backend == "auto" else "torch op"
        print(f"  {label:>8}: prefill {results[backend][0]:8.1f} ms ({T / results[backend][0] * 1e3:,.0f} tok/s)  "
              f"training step {results[backend][1]:8.1f} ms", flush=True)
    print(f"  kernel speed-up: prefill {results['torch'][0] / results['auto'][0]:.2f}x, "
          f"training step {results['torch'][1] / results['auto'][1]:.2f}x")
    model.eval()
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)

        def decode():
            model(token, cache=cache, use_cache=True)

        print(f"  decode with a cache after {T} tokens: {min_ms(decode, repeats * 4):.2f} ms/token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its Triton autotuning takes a while)")
    parser.add_argument("--no-model", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)
    if not args.no_model:
        bench_model(args.length, args.repeats)
    bench_ops(args.batches, args.length, args.repeats, not args.no_fla)


if __name__ == "__main__":
    main()
