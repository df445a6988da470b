"""Compiled WKV6 CPU kernel vs the torch forms, at the op and at the model level (fp32, CPU).

Usage: python benchmarks/bench_wkv6_kernels.py [--lengths 512 2048 4096] [--repeats 5] [--model-length 2048]
       [--plot docs/images/wkv6_op_cpu.png]   (--plot needs matplotlib: pip install -e ".[bench]")
Op level (B=1, H=32, N=64): forward and forward+backward of the kernel, the chunked torch form and the step torch
form; model level (d_model 256, 4 layers): prefill and one training step (forward+backward), tokens/s with and
without the kernel. Every number is the minimum over --repeats rounds in which the contenders take turns (the
machine may be shared), and ratios are "torch time / kernel time". The first run builds the kernel (~60 s) unless
it is cached.
"""

from __future__ import annotations

import argparse
import time

import torch

from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM
from visualrwkv_hf.ops import set_wkv_backend, wkv6_chunked, wkv6_compiled, wkv6_recurrent


def min_seconds(fns: dict, repeats: int, rounds_of: dict | None = None) -> dict:
    """Minimum time of each callable over `repeats` rounds (fewer for a name in `rounds_of`), the callables taking
    turns within each round, so that a burst of load on a shared machine hits every contender alike."""
    rounds_of = rounds_of or {}
    for fn in fns.values():
        for _ in range(2):  # warm-up: allocator (large blocks come back from the heap after a first free), threads
            fn()
    best = {name: float("inf") for name in fns}
    for round_index in range(repeats):
        for name, fn in fns.items():
            if round_index >= rounds_of.get(name, repeats):
                continue
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def op_inputs(T: int, heads: int = 32, head_size: int = 64):
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(1, T, heads, head_size, generator=g) for _ in range(3))
    w = (-6 + 7 * torch.rand(heads, head_size, generator=g)).expand(1, T, heads, head_size).contiguous()
    u = torch.randn(heads, head_size, generator=g)
    return r, k, v, w, u


def forward_only(form, inputs):
    with torch.no_grad():
        form(*inputs)


def forward_backward(form, leaves):
    for leaf in leaves:  # fresh gradients each run, without timing copies of the inputs
        leaf.grad = None
    y, state = form(*leaves)
    (y.sum() + state.sum()).backward()


FORMS = {"kernel": wkv6_compiled, "chunked": wkv6_chunked, "step": wkv6_recurrent}


def bench_ops(lengths, repeats) -> dict:
    """Prints the op table; returns {pass label: {T: {form: seconds}}}."""
    forms = FORMS
    results = {"forward": {}, "fwd+bwd": {}}
    print("op level, B=1 H=32 N=64 fp32, ms (min of runs); ratio = best torch / kernel")
    print(f"{'T':>6} {'pass':>9} " + " ".join(f"{name:>9}" for name in forms) + f" {'ratio':>7}")
    for T in lengths:
        inputs = op_inputs(T)
        leaves = [x.clone().requires_grad_() for x in inputs]
        for label, run, args in (("forward", forward_only, inputs), ("fwd+bwd", forward_backward, leaves)):
            # the step form's backward at long T costs seconds per run: fewer rounds there
            times = min_seconds(
                {name: (lambda f=form: run(f, args)) for name, form in forms.items()},
                repeats,
                rounds_of={"step": max(1, repeats // 2)},
            )
            results[label][T] = times
            best_torch = min(times["chunked"], times["step"])
            print(
                f"{T:>6} {label:>9} " + " ".join(f"{times[n] * 1e3:>9.1f}" for n in forms)
                + f" {best_torch / times['kernel']:>6.1f}x"
            )
    return results


def write_plot(path: str, results: dict) -> None:
    """ms against T for each form, forward and forward+backward side by side (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"kernel": "compiled CPU kernel", "chunked": "torch chunked form", "step": "torch step form"}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (label, by_length) in zip(axes, results.items()):
        lengths = sorted(by_length)
        for form, marker in zip(FORMS, "os^"):
            axis.plot(lengths, [by_length[T][form] * 1e3 for T in lengths], marker=marker, label=labels[form])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(lengths, [str(T) for T in lengths])
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("ms (min of runs)")
        axis.set_title(f"WKV6 {label}, B=1 H=32 N=64 fp32, {torch.get_num_threads()} CPU threads")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def bench_model(T, repeats):
    config = Rwkv6Config(
        vocab_size=1024, hidden_size=256, num_hidden_layers=4, head_size=64, time_mix_extra_dim=32,
        time_decay_extra_dim=64,
    )
    torch.manual_seed(0)
    model = Rwkv6ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, T))

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    def with_backend(backend, fn):
        def run():
            set_wkv_backend(backend)
            try:
                fn()
            finally:
                set_wkv_backend(None)

        return run

    print(f"\nmodel level, d_model 256, 4 layers, T={T}, fp32: tokens/s (min time of runs)")
    results = {
        label: min_seconds({backend: with_backend(backend, fn) for backend in ("auto", "torch")}, repeats)
        for label, fn in (("prefill", prefill), ("train step", train_step))
    }
    for label, times in results.items():
        kernel, torch_time = times["auto"], times["torch"]
        print(
            f"{label:>11}: kernel {T / kernel:9.0f} tok/s   torch {T / torch_time:9.0f} tok/s   "
            f"ratio {torch_time / kernel:.1f}x"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-length", type=int, default=2048)
    parser.add_argument("--plot", help="also draw the op timings to this PNG (needs matplotlib)")
    args = parser.parse_args()
    set_wkv_backend("auto")
    if not wkv6_compiled.available("cpu"):
        raise SystemExit("the WKV6 CPU kernel could not be built here: nothing to compare")
    set_wkv_backend(None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = bench_ops(args.lengths, args.repeats)
    if args.plot:
        write_plot(args.plot, results)
    bench_model(args.model_length, args.repeats)


if __name__ == "__main__":
    main()
