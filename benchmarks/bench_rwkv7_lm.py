"""RWKV-7 language-model speed: our transformers model against BlinkDL's `rwkv` package (x070), on the same weights.

Run: .venv/bin/python benchmarks/bench_rwkv7_lm.py [--quick]

One random fp32 model (BlinkDL's x070 initialisation with randomised LoRA factors, so decay, learning rate, gate and
value residual all depend on the input) is built with our classes, exported with `convert_hf_to_blinkdl` to a
temporary BlinkDL .pth and loaded by `rwkv.model.RWKV(path, "cpu fp32")` with `RWKV_V7_ON=1`. A sanity line checks
both give the same logits on a short prompt (sequence and one-token paths) before anything is timed.

Measured, each with the bar it is held to:
  a. decode: one-token forward with the recurrent cache after 256 / 4K / 16K tokens of context, and the `rwkv`
     package's one-token forward after the same 256 tokens. Bars: ours(16K) <= 1.1 x ours(256); ours <= 1.25 x rwkv.
  b. prefill at T=2048 against `rwkv`'s sequence forward. Bar: ours >= 2 x rwkv tokens/s, or within 10% of the
     model with a free stand-in WKV op (the most any WKV op could give, the rest of the model being the same).
  c. training step (forward + backward of the LM loss) at T=2048 with the chunked WKV7 form against autograd
     through the step form, on a smaller model; the free op's bound.
Timing helpers (contenders taking turns, minimum of several runs) are those of `bench_rwkv6_lm.py`.
"""

from __future__ import annotations

import os

# The rwkv package picks its model class when `rwkv.model` is first imported: x070 with RWKV_V7_ON=1 (always
# TorchScript), no CUDA kernels. Imported here first, so the RWKV-6 benchmark's helpers imported below (whose module
# imports `rwkv.model` too, for RWKV-6) find this RWKV-7 one.
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

import argparse
import contextlib
import copy
import sys
import tempfile
from pathlib import Path

import torch
from rwkv.model import RWKV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rwkv6_lm import (  # noqa: E402
    DECODE_WARMUP,
    bar,
    best_of,
    best_of_taking_turns,
    describe,
    interleaved_decode,
    prefill_ours,
    random_tokens,
    sanity_check,
    training_step,
)

from visualrwkv_hf import Rwkv7Config, Rwkv7ForCausalLM  # noqa: E402
from visualrwkv_hf.convert_rwkv7 import convert_hf_to_blinkdl  # noqa: E402
from visualrwkv_hf.ops import WKV7, wkv7_recurrent  # noqa: E402
from visualrwkv_hf.ops.kernels import BACKEND_ENV  # noqa: E402


def build_model(layers: int, width: int, vocab: int, seed: int = 0) -> Rwkv7ForCausalLM:
    """A random fp32 model whose LoRAs really depend on the input (BlinkDL's init starts their first factors at 0)."""
    torch.manual_seed(seed)
    config = Rwkv7Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers)
    model = Rwkv7ForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.blocks:
            attention = block.attention
            for name in ("w1", "a1", "v1", "g1"):
                if hasattr(attention, name):
                    getattr(attention, name).normal_(0, 0.05)
            attention.r_k.normal_(0, 0.5)
    return model


def load_reference(model: Rwkv7ForCausalLM, directory: Path) -> RWKV:
    path = directory / "bench_rwkv7.pth"
    torch.save(convert_hf_to_blinkdl(model.state_dict(), model.config), path)
    return RWKV(str(path.with_suffix("")), strategy="cpu fp32")


@contextlib.contextmanager
def wkv_path(path: str):
    """Routes the model's WKV7 op: "kernel" (the default: the compiled kernel where it builds), "chunked" (the torch
    chunked form for sequences, the step form for one token), "step" (the torch step form at every length, as
    autograd through a loop would train) or "free" (a stand-in costing a few elementwise adds, wrong values but
    gradients into every input: the model with it bounds what any WKV op could reach)."""
    original_forward, original_backend = WKV7.forward, os.environ.get(BACKEND_ENV)
    if path == "step":
        WKV7.forward = lambda self, r, w, k, v, a, b, initial_state=None, chunk_size=None: wkv7_recurrent(
            r, w, k, v, a, b, initial_state
        )
    elif path == "free":
        WKV7.forward = lambda self, r, w, k, v, a, b, initial_state=None, chunk_size=None: (
            r + w + k + v + a + b,
            r.new_zeros(r.shape[0], r.shape[2], r.shape[3], r.shape[3]),
        )
    if path in ("step", "chunked"):
        os.environ[BACKEND_ENV] = "torch"
    try:
        yield
    finally:
        WKV7.forward = original_forward
        if original_backend is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = original_backend


def on_path(path: str, run):
    def routed():
        with wkv_path(path):
            return run()

    return routed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--contexts", default="256,4096,16384", help="decode contexts (comma-separated)")
    parser.add_argument("--decode-steps", type=int, default=40)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-layers", type=int, default=4)
    parser.add_argument("--train-width", type=int, default=512)
    parser.add_argument("--train-vocab", type=int, default=4096, help="small, so the head does not hide the WKV cost")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking the script itself")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.vocab, args.contexts = 2, 256, 1024, "256,1024"
        args.decode_steps, args.prefill_len, args.repeats = 10, 256, 1
        args.train_layers, args.train_width, args.train_vocab = 2, 128, 1024

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads; rwkv package: RWKV_V7_ON=1 (TorchScript), 'cpu fp32'")
    contexts = [int(c) for c in args.contexts.split(",")]
    T = args.prefill_len
    rows = []  # (measurement, ours, other, ratio, bar)

    model = build_model(args.layers, args.width, args.vocab)
    print(f"model (a, b): {describe(model)}")
    with tempfile.TemporaryDirectory() as directory:
        reference = load_reference(model, Path(directory))
    print(sanity_check(model, reference, args.vocab))

    # a. decode: prefill once up to the longest context, keeping a copy of the cache at each context on the way;
    # then time single-token steps from every copy and from the reference (after the shortest context) in turn.
    history = random_tokens(max(contexts), args.vocab, seed=11)
    caches, cache, position = [], None, 0
    for context in contexts:
        _, cache = prefill_ours(model, history[position:context], cache)
        caches.append(copy.deepcopy(cache))
        position = context
    _, state = reference.forward(history[: contexts[0]], None)
    steps = random_tokens(args.decode_steps + DECODE_WARMUP, args.vocab, seed=19)
    ours, decode_reference = interleaved_decode(model, caches, reference, state, steps)
    decode = dict(zip(contexts, ours))
    longest, shortest = max(contexts), contexts[0]
    ratio = decode[longest] / decode[shortest]
    rows.append((f"a. decode ms/token, ctx {longest} vs {shortest}", decode[longest] * 1e3,
                 decode[shortest] * 1e3, ratio, f"<= 1.1: {bar(ratio <= 1.1)}"))
    ratio = decode[shortest] / decode_reference
    rows.append((f"a. decode ms/token, ours vs rwkv (ctx {shortest})", decode[shortest] * 1e3,
                 decode_reference * 1e3, ratio, f"<= 1.25: {bar(ratio <= 1.25)}"))

    # b. prefill throughput against the rwkv package's sequence forward (its CPU path: a loop over time inside
    # TorchScript), and the bound any WKV op could reach (the model with the free stand-in op), taking turns.
    prompt = random_tokens(T, args.vocab, seed=13)

    def prefill():
        return prefill_ours(model, prompt)

    times = best_of_taking_turns(
        args.repeats,
        {"ours": prefill, "chunked": on_path("chunked", prefill), "free": on_path("free", prefill),
         "rwkv": lambda: reference.forward(prompt, None)},
    )
    ratio, to_bound = times["rwkv"] / times["ours"], times["ours"] / times["free"]
    rows.append((f"b. prefill tok/s, T={T}, ours vs rwkv", T / times["ours"], T / times["rwkv"], ratio,
                 f">= 2 or <= 1.1x bound: {bar(ratio >= 2 or to_bound <= 1.1)}"))
    rows.append((f"b. prefill tok/s, T={T}, torch chunked vs rwkv", T / times["chunked"], T / times["rwkv"],
                 times["rwkv"] / times["chunked"], ""))
    rows.append((f"b. prefill tok/s, T={T}, free WKV op (bound) vs rwkv", T / times["free"], T / times["rwkv"],
                 times["rwkv"] / times["free"], ""))
    with wkv_path("step"):
        step_s = best_of(max(1, args.repeats - 1), prefill)
    rows.append((f"b. prefill tok/s, T={T}, ours vs step form", T / times["ours"], T / step_s,
                 step_s / times["ours"], ""))
    del model, reference, caches, cache, state

    # c. training step: the kernel (the default) and the torch chunked form against autograd through the step form,
    # and the free bound.
    train_model = build_model(args.train_layers, args.train_width, args.train_vocab, seed=1).train()
    print(f"model (c): {describe(train_model)}")
    ids = torch.tensor([random_tokens(T, args.train_vocab, seed=17)])
    training_step(train_model, ids)  # warm-up (allocations)

    def train():
        training_step(train_model, ids)

    times = best_of_taking_turns(
        max(1, args.repeats - 1), {path: on_path(path, train) for path in ("kernel", "chunked", "free", "step")}
    )
    rows.append((f"c. train step s, T={T}, ours (kernel) vs step autograd", times["kernel"], times["step"],
                 times["step"] / times["kernel"], ""))
    rows.append((f"c. train step s, T={T}, torch chunked vs step autograd", times["chunked"], times["step"],
                 times["step"] / times["chunked"], ""))
    rows.append((f"c. train step s, T={T}, free WKV op (bound) vs step", times["free"], times["step"],
                 times["step"] / times["free"], ""))

    print()
    print(f"{'measurement':<52} {'ours':>10} {'other':>10} {'ratio':>6}  bar")
    for name, ours, other, ratio, verdict in rows:
        print(f"{name:<52} {ours:>10.2f} {other:>10.2f} {ratio:>6.2f}  {verdict}")


if __name__ == "__main__":
    main()
